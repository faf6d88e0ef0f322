/**
 * Unit tests of the job machinery: lifecycle and cancellation, allocation
 * above a depth, the state comparer, chain lookup, spans, state specs,
 * wipe on commit and remove. Images are made by snapstack itself.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { closeSync, existsSync, linkSync, openSync, readFileSync, readSync } from "node:fs";
import { join } from "node:path";
import { scratchDir } from "../helpers/tools.ts";
import { COPY_CHUNK_BYTES, COPY_WRITE_BEHIND_BYTES, copyRanges, type CopyRange } from "../../src/chain/copy-pipeline.ts";
import { RangeCopier } from "../../src/chain/jobs/copy-ranges.ts";
import { createQcow2 } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2 } from "../../src/formats/qcow2/qcow2-image.ts";
import type { ImageFile } from "../../src/io/file.ts";
import { FaultFile } from "../../src/io/fault-file.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { openRawImage } from "../../src/formats/raw/raw-image.ts";
import type { BlockDevice } from "../../src/device/block-device.ts";
import { createImage } from "../../src/chain/create-image.ts";
import { chainLayers, openImage } from "../../src/chain/open-image.ts";
import { SnapstackError, isSnapstackError, withSecondFailure } from "../../src/base/errors.ts";
import {
  Job,
  StateComparer,
  clusterSpans,
  commitImage,
  diffStates,
  findInChain,
  parseStateSpec,
  removeImage,
  resolveAbove,
  runJob,
  type DiffRange,
  type JobProgress,
} from "../../src/chain/jobs/index.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

async function write(path: string, offset: number, length: number, pattern: number): Promise<void> {
  const device = await openImage(path);
  try {
    await device.write(offset, new Uint8Array(length).fill(pattern));
  } finally {
    await device.close();
  }
}

/** base (2 MiB) <- mid <- top (4 MiB: longer than base). */
async function chain(dir: string): Promise<{ base: string; mid: string; top: string }> {
  const base = join(dir, "base.qcow2");
  const mid = join(dir, "mid.qcow2");
  const top = join(dir, "top.qcow2");
  await createImage(base, { format: "qcow2", sizeBytes: 2 * MiB });
  await createImage(mid, { format: "qcow2", backingFile: "base.qcow2", backingFormat: "qcow2", sizeBytes: 4 * MiB });
  await createImage(top, { format: "qcow2", backingFile: "mid.qcow2", backingFormat: "qcow2" });
  await write(base, 0, 128 * KiB, 1);
  await write(mid, 64 * KiB, 64 * KiB, 2);
  await write(top, 256 * KiB, 64 * KiB, 3);
  return { base, mid, top };
}

test("job lifecycle: run, prepare, clean; failures abort without prepare; progress never goes back", async () => {
  const calls: string[] = [];
  const progress: JobProgress[] = [];
  const result = await runJob("t", { onProgress: (p) => progress.push(p) }, {
    async run(job) {
      calls.push("run");
      job.setTotal(100, "copy");
      job.advance(60);
      job.setTotal(10, "flush");
      job.advance(5);
      return 7;
    },
    async prepare() {
      calls.push("prepare");
    },
    async clean() {
      calls.push("clean");
    },
  });
  assert.equal(result, 7);
  assert.deepEqual(calls, ["run", "prepare", "clean"]);
  const fractions = progress.map((p) => p.fraction);
  assert.deepEqual(fractions, [...fractions].sort((a, b) => a - b));
  assert.equal(fractions[fractions.length - 1], 1);

  calls.length = 0;
  const failing = new Job("f");
  await assert.rejects(
    failing.execute({
      async run() {
        calls.push("run");
        throw new SnapstackError("E_IO", "boom");
      },
      async prepare() {
        calls.push("prepare");
      },
      async abort(_job, error) {
        calls.push(`abort ${(error as SnapstackError).code}`);
      },
      async clean() {
        calls.push("clean");
      },
    }),
    /boom/,
  );
  assert.deepEqual(calls, ["run", "abort E_IO", "clean"]);
  assert.equal(failing.state, "failed");
  await assert.rejects(failing.execute({ run: async () => 1 }), (error) => isSnapstackError(error) && error.code === "E_INTERNAL");

  const controller = new AbortController();
  controller.abort();
  const cancelled = new Job("c", { signal: controller.signal });
  await assert.rejects(cancelled.execute({ run: async () => 1 }), (error) => isSnapstackError(error) && error.code === "E_ABORTED");
  assert.equal(cancelled.state, "cancelled");
});

