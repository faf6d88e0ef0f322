/**
 * Internal snapshots of an open qcow2 image: create, apply (goto), delete,
 * list (reference §6, §10, §13; QEMU 7.2 block/qcow2-snapshot.c and
 * qcow2_update_snapshot_refcount in qcow2-refcount.c).
 *
 * Design notes
 * - A snapshot is an entry of the snapshot table pointing at a copy of an
 *   L1 table. Refcounts count *snapshots*: every L2 table and data cluster
 *   reachable from N L1 tables (active + snapshots) has refcount N, even
 *   when an L2 table is shared. So creating is "copy the active L1, +1 on
 *   everything reachable from it", deleting is "-1 on everything reachable
 *   from the snapshot's L1, free that L1", applying is "+1 on the snapshot's
 *   tree, overwrite the active L1 with its L1, -1 on the old active tree".
 *   No guest data is ever copied.
 * - COPIED (refcount exactly 1) is rebuilt from refcounts in every table a
 *   pass walks (`updateTreeRefcounts`, QEMU's qcow2_update_snapshot_refcount),
 *   and a final pass with addend 0 over the active L1 makes the active
 *   tables exact. Snapshot L1 copies keep stale COPIED bits, as in QEMU.
 *   Delete's final pass skips the active tables its -1 pass walked when
 *   that pass decremented no cluster twice (DecrementRecord): their bits
 *   are already what the final pass would make them (on a 100 GiB image
 *   with 1 GiB of data and nothing written since the snapshot, that is all
 *   200 tables).
 * - Write ordering, so an interruption leaves leaks at worst:
 *   create: refcounts raised (in the cache); L1 copy written (only once the
 *   raises fit: a refused snapshot leaves the file as it was); refcount
 *   blocks written before the L2 tables whose COPIED bits were cleared; new
 *   table written; header switched (bytes 60-71, synced); old table freed.
 *   apply: refcounts of the snapshot's tree raised and flushed; the active
 *   L1 overwritten in place (synced); then the old tree lowered.
 *   delete: new table and header switch first; then the decrements; then
 *   the snapshot's L1 freed.
 * - Apply skips the L2 tables the snapshot and the old active state share
 *   (same host offset in both L1 tables: usually all but the tables written
 *   since): their +1 and -1 cancel, so neither pass walks them, and their
 *   refcounts are right for both trees at every point in between. The final
 *   addend-0 pass skips them too: the refcount of a shared table, and of
 *   every cluster it maps, is at least 2 before and after (both L1 tables
 *   reach it, and a cluster is mapped only at its own guest offset), so
 *   COPIED stays clear in them, as QEMU's final pass over every active
 *   table leaves it: the file ends byte for byte as QEMU leaves it for any
 *   image `check` passes (QEMU's pass would also clear a stray COPIED bit
 *   in a shared table, which check reports as corruption). So apply reads
 *   only the tables written since the snapshot (QEMU: every active table).
 *   QEMU's +1 pass can fail with a
 *   refcount overflow on a shared table; skipping is therefore only done
 *   when no refcount of a consistent image can reach the maximum (one
 *   reference per L1 table, or one per compressed sector, each). A corrupt
 *   entry inside a shared table is therefore not reported by apply (QEMU:
 *   by the +1 pass, before the switch); apply changes nothing in it, and
 *   check reports it.
 * - A raised refcount that would overflow (refcount_bits=1 on the first
 *   snapshot) fails with E_TOO_LARGE (errno EINVAL, as QEMU). Unlike QEMU,
 *   which leaks the L1 copy and whatever it had raised, the raises done so
 *   far are undone and the L1 copy freed, so the image stays clean.
 * - Every operation runs under `image.exclusive()`: no guest request runs
 *   meanwhile, so a live image (NBD export, VM) can be snapshotted. Apply
 *   drains in-flight reads before lowering the old tree.
 * - Freed clusters get holes punched (QEMU's pass-discard-snapshot); with
 *   `{ wipe: true }` they are overwritten with zeroes and flushed first,
 *   before the call returns (Qcow2Metadata.whileFreeing, completeFreeing).
 * - Names follow qemu-img: stored names are truncated to 255 bytes on
 *   create; `apply` matches an ID first, then a name; `delete` (CLI) matches
 *   names only, first match.
 * - Not done: snapshots with VM state are never *created* (qemu-img does not
 *   either); their VM state area is kept as is.
 */
import { SnapstackError, assert } from "../../base/errors.ts";
import type { ImageFile } from "../../io/file.ts";
import {
  COMPRESSED_SECTOR_BYTES,
  HI_COMPRESSED,
  HI_COPIED,
  HI_OFFSET_MASK,
  HI_OFFSET_UNSAFE,
  L1_ENTRY_BYTES,
  LO_OFFSET_MASK,
  TWO_POW_32,
  compressedReadBytes,
  decodeL2EntryWords,
  getL1Entry,
  setL1Entry,
} from "./entries.ts";
import { guestSizeOf } from "./header.ts";
import { L1_BYTES_MAX, corruption, type Qcow2Geometry, type Qcow2Metadata } from "./metadata.ts";
import { markDirty, type CachedTable } from "./table-cache.ts";
import type { MetadataStructure } from "./metadata-overlap.ts";
import {
  SNAPSHOT_COUNT_MAX,
  SNAPSHOT_ID_BYTES_MAX,
  SNAPSHOT_NAME_BYTES_MAX,
  SNAPSHOT_TABLE_BYTES_MAX,
  decodeSnapshotTable,
  encodeSnapshotTable,
  type Qcow2Snapshot,
} from "./snapshot-table.ts";
import type { Qcow2Image, Qcow2SnapshotInfo } from "./qcow2-image.ts";

/** errno values qemu-img prints for snapshot failures ("-22 (Invalid argument)"). */
export const SNAPSHOT_ERRNO = { ENOENT: 2, EIO: 5, EBUSY: 16, EEXIST: 17, EINVAL: 22, EFBIG: 27, ENOTSUP: 95 } as const;

/** First read of the snapshot table when re-reading it; grows by 4x up to the table limit. */
const TABLE_READ_BYTES_INITIAL = 64 * 1024;
/** While walking a tree, let the caches shrink back to their bound every this many L2 tables. */
const TRIM_EVERY_L2_TABLES = 64;

export interface FreeingOptions {
  /**
   * Overwrite every host cluster the operation frees with zeroes, and
   * flush, before returning (they are punched afterwards either way, as
   * QEMU's pass-discard-snapshot does).
   */
  wipe?: boolean;
}

export interface SnapshotDate {
  seconds: number;
  nanoseconds: number;
}

export interface CreateSnapshotOptions extends FreeingOptions {
  /** Creation time (Unix); default the clock, to the millisecond (qemu-img: gettimeofday, to the microsecond; stored as µs·1000 either way). */
  date?: SnapshotDate;
}

/**
 * The wall clock in qemu-img's stored form (seconds, microseconds·1000), to
 * the millisecond: Date.now(), because the first use of `performance` loads
 * perf_hooks (~10 modules, 2-4 ms of a `snapshot -c` process).
 */
