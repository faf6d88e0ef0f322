/**
 * Rebuild the refcount structure from the metadata walk (QEMU's
 * rebuild_refcount_structure in block/qcow2-refcount.c), for `check -r all`
 * and for opening a dirty (lazy-refcounts) image read-write.
 *
 * Design notes
 * - Input: the reference counts from `calculateRefcounts`, which include
 *   the OLD refcount table and blocks. So every cluster this code allocates
 *   is referenced by nothing, and the old structure stays intact until the
 *   header switch: a crash before the switch leaves the old structure in
 *   charge, a crash after it leaves only leaks.
 * - Layout (as QEMU): scan the counts; for each refcount block range with a
 *   non-zero count, allocate the block first-fit from the start of its own
 *   range (so blocks tend to describe themselves), write the block as the
 *   slice of the counts; then allocate the table first-fit from cluster 0,
 *   rewrite the blocks covering it, and repeat while the table had to grow.
 *   The loop ends because each table cluster describes far more clusters
 *   than it occupies.
 * - Switch: write the table, then header bytes 48..59 (table offset and
 *   cluster count) in one synchronous write.
 * - Afterwards the old table and blocks are leaks; `rebuildRefcounts`
 *   frees them by walking again and fixing leaks (compare with FIX_LEAKS),
 *   as QEMU's check does after a rebuild.
 * - Not done: shrinking the file; QEMU does not either.
 * - `rewriteSnapshotTable` (QEMU's qcow2_check_fix_snapshot_table, for
 *   `-r all`) needs clusters once the refcounts are sound: first fit among
 *   clusters nothing references and no refcount claims, refcounts raised
 *   and flushed first (or, where no refcount block covers the place, a
 *   full rebuild that counts the new table), then the table written and
 *   flushed, then header bytes 60..71 in one synchronous write, and only
 *   then the old table freed (a walk and a leak repair). A crash leaves at
 *   most leaks.
 */
import { SnapstackError } from "../../base/errors.ts";
import type { ImageFile } from "../../io/file.ts";
import { INCOMPAT_DIRTY, decodeQcow2Header } from "./header.ts";
import type { Qcow2Header } from "./header.ts";
import { REFTABLE_ENTRY_BYTES, getRefcount, refcountMax, refcountsPerBlock, setRefcount } from "./refcount-block.ts";
import {
  CHECK_CLUSTERS_MAX,
  CheckFailure,
  CheckReport,
  ClusterCounts,
  FIX_ERRORS,
  FIX_LEAKS,
  QEMU_IMG_PREFIX,
  STRERROR,
  StoredRefcounts,
  calculateRefcounts,
  checkOflagCopied,
  clustersForBytes,
  compareRefcounts,
  encodeCheckedSnapshotTable,
  guardWrite,
  openCheckState,
  readSnapshotTable,
  writeIncompatibleFeatures,
} from "./reference-counter.ts";
import type { Qcow2CheckState } from "./reference-counter.ts";

/** A failed rebuild: QEMU counts a check error and reports the cause. */
function rebuildFailed(report: CheckReport, what: string, strerror: string): never {
  report.checkErrors++;
  report.say(`${QEMU_IMG_PREFIX}${what}: ${strerror}`);
  throw new CheckFailure(strerror);
}

/**
 * alloc_clusters_imrt: first fit of `clusterCount` free clusters at or after
 * `cursor.firstFreeCluster`, growing the counts past the end if needed; the
 * clusters get count 1. Returns the host offset.
 */
function allocateClusters(state: Qcow2CheckState, counts: ClusterCounts, clusterCount: number, cursor: { firstFreeCluster: number }): number {
  let cluster = cursor.firstFreeCluster;
  let contiguous = 0;
  let firstGap = true;
  for (; cluster < counts.size && contiguous < clusterCount; cluster++) {
    if (counts.get(cluster) === 0) {
      contiguous++;
      if (firstGap) {
        cursor.firstFreeCluster = cluster;
        firstGap = false;
      }
    } else if (contiguous > 0) {
      contiguous = 0;
    }
  }
  if (contiguous < clusterCount && !counts.grow(cluster + clusterCount - contiguous)) throw new CheckFailure(STRERROR.ENOMEM);
  cluster -= contiguous;
  for (let i = 0; i < clusterCount; i++) counts.set(cluster + i, 1);
  return cluster * state.clusterSizeBytes;
}

