/**
 * The synchronous WRITE path (NbdExport.writeSync) of raw files on a real
 * file: data, FUA, flush after replied writes, writes crossing the end,
 * device errors, a read-only file, a client leaving mid-payload, small
 * payloads gathered through the shared read buffer, and the choice between
 * the synchronous path and the device's own for large writes
 * (env.syncLargeWrites, what data workers use).
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import { openImage } from "../../src/chain/index.ts";
import { SnapstackError } from "../../src/base/errors.ts";
import type { BlockDevice } from "../../src/device/block-device.ts";
import { BufferPool } from "../../src/nbd/buffer-pool.ts";
import { connectionLimits, NbdConnection } from "../../src/nbd/nbd-connection.ts";
import { NbdExport } from "../../src/nbd/nbd-export.ts";
import { scratchDir } from "../helpers/tools.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { chunkError, negotiate, RawNbdClient } from "./nbd-raw-client.ts";
import { MiB, startServer } from "./nbd-test-server.ts";

const READ = 0;
const WRITE = 1;
const FLUSH = 3;
const FUA = 1;
const EPERM = 1;
const EIO = 5;
const ENOSPC = 28;
const SIZE = 4 * MiB;

/** A raw file of SIZE bytes filled with 0x11, opened writable (or read-only) through the engine. */
async function rawFile(t: TestContext, readOnly = false): Promise<{ path: string; device: BlockDevice }> {
  const path = join(scratchDir(t, "snapstack-nbd-sync-"), "disk.raw");
  writeFileSync(path, Buffer.alloc(SIZE, 0x11));
  const device = await openImage(path, { format: "raw", readOnly });
  t.after(() => device.close());
  return { path, device };
}

/** Count the device's synchronous and asynchronous writes. */
function countWrites(device: BlockDevice): { sync: number; async: number } {
  const counts = { sync: 0, async: 0 };
  const writeSync = device.writeSync;
  assert.ok(writeSync !== undefined, "a raw file on a NodeFile has writeSync");
  const write = device.write.bind(device);
  Object.defineProperty(device, "writeSync", {
    value: (guestOffset: number, data: Uint8Array) => {
      counts.sync++;
      writeSync(guestOffset, data);
    },
  });
  Object.defineProperty(device, "write", {
    value: (guestOffset: number, data: Uint8Array) => {
      counts.async++;
      return write(guestOffset, data);
    },
  });
  return counts;
}

async function expectReply(client: RawNbdClient, cookie: bigint, errno = 0): Promise<void> {
  const reply = await client.readReply();
  if (reply.kind === "chunk") {
    assert.equal(reply.cookie, cookie);
    assert.equal(chunkError(reply).errno, errno, chunkError(reply).message);
    return;
  }
  assert.equal(reply.cookie, cookie);
  assert.equal(reply.error, errno);
}

async function readBack(client: RawNbdClient, offset: number, length: number, cookie: bigint): Promise<Buffer> {
  client.sendRequest({ type: READ, cookie, offset, length });
  const chunks = await client.readStructured();
  assert.equal(chunks.length, 1);
  assert.equal(chunks[0].cookie, cookie);
  return chunks[0].payload.subarray(8);
}