export function snapshotDateNow(): SnapshotDate {
  const milliseconds = Date.now();
  return { seconds: Math.floor(milliseconds / 1000), nanoseconds: (milliseconds % 1000) * 1e6 };
}

export interface DeleteSnapshotOptions extends FreeingOptions {
  /** How `ref` is matched: by name (qemu-img snapshot -d, the default) or by ID. */
  by?: "name" | "id";
}

/** Which entries a reference may match (QEMU's lookup rules). */
export type SnapshotMatch = "id-or-name" | "name" | "id";

/** QEMUSnapshotInfo keeps name[256] and id_str[128]: what qemu-img shows and compares. */
export function truncateUtf8(text: string, bytesMax: number): string {
  const encoded = new TextEncoder().encode(text);
  if (encoded.length <= bytesMax) return text;
  let end = bytesMax;
  // Do not cut a multi-byte character in half (QEMU would; a lone byte cannot round-trip through a JS string).
  while (end > 0 && (encoded[end] & 0xc0) === 0x80) end--;
  return new TextDecoder().decode(encoded.subarray(0, end));
}

/**
 * Index of the snapshot `ref` names, or -1. "id-or-name": an ID match wins
 * over a name match (find_snapshot_by_id_or_name); "name": the first entry
 * whose name, as qemu-img lists it (255 bytes), equals `ref` (bdrv_snapshot_find).
 */
export function findSnapshot(snapshots: readonly Qcow2Snapshot[], ref: string, match: SnapshotMatch): number {
  if (match !== "name") {
    const byId = snapshots.findIndex((s) => s.id === ref);
    if (byId >= 0 || match === "id") return byId;
  }
  return snapshots.findIndex((s) => truncateUtf8(s.name, SNAPSHOT_NAME_BYTES_MAX) === ref);
}

/** find_new_snapshot_id: largest strtoul(id) + 1 (unsigned 64-bit, as QEMU). */
export function nextSnapshotId(snapshots: readonly Qcow2Snapshot[]): string {
  const u64Max = (1n << 64n) - 1n;
  let idMax = 0n;
  for (const snapshot of snapshots) {
    const digits = /^\s*\+?(\d+)/.exec(snapshot.id);
    if (digits === null) continue;
    let id = BigInt(digits[1]);
    if (id > u64Max) id = u64Max;
    if (id > idMax) idMax = id;
  }
  return ((idMax + 1n) & u64Max).toString();
}

/** The snapshot list as qemu-img reports it (names 255 bytes, IDs 127). */
export function listSnapshots(image: Qcow2Image): Qcow2SnapshotInfo[] {
  return image.snapshots.map((s) => ({
    id: truncateUtf8(s.id, SNAPSHOT_ID_BYTES_MAX),
    name: truncateUtf8(s.name, SNAPSHOT_NAME_BYTES_MAX),
    vmStateSizeBytes: s.vmStateSizeBytes,
    dateSeconds: s.dateSeconds,
    dateNanoseconds: s.dateNanoseconds,
    vmClockNanoseconds: s.vmClockNanoseconds,
    ...(s.icount !== null ? { icount: s.icount } : {}),
  }));
}

function notFound(image: Qcow2Image, ref: string): SnapstackError {
  return new SnapstackError("E_SNAPSHOT_NOT_FOUND", `${image.name}: no snapshot '${ref}'`, { path: image.name, snapshot: ref, errno: SNAPSHOT_ERRNO.ENOENT });
}

/** The on-disk table, re-read (its exact length is needed to free it). */
function readSnapshotTable(meta: Qcow2Metadata): Promise<{ snapshots: Qcow2Snapshot[]; tableBytes: number }> {
  const { snapshotCount, snapshotsOffset } = meta.header;
  return readSnapshotTableAt(meta.file, snapshotsOffset, snapshotCount, guestSizeOf(meta.header));
}

/**
 * The snapshot table of `count` entries at `tableOffset`. Its length is
 * known only once decoded, so it is read in pieces growing 4x from 64 KiB
 * up to the table limit (reading to the end of the file instead cost an
 * open ~60 ms when 64 MiB of data followed the table).
 */
export async function readSnapshotTableAt(file: ImageFile, tableOffset: number, count: number, imageSizeBytes: number): Promise<{ snapshots: Qcow2Snapshot[]; tableBytes: number }> {
  if (count === 0) return { snapshots: [], tableBytes: 0 };
  let lengthBytes = TABLE_READ_BYTES_INITIAL;
  for (;;) {
    const bytes = new Uint8Array(lengthBytes);
    const got = await file.read(tableOffset, bytes);
    try {
      return decodeSnapshotTable(bytes.subarray(0, got), count, imageSizeBytes);
    } catch (error) {
      // Truncated because we read too little: read more. Truncated at the end of the file or the limit: corrupt.
      if (got < lengthBytes || lengthBytes >= SNAPSHOT_TABLE_BYTES_MAX) throw error;
      lengthBytes = Math.min(SNAPSHOT_TABLE_BYTES_MAX, lengthBytes * 4);
    }
  }
}

/** qcow2_validate_table for a snapshot's L1 table. */
export async function validateSnapshotL1(meta: Qcow2Metadata, snapshot: Qcow2Snapshot): Promise<void> {
  const lengthBytes = snapshot.l1Size * L1_ENTRY_BYTES;
  if (lengthBytes > L1_BYTES_MAX) throw new SnapstackError("E_TOO_LARGE", "Snapshot L1 table too large");
  if (snapshot.l1TableOffset % meta.clusterSizeBytes !== 0) throw corruption("Snapshot L1 table offset invalid");
  if (lengthBytes > 0 && snapshot.l1TableOffset + lengthBytes > (await meta.file.sizeBytes())) {
    throw corruption(`Snapshot L1 table at 0x${snapshot.l1TableOffset.toString(16)} lies beyond the end of the file`);
  }
}

async function readL1(meta: Qcow2Metadata, hostOffset: number, entries: number, paddedEntries = entries): Promise<Uint8Array> {
  const l1 = new Uint8Array(paddedEntries * L1_ENTRY_BYTES);
  if (entries > 0) await meta.file.read(hostOffset, l1.subarray(0, entries * L1_ENTRY_BYTES));
  return l1;
}

/**
 * Write metadata of the snapshot code after QEMU's overlap check
 * (qcow2_pre_write_overlap_check): `structure` may overlap only itself,
 * null (a new table at a fresh place) nothing. On a corrupt image the
 * allocator can hand out a cluster that live metadata holds; the write
 * is refused before it lands. `synced`: flushed (bdrv_pwrite_sync).
 */
async function writeChecked(meta: Qcow2Metadata, hostOffset: number, bytes: Uint8Array, structure: MetadataStructure | null, synced: boolean): Promise<void> {
  if (bytes.length === 0) return;
  meta.overlap.check(hostOffset, bytes.length, structure);
  await meta.file.write(hostOffset, bytes);
  if (synced) await meta.file.flush();
}