/** One refcount block holding counts[firstCluster .. + entries). */
function encodeRefblock(state: Qcow2CheckState, counts: ClusterCounts, firstCluster: number): Uint8Array {
  const block = new Uint8Array(state.clusterSizeBytes);
  const end = Math.min(counts.size, firstCluster + state.refcountBlockEntries);
  for (let cluster = firstCluster; cluster < end; cluster++) {
    const count = counts.get(cluster);
    if (count !== 0) setRefcount(block, cluster - firstCluster, state.refcountOrder, count);
  }
  return block;
}

/**
 * rebuild_refcounts_write_refblocks: write every block covering a cluster
 * with a non-zero count in [firstCluster, endCluster). Returns whether the
 * table had to grow.
 */
async function writeRefblocks(state: Qcow2CheckState, report: CheckReport, counts: ClusterCounts, firstCluster: number, endCluster: number, table: number[]): Promise<boolean> {
  const cs = state.clusterSizeBytes;
  const perBlock = state.refcountBlockEntries;
  const cursor = { firstFreeCluster: 0 };
  let grown = false;
  for (let cluster = firstCluster; cluster < endCluster; cluster++) {
    if (counts.get(cluster) === 0) continue;
    const blockIndex = Math.floor(cluster / perBlock);
    const blockStart = blockIndex * perBlock;
    let blockOffset = blockIndex < table.length ? table[blockIndex] : 0;
    if (blockOffset === 0) {
      if (cursor.firstFreeCluster < blockStart) cursor.firstFreeCluster = blockStart;
      blockOffset = allocateClusters(state, counts, 1, cursor);
      const blockCluster = blockOffset / cs;
      if (blockCluster >= endCluster) endCluster = blockCluster + 1;
      if (table.length <= blockIndex) {
        const entries = Math.ceil(((blockIndex + 1) * REFTABLE_ENTRY_BYTES) / cs) * (cs / REFTABLE_ENTRY_BYTES);
        while (table.length < entries) table.push(0);
        grown = true;
      }
      table[blockIndex] = blockOffset;
    }
    if (!(await guardWrite(state, report, new Set(), blockOffset, cs))) return rebuildFailed(report, "ERROR writing refblock", STRERROR.EIO);
    await state.file.write(blockOffset, encodeRefblock(state, counts, blockStart));
    cluster = blockStart + perBlock - 1;
  }
  return grown;
}

/**
 * rebuild_refcount_structure: write a new refcount table and blocks that
 * hold exactly `counts` (plus themselves) and switch the header to them.
 * Updates `state` (refcount table and its offset). The old structure is
 * left behind as leaks.
 */
