/**
 * Bounds a hostile or stalled client cannot get past (an independent review
 * of the server found each of them missing):
 * - BLOCK_STATUS walks in windows of at most extentsMax sectors, stops as
 *   soon as its extent lists are full, and lets the event loop turn between
 *   windows; each BLOCK_STATUS counts against the connection's in-flight
 *   byte budget for the extent lists it may build;
 * - a draining connection whose client stopped reading is cut off after
 *   drainTimeoutMs, so server.close() ends;
 * - replies queued for a client that does not read count by the memory
 *   they pin (a small reply's 64 KiB batch buffer), so such a client stops
 *   the server reading after the in-flight budget, not after 16 GiB;
 * - settleAll (device reads into one buffer) rejects only once every
 *   promise settled.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import type { BlockDevice, LayerExtent } from "../../src/device/block-device.ts";
import { settleAll } from "../../src/base/errors.ts";
import { queryBlockStatus } from "../../src/nbd/block-status.ts";
import { negotiate } from "./nbd-raw-client.ts";
import { GatedDevice, memoryDevice, MiB, startServer } from "./nbd-test-server.ts";

const SECTOR = 512;

/**
 * A qcow2-like device for status queries only: `status` answers its
 * layerStatus; every lookup's length is recorded.
 */
class StatusDevice {
  readonly name = "status";
  readonly format = "qcow2";
  readonly readOnly = true;
  readonly backing = null;
  readonly lookups: number[] = [];
  readonly sizeBytes: number;
  readonly #status: (guestOffset: number, lengthBytes: number) => Promise<LayerExtent[]>;

  constructor(sizeBytes: number, status: (guestOffset: number, lengthBytes: number) => Promise<LayerExtent[]>) {
    this.sizeBytes = sizeBytes;
    this.#status = status;
  }

  layerStatus(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]> {
    this.lookups.push(lengthBytes);
    return this.#status(guestOffset, lengthBytes);
  }

  async read(_guestOffset: number, buffer: Uint8Array): Promise<void> {
    buffer.fill(0);
  }

  async flush(): Promise<void> {}
  async close(): Promise<void> {}

  asDevice(): BlockDevice {
    return this as unknown as BlockDevice;
  }
}

/** Every other 512-byte sector allocated: the worst case for extent counts. */
async function checkerboard(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]> {
  const extents: LayerExtent[] = [];
  for (let at = guestOffset; at < guestOffset + lengthBytes; at += SECTOR) {
    const kind = (at / SECTOR) % 2 === 0 ? "data" : "unallocated";
    extents.push({ guestOffset: at, lengthBytes: Math.min(SECTOR, guestOffset + lengthBytes - at), kind, hostOffset: kind === "data" ? at : undefined });
  }
  return extents;
}

/** One allocated run. */
async function allData(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]> {
  return [{ guestOffset, lengthBytes, kind: "data", hostOffset: guestOffset }];
}

test("BLOCK_STATUS walk: windows of at most extentsMax sectors, no lookup once the lists are full, the event loop turns between windows", async () => {
  const device = new StatusDevice(1 << 30, checkerboard);
  let immediates = 0;
  const tick = (): void => {
    immediates++;
    if (immediates < 1000) setImmediate(tick);
  };
  setImmediate(tick);
  const answer = await queryBlockStatus(device.asDevice(), 0, 1 << 30, { baseAllocation: true, allocationDepth: true, reqOne: false, extentsMax: 64 });
  assert.equal(answer.baseAllocation!.count, 64);
  assert.equal(answer.allocationDepth!.count, 64);
  assert.ok(device.lookups.length > 0);
  assert.ok(Math.max(...device.lookups) <= 64 * SECTOR, `a lookup of ${Math.max(...device.lookups)} bytes`);
  const lookedUp = device.lookups.reduce((sum, length) => sum + length, 0);
  assert.ok(lookedUp <= 2 * 64 * SECTOR, `looked up ${lookedUp} bytes for 64 extents of 512`);
  // A long walk over uniform data needs many windows; other work runs between them.
  const uniform = new StatusDevice(64 * MiB, allData);
  const before = immediates;
  await queryBlockStatus(uniform.asDevice(), 0, 64 * MiB, { baseAllocation: true, allocationDepth: false, reqOne: false, extentsMax: 16 });
  assert.ok(immediates > before, "the event loop turned while the walk ran");
});