/** Write the whole active L1 table in place; `synced`: flushed, else durable with the next flush. */
async function writeActiveL1(meta: Qcow2Metadata, synced: boolean): Promise<void> {
  await writeChecked(meta, meta.header.l1TableOffset, meta.l1.subarray(0, meta.header.l1Size * L1_ENTRY_BYTES), "active L1 table", synced);
}

/** Refcount blocks first (raised refcounts), then L2 tables (cleared COPIED bits); each cache write flushes. */
async function writeRaisedCaches(meta: Qcow2Metadata): Promise<void> {
  await meta.writeDirtyRefblocks();
  await meta.writeDirtyL2();
}

/** Host ranges whose refcounts a pass raised, so a failed pass can be undone. */
type RaiseJournal = [hostOffset: number, lengthBytes: number][];


/**
 * The used-entry indexes of L2 tables a pass has scanned, by host offset,
 * for the later passes of the same operation (only for sparse tables: a
 * dense table's scan costs little next to its entries' work). Valid while
 * the operation runs: its passes change no entry between zero and non-zero
 * (they only flip COPIED on allocated entries), and a table freed meanwhile
 * is never walked again.
 */
type UsedIndexCache = Map<number, Int32Array>;

/** A table with at most this share of its entries used keeps its index list in the UsedIndexCache. */
const USED_CACHE_SHARE_MAX = 1 / 8;

/**
 * Filled by a -1 pass given it (deleteSnapshot), for the addend-0 pass
 * after it: the L2 tables the pass walked, and whether their COPIED bits
 * are final. A walked table's bits are rebuilt right after its own entries'
 * decrements; they stay right unless a later decrement of the same pass
 * changes one of its clusters' refcounts, which only a cluster referenced
 * twice in the tree can cause. So the pass keeps a bit per host cluster it
 * decrements (standard data clusters and L2 tables), and `exact` ends false
 * when one comes twice, when it meets a compressed entry (several of them
 * may share a host cluster, legitimately), or when the file has too many
 * clusters for the bitmap. With `exact`, the addend-0 pass may skip every
 * active table the -1 pass walked: QEMU's final pass would find nothing to
 * change in them.
 */
export interface DecrementRecord {
  readonly tables: Set<number>;
  exact: boolean;
}

/** Largest per-cluster bitmap a DecrementRecord keeps (a 2 TiB file of 64 KiB clusters: 4 MiB). */
const DECREMENT_BITMAP_BYTES_MAX = 4 * 1024 * 1024;

/** The options of one pass (updateTreeRefcounts). */
interface TreePassOptions {
  /** Raises are recorded here (to undo a failed pass). */
  journal?: RaiseJournal;
  /** L1 indexes to leave alone (a shared subtree whose change another pass cancels, or whose COPIED bits a -1 pass left exact). */
  skipped?: Uint8Array;
  /** Shared by the passes of one operation. */
  usedIndexes?: UsedIndexCache;
  /** Filled by a -1 pass (see DecrementRecord). */
  record?: DecrementRecord;
  /**
   * What the pass does in each L2 table: "all" (default) adds the addend
   * and rebuilds COPIED; "refcounts" only adds the addend; "copied" only
   * rebuilds COPIED, as after a pass that added it (create splits its +1
   * pass in two this way, so that its tables need not wait in memory for
   * the refcount blocks' flush). Every phase rebuilds the L1 bits.
   */
  phase?: "all" | "refcounts" | "copied";
  /**
   * Walk the tables that are not cached through one reused buffer, writing
   * a changed one back at once (Qcow2Metadata.readUncachedL2): no fresh
   * memory per table. Not for a pass that raises refcounts and rebuilds
   * COPIED together: each table's write would wait for a refcount flush.
   */
  uncached?: boolean;
}

/** What one pass over a tree needs in its per-table helpers; the buffers are reused for every table. */
interface TreeWalk {
  readonly meta: Qcow2Metadata;
  readonly geometry: Qcow2Geometry;
  readonly addend: -1 | 0 | 1;
  /** The file's end rounded up to a cluster: references at or past it are corrupt. */
  readonly fileEndBytes: number;
  /** Indexes of the non-empty entries of the current table. */
  readonly used: Int32Array;
  /** [hostOffset, lengthBytes] pairs of the current table's refcount updates. */
  readonly ranges: Float64Array;
  readonly usedIndexes: UsedIndexCache | undefined;
  /** A -1 pass's bit per host cluster decremented so far (pass.record); null when not recording or no longer exact. */
  decremented: Uint8Array | null;
  readonly addsAddend: boolean;
  readonly rebuildsCopied: boolean;
  /** The one buffer uncached tables are read into (pass.uncached), else null. */
  readonly uncachedBytes: Uint8Array | null;
  /** L1 index of the table being walked. */
  l1Index: number;
}

function beyondFileEnd(what: string, hostOffset: number): SnapstackError {
  return corruption(`${what} at 0x${hostOffset.toString(16)} lies beyond the end of the file`);
}

/**
 * Entry indexes of the non-empty entries of an L2 table, into walk.used (an
 * all-zero entry word is unallocated and carries no COPIED bit); returns how
 * many. Zero tests need no byte order, so a native-order word view skips
 * empty entries without decoding them.
 */
function usedEntryIndexes(table: CachedTable, walk: TreeWalk): number {
  const words = new Uint32Array(table.bytes.buffer, table.bytes.byteOffset, table.bytes.byteLength >>> 2);
  const wordsPerEntry = walk.geometry.l2EntryBytes >>> 2;
  const entries = walk.geometry.l2Entries;
  const used = walk.used;
  let count = 0;
  let l2Index = 0;
  if (wordsPerEntry === 2) {
    // Four entries tested at once: most of a sparse table is empty.
    for (let w = 0; l2Index + 4 <= entries; l2Index += 4, w += 8) {
      if ((words[w] | words[w + 1] | words[w + 2] | words[w + 3] | words[w + 4] | words[w + 5] | words[w + 6] | words[w + 7]) === 0) continue;
      if ((words[w] | words[w + 1]) !== 0) used[count++] = l2Index;
      if ((words[w + 2] | words[w + 3]) !== 0) used[count++] = l2Index + 1;
      if ((words[w + 4] | words[w + 5]) !== 0) used[count++] = l2Index + 2;
      if ((words[w + 6] | words[w + 7]) !== 0) used[count++] = l2Index + 3;
    }
  }
  for (let w = l2Index * wordsPerEntry; l2Index < entries; l2Index++, w += wordsPerEntry) {
    if ((words[w] | words[w + 1]) !== 0) used[count++] = l2Index;
  }
  return count;
}

