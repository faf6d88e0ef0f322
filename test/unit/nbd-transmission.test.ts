/**
 * The transmission phase against a raw socket client: every command, every
 * bad-request rule (each followed by a request that must still work), reply
 * ordering, DISC and abrupt closes, back-pressure, device swaps.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { chunkError, negotiate, type RawNbdClient, type Reply } from "./nbd-raw-client.ts";
import { GatedDevice, memoryDevice, MiB, patternAt, startServer } from "./nbd-test-server.ts";
import { NbdExport } from "../../src/nbd/index.ts";
import { createImage, openImage } from "../../src/chain/index.ts";

const READ = 0;
const WRITE = 1;
const DISC = 2;
const FLUSH = 3;
const TRIM = 4;
const CACHE = 5;
const WRITE_ZEROES = 6;
const BLOCK_STATUS = 7;
const FUA = 1;
const NO_HOLE = 2;
const DF = 4;
const REQ_ONE = 8;
const FAST_ZERO = 0x10;
const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const ENOTSUP = 95;
const SIZE = 4 * MiB;

type Chunk = Extract<Reply, { kind: "chunk" }>;

async function setup(t: Parameters<typeof startServer>[0], options: { structured?: boolean; readOnly?: boolean; contexts?: string[] } = {}) {
  const device = memoryDevice(SIZE, { readOnly: options.readOnly });
  const harness = await startServer(t, [{ name: "", device }]);
  const client = await harness.connect();
  const negotiated = await negotiate(client, { structured: options.structured ?? true, contexts: options.contexts });
  return { client, device, harness, negotiated };
}

/** Reassemble a structured READ reply into bytes (holes as zeroes); checks chunk bounds. */
function assembleRead(chunks: Chunk[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length, 0xee);
  for (const chunk of chunks) {
    if (chunk.type === 1) {
      const at = Number(chunk.payload.readBigUInt64BE(0)) - offset;
      assert.ok(at >= 0 && at + chunk.payload.length - 8 <= length, "data chunk inside the request");
      chunk.payload.copy(out, at, 8);
    } else if (chunk.type === 2) {
      const at = Number(chunk.payload.readBigUInt64BE(0)) - offset;
      const size = chunk.payload.readUInt32BE(8);
      assert.ok(size > 0 && at >= 0 && at + size <= length, "hole chunk inside the request");
      out.fill(0, at, at + size);
    } else if (chunk.type !== 0) {
      assert.fail(`unexpected chunk type ${chunk.type}`);
    }
  }
  return out;
}

async function readBytes(client: RawNbdClient, offset: number, length: number, cookie = 100n): Promise<Buffer> {
  client.sendRequest({ type: READ, cookie, offset, length });
  const chunks = await client.readStructured();
  for (const chunk of chunks) assert.equal(chunk.cookie, cookie);
  return assembleRead(chunks, offset, length);
}

async function expectError(client: RawNbdClient, errno: number, structured = true): Promise<string> {
  if (structured) {
    const chunks = await client.readStructured();
    assert.equal(chunks.length, 1);
    const error = chunkError(chunks[0]);
    assert.equal(error.errno, errno, error.message);
    assert.ok(chunks[0].payload.length < 1000, "error payload under qemu's 1000-byte limit");
    return error.message;
  }
  const reply = await client.readReply();
  assert.equal(reply.kind, "simple");
  assert.equal(reply.kind === "simple" && reply.error, errno);
  return "";
}

async function expectOk(client: RawNbdClient, cookie?: bigint): Promise<void> {
  const reply = await client.readReply();
  assert.equal(reply.kind, "simple", "success of a non-read command is a simple reply");
  assert.equal(reply.kind === "simple" && reply.error, 0);
  if (cookie !== undefined) assert.equal(reply.cookie, cookie);
}

/** The connection still serves: a small read returns the right bytes. */
async function assertUsable(client: RawNbdClient): Promise<void> {
  assert.ok((await readBytes(client, 1024, 512, 999n)).equals(patternAt(1024, 512)));
}

