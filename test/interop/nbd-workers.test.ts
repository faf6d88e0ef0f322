/**
 * `snapstack nbd` data workers (src/nbd/data-workers.ts): negotiated
 * connections to raw and read-only exports served by worker processes.
 * Real clients (nbdcopy with multi-conn, qemu-img) and a raw protocol client;
 * the lifecycle rules: -e across processes, no -t, SIGTERM, a worker killed,
 * the main process killed with SIGKILL, --workers=0.
 */
import test from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, runOk, scratchDir } from "../helpers/tools.ts";
import { createRandom } from "../helpers/random.ts";
import { IHAVEOPT, RawNbdClient, infoData, metaData, negotiate, type Endpoint } from "../unit/nbd-raw-client.ts";
import { MiB, SNAPSTACK_BIN, startNbd, waitExit, type RunningServer } from "./nbd-helpers.ts";

const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_FLUSH = 3;
const WAIT_MS = 20_000;

/** Live (not zombie) processes whose parent is `pid`. */
function childPids(pid: number): number[] {
  const children: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const fields = readFileSync(`/proc/${entry}/stat`, "utf8").split(") ")[1].split(" ");
      if (Number(fields[1]) === pid && fields[0] !== "Z") children.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return children;
}

function alive(pid: number): boolean {
  try {
    return !readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].startsWith("Z");
  } catch {
    return false;
  }
}

