// The metadata caches stay within their bound on the read path too, and the
// L2 cache hands the memory of evicted tables back instead of leaving it to
// the garbage collector. Dirtiness is kept per chunk: write-back writes the
// changed chunks of a table, and the image on disk is whole afterwards.
import { test } from "node:test";
import assert from "node:assert/strict";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { createQcow2 } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2 } from "../../src/formats/qcow2/qcow2-image.ts";
import { TableCache, dirtyChunkBytes, dirtyRuns, markDirty, type CachedTable } from "../../src/formats/qcow2/table-cache.ts";
import { getL2Entry } from "../../src/formats/qcow2/entries.ts";
import { assertClean } from "../helpers/qcow2-clean.ts";
import { FaultFile } from "../../src/io/fault-file.ts";
import { isSnapstackError } from "../../src/base/errors.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

test("reads alone keep the L2 cache within its bound", async () => {
  const clusterBytes = 4 * KiB;
  const l2CoverageBytes = (clusterBytes / 8) * clusterBytes; // 2 MiB per L2 table
  const sizeBytes = 64 * MiB;
  const file = new MemoryFile({ name: "many-tables.qcow2" });
  await createQcow2(file, { sizeBytes, clusterSizeBytes: clusterBytes });
  const writer = await openQcow2(file, { readOnly: false, backing: null });
  for (let at = 0; at < sizeBytes; at += l2CoverageBytes) await writer.write(at + 512, new Uint8Array([at / l2CoverageBytes + 1]));
  await writer.close();

  const image = await openQcow2(new MemoryFile({ name: file.name, contents: file.contents(), readOnly: true }), {
    readOnly: true,
    backing: null,
    cacheBytesMax: 8 * clusterBytes,
  });
  const cache = image.metadata.l2Cache;
  const byte = new Uint8Array(1);
  for (let round = 0; round < 3; round++) {
    for (let at = 0; at < sizeBytes; at += l2CoverageBytes) {
      await image.read(at + 512, byte);
      assert.equal(byte[0], at / l2CoverageBytes + 1);
      assert.ok(cache.size <= cache.entriesMax, `cache holds ${cache.size} tables, bound ${cache.entriesMax}`);
    }
  }
  await image.close();
});

test("the last eviction hold released trims; freeEvicted detaches evicted tables at the next trim", async () => {
  const tableBytes = 512;
  const file = new MemoryFile({ name: "tables", contents: new Uint8Array(64 * tableBytes).fill(7) });
  const cache = new TableCache(file, tableBytes, 4, { freeEvicted: true });
  const release = cache.holdEviction();
  const held = [];
  for (let i = 0; i < 8; i++) held.push(await cache.get(i * tableBytes));
  assert.equal(cache.size, 8, "nothing evicted while held");
  release();
  assert.equal(cache.size, 3, "trimmed to 3/4 of the bound on release");
  const evicted = held.filter((table) => cache.peek(table.hostOffset) === undefined);
  assert.equal(evicted.length, 5);
  assert.ok(evicted.every((table) => table.bytes.length === tableBytes), "still readable until the next trim");
  for (let i = 8; i < 10; i++) await cache.get(i * tableBytes);
  assert.ok(evicted.every((table) => table.bytes.length === 0), "detached at the next trim");
  assert.throws(() => evicted[0].view.getUint32(0), TypeError);
});

function tableOf(tableBytes: number): CachedTable {
  const bytes = new Uint8Array(tableBytes);
  return { hostOffset: 0, bytes, view: new DataView(bytes.buffer), dirtyChunks: 0, lastUsed: 0 };
}

test("markDirty and dirtyRuns: chunks of a 32nd of the table, at least a page, merged when adjacent", () => {
  assert.equal(dirtyChunkBytes(64 * KiB), 4 * KiB);
  assert.equal(dirtyChunkBytes(2 * MiB), 64 * KiB);
  assert.equal(dirtyChunkBytes(4 * KiB), 4 * KiB);
  assert.equal(dirtyChunkBytes(512), 512);

  const table = tableOf(64 * KiB);
  markDirty(table, 8, 4);
  assert.deepEqual(dirtyRuns(table.dirtyChunks, 64 * KiB), [[0, 4 * KiB]]);
  markDirty(table, 4 * KiB - 2, 4); // straddles chunks 0 and 1
  markDirty(table, 60 * KiB, 8); // the last chunk
  assert.deepEqual(dirtyRuns(table.dirtyChunks, 64 * KiB), [
    [0, 8 * KiB],
    [60 * KiB, 4 * KiB],
  ]);
  markDirty(table);
  assert.deepEqual(dirtyRuns(table.dirtyChunks, 64 * KiB), [[0, 64 * KiB]]);

  const large = tableOf(2 * MiB);
  markDirty(large, 2 * MiB - 8, 8);
  assert.deepEqual(dirtyRuns(large.dirtyChunks, 2 * MiB), [[2 * MiB - 64 * KiB, 64 * KiB]]);
  markDirty(large, 0, 2 * MiB);
  assert.deepEqual(dirtyRuns(large.dirtyChunks, 2 * MiB), [[0, 2 * MiB]]);

  const small = tableOf(512);
  markDirty(small, 100, 8);
  assert.deepEqual(dirtyRuns(small.dirtyChunks, 512), [[0, 512]]);
});