test("resolveAbove reports the depth holding each range and stops at stopDepth; past a short backing is zero", async (t) => {
  const dir = scratchDir(t);
  const { top } = await chain(dir);
  const device = await openImage(top, { readOnly: true });
  try {
    const layers = chainLayers(device);
    const extents = await resolveAbove(layers, 2, 0, 4 * MiB);
    const summary = extents.map((e) => `${e.start / KiB}+${e.length / KiB}:${e.kind}@${e.depth}`);
    assert.deepEqual(summary, ["0+64:below@2", "64+64:data@1", "128+128:below@2", "256+64:data@0", "320+3776:below@2"]);
    const all = await resolveAbove(layers, 3, 0, 4 * MiB);
    assert.deepEqual(
      all.map((e) => `${e.start / KiB}+${e.length / KiB}:${e.kind}@${e.depth}`),
      ["0+64:data@2", "64+64:data@1", "128+128:below@3", "256+64:data@0", "320+1728:below@3", "2048+2048:zero@2"],
    );
  } finally {
    await device.close();
  }
});

test("findInChain: names relative to each overlay, then to the current directory; E_NOT_IN_CHAIN otherwise", async (t) => {
  const dir = scratchDir(t);
  const { top, base } = await chain(dir);
  const device = await openImage(top, { readOnly: true });
  try {
    const layers = chainLayers(device);
    assert.equal(findInChain(layers, "base.qcow2", top), 2);
    assert.equal(findInChain(layers, "mid.qcow2", top), 1);
    assert.equal(findInChain(layers, base, top), 2);
    assert.throws(() => findInChain(layers, "top.qcow2", top), (error) => isSnapstackError(error) && error.code === "E_NOT_IN_CHAIN" && error.message === `Did not find 'top.qcow2' in the backing chain of '${top}'`);
  } finally {
    await device.close();
  }
});

test("state comparer: metadata-equal ranges are not read; granules and merging; null reads as zeroes", async (t) => {
  const dir = scratchDir(t);
  const { base, top } = await chain(dir);
  await write(top, 1 * MiB + 100, 10, 9); // 10 bytes in one 512-byte granule
  const a = await openImage(base, { readOnly: true });
  const b = await openImage(top, { readOnly: true });
  try {
    const ranges: DiffRange[] = [];
    const stats = await diffStates(a, b, (range) => void ranges.push(range));
    assert.deepEqual(
      ranges.map((r) => [r.start, r.length, r.depth]),
      [
        [64 * KiB, 64 * KiB, 1],
        [256 * KiB, 64 * KiB, 0],
        [MiB, 512, 0],
      ],
    );
    // Read: mid's cluster, top's two clusters; past base's end both sides are zero.
    assert.equal(stats.comparedBytes, 3 * 64 * KiB);
    assert.equal(stats.metadataEqualBytes, 4 * MiB - 3 * 64 * KiB);
    const vsNothing: DiffRange[] = [];
    await diffStates(null, b, (range) => void vsNothing.push(range), { granularityBytes: 64 * KiB });
    // Adjacent differing ranges stay apart when TO's map fields differ (depth 2, then depth 1).
    assert.deepEqual(vsNothing.map((r) => [r.start, r.length, r.depth]), [
      [0, 64 * KiB, 2],
      [64 * KiB, 64 * KiB, 1],
      [256 * KiB, 64 * KiB, 0],
      [MiB, 64 * KiB, 0],
    ]);
    const comparer = new StateComparer(a, a);
    await comparer.compare(0, MiB, () => assert.fail("no difference"));
    await assert.rejects(comparer.compare(0, 10, () => {}), (error) => isSnapstackError(error) && error.code === "E_INTERNAL");
  } finally {
    await a.close();
    await b.close();
  }
});

test("clusterSpans rounds ranges out to clusters, merges touching spans and clips", () => {
  assert.deepEqual(
    clusterSpans(
      [
        { start: 100, length: 10 },
        { start: 4000, length: 200 },
        { start: 9000, length: 5000 },
      ],
      4096,
      12000,
    ),
    [{ start: 0, length: 12000 }],
  );
});