test("READ: structured OFFSET_DATA with the right bytes; unaligned; DF; FUA accepted", async (t) => {
  const { client } = await setup(t);
  assert.ok((await readBytes(client, 0, 4096)).equals(patternAt(0, 4096)));
  assert.ok((await readBytes(client, 1, 3)).equals(patternAt(1, 3)));
  client.sendRequest({ type: READ, flags: DF | FUA, cookie: 5n, offset: 0, length: MiB });
  const chunks = await client.readStructured();
  assert.equal(chunks.length, 1, "DF: one data chunk");
  assert.ok(assembleRead(chunks, 0, MiB).equals(patternAt(0, MiB)));
});

test("READ with simple replies: header then exactly the data", async (t) => {
  const { client } = await setup(t, { structured: false });
  client.sendRequest({ type: READ, cookie: 3n, offset: 512, length: 1000 });
  const reply = await client.readReply(1000);
  assert.equal(reply.kind === "simple" && reply.error, 0);
  assert.ok(reply.kind === "simple" && reply.data.equals(patternAt(512, 1000)));
  client.sendRequest({ type: READ, flags: DF, cookie: 4n, offset: 0, length: 512 });
  await expectError(client, EINVAL, false);
  client.sendRequest({ type: READ, cookie: 5n, offset: SIZE, length: 512 });
  await expectError(client, EINVAL, false);
  assert.equal(client.pending, 0, "an error reply to a simple READ carries no data");
});

test("WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE), CACHE: simple success replies and the data lands", async (t) => {
  const { client, device } = await setup(t);
  const data = Buffer.alloc(8192, 0x5a);
  client.sendRequest({ type: WRITE, flags: FUA, cookie: 1n, offset: 4096, payload: data });
  await expectOk(client, 1n);
  assert.ok((await readBytes(client, 4096, 8192)).equals(data));
  client.sendRequest({ type: WRITE_ZEROES, flags: NO_HOLE, cookie: 2n, offset: 4096, length: 4096 });
  await expectOk(client, 2n);
  client.sendRequest({ type: WRITE_ZEROES, cookie: 3n, offset: 8192, length: 100 });
  await expectOk(client, 3n);
  const expected = Buffer.concat([Buffer.alloc(4096 + 100), Buffer.alloc(4096 - 100, 0x5a)]);
  assert.ok((await readBytes(client, 4096, 8192)).equals(expected));
  for (const [type, cookie] of [
    [FLUSH, 4n],
    [TRIM, 5n],
    [CACHE, 6n],
  ] as const) {
    client.sendRequest({ type, cookie, offset: type === FLUSH ? 0 : 0, length: type === FLUSH ? 0 : 65536 });
    await expectOk(client, cookie);
  }
  // The TRIM reached the device: the in-memory file reads a discarded range as zeroes, as a punched hole.
  const onDevice = Buffer.alloc(4096, 0xff);
  await device.read(4096 + 4096 + 4096 - 4096, onDevice);
  assert.ok(onDevice.equals(Buffer.alloc(4096)));
});

test("WRITE_ZEROES with FAST_ZERO on a raw device whose file cannot zero in place (an in-memory file): ENOTSUP (zeroing would write data)", async (t) => {
  const { client } = await setup(t);
  client.sendRequest({ type: WRITE_ZEROES, flags: FAST_ZERO, cookie: 1n, offset: 0, length: 65536 });
  await expectError(client, ENOTSUP);
  assert.ok((await readBytes(client, 0, 512)).equals(patternAt(0, 512)), "nothing was zeroed");
});

test("zero-length requests succeed and keep the connection", async (t) => {
  const { client } = await setup(t);
  client.sendRequest({ type: READ, cookie: 1n, offset: 0, length: 0 });
  const chunks = await client.readStructured();
  assert.deepEqual(
    chunks.map((c) => [c.type, c.flags]),
    [[0, 1]],
  );
  for (const type of [WRITE, TRIM, WRITE_ZEROES, CACHE, FLUSH]) {
    client.sendRequest({ type, cookie: 2n, offset: 0, length: 0 });
    await expectOk(client, 2n);
  }
  client.sendRequest({ type: WRITE, cookie: 3n, offset: SIZE, length: 0 });
  await expectOk(client, 3n);
  await assertUsable(client);
});

