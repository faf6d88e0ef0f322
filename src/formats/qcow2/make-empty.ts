/**
 * Emptying a whole qcow2 layer at once, as QEMU's make_completely_empty
 * (block/qcow2.c, qcow2_make_empty's fast path: what `qemu-img commit`
 * leaves in the overlay).
 *
 * Design notes
 * - Instead of discarding cluster by cluster, the image is rebuilt from
 *   scratch around its header: refcount table in cluster 1, its one
 *   refcount block in cluster 2, the (zeroed) L1 table from cluster 3, the
 *   file cut after it. The header cluster (backing name and format, feature
 *   table, unknown extensions) is kept as it is; only l1_table_offset,
 *   refcount_table_offset and refcount_table_clusters change. The L1 keeps
 *   its size. The result has QEMU's layout and size byte for byte.
 * - When (canEmptyCompletely, qcow2_make_empty's conditions): version 3
 *   (the dirty bit is needed), no internal snapshots, no persistent bitmaps,
 *   no encryption, no external data file (every one of them holds clusters
 *   that must survive), and the header, refcount table, refcount block and
 *   L1 fit under one refcount block. Otherwise the caller discards cluster
 *   by cluster (Qcow2Image.makeEmpty's slow path), as QEMU does. Wipe after
 *   delete also takes the slow path: it zeroes every freed cluster before
 *   releasing it, whatever the file (a block device cannot be cut).
 * - Steps, in QEMU's order: dirty metadata written (qcow2_cache_empty) and
 *   both caches emptied; the image marked dirty (a crash from here on
 *   leaves refcounts that the next read-write open rebuilds, as QEMU's
 *   check -r all on a dirty image); the old L1 zeroed on disk; clusters 1
 *   to 2 + L1 clusters written; the header pointed at the new L1 and
 *   refcount table (one 20-byte write in sector 0); the image marked
 *   clean; the file truncated. Where QEMU zeroes clusters 1.. and then
 *   fills in the table entry (a synced write) and the refcount block (an
 *   allocation at offset 0, written by the flush of mark_clean), the final
 *   bytes of those clusters go out in one write: the same bytes, with 4
 *   flushes instead of 6-7 (each one costs a few to 20 ms of wall time on
 *   a loaded disk, most of what this takes).
 * - Crash safety: the data was already committed below, so a guest cluster
 *   reads the same whether this layer still maps it or falls through: any
 *   mix of old and empty L1 entries is fine, as long as no entry leads to
 *   bytes that were overwritten. Hence: the zeroed old L1 is flushed
 *   before clusters 1.. are written if they may hold old L2 tables or data
 *   (not when they hold only old refcount structures and the old L1, as
 *   in any overlay qemu-img or snapstack created), a flush QEMU does not
 *   do; and the new clusters are flushed before the header points at them
 *   (else the new L1 could show old bytes of cluster 3.. as L2 pointers).
 */
import { assert } from "../../base/errors.ts";
import { writeZeroBytes } from "../../io/file.ts";
import { L1_ENTRY_BYTES } from "./entries.ts";
import { CRYPT_NONE, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY } from "./header.ts";
import type { Qcow2Metadata } from "./metadata.ts";
import { REFTABLE_ENTRY_BYTES, setRefcount } from "./refcount-block.ts";

/** Header fields rewritten together: l1_table_offset (u64), refcount_table_offset (u64), refcount_table_clusters (u32). */
const HEADER_L1_OFFSET_FIELD_AT = 40;

function l1Clusters(meta: Qcow2Metadata): number {
  return Math.ceil((meta.header.l1Size * L1_ENTRY_BYTES) / meta.clusterSizeBytes);
}

/** qcow2_make_empty's conditions for make_completely_empty, and an old L1 outside clusters 1-2. */
export function canEmptyCompletely(meta: Qcow2Metadata, snapshotCount: number): boolean {
  const header = meta.header;
  return (
    header.version === 3 &&
    snapshotCount === 0 &&
    header.snapshotCount === 0 &&
    header.extensions.bitmaps === null &&
    header.cryptMethod === CRYPT_NONE &&
    (header.incompatibleFeatures & INCOMPAT_DATA_FILE) === 0n &&
    header.extensions.dataFileName === null &&
    3 + l1Clusters(meta) <= meta.geometry.refcountBlockEntries &&
    // Not QEMU's: clusters 1 and 2 get their final bytes before the header
    // switch (see the design notes), which is safe only if the old header's
    // L1 is not there (old QEMU put it at cluster 1; a grown L1 can land
    // there by first fit). Such images take the slow path.
    meta.header.l1TableOffset >= 3 * meta.clusterSizeBytes
  );
}