test("clusterSpans keeps separate clusters apart", () => {
  assert.deepEqual(clusterSpans([{ start: 10, length: 1 }, { start: 10000, length: 1 }], 4096, 1 << 20), [
    { start: 0, length: 4096 },
    { start: 8192, length: 4096 },
  ]);
});

test("state specs: FILE@SNAPSHOT unless the whole text names a file", (t) => {
  const dir = scratchDir(t);
  assert.deepEqual(parseStateSpec("a.qcow2@snap1"), { path: "a.qcow2", snapshot: "snap1" });
  assert.deepEqual(parseStateSpec("x@y@2"), { path: "x@y", snapshot: "2" });
  assert.deepEqual(parseStateSpec("plain.qcow2"), { path: "plain.qcow2", snapshot: null });
  assert.deepEqual(parseStateSpec("trailing@"), { path: "trailing@", snapshot: null });
  const odd = join(dir, "odd@name");
  linkSync(process.execPath, odd);
  assert.deepEqual(parseStateSpec(odd), { path: odd, snapshot: null });
});

function contains(bytes: Uint8Array, needle: Uint8Array): boolean {
  return Buffer.from(bytes).indexOf(Buffer.from(needle)) >= 0;
}

test("wipe: commit --wipe leaves no trace of the committed data in the overlay; remove --wipe zeroes before unlinking", async (t) => {
  const dir = scratchDir(t);
  const base = join(dir, "base.qcow2");
  const top = join(dir, "top.qcow2");
  await createImage(base, { format: "qcow2", sizeBytes: 4 * MiB });
  await createImage(top, { format: "qcow2", backingFile: "base.qcow2", backingFormat: "qcow2" });
  const marker = new TextEncoder().encode("snapstack-wipe-marker-4c1d");
  const payload = new Uint8Array(3 * 64 * KiB);
  for (let at = 0; at + marker.length <= payload.length; at += 4096) payload.set(marker, at);
  const device = await openImage(top);
  await device.write(3 * MiB, payload);
  await device.close();
  assert.ok(contains(readFileSync(top), marker));
  await commitImage(top, { wipe: true });
  assert.ok(!contains(readFileSync(top), marker), "overlay still holds the committed data");
  assert.ok(contains(readFileSync(base), marker), "the data is in the base now");
  // An overlay that zeroes the data: the commit frees the base's clusters (as QEMU's), and --wipe zeroes them.
  const zeroing = join(dir, "zeroing.qcow2");
  await createImage(zeroing, { format: "qcow2", backingFile: "base.qcow2", backingFormat: "qcow2" });
  const zeroer = await openImage(zeroing);
  await zeroer.writeZeroes(3 * MiB, payload.length);
  await zeroer.close();
  await commitImage(zeroing, { wipe: true });
  assert.ok(!contains(readFileSync(base), marker), "the base still holds the data its overlay zeroed");
  const baseImage = await openImage(base, { readOnly: true });
  const zeroed = new Uint8Array(payload.length);
  await baseImage.read(3 * MiB, zeroed);
  assert.ok(zeroed.every((byte) => byte === 0));
  assert.ok(
    (await baseImage.layerStatus(3 * MiB, payload.length)).every((extent) => extent.kind === "zero" && extent.hostOffset === undefined),
    "zeroed clusters are released, not kept allocated",
  );
  await baseImage.close();
  // remove --wipe: a descriptor opened before shows what the blocks held when the name was unlinked.
  const victim = join(dir, "victim.raw");
  await createImage(victim, { format: "raw", sizeBytes: MiB });
  const raw = await openImage(victim, { format: "raw" });
  await raw.write(4096, payload.subarray(0, 64 * KiB));
  await raw.close();
  const witness = openSync(victim, "r");
  try {
    const result = await removeImage(victim, { wipe: true });
    assert.ok(result.wipedBytes >= 64 * KiB);
    assert.ok(!existsSync(victim));
    const blocks = Buffer.alloc(MiB);
    readSync(witness, blocks, 0, MiB, 0);
    assert.ok(!contains(blocks, marker));
  } finally {
    closeSync(witness);
  }
});

