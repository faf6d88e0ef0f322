/**
 * Qcow2Image.makeEmpty: QEMU's make_completely_empty where QEMU takes it
 * (v3, no snapshots, L1 small enough, no wipe) and the cluster-by-cluster
 * path elsewhere. The overlay's data is also in its backing image (as after
 * a commit), so both the old and the emptied overlay read the backing's
 * content. A crash at every write of the fast path (torn, subsets of the
 * unflushed writes) leaves an image that opens read-write (refcounts
 * rebuilt when dirty), checks without corruption and reads that content.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createQcow2, type Qcow2CreateOptions } from "../../src/formats/qcow2/create-qcow2.ts";
import { decodeQcow2Header, encodeQcow2Header } from "../../src/formats/qcow2/header.ts";
import { openQcow2, type Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { checkQcow2 } from "../../src/formats/qcow2/check.ts";
import { createSnapshot } from "../../src/formats/qcow2/internal-snapshots.ts";
import { openSnapshotView } from "../../src/formats/qcow2/snapshot-view.ts";
import { CrashReplay, FaultFile } from "../../src/io/fault-file.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { assertNoCorruption } from "../helpers/crash-workload.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE_BYTES = 64 * MiB;
/** An extension magic no qcow2 implementation knows: kept as is. */
const UNKNOWN_MAGIC = 0x7e57e7e5;

interface Chain {
  backing: Qcow2Image;
  /** What the disk reads: the backing's content (the overlay holds copies of parts of it). */
  expected: Uint8Array;
  overlay: Uint8Array;
}

/** backing (data) <- overlay holding copies of some of it, zero clusters and, optionally, an unknown header extension. */
async function buildChain(seed: number, options: Partial<Qcow2CreateOptions> & { grownFromBytes?: number } = {}, unknownExtension = false): Promise<Chain> {
  const random = createRandom(seed);
  const backingFile = new MemoryFile({ name: "backing.qcow2" });
  await createQcow2(backingFile, { sizeBytes: SIZE_BYTES });
  const overlayFile = new MemoryFile({ name: "overlay.qcow2" });
  const { grownFromBytes, ...createOptions } = options;
  await createQcow2(overlayFile, { sizeBytes: grownFromBytes ?? SIZE_BYTES, backingFile: "backing.qcow2", backingFormat: "qcow2", ...createOptions });
  const writer = await openQcow2(backingFile, { readOnly: false, backing: null });
  const backingView = await openQcow2(new MemoryFile({ name: "backing.qcow2", contents: backingFile.contents(), readOnly: true }), { readOnly: true, backing: null });
  const overlay = await openQcow2(overlayFile, { readOnly: false, backing: backingView, closeBacking: false });
  if (grownFromBytes !== undefined) {
    // Data first, then a grown L1, placed after it: clusters 4.. hold L2 tables and data the old L1 reaches.
    const data = random.bytes(grownFromBytes / 2);
    await writer.write(grownFromBytes / 4, data);
    await overlay.write(grownFromBytes / 4, data);
    await overlay.resize(SIZE_BYTES, { shrink: false });
  }
  for (let i = 0; i < 12; i++) {
    const lengthBytes = (1 + random.int(32)) * 4 * KiB;
    const guestOffset = random.int((SIZE_BYTES - lengthBytes) / 512) * 512;
    const data = random.bytes(lengthBytes);
    await writer.write(guestOffset, data);
    await overlay.write(guestOffset, data);
  }
  // Zeroes written to both: a zero cluster in the overlay.
  await writer.writeZeroes(40 * MiB, MiB);
  await overlay.writeZeroes(40 * MiB, MiB);
  await writer.close();
  await overlay.close();
  await backingView.close();
  let overlayBytes = overlayFile.contents();
  if (unknownExtension) {
    const header = decodeQcow2Header(overlayBytes.subarray(0, 64 * KiB));
    header.extensions.unknown.push({ magic: UNKNOWN_MAGIC, data: new Uint8Array([1, 2, 3, 4, 5]) });
    overlayBytes = overlayBytes.slice();
    overlayBytes.set(encodeQcow2Header(header), 0);
  }
  const backing = await openQcow2(new MemoryFile({ name: "backing.qcow2", contents: backingFile.contents(), readOnly: true }), { readOnly: true, backing: null });
  const expected = new Uint8Array(SIZE_BYTES);
  await backing.read(0, expected);
  return { backing, expected, overlay: overlayBytes };
}