test("BLOCK_STATUS requests count against the in-flight byte budget: a burst of them does not all start at once", async (t) => {
  let running = 0;
  let runningMax = 0;
  let started = 0;
  const waiters: Array<() => void> = [];
  let held = true;
  const device = new StatusDevice(64 * MiB, async (guestOffset, lengthBytes) => {
    started++;
    running++;
    runningMax = Math.max(runningMax, running);
    if (held) await new Promise<void>((resolve) => waiters.push(resolve));
    running--;
    return allData(guestOffset, lengthBytes);
  });
  const release = (): void => {
    held = false;
    for (const resolve of waiters.splice(0)) resolve();
  };
  t.after(release); // before the server's own close, which waits for running requests
  const harness = await startServer(t, [{ name: "", device: device.asDevice(), allocationDepth: true }]);
  const client = await harness.connect();
  await negotiate(client, { contexts: ["base:allocation", "qemu:allocation-depth"] });
  for (let i = 0; i < 64; i++) client.sendRequest({ type: 7, cookie: BigInt(i + 1), offset: 0, length: 64 * MiB });
  // Let the server start what it may (an upper bound: a slow machine can only make this pass late, not fail).
  for (let waitedMs = 0; started === 0 && waitedMs < 30_000; waitedMs += 10) await new Promise((resolve) => setTimeout(resolve, 10));
  await new Promise((resolve) => setTimeout(resolve, 300));
  // 2 contexts x 65,536 extents x 16 bytes = 2 MiB each against a 4 MiB budget.
  assert.ok(started <= 3, `${started} BLOCK_STATUS requests started at once`);
  release();
  const cookies = new Set<bigint>();
  while (cookies.size < 64) {
    const reply = await client.readReply();
    assert.equal(reply.kind, "chunk");
    if (reply.kind === "chunk" && reply.flags & 1) cookies.add(reply.cookie);
    for (const resolve of waiters.splice(0)) resolve();
  }
  assert.ok(runningMax <= 3);
});

test("server.close() ends even when a client stops reading its replies: the drain times out and the socket is cut", async (t) => {
  const harness = await startServer(t, [{ name: "", device: memoryDevice(64 * MiB) }], { drainTimeoutMs: 300 });
  const client = await harness.connect();
  await negotiate(client);
  client.socket.pause(); // reads nothing from here on
  for (let i = 0; i < 200; i++) client.sendRequest({ type: 0, cookie: BigInt(i + 1), offset: (i % 64) * MiB, length: MiB });
  await new Promise((resolve) => setTimeout(resolve, 200));
  const closed = harness.server.close().then(() => "closed" as const);
  const verdict = await Promise.race([closed, new Promise<"hung">((resolve) => setTimeout(() => resolve("hung"), 15_000).unref())]);
  assert.equal(verdict, "closed", "server.close() still waits for a client that does not read");
  assert.equal(harness.server.connectionCount, 0);
});

test("settleAll rejects with the first failure only once every promise settled", async () => {
  let finishSlow!: () => void;
  let slowDone = false;
  const slow = new Promise<void>((resolve) => (finishSlow = resolve)).then(() => {
    slowDone = true;
  });
  const failing = Promise.reject(new Error("first"));
  const settled = settleAll([failing, slow]);
  let rejectedWhileSlowRan = false;
  settled.catch(() => {
    rejectedWhileSlowRan = !slowDone;
  });
  await new Promise((resolve) => setImmediate(resolve));
  finishSlow();
  await assert.rejects(settled, /first/);
  assert.equal(rejectedWhileSlowRan, false, "settleAll rejected while another promise still ran");
});

/** Each read completes in a later turn of the event loop, so each reply leaves in a batch of its own. */
class OneReplyPerTurnDevice extends GatedDevice {
  override async read(guestOffset: number, buffer: Uint8Array): Promise<void> {
    await new Promise((resolve) => setImmediate(resolve));
    return super.read(guestOffset, buffer);
  }
}

test("a client that never reads its replies gets the server to stop reading within the in-flight budget: queued replies count by the buffers they pin", async (t) => {
  const device = new OneReplyPerTurnDevice(memoryDevice(64 * MiB));
  const harness = await startServer(t, [{ name: "", device }]);
  const client = await harness.connect();
  await negotiate(client);
  client.socket.pause(); // reads nothing from here on
  const before = process.memoryUsage().arrayBuffers;
  const requests = 8000;
  for (let i = 0; i < requests; i++) client.sendRequest({ type: 0, cookie: BigInt(i + 1), offset: i * 512, length: 1 });
  // Wait until the server stops taking requests (a slow machine can only make it take fewer).
  let seen = -1;
  for (let waitedMs = 0; device.started !== seen && waitedMs < 30_000; waitedMs += 300) {
    seen = device.started;
    await new Promise((resolve) => setTimeout(resolve, 300));
  }
  // Each 17-byte reply pins a 64 KiB batch until the socket takes it: the 4 MiB budget holds ~63 of
  // them (the kernel's socket buffer takes more, and frees theirs). Counted by their 17 bytes, the
  // server took every request the kernel buffer could not hold and pinned 64 KiB for each (~300 MiB).
  const pinnedBytes = process.memoryUsage().arrayBuffers - before;
  assert.ok(pinnedBytes < 32 * MiB, `${(pinnedBytes / MiB).toFixed(0)} MiB of buffers held for ${device.started} of ${requests} requests`);
  assert.ok(device.started < requests, "the server stopped reading");
  client.socket.resume();
  for (let i = 0; i < requests; i++) {
    const reply = await client.readReply();
    assert.ok(reply.kind === "chunk" && (reply.flags & 1) === 1, "one final data chunk per 1-byte read");
  }
  assert.equal(device.started, requests, "every request was served once the client read again");
});