/** A compressed entry's host range, into walk.ranges at pair `pair`. */
function compressedRange(walk: TreeWalk, hi: number, lo: number, l2Offset: number, l2Index: number, pair: number): void {
  const entry = decodeL2EntryWords(hi, lo, walk.geometry.clusterBits);
  if (entry.offsetTooLarge) throw corruption(`Compressed cluster offset beyond 8 PiB (L2 offset: 0x${l2Offset.toString(16)}, L2 index: 0x${l2Index.toString(16)})`);
  if (entry.hostOffset >= walk.fileEndBytes) throw beyondFileEnd(`Compressed cluster of L2 index ${l2Index} in the table at 0x${l2Offset.toString(16)}`, entry.hostOffset);
  walk.decremented = null; // a recorded pass is not exact past a compressed entry (see DecrementRecord)
  walk.ranges[2 * pair] = entry.hostOffset;
  walk.ranges[2 * pair + 1] = compressedReadBytes(entry.hostOffset, entry.compressedSectors);
  if (walk.addend < 0) walk.meta.noteCompressedDrop(walk.l1Index * walk.geometry.l2Entries + l2Index, entry.hostOffset, walk.ranges[2 * pair + 1]);
}

/**
 * The host ranges whose refcounts the used entries of one L2 table hold,
 * into walk.ranges as [hostOffset, lengthBytes] pairs: contiguous standard
 * clusters merged, each compressed cluster alone (several may share a host
 * cluster, each adding one). Returns how many pairs. Synchronous and
 * allocation-free: the hot part of a pass, kept small so V8 optimizes it
 * cheaply (one async function holding it all cost ~50 ms of TurboFan time
 * in every fresh process).
 */
function tableRanges(table: CachedTable, walk: TreeWalk, usedCount: number): number {
  const view = table.view;
  const used = walk.used;
  const ranges = walk.ranges;
  const cs = walk.geometry.clusterSizeBytes;
  const entryBytes = walk.geometry.l2EntryBytes;
  let pairs = 0;
  let runStart = -1;
  let runBytes = 0;
  for (let u = 0; u < usedCount; u++) {
    const l2Index = used[u];
    const hi = view.getUint32(l2Index * entryBytes);
    const lo = view.getUint32(l2Index * entryBytes + 4);
    if ((hi & HI_COMPRESSED) !== 0) {
      compressedRange(walk, hi, lo, table.hostOffset, l2Index, pairs++);
      continue;
    }
    const hiOffset = hi & HI_OFFSET_MASK;
    const hostOffset = hiOffset * TWO_POW_32 + ((lo & LO_OFFSET_MASK) >>> 0);
    if (hostOffset === 0) continue; // unallocated or zero-plain
    if (hiOffset >= HI_OFFSET_UNSAFE || hostOffset % cs !== 0) {
      throw corruption(`Cluster allocation offset 0x${hostOffset.toString(16)} unaligned (L2 offset: 0x${table.hostOffset.toString(16)}, L2 index: 0x${l2Index.toString(16)})`);
    }
    if (hostOffset >= walk.fileEndBytes) throw beyondFileEnd(`Data cluster of L2 index ${l2Index} in the table at 0x${table.hostOffset.toString(16)}`, hostOffset);
    if (runStart >= 0 && runStart + runBytes === hostOffset) {
      runBytes += cs;
      continue;
    }
    if (runStart >= 0) {
      ranges[2 * pairs] = runStart;
      ranges[2 * pairs++ + 1] = runBytes;
    }
    runStart = hostOffset;
    runBytes = cs;
  }
  if (runStart >= 0) {
    ranges[2 * pairs] = runStart;
    ranges[2 * pairs++ + 1] = runBytes;
  }
  return pairs;
}

/**
 * Rebuild COPIED in the used entries walk.used[from..usedCount) of a table
 * from the refcounts now in place (compressed and unallocated entries never
 * carry it; after a raise every cluster of the tree counts at least 2, so no
 * lookup). Marks the table dirty when it changed. Returns usedCount when
 * done, or the position of an entry whose refcount block is not cached
 * (the caller loads it and calls again from there).
 */
function rebuildTableCopied(table: CachedTable, walk: TreeWalk, from: number, usedCount: number): number {
  const view = table.view;
  const used = walk.used;
  const cs = walk.geometry.clusterSizeBytes;
  const entryBytes = walk.geometry.l2EntryBytes;
  const lookup = walk.addend <= 0;
  for (let u = from; u < usedCount; u++) {
    const at = used[u] * entryBytes;
    const hi = view.getUint32(at);
    let copied = false;
    if (lookup && (hi & HI_COMPRESSED) === 0) {
      const hostOffset = (hi & HI_OFFSET_MASK) * TWO_POW_32 + ((view.getUint32(at + 4) & LO_OFFSET_MASK) >>> 0);
      if (hostOffset !== 0) {
        const refcount = walk.meta.peekRefcount(hostOffset / cs);
        if (refcount === undefined) return u;
        copied = refcount === 1;
      }
    }
    if (copied !== ((hi & HI_COPIED) !== 0)) {
      view.setUint32(at, copied ? (hi | HI_COPIED) >>> 0 : (hi & ~HI_COPIED) >>> 0);
      markDirty(table, at, 4);
    }
  }
  return usedCount;
}

/** Raise the refcounts of [hostOffset, +lengthBytes) by one, journaled once done. */
async function raiseJournaled(meta: Qcow2Metadata, hostOffset: number, lengthBytes: number, journal: RaiseJournal | undefined): Promise<void> {
  await meta.increaseRefcounts(hostOffset, lengthBytes);
  journal?.push([hostOffset, lengthBytes]);
}

/**
 * Add the pass's addend to the refcounts of [hostOffset, +lengthBytes),
 * journaling raises. Not async itself: the metadata call's promise is
 * returned as is (one promise less per range of a pass).
 */
function applyAddend(walk: TreeWalk, hostOffset: number, lengthBytes: number, journal: RaiseJournal | undefined): Promise<void> | undefined {
  if (walk.addend > 0) return raiseJournaled(walk.meta, hostOffset, lengthBytes, journal);
  if (walk.addend < 0) return walk.meta.freeClusters(hostOffset, lengthBytes);
  return undefined;
}

/** Note in walk.decremented that [hostOffset, +lengthBytes) is decremented; a cluster met twice ends it (null). */
function recordDecrement(walk: TreeWalk, hostOffset: number, lengthBytes: number): void {
  const seen = walk.decremented;
  if (seen === null) return;
  const cs = walk.geometry.clusterSizeBytes;
  for (let cluster = hostOffset / cs, end = (hostOffset + lengthBytes) / cs; cluster < end; cluster++) {
    const byte = Math.floor(cluster / 8);
    const bit = 1 << cluster % 8;
    if ((seen[byte] & bit) !== 0) {
      walk.decremented = null;
      return;
    }
    seen[byte] |= bit;
  }
}

/**
 * One L2 table of a pass: its refcount updates, then COPIED in it rebuilt.
 * Returns the table when it was read uncached (pass.uncached) and changed:
 * the caller writes it back once the table's own refcount is updated, and
 * only if the table is still in use (QEMU drops a freed table from its
 * cache unwritten, so its cluster keeps the old bytes).
 */
