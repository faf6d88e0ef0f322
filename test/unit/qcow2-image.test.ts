import { test } from "node:test";
import assert from "node:assert/strict";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { createQcow2, type Qcow2CreateOptions } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2, type Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { isSnapstackError } from "../../src/base/errors.ts";

const MiB = 1024 * 1024;
const KiB = 1024;

async function fresh(options: Partial<Qcow2CreateOptions> = {}, backing: Qcow2Image | null = null): Promise<{ file: MemoryFile; image: Qcow2Image }> {
  const file = new MemoryFile({ name: "test.qcow2" });
  await createQcow2(file, { sizeBytes: 4 * MiB, ...options });
  const image = await openQcow2(file, { readOnly: false, backing, closeBacking: false });
  return { file, image };
}

function code(expected: string): (e: unknown) => boolean {
  return (e: unknown) => isSnapstackError(e) && e.code === expected;
}

test("layer status: unallocated, data, zero (plain and preallocated), compressed", async () => {
  const { image } = await fresh();
  await image.write(64 * KiB, new Uint8Array(128 * KiB).fill(1));
  await image.writeZeroes(64 * KiB, 64 * KiB); // allocated, no unmap: ZERO_ALLOC keeps the host cluster
  await image.writeZeroes(512 * KiB, 64 * KiB); // unallocated: ZERO_PLAIN
  await image.writeCompressed(MiB, new Uint8Array(64 * KiB).fill(7));
  const extents = await image.layerStatus(0, 2 * MiB);
  assert.deepEqual(
    extents.map((e) => [e.guestOffset, e.lengthBytes, e.kind, e.hostOffset !== undefined, e.compressed ?? false]),
    [
      [0, 64 * KiB, "unallocated", false, false],
      [64 * KiB, 64 * KiB, "zero", true, false],
      [128 * KiB, 64 * KiB, "data", true, false],
      [192 * KiB, 320 * KiB, "unallocated", false, false],
      [512 * KiB, 64 * KiB, "zero", false, false],
      [576 * KiB, 448 * KiB, "unallocated", false, false],
      [MiB, 64 * KiB, "data", false, true],
      [MiB + 64 * KiB, MiB - 64 * KiB, "unallocated", false, false],
    ],
  );
  const back = new Uint8Array(64 * KiB);
  await image.read(MiB, back);
  assert.ok(back.every((b) => b === 7));
  await image.read(64 * KiB, back);
  assert.ok(back.every((b) => b === 0));
  await image.close();
});

test("requests are checked at the edge", async () => {
  const { image } = await fresh();
  await assert.rejects(image.read(4 * MiB - 10, new Uint8Array(11)), code("E_OUT_OF_RANGE"));
  await assert.rejects(image.write(-1, new Uint8Array(1)), code("E_OUT_OF_RANGE"));
  await assert.rejects(image.writeCompressed(100, new Uint8Array(64 * KiB)), code("E_INVALID_SIZE"));
  await image.write(0, new Uint8Array(10).fill(1));
  // Compression never overwrites an allocated cluster (QEMU: EIO).
  await assert.rejects(image.writeCompressed(0, new Uint8Array(64 * KiB)), code("E_IO"));
  await assert.rejects(image.resize(2 * MiB, { shrink: false }), /--shrink/);
  await assert.rejects(image.resize(1000, { shrink: true }), /multiple of 512/);
  await image.close();
  await assert.rejects(image.read(0, new Uint8Array(1)), code("E_IO"));
});

test("a header size that is not a multiple of 512 is read as QEMU reads it: rounded down to whole sectors", async () => {
  const file = new MemoryFile({ name: "odd.qcow2" });
  await createQcow2(file, { sizeBytes: 99840 });
  // Another tool wrote 100000 (QEMU's tools never do): QEMU's guest ends at 99840.
  const sizeField = new Uint8Array(8);
  new DataView(sizeField.buffer).setBigUint64(0, 100000n);
  await file.write(24, sizeField);
  const odd = await openQcow2(file, { readOnly: false, backing: null });
  assert.equal(odd.sizeBytes, 99840);
  assert.equal(odd.info().sizeBytes, 99840);
  await assert.rejects(odd.write(99900, new Uint8Array(100)), code("E_OUT_OF_RANGE"));
  await odd.write(99840 - 512, new Uint8Array(512).fill(7));
  await odd.flush();
  const header = new Uint8Array(32);
  await file.read(0, header);
  assert.equal(new DataView(header.buffer).getBigUint64(24), 100000n, "the header keeps the size it had");
  await odd.close();
});