test("copyRanges with a caller's freeBuffers reuses the same chunk buffers from one call to the next, and copies right", async () => {
  const sizeBytes = 8 * MiB;
  const contents = new Uint8Array(sizeBytes);
  for (let i = 0; i < sizeBytes; i += 4096) contents[i] = (i / 4096) % 251 || 1;
  const source = await openRawImage(new MemoryFile({ name: "source.raw", contents }));
  const target = await openRawImage(new MemoryFile({ name: "target.raw", contents: new Uint8Array(sizeBytes) }));
  const freeBuffers: Uint8Array[] = [];
  const options = { zeroMode: { kind: "zeroes" as const }, readsInFlight: 1, queuedBytesMax: COPY_CHUNK_BYTES, freeBuffers };
  await copyRanges(source, target, [{ start: 0, length: 3 * MiB, kind: "data" }], options);
  assert.ok(freeBuffers.length > 0 && freeBuffers.every((buffer) => buffer.length === COPY_CHUNK_BYTES), "the buffers come back");
  const first = new Set(freeBuffers.map((buffer) => buffer.buffer));
  await copyRanges(source, target, [{ start: 4 * MiB, length: 4 * MiB, kind: "data" }], options);
  assert.ok(freeBuffers.length > 0);
  for (const buffer of freeBuffers) assert.ok(first.has(buffer.buffer), "no new buffer was allocated for the second range");
  const copied = new Uint8Array(sizeBytes);
  await target.read(0, copied);
  const expected = contents.slice();
  expected.fill(0, 3 * MiB, 4 * MiB);
  assert.ok(Buffer.from(copied).equals(expected), "the target holds both ranges and nothing between them");
  await source.close();
  await target.close();
});

/** `target` with some of its methods replaced (the others bound to it): a device or file that misbehaves on cue. */
function withMethods<T extends object>(target: T, methods: Record<string, unknown>): T {
  return new Proxy(target, {
    get(inner, property) {
      if (typeof property === "string" && property in methods) return methods[property];
      const value = Reflect.get(inner, property, inner) as unknown;
      return typeof value === "function" ? (value as (...args: unknown[]) => unknown).bind(inner) : value;
    },
  });
}

test("copyRanges reports a write that failed for its own reason together with the error that stopped its loop (neither is dropped)", async () => {
  const source = await openRawImage(new MemoryFile({ name: "source.raw", contents: new Uint8Array(8 * MiB).fill(7) }));
  const raw = await openRawImage(new MemoryFile({ name: "target.raw", contents: new Uint8Array(8 * MiB) }));
  // The first write fails a macrotask later, so the loop has gone on to its next chunk, whose checkpoint cancels.
  const target = withMethods(raw, {
    write: async (): Promise<void> => {
      await new Promise((resolve) => setImmediate(resolve));
      throw new SnapstackError("E_IO", "target.raw: write failed: the disk went away");
    },
  });
  let checkpoints = 0;
  const checkpoint = (): void => {
    if (++checkpoints === 2) throw new SnapstackError("E_ABORTED", "copy cancelled");
  };
  await assert.rejects(
    copyRanges(source, target, [{ start: 0, length: 8 * MiB, kind: "data" }], { zeroMode: { kind: "zeroes" }, readsInFlight: 1, checkpoint }),
    (error: unknown) => {
      assert.ok(isSnapstackError(error));
      assert.equal(error.code, "E_ABORTED", "the loop's error leads");
      assert.match(error.message, /^copy cancelled; also failed: E_IO: target\.raw: write failed: the disk went away$/);
      assert.deepEqual(error.details.alsoFailed, { code: "E_IO", message: "target.raw: write failed: the disk went away" });
      return true;
    },
  );
  await source.close();
  await raw.close();
});

/** A raw image on a MemoryFile whose writeBehind calls are recorded with the number of writes completed before each. */
async function rawRecordingWriteBehind(sizeBytes: number): Promise<{ device: BlockDevice; raw: BlockDevice; writesAtWriteBehind: number[] }> {
  const raw = await openRawImage(new MemoryFile({ name: "target.raw", contents: new Uint8Array(sizeBytes) }));
  const writesAtWriteBehind: number[] = [];
  let writes = 0;
  const device = withMethods(raw, {
    writeBehind: (): boolean => {
      writesAtWriteBehind.push(writes);
      return true;
    },
    write: async (guestOffset: number, data: Uint8Array): Promise<void> => {
      await raw.write(guestOffset, data);
      writes++;
    },
  });
  return { device, raw, writesAtWriteBehind };
}