/** A MemoryFile that records the range of every write. */
class WriteLoggingFile extends MemoryFile {
  writes: Array<[hostOffset: number, lengthBytes: number]> = [];
  override writeSync(hostOffset: number, data: Uint8Array): void {
    this.writes.push([hostOffset, data.length]);
    super.writeSync(hostOffset, data);
  }
}

/** An image with data clusters at `guestOffsets` (64 KiB clusters, 1 GiB disk: one L2 table for the first 512 MiB). */
async function imageBytes(guestOffsets: readonly number[]): Promise<Uint8Array> {
  const seed = new MemoryFile({ name: "chunks.qcow2" });
  await createQcow2(seed, { sizeBytes: 1024 * MiB, clusterSizeBytes: 64 * KiB });
  const writer = await openQcow2(seed, { readOnly: false, backing: null });
  for (const [i, guestOffset] of guestOffsets.entries()) await writer.write(guestOffset, new Uint8Array(64 * KiB).fill(i + 1));
  await writer.close();
  return seed.contents();
}

// Entries 0, 3200 and 6400 of the first L2 table: bytes 0, 25600 and 51200, in chunks 0, 6 and 12.
const SPREAD_GUEST_OFFSETS = [0, 200 * MiB, 400 * MiB];

for (const writeSync of [true, false]) {
  test(`a snapshot pass writes only the chunks of an L2 table it changed, and the image is whole afterwards (${writeSync ? "synchronous writes" : "writes on the pool, from a copy"})`, async () => {
    const clusterBytes = 64 * KiB;
    const inner = new WriteLoggingFile({ name: "chunks.qcow2", contents: await imageBytes(SPREAD_GUEST_OFFSETS) });
    const file = writeSync ? inner : await FaultFile.wrap(inner, { writeSync: false });
    const image = await openQcow2(file, { readOnly: false, backing: null });
    const l2Offset = image.metadata.l1EntryOffset(0);
    const intoTable = (): Array<[number, number]> =>
      inner.writes.filter(([at, length]) => at < l2Offset + clusterBytes && at + length > l2Offset).map(([at, length]) => [at - l2Offset, length]);

    await image.createSnapshot("s");
    assert.deepEqual(intoTable(), [
      [0, 4 * KiB],
      [24 * KiB, 4 * KiB],
      [48 * KiB, 4 * KiB],
    ]);
    await assertClean(image, inner, "after create");
    await image.close();

    // What reached the file: COPIED cleared in every entry (the image is shared with the snapshot).
    const reopened = await openQcow2(new MemoryFile({ name: inner.name, contents: inner.contents() }), { readOnly: false, backing: null });
    const table = await reopened.metadata.getL2(reopened.metadata.l1EntryOffset(0));
    for (const guestOffset of SPREAD_GUEST_OFFSETS) {
      const entry = getL2Entry(table.view, guestOffset / clusterBytes, false, 16);
      assert.equal(entry.type, "normal");
      assert.equal(entry.type === "normal" && entry.copied, false, `entry of guest offset ${guestOffset}`);
    }
    await reopened.deleteSnapshot("s");
    await assertClean(reopened, reopened.metadata.file, "after delete");
    const byte = new Uint8Array(1);
    for (const [i, guestOffset] of SPREAD_GUEST_OFFSETS.entries()) {
      await reopened.read(guestOffset + clusterBytes - 1, byte);
      assert.equal(byte[0], i + 1);
    }
    await reopened.close();
  });
}

test("a table write-back that fails after its first chunk keeps the rest dirty: the next flush writes it", async () => {
  const clusterBytes = 64 * KiB;
  const contents = await imageBytes([0, 400 * MiB]);
  const l2Offset = (await openQcow2(new MemoryFile({ contents, readOnly: true }), { readOnly: true, backing: null })).metadata.l1EntryOffset(0);
  // The write of chunk 12 of the table (guest offset 400 MiB's entry) fails once.
  const file = await FaultFile.fromBytes(contents, {
    writeSync: false,
    faults: [{ op: "write", index: 1, where: (hostOffset) => hostOffset === l2Offset + 48 * KiB, code: "E_IO" }],
  });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await image.writeZeroes(0, clusterBytes);
  await image.writeZeroes(400 * MiB, clusterBytes);
  await assert.rejects(image.flush(), (error: unknown) => isSnapstackError(error) && error.code === "E_IO");
  await image.flush();
  const onDisk = new Uint8Array(clusterBytes);
  await file.read(l2Offset, onDisk);
  assert.ok(Buffer.from(onDisk).equals((await image.metadata.getL2(l2Offset)).bytes), "the table on disk equals the cached one");
  await assertClean(image, new MemoryFile({ contents: file.durableContents() }), "after the second flush");
  const byte = new Uint8Array(1);
  for (const guestOffset of [0, 400 * MiB]) {
    await image.read(guestOffset + clusterBytes - 1, byte);
    assert.equal(byte[0], 0, `guest offset ${guestOffset} reads as zeroes`);
  }
  await image.close();
});