test("raw file: pipelined writes of every size (small ones gathered per read) land in the file, FUA and FLUSH after them too", async (t) => {
  const seed = testSeed();
  const random = createRandom(seed);
  t.diagnostic(`seed ${seed}`);
  const { path, device } = await rawFile(t);
  const counts = countWrites(device);
  const harness = await startServer(t, [{ name: "", device }]);
  const client = await harness.connect();
  await negotiate(client);
  const shadow = Buffer.alloc(SIZE, 0x11);
  const sizes = [1, 512, 4096, 4096, 4096, 20_000, 65_536, 100_000, 300_000, MiB];
  const writes: Array<{ offset: number; data: Buffer; flags: number }> = [];
  for (let i = 0; i < 40; i++) {
    const length = sizes[random.int(sizes.length)];
    const offset = random.int(SIZE - length + 1);
    const data = Buffer.alloc(length);
    for (let at = 0; at < length; at += 4096) data.fill(random.int(256), at, Math.min(length, at + 4096));
    writes.push({ offset, data, flags: i % 7 === 3 ? FUA : 0 });
  }
  // Disjoint in time: each batch is sent at once and replied before the next one overlaps it.
  for (let start = 0; start < writes.length; start += 8) {
    const batch = writes.slice(start, start + 8);
    const ranges: Array<[number, number]> = [];
    let cookie = BigInt(start);
    for (const write of batch) {
      if (ranges.some(([from, to]) => write.offset < to && from < write.offset + write.data.length)) continue;
      ranges.push([write.offset, write.offset + write.data.length]);
      client.sendRequest({ type: WRITE, flags: write.flags, cookie: cookie++, offset: write.offset, payload: write.data });
      write.data.copy(shadow, write.offset);
    }
    const expected = new Set(Array.from({ length: Number(cookie) - start }, (_, i) => BigInt(start + i)));
    for (let i = 0; i < expected.size; i++) {
      const reply = await client.readReply();
      assert.equal(reply.kind, "simple");
      assert.ok(reply.kind === "simple" && reply.error === 0 && expected.has(reply.cookie));
    }
  }
  client.sendRequest({ type: FLUSH, cookie: 1000n, offset: 0, length: 0 });
  await expectReply(client, 1000n);
  assert.ok(readFileSync(path).equals(shadow), "the file holds every replied write");
  for (const [offset, length] of [
    [0, 4096],
    [SIZE - MiB, MiB],
  ]) {
    assert.ok((await readBack(client, offset, length, 2000n)).equals(shadow.subarray(offset, offset + length)));
  }
  assert.ok(counts.sync > 0, "small writes took the synchronous path");
});

test("writes crossing the end are ENOSPC, device errors keep their errno, and the connection goes on", async (t) => {
  const { device } = await rawFile(t);
  const harness = await startServer(t, [{ name: "", device }]);
  const client = await harness.connect();
  await negotiate(client);
  client.sendRequest({ type: WRITE, cookie: 1n, offset: SIZE - 2048, payload: Buffer.alloc(4096, 0x22) });
  await expectReply(client, 1n, ENOSPC);
  assert.throws(() => device.writeSync!(SIZE - 100, Buffer.alloc(512)), (error: unknown) => error instanceof SnapstackError && error.code === "E_OUT_OF_RANGE");
  const writeSync = device.writeSync!;
  let failWith: SnapstackError | null = new SnapstackError("E_NO_SPACE", "disk full (test)");
  Object.defineProperty(device, "writeSync", {
    value: (guestOffset: number, data: Uint8Array) => {
      if (failWith !== null) throw failWith;
      writeSync(guestOffset, data);
    },
  });
  client.sendRequest({ type: WRITE, cookie: 2n, offset: 0, payload: Buffer.alloc(4096, 0x33) });
  await expectReply(client, 2n, ENOSPC);
  failWith = new SnapstackError("E_IO", "medium error (test)");
  client.sendRequest({ type: WRITE, cookie: 3n, offset: 0, payload: Buffer.alloc(4096, 0x33) });
  await expectReply(client, 3n, EIO);
  assert.ok((await readBack(client, 0, 4096, 4n)).equals(Buffer.alloc(4096, 0x11)), "failed writes changed nothing");
  failWith = null;
  client.sendRequest({ type: WRITE, cookie: 5n, offset: 0, payload: Buffer.alloc(4096, 0x33) });
  await expectReply(client, 5n);
  assert.ok((await readBack(client, 0, 4096, 6n)).equals(Buffer.alloc(4096, 0x33)));
});