test("copyRanges asks the target to write behind every writeBehindBytes of data, counting across the calls that share a counter", async () => {
  const sizeBytes = 16 * MiB;
  const source = await openRawImage(new MemoryFile({ name: "source.raw", contents: new Uint8Array(sizeBytes).fill(9) }));
  const zeroMode = { kind: "zeroes" as const };
  // One call of 16 MiB in 2 MiB writes, every 4 MiB: after writes 2, 4, 6 and 8.
  const one = await rawRecordingWriteBehind(sizeBytes);
  await copyRanges(source, one.device, [{ start: 0, length: sizeBytes, kind: "data" }], { zeroMode, writeBehindBytes: 4 * MiB });
  assert.deepEqual(one.writesAtWriteBehind, [2, 4, 6, 8]);
  const copied = new Uint8Array(sizeBytes);
  await one.raw.read(0, copied);
  assert.ok(copied.every((byte) => byte === 9));
  // Eight calls of 2 MiB: with a shared counter they add up to the same four; each with its own, to none.
  const shared = await rawRecordingWriteBehind(sizeBytes);
  const apart = await rawRecordingWriteBehind(sizeBytes);
  const writeBehindCounter = { writtenBytes: 0 };
  for (let at = 0; at < sizeBytes; at += 2 * MiB) {
    await copyRanges(source, shared.device, [{ start: at, length: 2 * MiB, kind: "data" }], { zeroMode, writeBehindBytes: 4 * MiB, writeBehindCounter });
    await copyRanges(source, apart.device, [{ start: at, length: 2 * MiB, kind: "data" }], { zeroMode, writeBehindBytes: 4 * MiB });
  }
  assert.deepEqual(shared.writesAtWriteBehind, [2, 4, 6, 8]);
  assert.deepEqual(apart.writesAtWriteBehind, []);
  // The jobs' RangeCopier keeps one counter: 40 extents of 1 MiB reach COPY_WRITE_BEHIND_BYTES (32 MiB) once.
  const big = await openRawImage(new MemoryFile({ name: "big-source.raw", contents: new Uint8Array(40 * MiB).fill(4) }));
  const jobTarget = await rawRecordingWriteBehind(40 * MiB);
  const copier = new RangeCopier(big, jobTarget.device);
  for (let at = 0; at < 40 * MiB; at += MiB) await copier.copyData(at, MiB);
  assert.equal(jobTarget.writesAtWriteBehind.length, Math.floor((40 * MiB) / COPY_WRITE_BEHIND_BYTES));
  for (const device of [source, big, one.raw, shared.raw, apart.raw, jobTarget.raw]) await device.close();
});

/** A MemoryFile whose flushes, once `arm()` was called, wait until `release()`; counts the flushes since arm(). */
function gatedFlushFile(contents: Uint8Array): { file: ImageFile; arm: () => void; flushes: () => number; release: () => void } {
  const memory = new MemoryFile({ name: "gated", contents });
  let armed = false;
  let flushes = 0;
  let open: () => void = () => {};
  const gate = new Promise<void>((resolve) => (open = resolve));
  const file = withMethods(memory, {
    flush: async (): Promise<void> => {
      if (armed) {
        flushes++;
        await gate;
      }
      await memory.flush();
    },
  });
  return { file, arm: () => (armed = true), flushes: () => flushes, release: () => open() };
}

async function turns(count: number): Promise<void> {
  for (let i = 0; i < count; i++) await new Promise((resolve) => setImmediate(resolve));
}

test("writeBehind on raw and qcow2 images: returns at once, one at a time; flush and close wait for it", async () => {
  const qcow2Bytes = new MemoryFile({ name: "q.qcow2" });
  await createQcow2(qcow2Bytes, { sizeBytes: 4 * MiB });
  const cases: [string, (file: ImageFile) => Promise<BlockDevice>][] = [
    ["raw", (file) => openRawImage(file)],
    ["qcow2", (file) => openQcow2(file, { readOnly: false, backing: null })],
  ];
  for (const [format, open] of cases) {
    for (const ending of ["flush", "close"] as const) {
      const gated = gatedFlushFile(format === "raw" ? new Uint8Array(4 * MiB) : qcow2Bytes.contents());
      const device = await open(gated.file);
      await device.write(0, new Uint8Array(64 * KiB).fill(1));
      gated.arm();
      device.writeBehind?.();
      device.writeBehind?.();
      assert.equal(gated.flushes(), 1, `${format}: one write-behind at a time`);
      let ended = false;
      const ending$ = (ending === "flush" ? device.flush() : device.close()).then(() => (ended = true));
      await turns(20);
      assert.equal(ended, false, `${format}: ${ending} waits for the running write-behind`);
      gated.release();
      await ending$;
      if (ending === "flush") {
        assert.ok(gated.flushes() >= 2, `${format}: flush then flushed itself`);
        await device.close();
      }
    }
  }
});

