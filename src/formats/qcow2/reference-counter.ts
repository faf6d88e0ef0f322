/**
 * The metadata walk behind `check` and the refcount rebuild: which host
 * clusters does the image reference, and how often (QEMU's
 * `calculate_refcounts` in block/qcow2-refcount.c, 7.2 semantics).
 *
 * Design notes
 * - Counted, in QEMU's order: the header cluster; the active L1, its L2
 *   tables and every data cluster they reach (normal and preallocated-zero:
 *   one cluster; compressed: every host cluster touched by
 *   [offset, end of its last 512-byte sector), +1 each); each internal
 *   snapshot's L1 and what it reaches; the snapshot table; the refcount
 *   table; the LUKS header; the bitmap directory, bitmap tables and bitmap
 *   data; finally the refcount blocks (check_refblocks).
 * - The counts live in `ClusterCounts`, one 32-bit counter per host cluster
 *   of the file (QEMU's "in-memory refcount table", IMRT). A reference that
 *   ends one cluster or more past EOF is not counted but reported as a
 *   corruption, so the array never needs more than file clusters + 1
 *   entries; the file itself is bounded by `CHECK_CLUSTERS_MAX`.
 *   A counter saturates at the image's refcount maximum and reports the
 *   overflow as QEMU does ("ERROR: overflow cluster offset=...").
 * - Every problem QEMU reports becomes a line in `CheckReport.messages`
 *   (the exact text qemu-img prints on stderr, without its "qemu-img: "
 *   prefix) and a counter; nothing here throws on bad bytes. Work is bounded
 *   without recursion: the structure is L1 -> L2 -> data, and the number of
 *   L2 entries examined is capped by `L2_ENTRIES_VISITED_MAX` (a hostile
 *   image can make many snapshot L1s point at the same tables).
 * - Stored refcounts are read through `StoredRefcounts`, which mirrors
 *   `qcow2_get_refcount` (an unaligned refcount block is an I/O error plus a
 *   one-time "Image is corrupt" notice) and can write single entries back
 *   for repairs.
 * - The snapshot table is read tolerantly here (QEMU's
 *   qcow2_check_read_snapshot_table): only what the walk needs (L1 offset
 *   and size, id, name, entry sizes), accepting garbage that the strict
 *   codec in snapshot-table.ts refuses, because check must report such
 *   tables rather than fail on them.
 */
import { SnapstackError, assert } from "../../base/errors.ts";
import type { ImageFile } from "../../io/file.ts";
import { BITMAP_DIRECTORY_BYTES_MAX, BITMAP_TABLE_ENTRY_BYTES, decodeBitmapDirectory, decodeBitmapTableEntry } from "./bitmap-directory.ts";
import { COMPRESSED_SECTOR_BYTES, getL2Entry, l2EntryBytes, l2EntriesPerTable, decodeL1EntryWords, compressedLayout } from "./entries.ts";
import type { L2Entry } from "./entries.ts";
import { decodeQcow2Header, dataFileRawRefusal, AUTOCLEAR_BITMAPS, CRYPT_LUKS, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, QCOW2_HEADER_PROBE_BYTES, decodeQcow2ClusterBits, guestSizeOf } from "./header.ts";
import type { Qcow2Header } from "./header.ts";
import type { MetadataStructure } from "./metadata-overlap.ts";
import { REFTABLE_BYTES_MAX, REFTABLE_ENTRY_BYTES, getRefcount, refcountMax, refcountsPerBlock, setRefcount } from "./refcount-block.ts";
import { encodeSnapshotEntryTail, SNAPSHOT_COUNT_MAX, SNAPSHOT_KNOWN_EXTRA_BYTES, SNAPSHOT_EXTRA_DATA_BYTES_MAX, SNAPSHOT_HEADER_BYTES, SNAPSHOT_TABLE_BYTES_MAX, SNAPSHOT_V3_EXTRA_BYTES_MIN } from "./snapshot-table.ts";

/**
 * Largest file (in clusters) check and rebuild accept: the counts take 4
 * bytes per cluster, so this bounds their memory to 512 MiB (8 TiB of file
 * with 64 KiB clusters, 64 GiB with 512-byte clusters). QEMU's own bound is
 * INT_MAX clusters.
 */
export const CHECK_CLUSTERS_MAX = 2 ** 27;
/**
 * L2 entries examined by one walk (all L1 tables together): 2^30 entries is
 * 64 TiB of guest data at 64 KiB clusters (512 GiB at 512-byte clusters),
 * counting every snapshot, and under a minute of work. A hostile image can make many snapshot L1s point at
 * the same tables; beyond this bound the walk stops with a check error.
 */
export const L2_ENTRIES_VISITED_MAX = 2 ** 30;
/**
 * Detail lines kept per check (about 100 bytes each, so ~10 MiB): a damaged
 * image can produce one or two lines per L2 entry, far more than anyone
 * reads; the rest are counted.
 */
export const CHECK_MESSAGES_MAX = 100_000;
/** QCOW_MAX_L1_SIZE / 8: entries of any L1 table. */
export const L1_ENTRIES_MAX = (32 * 1024 * 1024) / 8;
/** Refblocks cached while comparing (sequential access needs one; COPIED checks jump around). */
const REFBLOCK_CACHE_BYTES_MAX = 32 * 1024 * 1024;

/** BdrvCheckMode bits. */
export const FIX_LEAKS = 1;
export const FIX_ERRORS = 2;
export type FixMode = number;

const INT64_MAX = 2 ** 63 - 1;

// ---------------------------------------------------------------------------
// Formatting helpers: QEMU prints with %PRIx64 (bare hex) or %#PRIx64 (0x..,
// but plain "0" for zero).

export function hex(value: number | bigint): string {
  return BigInt(value).toString(16);
}

export function hexAlt(value: number | bigint): string {
  return BigInt(value) === 0n ? "0" : `0x${hex(value)}`;
}

/** strerror() texts for the errnos check can end with. */
export const STRERROR = {
  EIO: "Input/output error",
  EINVAL: "Invalid argument",
  EFBIG: "File too large",
  ENOMEM: "Cannot allocate memory",
  ENOSPC: "No space left on device",
} as const;

/** qemu-img prints lines that go through error_report() with its name first. */
export const QEMU_IMG_PREFIX = "qemu-img: ";

/** A check that could not complete: qemu-img prints "Check failed: <strerror>" and exits 1. */
export class CheckFailure extends Error {
  readonly strerror: string;
  constructor(strerror: string) {
    super(strerror);
    this.name = "CheckFailure";
    this.strerror = strerror;
  }
}

// ---------------------------------------------------------------------------

/** QEMU's BdrvCheckResult plus the stderr lines. */
export class CheckReport {
  checkErrors = 0;
  corruptions = 0;
  leaks = 0;
  corruptionsFixed = 0;
  leaksFixed = 0;
  imageEndOffset = 0;
  totalClusters = 0;
  allocatedClusters = 0;
  fragmentedClusters = 0;
  compressedClusters = 0;
  readonly messages: string[] = [];
  /** Lines beyond CHECK_MESSAGES_MAX, counted but not kept. */
  messagesDropped = 0;

  say(line: string): void {
    if (this.messages.length < CHECK_MESSAGES_MAX) this.messages.push(line);
    else this.messagesDropped++;
  }