test("a large WRITE on the device's own path: a device error is its errno reply and the connection goes on", async (t) => {
  const { device } = await rawFile(t);
  const harness = await startServer(t, [{ name: "", device }]);
  const client = await harness.connect();
  await negotiate(client);
  const write = device.write.bind(device);
  let failWith: SnapstackError | null = new SnapstackError("E_IO", "medium error (test)");
  let asyncWrites = 0;
  Object.defineProperty(device, "write", {
    value: (guestOffset: number, data: Uint8Array) => {
      asyncWrites++;
      return failWith !== null ? Promise.reject(failWith) : write(guestOffset, data);
    },
  });
  client.sendRequest({ type: WRITE, cookie: 1n, offset: 0, payload: Buffer.alloc(MiB, 0x44) });
  await expectReply(client, 1n, EIO);
  assert.ok((await readBack(client, 0, MiB, 2n)).equals(Buffer.alloc(MiB, 0x11)), "the failed write changed nothing");
  failWith = null;
  client.sendRequest({ type: WRITE, cookie: 3n, offset: 0, payload: Buffer.alloc(MiB, 0x55) });
  await expectReply(client, 3n);
  assert.ok((await readBack(client, 0, MiB, 4n)).equals(Buffer.alloc(MiB, 0x55)));
  assert.equal(asyncWrites, 2, "both large writes took the device's own path");
});

test("read-only raw file: WRITE is EPERM with its payload consumed; the device's writeSync refuses too", async (t) => {
  const { device } = await rawFile(t, true);
  assert.equal(device.readOnly, true);
  const harness = await startServer(t, [{ name: "", device }]);
  const client = await harness.connect();
  await negotiate(client);
  client.sendRequest({ type: WRITE, cookie: 1n, offset: 0, payload: Buffer.alloc(4096, 0x44) });
  await expectReply(client, 1n, EPERM);
  assert.ok((await readBack(client, 0, 4096, 2n)).equals(Buffer.alloc(4096, 0x11)));
  // The device refuses on its own too (an export whose device turned read-only).
  assert.throws(() => device.writeSync!(0, Buffer.alloc(512)), (error: unknown) => error instanceof SnapstackError && error.code === "E_READ_ONLY");
});

test("a client leaving mid-payload writes nothing of it; the next client is served", async (t) => {
  const { path, device } = await rawFile(t);
  const harness = await startServer(t, [{ name: "", device }]);
  const quitter = await harness.connect();
  await negotiate(quitter);
  quitter.sendRequest({ type: WRITE, cookie: 1n, offset: 8192, payload: Buffer.alloc(4096, 0x55) });
  await expectReply(quitter, 1n);
  // Header of a 4 KiB write, then half its payload, then gone.
  quitter.sendRequest({ type: WRITE, cookie: 2n, offset: 0, length: 4096, payload: Buffer.alloc(2048, 0x66) });
  quitter.close();
  const second = await harness.connect();
  await negotiate(second);
  assert.ok((await readBack(second, 8192, 4096, 3n)).equals(Buffer.alloc(4096, 0x55)), "the replied write is there");
  assert.ok((await readBack(second, 0, 4096, 4n)).equals(Buffer.alloc(4096, 0x11)), "the cut one is not");
  assert.ok(readFileSync(path).subarray(0, 4096).equals(Buffer.alloc(4096, 0x11)));
});

/** One connection served as a data worker serves it (startTransmission), with `syncLargeWrites`. */
async function workerStyleConnection(t: TestContext, exp: NbdExport, syncLargeWrites: () => boolean): Promise<RawNbdClient> {
  const dir = scratchDir(t, "snapstack-nbd-sync-");
  const listener = net.createServer({ pauseOnConnect: true }, (socket) => {
    const connection = new NbdConnection(socket, {
      findExport: (name) => (name === exp.name ? exp : undefined),
      listExports: () => [exp],
      tlsConfigured: false,
      tls: null,
      multiConn: true,
      limits: connectionLimits(),
      pool: new BufferPool(),
      onClosed: () => {},
      syncLargeWrites,
    });
    connection.startTransmission(exp, { exportName: exp.name, structuredReplies: true, metaContextIds: [], replies: [] });
  });
  const path = join(dir, "nbd.sock");
  await new Promise<void>((resolve) => listener.listen(path, resolve));
  const client = await RawNbdClient.connect({ path });
  t.after(async () => {
    client.close();
    await new Promise((resolve) => listener.close(resolve));
  });
  return client;
}