async function writeDirtyBit(meta: Qcow2Metadata, dirty: boolean): Promise<void> {
  if (dirty) meta.header.incompatibleFeatures |= INCOMPAT_DIRTY;
  else meta.header.incompatibleFeatures &= ~INCOMPAT_DIRTY;
  await meta.writeIncompatibleFeatures();
}

/**
 * Whether a crash could let the old L1 reach clusters [1, endCluster):
 * false when each is old refcount or L1 metadata (or past the end of the
 * file), never an L2 table or data the old L1 leads to. Overlays made by
 * qemu-img or snapstack have their refcount table, refcount block and L1
 * there: zeroing them needs no flush of the old L1's zeroes first.
 */
async function oldL1MayReach(meta: Qcow2Metadata, endCluster: number): Promise<boolean> {
  const cs = meta.clusterSizeBytes;
  const header = meta.header;
  const fileClusters = Math.ceil((await meta.file.sizeBytes()) / cs);
  const refblocks = new Set(meta.reftable.filter((offset) => offset !== 0).map((offset) => offset / cs));
  const inRange = (cluster: number, offset: number, clusters: number): boolean => cluster >= offset / cs && cluster < offset / cs + clusters;
  for (let cluster = 1; cluster < Math.min(endCluster, fileClusters); cluster++) {
    if (inRange(cluster, header.refcountTableOffset, header.refcountTableClusters) || inRange(cluster, header.l1TableOffset, l1Clusters(meta)) || refblocks.has(cluster)) continue;
    return true;
  }
  return false;
}

/** Clusters 1 to 2 + L1 clusters of the emptied image: refcount table, its one refcount block, the zero L1. */
function encodeEmptyMetadata(meta: Qcow2Metadata, l1ClusterCount: number): Uint8Array {
  const cs = meta.clusterSizeBytes;
  const bytes = new Uint8Array((2 + l1ClusterCount) * cs);
  new DataView(bytes.buffer).setBigUint64(0, BigInt(2 * cs));
  const refblock = bytes.subarray(cs, 2 * cs);
  for (let cluster = 0; cluster < 3 + l1ClusterCount; cluster++) setRefcount(refblock, cluster, meta.geometry.refcountOrder, 1);
  return bytes;
}

/**
 * make_completely_empty: every guest cluster unallocated, the file cut to
 * 3 + L1 clusters. Call under the metadata mutex, with no guest write in
 * flight, when canEmptyCompletely holds; drainReads resolves once the reads
 * in flight have finished (called once no new read can reach old clusters).
 */
export async function emptyCompletely(meta: Qcow2Metadata, drainReads: () => Promise<void>): Promise<void> {
  assert(canEmptyCompletely(meta, 0), "make_completely_empty's conditions hold");
  const cs = meta.clusterSizeBytes;
  const l1ClusterCount = l1Clusters(meta);

  await meta.completeFreeing();
  meta.l2Cache.clear();
  meta.refblockCache.clear();

  await writeDirtyBit(meta, true);

  await writeZeroBytes(meta.file, meta.header.l1TableOffset, l1ClusterCount * cs);
  meta.l1.fill(0);
  // Reads that resolved host offsets through the old L1 finish before those clusters are rewritten or cut.
  await drainReads();
  meta.l2Cache.clear(); // what those reads loaded meanwhile
  if (await oldL1MayReach(meta, 3 + l1ClusterCount)) await meta.file.flush();

  await meta.file.write(cs, encodeEmptyMetadata(meta, l1ClusterCount));
  await meta.file.flush();

  const fields = new Uint8Array(20);
  const view = new DataView(fields.buffer);
  view.setBigUint64(0, BigInt(3 * cs));
  view.setBigUint64(8, BigInt(cs));
  view.setUint32(16, 1);
  await meta.writeHeaderBytes(HEADER_L1_OFFSET_FIELD_AT, fields);
  meta.header.l1TableOffset = 3 * cs;
  meta.header.refcountTableOffset = cs;
  meta.header.refcountTableClusters = 1;
  meta.reftable = new Array<number>(cs / REFTABLE_ENTRY_BYTES).fill(0);
  meta.reftable[0] = 2 * cs;
  meta.overlap.invalidate();
  meta.freeClusterIndex = 3 + l1ClusterCount;
  meta.freeByteOffset = 0;

  await writeDirtyBit(meta, false);
  meta.lazyRefcounts = false;

  await meta.file.truncate((3 + l1ClusterCount) * cs);
}
