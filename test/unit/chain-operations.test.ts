import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { readFileSync } from "node:fs";
import type { BlockDevice, LayerExtent, LayerStatusKind } from "../../src/device/block-device.ts";
import { mapImage, formatMapJson, walkChain } from "../../src/chain/map-image.ts";
import { compareImages, findFirstDifferentSector, findNonZeroSector } from "../../src/chain/compare-images.ts";
import { convertImage, findZeroRuns, sparseZeroRuns } from "../../src/chain/convert-image.ts";
import { resolveBackingPath, hasProtocolPrefix } from "../../src/chain/backing-path.ts";
import { ChainStatusCursor } from "../../src/chain/chain-status.ts";
import { scratchDir } from "../helpers/tools.ts";
import { createRandom, testSeed } from "../helpers/random.ts";

const SECTOR = 512;

/**
 * An in-memory layer with per-sector status. Data sectors map to host
 * offset hostBase + guest offset unless `compressed`.
 */
class FakeLayer implements BlockDevice {
  readonly name: string;
  readonly format = "fake";
  readonly readOnly = false;
  readonly sizeBytes: number;
  readonly backing: BlockDevice | null;
  readonly kinds: LayerStatusKind[];
  readonly bytes: Uint8Array;
  hostBase = 0;
  compressed = false;
  closed = false;

  constructor(name: string, sizeBytes: number, backing: BlockDevice | null) {
    this.name = name;
    this.sizeBytes = sizeBytes;
    this.backing = backing;
    this.kinds = new Array<LayerStatusKind>(sizeBytes / SECTOR).fill("unallocated");
    this.bytes = new Uint8Array(sizeBytes);
  }

  set(guestOffset: number, lengthBytes: number, kind: LayerStatusKind, fill = 0): this {
    for (let s = guestOffset / SECTOR; s < (guestOffset + lengthBytes) / SECTOR; s++) this.kinds[s] = kind;
    this.bytes.fill(kind === "data" ? fill : 0, guestOffset, guestOffset + lengthBytes);
    return this;
  }

  async read(guestOffset: number, buffer: Uint8Array): Promise<void> {
    for (let i = 0; i < buffer.length; i += SECTOR) {
      const at = guestOffset + i;
      const kind = this.kinds[at / SECTOR];
      const piece = buffer.subarray(i, i + SECTOR);
      if (kind === "data") piece.set(this.bytes.subarray(at, at + SECTOR));
      else if (kind === "zero" || this.backing === null || at >= this.backing.sizeBytes) piece.fill(0);
      else await this.backing.read(at, piece);
    }
  }
  async write(): Promise<void> {}
  async writeZeroes(): Promise<void> {}
  async discard(): Promise<void> {}
  async flush(): Promise<void> {}
  async layerStatus(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]> {
    const out: LayerExtent[] = [];
    for (let at = guestOffset; at < guestOffset + lengthBytes; at += SECTOR) {
      const kind = this.kinds[at / SECTOR];
      const extent: LayerExtent = { guestOffset: at, lengthBytes: SECTOR, kind };
      if (kind === "data") {
        if (this.compressed) extent.compressed = true;
        else extent.hostOffset = this.hostBase + at;
      }
      const last = out[out.length - 1];
      if (last && last.kind === kind && last.compressed === extent.compressed && (last.hostOffset === undefined) === (extent.hostOffset === undefined) && (last.hostOffset === undefined || last.hostOffset + last.lengthBytes === extent.hostOffset)) {
        last.lengthBytes += SECTOR;
      } else out.push(extent);
    }
    return out;
  }
  async close(): Promise<void> {
    this.closed = true;
    await this.backing?.close();
  }
}

const KiB = 1024;

test("mapImage resolves through the chain like qemu-img map", async () => {
  const base = new FakeLayer("base", 256 * KiB, null).set(128 * KiB, 64 * KiB, "data", 2);
  base.hostBase = 0;
  const top = new FakeLayer("top", 1024 * KiB, base).set(0, 64 * KiB, "data", 1).set(64 * KiB, 64 * KiB, "zero");
  top.hostBase = 1 << 20;
  const entries = await mapImage(top);
  assert.deepEqual(entries, [
    { start: 0, length: 65536, depth: 0, present: true, zero: false, data: true, offset: 1048576 },
    { start: 65536, length: 65536, depth: 0, present: true, zero: true, data: false },
    { start: 131072, length: 65536, depth: 1, present: true, zero: false, data: true, offset: 131072 },
    // Unallocated in both layers down to the bottom: depth of the bottom layer.
    { start: 196608, length: 65536, depth: 1, present: false, zero: true, data: false },
    // Past the end of the shorter backing: zero at the overlay's depth.
    { start: 262144, length: 786432, depth: 0, present: false, zero: true, data: false },
  ]);
  assert.equal(
    formatMapJson(entries.slice(0, 2)),
    '[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 1048576},\n' +
      '{ "start": 65536, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false}]\n',
  );
  assert.deepEqual(await mapImage(top, { startOffset: 32 * KiB, maxLengthBytes: 64 * KiB }), [
    { start: 32768, length: 32768, depth: 0, present: true, zero: false, data: true, offset: 1081344 },
    { start: 65536, length: 32768, depth: 0, present: true, zero: true, data: false },
  ]);
  await assert.rejects(mapImage(top, { startOffset: -1 }), { code: "E_INVALID_SIZE" });
});