export async function writeRefcountStructure(state: Qcow2CheckState, report: CheckReport, counts: ClusterCounts, refcountOrder = state.refcountOrder): Promise<void> {
  const cs = state.clusterSizeBytes;
  const oldRefcountOrder = state.refcountOrder;
  if (refcountOrder !== oldRefcountOrder) {
    // The new blocks are written at the new width (encodeRefblock reads these).
    state.refcountOrder = refcountOrder;
    state.refcountMax = refcountMax(refcountOrder);
    state.refcountBlockEntries = refcountsPerBlock(state.clusterBits, refcountOrder);
  }
  const table: number[] = [];
  let grown = await writeRefblocks(state, report, counts, 0, counts.size, table);
  if (!grown) {
    // An image always references its header, so there is at least one block.
    throw new SnapstackError("E_INTERNAL", "refcount rebuild found no referenced cluster");
  }
  // Place the table; if its blocks made the table grow, place it again (the old place stays allocated, a leak freed later).
  let tableClusters: number;
  let tableOffset: number;
  for (;;) {
    tableClusters = Math.ceil((table.length * REFTABLE_ENTRY_BYTES) / cs);
    tableOffset = allocateClusters(state, counts, tableClusters, { firstFreeCluster: 0 });
    const tableStartCluster = tableOffset / cs;
    grown = await writeRefblocks(state, report, counts, tableStartCluster, tableStartCluster + tableClusters, table);
    if (!grown) break;
  }

  const tableBytes = new Uint8Array(tableClusters * cs);
  const tableView = new DataView(tableBytes.buffer);
  table.forEach((blockOffset, i) => tableView.setBigUint64(i * REFTABLE_ENTRY_BYTES, BigInt(blockOffset)));
  if (!(await guardWrite(state, report, new Set(), tableOffset, tableBytes.length))) rebuildFailed(report, "ERROR writing reftable", STRERROR.EIO);
  await state.file.write(tableOffset, tableBytes);
  await state.file.flush();

  // The switch: table offset and cluster count (bytes 48..59) and, for a new width, the
  // refcount order (96..99), in one write within the first sector.
  const switchBytes = refcountOrder === oldRefcountOrder ? 12 : 52;
  const pointer = new Uint8Array(switchBytes);
  if (switchBytes > 12) await state.file.read(48, pointer);
  const pointerView = new DataView(pointer.buffer);
  pointerView.setBigUint64(0, BigInt(tableOffset));
  pointerView.setUint32(8, tableClusters);
  if (switchBytes > 12) pointerView.setUint32(96 - 48, refcountOrder);
  await state.file.write(48, pointer);
  await state.file.flush();
  state.header.refcountOrder = refcountOrder;

  const newTable = new BigUint64Array(tableClusters * (cs / REFTABLE_ENTRY_BYTES));
  table.forEach((blockOffset, i) => (newTable[i] = BigInt(blockOffset)));
  state.refcountTable = newTable;
  state.refcountTableOffset = tableOffset;
  state.header.refcountTableOffset = tableOffset;
  state.header.refcountTableClusters = tableClusters;
  state.fileSizeBytes = await state.file.sizeBytes();
}

/** qcow2_check_fix_snapshot_table's failure: a check error and its line (no "qemu-img: " prefix). */
function snapshotTableUpdateFailed(report: CheckReport, strerror: string): never {
  report.checkErrors++;
  report.say(`ERROR failed to update snapshot table: ${strerror}`);
  throw new CheckFailure(strerror);
}

/** First fit of `clusterCount` clusters that nothing references and no stored refcount claims; the first cluster's index. */
async function findFreeClusters(counts: ClusterCounts, stored: StoredRefcounts, clusterCount: number): Promise<number> {
  let start = 1;
  for (let cluster = 1; cluster - start < clusterCount; cluster++) {
    if (cluster >= CHECK_CLUSTERS_MAX) throw new CheckFailure(STRERROR.EFBIG);
    const storedCount = await stored.get(cluster);
    if (counts.get(cluster) !== 0 || storedCount !== 0) start = cluster + 1;
  }
  return start;
}

/**
 * qcow2_check_fix_snapshot_table: write the snapshot list check read
 * (entries with too much extra data cut to the limit, incomplete v3
 * entries completed) as a new table, switch the header to it and free the
 * old one. Call only with sound refcounts (after the -r all pass).
 */