  /** The kept lines, plus a note when some were dropped. */
  allMessages(): string[] {
    if (this.messagesDropped === 0) return this.messages;
    return [...this.messages, `(${this.messagesDropped} more lines not kept)`];
  }

  /** The counters as a plain snapshot (QEMU copies BdrvCheckResult by value). */
  saveCounters(): CheckCounters {
    return {
      checkErrors: this.checkErrors,
      corruptions: this.corruptions,
      leaks: this.leaks,
      corruptionsFixed: this.corruptionsFixed,
      leaksFixed: this.leaksFixed,
    };
  }

  restoreCounters(counters: CheckCounters): void {
    Object.assign(this, counters);
  }
}

export interface CheckCounters {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
}

/**
 * References per host cluster (QEMU's IMRT): a growable array of counters
 * saturating at `countMax`.
 */
export class ClusterCounts {
  #counts: Uint32Array;
  #size: number;
  readonly countMax: number;

  constructor(clusterCount: number, countMax: number) {
    assert(clusterCount >= 0 && clusterCount <= CHECK_CLUSTERS_MAX, `cluster count ${clusterCount} within limit`);
    this.#size = clusterCount;
    this.#counts = new Uint32Array(Math.max(clusterCount, 16));
    this.countMax = Math.min(countMax, 0xffffffff);
  }

  /** Number of clusters covered (QEMU's nb_clusters, grows with references just past EOF and allocations). */
  get size(): number {
    return this.#size;
  }

  get(cluster: number): number {
    return cluster < this.#size ? this.#counts[cluster] : 0;
  }

