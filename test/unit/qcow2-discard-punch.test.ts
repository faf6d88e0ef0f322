/**
 * Discard passthrough in the qcow2 engine (Qcow2Metadata.discardFreedClusters):
 * clusters a guest discard or an unmapping zero write frees are punched
 * (MemoryFile reads a discarded range back as zeroes) at the next flush, or
 * at once when more than DISCARDS_PENDING_MAX are waiting; clusters an
 * internal snapshot still holds are not freed and keep their bytes.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createQcow2 } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2 } from "../../src/formats/qcow2/qcow2-image.ts";
import { createSnapshot } from "../../src/formats/qcow2/internal-snapshots.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

/** How many 512-byte sectors of the file hold `marker` as their first bytes. */
function sectorsMarked(file: MemoryFile, marker: number): number {
  const bytes = file.contents();
  let count = 0;
  for (let at = 0; at + 512 <= bytes.length; at += 512) if (bytes[at] === marker && bytes[at + 511] === marker) count++;
  return count;
}

test("guest discards punch the clusters they free at the next flush; clusters a snapshot holds stay", async () => {
  const file = new MemoryFile({ name: "d.qcow2" });
  await createQcow2(file, { sizeBytes: 8 * MiB, clusterSizeBytes: 4 * KiB });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await image.write(0, new Uint8Array(1 * MiB).fill(0xa1));
  await createSnapshot(image, "holds-the-first-MiB");
  await image.write(2 * MiB, new Uint8Array(1 * MiB).fill(0xb2));
  await image.write(4 * MiB, new Uint8Array(1 * MiB).fill(0xc3));
  await image.flush();
  await image.discard(0, 1 * MiB);
  await image.discard(2 * MiB, 1 * MiB);
  await image.writeZeroes(4 * MiB, 512 * KiB, { unmap: true });
  await image.writeZeroes(4 * MiB + 512 * KiB, 512 * KiB);
  assert.equal(sectorsMarked(file, 0xb2), 2048, "nothing is punched before the flush");
  await image.flush();
  assert.equal(sectorsMarked(file, 0xa1), 2048, "the snapshot's clusters keep their bytes");
  assert.equal(sectorsMarked(file, 0xb2), 0, "the discarded clusters are punched");
  // Unmapping zeroes free and punch their clusters; zeroes without unmap keep theirs allocated (zero flag), as QEMU.
  assert.equal(sectorsMarked(file, 0xc3), 1024, "the half zeroed without unmap keeps its clusters");
  await image.close();
});

test("a guest that discards many clusters without flushing gets them punched at once (bounded bookkeeping)", async () => {
  const file = new MemoryFile({ name: "many.qcow2" });
  await createQcow2(file, { sizeBytes: 40 * MiB, clusterSizeBytes: 512 });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await image.write(0, new Uint8Array(33 * MiB).fill(0xd4)); // 67,584 clusters of 512 bytes: past DISCARDS_PENDING_MAX
  await image.flush();
  await image.discard(0, 33 * MiB);
  assert.equal(sectorsMarked(file, 0xd4), 0, "punched without a flush");
  await image.close();
});

test("overlapping freeing operations leave discard passthrough off afterwards, whatever order they end in", async () => {
  const file = new MemoryFile({ name: "o.qcow2" });
  await createQcow2(file, { sizeBytes: 8 * MiB, clusterSizeBytes: 4 * KiB });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  const meta = image.metadata;
  // B (a guest discard holding the lock) starts first, A (a snapshot apply waiting for it) second; B ends first.
  let releaseB!: () => void;
  const bGate = new Promise<void>((resolve) => (releaseB = resolve));
  const b = meta.whileFreeing({}, () => bGate);
  const a = meta.whileFreeing({ wipe: true }, async () => {
    releaseB();
    await b;
    assert.equal(meta.discardFreedClusters, true, "A still frees");
  });
  await a;
  assert.equal(meta.discardFreedClusters, false);
  await image.close();
});