export async function rewriteSnapshotTable(state: Qcow2CheckState, report: CheckReport): Promise<void> {
  const cs = state.clusterSizeBytes;
  const table = encodeCheckedSnapshotTable(state);
  const scratch = new CheckReport();
  const fileClusters = clustersForBytes(state, state.fileSizeBytes);
  const counts = new ClusterCounts(fileClusters, state.refcountMax);
  await calculateRefcounts(state, scratch, counts, 0);
  let stored = new StoredRefcounts(state, scratch);
  let tableOffset = 0;
  if (table.length > 0) {
    const tableClusters = Math.ceil(table.length / cs);
    const first = await findFreeClusters(counts, stored, tableClusters);
    if (!counts.grow(first + tableClusters)) throw new CheckFailure(STRERROR.EFBIG);
    for (let cluster = first; cluster < first + tableClusters; cluster++) counts.set(cluster, 1);
    let covered = true;
    for (let cluster = first; cluster < first + tableClusters && covered; cluster++) covered = (await stored.set(cluster, 1)) === null;
    // No refcount block there: a new structure that counts the table (the old one becomes a leak, freed below).
    if (!covered) await writeRefcountStructure(state, scratch, counts);
    await state.file.flush();
    tableOffset = first * cs;
    if (!(await guardWrite(state, report, new Set(), tableOffset, table.length))) snapshotTableUpdateFailed(report, STRERROR.EIO);
    await state.file.write(tableOffset, table);
    await state.file.flush();
  }
  const pointer = new Uint8Array(12);
  const pointerView = new DataView(pointer.buffer);
  pointerView.setUint32(0, state.snapshots.length);
  pointerView.setBigUint64(4, BigInt(tableOffset));
  await state.file.write(60, pointer);
  await state.file.flush();
  state.header.snapshotCount = state.snapshots.length;
  state.header.snapshotsOffset = tableOffset;
  state.snapshotsOffset = tableOffset;
  state.snapshotsSizeBytes = table.length;
  state.fileSizeBytes = await state.file.sizeBytes();

  // The old table (and a replaced refcount structure) are leaks now: free them.
  const again = new CheckReport();
  const fresh = new ClusterCounts(clustersForBytes(state, state.fileSizeBytes), state.refcountMax);
  const outcome = await calculateRefcounts(state, again, fresh, 0);
  stored = new StoredRefcounts(state, again);
  await compareRefcounts(state, again, stored, fresh, FIX_LEAKS, outcome);
  if (outcome.rebuild) snapshotTableUpdateFailed(report, STRERROR.EIO);
}

/**
 * Every reference of the image counted from its metadata (QEMU's
 * calculate_refcounts), with the snapshot table read, its messages in
 * `report`; counts up to `countMax` (default: the image's refcount maximum).
 */
async function countReferences(file: ImageFile, report: CheckReport, countMax?: number): Promise<{ state: Qcow2CheckState; counts: ClusterCounts; outcome: Awaited<ReturnType<typeof calculateRefcounts>> }> {
  const state = await openCheckState(file, true);
  await readSnapshotTable(state, report, 0);
  const fileClusters = clustersForBytes(state, state.fileSizeBytes);
  if (fileClusters > CHECK_CLUSTERS_MAX) throw new CheckFailure(STRERROR.EFBIG);
  const counts = new ClusterCounts(fileClusters, countMax ?? state.refcountMax);
  const outcome = await calculateRefcounts(state, report, counts, 0);
  return { state, counts, outcome };
}

/**
 * After writeRefcountStructure the old table and blocks are leaks: walk
 * again and free them (`counts` is reused; reading the stored refcounts
 * reports to `report`). Returns the walk's report and outcome.
 */
async function freeOldStructure(state: Qcow2CheckState, report: CheckReport, counts: ClusterCounts): Promise<{ again: CheckReport; outcome: Awaited<ReturnType<typeof calculateRefcounts>>; stored: StoredRefcounts }> {
  const stored = new StoredRefcounts(state, report);
  counts.clear();
  const again = new CheckReport();
  const outcome = await calculateRefcounts(state, again, counts, 0);
  await compareRefcounts(state, again, stored, counts, FIX_LEAKS, outcome);
  return { again, outcome, stored };
}

/**
 * The stored refcount of every cluster (not recounted from the metadata:
 * QEMU's qcow2_change_refcount_order copies them, leaks included), read
 * block by block through the refcount table. `countMax` bounds the counts
 * kept (the wider of the two widths).
 */
