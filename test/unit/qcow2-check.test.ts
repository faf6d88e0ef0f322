/**
 * checkQcow2 / rebuildRefcounts on images built in memory with the codecs:
 * findings and counts on small known layouts, repairs, JSON shape, exit
 * classes, and hostile images (huge tables, tables pointing into the header
 * or at each other, random garbage) that must end quickly with a result or
 * a coded error, never a crash.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { isSnapstackError } from "../../src/base/errors.ts";
import { encodeQcow2Header, newQcow2Header, INCOMPAT_DIRTY } from "../../src/formats/qcow2/header.ts";
import { setRefcount, getRefcount } from "../../src/formats/qcow2/refcount-block.ts";
import { checkQcow2, qemuCheckExitCode, toQemuCheckJson } from "../../src/formats/qcow2/check.ts";
import { rebuildRefcounts } from "../../src/formats/qcow2/rebuild-refcounts.ts";
import { CHECK_MESSAGES_MAX } from "../../src/formats/qcow2/reference-counter.ts";
import { createRandom, testSeed } from "../helpers/random.ts";

const CLUSTER_BITS = 16;
const CS = 2 ** CLUSTER_BITS;
const COPIED = 1n << 63n;

/**
 * A v3 image of `virtualBytes` with 16-bit refcounts laid out like qemu-img:
 * 0 header, 1 refcount table, 2 refcount block, 3 L1, 4 L2, then one data
 * cluster per entry of `dataClusters` (guest cluster indexes, all under the
 * first L2 table). Every refcount is right and COPIED is set.
 */
function buildImage(options: { dataClusters?: number[]; virtualBytes?: number; version?: 2 | 3 } = {}): { bytes: Uint8Array; dataHostClusters: number[] } {
  const dataClusters = options.dataClusters ?? [0, 1, 5];
  const virtualBytes = options.virtualBytes ?? 64 * 1024 * 1024;
  const fileClusters = 5 + dataClusters.length;
  const bytes = new Uint8Array(fileClusters * CS);
  const view = new DataView(bytes.buffer);
  const header = newQcow2Header({
    version: options.version ?? 3,
    clusterBits: CLUSTER_BITS,
    sizeBytes: virtualBytes,
    l1Size: Math.ceil(virtualBytes / (CS * (CS / 8))),
    l1TableOffset: 3 * CS,
    refcountTableOffset: CS,
    refcountTableClusters: 1,
  });
  bytes.set(encodeQcow2Header(header));
  view.setBigUint64(CS, BigInt(2 * CS));
  const refblock = bytes.subarray(2 * CS, 3 * CS);
  for (let cluster = 0; cluster < fileClusters; cluster++) setRefcount(refblock, cluster, 4, 1);
  view.setBigUint64(3 * CS, BigInt(4 * CS) | COPIED);
  const dataHostClusters: number[] = [];
  dataClusters.forEach((guestCluster, i) => {
    const hostCluster = 5 + i;
    dataHostClusters.push(hostCluster);
    view.setBigUint64(4 * CS + guestCluster * 8, BigInt(hostCluster * CS) | COPIED);
    bytes.fill(0x40 + i, hostCluster * CS, (hostCluster + 1) * CS);
  });
  return { bytes, dataHostClusters };
}

function setStoredRefcount(bytes: Uint8Array, cluster: number, value: number): void {
  setRefcount(bytes.subarray(2 * CS, 3 * CS), cluster, 4, value);
}

function fileOf(bytes: Uint8Array, readOnly = false): MemoryFile {
  return new MemoryFile({ name: "test.qcow2", contents: bytes, readOnly });
}

test("a consistent image: no findings, QEMU's figures, JSON with only non-zero keys, exit 0", async () => {
  const { bytes } = buildImage();
  const result = await checkQcow2(fileOf(bytes, true));
  assert.deepEqual(result.messages, []);
  assert.equal(result.failure, null);
  assert.equal(result.corruptions + result.leaks + result.checkErrors, 0);
  assert.equal(result.totalClusters, 1024);
  assert.equal(result.allocatedClusters, 3);
  // Guest clusters 0, 1, 5 sit in host clusters 5, 6, 7: contiguous, so no fragmentation.
  assert.equal(result.fragmentedClusters, 0);
  assert.equal(result.imageEndOffset, 8 * CS);
  assert.equal(qemuCheckExitCode(result), 0);
  assert.deepEqual(toQemuCheckJson(result, "a.qcow2"), {
    filename: "a.qcow2",
    format: "qcow2",
    "check-errors": 0,
    "image-end-offset": 8 * CS,
    "total-clusters": 1024,
    "allocated-clusters": 3,
  });
});