test("out of range and 64-bit wrapping: EINVAL for READ/TRIM/CACHE, ENOSPC for WRITE/WRITE_ZEROES (payload consumed)", async (t) => {
  const { client } = await setup(t);
  const cases: Array<[number, bigint, number, number]> = [
    [READ, BigInt(SIZE - 512), 1024, EINVAL],
    [READ, BigInt(SIZE + 4096), 512, EINVAL],
    [READ, 0xfffffffffffffe00n, 1024, EINVAL],
    [TRIM, BigInt(SIZE - 512), 1024, EINVAL],
    [CACHE, 0xfffffffffffffe00n, 1024, EINVAL],
    [WRITE, BigInt(SIZE - 512), 1024, ENOSPC],
    [WRITE, 0xfffffffffffffe00n, 1024, ENOSPC],
    [WRITE_ZEROES, BigInt(SIZE - 512), 1024, ENOSPC],
    [WRITE_ZEROES, 0xffffffffffffffffn, 2, ENOSPC],
  ];
  for (const [type, offset, length, errno] of cases) {
    client.sendRequest({ type, cookie: 7n, offset, length, payload: type === WRITE ? Buffer.alloc(length, 1) : undefined });
    const message = await expectError(client, errno);
    assert.match(message, /past EOF/);
    await assertUsable(client);
  }
});

test("unknown command, unknown flags, flags on the wrong command: EINVAL", async (t) => {
  const { client } = await setup(t);
  for (const request of [
    { type: 0x42, offset: 0, length: 0 },
    { type: READ, flags: 0x8000, offset: 0, length: 512 },
    { type: READ, flags: REQ_ONE, offset: 0, length: 512 },
    { type: FLUSH, flags: NO_HOLE, offset: 0, length: 0 },
    { type: WRITE_ZEROES, flags: DF, offset: 0, length: 512 },
    { type: CACHE, flags: FAST_ZERO, offset: 0, length: 512 },
  ]) {
    client.sendRequest({ ...request, cookie: 8n });
    await expectError(client, EINVAL);
    await assertUsable(client);
  }
});

test("FLUSH with a non-zero offset and length is accepted (as qemu-nbd)", async (t) => {
  const { client } = await setup(t);
  client.sendRequest({ type: FLUSH, cookie: 1n, offset: 512, length: 512 });
  await expectOk(client, 1n);
});

test("read-only export: WRITE, TRIM, WRITE_ZEROES are EPERM and the WRITE payload is consumed", async (t) => {
  const { client } = await setup(t, { readOnly: true });
  client.sendRequest({ type: WRITE, cookie: 1n, offset: 0, payload: Buffer.alloc(70_000, 9) });
  await expectError(client, EPERM);
  for (const type of [TRIM, WRITE_ZEROES]) {
    client.sendRequest({ type, cookie: 2n, offset: 0, length: 4096 });
    await expectError(client, EPERM);
  }
  await assertUsable(client);
});

test("requests over 32 MiB: READ and CACHE EINVAL, WRITE EINVAL with its payload drained, WRITE_ZEROES over the whole disk served", async (t) => {
  const { client } = await setup(t);
  client.sendRequest({ type: READ, cookie: 1n, offset: 0, length: 32 * MiB + 512 });
  await expectError(client, EINVAL);
  // qemu-nbd limits CACHE as READ (a review): refused for its length before its range.
  client.sendRequest({ type: CACHE, cookie: 5n, offset: 0, length: 32 * MiB + 1 });
  assert.match(await expectError(client, EINVAL), /larger than max len/);
  const big = Buffer.alloc(32 * MiB + 4096, 0x77);
  client.sendRequest({ type: WRITE, cookie: 2n, offset: 0, payload: big });
  await expectError(client, EINVAL);
  await assertUsable(client);
  const bigger = Buffer.alloc(64 * MiB + 4096, 0x66);
  client.sendRequest({ type: WRITE, cookie: 3n, offset: BigInt(SIZE), payload: bigger });
  await expectError(client, EINVAL);
  await assertUsable(client);
  client.sendRequest({ type: WRITE_ZEROES, cookie: 4n, offset: 0, length: SIZE });
  await expectOk(client, 4n);
  assert.ok((await readBytes(client, SIZE - 4096, 4096)).equals(Buffer.alloc(4096)));
});