async function walkTable(walk: TreeWalk, l2Offset: number, journal: RaiseJournal | undefined): Promise<CachedTable | null> {
  const meta = walk.meta;
  const release = meta.holdEviction();
  try {
    let table = meta.peekL2(l2Offset);
    const uncached = table === undefined && walk.uncachedBytes !== null;
    // Entries known from an earlier pass are the only ones this pass looks at: an uncached read needs only theirs.
    const known = walk.usedIndexes?.get(l2Offset);
    table ??= walk.uncachedBytes !== null ? await meta.readUncachedL2(l2Offset, walk.uncachedBytes, known) : await meta.getL2(l2Offset);
    let usedCount: number;
    if (known !== undefined) {
      walk.used.set(known);
      usedCount = known.length;
    } else {
      usedCount = usedEntryIndexes(table, walk);
      if (walk.usedIndexes !== undefined && usedCount <= walk.geometry.l2Entries * USED_CACHE_SHARE_MAX) walk.usedIndexes.set(l2Offset, walk.used.slice(0, usedCount));
    }
    if (walk.addsAddend) {
      const pairs = tableRanges(table, walk, usedCount);
      const ranges = walk.ranges;
      for (let pair = 0; pair < pairs && walk.decremented !== null; pair++) recordDecrement(walk, ranges[2 * pair], ranges[2 * pair + 1]);
      for (let pair = 0; pair < pairs; pair++) await applyAddend(walk, ranges[2 * pair], ranges[2 * pair + 1], journal);
    }
    if (!walk.rebuildsCopied) return null;
    for (let u = rebuildTableCopied(table, walk, 0, usedCount); u < usedCount; u = rebuildTableCopied(table, walk, u, usedCount)) {
      // A refcount block not in the cache: load it, then go on from that entry.
      const at = walk.used[u] * walk.geometry.l2EntryBytes;
      const hostOffset = (table.view.getUint32(at) & HI_OFFSET_MASK) * TWO_POW_32 + ((table.view.getUint32(at + 4) & LO_OFFSET_MASK) >>> 0);
      await meta.getRefcount(hostOffset / walk.geometry.clusterSizeBytes);
    }
    return uncached && table.dirtyChunks !== 0 ? table : null;
  } finally {
    release();
  }
}

/**
 * qcow2_update_snapshot_refcount: add `addend` (+1, -1 or 0) to the
 * refcount of every L2 table and data cluster reachable from `l1` (first
 * `l1Entries` entries, modified in place), and rebuild COPIED in those L2
 * tables and in `l1` from the resulting refcounts. Returns whether `l1`
 * changed. Raises are recorded in `pass.journal` when given. L1 indexes
 * marked in `pass.skipped` are left alone (a shared subtree whose change
 * another pass cancels, see switchActiveL1, or a table a -1 pass left
 * exact, see DecrementRecord): only their L1 COPIED bit is set as the pass
 * would leave it.
 *
 * Entries are read as two 32-bit halves straight from the tables, by small
 * synchronous helpers (no decoded object per entry: a pass over 1 GiB of
 * data meets 16k of them, in a process that has just started).
 */
export async function updateTreeRefcounts(
  meta: Qcow2Metadata,
  l1: Uint8Array,
  l1Entries: number,
  addend: -1 | 0 | 1,
  pass: TreePassOptions = {},
): Promise<boolean> {
  const { journal, skipped } = pass;
  const phase = pass.phase ?? "all";
  assert(!(pass.uncached === true && addend > 0 && phase === "all"), "an uncached pass does not raise and rebuild COPIED together");
  const geometry = meta.geometry;
  const cs = geometry.clusterSizeBytes;
  // A reference a cluster or more past the end of the file is corruption (as qemu-img check says);
  // refusing it here keeps a hostile pointer from making refcount blocks appear far out.
  const walk: TreeWalk = {
    meta,
    geometry,
    addend,
    fileEndBytes: Math.ceil((await meta.file.sizeBytes()) / cs) * cs,
    used: new Int32Array(geometry.l2Entries),
    ranges: new Float64Array(2 * geometry.l2Entries),
    usedIndexes: pass.usedIndexes,
    decremented: null,
    addsAddend: addend !== 0 && phase !== "copied",
    rebuildsCopied: phase !== "refcounts",
    uncachedBytes: pass.uncached === true ? new Uint8Array(cs) : null,
    l1Index: 0,
  };
  const record = pass.record;
  if (record !== undefined) {
    assert(addend === -1 && phase === "all", "only a whole -1 pass keeps a DecrementRecord");
    const bitmapBytes = Math.ceil(walk.fileEndBytes / cs / 8);
    if (bitmapBytes <= DECREMENT_BITMAP_BYTES_MAX) walk.decremented = new Uint8Array(bitmapBytes);
  }
  let l1Modified = false;
  let tablesWalked = 0;
  for (let l1Index = 0; l1Index < l1Entries; l1Index++) {
    const l1Entry = getL1Entry(l1, l1Index);
    const l2Offset = l1Entry.l2Offset;
    if (l2Offset === 0) continue;
    if (l1Entry.offsetTooLarge) throw corruption(`L2 table offset of L1 index ${l1Index} is beyond 8 PiB`);
    if (l2Offset % cs !== 0) throw corruption(`L2 table offset 0x${l2Offset.toString(16)} unaligned (L1 index: 0x${l1Index.toString(16)})`);
    if (l2Offset >= walk.fileEndBytes) throw beyondFileEnd(`L2 table of L1 index ${l1Index}`, l2Offset);
    const skip = skipped !== undefined && skipped[l1Index] === 1;
    let l2Refcount: number;
    if (skip) {
      l2Refcount = (meta.peekRefcount(l2Offset / cs) ?? (await meta.getRefcount(l2Offset / cs))) + addend;
    } else {
      walk.l1Index = l1Index;
      const unwritten = await walkTable(walk, l2Offset, journal);
      if (walk.addsAddend) await applyAddend(walk, l2Offset, cs, journal);
      if (record !== undefined) {
        record.tables.add(l2Offset);
        recordDecrement(walk, l2Offset, cs);
      }
      l2Refcount = meta.peekRefcount(l2Offset / cs) ?? (await meta.getRefcount(l2Offset / cs));
      if (unwritten !== null && l2Refcount > 0) await meta.writeUncachedL2(unwritten);
    }
    const l2Copied = l2Refcount === 1;
    if (l2Copied !== l1Entry.copied || l1Entry.reservedBitsSet) {
      setL1Entry(l1, l1Index, { l2Offset, copied: l2Copied });
      l1Modified = true;
    }
    if (++tablesWalked % TRIM_EVERY_L2_TABLES === 0) await meta.trimCaches();
  }
  if (record !== undefined) record.exact = walk.decremented !== null;
  return l1Modified;
}

/** Undo the raises of a failed pass (each range was at least 1 before, so nothing is freed). */
async function undoRaises(meta: Qcow2Metadata, journal: RaiseJournal): Promise<void> {
  for (let i = journal.length - 1; i >= 0; i--) await meta.freeClusters(journal[i][0], journal[i][1]);
  journal.length = 0;
}