test("map entries merge only with contiguous offsets; compressed data has no offset", async () => {
  const top = new FakeLayer("top", 64 * KiB, null).set(0, 16 * KiB, "data", 1).set(16 * KiB, 16 * KiB, "data", 2);
  // Two runs of data whose host offsets are not contiguous: emulate with two layers.
  const split = new FakeLayer("split", 64 * KiB, top).set(0, 8 * KiB, "data", 3);
  split.hostBase = 4 * KiB; // host 4K.. for guest 0..8K
  const entries = await mapImage(split);
  assert.deepEqual(entries[0], { start: 0, length: 8192, depth: 0, present: true, zero: false, data: true, offset: 4096 });
  assert.deepEqual(entries[1], { start: 8192, length: 24576, depth: 1, present: true, zero: false, data: true, offset: 8192 });
  top.compressed = true;
  const compressed = await mapImage(top);
  assert.deepEqual(compressed[0], { start: 0, length: 32768, depth: 0, present: true, zero: false, data: true });
});

test("walkChain handles chains thousands deep without recursion", async () => {
  let device: FakeLayer = new FakeLayer("l0", 64 * KiB, null).set(0, 4 * KiB, "data", 7);
  for (let i = 1; i < 3000; i++) device = new FakeLayer(`l${i}`, 64 * KiB, device);
  const entries = await mapImage(device);
  assert.deepEqual(entries, [
    { start: 0, length: 4096, depth: 2999, present: true, zero: false, data: true, offset: 0 },
    { start: 4096, length: 61440, depth: 2999, present: false, zero: true, data: false },
  ]);
  let count = 0;
  await walkChain(device, 0, 64 * KiB, () => count++);
  assert.equal(count, 2);
  const cursor = new ChainStatusCursor(device);
  assert.equal((await cursor.at(512)).start, 512);
  assert.equal((await cursor.at(5120)).present, false);
});

test("compareImages: identical, content mismatch at the first differing sector, sizes, strict", async () => {
  const a = new FakeLayer("a", 128 * KiB, null).set(0, 64 * KiB, "data", 1);
  const b = new FakeLayer("b", 128 * KiB, null).set(0, 64 * KiB, "data", 1);
  assert.deepEqual(await compareImages(a, b), { identical: true, sizeMismatch: false, message: "Images are identical." });
  b.bytes[5000] = 9;
  assert.deepEqual(await compareImages(a, b), { identical: false, reason: "content", guestOffset: 4608, message: "Content mismatch at offset 4608!" });
  b.bytes[5000] = 1;
  // Allocated zeroes on one side equal unallocated on the other, except in strict mode.
  const zeroData = new FakeLayer("z", 128 * KiB, null).set(0, 64 * KiB, "data", 1).set(64 * KiB, 4 * KiB, "data", 0);
  assert.equal((await compareImages(a, zeroData)).identical, true);
  const strict = await compareImages(a, zeroData, { strict: true });
  assert.deepEqual(strict, { identical: false, reason: "allocation", guestOffset: 65536, message: "Strict mode: Offset 65536 block status mismatch!" });
  // Larger image whose extra area is zero: identical with a warning; not in strict mode.
  const longer = new FakeLayer("l", 256 * KiB, null).set(0, 64 * KiB, "data", 1).set(192 * KiB, 4 * KiB, "data", 0);
  const result = await compareImages(a, longer);
  assert.equal(result.identical, true);
  assert.equal(result.identical && result.sizeMismatch, true);
  assert.equal((await compareImages(a, longer, { strict: true })).message, "Strict mode: Image size mismatch!");
  longer.set(200 * KiB, 512, "data", 4);
  assert.deepEqual(await compareImages(longer, a), {
    identical: false,
    reason: "content",
    guestOffset: 204800,
    sizeMismatch: true,
    message: "Warning: Image size mismatch!\nContent mismatch at offset 204800!",
  });
  const fractions: number[] = [];
  await compareImages(a, b, { onProgress: (fraction) => fractions.push(fraction) });
  assert.equal(fractions[fractions.length - 1], 1);
  const controller = new AbortController();
  controller.abort();
  await assert.rejects(compareImages(a, b, { signal: controller.signal }), { code: "E_ABORTED" });
});

