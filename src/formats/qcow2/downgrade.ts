/**
 * `amend -o compat=0.10`: a version 3 image becomes version 2 (QEMU 7.2's
 * qcow2_downgrade in block/qcow2.c and qcow2_expand_zero_clusters in
 * block/qcow2-cluster.c).
 *
 * Design notes
 * - Version 2 has no zero flag in L2 entries, so every zero cluster goes
 *   first, in every L2 table an L1 table reaches (the active one, then each
 *   snapshot's), each table once (QEMU walks a shared table once per L1
 *   table; its second walk finds nothing left to do):
 *   - zero-plain without a backing file: the entry becomes unallocated,
 *     which reads as zeroes too;
 *   - zero-plain over a backing file: a new cluster, zeroed, whose refcount
 *     is the table's (a table that N L1 tables reach gives its clusters
 *     refcount N), COPIED when that is 1;
 *   - zero-alloc: its cluster is zeroed and the flag dropped, COPIED set
 *     when the table's refcount is 1, as QEMU does, but in a table the
 *     active L1 reaches only if the cluster's refcount is 1 too (else two
 *     tables mapping it zero-alloc leave COPIED on a cluster of refcount 2,
 *     which check reports; in snapshot tables COPIED is stale anyway, and
 *     kept as QEMU leaves it, so the file stays QEMU's). QEMU zeroes it
 *     in place even when another table maps the same cluster as data (a
 *     write of zeroes without unmap after a snapshot leaves exactly that:
 *     QEMU 7.2's downgrade then overwrites the snapshot's data). Here such a
 *     cluster is left to the tables that map it as data, and the entry gets
 *     a cluster of its own (or none, without a backing file). Finding them
 *     costs a walk over every table, done only when a zero-alloc entry
 *     exists, and keeps only the zero-alloc clusters in memory.
 * - Order, so that an interruption leaves a valid version 3 image with at
 *   worst leaked clusters: new clusters allocated (refcounts in the cache)
 *   and zeroed; then, at the cache write-back, the zeroes flushed, the
 *   refcount blocks, then the L2 tables, then the lowered refcounts of
 *   clusters an entry left (Qcow2Metadata keeps these dependencies); the
 *   header switch to version 2 last, written torn-safe.
 * - Refused before anything changes (`downgradeRefusal`), with qemu-img's
 *   messages: refcount widths other than 16 bits, an external data file,
 *   snapshots whose disk size is not the image's or whose VM state exceeds
 *   4 GiB, incompatible features other than dirty and compression (extended
 *   L2), zstd with compressed clusters (QEMU looks only at the active
 *   state; here every state counts: zlib is all version 2 knows). Also
 *   refused here: persistent dirty bitmaps (QEMU downgrades and leaves them
 *   behind, unusable and leaked).
 * - Compatible and autoclear features are cleared, lazy refcounts with
 *   them; a dirty image is written back and marked clean first.
 */
import { writeZeroBytes } from "../../io/file.ts";
import {
  COMPRESSION_TYPE_ZLIB,
  COMPRESSION_TYPE_ZSTD,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
} from "./header.ts";
import { L1_ENTRY_BYTES, encodeL2Entry, getL1EntryOffset, getL2Entry, setL2EntryWords } from "./entries.ts";
import type { Qcow2Metadata } from "./metadata.ts";
import { markDirty, type CachedTable } from "./table-cache.ts";
import type { Qcow2Snapshot } from "./snapshot-table.ts";

/** What downgradeRefusal needs of the image (Qcow2Image provides it). */
export interface DowngradeSubject {
  readonly metadata: Qcow2Metadata;
  readonly snapshots: readonly Qcow2Snapshot[];
  readonly bitmapCount: number;
}

/** VM state sizes above this need version 3's 64-bit field. */
const VM_STATE_V2_BYTES_MAX = 0xffffffff;

/**
 * Why the image cannot become version 2 once the other changes of the same
 * amend are made (`after`: its refcount width and guest size then), or null.
 */