async function assertReadsBacking(image: Qcow2Image, chain: Chain, where: string): Promise<void> {
  const actual = new Uint8Array(SIZE_BYTES);
  await image.read(0, actual);
  if (Buffer.compare(actual, chain.expected) !== 0) {
    const at = actual.findIndex((byte, i) => byte !== chain.expected[i]);
    assert.fail(`${where}: guest byte ${at} reads ${actual[at]}, the backing holds ${chain.expected[at]}`);
  }
}

async function emptyOverlay(chain: Chain, file: MemoryFile | FaultFile, options: { wipe?: boolean } = {}): Promise<void> {
  const image = await openQcow2(file, { readOnly: false, backing: chain.backing, closeBacking: false });
  await image.makeEmpty(options);
  await assertReadsBacking(image, chain, "after makeEmpty");
  const status = await image.layerStatus(0, SIZE_BYTES);
  assert.deepEqual(
    status.filter((extent) => extent.kind !== "unallocated"),
    [],
    "nothing is allocated in the emptied layer",
  );
  await image.close();
}

test("makeEmpty (v3, no snapshots): QEMU's layout, header extensions kept, clean, reads the backing", async () => {
  const seed = testSeed();
  console.log(`seed ${seed}`);
  const chain = await buildChain(seed, {}, true);
  const before = decodeQcow2Header(chain.overlay.subarray(0, 64 * KiB));
  const file = new MemoryFile({ name: "overlay.qcow2", contents: chain.overlay });
  await emptyOverlay(chain, file);
  const contents = file.contents();
  const cs = 64 * KiB;
  assert.equal(contents.length, 4 * cs, "header, refcount table, refcount block, one L1 cluster");
  const after = decodeQcow2Header(contents.subarray(0, cs));
  assert.equal(after.l1TableOffset, 3 * cs);
  assert.equal(after.refcountTableOffset, cs);
  assert.equal(after.refcountTableClusters, 1);
  assert.equal(after.l1Size, before.l1Size);
  assert.equal(after.incompatibleFeatures, before.incompatibleFeatures, "clean again");
  assert.equal(after.backingFileName, "backing.qcow2");
  assert.equal(after.backingFormat, "qcow2");
  assert.deepEqual(after.extensions.unknown, before.extensions.unknown);
  assert.deepEqual(after.extensions.featureNames, before.extensions.featureNames);
  assert.ok(contents.subarray(cs * 3).every((byte) => byte === 0), "the L1 is zero");
  const result = await checkQcow2(new MemoryFile({ name: "overlay.qcow2", contents, readOnly: true }));
  assertNoCorruption(result, "check");
  assert.equal(result.leaks, 0);
  assert.equal(result.imageEndOffset, 4 * cs);
  // The emptied image takes writes again.
  const image = await openQcow2(new MemoryFile({ name: "overlay.qcow2", contents }), { readOnly: false, backing: chain.backing, closeBacking: false });
  await image.write(3 * MiB, new Uint8Array(128 * KiB).fill(0x5a));
  const back = new Uint8Array(128 * KiB);
  await image.read(3 * MiB, back);
  assert.ok(back.every((byte) => byte === 0x5a));
  await image.close();
  await chain.backing.close();
});

