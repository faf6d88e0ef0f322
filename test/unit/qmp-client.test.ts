/**
 * QmpClient against a fake QMP server on a Unix socket: greeting and
 * negotiation, replies matched by id (in any order), QMP errors as E_QMP,
 * events and waits, timeouts, and what happens when the peer goes away.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { join } from "node:path";
import { QmpClient, type QmpEvent } from "../../src/qmp/qmp-client.ts";
import { scratchDir } from "../helpers/tools.ts";

const GREETING = { QMP: { version: { qemu: { major: 7, minor: 2, micro: 22 }, package: "fake" }, capabilities: ["oob"] } };

type Command = { execute: string; arguments?: Record<string, unknown>; id?: string };

interface FakeQmp {
  path: string;
  /** Every command received, in order. */
  received: Command[];
  /** The server side of the (latest) connection. */
  socket(): net.Socket;
  send(message: unknown): void;
  close(): Promise<void>;
}

/**
 * A fake QEMU. `answer` returns the reply for a command (the id is added),
 * or null to leave it unanswered. qmp_capabilities is answered unless
 * `greet` is false (then nothing at all is sent).
 */
async function fakeQmp(t: TestContext, answer: (command: Command, fake: FakeQmp) => unknown = () => ({ return: {} }), options: { greet?: boolean; path?: string } = {}): Promise<FakeQmp> {
  const path = options.path ?? join(scratchDir(t, "ss-qmp-"), "qmp.sock");
  let current: net.Socket | null = null;
  const sockets = new Set<net.Socket>();
  const fake: FakeQmp = {
    path,
    received: [],
    socket: () => current!,
    send: (message) => current!.write(typeof message === "string" ? message : JSON.stringify(message) + "\r\n"),
    close: () => new Promise((resolve) => {
      for (const socket of sockets) socket.destroy();
      server.close(() => resolve());
    }),
  };
  const server = net.createServer((socket) => {
    current = socket;
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => {});
    if (options.greet === false) return;
    fake.send(GREETING);
    let buffered = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      buffered += chunk;
      let newline: number;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const command = JSON.parse(buffered.slice(0, newline)) as Command;
        buffered = buffered.slice(newline + 1);
        fake.received.push(command);
        const reply = command.execute === "qmp_capabilities" ? { return: {} } : answer(command, fake);
        if (reply !== null && reply !== undefined) fake.send({ ...(reply as object), id: command.id });
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  t.after(() => fake.close());
  return fake;
}

async function connected(t: TestContext, fake: FakeQmp): Promise<QmpClient> {
  const client = await QmpClient.connect(fake.path, { timeoutMs: 5_000 });
  t.after(() => client.close());
  return client;
}

test("connect: greeting, qmp_capabilities, then ready; execute returns the value", async (t) => {
  const fake = await fakeQmp(t, (command) => (command.execute === "query-status" ? { return: { status: "running", running: true } } : { return: {} }));
  const client = await connected(t, fake);
  assert.equal(client.state, "ready");
  assert.equal(client.greeting?.version.qemu.major, 7);
  assert.deepEqual(fake.received.map((command) => command.execute), ["qmp_capabilities"]);
  assert.deepEqual(await client.execute("query-status"), { status: "running", running: true });
  await client.execute("migrate", { uri: "unix:/x" });
  assert.deepEqual(fake.received[2], { execute: "migrate", arguments: { uri: "unix:/x" }, id: fake.received[2].id });
  assert.notEqual(fake.received[1].id, fake.received[2].id);
});

test("connect retries until the socket appears", async (t) => {
  const path = join(scratchDir(t, "ss-qmp-"), "late.sock");
  const connecting = QmpClient.connect(path, { timeoutMs: 5_000 });
  await new Promise((resolve) => setTimeout(resolve, 150));
  await fakeQmp(t, undefined, { path });
  const client = await connecting;
  t.after(() => client.close());
  assert.equal(client.state, "ready");
});

test("connect gives up: E_TIMEOUT when nobody listens or nobody greets; abort signal stops retries", async (t) => {
  const dir = scratchDir(t, "ss-qmp-");
  await assert.rejects(QmpClient.connect(join(dir, "none.sock"), { timeoutMs: 200 }), { code: "E_TIMEOUT" });
  const silent = await fakeQmp(t, undefined, { greet: false });
  await assert.rejects(QmpClient.connect(silent.path, { timeoutMs: 200 }), { code: "E_TIMEOUT", message: /no greeting/ });
  const controller = new AbortController();
  const aborted = QmpClient.connect(join(dir, "none.sock"), { timeoutMs: 10_000, signal: controller.signal });
  setTimeout(() => controller.abort("QEMU exited"), 50);
  await assert.rejects(aborted, { code: "E_QEMU", message: /QEMU exited/ });
});

test("a QMP error is E_QMP with QEMU's class and description", async (t) => {
  const fake = await fakeQmp(t, () => ({ error: { class: "DeviceNotFound", desc: "Device 'x' not found" } }));
  const client = await connected(t, fake);
  await assert.rejects(client.execute("device_del", { id: "x" }), (error: Error & { code?: string; details?: Record<string, unknown> }) => {
    assert.equal(error.code, "E_QMP");
    assert.match(error.message, /device_del.*DeviceNotFound: Device 'x' not found/);
    assert.deepEqual(error.details, { command: "device_del", errorClass: "DeviceNotFound", description: "Device 'x' not found" });
    return true;
  });
  assert.equal(client.state, "ready", "an error reply leaves the connection usable");
});

test("replies are matched by id, whatever their order; a reply without id goes to the oldest command", async (t) => {
  const held: Command[] = [];
  const fake = await fakeQmp(t, (command) => {
    held.push(command);
    return null;
  });
  const client = await connected(t, fake);
  const first = client.execute("first");
  const second = client.execute("second");
  const third = client.execute("third");
  while (held.length < 3) await new Promise((resolve) => setTimeout(resolve, 5));
  fake.send({ return: "for-second", id: held[1].id });
  fake.send({ return: "for-third", id: held[2].id });
  assert.equal(await second, "for-second");
  assert.equal(await third, "for-third");
  fake.send({ error: { class: "GenericError", desc: "JSON parse error" } });
  await assert.rejects(first, { code: "E_QMP", message: /first.*JSON parse error/ });
});

test("events: emitted with their data and QEMU's timestamp; waitForEvent filters by name and predicate", async (t) => {
  const fake = await fakeQmp(t);
  const client = await connected(t, fake);
  const seen: QmpEvent[] = [];
  client.on("event", (event) => seen.push(event));
  const completed = client.waitForEvent("MIGRATION", 2_000, (data) => data.status === "completed");
  fake.send({ event: "STOP", timestamp: { seconds: 1700000000, microseconds: 250000 } });
  fake.send({ event: "MIGRATION", data: { status: "active" }, timestamp: { seconds: 1700000001, microseconds: 0 } });
  fake.send({ event: "MIGRATION", data: { status: "completed" }, timestamp: { seconds: 1700000002, microseconds: 500 } });
  const event = await completed;
  assert.deepEqual(event, { event: "MIGRATION", data: { status: "completed" }, timestampMs: 1700000002000.5 });
  assert.deepEqual(seen.map((entry) => entry.event), ["STOP", "MIGRATION", "MIGRATION"]);
  assert.equal(seen[0].timestampMs, 1700000000250);
  assert.deepEqual(seen[0].data, {}, "an event without data has empty data");
  await assert.rejects(client.waitForEvent("RESUME", 50), { code: "E_TIMEOUT", message: /RESUME/ });
  assert.equal(client.listenerCount("event"), 1, "finished waits remove their listeners");
});

test("a command without reply times out with E_TIMEOUT; its late reply is dropped and the connection stays usable", async (t) => {
  let slow: Command | null = null;
  const fake = await fakeQmp(t, (command) => {
    if (command.execute === "slow") {
      slow = command;
      return null;
    }
    return { return: command.execute };
  });
  const client = await connected(t, fake);
  await assert.rejects(client.execute("slow", undefined, { timeoutMs: 50 }), { code: "E_TIMEOUT", message: /'slow'.*50 ms/ });
  fake.send({ return: "late", id: slow!.id });
  assert.equal(await client.execute("next"), "next");
});

test("the peer going away fails every waiting command and event wait with E_QEMU; later commands fail naming the state", async (t) => {
  const fake = await fakeQmp(t, () => null);
  const client = await connected(t, fake);
  let closeEvents = 0;
  client.on("close", () => closeEvents++);
  const pending = client.execute("query-migrate");
  const waiting = client.waitForEvent("SHUTDOWN", 5_000);
  await new Promise((resolve) => setTimeout(resolve, 20));
  fake.socket().destroy();
  await assert.rejects(pending, { code: "E_QEMU", message: /closed/ });
  await assert.rejects(waiting, { code: "E_QEMU", message: /SHUTDOWN.*closed/ });
  assert.equal(client.state, "closed");
  await assert.rejects(client.execute("cont"), { code: "E_QEMU", message: /connection is closed/ });
  await assert.rejects(client.waitForEvent("X", 10), { code: "E_QEMU" });
  await client.close();
  assert.equal(closeEvents, 1);
});

test("garbage on the socket closes the connection with E_QEMU", async (t) => {
  const fake = await fakeQmp(t, () => null);
  const client = await connected(t, fake);
  const closed = new Promise<Error | null>((resolve) => client.once("close", resolve));
  const pending = client.execute("query-status");
  await new Promise((resolve) => setTimeout(resolve, 20));
  fake.send("(qemu) this is HMP, not QMP\n");
  await assert.rejects(pending, { code: "E_QEMU", message: /not JSON/ });
  const error = await closed;
  assert.match(error?.message ?? "", /not JSON/);
});

test("close() while commands wait: they fail, close resolves, a second close is harmless", async (t) => {
  const fake = await fakeQmp(t, () => null);
  const client = await connected(t, fake);
  const pending = assert.rejects(client.execute("stop"), { code: "E_QEMU" });
  await client.close();
  await pending;
  await client.close();
});