test("bad request magic disconnects", async (t) => {
  const { client } = await setup(t);
  client.sendRequest({ type: READ, magic: 0xdeadbeef, offset: 0, length: 512 });
  assert.equal(await client.waitClosed(), true);
});

test("BLOCK_STATUS without structured replies (simple EINVAL), without a context (chunk EINVAL), length 0, past EOF", async (t) => {
  const simple = await setup(t, { structured: false });
  simple.client.sendRequest({ type: BLOCK_STATUS, cookie: 1n, offset: 0, length: 4096 });
  await expectError(simple.client, EINVAL, false);
  const noContext = await setup(t);
  noContext.client.sendRequest({ type: BLOCK_STATUS, cookie: 1n, offset: 0, length: 4096 });
  assert.match(await expectError(noContext.client, EINVAL), /not negotiated/);
  const withContext = await setup(t, { contexts: ["base:allocation"] });
  withContext.client.sendRequest({ type: BLOCK_STATUS, cookie: 1n, offset: 0, length: 0 });
  await expectError(withContext.client, EINVAL);
  withContext.client.sendRequest({ type: BLOCK_STATUS, cookie: 1n, offset: BigInt(SIZE - 512), length: 1024 });
  await expectError(withContext.client, EINVAL);
  withContext.client.sendRequest({ type: BLOCK_STATUS, flags: REQ_ONE, cookie: 2n, offset: 0, length: SIZE });
  const [chunk] = await withContext.client.readStructured();
  assert.equal(chunk.type, 5);
  assert.deepEqual([chunk.payload.readUInt32BE(0), chunk.payload.readUInt32BE(4), chunk.payload.readUInt32BE(8)], [0, SIZE, 0]);
});

test("BLOCK_STATUS on a qcow2 chain: both contexts, REQ_ONE, holes in sparse reads", async (t) => {
  const harness0 = await startServer(t, []);
  const base = join(harness0.dir, "base.qcow2");
  const top = join(harness0.dir, "top.qcow2");
  await createImage(base, { format: "qcow2", sizeBytes: 8 * MiB });
  await createImage(top, { format: "qcow2", backingFile: base, backingFormat: "qcow2" });
  const baseDevice = await openImage(base);
  await baseDevice.write(0, Buffer.alloc(MiB, 0x11));
  await baseDevice.close();
  const device = await openImage(top);
  t.after(() => device.close());
  await device.write(512 * 1024, Buffer.alloc(MiB, 0x22));
  await device.writeZeroes(4 * MiB, MiB);
  harness0.server.addExport(new NbdExport({ name: "chain", device, allocationDepth: true }));
  const client = await harness0.connect();
  const { contextIds } = await negotiate(client, { name: "chain", contexts: ["base:allocation", "qemu:allocation-depth"] });
  assert.deepEqual([...contextIds], [
    ["base:allocation", 0],
    ["qemu:allocation-depth", 1],
  ]);
  const extents = (chunk: Chunk): number[][] => {
    const out: number[][] = [];
    for (let at = 4; at < chunk.payload.length; at += 8) out.push([chunk.payload.readUInt32BE(at), chunk.payload.readUInt32BE(at + 4)]);
    return out;
  };
  client.sendRequest({ type: BLOCK_STATUS, cookie: 1n, offset: 0, length: 8 * MiB });
  const chunks = await client.readStructured();
  assert.deepEqual(
    chunks.map((c) => [c.payload.readUInt32BE(0), c.flags]),
    [
      [0, 0],
      [1, 1],
    ],
  );
  assert.deepEqual(extents(chunks[0]), [
    [1536 * 1024, 0],
    [8 * MiB - 1536 * 1024, 3],
  ]);
  assert.deepEqual(extents(chunks[1]), [
    [512 * 1024, 2],
    [MiB, 1],
    [4 * MiB - 1536 * 1024, 0],
    [MiB, 1],
    [3 * MiB, 0],
  ]);
  client.sendRequest({ type: BLOCK_STATUS, flags: REQ_ONE, cookie: 2n, offset: 1024, length: 1024 });
  const one = await client.readStructured();
  assert.deepEqual(one.map(extents), [[[1024, 0]], [[1024, 2]]]);
  client.sendRequest({ type: READ, cookie: 3n, offset: 0, length: 8 * MiB });
  const read = await client.readStructured();
  assert.deepEqual(
    read.map((c) => c.type),
    [1, 2],
    "data, then one hole for the rest",
  );
  const bytes = assembleRead(read, 0, 8 * MiB);
  assert.ok(bytes.subarray(0, 512 * 1024).equals(Buffer.alloc(512 * 1024, 0x11)));
  assert.ok(bytes.subarray(512 * 1024, 1536 * 1024).equals(Buffer.alloc(MiB, 0x22)));
  assert.ok(bytes.subarray(1536 * 1024).equals(Buffer.alloc(8 * MiB - 1536 * 1024)));
  client.sendRequest({ type: WRITE_ZEROES, flags: FAST_ZERO, cookie: 4n, offset: 6 * MiB, length: 65536 });
  await expectOk(client, 4n);
  client.sendRequest({ type: WRITE_ZEROES, flags: FAST_ZERO, cookie: 5n, offset: 6 * MiB + 512, length: 512 });
  await expectError(client, ENOTSUP);
});