test("a raised refcount is a leak plus a COPIED error; -r leaks fixes the leak and then the flag", async () => {
  const { bytes, dataHostClusters } = buildImage();
  setStoredRefcount(bytes, dataHostClusters[1], 2);
  const result = await checkQcow2(fileOf(bytes.slice(), true));
  assert.deepEqual(result.messages, [`Leaked cluster 6 refcount=2 reference=1`, `ERROR OFLAG_COPIED data cluster: l2_entry=8000000000060000 refcount=2`]);
  assert.equal(result.leaks, 1);
  assert.equal(result.corruptions, 1);
  assert.equal(qemuCheckExitCode(result), 2);

  const file = fileOf(bytes);
  const repaired = await checkQcow2(file, { repair: "leaks" });
  // The first pass fixes the leak; COPIED is only repaired under -r leaks when nothing else is wrong.
  assert.equal(repaired.leaksFixed, 1);
  assert.equal(repaired.corruptions, 0);
  assert.equal(qemuCheckExitCode(repaired), 0);
  const again = await checkQcow2(file);
  assert.equal(qemuCheckExitCode(again), 0);
});

test("an unreferenced cluster with refcount 1 inside the file is a leak; exit 3; repair frees it", async () => {
  const { bytes } = buildImage();
  const grown = new Uint8Array(bytes.length + 2 * CS);
  grown.set(bytes);
  setStoredRefcount(grown, 9, 1);
  const file = fileOf(grown);
  const result = await checkQcow2(file);
  assert.deepEqual(result.messages, ["Leaked cluster 9 refcount=1 reference=0"]);
  assert.equal(qemuCheckExitCode(result), 3);
  assert.equal(result.imageEndOffset, 10 * CS);
  const repaired = await checkQcow2(file, { repair: "leaks" });
  assert.equal(repaired.leaksFixed, 1);
  assert.equal(repaired.leaks, 0);
  assert.equal(repaired.imageEndOffset, 8 * CS);
  assert.deepEqual(repaired.messages, ["Leaked cluster 9 refcount=1 reference=0", "Repairing cluster 9 refcount=1 reference=0"]);
});

test("a refcount of 0 for a referenced cluster needs a rebuild: -r leaks fails, -r all rebuilds", async () => {
  const { bytes, dataHostClusters } = buildImage();
  setStoredRefcount(bytes, dataHostClusters[0], 0);
  const plain = await checkQcow2(fileOf(bytes.slice(), true));
  assert.equal(plain.corruptions, 2);
  assert.deepEqual(plain.messages, ["ERROR cluster 5 refcount=0 reference=1", "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0"]);

  const leaksOnly = await checkQcow2(fileOf(bytes.slice()), { repair: "leaks" });
  assert.equal(leaksOnly.failure, "Input/output error");
  assert.equal(qemuCheckExitCode(leaksOnly), 1);
  assert.equal(leaksOnly.messages.at(-1), "ERROR need to rebuild refcount structures");

  const file = fileOf(bytes.slice());
  const all = await checkQcow2(file, { repair: "all" });
  assert.equal(all.failure, null);
  assert.equal(all.corruptionsFixed, 1);
  assert.equal(qemuCheckExitCode(all), 0);
  assert.ok(all.messages.includes("Rebuilding refcount structure"));
  // The new structure went to free clusters past the old end, the old one was freed.
  const after = new Uint8Array(await file.sizeBytes());
  await file.read(0, after);
  const tableOffset = Number(new DataView(after.buffer).getBigUint64(48));
  assert.ok(tableOffset >= 8 * CS, `new refcount table at ${tableOffset}`);
  assert.equal(qemuCheckExitCode(await checkQcow2(file)), 0);
});