async function readStoredRefcounts(state: Qcow2CheckState, countMax: number): Promise<ClusterCounts> {
  const cs = state.clusterSizeBytes;
  const counts = new ClusterCounts(clustersForBytes(state, state.fileSizeBytes), countMax);
  const block = new Uint8Array(cs);
  for (let tableIndex = 0; tableIndex < state.refcountTable.length; tableIndex++) {
    const offset = Number(state.refcountTable[tableIndex] & ~0x1ffn);
    if (offset === 0) continue;
    if (offset % cs !== 0 || offset + cs > state.fileSizeBytes) {
      throw new SnapstackError("E_CORRUPT_IMAGE", `${state.file.name}: refcount block at 0x${offset.toString(16)} (reftable index ${tableIndex}) is unaligned or past the end of the file`, { path: state.file.name });
    }
    await state.file.read(offset, block);
    const first = tableIndex * state.refcountBlockEntries;
    for (let entry = 0; entry < state.refcountBlockEntries; entry++) {
      const count = getRefcount(block, entry, state.refcountOrder);
      if (count === 0) continue;
      if (first + entry >= counts.size && !counts.grow(first + entry + 1)) throw new CheckFailure(STRERROR.EFBIG);
      counts.set(first + entry, count);
    }
  }
  return counts;
}

/** The clusters of the refcount table and blocks the header points to now. */
function refcountStructureClusters(state: Qcow2CheckState): number[] {
  const cs = state.clusterSizeBytes;
  const clusters: number[] = [];
  const tableClusters = Math.ceil((state.refcountTable.length * REFTABLE_ENTRY_BYTES) / cs);
  for (let i = 0; i < tableClusters; i++) clusters.push(state.refcountTableOffset / cs + i);
  for (const entry of state.refcountTable) if ((entry & ~0x1ffn) !== 0n) clusters.push(Number(entry & ~0x1ffn) / cs);
  return clusters;
}

/** The first stored refcount that does not fit `2^refcountOrder` bits, as qemu-img words it; null when all fit. */
function refcountTooWide(state: Qcow2CheckState, counts: ClusterCounts, refcountOrder: number): string | null {
  const newMax = refcountMax(refcountOrder);
  for (let cluster = 0; cluster < counts.size; cluster++) {
    const count = counts.get(cluster);
    if (count > newMax) {
      return `Cannot decrease refcount entry width to ${2 ** refcountOrder} bits: Cluster at offset 0x${(cluster * state.clusterSizeBytes).toString(16)} has a refcount of ${count}`;
    }
  }
  return null;
}

/**
 * Why `amend -o refcount_bits=2^refcountOrder` cannot be done (a stored
 * refcount too large for the width), or null. Reads only.
 */
export async function refcountOrderRefusal(file: ImageFile, refcountOrder: number): Promise<string | null> {
  const state = await openCheckState(file, false);
  // Every stored refcount fits a width at least as wide: nothing to read.
  if (refcountMax(refcountOrder) >= state.refcountMax) return null;
  return refcountTooWide(state, await readStoredRefcounts(state, state.refcountMax), refcountOrder);
}

/**
 * `amend -o refcount_bits=N` (QEMU's qcow2_change_refcount_order): the
 * stored refcounts, leaks included, written into a new refcount structure
 * `2^refcountOrder` bits wide, placed where no stored refcount claims a
 * cluster (the old structure counts as in use, even if its own refcounts
 * are wrong); the header switches table and width in one sector write
 * (QEMU switches the table first and the width with the next header
 * update); then the old structure's clusters are released in the new one
 * (each loses one reference, as QEMU frees them). A crash before the
 * switch leaves the old structure in charge, after it at most leaks.
 * Refused (E_INVALID_OPTION, nothing written) when a refcount does not fit
 * the new width, with qemu-img's message. The caller has written back its
 * caches and loads the metadata again from the returned header.
 */