test("sector helpers find the first non-zero and first differing sector", () => {
  const zero = new Uint8Array(4096);
  assert.equal(findNonZeroSector(zero), -1);
  const one = zero.slice();
  one[1500] = 1;
  assert.equal(findNonZeroSector(one), 1024);
  assert.equal(findFirstDifferentSector(zero, one), 1024);
  assert.equal(findFirstDifferentSector(one, one.slice()), -1);
});

test("findZeroRuns finds whole zero sectors in runs of at least the sparse size", (t) => {
  const data = new Uint8Array(64 * KiB).fill(1);
  data.fill(0, 4096, 12288); // 8 KiB run
  data.fill(0, 20000, 24000); // under 4 KiB after sector alignment
  data.fill(0, 30000, 40000); // unaligned: sectors 30208..39936
  assert.deepEqual(findZeroRuns(data, 4096), [
    [4096, 12288],
    [30208, 39936],
  ]);
  assert.deepEqual(findZeroRuns(new Uint8Array(8192), 4096), [[0, 8192]]);
  assert.deepEqual(findZeroRuns(data, 16384), []);
  // Randomized: every reported run is zero, sector aligned, long enough, and no qualifying run is missed.
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  for (let round = 0; round < 50; round++) {
    const buffer = new Uint8Array(32 * KiB).fill(3);
    for (let i = 0; i < 6; i++) {
      const start = random.int(buffer.length);
      buffer.fill(0, start, start + random.int(10000));
    }
    const runs = findZeroRuns(buffer, 4096);
    const expected: Array<[number, number]> = [];
    let runStart = -1;
    for (let s = 0; s <= buffer.length; s += SECTOR) {
      const zero = s < buffer.length && buffer.subarray(s, s + SECTOR).every((b) => b === 0);
      if (zero && runStart < 0) runStart = s;
      if (!zero && runStart >= 0) {
        if (s - runStart >= 4096) expected.push([runStart, s]);
        runStart = -1;
      }
    }
    assert.deepEqual(runs, expected);
  }
});

/**
 * qemu-img 7.2's convert_co_write split of one data request, ported line by
 * line (is_allocated_sectors, is_allocated_sectors_min; alignment =
 * pow2floor(min_sparse)): the model sparseZeroRuns must agree with.
 */
function qemuSkippedRuns(data: Uint8Array, guestOffset: number, minSparseBytes: number): Array<[number, number]> {
  const sectorZero = (sector: number): boolean => data.subarray(sector * SECTOR, Math.min(data.length, (sector + 1) * SECTOR)).every((b) => b === 0);
  const minSparse = minSparseBytes / SECTOR;
  const alignment = 2 ** Math.floor(Math.log2(minSparse));
  const isAllocatedSectors = (at: number, n: number, sectorNum: number): [number, number] => {
    if (n <= 0) return [0, 0];
    let isZero = sectorZero(at);
    let i = 1;
    for (; i < n; i++) if (isZero !== sectorZero(at + i)) break;
    if (i === n) return [isZero ? 0 : 1, i];
    const tail = (sectorNum + i) % alignment;
    if (tail) {
      if (isZero && i <= tail) isZero = false;
      if (!isZero) i = Math.min(i + alignment - tail, n);
      else i -= tail;
    }
    return [isZero ? 0 : 1, i];
  };
  const isAllocatedSectorsMin = (at: number, n: number, min: number, sectorNum: number): [number, number] => {
    if (n < min) min = n;
    let [ret, pnum] = isAllocatedSectors(at, n, sectorNum);
    if (!ret) return [ret, pnum];
    let numUsed = pnum;
    at += pnum;
    n -= pnum;
    sectorNum += pnum;
    let numChecked = numUsed;
    while (n > 0) {
      [ret, pnum] = isAllocatedSectors(at, n, sectorNum);
      at += pnum;
      n -= pnum;
      sectorNum += pnum;
      numChecked += pnum;
      if (ret) numUsed = numChecked;
      else if (pnum >= min) break;
    }
    return [1, numUsed];
  };
  const skipped: Array<[number, number]> = [];
  let sectorNum = guestOffset / SECTOR;
  let at = 0;
  for (let left = Math.ceil(data.length / SECTOR); left > 0; ) {
    const [ret, n] = isAllocatedSectorsMin(at, left, minSparse, sectorNum);
    if (!ret) {
      const end = Math.min(data.length, (at + n) * SECTOR);
      const last = skipped[skipped.length - 1];
      if (last !== undefined && last[1] === at * SECTOR) last[1] = end;
      else skipped.push([at * SECTOR, end]);
    }
    at += n;
    sectorNum += n;
    left -= n;
  }
  return skipped;
}