test("-r all fixes a missing COPIED flag and clears the dirty bit", async () => {
  const { bytes } = buildImage();
  const view = new DataView(bytes.buffer);
  view.setBigUint64(4 * CS + 8, view.getBigUint64(4 * CS + 8) & ~COPIED);
  view.setBigUint64(72, INCOMPAT_DIRTY);
  const file = fileOf(bytes);
  const result = await checkQcow2(file, { repair: "all" });
  assert.deepEqual(result.messages, ["Repairing OFLAG_COPIED data cluster: l2_entry=60000 refcount=1"]);
  assert.equal(result.corruptionsFixed, 1);
  const header = new Uint8Array(CS);
  await file.read(0, header);
  assert.equal(new DataView(header.buffer).getBigUint64(72), 0n);
  assert.equal(new DataView(header.buffer).getBigUint64(4 * 0 + 72), 0n);
});

test("repair needs a writable file", async () => {
  const { bytes } = buildImage();
  await assert.rejects(checkQcow2(fileOf(bytes, true), { repair: "leaks" }), (error: unknown) => isSnapstackError(error) && error.code === "E_READ_ONLY");
});

test("rebuildRefcounts writes a fresh structure that matches every reference and clears the dirty bit", async () => {
  const { bytes, dataHostClusters } = buildImage({ dataClusters: [0, 3, 7, 100] });
  // Dirty image with stale refcounts: every data refcount lost, one leak.
  for (const cluster of dataHostClusters) setStoredRefcount(bytes, cluster, 0);
  setStoredRefcount(bytes, 3, 5);
  new DataView(bytes.buffer).setBigUint64(72, INCOMPAT_DIRTY);
  const file = fileOf(bytes);
  const { header, messages } = await rebuildRefcounts(file);
  assert.equal(header.incompatibleFeatures & INCOMPAT_DIRTY, 0n);
  assert.equal(messages[0], "Rebuilding refcount structure");
  const check = await checkQcow2(file, {});
  assert.deepEqual(check.messages, []);
  assert.equal(qemuCheckExitCode(check), 0);
  // Data untouched.
  const data = new Uint8Array(CS);
  await file.read(dataHostClusters[3] * CS, data);
  assert.ok(data.every((byte) => byte === 0x43));
  // The new block counts itself and the table exactly once.
  const blockOffset = Number(await readU64(file, header.refcountTableOffset));
  const block = new Uint8Array(CS);
  await file.read(blockOffset, block);
  assert.equal(getRefcount(block, blockOffset / CS, 4), 1);
  assert.equal(getRefcount(block, header.refcountTableOffset / CS, 4), 1);
});

async function readU64(file: MemoryFile, hostOffset: number): Promise<bigint> {
  const bytes = new Uint8Array(8);
  await file.read(hostOffset, bytes);
  return new DataView(bytes.buffer).getBigUint64(0);
}

// ---------------------------------------------------------------------------
// Hostile images.

test("hostile header: huge L1 or refcount table sizes are refused at open with coded errors", async () => {
  for (const [at, value, code, message] of [
    [36, 0xffffffff, "E_TOO_LARGE", "Active L1 table too large"],
    [56, 0xffffffff, "E_TOO_LARGE", "Reference count table too large"],
    [36, 0, "E_CORRUPT_IMAGE", "L1 table is too small"],
  ] as const) {
    const { bytes } = buildImage();
    new DataView(bytes.buffer).setUint32(at, value);
    await assert.rejects(checkQcow2(fileOf(bytes, true)), (error: unknown) => isSnapstackError(error) && error.code === code && error.message === message);
  }
  const { bytes } = buildImage();
  new DataView(bytes.buffer).setBigUint64(40, 0x10000000000200n);
  await assert.rejects(checkQcow2(fileOf(bytes, true)), (error: unknown) => isSnapstackError(error) && error.message === "Active L1 table offset invalid");
});

test("hostile tables: L1 into the header, L2 entries pointing at the tables themselves and far past EOF", async () => {
  const { bytes } = buildImage({ virtualBytes: 2 * 1024 * 1024 * 1024 });
  const view = new DataView(bytes.buffer);
  // Second L1 entry: an "L2 table" at offset 0 (the header); L2 entries aimed at L1, L2, refcount table and 2^55.
  view.setBigUint64(3 * CS + 8, COPIED);
  view.setBigUint64(4 * CS + 16, BigInt(3 * CS) | COPIED);
  view.setBigUint64(4 * CS + 24, BigInt(4 * CS) | COPIED);
  view.setBigUint64(4 * CS + 32, BigInt(CS) | COPIED);
  view.setBigUint64(4 * CS + 40, (1n << 55n) | COPIED);
  view.setBigUint64(4 * CS + 48, (1n << 62n) | ((1n << 54n) - 1n));
  const result = await checkQcow2(fileOf(bytes, true));
  assert.equal(result.failure, null);
  assert.ok(result.corruptions > 5, `corruptions ${result.corruptions}`);
  assert.ok(result.messages.includes("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x80000000000000 size 0x10000"));
  // The header is referenced again by the bogus L2 table at offset 0.
  assert.ok(result.messages.some((line) => /^ERROR cluster 0 refcount=1 reference=[2-9]$/.test(line)));
  assert.equal(qemuCheckExitCode(result), 2);
});