/**
 * After a failure or a tree change: COPIED in the active tables from the
 * refcounts, on disk. `skipped`: L1 indexes of tables whose COPIED bits
 * stand (apply's shared tables, under which no refcount changed; the
 * tables delete's -1 pass left exact).
 */
async function rebuildActiveCopied(meta: Qcow2Metadata, usedIndexes?: UsedIndexCache, skipped?: Uint8Array): Promise<void> {
  if (await updateTreeRefcounts(meta, meta.l1, meta.header.l1Size, 0, { usedIndexes, skipped })) {
    await meta.writeCaches();
    await writeActiveL1(meta, true);
  }
}

/**
 * Failures of a header switch whose write may have reached the disk (it
 * failed, or its flush did): the new table may be live, so the caller must
 * not undo what it relies on (a leak at worst, never a refcount too low).
 */
const headerSwitchMayHaveLanded = new WeakSet<object>();

/**
 * qcow2_write_snapshots: the complete new table at a fresh place (flushed
 * with its refcounts), then header bytes 60-71 synced, then the old table
 * freed. The image's in-memory list follows the header.
 */
async function writeSnapshotTable(image: Qcow2Image, snapshots: Qcow2Snapshot[], oldTableBytes: number): Promise<void> {
  const meta = image.metadata;
  if (snapshots.length > SNAPSHOT_COUNT_MAX) {
    throw new SnapstackError("E_TOO_LARGE", `${image.name}: at most ${SNAPSHOT_COUNT_MAX} snapshots per image`, { errno: SNAPSHOT_ERRNO.EFBIG });
  }
  const encoded = encodeSnapshotTable(snapshots);
  let tableOffset = 0;
  if (encoded.length > 0) {
    tableOffset = await meta.allocClusters(encoded.length);
    await writeChecked(meta, tableOffset, encoded, null, false);
    // The allocation left a refcount block dirty, so this writes it and flushes: the table, its
    // refcounts and everything written before are durable before the header points at them.
    await meta.writeCaches();
  }
  const fields = new Uint8Array(12);
  const view = new DataView(fields.buffer);
  view.setUint32(0, snapshots.length);
  view.setBigUint64(4, BigInt(tableOffset));
  try {
    await meta.writeHeaderBytes(60, fields);
  } catch (error) {
    if (typeof error === "object" && error !== null) headerSwitchMayHaveLanded.add(error);
    throw error;
  }
  const oldTableOffset = meta.header.snapshotsOffset;
  meta.header.snapshotCount = snapshots.length;
  meta.header.snapshotsOffset = tableOffset;
  image.replaceSnapshots(snapshots);
  if (oldTableBytes > 0) await meta.freeClusters(oldTableOffset, oldTableBytes);
}

/** Map a refcount overflow to QEMU's EINVAL; keep other errors. */
function asSnapshotFailure(error: unknown): unknown {
  if (error instanceof SnapstackError && error.code === "E_TOO_LARGE" && error.details.errno === undefined) {
    return new SnapstackError("E_TOO_LARGE", error.message, { ...error.details, errno: SNAPSHOT_ERRNO.EINVAL });
  }
  return error;
}

/** Run an operation that frees clusters (holes punched in them; wiped when asked) and leave everything on disk. */
async function withFreeing<T>(meta: Qcow2Metadata, options: FreeingOptions, fn: () => Promise<T>): Promise<T> {
  return meta.whileFreeing(options, async () => {
    const result = await fn();
    await meta.completeFreeing();
    return result;
  });
}

/**
 * `qemu-img snapshot -c NAME`: a disk-only snapshot of the active state.
 * Returns the new entry as listed.
 */
export async function createSnapshot(image: Qcow2Image, name: string, options: CreateSnapshotOptions = {}): Promise<Qcow2SnapshotInfo> {
  const date = options.date ?? snapshotDateNow();
  const storedName = truncateUtf8(name, SNAPSHOT_NAME_BYTES_MAX);
  return image.exclusive("create a snapshot", async () => {
    const meta = image.metadata;
    const { snapshots, tableBytes } = await readSnapshotTable(meta);
    const id = nextSnapshotId(snapshots);
    if (findSnapshot(snapshots, id, "id") >= 0) {
      throw new SnapstackError("E_SNAPSHOT_EXISTS", `${image.name}: snapshot ID ${id} already exists`, { errno: SNAPSHOT_ERRNO.EEXIST });
    }
    if (snapshots.length >= SNAPSHOT_COUNT_MAX) {
      throw new SnapstackError("E_TOO_LARGE", `${image.name}: at most ${SNAPSHOT_COUNT_MAX} snapshots per image`, { errno: SNAPSHOT_ERRNO.EFBIG });
    }
    const l1Entries = meta.header.l1Size;
    const snapshot: Qcow2Snapshot = {
      l1TableOffset: 0,
      l1Size: l1Entries,
      id,
      name: storedName,
      dateSeconds: date.seconds,
      dateNanoseconds: date.nanoseconds,
      vmClockNanoseconds: 0,
      vmStateSizeBytes: 0,
      diskSizeBytes: guestSizeOf(meta.header), // QEMU: total_sectors * 512
      icount: 0,
      extraDataSizeBytes: 0,
      unknownExtraData: new Uint8Array(0),
    };
    const next = [...snapshots, snapshot];
    // Fail before touching anything when the table would be too large.
    try {
      encodeSnapshotTable(next);
    } catch (error) {
      throw error instanceof SnapstackError ? new SnapstackError(error.code, `${image.name}: ${error.message}`, { errno: SNAPSHOT_ERRNO.EFBIG }) : error;
    }

    await meta.writeCaches();
    // The snapshot's L1 table: the active one as it is now (its COPIED bits stale afterwards, as QEMU's).
    const l1Copy = meta.l1.slice(0, l1Entries * L1_ENTRY_BYTES);
    const journal: RaiseJournal = [];
    try {
      // The +1 pass in two walks through one buffer: the raises first, then (once the refcount
      // blocks are flushed, which the first table written waits for) COPIED cleared and each table
      // written at once. Reading a table twice from the page cache costs less than faulting in a
      // fresh buffer for each.
      const usedIndexes: UsedIndexCache = new Map();
      let l1Modified = await updateTreeRefcounts(meta, meta.l1, l1Entries, 1, { journal, phase: "refcounts", uncached: true, usedIndexes });
      // Written once the raises are known to fit, so a refcount overflow refuses the snapshot with
      // the file as it was (QEMU writes it first and leaks it). The raises allocate and free nothing,
      // so it lands where QEMU's allocation before them puts it. Durable with the first flush below,
      // long before the header points at it.
      if (l1Entries > 0) {
        snapshot.l1TableOffset = await meta.allocClusters(l1Copy.length);
        await writeChecked(meta, snapshot.l1TableOffset, l1Copy, null, false);
      }
      l1Modified = (await updateTreeRefcounts(meta, meta.l1, l1Entries, 1, { phase: "copied", uncached: true, usedIndexes })) || l1Modified;
      await writeRaisedCaches(meta);
      // Only COPIED bits were cleared (safe in any order); durable with the table's flush.
      if (l1Modified) await writeActiveL1(meta, false);
      await withFreeing(meta, options, () => writeSnapshotTable(image, next, tableBytes));
    } catch (error) {
      // Nothing points at the raises or the L1 copy yet (the header was not switched): undo both.
      if (meta.header.snapshotCount === snapshots.length && !(typeof error === "object" && error !== null && headerSwitchMayHaveLanded.has(error))) {
        try {
          await undoRaises(meta, journal);
          if (snapshot.l1TableOffset !== 0) await meta.freeClusters(snapshot.l1TableOffset, l1Entries * L1_ENTRY_BYTES);
          // On corruption the refcounts cannot be trusted: COPIED is not recomputed from them (QEMU writes nothing more).
          if (!(error instanceof SnapstackError && error.code === "E_CORRUPT_IMAGE")) await rebuildActiveCopied(meta);
          await meta.writeCaches();
        } catch {
          // Best effort: what is left is leaked clusters, never a wrong reference.
        }
      }
      throw asSnapshotFailure(error);
    }
    return listSnapshots(image)[next.length - 1];
  });
}