export async function changeRefcountOrder(file: ImageFile, refcountOrder: number): Promise<Qcow2Header> {
  const report = new CheckReport();
  try {
    const state = await openCheckState(file, true);
    const counts = await readStoredRefcounts(state, Math.max(state.refcountMax, refcountMax(refcountOrder)));
    const refusal = refcountTooWide(state, counts, refcountOrder);
    if (refusal !== null) throw new SnapstackError("E_INVALID_OPTION", refusal, { path: file.name });
    const oldStructure = refcountStructureClusters(state);
    const raised = new Set<number>();
    for (const cluster of oldStructure) {
      if (cluster >= counts.size && !counts.grow(cluster + 1)) throw new CheckFailure(STRERROR.EFBIG);
      if (counts.get(cluster) === 0) {
        counts.set(cluster, 1);
        raised.add(cluster);
      }
    }
    await writeRefcountStructure(state, report, counts, refcountOrder);

    // Release the old structure in the new one: its clusters lose the reference the structure held.
    const cs = state.clusterSizeBytes;
    const blocks = new Set<number>();
    for (const cluster of oldStructure) {
      counts.set(cluster, raised.has(cluster) ? 0 : counts.get(cluster) - 1);
      blocks.add(Math.floor(cluster / state.refcountBlockEntries));
    }
    for (const blockIndex of blocks) {
      const blockOffset = Number(state.refcountTable[blockIndex] ?? 0n);
      if (blockOffset !== 0) await state.file.write(blockOffset, encodeRefblock(state, counts, blockIndex * state.refcountBlockEntries));
    }
    await file.flush();
    const headerBytes = new Uint8Array(cs);
    await file.read(0, headerBytes);
    return decodeQcow2Header(headerBytes);
  } catch (error) {
    if (error instanceof CheckFailure) throw new SnapstackError("E_IO", `${file.name}: cannot change the refcount width: ${error.strerror}`, { path: file.name });
    throw error;
  }
}

/** What a rebuild found and did, for logs and tests. */
export interface RebuildRefcountsResult {
  /** The header as it is on disk now (new refcount table, dirty bit clear). */
  header: Qcow2Header;
  /** Structural corruptions the walk found that a refcount rebuild cannot fix (unaligned entries, ...). */
  corruptions: number;
  /** The stderr lines QEMU would print ("Rebuilding refcount structure", "Repairing cluster ..."). */
  messages: string[];
}

/**
 * Recompute every refcount from the metadata and write a fresh refcount
 * structure, free the old one, fix COPIED flags, clear the dirty bit and
 * flush. Meant for opening a dirty (lazy refcounts) image read-write, where
 * any stored refcount may be stale; the caller must not have cached
 * refcounts of the file. Throws E_CORRUPT_IMAGE when the walk cannot
 * complete ("Could not repair dirty image", as QEMU's open fails).
 */
export async function rebuildRefcounts(file: ImageFile): Promise<RebuildRefcountsResult> {
  if (file.readOnly) throw new SnapstackError("E_READ_ONLY", `${file.name}: cannot rebuild refcounts of a read-only image`);
  const report = new CheckReport();
  try {
    const { state, counts } = await countReferences(file, report);
    const corruptions = report.corruptions;
    report.say("Rebuilding refcount structure");
    await writeRefcountStructure(state, report, counts);
    const { again, outcome, stored } = await freeOldStructure(state, report, counts);
    await checkOflagCopied(state, again, stored, FIX_ERRORS | FIX_LEAKS);
    report.messages.push(...again.allMessages());
    if (outcome.rebuild || again.checkErrors > 0) {
      throw new SnapstackError("E_CORRUPT_IMAGE", `${file.name}: Could not repair dirty image: the rebuilt refcount structure is still broken`, {
        messages: report.allMessages(),
      });
    }
    if (state.header.version === 3 && (state.header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n) {
      state.header.incompatibleFeatures &= ~INCOMPAT_DIRTY;
      await writeIncompatibleFeatures(state);
    }
    await file.flush();
    const headerBytes = new Uint8Array(state.clusterSizeBytes);
    await file.read(0, headerBytes);
    return { header: decodeQcow2Header(headerBytes), corruptions, messages: report.allMessages() };
  } catch (error) {
    if (error instanceof CheckFailure) {
      throw new SnapstackError("E_CORRUPT_IMAGE", `${file.name}: Could not repair dirty image: ${error.strerror}`, { messages: report.allMessages() });
    }
    throw error;
  }
}