test("a failed write-behind fails every later flush and the close (Linux reports a failed writeback once), raw and qcow2", async () => {
  const qcow2Bytes = new MemoryFile({ name: "q.qcow2" });
  await createQcow2(qcow2Bytes, { sizeBytes: 4 * MiB });
  const cases: [string, Uint8Array, (file: ImageFile) => Promise<BlockDevice>][] = [
    ["raw", new Uint8Array(4 * MiB), (file) => openRawImage(file)],
    ["qcow2", qcow2Bytes.contents(), (file) => openQcow2(file, { readOnly: false, backing: null })],
  ];
  for (const [format, contents, open] of cases) {
    // The flush that fails is the write-behind's: count the engine's own flushes before it on a dry run.
    const openAndWrite = async (file: FaultFile): Promise<BlockDevice> => {
      const device = await open(file);
      await device.write(0, new Uint8Array(64 * KiB).fill(1));
      return device;
    };
    const dry = await FaultFile.fromBytes(contents, { name: `${format}.img` });
    const dryDevice = await openAndWrite(dry);
    const engineFlushes = dry.flushCount;
    await dryDevice.close();
    const file = await FaultFile.fromBytes(contents, { name: `${format}.img`, faults: [{ op: "flush", index: engineFlushes + 1, code: "E_IO" }] });
    const device = await openAndWrite(file);
    assert.equal(file.flushCount, engineFlushes);
    device.writeBehind?.();
    const failed = (error: unknown): boolean => isSnapstackError(error) && error.code === "E_IO" && /input\/output error \(injected\)/.test(error.message);
    await assert.rejects(device.flush(), failed, `${format}: the flush after it`);
    await assert.rejects(device.flush(), failed, `${format}: and the one after that`);
    await assert.rejects(device.close(), failed, `${format}: and the close`);
    assert.equal(file.faultsInjected, 1);
  }
});

test("withSecondFailure: the same error, none, a non-SnapstackError first, and a second that already reports the first are left alone", () => {
  const first = new SnapstackError("E_IO", "read failed", { path: "a" });
  assert.equal(withSecondFailure(first, undefined), first);
  assert.equal(withSecondFailure(first, first), first);
  const bug = new TypeError("x is undefined");
  assert.equal(withSecondFailure(bug, first), bug);
  const both = withSecondFailure(first, new Error("socket closed"));
  assert.ok(isSnapstackError(both));
  assert.equal(both.message, "read failed; also failed: socket closed");
  assert.equal(both.details.path, "a");
  assert.equal(withSecondFailure(first, both), both, "a second that already names the first is not nested again");
});

test("copyRanges stops pulling ranges soon after a write fails, zero ranges included, and reports that write's error", async () => {
  const source = await openRawImage(new MemoryFile({ name: "source.raw", contents: new Uint8Array(4 * MiB).fill(7) }));
  const failing = await FaultFile.fromBytes(new Uint8Array(128 * MiB), { name: "target.raw", faults: [{ op: "write", index: 1, code: "E_IO" }] });
  const target = await openRawImage(failing);
  let pulled = 0;
  let failures = 0;
  function* ranges(): Generator<CopyRange> {
    yield { start: 0, length: 2 * MiB, kind: "data" };
    for (let i = 0; i < 100; i++) {
      pulled++;
      yield { start: (4 + i) * MiB, length: 64 * KiB, kind: "zero" };
    }
  }
  await assert.rejects(
    copyRanges(source, target, ranges(), { zeroMode: { kind: "zeroes" }, onWriteFailure: () => failures++ }),
    (error: unknown) => isSnapstackError(error) && error.code === "E_IO",
  );
  assert.equal(failures, 1, "onWriteFailure is called once");
  assert.ok(pulled < 100, `stopped after ${pulled} of 100 zero ranges`);
  await source.close();
  await target.close();
});