async function waitUntil(check: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + WAIT_MS;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`not true after ${WAIT_MS} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

function endpointOf(server: RunningServer): Endpoint {
  return { path: server.socketPath! };
}

async function connected(server: RunningServer): Promise<RawNbdClient> {
  const client = await RawNbdClient.connect(endpointOf(server));
  await negotiate(client);
  return client;
}

/** One READ with structured replies; the data of its single data chunk. */
async function readAt(client: RawNbdClient, offset: number, lengthBytes: number, cookie: bigint): Promise<Buffer> {
  client.sendRequest({ type: CMD_READ, offset, length: lengthBytes, cookie });
  const chunks = await client.readStructured();
  assert.equal(chunks.length, 1, "one data chunk");
  assert.equal(chunks[0].cookie, cookie);
  assert.equal(chunks[0].type, 1, "OFFSET_DATA");
  return chunks[0].payload.subarray(8);
}

/** A successful WRITE or FLUSH reply (simple, as qemu-nbd sends them even with structured replies). */
async function expectOk(client: RawNbdClient, cookie: bigint): Promise<void> {
  const reply = await client.readReply();
  assert.deepEqual(reply.kind === "simple" ? [reply.cookie, reply.error] : reply, [cookie, 0]);
}

function randomFile(path: string, sizeBytes: number): Buffer {
  const data = Buffer.from(createRandom(0x6e6264).bytes(sizeBytes));
  writeFileSync(path, data);
  return data;
}

test("raw export with workers: multi-conn nbdcopy writes land in the file; a write on one connection is read and flushed on another", async (t) => {
  if (!requireTools(t, "nbdcopy")) return;
  const dir = scratchDir(t, "nbd-workers-raw");
  const source = join(dir, "source.raw");
  const target = join(dir, "target.raw");
  const data = randomFile(source, 32 * MiB);
  writeFileSync(target, Buffer.alloc(32 * MiB));
  const server = await startNbd(t, "snapstack", dir, target, { args: ["-t", "-e", "4", "-f", "raw", "-v"] });
  const workers = childPids(server.process.pid!);
  assert.equal(workers.length, 2, `two data workers: ${server.stderr()}`);
  assert.match(server.stderr(), /data worker \d+ ready \(RSS \d+ MiB\)/);

  await runOk("nbdcopy", ["--connections=4", source, server.uri]);
  assert.ok(readFileSync(target).equals(data), "the file holds what nbdcopy wrote over 4 connections");
  assert.match(server.stderr(), /\[worker \d+\]: serving a connection/, "connections were served by workers");

  // Two connections: the pool gives each to the worker with fewer, so they are in different processes.
  const writer = await connected(server);
  const reader = await connected(server);
  const pattern = Buffer.alloc(256 * 1024, 0x5a);
  writer.sendRequest({ type: CMD_WRITE, offset: MiB, payload: pattern, cookie: 1n });
  await expectOk(writer, 1n);
  reader.sendRequest({ type: CMD_FLUSH, cookie: 2n });
  await expectOk(reader, 2n);
  assert.ok((await readAt(reader, MiB, pattern.length, 3n)).equals(pattern), "the other connection reads the completed write");
  writer.close();
  reader.close();

  server.process.kill("SIGTERM");
  assert.equal(await waitExit(server.process), 0);
  assert.deepEqual(workers.filter(alive), [], "no worker outlives the server");
  assert.ok(readFileSync(target).subarray(MiB, MiB + pattern.length).equals(pattern));
});

test("-e counts worker-served clients; without -t the server and its workers exit when the last client leaves", async (t) => {
  const dir = scratchDir(t, "nbd-workers-limit");
  const image = join(dir, "disk.raw");
  const data = randomFile(image, 4 * MiB);
  const server = await startNbd(t, "snapstack", dir, image, { args: ["-e", "2", "-r", "-f", "raw"] });
  const workers = childPids(server.process.pid!);
  assert.equal(workers.length, 2);
  const first = await connected(server);
  const second = await connected(server);
  const third = await RawNbdClient.connect(endpointOf(server));
  await assert.rejects(third.read(18, 500), /timed out/, "a third client waits without a greeting");
  first.close();
  await negotiate(third);
  assert.ok((await readAt(third, 4096, 8192, 7n)).equals(data.subarray(4096, 4096 + 8192)));
  assert.ok((await readAt(second, 0, 4096, 8n)).equals(data.subarray(0, 4096)));
  second.close();
  assert.equal(server.process.exitCode, null, "one client is still connected");
  third.close();
  assert.equal(await waitExit(server.process), 0);
  assert.deepEqual(workers.filter(alive), []);
});

test("a killed worker takes only its connections and is replaced; SIGKILL of the server leaves no worker", async (t) => {
  const dir = scratchDir(t, "nbd-workers-crash");
  const image = join(dir, "disk.raw");
  const data = randomFile(image, 4 * MiB);
  const server = await startNbd(t, "snapstack", dir, image, { args: ["-t", "-e", "0", "-r", "-f", "raw", "-v"] });
  const serverPid = server.process.pid!;
  const [victim, survivor] = childPids(serverPid);
  const clients = [await connected(server), await connected(server)];
  process.kill(victim, "SIGKILL");
  await waitUntil(() => clients.some((client) => client.closed), "a client of the killed worker is disconnected");
  const living = clients.filter((client) => !client.closed);
  assert.equal(living.length, 1, "the other worker's client stays connected");
  assert.ok((await readAt(living[0], 0, 65536, 1n)).equals(data.subarray(0, 65536)));
  await waitUntil(() => childPids(serverPid).length === 2, "the killed worker is replaced");
  const replacement = childPids(serverPid).find((pid) => pid !== survivor)!;
  assert.notEqual(replacement, victim);
  const later = await connected(server);
  assert.ok((await readAt(later, MiB, 65536, 2n)).equals(data.subarray(MiB, MiB + 65536)));

  server.process.kill("SIGKILL");
  await waitExit(server.process);
  await waitUntil(() => !alive(survivor) && !alive(replacement), "workers exit when the main process is gone");
  for (const client of [...living, later]) await client.waitClosed();
});

test("a worker serves what negotiation chose: EXPORT_NAME without structured replies, and a meta context for BLOCK_STATUS", async (t) => {
  const dir = scratchDir(t, "nbd-workers-state");
  const image = join(dir, "disk.raw");
  const data = randomFile(image, MiB);
  const server = await startNbd(t, "snapstack", dir, image, { args: ["-t", "-e", "0", "-r", "-f", "raw", "-x", "disk", "-v"] });
  const plain = await RawNbdClient.connect(endpointOf(server));
  await plain.handshake(1);
  plain.sendOption(1, Buffer.from("disk"));
  const reply = await plain.read(134);
  assert.equal(Number(reply.readBigUInt64BE(0)), MiB);
  assert.ok(reply.subarray(10).equals(Buffer.alloc(124)), "no NO_ZEROES: 124 zero bytes");
  plain.sendRequest({ type: CMD_READ, cookie: 9n, offset: 512, length: 1024 });
  const simple = await plain.readReply(1024);
  assert.ok(simple.kind === "simple" && simple.cookie === 9n && simple.data.equals(data.subarray(512, 1536)), "a simple reply with the data");

  const mapping = await RawNbdClient.connect(endpointOf(server));
  const { contextIds } = await negotiate(mapping, { name: "disk", contexts: ["base:allocation"] });
  mapping.sendRequest({ type: 7, cookie: 4n, offset: 0, length: MiB });
  const [status] = await mapping.readStructured();
  assert.equal(status.type, 5, "BLOCK_STATUS chunk");
  assert.equal(status.payload.readUInt32BE(0), contextIds.get("base:allocation"));
  assert.deepEqual([status.payload.readUInt32BE(4), status.payload.readUInt32BE(8)], [MiB, 0], "one data extent");

  // Options sent without waiting for replies: the earlier replies leave before the socket moves.
  const eager = await RawNbdClient.connect(endpointOf(server));
  await eager.handshake();
  const option = (code: number, data: Buffer): Buffer => {
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(IHAVEOPT, 0);
    header.writeUInt32BE(code, 8);
    header.writeUInt32BE(data.length, 12);
    return Buffer.concat([header, data]);
  };
  eager.write(Buffer.concat([option(8, Buffer.alloc(0)), option(10, metaData("disk", ["base:allocation"])), option(7, infoData("disk"))]));
  const replies = [];
  for (let i = 0; i < 7; i++) {
    const reply = await eager.readOptionReply();
    replies.push(`${reply.option}:${reply.type}`);
    if (reply.option === 7 && reply.type === 1) break;
  }
  assert.deepEqual(replies, ["8:1", "10:4", "10:1", "7:3", "7:3", "7:1"], "STRUCTURED_REPLY ACK, META_CONTEXT + ACK, GO's INFOs + ACK");
  assert.ok((await readAt(eager, 4096, 4096, 5n)).equals(data.subarray(4096, 8192)));
  assert.equal((server.stderr().match(/\[worker \d+\]: serving a connection/g) ?? []).length, 3, "all were served by workers");
  plain.close();
  mapping.close();
  eager.close();
});

test("read-only qcow2 chain through workers matches qemu-img; --workers=0 serves in one process", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "nbdcopy")) return;
  const dir = scratchDir(t, "nbd-workers-chain");
  const base = join(dir, "base.qcow2");
  const top = join(dir, "top.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", base, "16M"]);
  await runOk("qemu-io", ["-f", "qcow2", "-c", "write -q -P 0x11 0 12M", base]);
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top]);
  await runOk("qemu-io", ["-f", "qcow2", "-c", "write -q -P 0x22 1M 3M", "-c", "write -q -z 8M 1M", top]);
  const withWorkers = await startNbd(t, "snapstack", dir, top, { args: ["-t", "-e", "4", "-r", "-v"] });
  const single = await startNbd(t, "snapstack", dir, top, { args: ["-t", "-e", "4", "-r", "--workers=0"] });
  assert.equal(childPids(withWorkers.process.pid!).length, 2);
  assert.deepEqual(childPids(single.process.pid!), [], "--workers=0 starts no worker");
  for (const server of [withWorkers, single]) {
    const out = join(dir, `out-${server.process.pid}.raw`);
    await runOk("nbdcopy", ["--connections=4", server.uri, out]);
    await runOk("qemu-img", ["compare", "-q", "-f", "raw", "-F", "qcow2", out, top]);
    await runOk("qemu-img", ["compare", "-q", "-f", "qcow2", top, server.uri]);
  }
  assert.match(withWorkers.stderr(), /\[worker \d+\]: serving a connection/);
});

test("--fork with workers: the background server's workers serve, and SIGTERM to the pid-file process ends them all", async (t) => {
  const dir = scratchDir(t, "nbd-workers-fork");
  const image = join(dir, "disk.raw");
  const data = randomFile(image, 2 * MiB);
  const socketPath = join(dir, "s.sock");
  const pidFile = join(dir, "s.pid");
  await runOk(process.execPath, [SNAPSTACK_BIN, "nbd", "--fork", "-t", "-e", "2", "-r", "-f", "raw", "-k", socketPath, `--pid-file=${pidFile}`, image]);
  const serverPid = Number(readFileSync(pidFile, "utf8").trim());
  t.after(() => {
    if (alive(serverPid)) process.kill(serverPid, "SIGKILL");
  });
  const workers = childPids(serverPid);
  assert.equal(workers.length, 2);
  const client = await RawNbdClient.connect({ path: socketPath });
  await negotiate(client);
  assert.ok((await readAt(client, 0, 4096, 1n)).equals(data.subarray(0, 4096)));
  process.kill(serverPid, "SIGTERM");
  assert.ok(await client.waitClosed(), "the client is disconnected");
  await waitUntil(() => !alive(serverPid) && workers.every((pid) => !alive(pid)), "server and workers exit");
  assert.ok(!existsSync(pidFile), "pid file removed");
});