  set(cluster: number, value: number): void {
    assert(cluster < this.#size && value <= this.countMax, `cluster ${cluster} in counts and value ${value} in range`);
    this.#counts[cluster] = value;
  }

  /** Grow to `clusterCount` clusters (new ones zero); false when beyond CHECK_CLUSTERS_MAX. */
  grow(clusterCount: number): boolean {
    if (clusterCount <= this.#size) return true;
    if (clusterCount > CHECK_CLUSTERS_MAX) return false;
    if (clusterCount > this.#counts.length) {
      const grown = new Uint32Array(Math.min(CHECK_CLUSTERS_MAX, Math.max(clusterCount, this.#counts.length * 2)));
      grown.set(this.#counts.subarray(0, this.#size));
      this.#counts = grown;
    }
    this.#size = clusterCount;
    return true;
  }

  clear(): void {
    this.#counts.fill(0);
  }
}

// ---------------------------------------------------------------------------

export interface SnapshotRef {
  l1TableOffset: number;
  /** Exact hex of the on-disk L1 offset (it may exceed 2^53 in a damaged table). */
  l1TableOffsetHex: string;
  l1Size: number;
  id: string;
  name: string;
  extraDataSizeBytes: number;
  /** The entry as read, for rewriting the table: the 40-byte fixed part, the kept extra data (at most SNAPSHOT_EXTRA_DATA_BYTES_MAX), id and name. */
  raw: { fixed: Uint8Array; extra: Uint8Array; id: Uint8Array; name: Uint8Array };
}

export interface BitmapDirectoryRef {
  directoryOffset: number;
  directorySizeBytes: number;
  bitmapCount: number;
}

/**
 * What QEMU keeps in BDRVQcow2State that check needs: geometry, the active
 * L1 table, the refcount table, the snapshot list.
 */
export interface Qcow2CheckState {
  file: ImageFile;
  header: Qcow2Header;
  clusterBits: number;
  clusterSizeBytes: number;
  extendedL2: boolean;
  hasDataFile: boolean;
  /** Entries per L2 table and bytes per entry. */
  l2Entries: number;
  l2EntryBytes: number;
  refcountOrder: number;
  refcountMax: number;
  refcountBlockEntries: number;
  /** Current file length; grows when check extends the file. */
  fileSizeBytes: number;
  /** Active L1 table bytes as read at open (s->l1_table), updated by COPIED repairs. */
  l1Table: Uint8Array;
  l1TableOffset: number;
  l1Size: number;
  refcountTableOffset: number;
  /** Raw refcount table entries (s->refcount_table). */
  refcountTable: BigUint64Array;
  snapshots: SnapshotRef[];
  snapshotsOffset: number;
  snapshotsSizeBytes: number;
  bitmaps: BitmapDirectoryRef | null;
  /** A corruption event was already signalled (QEMU suppresses repeats). */
  signalledCorruption: boolean;
  /** Opened for repair (QEMU's writable check: corruption marks the image). */
  writable: boolean;
}

function corruptOpen(message: string, code: "E_CORRUPT_IMAGE" | "E_TOO_LARGE" = "E_CORRUPT_IMAGE"): SnapstackError {
  return new SnapstackError(code, message);
}

/** qcow2_validate_table: size limit first, then alignment and INT64 range. */
function validateTable(offset: number, entries: number, entryBytes: number, maxBytes: number, name: string, clusterSizeBytes: number): void {
  if (entries > Math.floor(maxBytes / entryBytes)) throw corruptOpen(`${name} too large`, "E_TOO_LARGE");
  if (INT64_MAX - entries * entryBytes < offset || offset % clusterSizeBytes !== 0) throw corruptOpen(`${name} offset invalid`);
}

/** Bytes at a host offset; past EOF (including offsets beyond 2^53 from damaged tables) they read as zeroes, as in QEMU. */
async function readBytes(file: ImageFile, hostOffset: number, lengthBytes: number, into?: Uint8Array): Promise<Uint8Array> {
  const buffer = into ?? new Uint8Array(lengthBytes);
  assert(buffer.length === lengthBytes, "read buffer has the requested length");
  if (lengthBytes > 0 && Number.isSafeInteger(hostOffset + lengthBytes)) await file.read(hostOffset, buffer);
  else buffer.fill(0);
  return buffer;
}

/**
 * Open an image for check or rebuild the way qcow2_do_open does with
 * BDRV_O_CHECK: header checks, refcount table and active L1 limits, read
 * both tables. Problems that make QEMU refuse to open throw coded errors
 * (qemu-img: "Could not open '<file>': <message>", exit 1). The snapshot
 * list is left empty; readSnapshotTable fills it.
 */
export async function openCheckState(file: ImageFile, writable: boolean): Promise<Qcow2CheckState> {
  const probe = await readBytes(file, 0, QCOW2_HEADER_PROBE_BYTES);
  const clusterBits = decodeQcow2ClusterBits(probe);
  const clusterSizeBytes = 2 ** clusterBits;
  const header = decodeQcow2Header(await readBytes(file, 0, clusterSizeBytes));
  const rawDataRefusal = dataFileRawRefusal(header, `Could not open '${file.name}'`);
  if (rawDataRefusal !== null) throw rawDataRefusal;
  const fileSizeBytes = await file.sizeBytes();

  // Refcount table (qcow2_do_open; zero clusters are allowed in check mode).
  validateTable(header.refcountTableOffset, header.refcountTableClusters, clusterSizeBytes, REFTABLE_BYTES_MAX, "Reference count table", clusterSizeBytes);
  // Active L1.
  if (header.l1Size > L1_ENTRIES_MAX) throw corruptOpen("Active L1 table too large", "E_TOO_LARGE");
  const extendedL2 = (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
  const l2Entries = l2EntriesPerTable(clusterBits, extendedL2);
  const bytesPerL1Entry = clusterSizeBytes * l2Entries;
  const l1NeededEntries = Math.ceil(header.sizeBytes / bytesPerL1Entry);
  if (l1NeededEntries > 0x7fffffff) throw corruptOpen("Image is too big", "E_TOO_LARGE");
  if (header.l1Size < l1NeededEntries) throw corruptOpen("L1 table is too small");
  validateTable(header.l1TableOffset, header.l1Size, 8, L1_ENTRIES_MAX * 8, "Active L1 table", clusterSizeBytes);

  const l1Table = await readBytes(file, header.l1TableOffset, header.l1Size * 8);
  const refcountTableEntries = header.refcountTableClusters * (clusterSizeBytes / REFTABLE_ENTRY_BYTES);
  const refcountTableBytes = await readBytes(file, header.refcountTableOffset, refcountTableEntries * REFTABLE_ENTRY_BYTES);
  const refcountTable = new BigUint64Array(refcountTableEntries);
  const refcountView = new DataView(refcountTableBytes.buffer);
  for (let i = 0; i < refcountTableEntries; i++) refcountTable[i] = refcountView.getBigUint64(i * 8);

  let bitmaps: BitmapDirectoryRef | null = null;
  const bitmapsExtension = header.extensions.bitmaps;
  if (bitmapsExtension !== null && (header.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n && bitmapsExtension.bitmapCount > 0) {
    bitmaps = { ...bitmapsExtension };
  }

  return {
    file,
    header,
    clusterBits,
    clusterSizeBytes,
    extendedL2,
    hasDataFile: (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n,
    l2Entries,
    l2EntryBytes: l2EntryBytes(extendedL2),
    refcountOrder: header.refcountOrder,
    refcountMax: refcountMax(header.refcountOrder),
    refcountBlockEntries: refcountsPerBlock(clusterBits, header.refcountOrder),
    fileSizeBytes,
    l1Table,
    l1TableOffset: header.l1TableOffset,
    l1Size: header.l1Size,
    refcountTableOffset: header.refcountTableOffset,
    refcountTable,
    snapshots: [],
    snapshotsOffset: 0,
    snapshotsSizeBytes: 0,
    bitmaps,
    signalledCorruption: false,
    writable,
  };
}

export function clustersForBytes(state: Qcow2CheckState, bytes: number): number {
  return Math.ceil(bytes / state.clusterSizeBytes);
}

/**
 * qcow2_signal_corruption as seen from check: the first event prints a
 * notice; with a writable image the corrupt bit is set on disk (v3).
 */
export async function signalCorruption(state: Qcow2CheckState, report: CheckReport, message: string): Promise<void> {
  if (state.signalledCorruption) return;
  state.signalledCorruption = true;
  if (state.writable) {
    report.say(`qcow2: Marking image as corrupt: ${message}; further corruption events will be suppressed`);
    if (state.header.version === 3) {
      state.header.incompatibleFeatures |= INCOMPAT_CORRUPT;
      await writeIncompatibleFeatures(state);
    }
  } else {
    report.say(`qcow2: Image is corrupt: ${message}; further non-fatal corruption events will be suppressed`);
  }
}

/** Rewrite header bytes 72..79 (incompatible features) synchronously. */
export async function writeIncompatibleFeatures(state: Qcow2CheckState): Promise<void> {
  const bytes = new Uint8Array(8);
  new DataView(bytes.buffer).setBigUint64(0, state.header.incompatibleFeatures);
  await state.file.write(72, bytes);
  await state.file.flush();
}

// ---------------------------------------------------------------------------
// Snapshot table (qcow2_check_read_snapshot_table + qcow2_do_read_snapshots).

/**
 * Read the snapshot list for check; throws CheckFailure when the check
 * must fail (after counting a check error). With FIX_ERRORS, overhanging
 * snapshots are dropped and the header count rewritten at once; too much
 * extra data and incomplete v3 entries are counted as corruptions that
 * only rewriting the table fixes (QEMU's qcow2_check_fix_snapshot_table,
 * after the refcounts are sound). Returns how many of those there are.
 */
export async function readSnapshotTable(state: Qcow2CheckState, report: CheckReport, fix: FixMode): Promise<number> {
  const pointer = await readBytes(state.file, 60, 12);
  const pointerView = new DataView(pointer.buffer);
  let count = pointerView.getUint32(0);
  const offsetBig = pointerView.getBigUint64(4);
  let droppedCount = 0;
  let extraDataDropped = 0;

  if (count > SNAPSHOT_COUNT_MAX && fix & FIX_ERRORS) {
    report.say(`Discarding ${count - SNAPSHOT_COUNT_MAX} overhanging snapshots`);
    droppedCount += count - SNAPSHOT_COUNT_MAX;
    count = SNAPSHOT_COUNT_MAX;
  }
  // qcow2_validate_table(..., "snapshot table")
  let invalid: { message: string; strerror: string } | null = null;
  if (count > SNAPSHOT_COUNT_MAX) invalid = { message: "snapshot table too large", strerror: STRERROR.EFBIG };
  else if (BigInt(INT64_MAX) - BigInt(count * SNAPSHOT_HEADER_BYTES) < offsetBig || offsetBig % BigInt(state.clusterSizeBytes) !== 0n) {
    invalid = { message: "snapshot table offset invalid", strerror: STRERROR.EINVAL };
  }
  if (invalid !== null) {
    report.checkErrors++;
    report.say(`${QEMU_IMG_PREFIX}ERROR ${invalid.message}`);
    if (count > SNAPSHOT_COUNT_MAX) {
      report.say(`You can force-remove all ${count - SNAPSHOT_COUNT_MAX} overhanging snapshots with qemu-img check -r all`);
    }
    throw new CheckFailure(invalid.strerror);
  }
  const snapshotsOffset = Number(offsetBig);
  const repair = (fix & FIX_ERRORS) !== 0;
  const snapshots: SnapshotRef[] = [];
  let hostOffset = snapshotsOffset;
  let tableLength = 0;
  for (let i = 0; i < count; i++) {
    const entryStart = hostOffset;
    tableLength = roundUp8(tableLength);
    hostOffset = roundUp8(hostOffset);
    const fixed = await readBytes(state.file, hostOffset, SNAPSHOT_HEADER_BYTES);
    const view = new DataView(fixed.buffer);
    const l1OffsetBig = view.getBigUint64(0);
    const l1Size = view.getUint32(8);
    const idBytes = view.getUint16(12);
    const nameBytes = view.getUint16(14);
    let extraDataSizeBytes = view.getUint32(36);
    hostOffset += SNAPSHOT_HEADER_BYTES;
    let truncateExtra = false;
    if (extraDataSizeBytes > SNAPSHOT_EXTRA_DATA_BYTES_MAX) {
      if (!repair) {
        report.checkErrors++;
        report.say(`${QEMU_IMG_PREFIX}ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry ${i}`);
        report.say("You can force-remove this extra metadata with qemu-img check -r all");
        throw new CheckFailure(STRERROR.EFBIG);
      }
      report.say(`Discarding too much extra metadata in snapshot table entry ${i} (${extraDataSizeBytes} > ${SNAPSHOT_EXTRA_DATA_BYTES_MAX})`);
      extraDataDropped++;
      truncateExtra = true;
    }
    // Keep at most the allowed extra data; skip the rest (its end stays where the on-disk size says).
    const extra = repair ? await readBytes(state.file, hostOffset, Math.min(extraDataSizeBytes, SNAPSHOT_EXTRA_DATA_BYTES_MAX)) : new Uint8Array(0);
    hostOffset += extraDataSizeBytes;
    if (truncateExtra) extraDataSizeBytes = SNAPSHOT_EXTRA_DATA_BYTES_MAX;
    const idAndName = await readBytes(state.file, hostOffset, idBytes + nameBytes);
    hostOffset += idBytes + nameBytes;
    tableLength += SNAPSHOT_HEADER_BYTES + extraDataSizeBytes + idBytes + nameBytes;
    if (tableLength > SNAPSHOT_TABLE_BYTES_MAX || hostOffset - snapshotsOffset > 0x7fffffff) {
      if (!repair) {
        report.checkErrors++;
        report.say(`${QEMU_IMG_PREFIX}ERROR failed to read the snapshot table: Snapshot table is too big`);
        report.say(`You can force-remove all ${count - i} overhanging snapshots with qemu-img check -r all`);
        throw new CheckFailure(STRERROR.EFBIG);
      }
      report.say(`Discarding ${count - i} overhanging snapshots (snapshot table is too big)`);
      droppedCount += count - i;
      hostOffset = entryStart;
      break;
    }
    snapshots.push({
      l1TableOffset: l1OffsetBig > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(l1OffsetBig),
      l1TableOffsetHex: hex(l1OffsetBig),
      l1Size,
      id: decodeCString(idAndName.subarray(0, idBytes)),
      name: decodeCString(idAndName.subarray(idBytes)),
      extraDataSizeBytes,
      raw: { fixed, extra, id: cStringBytes(idAndName.subarray(0, idBytes)), name: cStringBytes(idAndName.subarray(idBytes)) },
    });
  }
  state.snapshots = snapshots;
  state.snapshotsOffset = snapshotsOffset;
  state.snapshotsSizeBytes = count === 0 ? 0 : hostOffset - snapshotsOffset;
  report.corruptions += droppedCount + extraDataDropped;

  if (droppedCount > 0) {
    const countBytes = new Uint8Array(4);
    new DataView(countBytes.buffer).setUint32(0, snapshots.length);
    await state.file.write(60, countBytes);
    await state.file.flush();
    report.corruptionsFixed += droppedCount;
    report.corruptions -= droppedCount;
  }
  let incomplete = 0;
  if (state.header.version >= 3) {
    snapshots.forEach((snapshot, i) => {
      if (snapshot.extraDataSizeBytes < SNAPSHOT_V3_EXTRA_BYTES_MIN) {
        report.corruptions++;
        incomplete++;
        report.say(`${repair ? "Repairing" : "ERROR"} snapshot table entry ${i} is incomplete`);
      }
    });
  }
  return extraDataDropped + incomplete;
}

/** A C string's bytes: up to the first NUL (QEMU keeps id and name as C strings). */
function cStringBytes(bytes: Uint8Array): Uint8Array {
  const end = bytes.indexOf(0);
  return end < 0 ? bytes : bytes.subarray(0, end);
}

/**
 * The snapshot table as qcow2_write_snapshots writes the list check read:
 * each entry 8-byte aligned, 24 bytes of known extra data (vm_state_size_large,
 * disk_size, icount; taken from the entry where present, defaults otherwise)
 * followed by the kept unknown extra data, then id and name.
 */
export function encodeCheckedSnapshotTable(state: Qcow2CheckState): Uint8Array {
  const sizes = state.snapshots.map((snapshot) => SNAPSHOT_HEADER_BYTES + Math.max(SNAPSHOT_KNOWN_EXTRA_BYTES, snapshot.raw.extra.length) + snapshot.raw.id.length + snapshot.raw.name.length);
  let total = 0;
  for (const size of sizes) total = roundUp8(total) + size;
  const out = new Uint8Array(total);
  const view = new DataView(out.buffer);
  let at = 0;
  for (const snapshot of state.snapshots) {
    at = roundUp8(at);
    const { fixed, extra, id, name } = snapshot.raw;
    const fixedView = new DataView(fixed.buffer, fixed.byteOffset, fixed.byteLength);
    const extraView = new DataView(extra.buffer, extra.byteOffset, extra.byteLength);
    const vmStateSize = extra.length >= 8 ? extraView.getBigUint64(0) : BigInt(fixedView.getUint32(32));
    const diskSize = extra.length >= 16 ? extraView.getBigUint64(8) : BigInt(guestSizeOf(state.header));
    const icount = extra.length >= 24 ? extraView.getBigInt64(16) : -1n;
    out.set(fixed.subarray(0, 12), at); // L1 offset and size
    view.setUint16(at + 12, id.length);
    view.setUint16(at + 14, name.length);
    out.set(fixed.subarray(16, 32), at + 16); // date and vm clock
    at = encodeSnapshotEntryTail(out, at, {
      vmStateSize,
      diskSize,
      icount,
      unknownExtraData: extra.length > SNAPSHOT_KNOWN_EXTRA_BYTES ? extra.subarray(SNAPSHOT_KNOWN_EXTRA_BYTES) : new Uint8Array(0),
      id,
      name,
    });
  }
  return out;
}

function roundUp8(value: number): number {
  return Math.ceil(value / 8) * 8;
}

const latin1 = new TextDecoder("utf-8");
/** QEMU keeps id and name as C strings: they end at the first NUL. */
function decodeCString(bytes: Uint8Array): string {
  const end = bytes.indexOf(0);
  return latin1.decode(end < 0 ? bytes : bytes.subarray(0, end));
}

// ---------------------------------------------------------------------------
// Stored refcounts (qcow2_get_refcount) with a small refblock cache.

export type StoredRefcount = number | { error: string };

/** A refcount block as qcow2_get_refcount finds it: absent (all zero), an error, or its bytes. */
type RefblockLookup = { kind: "absent" } | { kind: "error"; error: string } | { kind: "block"; hostOffset: number; bytes: Uint8Array } | { kind: "past-any-file" };

/** The largest offset QEMU's block layer reads at (BDRV_MAX_LENGTH: INT64_MAX rounded down to 1 GiB). */
const BDRV_MAX_LENGTH_BIG = (2n ** 63n - 1n) & ~(2n ** 30n - 1n);

export class StoredRefcounts {
  readonly #state: Qcow2CheckState;
  readonly #report: CheckReport;
  readonly #blocks = new Map<number, Uint8Array>();
  readonly #blocksMax: number;

  constructor(state: Qcow2CheckState, report: CheckReport) {
    this.#state = state;
    this.#report = report;
    this.#blocksMax = Math.max(4, Math.floor(REFBLOCK_CACHE_BYTES_MAX / state.clusterSizeBytes));
  }

  /** Drop cached blocks (after the refcount structure was replaced). */
  invalidate(): void {
    this.#blocks.clear();
  }

  async #lookup(cluster: number): Promise<RefblockLookup> {
    const state = this.#state;
    const tableIndex = Math.floor(cluster / state.refcountBlockEntries);
    if (tableIndex >= state.refcountTable.length) return { kind: "absent" };
    const offsetBig = state.refcountTable[tableIndex] & ~0x1ffn;
    if (offsetBig === 0n) return { kind: "absent" };
    if (offsetBig % BigInt(state.clusterSizeBytes) !== 0n) {
      await signalCorruption(state, this.#report, `Refblock offset ${hexAlt(offsetBig)} unaligned (reftable index: ${hexAlt(tableIndex)})`);
      return { kind: "error", error: STRERROR.EIO };
    }
    if (offsetBig > BigInt(Number.MAX_SAFE_INTEGER)) {
      // Far past the end of any file: QEMU's read there returns zeroes (refcount 0), until its block layer refuses the offset.
      return offsetBig + BigInt(state.clusterSizeBytes) > BDRV_MAX_LENGTH_BIG ? { kind: "error", error: STRERROR.EIO } : { kind: "past-any-file" };
    }
    const hostOffset = Number(offsetBig);
    let bytes = this.#blocks.get(hostOffset);
    if (bytes !== undefined) {
      this.#blocks.delete(hostOffset);
    } else {
      bytes = await readBytes(state.file, hostOffset, state.clusterSizeBytes);
      if (this.#blocks.size >= this.#blocksMax) {
        const oldest = this.#blocks.keys().next().value;
        if (oldest !== undefined) this.#blocks.delete(oldest);
      }
    }
    this.#blocks.set(hostOffset, bytes);
    return { kind: "block", hostOffset, bytes };
  }

  async get(cluster: number): Promise<StoredRefcount> {
    const found = await this.#lookup(cluster);
    if (found.kind === "absent" || found.kind === "past-any-file") return 0;
    if (found.kind === "error") return { error: found.error };
    return getRefcount(found.bytes, cluster % this.#state.refcountBlockEntries, this.#state.refcountOrder);
  }

  /**
   * Set one stored refcount (QEMU's update_refcount on a single cluster).
   * Only used where the refcount block exists (a mismatch with a non-zero
   * stored value); returns an error text otherwise.
   */
  async set(cluster: number, value: number): Promise<string | null> {
    const state = this.#state;
    const found = await this.#lookup(cluster);
    if (found.kind === "absent") return STRERROR.EINVAL;
    if (found.kind === "error") return found.error;
    if (found.kind === "past-any-file") return STRERROR.EFBIG; // QEMU's write there: past the largest file
    if (value > state.refcountMax) return STRERROR.EINVAL;
    setRefcount(found.bytes, cluster % state.refcountBlockEntries, state.refcountOrder, value);
    await state.file.write(found.hostOffset, found.bytes);
    // QCOW2_DISCARD_ALWAYS: a freed cluster is discarded (QEMU punches a hole).
    if (value === 0) await state.file.discard(cluster * state.clusterSizeBytes, state.clusterSizeBytes);
    return null;
  }
}

// ---------------------------------------------------------------------------
// Metadata overlap check (qcow2_check_metadata_overlap with the default
// "cached" set: everything but inactive L2 tables).

function rangesOverlap(aStart: number, aLength: number, bStart: number, bLength: number): boolean {
  return aStart < bStart + bLength && bStart < aStart + aLength;
}

/** The metadata a write to [hostOffset, +lengthBytes) would hit, or null. */
export function metadataOverlap(state: Qcow2CheckState, ignore: ReadonlySet<MetadataStructure>, hostOffset: number, lengthBytes: number): MetadataStructure | null {
  if (lengthBytes <= 0) return null;
  const cs = state.clusterSizeBytes;
  if (!ignore.has("qcow2_header") && hostOffset < cs) return "qcow2_header";
  const start = Math.floor(hostOffset / cs) * cs;
  const length = Math.ceil((hostOffset - start + lengthBytes) / cs) * cs;
  if (!ignore.has("active L1 table") && state.l1Size > 0 && rangesOverlap(start, length, state.l1TableOffset, state.l1Size * 8)) return "active L1 table";
  if (!ignore.has("refcount table") && state.refcountTable.length > 0 && rangesOverlap(start, length, state.refcountTableOffset, state.refcountTable.length * 8)) {
    return "refcount table";
  }
  if (!ignore.has("snapshot table") && state.snapshotsSizeBytes > 0 && rangesOverlap(start, length, state.snapshotsOffset, state.snapshotsSizeBytes)) return "snapshot table";
  if (!ignore.has("inactive L1 table")) {
    for (const snapshot of state.snapshots) {
      if (snapshot.l1Size > 0 && rangesOverlap(start, length, snapshot.l1TableOffset, snapshot.l1Size * 8)) return "inactive L1 table";
    }
  }
  if (!ignore.has("active L2 table")) {
    const view = new DataView(state.l1Table.buffer, state.l1Table.byteOffset, state.l1Table.byteLength);
    for (let i = 0; i < state.l1Size; i++) {
      const l2Offset = decodeL1EntryWords(view.getUint32(i * 8), view.getUint32(i * 8 + 4)).l2Offset;
      if (l2Offset !== 0 && rangesOverlap(start, length, l2Offset, cs)) return "active L2 table";
    }
  }
  if (!ignore.has("refcount block")) {
    for (const entry of state.refcountTable) {
      const blockOffset = Number(entry & ~0x1ffn);
      if (blockOffset !== 0 && rangesOverlap(start, length, blockOffset, cs)) return "refcount block";
    }
  }
  return null;
}

/**
 * qcow2_pre_write_overlap_check: false (after signalling corruption, as
 * QEMU does) when a write to the range would hit metadata not in `ignore`.
 */
export async function guardWrite(state: Qcow2CheckState, report: CheckReport, ignore: ReadonlySet<MetadataStructure>, hostOffset: number, lengthBytes: number): Promise<boolean> {
  const overlap = metadataOverlap(state, ignore, hostOffset, lengthBytes);
  if (overlap === null) return true;
  await signalCorruption(state, report, `Preventing invalid write on metadata (overlaps with ${overlap})`);
  return false;
}

// ---------------------------------------------------------------------------
// The walk (calculate_refcounts).

/** QEMU's check_refcounts_l1 flag: gather allocation/fragmentation figures (active L1 only). */
interface WalkContext {
  state: Qcow2CheckState;
  report: CheckReport;
  counts: ClusterCounts;
  fix: FixMode;
  l2EntriesVisited: number;
  /** One L2 table buffer reused by every visit (the walk is sequential). */
  l2Table: Uint8Array;
}

export interface WalkOutcome {
  /** The refcount structure cannot be trusted and needs a rebuild (QEMU's `rebuild`). */
  rebuild: boolean;
}

/**
 * qcow2_inc_refcounts_imrt: +1 on every cluster of [hostOffset, +lengthBytes).
 * A range ending one cluster or more past EOF is a corruption, not counted.
 */
export function addReferences(
  state: Qcow2CheckState,
  report: CheckReport,
  counts: ClusterCounts,
  hostOffset: number,
  lengthBytes: number,
  exactOffset: bigint = BigInt(hostOffset),
): void {
  if (lengthBytes <= 0) return;
  const cs = state.clusterSizeBytes;
  if (hostOffset + lengthBytes - state.fileSizeBytes >= cs) {
    report.say(
      `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hex(exactOffset)} size 0x${hex(lengthBytes)}`,
    );
    report.corruptions++;
    return;
  }
  const first = Math.floor(hostOffset / cs);
  const last = Math.floor((hostOffset + lengthBytes - 1) / cs);
  if (!counts.grow(last + 1)) throw new CheckFailure(STRERROR.ENOMEM);
  for (let cluster = first; cluster <= last; cluster++) {
    const count = counts.get(cluster);
    if (count >= counts.countMax) {
      report.say(`ERROR: overflow cluster offset=0x${hex(cluster * cs)}`);
      report.say("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing");
      report.corruptions++;
      continue;
    }
    counts.set(cluster, count + 1);
  }
}

/**
 * Walk every reference of the image into `counts` (which must be sized to
 * the file's clusters and zeroed). Mirrors calculate_refcounts, including
 * the repairs it does with FIX_ERRORS (preallocated zero entries that are
 * unaligned become plain zero; refcount blocks past EOF extend the file).
 */
export async function calculateRefcounts(state: Qcow2CheckState, report: CheckReport, counts: ClusterCounts, fix: FixMode): Promise<WalkOutcome> {
  const context: WalkContext = { state, report, counts, fix, l2EntriesVisited: 0, l2Table: new Uint8Array(state.l2Entries * state.l2EntryBytes) };
  const outcome: WalkOutcome = { rebuild: false };

  // header
  addReferences(state, report, counts, 0, state.clusterSizeBytes);
  // active L1
  await checkRefcountsL1(context, state.l1TableOffset, state.l1Size, true, true);

  // snapshots
  if (state.hasDataFile && state.snapshots.length > 0) {
    report.say(`ERROR ${state.snapshots.length} snapshots in image with data file`);
    report.corruptions++;
  }
  for (const snapshot of state.snapshots) {
    if (snapshot.l1TableOffset % state.clusterSizeBytes !== 0 || snapshot.l1TableOffset === Number.MAX_SAFE_INTEGER) {
      report.say(
        `ERROR snapshot ${snapshot.id} (${snapshot.name}) l1_offset=${hexAlt(BigInt(`0x${snapshot.l1TableOffsetHex}`))}: L1 table is not cluster aligned; snapshot table entry corrupted`,
      );
      report.corruptions++;
      continue;
    }
    if (snapshot.l1Size > L1_ENTRIES_MAX) {
      report.say(`ERROR snapshot ${snapshot.id} (${snapshot.name}) l1_size=${hexAlt(snapshot.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
      report.corruptions++;
      continue;
    }
    await checkRefcountsL1(context, snapshot.l1TableOffset, snapshot.l1Size, false, false);
  }
  addReferences(state, report, counts, state.snapshotsOffset, state.snapshotsSizeBytes);

  // refcount table
  addReferences(state, report, counts, state.refcountTableOffset, state.refcountTable.length * REFTABLE_ENTRY_BYTES);

  // encryption header
  const crypto = state.header.extensions.crypto;
  if (crypto !== null && state.header.cryptMethod === CRYPT_LUKS && crypto.lengthBytes > 0) {
    addReferences(state, report, counts, crypto.hostOffset, crypto.lengthBytes);
  }

  // bitmaps
  await checkBitmapsRefcounts(context);

  await checkRefblocks(context, outcome);
  return outcome;
}

async function checkRefcountsL1(context: WalkContext, l1TableOffset: number, l1Size: number, fragInfo: boolean, active: boolean): Promise<void> {
  const { state, report, counts } = context;
  if (l1Size === 0) return;
  addReferences(state, report, counts, l1TableOffset, l1Size * 8);
  const l1Table = active ? state.l1Table : await readBytes(state.file, l1TableOffset, l1Size * 8);
  const view = new DataView(l1Table.buffer, l1Table.byteOffset, l1Table.byteLength);
  for (let i = 0; i < l1Size; i++) {
    const hi = view.getUint32(i * 8);
    const lo = view.getUint32(i * 8 + 4);
    if (hi === 0 && lo === 0) continue;
    // An L2 table wholly past EOF reads as zeroes: nothing to count or report in it.
    const inFile = decodeL1EntryWords(hi, lo).l2Offset < state.fileSizeBytes;
    const entry = decodeL1EntryWords(hi, lo);
    if (entry.reservedBitsSet) {
      report.say(`ERROR found L1 entry with reserved bits set: ${hex(view.getBigUint64(i * 8))}`);
      report.corruptions++;
    }
    const l2Offset = entry.l2Offset;
    addReferences(state, report, counts, l2Offset, state.clusterSizeBytes);
    if (l2Offset % state.clusterSizeBytes !== 0) {
      report.say(`ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
      report.corruptions++;
    }
    if (inFile) await checkRefcountsL2(context, l2Offset, fragInfo, active);
  }
}

/** The L2 entry type as qcow2_get_cluster_type sees it for this image. */
export function clusterType(state: Qcow2CheckState, entry: L2Entry): L2Entry["type"] {
  let type = entry.type;
  if (state.extendedL2) {
    // Subclusters: the ZERO flag means nothing at the cluster level.
    if (type === "zero-alloc") type = "normal";
    else if (type === "zero-plain") type = "unallocated";
  }
  if (type === "unallocated" && state.hasDataFile && entry.copied) type = "normal";
  return type;
}

async function checkRefcountsL2(context: WalkContext, l2Offset: number, fragInfo: boolean, active: boolean): Promise<void> {
  const { state, report, counts, fix } = context;
  context.l2EntriesVisited += state.l2Entries;
  if (context.l2EntriesVisited > L2_ENTRIES_VISITED_MAX) {
    report.say(`ERROR: more than ${L2_ENTRIES_VISITED_MAX} L2 entries referenced; stopping the check`);
    report.checkErrors++;
    throw new CheckFailure(STRERROR.EFBIG);
  }
  const cs = state.clusterSizeBytes;
  const l2Table = await readBytes(state.file, l2Offset, state.l2Entries * state.l2EntryBytes, context.l2Table);
  const view = new DataView(l2Table.buffer);
  const { sectorCountShift } = compressedLayout(state.clusterBits);
  const offsetMask = (1n << BigInt(sectorCountShift)) - 1n;
  let nextContiguousOffset = 0;

  for (let i = 0; i < state.l2Entries; i++) {
    const rawAt = i * state.l2EntryBytes;
    // Fast path: an all-zero entry (and bitmap) is unallocated and fine.
    if (view.getUint32(rawAt) === 0 && view.getUint32(rawAt + 4) === 0) {
      if (!state.extendedL2 || (view.getUint32(rawAt + 8) === 0 && view.getUint32(rawAt + 12) === 0)) continue;
    }
    const entry = getL2Entry(view, i, state.extendedL2, state.clusterBits);
    const type = clusterType(state, entry);
    const bitmapSet = entry.allocBitmap !== 0 || entry.zeroBitmap !== 0;

    if (type !== "compressed" && entry.reservedBitsSet) {
      report.say(`ERROR found l2 entry with reserved bits set: ${hex(view.getBigUint64(rawAt))}`);
      report.corruptions++;
    }

    switch (type) {
      case "compressed": {
        let raw = view.getBigUint64(rawAt);
        if (entry.copied) {
          report.say(`ERROR: coffset=0x${hex(raw & offsetMask)}: copied flag must never be set for compressed clusters`);
          raw &= ~(1n << 63n);
          report.corruptions++;
        }
        if (state.hasDataFile) {
          report.say(`ERROR compressed cluster ${i} with data file, entry=0x${hex(raw)}`);
          report.corruptions++;
          break;
        }
        if (bitmapSet) {
          report.say(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${hex(raw)}`);
          report.corruptions++;
          break;
        }
        // Byte offsets beyond 2^53 (damaged entries) are not exact as numbers: take the low bits from the raw entry.
        const exactOffset = raw & offsetMask;
        const lengthBytes = entry.compressedSectors * COMPRESSED_SECTOR_BYTES - Number(exactOffset % BigInt(COMPRESSED_SECTOR_BYTES));
        addReferences(state, report, counts, entry.hostOffset, lengthBytes, exactOffset);
        if (fragInfo) {
          report.allocatedClusters++;
          report.compressedClusters++;
          report.fragmentedClusters++;
        }
        break;
      }
      case "zero-alloc":
      case "normal": {
        const hostOffset = entry.hostOffset;
        if ((entry.zeroBitmap & entry.allocBitmap) !== 0) {
          report.corruptions++;
          report.say(`ERROR offset=${hex(hostOffset)}: Allocated cluster has corrupted subcluster allocation bitmap`);
        }
        if (hostOffset % cs !== 0) {
          report.corruptions++;
          const containsData = state.extendedL2 ? entry.allocBitmap !== 0 : entry.type !== "zero-alloc";
          if (!containsData) {
            const repair = (fix & FIX_ERRORS) !== 0;
            report.say(`${repair ? "Repairing" : "ERROR"} offset=${hex(hostOffset)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
            if (repair) {
              // A fix that would overwrite other metadata aborts the check (QEMU returns -EIO).
              if (!(await fixL2EntryByZero(context, l2Offset, l2Table, i, active))) throw new CheckFailure(STRERROR.EIO);
              continue;
            }
          } else {
            report.say(`ERROR offset=${hex(hostOffset)}: Data cluster is not properly aligned; L2 entry corrupted.`);
          }
        }
        if (fragInfo) {
          report.allocatedClusters++;
          if (nextContiguousOffset !== 0 && hostOffset !== nextContiguousOffset) report.fragmentedClusters++;
          nextContiguousOffset = hostOffset + cs;
        }
        if (!state.hasDataFile) addReferences(state, report, counts, hostOffset, cs);
        break;
      }
      case "zero-plain":
        break;
      case "unallocated":
        if (entry.allocBitmap !== 0) {
          report.corruptions++;
          report.say("ERROR: Unallocated cluster has non-zero subcluster allocation map");
        }
        break;
    }
  }
}

/**
 * fix_l2_entry_by_zero: make an unaligned preallocated-zero entry a plain
 * zero entry (with extended L2: allocated subclusters become zero).
 */
async function fixL2EntryByZero(context: WalkContext, l2Offset: number, l2Table: Uint8Array, index: number, active: boolean): Promise<boolean> {
  const { state, report } = context;
  const view = new DataView(l2Table.buffer);
  const at = index * state.l2EntryBytes;
  if (state.extendedL2) {
    const alloc = view.getUint32(at + 12);
    const zero = view.getUint32(at + 8);
    view.setBigUint64(at, 0n);
    view.setUint32(at + 8, (zero | alloc) >>> 0);
    view.setUint32(at + 12, 0);
  } else {
    view.setBigUint64(at, 1n);
  }
  const entryOffset = l2Offset + at;
  // QEMU ignores the kind of table being fixed; inactive L2 tables are never checked.
  const ignore = new Set<MetadataStructure>(active ? ["active L2 table"] : []);
  if (!(await guardWrite(state, report, ignore, entryOffset, state.l2EntryBytes))) {
    report.say("ERROR: Overlap check failed");
    report.checkErrors++;
    return false;
  }
  await state.file.write(entryOffset, l2Table.subarray(at, at + state.l2EntryBytes));
  await state.file.flush();
  report.corruptions--;
  report.corruptionsFixed++;
  return true;
}

/** check_refblocks: validate refcount table entries and count the blocks. */
async function checkRefblocks(context: WalkContext, outcome: WalkOutcome): Promise<void> {
  const { state, report, counts, fix } = context;
  const cs = state.clusterSizeBytes;
  for (let i = 0; i < state.refcountTable.length; i++) {
    const raw = state.refcountTable[i];
    const offsetBig = raw & ~0x1ffn;
    if ((raw & 0x1ffn) !== 0n) {
      report.say(`ERROR refcount table entry ${i} has reserved bits set`);
      report.corruptions++;
      outcome.rebuild = true;
      continue;
    }
    if (offsetBig % BigInt(cs) !== 0n) {
      report.say(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      report.corruptions++;
      outcome.rebuild = true;
      continue;
    }
    const clusterBig = offsetBig / BigInt(cs);
    if (clusterBig >= BigInt(counts.size)) {
      report.corruptions++;
      const repair = (fix & FIX_ERRORS) !== 0;
      report.say(`${repair ? "Repairing" : "ERROR"} refcount block ${i} is outside image`);
      if (repair) {
        let failure: string | null = null;
        const offset = Number(offsetBig);
        if (offsetBig > BigInt(INT64_MAX - cs)) failure = STRERROR.EINVAL;
        else if (clustersForBytes(state, offset + cs) > CHECK_CLUSTERS_MAX) failure = STRERROR.EFBIG;
        if (failure === null) {
          await state.file.truncate(offset + cs);
          state.fileSizeBytes = await state.file.sizeBytes();
          if (!counts.grow(clustersForBytes(state, state.fileSizeBytes))) throw new CheckFailure(STRERROR.ENOMEM);
          report.corruptions--;
          report.corruptionsFixed++;
          addReferences(state, report, counts, offset, cs);
          continue;
        }
        outcome.rebuild = true;
        report.say(`ERROR could not resize image: ${failure}`);
      }
      continue;
    }
    const cluster = Number(clusterBig);
    if (cluster !== 0) {
      addReferences(state, report, counts, cluster * cs, cs);
      if (counts.get(cluster) !== 1) {
        report.say(`ERROR refcount block ${i} refcount=${counts.get(cluster)}`);
        report.corruptions++;
        outcome.rebuild = true;
      }
    }
  }
}

/**
 * qcow2_check_bitmaps_refcounts: the directory, each bitmap table and the
 * bitmap data clusters. A directory that does not parse is a corruption and
 * fails the check (QEMU returns -EINVAL).
 */
async function checkBitmapsRefcounts(context: WalkContext): Promise<void> {
  const { state, report, counts } = context;
  const bitmaps = state.bitmaps;
  if (bitmaps === null) return;
  addReferences(state, report, counts, bitmaps.directoryOffset, bitmaps.directorySizeBytes);
  const tables = await loadBitmapDirectory(state, bitmaps);
  if (tables === null) {
    report.corruptions++;
    throw new CheckFailure(STRERROR.EINVAL);
  }
  for (const table of tables) {
    addReferences(state, report, counts, table.tableOffset, table.tableEntries * BITMAP_TABLE_ENTRY_BYTES);
    const bytes = await readBytes(state.file, table.tableOffset, table.tableEntries * BITMAP_TABLE_ENTRY_BYTES);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    for (let i = 0; i < table.tableEntries; i++) {
      const entry = decodeBitmapTableEntry(view, i, state.clusterSizeBytes);
      if (entry === null) report.corruptions++;
      else if (entry.hostOffset !== 0) addReferences(state, report, counts, entry.hostOffset, state.clusterSizeBytes);
    }
  }
}

interface BitmapTableRef {
  tableOffset: number;
  tableEntries: number;
}

/** bitmap_list_load, reduced to what the walk needs; null when the directory is invalid. */
async function loadBitmapDirectory(state: Qcow2CheckState, bitmaps: BitmapDirectoryRef): Promise<BitmapTableRef[] | null> {
  if (bitmaps.directorySizeBytes > BITMAP_DIRECTORY_BYTES_MAX) return null;
  const directory = await readBytes(state.file, bitmaps.directoryOffset, bitmaps.directorySizeBytes);
  return decodeBitmapDirectory(directory, bitmaps.bitmapCount, state.clusterSizeBytes);
}

// ---------------------------------------------------------------------------
// Stored against computed (compare_refcounts, check_oflag_copied).

/**
 * compare_refcounts: stored > computed is a leak, stored < computed a
 * corruption; a stored 0 for a referenced cluster asks for a rebuild.
 * With FIX_LEAKS / FIX_ERRORS the stored value is set to the computed one.
 * Returns the highest cluster with a refcount or a reference.
 */
export async function compareRefcounts(
  state: Qcow2CheckState,
  report: CheckReport,
  stored: StoredRefcounts,
  counts: ClusterCounts,
  fix: FixMode,
  outcome: WalkOutcome,
): Promise<number> {
  let highestCluster = 0;
  for (let cluster = 0; cluster < counts.size; cluster++) {
    const storedCount = await stored.get(cluster);
    if (typeof storedCount !== "number") {
      report.say(`Can't get refcount for cluster ${cluster}: ${storedCount.error}`);
      report.checkErrors++;
      continue;
    }
    const referenceCount = counts.get(cluster);
    if (storedCount > 0 || referenceCount > 0) highestCluster = cluster;
    if (storedCount === referenceCount) continue;

    let fixes: "leaksFixed" | "corruptionsFixed" | null = null;
    if (storedCount === 0) outcome.rebuild = true;
    else if (storedCount > referenceCount && fix & FIX_LEAKS) fixes = "leaksFixed";
    else if (storedCount < referenceCount && fix & FIX_ERRORS) fixes = "corruptionsFixed";
    const what = fixes !== null ? "Repairing" : storedCount < referenceCount ? "ERROR" : "Leaked";
    report.say(`${what} cluster ${cluster} refcount=${storedCount} reference=${referenceCount}`);
    if (fixes !== null) {
      const failure = await stored.set(cluster, referenceCount);
      if (failure === null) {
        report[fixes]++;
        continue;
      }
    }
    if (storedCount < referenceCount) report.corruptions++;
    else report.leaks++;
  }
  return highestCluster;
}

const COPIED = 1n << 63n;

/**
 * check_oflag_copied: in the active tables, COPIED must be set exactly when
 * the stored refcount is 1. Repairs with FIX_ERRORS, or with FIX_LEAKS when
 * nothing else is wrong. A failed repair write fails the check.
 */
export async function checkOflagCopied(state: Qcow2CheckState, report: CheckReport, stored: StoredRefcounts, fix: FixMode): Promise<void> {
  let repair = false;
  if (fix & FIX_ERRORS) repair = true;
  else if (fix & FIX_LEAKS) repair = report.checkErrors === 0 && report.corruptions === 0 && report.leaks === 0;
  const verb = repair ? "Repairing" : "ERROR";
  const cs = state.clusterSizeBytes;
  const l1View = new DataView(state.l1Table.buffer, state.l1Table.byteOffset, state.l1Table.byteLength);

  const l2Table = new Uint8Array(state.l2Entries * state.l2EntryBytes);
  for (let i = 0; i < state.l1Size; i++) {
    const l1Raw = l1View.getBigUint64(i * 8);
    const l2Offset = decodeL1EntryWords(l1View.getUint32(i * 8), l1View.getUint32(i * 8 + 4)).l2Offset;
    if (l2Offset === 0) continue;
    const l2Refcount = await stored.get(Math.floor(l2Offset / cs));
    if (typeof l2Refcount !== "number") continue;
    if ((l2Refcount === 1) !== ((l1Raw & COPIED) !== 0n)) {
      report.corruptions++;
      report.say(`${verb} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex(l1Raw)} refcount=${l2Refcount}`);
      if (repair) {
        l1View.setBigUint64(i * 8, l2Refcount === 1 ? l1Raw | COPIED : l1Raw & ~COPIED);
        if (!(await guardWrite(state, report, new Set(["active L1 table"]), state.l1TableOffset + i * 8, 8))) {
          report.checkErrors++;
          throw new CheckFailure(STRERROR.EIO);
        }
        await state.file.write(state.l1TableOffset + i * 8, state.l1Table.subarray(i * 8, i * 8 + 8));
        await state.file.flush();
        report.corruptions--;
        report.corruptionsFixed++;
      }
    }

    await readBytes(state.file, l2Offset, l2Table.length, l2Table);
    const view = new DataView(l2Table.buffer);
    let dirtyEntries = 0;
    for (let j = 0; j < state.l2Entries; j++) {
      // Unallocated entries (zero words) have no COPIED flag to check.
      if (view.getUint32(j * state.l2EntryBytes) === 0 && view.getUint32(j * state.l2EntryBytes + 4) === 0) continue;
      const entry = getL2Entry(view, j, state.extendedL2, state.clusterBits);
      const type = clusterType(state, entry);
      if (type !== "normal" && type !== "zero-alloc") continue;
      let refcount: StoredRefcount = 1;
      if (!state.hasDataFile) refcount = await stored.get(Math.floor(entry.hostOffset / cs));
      if (typeof refcount !== "number") continue;
      if ((refcount === 1) !== entry.copied) {
        const raw = view.getBigUint64(j * state.l2EntryBytes);
        report.corruptions++;
        report.say(`${verb} OFLAG_COPIED data cluster: l2_entry=${hex(raw)} refcount=${refcount}`);
        if (repair) {
          view.setBigUint64(j * state.l2EntryBytes, refcount === 1 ? raw | COPIED : raw & ~COPIED);
          dirtyEntries++;
        }
      }
    }
    if (dirtyEntries > 0) {
      if (!(await guardWrite(state, report, new Set(["active L2 table"]), l2Offset, cs))) {
        report.say(`ERROR: Could not write L2 table; metadata overlap check failed: ${STRERROR.EIO}`);
        report.checkErrors++;
        throw new CheckFailure(STRERROR.EIO);
      }
      await state.file.write(l2Offset, l2Table);
      report.corruptions -= dirtyEntries;
      report.corruptionsFixed += dirtyEntries;
    }
  }
}