export async function downgradeRefusal(image: DowngradeSubject, after: { refcountBits: number; sizeBytes: number }): Promise<string | null> {
  const header = image.metadata.header;
  if (after.refcountBits !== 16) return "compat=0.10 requires refcount_bits=16";
  if ((header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n) return "Cannot downgrade an image with a data file";
  if (image.snapshots.some((snapshot) => snapshot.vmStateSizeBytes > VM_STATE_V2_BYTES_MAX || snapshot.diskSizeBytes !== after.sizeBytes)) {
    return "Internal snapshots prevent downgrade of image";
  }
  const blocking = header.incompatibleFeatures & ~(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION);
  if (blocking !== 0n) return `Cannot downgrade an image with incompatible features 0x${blocking.toString(16)} set`;
  if (image.bitmapCount > 0) return "Cannot downgrade an image with persistent dirty bitmaps (remove them first with 'bitmap --remove')";
  if (header.compressionType === COMPRESSION_TYPE_ZSTD) {
    const meta = image.metadata;
    let compressed = false;
    await forEachL2Table(
      meta,
      image.snapshots,
      async (table) => {
        for (let index = 0; index < meta.geometry.l2Entries && !compressed; index++) compressed = entryAt(meta, table, index).type === "compressed";
      },
      () => compressed,
    );
    if (compressed) return "Cannot downgrade an image with zstd compression type and existing compressed clusters";
  }
  return null;
}

/**
 * Expand the zero clusters and switch the header to version 2. The caller
 * checked downgradeRefusal and holds the image exclusively.
 */
export async function downgradeToVersion2(meta: Qcow2Metadata, snapshots: readonly Qcow2Snapshot[], hasBacking: boolean): Promise<void> {
  const header = meta.header;
  if (header.version !== 3) return;
  if ((header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n) {
    // qcow2_mark_clean: the refcounts in the cache are complete; once on disk the image is clean.
    await meta.writeCaches();
    await meta.file.flush();
    header.incompatibleFeatures &= ~INCOMPAT_DIRTY;
    await meta.writeIncompatibleFeatures();
  }
  header.compatibleFeatures = 0n;
  meta.lazyRefcounts = false;
  const mappedAsData = await zeroAllocClustersMappedAsData(meta, snapshots);
  const leftBehind = new Set<number>();
  await forEachL2Table(meta, snapshots, (table, active) => expandZeroEntries(meta, table, active, hasBacking, mappedAsData, leftBehind));
  await meta.writeCaches();
  await meta.file.flush();
  if (leftBehind.size > 0) {
    // A cluster left behind may now have refcount 1: the active entry that maps it gets COPIED, once
    // the lowered refcount is on disk (the write-back above), as QEMU's COPIED rule asks.
    await forEachL2Table(meta, [], (table) => setCopiedWhereExclusive(meta, table, leftBehind));
    await meta.writeCaches();
    await meta.file.flush();
  }
  header.autoclearFeatures = 0n;
  header.incompatibleFeatures &= ~INCOMPAT_COMPRESSION;
  header.compressionType = COMPRESSION_TYPE_ZLIB;
  header.version = 2;
  await meta.writeHeaderTornSafe();
}

function entryAt(meta: Qcow2Metadata, table: CachedTable, index: number): ReturnType<typeof getL2Entry> {
  return getL2Entry(table.view, index, meta.geometry.extendedL2, meta.geometry.clusterBits);
}

/**
 * Call `visit` once for every L2 table the active L1 table or a snapshot's
 * reaches (`active`: the active one does), the table held in the cache
 * (eviction held off) meanwhile; stops once `done` says so.
 */
async function forEachL2Table(
  meta: Qcow2Metadata,
  snapshots: readonly Qcow2Snapshot[],
  visit: (table: CachedTable, active: boolean) => Promise<void>,
  done: () => boolean = () => false,
): Promise<void> {
  const seen = new Set<number>();
  const l1Tables: { l1: Uint8Array; entries: number }[] = [{ l1: meta.l1, entries: meta.header.l1Size }];
  for (const snapshot of snapshots) {
    const l1 = new Uint8Array(snapshot.l1Size * L1_ENTRY_BYTES);
    if (l1.length > 0) await meta.file.read(snapshot.l1TableOffset, l1);
    l1Tables.push({ l1, entries: snapshot.l1Size });
  }
  for (const [tableIndex, { l1, entries }] of l1Tables.entries()) {
    const view = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let l1Index = 0; l1Index < entries; l1Index++) {
      if (done()) return;
      const l2Offset = getL1EntryOffset(view, l1Index);
      if (l2Offset === 0 || seen.has(l2Offset)) continue;
      seen.add(l2Offset);
      const release = meta.holdEviction();
      try {
        await visit(await meta.getL2(l2Offset), tableIndex === 0);
      } finally {
        release();
      }
      await meta.trimCaches();
    }
  }
}

/** In an active table of refcount 1: COPIED on the normal entries mapping a cluster of `clusters` whose refcount is now 1. */
async function setCopiedWhereExclusive(meta: Qcow2Metadata, table: CachedTable, clusters: ReadonlySet<number>): Promise<void> {
  const { clusterBits, clusterSizeBytes, l2EntryBytes } = meta.geometry;
  if ((await meta.getRefcount(table.hostOffset / clusterSizeBytes)) !== 1) return;
  for (let index = 0; index < meta.geometry.l2Entries; index++) {
    const entry = entryAt(meta, table, index);
    if (entry.type !== "normal" || entry.copied || !clusters.has(entry.hostOffset)) continue;
    if ((await meta.getRefcount(entry.hostOffset / clusterSizeBytes)) !== 1) continue;
    setL2EntryWords(table.view, index, false, encodeL2Entry({ type: "normal", hostOffset: entry.hostOffset, copied: true }, clusterBits));
    markDirty(table, index * l2EntryBytes, l2EntryBytes);
  }
}

/** The host clusters of zero-alloc entries that another entry maps as data (normal). */
async function zeroAllocClustersMappedAsData(meta: Qcow2Metadata, snapshots: readonly Qcow2Snapshot[]): Promise<Set<number>> {
  const zeroAlloc = new Set<number>();
  const mappedAsData = new Set<number>();
  const collect = (type: "zero-alloc" | "normal", into: Set<number>, only: Set<number> | null) => async (table: CachedTable) => {
    for (let index = 0; index < meta.geometry.l2Entries; index++) {
      const entry = entryAt(meta, table, index);
      if (entry.type === type && (only === null || only.has(entry.hostOffset))) into.add(entry.hostOffset);
    }
  };
  await forEachL2Table(meta, snapshots, collect("zero-alloc", zeroAlloc, null));
  if (zeroAlloc.size > 0) await forEachL2Table(meta, snapshots, collect("normal", mappedAsData, zeroAlloc));
  return mappedAsData;
}

/** qcow2's expand_zero_clusters_in_l1 for one table (see the notes at the top). */
async function expandZeroEntries(
  meta: Qcow2Metadata,
  table: CachedTable,
  active: boolean,
  hasBacking: boolean,
  mappedAsData: ReadonlySet<number>,
  leftBehind: Set<number>,
): Promise<void> {
  const { clusterBits, clusterSizeBytes, l2EntryBytes } = meta.geometry;
  const tableRefcount = await meta.getRefcount(table.hostOffset / clusterSizeBytes);
  for (let index = 0; index < meta.geometry.l2Entries; index++) {
    const entry = entryAt(meta, table, index);
    if (entry.type !== "zero-plain" && entry.type !== "zero-alloc") continue;
    let hostOffset = entry.type === "zero-alloc" ? entry.hostOffset : 0;
    let leftCluster = 0;
    if (hostOffset !== 0 && mappedAsData.has(hostOffset)) {
      // Another entry shows this cluster's data: it keeps it, this entry takes a cluster of its own.
      leftCluster = hostOffset;
      hostOffset = 0;
    }
    if (hostOffset === 0 && !hasBacking) {
      setL2EntryWords(table.view, index, false, encodeL2Entry({ type: "unallocated" }, clusterBits));
    } else {
      let copied = tableRefcount === 1;
      if (hostOffset === 0) {
        hostOffset = await meta.allocClusters(clusterSizeBytes);
        for (let count = 1; count < tableRefcount; count++) await meta.increaseRefcounts(hostOffset, clusterSizeBytes);
      } else if (copied && active) {
        copied = (await meta.getRefcount(hostOffset / clusterSizeBytes)) === 1;
      }
      meta.checkDataWrite(hostOffset, clusterSizeBytes);
      await writeZeroBytes(meta.file, hostOffset, clusterSizeBytes, "allocate");
      meta.noteDataWritten();
      setL2EntryWords(table.view, index, false, encodeL2Entry({ type: "normal", hostOffset, copied }, clusterBits));
    }
    markDirty(table, index * l2EntryBytes, l2EntryBytes);
    // After the table (the cache writes refcount decreases after the L2 tables that dropped them).
    for (let count = 0; count < tableRefcount && leftCluster !== 0; count++) await meta.freeClusters(leftCluster, clusterSizeBytes);
    if (leftCluster !== 0) leftBehind.add(leftCluster);
  }
}