test("large writes are synchronous only when syncLargeWrites says so (never over 1 MiB); small ones always; FUA takes the device's path", async (t) => {
  const { path, device } = await rawFile(t);
  const counts = countWrites(device);
  const exp = new NbdExport({ name: "", device });
  let syncLarge = false;
  const client = await workerStyleConnection(t, exp, () => syncLarge);
  client.sendRequest({ type: WRITE, cookie: 1n, offset: 0, payload: Buffer.alloc(MiB, 0x77) });
  await expectReply(client, 1n);
  assert.deepEqual(counts, { sync: 0, async: 1 }, "a 1 MiB write goes to the device's own path");
  syncLarge = true;
  client.sendRequest({ type: WRITE, cookie: 2n, offset: MiB, payload: Buffer.alloc(MiB, 0x78) });
  await expectReply(client, 2n);
  assert.deepEqual(counts, { sync: 1, async: 1 }, "now synchronously");
  syncLarge = false;
  client.sendRequest({ type: WRITE, cookie: 3n, offset: 2 * MiB, payload: Buffer.alloc(4096, 0x79) });
  await expectReply(client, 3n);
  assert.deepEqual(counts, { sync: 2, async: 1 }, "a small write is synchronous either way");
  client.sendRequest({ type: WRITE, flags: FUA, cookie: 4n, offset: 3 * MiB, payload: Buffer.alloc(4096, 0x7a) });
  await expectReply(client, 4n);
  assert.deepEqual(counts, { sync: 2, async: 2 }, "FUA: written and flushed on the device's path");
  const file = readFileSync(path);
  assert.ok(file.subarray(0, MiB).equals(Buffer.alloc(MiB, 0x77)));
  assert.ok(file.subarray(MiB, 2 * MiB).equals(Buffer.alloc(MiB, 0x78)));
  assert.ok(file.subarray(2 * MiB, 2 * MiB + 4096).equals(Buffer.alloc(4096, 0x79)));
  assert.ok(file.subarray(3 * MiB, 3 * MiB + 4096).equals(Buffer.alloc(4096, 0x7a)));
  syncLarge = true;
  client.sendRequest({ type: WRITE, cookie: 5n, offset: 2 * MiB, payload: Buffer.alloc(2 * MiB, 0x7b) });
  await expectReply(client, 5n);
  assert.deepEqual(counts, { sync: 2, async: 3 }, "over 1 MiB: the device's path even when large writes may be synchronous");
  assert.ok(readFileSync(path).subarray(2 * MiB).equals(Buffer.alloc(2 * MiB, 0x7b)));
});

test("a device swap waiting for in-flight requests also holds synchronous writes back until the new device is in", async (t) => {
  const first = await rawFile(t);
  const second = await rawFile(t);
  const exp = new NbdExport({ name: "", device: first.device });
  // A request in flight keeps the swap waiting (its gate closed) until it ends.
  let finishHeld!: () => void;
  const held = exp.run(() => new Promise<void>((resolve) => (finishHeld = resolve)));
  const swapped = exp.swapDevice(second.device);
  assert.equal(exp.writeSync(0, Buffer.alloc(512, 0x88)), false, "declined while the swap waits");
  finishHeld();
  await held;
  assert.equal(await swapped, first.device);
  assert.equal(exp.writeSync(0, Buffer.alloc(512, 0x99)), true);
  assert.ok(readFileSync(first.path).subarray(0, 512).equals(Buffer.alloc(512, 0x11)), "the old device got nothing");
  assert.ok(readFileSync(second.path).subarray(0, 512).equals(Buffer.alloc(512, 0x99)));
});

test("a raw file opened to write on the thread pool (--aio=threads) offers no writeSync, and its WRITEs still land", async (t) => {
  const path = join(scratchDir(t, "snapstack-nbd-sync-"), "disk.raw");
  writeFileSync(path, Buffer.alloc(SIZE, 0x11));
  const device = await openImage(path, { format: "raw", ioMode: "async", writeIoMode: "async" });
  t.after(() => device.close());
  assert.equal(device.writeSync, undefined);
  const harness = await startServer(t, [{ name: "", device }]);
  const client = await harness.connect();
  await negotiate(client);
  client.sendRequest({ type: WRITE, cookie: 1n, offset: 4096, payload: Buffer.alloc(4096, 0x42) });
  await expectReply(client, 1n);
  assert.ok(readFileSync(path).subarray(4096, 8192).equals(Buffer.alloc(4096, 0x42)));
});