test("64 pipelined reads get 64 replies; a slow read does not hold back later ones (out-of-order replies)", async (t) => {
  const gated = new GatedDevice(memoryDevice(SIZE));
  const harness = await startServer(t, [{ name: "", device: gated }]);
  const client = await harness.connect();
  await negotiate(client);
  gated.holdOffsets.add(0);
  for (let i = 0; i < 64; i++) client.sendRequest({ type: READ, cookie: BigInt(i), offset: i * 4096, length: 4096 });
  const cookies: bigint[] = [];
  for (let i = 0; i < 63; i++) {
    const [chunk] = await client.readStructured();
    cookies.push(chunk.cookie);
    assert.ok(assembleRead([chunk], Number(chunk.cookie) * 4096, 4096).equals(patternAt(Number(chunk.cookie) * 4096, 4096)));
  }
  assert.ok(!cookies.includes(0n), "the held read has not replied");
  gated.releaseOffset(0);
  const [last] = await client.readStructured();
  assert.equal(last.cookie, 0n);
});

test("DISC with a READ in flight: the reply arrives before the server closes", async (t) => {
  const gated = new GatedDevice(memoryDevice(SIZE));
  const harness = await startServer(t, [{ name: "", device: gated }]);
  const client = await harness.connect();
  await negotiate(client);
  gated.holdOffsets.add(0);
  client.sendRequest({ type: READ, cookie: 1n, offset: 0, length: MiB });
  client.sendRequest({ type: DISC, cookie: 2n });
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.equal(client.closed, false);
  gated.releaseOffset(0);
  const chunks = await client.readStructured();
  assert.equal(chunks[0].cookie, 1n);
  assert.ok(assembleRead(chunks, 0, MiB).equals(patternAt(0, MiB)));
  assert.equal(await client.waitClosed(), true);
});

test("a client that half-closes with reads pipelined (libnbd's shutdown) gets every reply, then the server closes", async (t) => {
  const harness = await startServer(t, [{ name: "", device: memoryDevice(SIZE) }]);
  for (const [count, length] of [
    [3, MiB],
    [40, 64 * 1024],
  ]) {
    const client = await harness.connect();
    await negotiate(client);
    // More than one pump pass of reads (READ_BYTES_PER_PUMP_MAX): before, the EOF read behind them
    // drained the connection and the requests still in the parser got no reply.
    for (let i = 0; i < count; i++) client.sendRequest({ type: READ, cookie: BigInt(i), offset: i * length, length });
    client.socket.end();
    const seen = new Set<bigint>();
    while (seen.size < count) {
      const chunks = await client.readStructured();
      const cookie = chunks[0].cookie;
      assert.ok(assembleRead(chunks, Number(cookie) * length, length).equals(patternAt(Number(cookie) * length, length)), `reply ${cookie}`);
      seen.add(cookie);
    }
    assert.equal(await client.waitClosed(), true);
  }
});