test("read-only images refuse writes", async () => {
  const { file, image } = await fresh();
  await image.write(0, new Uint8Array(100).fill(9));
  await image.flush();
  const contents = await readAll(file);
  await image.close();
  const reopened = await openQcow2(new MemoryFile({ contents, readOnly: true }), { readOnly: true, backing: null });
  await assert.rejects(reopened.write(0, new Uint8Array(1)), code("E_READ_ONLY"));
  await assert.rejects(reopened.writeZeroes(0, 1), code("E_READ_ONLY"));
  await assert.rejects(reopened.discard(0, 65536), code("E_READ_ONLY"));
  const buffer = new Uint8Array(101);
  await reopened.read(0, buffer);
  assert.equal(buffer[99], 9);
  assert.equal(buffer[100], 0);
});

async function readAll(file: MemoryFile): Promise<Uint8Array> {
  const bytes = new Uint8Array(await file.sizeBytes());
  await file.read(0, bytes);
  return bytes;
}

test("extended L2: a partial write allocates only the touched subclusters", async () => {
  const base = await fresh();
  await base.image.write(0, new Uint8Array(64 * KiB).fill(0xbb));
  const { image } = await fresh({ extendedL2: true }, base.image);
  await image.write(4 * KiB, new Uint8Array(4 * KiB).fill(0xcc));
  const extents = await image.layerStatus(0, 64 * KiB);
  assert.deepEqual(
    extents.map((e) => [e.guestOffset, e.lengthBytes, e.kind]),
    [
      [0, 4 * KiB, "unallocated"],
      [4 * KiB, 4 * KiB, "data"],
      [8 * KiB, 56 * KiB, "unallocated"],
    ],
  );
  const buffer = new Uint8Array(64 * KiB);
  await image.read(0, buffer);
  assert.ok(buffer.subarray(0, 4 * KiB).every((b) => b === 0xbb));
  assert.ok(buffer.subarray(4 * KiB, 8 * KiB).every((b) => b === 0xcc));
  assert.ok(buffer.subarray(8 * KiB).every((b) => b === 0xbb));
  // A 2 KiB zero write marks one subcluster zero.
  await image.writeZeroes(16 * KiB, 2 * KiB);
  await image.read(16 * KiB, buffer.subarray(0, 4 * KiB));
  assert.ok(buffer.subarray(0, 2 * KiB).every((b) => b === 0));
  assert.ok(buffer.subarray(2 * KiB, 4 * KiB).every((b) => b === 0xbb));
  await image.close();
  await base.image.close();
});

test("extended L2: a zero request straddling two partial subclusters zeroes both parts", async () => {
  // Found by the randomized crash test (workload seed 14529319): the first subcluster
  // already read as zero, so the whole request was taken as done and the second kept its data.
  const { image } = await fresh({ extendedL2: true });
  await image.write(4 * KiB, new Uint8Array(4 * KiB).fill(0xcc)); // subclusters 2 and 3 (2 KiB each)
  await image.writeZeroes(3 * KiB + 512, 1536); // the end of subcluster 1 (zero) and the start of subcluster 2 (data)
  const buffer = new Uint8Array(8 * KiB);
  await image.read(0, buffer);
  assert.ok(buffer.subarray(0, 5 * KiB).every((b) => b === 0), "the zeroed part of subcluster 2 reads as zero");
  assert.ok(buffer.subarray(5 * KiB, 8 * KiB).every((b) => b === 0xcc), "the rest keeps its data");
  await image.close();
});

test("a partial zero write with unmap frees a zero-allocated cluster, as QEMU does (no extended L2)", async () => {
  const { image } = await fresh({ sizeBytes: 16 * KiB, clusterSizeBytes: 4 * KiB });
  await image.write(4 * KiB, new Uint8Array(4 * KiB).fill(0xf3));
  await image.writeZeroes(4 * KiB, 4 * KiB); // zero-allocated: the host cluster stays
  const hostOf = async () => (await image.layerStatus(4 * KiB, 4 * KiB))[0].hostOffset;
  assert.notEqual(await hostOf(), undefined);
  // The rest of the cluster reads as zero: QEMU zeroes the whole cluster with unmap, which frees it.
  await image.writeZeroes(4 * KiB, KiB, { unmap: true });
  assert.equal(await hostOf(), undefined, "the cluster is no longer allocated");
  // So a compressed write there is allowed (QEMU's qemu-io succeeds; it was refused as an allocated cluster).
  await image.writeCompressed(4 * KiB, new Uint8Array(4 * KiB).fill(0x11));
  const buffer = new Uint8Array(4 * KiB);
  await image.read(4 * KiB, buffer);
  assert.ok(buffer.every((b) => b === 0x11));
  await image.close();
});

test("extended L2: a zero request with an unaligned head over a compressed cluster zeroes the aligned middle as subclusters, as QEMU does", async () => {
  const { image } = await fresh({ sizeBytes: 640 * KiB, extendedL2: true });
  await image.writeCompressed(0, new Uint8Array(64 * KiB).fill(0x87));
  await image.writeZeroes(48640, 4096); // head in subcluster 23, subcluster 24 whole, tail in 25
  const extents = await image.layerStatus(0, 64 * KiB);
  assert.deepEqual(
    extents.map((e) => [e.guestOffset, e.lengthBytes, e.kind]),
    [
      [0, 48 * KiB, "data"],
      [48 * KiB, 2 * KiB, "zero"],
      [50 * KiB, 14 * KiB, "data"],
    ],
  );
  const buffer = new Uint8Array(64 * KiB);
  await image.read(0, buffer);
  buffer.forEach((b, i) => assert.equal(b, i >= 48640 && i < 48640 + 4096 ? 0 : 0x87, `byte ${i}`));
  await image.close();
});