test("makeEmpty: a crash at any write of the fast path leaves an image that opens, checks and reads the backing", async () => {
  const seed = testSeed();
  console.log(`seed ${seed}`);
  const random = createRandom(seed);
  const variants: (Partial<Qcow2CreateOptions> & { grownFromBytes?: number })[] = [
    {},
    { lazyRefcounts: true },
    { clusterSizeBytes: 4 * KiB, refcountBits: 1 },
    { clusterSizeBytes: 512, grownFromBytes: MiB },
  ];
  for (const options of variants) {
    const chain = await buildChain(random.int(2 ** 31), options);
    // The grown-L1 image has the one window that needs a flush of its own (the old L1's zeroes before
    // clusters 1.. are rewritten): more subsets of the unflushed writes there (10 found it missing).
    const durable = await crashAtEveryWrite(chain, JSON.stringify(options), options.grownFromBytes === undefined ? 2 : 16, random.next);
    const header = decodeQcow2Header(durable.subarray(0, 4 * KiB));
    assert.equal(header.refcountTableOffset, 2 ** header.clusterBits, `${JSON.stringify(options)}: the fast path was taken`);
    await chain.backing.close();
  }
});

/**
 * makeEmpty on chain.overlay, then a crash at each of its writes (`variants`
 * subsets of the unflushed writes each): every crashed image opens, reads
 * the backing and checks without corruption. Returns the emptied file.
 */
async function crashAtEveryWrite(chain: Chain, label: string, variants: number, next: () => number): Promise<Uint8Array> {
  const file = await FaultFile.fromBytes(chain.overlay, { name: "overlay.qcow2", recordLog: true });
  const image = await openQcow2(file, { readOnly: false, backing: chain.backing, closeBacking: false });
  const writesBefore = file.writeCount;
  await image.makeEmpty();
  await image.close();
  const replay = new CrashReplay(chain.overlay, file.log ?? []);
  for (let write = writesBefore + 1; write <= replay.writeCount; write++) {
    for (let variant = 0; variant < variants; variant++) {
      const where = `${label} crash at write ${write} (variant ${variant})`;
      const contents = replay.crashAt(write, next);
      const crashed = new MemoryFile({ name: "overlay.qcow2", contents });
      const reopened = await openQcow2(crashed, { readOnly: false, backing: chain.backing, closeBacking: false });
      await assertReadsBacking(reopened, chain, where);
      await reopened.close();
      assertNoCorruption(await checkQcow2(new MemoryFile({ name: "overlay.qcow2", contents: crashed.contents(), readOnly: true })), where);
    }
  }
  return file.durableContents();
}

test("makeEmpty with the old L1 in cluster 1 (old QEMU's layout) takes the slow path: a crash at any write still reads the backing", async () => {
  const seed = testSeed();
  console.log(`seed ${seed}`);
  const random = createRandom(seed);
  const chain = await buildChain(random.int(2 ** 31));
  // Swap the L1 (cluster 3) and the refcount table (cluster 1). The fast path's one write of clusters
  // 1..2 before the header switch would turn this L1 into a pointer to the new refcount block.
  const cs = 64 * KiB;
  const bytes = chain.overlay.slice();
  const header = decodeQcow2Header(bytes.subarray(0, cs));
  assert.deepEqual([header.l1TableOffset, header.refcountTableOffset], [3 * cs, cs]);
  const l1 = bytes.slice(3 * cs, 4 * cs);
  bytes.set(bytes.slice(cs, 2 * cs), 3 * cs);
  bytes.set(l1, cs);
  header.l1TableOffset = cs;
  header.refcountTableOffset = 3 * cs;
  bytes.set(encodeQcow2Header(header), 0);
  assertNoCorruption(await checkQcow2(new MemoryFile({ name: "overlay.qcow2", contents: bytes, readOnly: true })), "the swapped layout");
  const durable = await crashAtEveryWrite({ ...chain, overlay: bytes }, "L1 at cluster 1", 4, random.next);
  assert.equal(decodeQcow2Header(durable.subarray(0, cs)).l1TableOffset, cs, "the slow path keeps the L1 where it is");
  await chain.backing.close();
});

