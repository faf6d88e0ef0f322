/**
 * The cluster allocator's first fit (QEMU's free_cluster_index scan), with
 * the bulk skip over used clusters of 16-bit refcount blocks: holes of one
 * and two clusters are found where they are, a zero byte pair that is not
 * one aligned refcount (256 followed by 1: bytes 01 00 00 01) is not taken
 * for a free cluster, and other refcount widths take the plain path.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { createQcow2 } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2, type Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";

const MiB = 1024 * 1024;

async function fresh(refcountBits: number): Promise<{ file: MemoryFile; image: Qcow2Image }> {
  const file = new MemoryFile({ name: "alloc.qcow2" });
  await createQcow2(file, { sizeBytes: 64 * MiB, refcountBits });
  return { file, image: await openQcow2(file, { readOnly: false, backing: null }) };
}

for (const refcountBits of [16, 8, 32]) {
  test(`first fit finds the lowest free clusters (refcount_bits=${refcountBits})`, async () => {
    const { file, image } = await fresh(refcountBits);
    const highRefcount = Math.min(256, 2 ** refcountBits - 1);
    const meta = image.metadata;
    const cs = meta.clusterSizeBytes;
    const first = await meta.allocClusters(cs);
    const offsets = [first];
    for (let i = 1; i < 40; i++) offsets.push(await meta.allocClusters(cs));
    assert.deepEqual(offsets, offsets.map((_, i) => first + i * cs), "consecutive clusters");
    // Holes: one cluster at 5, two at 11-12, one at 30; cluster 20 gets refcount 256 (255 at 8 bits), 21 keeps 1.
    await meta.freeClusters(offsets[5], cs);
    await meta.freeClusters(offsets[11], 2 * cs);
    for (let i = 1; i < highRefcount; i++) await meta.increaseRefcounts(offsets[20], cs);
    await meta.freeClusters(offsets[30], cs);
    assert.equal(await meta.getRefcount(offsets[20] / cs), highRefcount);
    // A fresh open starts the scan from cluster 0, as after a process start.
    await image.close();
    const reopened = await openQcow2(new MemoryFile({ name: "alloc.qcow2", contents: file.contents() }), { readOnly: false, backing: null });
    const again = reopened.metadata;
    assert.equal(await again.allocClusters(2 * cs), offsets[11], "the two-cluster hole (the one-cluster hole is too small)");
    // As QEMU's free_cluster_index, the scan goes on from there: the hole at 5 waits for a free below it.
    assert.equal(await again.allocClusters(cs), offsets[30], "past the refcount 256 / 1 pair");
    assert.equal(await again.allocClusters(cs), offsets[39] + cs, "then the end");
    await reopened.close();
  });
}