test("a partial zero write over backing data whose rest reads as zero makes a zero cluster, as QEMU does: only the rest is checked", async () => {
  const base = await fresh({ sizeBytes: 40 * KiB, clusterSizeBytes: 8 * KiB });
  await base.image.write(24 * KiB, new Uint8Array(4 * KiB).fill(0x5a)); // the backing's data in [24K, 28K)
  const { image } = await fresh({ sizeBytes: 40 * KiB, clusterSizeBytes: 8 * KiB }, base.image);
  await image.writeZeroes(24 * KiB, 4608); // the rest of cluster 3, [28.5K, 32K), reads as zero
  const extents = await image.layerStatus(24 * KiB, 8 * KiB);
  assert.deepEqual(
    extents.map((e) => [e.kind, e.hostOffset]),
    [["zero", undefined]],
  );
  const buffer = new Uint8Array(8 * KiB);
  await image.read(24 * KiB, buffer);
  assert.ok(buffer.every((b) => b === 0));
  await image.close();
  await base.image.close();
});

test("extended L2: zeroing with unmap up to an image end inside a cluster keeps that cluster, as QEMU does", async () => {
  const { image } = await fresh({ sizeBytes: 231936, clusterSizeBytes: 32 * KiB, extendedL2: true });
  await image.write(200000, new Uint8Array(31936).fill(1));
  await image.writeZeroes(196608, 35328, { unmap: true });
  const [whole, last] = await image.layerStatus(196608, 35328);
  assert.deepEqual([whole.kind, whole.hostOffset], ["zero", undefined], "the whole cluster is unmapped");
  assert.equal(last.kind, "zero");
  assert.notEqual(last.hostOffset, undefined, "the last, partial cluster keeps its host cluster (zero subclusters)");
  // So a compressed write there is refused, as qemu-io's is (EIO).
  await assert.rejects(image.writeCompressed(229376, new Uint8Array(2560)), code("E_IO"));
  await image.close();
});

test("reads racing a discard never see another cluster's new data", async () => {
  const { image } = await fresh({ sizeBytes: 2 * MiB });
  await image.write(0, new Uint8Array(MiB).fill(0x11));
  const reads: Promise<void>[] = [];
  const seen: Uint8Array[] = [];
  for (let i = 0; i < 50; i++) {
    const buffer = new Uint8Array(64 * KiB);
    seen.push(buffer);
    reads.push(image.read((i % 16) * 64 * KiB, buffer));
    if (i % 5 === 0) reads.push(image.discard((i % 16) * 64 * KiB, 64 * KiB));
    reads.push(image.write(MiB + (i % 16) * 64 * KiB, new Uint8Array(64 * KiB).fill(0x22)));
  }
  await Promise.all(reads);
  for (const buffer of seen) assert.ok(buffer.every((b) => b === 0x11 || b === 0), "only old data or zeroes");
  await image.close();
});

test("a write whose data write fails frees the clusters it allocated (qcow2_alloc_cluster_abort): no leak, the image checks clean and keeps working", async () => {
  const { FaultFile } = await import("../../src/io/fault-file.ts");
  const { checkQcow2 } = await import("../../src/formats/qcow2/check.ts");
  const inner = new MemoryFile({ name: "abort.qcow2" });
  await createQcow2(inner, { sizeBytes: 4 * MiB });
  // Free clusters inside the file (refcount 0): the allocation lands there, where `check` sees a leak
  // (it counts only clusters below the end of the file).
  await inner.truncate(2 * MiB);
  // The guest data write (the 128 KiB of two new clusters) fails.
  const file = await FaultFile.wrap(inner, { faults: [{ op: "write", index: 1, where: (_hostOffset, lengthBytes) => lengthBytes === 128 * KiB, code: "E_IO" }] });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await assert.rejects(image.write(MiB, new Uint8Array(128 * KiB).fill(5)), code("E_IO"));
  await image.write(2 * MiB, new Uint8Array(64 * KiB).fill(6));
  await image.flush();
  const report = await checkQcow2(inner);
  assert.equal(report.corruptions, 0);
  assert.equal(report.leaks, 0, "the failed write's clusters were freed, not leaked");
  const back = new Uint8Array(64 * KiB);
  await image.read(2 * MiB, back);
  assert.ok(back.every((byte) => byte === 6));
  await image.read(MiB, back);
  assert.ok(back.every((byte) => byte === 0), "the failed write left nothing mapped");
  await image.close();
});