test("a client closing mid-payload or without DISC costs nothing: the server serves the next client", async (t) => {
  const gated = new GatedDevice(memoryDevice(SIZE));
  const harness = await startServer(t, [{ name: "", device: gated }]);
  const quitter = await harness.connect();
  await negotiate(quitter);
  quitter.sendRequest({ type: WRITE, cookie: 1n, offset: 0, length: MiB, payload: Buffer.alloc(1000) });
  gated.holdOffsets.add(8192);
  quitter.sendRequest({ type: READ, cookie: 2n, offset: 8192, length: 4096 });
  quitter.close();
  const second = await harness.connect();
  await negotiate(second);
  gated.releaseOffset(8192);
  await assertUsable(second);
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(harness.server.connectionCount, 1);
});

/**
 * Run `body` with `gated` holding every request, and release it afterwards
 * even when an assertion in `body` fails (held requests would otherwise keep
 * the test's teardown waiting forever).
 */
async function whileHeld(gated: GatedDevice, body: () => Promise<void>): Promise<void> {
  gated.held = true;
  try {
    await body();
  } finally {
    gated.release();
  }
}

/**
 * Wait until `expected` requests reached the device (slow on a loaded
 * machine; at most 30 s), then 200 ms more, in which a request past the
 * limit would start if the server let it: the caller asserts the count.
 */
async function settleAt(gated: GatedDevice, expected: number): Promise<void> {
  for (let waitedMs = 0; gated.started < expected && waitedMs < 30_000; waitedMs += 10) await new Promise((resolve) => setTimeout(resolve, 10));
  await new Promise((resolve) => setTimeout(resolve, 200));
}

test("back-pressure: with requests held, the server stops reading at the in-flight request limit", async (t) => {
  const gated = new GatedDevice(memoryDevice(SIZE));
  const harness = await startServer(t, [{ name: "", device: gated }], { inFlightRequestsMax: 8 });
  const client = await harness.connect();
  await negotiate(client);
  await whileHeld(gated, async () => {
    for (let i = 0; i < 100; i++) client.sendRequest({ type: WRITE, cookie: BigInt(i), offset: i * 4096, payload: Buffer.alloc(4096, i) });
    await settleAt(gated, 8);
    assert.equal(gated.started, 8, "only the first 8 requests reached the device");
  });
  const seen = new Set<bigint>();
  for (let i = 0; i < 100; i++) {
    const reply = await client.readReply();
    assert.equal(reply.kind === "simple" && reply.error, 0);
    seen.add(reply.cookie);
  }
  assert.equal(seen.size, 100);
  assert.ok(gated.runningMax <= 8);
  assert.ok((await readBytes(client, 99 * 4096, 4096)).equals(Buffer.alloc(4096, 99)));
});

test("back-pressure: payload bytes in flight are bounded (1 MiB writes against a 2 MiB budget)", async (t) => {
  const gated = new GatedDevice(memoryDevice(SIZE));
  const harness = await startServer(t, [{ name: "", device: gated }], { inFlightBytesMax: 2 * MiB });
  const client = await harness.connect();
  await negotiate(client);
  await whileHeld(gated, async () => {
    for (let i = 0; i < 4; i++) client.sendRequest({ type: WRITE, cookie: BigInt(i), offset: i * MiB, payload: Buffer.alloc(MiB, i + 1) });
    await settleAt(gated, 2);
    assert.equal(gated.started, 2, "the third 1 MiB write waits in the socket");
  });
  for (let i = 0; i < 4; i++) assert.equal((await client.readReply()).kind, "simple");
  assert.ok((await readBytes(client, 3 * MiB, 4096)).equals(Buffer.alloc(4096, 4)));
});

