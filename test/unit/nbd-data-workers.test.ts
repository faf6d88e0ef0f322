/**
 * DataWorkerPool's process management with stand-in workers (tiny Node
 * scripts speaking the pool's messages): start-up failures, replacement of
 * a worker that dies, no replacement of one that never got ready, close().
 * NbdServer's side of a hand-off with a stand-in pool in this process:
 * connection limits, close(), and serving here when no worker takes it.
 * Real workers serving real clients: test/interop/nbd-workers.test.ts.
 */
import test from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import net, { type Socket } from "node:net";
import { join } from "node:path";
import { DataWorkerPool } from "../../src/nbd/data-workers.ts";
import type { TransmissionHandoff } from "../../src/nbd/nbd-connection.ts";
import { NbdExport } from "../../src/nbd/nbd-export.ts";
import type { DataWorkers } from "../../src/nbd/nbd-server.ts";
import { memoryDevice, patternAt, startServer } from "./nbd-test-server.ts";
import { negotiate } from "./nbd-raw-client.ts";
import { scratchDir } from "../helpers/tools.ts";

/** A stand-in worker: reports ready, then lives until the IPC channel closes. */
const READY_WORKER = `process.send({ type: "ready", rssBytes: process.memoryUsage.rss() }); process.on("disconnect", () => process.exit(0));`;
/** A stand-in worker that fails before it is ready (an image it cannot open). */
const FAILING_WORKER = `process.send({ type: "error", message: "cannot open" }); process.exit(1);`;

function nodeWorker(script: string): ChildProcess {
  return spawn(process.execPath, ["-e", script], { stdio: ["ignore", "ignore", "inherit", "ipc"] });
}

function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once("exit", () => resolve()));
}

const exp = new NbdExport({ name: "disk", device: memoryDevice(1024 * 1024), readOnly: true });

test("a ready worker that dies is replaced; close() ends every worker", async () => {
  const children: ChildProcess[] = [];
  const pool = new DataWorkerPool({ exportName: "disk", count: 2, spawnWorker: () => children[children.push(nodeWorker(READY_WORKER)) - 1] });
  await pool.start();
  assert.equal(pool.readyCount, 2);
  assert.ok(pool.canTake(exp));
  assert.ok(!pool.canTake(new NbdExport({ name: "other", device: memoryDevice(4096) })), "only the pool's export");
  const replaced = new Promise((resolve) => pool.once("worker-ready", resolve));
  children[0].kill("SIGKILL");
  await replaced;
  assert.equal(children.length, 3, "one replacement started");
  assert.equal(pool.readyCount, 2);
  await pool.close();
  await Promise.all(children.map(exited));
  assert.ok(!pool.canTake(exp), "a closed pool takes nothing");
});

test("a worker that fails before it is ready is not replaced, and one that cannot start does not hang start()", async () => {
  let spawned = 0;
  const failing = new DataWorkerPool({
    exportName: "disk",
    count: 1,
    spawnWorker: () => {
      spawned++;
      return nodeWorker(FAILING_WORKER);
    },
  });
  await failing.start();
  assert.equal(failing.readyCount, 0);
  assert.equal(spawned, 1);
  assert.ok(!failing.canTake(exp), "no worker: connections stay in the main process");
  await failing.close();

  const missing = new DataWorkerPool({ exportName: "disk", count: 2, spawnWorker: () => spawn("/nonexistent/snapstack-worker", [], { stdio: ["ignore", "ignore", "ignore", "ipc"] }) });
  await missing.start();
  assert.equal(missing.readyCount, 0);
  await missing.close();
});

/** A pool stand-in: takes connections (answering GO itself, as a worker would) or declines them. */
class StandInPool implements DataWorkers {
  accepting = true;
  shutdowns = 0;
  taken: Array<{ socket: Socket; onClosed: (reason: string) => void }> = [];
  canTake(exp: NbdExport): boolean {
    return exp.name === "disk";
  }
  handOff(socket: Socket, handoff: TransmissionHandoff, onClosed: (reason: string) => void): boolean {
    if (!this.accepting) return false;
    socket.write(Buffer.concat(handoff.replies));
    this.taken.push({ socket, onClosed });
    return true;
  }
  /** The connection ends in its "worker". */
  end(index: number): void {
    const { socket, onClosed } = this.taken[index];
    socket.destroy();
    onClosed("ended by the stand-in");
  }
  shutdownConnections(): void {
    this.shutdowns++;
    this.taken.forEach((taken, index) => {
      if (!taken.socket.destroyed) this.end(index);
    });
  }
}