test("makeEmpty keeps the cluster-by-cluster path for v2, for images with snapshots and for wipe", async () => {
  const seed = testSeed();
  console.log(`seed ${seed}`);
  const cases: { name: string; options: Partial<Qcow2CreateOptions>; snapshot?: boolean; wipe?: boolean }[] = [
    { name: "v2", options: { compat: "0.10" } },
    { name: "snapshot", options: {}, snapshot: true },
    { name: "wipe", options: {}, wipe: true },
  ];
  for (const { name, options, snapshot, wipe } of cases) {
    const chain = await buildChain(seed, options);
    let file = new MemoryFile({ name: "overlay.qcow2", contents: chain.overlay });
    let snapshotContent: Uint8Array | null = null;
    if (snapshot === true) {
      const image = await openQcow2(file, { readOnly: false, backing: chain.backing, closeBacking: false });
      await createSnapshot(image, "kept");
      await image.close();
      file = new MemoryFile({ name: "overlay.qcow2", contents: file.contents() });
      snapshotContent = chain.expected;
    }
    const before = decodeQcow2Header(file.contents().subarray(0, 4 * KiB));
    await emptyOverlay(chain, file, { wipe });
    const contents = file.contents();
    const after = decodeQcow2Header(contents.subarray(0, 4 * KiB));
    assert.equal(after.refcountTableOffset, before.refcountTableOffset, `${name}: the refcount table stays (slow path)`);
    assert.equal(after.l1TableOffset, before.l1TableOffset, `${name}: the L1 stays (slow path)`);
    const result = await checkQcow2(new MemoryFile({ name: "overlay.qcow2", contents, readOnly: true }));
    assertNoCorruption(result, name);
    assert.equal(result.leaks, 0, `${name}: no leaks`);
    if (snapshotContent !== null) {
      const image = await openQcow2(new MemoryFile({ name: "overlay.qcow2", contents, readOnly: true }), { readOnly: true, backing: chain.backing, closeBacking: false });
      const view = await openSnapshotView(image, "kept");
      const actual = new Uint8Array(SIZE_BYTES);
      await view.read(0, actual);
      assert.equal(Buffer.compare(actual, snapshotContent), 0, "the snapshot keeps its data");
      await view.close();
      await image.close();
    }
    await chain.backing.close();
  }
});

test("makeEmpty (fast path) with reads in flight: every read returns the disk's content", async () => {
  const seed = testSeed();
  console.log(`seed ${seed}`);
  const random = createRandom(seed);
  const chain = await buildChain(random.int(2 ** 31));
  // Reads finish a few event-loop turns after they start, as a pread on the thread pool does: the fast
  // path's rewrite and truncation happen while they are in flight unless makeEmpty waits for them.
  class SlowReadFile extends MemoryFile {
    override async read(hostOffset: number, buffer: Uint8Array): Promise<number> {
      for (let turn = 0; turn < 64; turn++) await new Promise((resolve) => setImmediate(resolve));
      return super.read(hostOffset, buffer);
    }
  }
  const image = await openQcow2(new SlowReadFile({ name: "overlay.qcow2", contents: chain.overlay }), { readOnly: false, backing: chain.backing, closeBacking: false });
  const reads: Promise<void>[] = [];
  const check = async (guestOffset: number, lengthBytes: number): Promise<void> => {
    const actual = new Uint8Array(lengthBytes);
    await image.read(guestOffset, actual);
    assert.equal(Buffer.compare(actual, chain.expected.subarray(guestOffset, guestOffset + lengthBytes)), 0, `read of ${lengthBytes} at ${guestOffset}`);
  };
  // Reads of the clusters the overlay holds, before and after makeEmpty starts.
  const held = (await image.layerStatus(0, SIZE_BYTES)).filter((extent) => extent.kind === "data");
  assert.ok(held.length > 0, "the overlay holds data");
  const readHeld = (): void => {
    for (const extent of held) reads.push(check(extent.guestOffset, extent.lengthBytes));
  };
  readHeld();
  const emptied = image.makeEmpty();
  readHeld();
  await Promise.all([emptied, ...reads]);
  assert.deepEqual((await image.layerStatus(0, SIZE_BYTES)).filter((extent) => extent.kind !== "unallocated"), [], "emptied");
  await image.close();
  await chain.backing.close();
});