/**
 * `qemu-img snapshot -a REF`: make the active state the snapshot's again
 * (REF is an ID, else a name). The virtual size becomes the snapshot's.
 */
export async function applySnapshot(image: Qcow2Image, ref: string, options: FreeingOptions = {}): Promise<void> {
  // bdrv_snapshot_goto refuses while the image has persistent dirty bitmaps, before it looks for the snapshot.
  if (image.bitmapCount > 0) {
    const reason = "Device has active dirty bitmaps";
    throw new SnapstackError("E_IN_USE", `${image.name}: ${reason}`, { path: image.name, errno: SNAPSHOT_ERRNO.EBUSY, reason });
  }
  const found = findSnapshot(image.snapshots, ref, "id-or-name");
  if (found < 0) throw notFound(image, ref);
  const meta = image.metadata;
  await validateSnapshotL1(meta, image.snapshots[found]);
  await meta.whileFreeing(options, async () => {
    // qcow2_snapshot_goto resizes first (what a shrink frees is wiped below too). Its +1 pass can
    // still fail after that (a refcount overflow), with the active data past the snapshot's size
    // gone: that failure is found before the resize here, so a refused apply changes nothing.
    const diskSizeBytes = image.snapshots[found].diskSizeBytes;
    if (diskSizeBytes !== image.sizeBytes) {
      if (refcountMayOverflow(meta)) await image.exclusive("apply a snapshot", () => checkRaisesFit(meta, image.snapshots[found]));
      await image.resize(diskSizeBytes, { shrink: true });
    }
    await image.exclusive("apply a snapshot", async (drainReads) => {
      const { snapshots } = await readSnapshotTable(meta);
      const index = findSnapshot(snapshots, ref, "id-or-name");
      if (index < 0) throw notFound(image, ref);
      await withFreeing(meta, options, () => switchActiveL1(meta, snapshots[index], drainReads));
    });
  });
}

/**
 * Whether a refcount of a consistent image can reach the maximum (one
 * reference per L1 table, or one per compressed sector, each): only then can
 * a +1 pass overflow (sharedSubtrees declines to skip shared tables then).
 */
function refcountMayOverflow(meta: Qcow2Metadata): boolean {
  const { clusterSizeBytes, refcountMax } = meta.geometry;
  return (clusterSizeBytes / COMPRESSED_SECTOR_BYTES) * (meta.header.snapshotCount + 1) >= refcountMax;
}

/** Raise the snapshot's tree's refcounts and undo it: throws the +1 pass's refusal (E_TOO_LARGE) if one overflows. */
async function checkRaisesFit(meta: Qcow2Metadata, snapshot: Qcow2Snapshot): Promise<void> {
  const snapshotL1 = await readL1(meta, snapshot.l1TableOffset, snapshot.l1Size);
  const journal: RaiseJournal = [];
  try {
    await updateTreeRefcounts(meta, snapshotL1, snapshot.l1Size, 1, { journal, phase: "refcounts", uncached: true });
  } catch (error) {
    throw asSnapshotFailure(error);
  } finally {
    await undoRaises(meta, journal);
  }
}

/**
 * The L2 tables a snapshot's L1 and the active L1 share, paired by host
 * offset: flags per L1 index of each. Null when a refcount could reach the
 * maximum in a consistent image, where QEMU's +1 pass over a shared table
 * may overflow and must be done for real (refcount_bits below 16 with many
 * snapshots or compressed clusters).
 */
function sharedSubtrees(meta: Qcow2Metadata, snapshotL1: Uint8Array, snapshotEntries: number, activeL1: Uint8Array, activeEntries: number): { inSnapshot: Uint8Array; inActive: Uint8Array } | null {
  if (refcountMayOverflow(meta)) return null;
  const activeIndexes = new Map<number, number[]>();
  for (let i = 0; i < activeEntries; i++) {
    const l2Offset = getL1Entry(activeL1, i).l2Offset;
    if (l2Offset === 0) continue;
    const indexes = activeIndexes.get(l2Offset);
    if (indexes === undefined) activeIndexes.set(l2Offset, [i]);
    else indexes.push(i);
  }
  const inSnapshot = new Uint8Array(snapshotEntries);
  const inActive = new Uint8Array(activeEntries);
  for (let i = 0; i < snapshotEntries; i++) {
    const l2Offset = getL1Entry(snapshotL1, i).l2Offset;
    const activeIndex = l2Offset === 0 ? undefined : activeIndexes.get(l2Offset)?.pop();
    if (activeIndex === undefined) continue;
    inSnapshot[i] = 1;
    inActive[activeIndex] = 1;
  }
  return { inSnapshot, inActive };
}