test("moved connections count against the connection limit until their worker reports them closed; close() waits for them", async (t) => {
  const pool = new StandInPool();
  const { server, connect } = await startServer(t, [{ name: "disk", device: memoryDevice(1024 * 1024) }], { connectionsMax: 2, dataWorkers: pool });
  const negotiated: number[] = [];
  server.on("connection-negotiated", (info) => negotiated.push(info.open));
  await negotiate(await connect(), { name: "disk" });
  await negotiate(await connect(), { name: "disk" });
  assert.equal(pool.taken.length, 2, "both moved");
  assert.deepEqual(negotiated, [1, 2]);
  assert.equal(server.connectionCount, 2);
  const waiting = await connect();
  await assert.rejects(waiting.read(18, 300), /timed out/, "a third client waits for a slot");
  pool.end(0);
  await negotiate(waiting, { name: "disk" });
  assert.equal(pool.taken.length, 3);
  let closed = false;
  const closing = server.close().then(() => (closed = true));
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(pool.shutdowns, 1, "close() tells the pool to end its connections");
  await closing;
  assert.ok(closed);
  assert.equal(server.connectionCount, 0);
});

test("a connection no worker takes is served in the main process", async (t) => {
  const pool = new StandInPool();
  pool.accepting = false;
  const { server, connect } = await startServer(t, [{ name: "disk", device: memoryDevice(1024 * 1024) }], { connectionsMax: 0, dataWorkers: pool });
  const client = await connect();
  await negotiate(client, { name: "disk" });
  client.sendRequest({ type: 0, cookie: 3n, offset: 4096, length: 1024 });
  const [chunk] = await client.readStructured();
  assert.ok(chunk.payload.subarray(8).equals(patternAt(4096, 1024)));
  assert.equal(server.connectionCount, 1);
  assert.equal(pool.taken.length, 0);
});

/** A stand-in worker that echoes each message from the pool back as an "error" (the pool logs it) and reports a connection closed when its socket closes. */
const ECHO_WORKER = `
process.on("message", (message, socket) => {
  process.send({ type: "error", message: JSON.stringify(message) });
  if (message.type === "connection" && socket) {
    socket.resume();
    socket.on("close", () => process.send({ type: "closed", id: message.id, reason: "client left" }));
  }
});
process.send({ type: "ready", rssBytes: 0 });
process.on("disconnect", () => process.exit(0));`;

test("workers are told when every one of them has a connection (they then write large requests synchronously), and when not any more", async (t) => {
  const logged: string[] = [];
  const children: ChildProcess[] = [];
  const pool = new DataWorkerPool({ exportName: "disk", count: 2, spawnWorker: () => children[children.push(nodeWorker(ECHO_WORKER)) - 1], log: (message) => logged.push(message) });
  t.after(() => pool.close());
  await pool.start();
  const busyMessages = (): string[] => logged.filter((line) => line.includes('"busy"')).map((line) => `${line.slice("data worker ".length, line.indexOf(":"))} ${JSON.parse(line.slice(line.indexOf(": ") + 2)).allWorkersBusy}`);
  const waitForBusyMessages = async (count: number): Promise<void> => {
    for (let waitedMs = 0; busyMessages().length < count && waitedMs < 10_000; waitedMs += 10) await new Promise((resolve) => setTimeout(resolve, 10));
  };
  const dir = scratchDir(t, "snapstack-nbd-busy-");
  const accepted: Socket[] = [];
  const listener = net.createServer({ pauseOnConnect: true }, (socket) => accepted.push(socket));
  const path = join(dir, "s.sock");
  await new Promise<void>((resolve) => listener.listen(path, resolve));
  // Handed-off sockets stay counted in the listener: close it without waiting for them.
  t.after(() => void listener.close());
  const clients: net.Socket[] = [];
  const handOffOne = async (): Promise<void> => {
    clients.push(net.connect(path));
    while (accepted.length < clients.length) await new Promise((resolve) => setTimeout(resolve, 5));
    assert.ok(pool.handOff(accepted[accepted.length - 1], { exportName: "disk", structuredReplies: true, metaContextIds: [], replies: [] }, () => {}));
  };
  await handOffOne();
  await new Promise((resolve) => setTimeout(resolve, 100));
  assert.deepEqual(busyMessages(), [], "one connection: the other worker is idle");
  await handOffOne();
  await waitForBusyMessages(2);
  const pids = children.map((child) => String(child.pid));
  assert.deepEqual(busyMessages().sort(), pids.map((pid) => `${pid} true`).sort(), "both workers told: all busy");
  clients[0].destroy();
  await waitForBusyMessages(4);
  assert.deepEqual(busyMessages().slice(2).sort(), pids.map((pid) => `${pid} false`).sort(), "a connection ended: not all busy any more");
  for (const client of clients) client.destroy();
});