test("device swap: waits for in-flight requests, flushes the old device, later requests see the new one", async (t) => {
  const gated = new GatedDevice(memoryDevice(SIZE));
  const exp = new NbdExport({ name: "", device: gated });
  const harness = await startServer(t, [exp]);
  const client = await harness.connect();
  await negotiate(client);
  gated.holdOffsets.add(0);
  client.sendRequest({ type: READ, cookie: 1n, offset: 0, length: 4096 });
  await new Promise((resolve) => setTimeout(resolve, 20));
  const replacement = memoryDevice(SIZE);
  await replacement.write(0, Buffer.alloc(4096, 0xcd));
  let swapped = false;
  const swap = exp.swapDevice(replacement).then((old) => {
    swapped = true;
    return old;
  });
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(swapped, false, "the swap waits for the running read");
  gated.releaseOffset(0);
  const first = await client.readStructured();
  assert.ok(assembleRead(first, 0, 4096).equals(patternAt(0, 4096)), "the in-flight read saw the old device");
  assert.equal(await swap, gated);
  assert.ok((await readBytes(client, 0, 4096)).equals(Buffer.alloc(4096, 0xcd)));
  await assert.rejects(exp.swapDevice(memoryDevice(SIZE * 2)), { code: "E_INVALID_OPTION" });
  await assert.rejects(exp.swapDevice(memoryDevice(SIZE, { readOnly: true })), { code: "E_READ_ONLY" });
});

test("several exports and TCP on 127.0.0.1 with an ephemeral port", async (t) => {
  const harness = await startServer(t, [
    { name: "one", device: memoryDevice(MiB) },
    { name: "two", device: memoryDevice(2 * MiB) },
  ]);
  const address = await harness.server.listen({ host: "127.0.0.1", port: 0 });
  assert.ok(typeof address !== "string");
  const { RawNbdClient } = await import("./nbd-raw-client.ts");
  const tcp = await RawNbdClient.connect({ host: "127.0.0.1", port: address.port });
  t.after(() => tcp.close());
  assert.equal((await negotiate(tcp, { name: "two" })).sizeBytes, 2 * MiB);
  const unix = await harness.connect();
  assert.equal((await negotiate(unix, { name: "one" })).sizeBytes, MiB);
});

test("export.run: a request that throws or rejects is counted out of flight, so a later swap does not wait for it", async () => {
  const exp = new NbdExport({ name: "", device: memoryDevice(SIZE) });
  await assert.rejects(
    exp.run(() => {
      throw new Error("thrown before any promise");
    }),
    /thrown before any promise/,
  );
  await assert.rejects(exp.run((device) => device.read(SIZE, Buffer.alloc(512))), { code: "E_OUT_OF_RANGE" });
  assert.equal(await exp.run(async () => 42), 42);
  assert.equal(exp.inFlight, 0);
  const replacement = memoryDevice(SIZE);
  const running = exp.run((device) => device.read(0, Buffer.alloc(512)));
  const swap = exp.swapDevice(replacement);
  const queued = exp.run(async (device) => device);
  await running;
  await swap;
  assert.equal(await queued, replacement, "a request made during the swap runs on the new device");
  assert.equal(exp.inFlight, 0);
});

test("export names and descriptions: at most 4096 bytes (NBD's string limit), as qemu-nbd refuses longer ones", () => {
  const device = memoryDevice(SIZE);
  assert.equal(new NbdExport({ name: "x".repeat(4096), description: "d".repeat(4096), device }).description.length, 4096);
  assert.throws(() => new NbdExport({ name: "x".repeat(4097), device }), { code: "E_INVALID_OPTION", message: /export name must be at most 4096 bytes/ });
  assert.throws(() => new NbdExport({ name: "", description: "d".repeat(4097), device }), { code: "E_INVALID_OPTION", message: /export description must be at most 4096 bytes/ });
  assert.throws(() => new NbdExport({ name: "", description: "a\0b", device }), { code: "E_INVALID_OPTION" });
});