/** The goto proper: raise the snapshot's tree, overwrite the active L1, lower the old tree. */
async function switchActiveL1(meta: Qcow2Metadata, snapshot: Qcow2Snapshot, drainReads: () => Promise<void>): Promise<void> {
  await meta.writeCaches();
  await meta.growL1(snapshot.l1Size, true);
  const l1Entries = meta.header.l1Size;
  const snapshotL1 = await readL1(meta, snapshot.l1TableOffset, snapshot.l1Size);
  // The new active L1: the snapshot's entries, padded with zeroes, COPIED cleared (always safe;
  // the final pass sets it where the refcount is 1), so no state on disk claims a shared table.
  const newL1 = new Uint8Array(l1Entries * L1_ENTRY_BYTES);
  for (let i = 0; i < snapshot.l1Size; i++) {
    const entry = getL1Entry(snapshotL1, i);
    if (entry.l2Offset !== 0) setL1Entry(newL1, i, { l2Offset: entry.l2Offset, copied: false });
  }
  const shared = sharedSubtrees(meta, snapshotL1, snapshot.l1Size, meta.l1, l1Entries);
  const usedIndexes: UsedIndexCache = new Map();
  const journal: RaiseJournal = [];
  try {
    const snapshotL1Modified = await updateTreeRefcounts(meta, snapshotL1, snapshot.l1Size, 1, { journal, skipped: shared?.inSnapshot, usedIndexes });
    await writeRaisedCaches(meta);
    // Stale COPIED bits in a snapshot's L1 mean nothing; no ordering needed.
    if (snapshotL1Modified) await writeChecked(meta, snapshot.l1TableOffset, snapshotL1, "inactive L1 table", false);
  } catch (error) {
    try {
      await undoRaises(meta, journal);
      await rebuildActiveCopied(meta);
      await meta.writeCaches();
    } catch {
      // Leaks at worst.
    }
    throw asSnapshotFailure(error);
  }
  const oldL1 = meta.l1.slice(0, l1Entries * L1_ENTRY_BYTES);
  await writeChecked(meta, meta.header.l1TableOffset, newL1, "active L1 table", true);
  meta.l1.set(newL1);
  meta.overlap.invalidate(); // the active L1 now points at the snapshot's L2 tables
  // Reads that resolved through the old tree finish before its clusters can be freed.
  await drainReads();
  await updateTreeRefcounts(meta, oldL1, l1Entries, -1, { skipped: shared?.inActive, usedIndexes });
  // The new active L1 is the snapshot's (indexes alike): its shared tables need no new COPIED bits.
  await rebuildActiveCopied(meta, usedIndexes, shared?.inSnapshot);
}

/**
 * `qemu-img snapshot -d NAME`: remove the snapshot (by name, first match,
 * unless `by: "id"`) and free what only it referenced.
 */
export async function deleteSnapshot(image: Qcow2Image, ref: string, options: DeleteSnapshotOptions = {}): Promise<void> {
  const match: SnapshotMatch = options.by ?? "name";
  if (findSnapshot(image.snapshots, ref, match) < 0) throw notFound(image, ref);
  await image.exclusive("delete a snapshot", async () => {
    const meta = image.metadata;
    const { snapshots, tableBytes } = await readSnapshotTable(meta);
    const index = findSnapshot(snapshots, ref, match);
    if (index < 0) throw notFound(image, ref);
    const snapshot = snapshots[index];
    await validateSnapshotL1(meta, snapshot);
    await withFreeing(meta, options, async () => {
      await meta.writeCaches();
      await writeSnapshotTable(
        image,
        snapshots.filter((_, i) => i !== index),
        tableBytes,
      );
      // From here on a failure leaks clusters only.
      const l1 = await readL1(meta, snapshot.l1TableOffset, snapshot.l1Size);
      const usedIndexes: UsedIndexCache = new Map();
      const record: DecrementRecord = { tables: new Set(), exact: false };
      // Lowering first writes each L2 table, then the refcount blocks: the tables go out as they are walked.
      await updateTreeRefcounts(meta, l1, snapshot.l1Size, -1, { usedIndexes, record, uncached: true });
      if (snapshot.l1Size > 0) await meta.freeClusters(snapshot.l1TableOffset, snapshot.l1Size * L1_ENTRY_BYTES);
      // Usually the active state shares most tables with the snapshot: those the pass left exact.
      await rebuildActiveCopied(meta, usedIndexes, record.exact ? activeIndexesOf(meta, record.tables) : undefined);
    });
  });
}

/** Flags per active L1 index: 1 where its L2 table is one of `tables`. */
function activeIndexesOf(meta: Qcow2Metadata, tables: ReadonlySet<number>): Uint8Array {
  const entries = meta.header.l1Size;
  const flags = new Uint8Array(entries);
  for (let i = 0; i < entries; i++) {
    const l2Offset = getL1Entry(meta.l1, i).l2Offset;
    if (l2Offset !== 0 && tables.has(l2Offset)) flags[i] = 1;
  }
  return flags;
}

/**
 * Whether the active L1 table or a snapshot's maps `guestCluster` to the
 * compressed data at `hostOffset` (Qcow2Metadata.compressedDataMapped: a
 * wipe zeroes dropped compressed data only once nothing maps it). A
 * compressed cluster is mapped only at its own guest offset, so one entry
 * per tree is looked at; a snapshot's L1 entry is read from the file.
 */
export async function compressedDataMapped(meta: Qcow2Metadata, snapshots: readonly Qcow2Snapshot[], guestCluster: number, hostOffset: number): Promise<boolean> {
  const { l2Entries, l2EntryBytes, clusterBits } = meta.geometry;
  const l1Index = Math.floor(guestCluster / l2Entries);
  const at = (guestCluster % l2Entries) * l2EntryBytes;
  const l2Offsets: number[] = [];
  if (l1Index < meta.header.l1Size) l2Offsets.push(getL1Entry(meta.l1, l1Index).l2Offset);
  for (const snapshot of snapshots) {
    if (l1Index >= snapshot.l1Size) continue;
    const entry = await readL1(meta, snapshot.l1TableOffset + l1Index * L1_ENTRY_BYTES, 1);
    l2Offsets.push(getL1Entry(entry, 0).l2Offset);
  }
  const word = new Uint8Array(8);
  const view = new DataView(word.buffer);
  for (const l2Offset of l2Offsets) {
    if (l2Offset === 0) continue;
    const table = meta.peekL2(l2Offset);
    if (table !== undefined) word.set(table.bytes.subarray(at, at + 8));
    else await meta.file.read(l2Offset + at, word);
    const hi = view.getUint32(0);
    if ((hi & HI_COMPRESSED) !== 0 && decodeL2EntryWords(hi, view.getUint32(4), clusterBits).hostOffset === hostOffset) return true;
  }
  return false;
}

/**
 * Which internal snapshot a `-l` value names (qemu's snapshot_param):
 * `ID_OR_NAME` (an ID first, then a name: bdrv_snapshot_load_tmp_by_id_or_name),
 * or `snapshot.id=ID` and/or `snapshot.name=NAME` (both must match when both
 * are given: find_snapshot_by_id_and_name).
 */
export type SnapshotSelector = { idOrName: string } | { id?: string; name?: string };

/** The snapshot `selector` names, or E_SNAPSHOT_NOT_FOUND. */
export function selectSnapshot(image: Qcow2Image, selector: SnapshotSelector): Qcow2Snapshot {
  const snapshots = image.snapshots;
  let index: number;
  let label: string;
  if ("idOrName" in selector) {
    index = findSnapshot(snapshots, selector.idOrName, "id-or-name");
    label = selector.idOrName;
  } else {
    const { id, name } = selector;
    assert(id !== undefined || name !== undefined, "a snapshot selector names an ID or a name");
    index = snapshots.findIndex((s) => (id === undefined || s.id === id) && (name === undefined || truncateUtf8(s.name, SNAPSHOT_NAME_BYTES_MAX) === name));
    label = [id === undefined ? "" : `id=${id}`, name === undefined ? "" : `name=${name}`].filter(Boolean).join(",");
  }
  if (index < 0) throw notFound(image, label);
  return snapshots[index];
}