test("sparseZeroRuns leaves out the zero runs qemu-img convert leaves out (a line-by-line port of is_allocated_sectors_min)", (t) => {
  // The helper's cases from a review against qemu-img 7.2: an all-zero request shorter than -S is left out,
  // a data sector at 0 is written with the zeroes up to the 4 KiB boundary.
  assert.deepEqual(sparseZeroRuns(new Uint8Array(1024), 8192, 4096), [[0, 1024]]);
  const one = new Uint8Array(64 * KiB);
  one[0] = 1;
  assert.deepEqual(sparseZeroRuns(one, 0, 4096), [[4096, 64 * KiB]]);
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  for (let round = 0; round < 400; round++) {
    const sectors = 1 + random.int(random.next() < 0.5 ? 40 : 300);
    const partial = random.next() < 0.1 ? 1 + random.int(SECTOR - 1) : SECTOR;
    const data = new Uint8Array((sectors - 1) * SECTOR + partial);
    // Alternating runs of data and zero sectors of random lengths; data sectors sometimes start with a zero byte.
    for (let at = 0, zero = random.next() < 0.5; at < sectors; zero = !zero) {
      const run = 1 + random.int(random.next() < 0.3 ? 20 : 4);
      if (!zero) for (let s = at; s < Math.min(sectors, at + run); s++) data[Math.min(data.length - 1, s * SECTOR + random.int(SECTOR))] = 1 + random.int(255);
      at += run;
    }
    const minSparseBytes = SECTOR * [1, 2, 3, 4, 6, 8, 16, 24, 64][random.int(9)];
    const guestOffset = SECTOR * random.int(64);
    assert.deepEqual(sparseZeroRuns(data, guestOffset, minSparseBytes), qemuSkippedRuns(data, guestOffset, minSparseBytes), `round ${round}: ${sectors} sectors at ${guestOffset}, -S ${minSparseBytes}`);
  }
});

test("backing names resolve like QEMU's path_combine", () => {
  assert.equal(resolveBackingPath("top.qcow2", "base.qcow2"), "base.qcow2");
  assert.equal(resolveBackingPath("dir/top.qcow2", "base.qcow2"), "dir/base.qcow2");
  assert.equal(resolveBackingPath("sub/top.qcow2", "../base.qcow2"), "sub/../base.qcow2");
  assert.equal(resolveBackingPath("/a/b/top.qcow2", "/abs/base"), "/abs/base");
  assert.equal(resolveBackingPath("/a/top", "file:base"), "/a/base");
  assert.equal(hasProtocolPrefix("nbd:localhost:10809"), true);
  assert.equal(hasProtocolPrefix("dir/with:colon"), false);
  assert.throws(() => resolveBackingPath("top", 'json:{"driver":"raw"}'), { code: "E_UNSUPPORTED_FEATURE" });
  assert.throws(() => resolveBackingPath("top", "nbd:localhost:1"), { code: "E_UNSUPPORTED_FEATURE" });
});

test("convertImage copies a chain's content into a raw file, skipping zeroes", async (t) => {
  const dir = scratchDir(t);
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  const base = new FakeLayer("base", 512 * KiB, null).set(0, 512 * KiB, "data", 5);
  const top = new FakeLayer("top", 1024 * KiB, base);
  for (let i = 0; i < 20; i++) {
    const start = random.int(2048) * SECTOR;
    const length = Math.min(1024 * KiB - start, (1 + random.int(64)) * SECTOR);
    top.set(start, length, random.next() < 0.5 ? "zero" : "data", 1 + random.int(200));
  }
  const expected = new Uint8Array(top.sizeBytes);
  await top.read(0, expected);
  const path = join(dir, "out.raw");
  const fractions: number[] = [];
  await convertImage(top, path, { format: "raw", onProgress: (f) => fractions.push(f) });
  assert.deepEqual(new Uint8Array(readFileSync(path)), expected);
  assert.equal(fractions[fractions.length - 1], 1);
  // -S 0 and an existing target (-n) give the same bytes.
  await convertImage(top, path, { format: "raw", sparseSizeBytes: 0, targetExists: true });
  assert.deepEqual(new Uint8Array(readFileSync(path)), expected);
  await assert.rejects(convertImage(top, path, { format: "raw", compress: true }), { code: "E_UNSUPPORTED_FEATURE" });
  await assert.rejects(convertImage(top, path, { format: "vmdk" }), { code: "E_UNSUPPORTED_FEATURE", message: /reads vmdk images but does not write them/ });
  await assert.rejects(convertImage(top, path, { format: "qed" }), { code: "E_UNKNOWN_FORMAT" });
  await assert.rejects(convertImage(top, path, { format: "raw", sparseSizeBytes: 100 }), { code: "E_INVALID_SIZE" });
  const controller = new AbortController();
  controller.abort();
  await assert.rejects(convertImage(top, join(dir, "aborted.raw"), { format: "raw", signal: controller.signal }), { code: "E_ABORTED" });
});