test("hostile snapshot table: 65536 entries of garbage and an absurd count end quickly", async () => {
  const { bytes } = buildImage();
  const view = new DataView(bytes.buffer);
  // 65536 entries past EOF: all zero, so each lacks the extra data v3 requires.
  view.setUint32(60, 65536);
  view.setBigUint64(64, BigInt(16 * CS));
  const result = await checkQcow2(fileOf(bytes, true));
  assert.equal(result.failure, null);
  // One per entry, plus the table itself ending past EOF.
  assert.equal(result.corruptions, 65537);
  assert.equal(result.messages[65535], "ERROR snapshot table entry 65535 is incomplete");
  assert.match(result.messages[65536], /^ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x100000 size 0x280000$/);

  // Entries read from a data cluster (bytes 0x40): extra data 0x40404040 bytes is refused, as QEMU does.
  view.setBigUint64(64, BigInt(5 * CS));
  const garbage = await checkQcow2(fileOf(bytes, true));
  assert.equal(garbage.failure, "File too large");
  assert.equal(garbage.messages[0], "qemu-img: ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry 0");

  view.setUint32(60, 0xffffffff);
  const tooMany = await checkQcow2(fileOf(bytes, true));
  assert.equal(tooMany.failure, "File too large");
  assert.equal(qemuCheckExitCode(tooMany), 1);
  assert.equal(tooMany.messages[0], "qemu-img: ERROR snapshot table too large");
});

test("messages are bounded; an L1 whose entries all share one L2 table is counted, not crashed on", async () => {
  const { bytes } = buildImage({ virtualBytes: 1024 * 1024 * 1024 * 1024 });
  const view = new DataView(bytes.buffer);
  // 2048 L1 entries, all pointing at the same L2 table with three data clusters.
  const l1Entries = view.getUint32(36);
  for (let i = 0; i < l1Entries; i++) view.setBigUint64(3 * CS + 8 * i, BigInt(4 * CS) | COPIED);
  const result = await checkQcow2(fileOf(bytes, true));
  assert.equal(result.failure, null);
  assert.equal(result.allocatedClusters, 3 * l1Entries);
  assert.ok(result.messages.length <= CHECK_MESSAGES_MAX + 1);
  assert.match(result.messages.join("\n"), /ERROR cluster 4 refcount=1 reference=2048/);
});

test("random damage never crashes: every outcome is a result or a coded error", async (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  const { bytes: pristine } = buildImage({ dataClusters: [0, 1, 2, 9, 40] });
  for (let round = 0; round < 150; round++) {
    const bytes = pristine.slice();
    const pokes = 1 + random.int(8);
    for (let i = 0; i < pokes; i++) {
      // Aim at metadata most of the time: header fields, tables, L2 entries.
      const region = random.int(4);
      const base = region === 0 ? 0 : region === 1 ? CS + random.int(64) : region === 2 ? 2 * CS + random.int(64) : 3 * CS + random.int(2 * CS);
      const at = Math.min(bytes.length - 8, region === 0 ? random.int(120) : base);
      bytes.set(random.bytes(1 + random.int(8)), at);
    }
    const repair = [undefined, "leaks", "all"][random.int(3)] as undefined | "leaks" | "all";
    try {
      const result = await checkQcow2(fileOf(bytes), { repair });
      const code = qemuCheckExitCode(result);
      assert.ok([0, 1, 2, 3].includes(code));
      if (result.failure === null) assert.ok(Number.isSafeInteger(result.imageEndOffset));
    } catch (error) {
      assert.ok(isSnapstackError(error), `round ${round} (seed ${seed}): ${String(error)}`);
      assert.notEqual(error.code, "E_INTERNAL", `round ${round} (seed ${seed}): ${error.message}`);
    }
  }
});
