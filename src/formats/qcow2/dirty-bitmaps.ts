/**
 * Persistent dirty bitmaps kept up to date while snapstack changes guest
 * data (docs/interop/qcow2.txt "Bitmaps"; QEMU 7.2 block/qcow2-bitmap.c:
 * load_bitmap_data, store_bitmap, qcow2_store_persistent_dirty_bitmaps).
 *
 * Design notes
 * - Which bitmaps: the enabled ("auto") ones that are consistent (not
 *   in-use) when the first change of guest data comes (Qcow2Image
 *   #prepareChange); before a resize, every consistent one (see below). Their data is loaded into memory, then their in-use
 *   flag is set on disk, as QEMU does when it opens an image read-write: a
 *   crash from there on leaves them in-use, which QEMU reports as
 *   inconsistent and a backup tool answers with a full copy. Disabled
 *   bitmaps are not loaded: nothing changes them, they stay valid on disk.
 * - Tracking: every change of guest data (write, zero write, discard,
 *   compressed write) sets the bits of the granules its request touches
 *   before it starts, so a failed change leaves its bits set: a bitmap may
 *   over-state a change, never miss one. As in QEMU, a discard records its
 *   whole request even where no cluster is freed, and emptying an image
 *   after a commit (makeEmpty) records nothing: its data moved into the
 *   backing file, what the guest reads stays.
 * - Storing (close), in QEMU's order: the bitmap's data clusters that hold
 *   a set bit are written to newly allocated clusters (all-zero ones become
 *   table entries 0), then its table; the refcounts are flushed; then the
 *   directory is rewritten in place with the new table offsets and the
 *   in-use flags cleared (its entries keep their sizes: QEMU's
 *   update_ext_header_and_dir_in_place), and flushed; last the old tables
 *   and data clusters are freed. An interruption leaves leaked clusters at
 *   worst (check -r leaks), with the bitmaps still in-use.
 * - Layout: bit i covers guest bytes [i * granularity, (i + 1) *
 *   granularity) and is bit i % 8 of byte i / 8 (QEMU serializes its
 *   bitmaps as little-endian words); one table entry per cluster of bitmap
 *   data: bits 9-55 the data cluster's offset, or 0 with bit 0 telling all
 *   ones from all zeroes. Bits past the disk's last granule stay clear.
 * - A bitmap whose table does not load (reserved bits set, a size that
 *   does not match the disk, an unaligned cluster) is not tracked: it is
 *   only marked in-use, as QEMU would refuse to load it.
 * - Editing the list (`img bitmap`: add, remove, clear, enable, disable,
 *   merge; editBitmapList, writeBitmapList): the actions apply in order to
 *   an in-memory list, each failing as qemu-img's does; the ones before a
 *   failed action stay done (qemu-img stores them too). The list is then
 *   written as QEMU's update_ext_header_and_dir writes it: changed data and
 *   a new directory to new clusters, refcounts flushed, the header switched
 *   (the extension dropped, and its autoclear bit cleared, when no bitmap
 *   is left), the old directory and tables freed. Unchanged bitmaps keep
 *   their tables (QEMU rewrites every loaded one: same content, other
 *   clusters).
 * - Resize (qcow2_co_truncate with bdrv_dirty_bitmap_truncate): every
 *   consistent bitmap, disabled ones too, is loaded and marked in-use
 *   before the size changes, then follows the new size (bits past the end
 *   dropped, a new area clean, as QEMU's) and is stored at close with a
 *   table of the new length.
 */
import { SnapstackError, assert, type ErrorCode } from "../../base/errors.ts";
import { isAllZero } from "../../io/io-buffer.ts";
import {
  BITMAP_COUNT_MAX,
  BITMAP_DATA_BYTES_MAX,
  BITMAP_DIRECTORY_BYTES_MAX,
  bitmapDirectoryEntryBytes,
  BITMAP_NAME_BYTES_MAX,
  BITMAP_TABLE_ENTRY_BYTES,
  GRANULARITY_BITS_MAX,
  GRANULARITY_BITS_MIN,
  decodeBitmapTableEntry,
  encodeBitmapDirectory,
  encodeBitmapTableEntry,
  type BitmapDirectoryEntry,
} from "./bitmap-directory.ts";
import { AUTOCLEAR_BITMAPS } from "./header.ts";
import type { Qcow2Metadata } from "./metadata.ts";

/** A consistent bitmap held in memory while guest data (enabled ones) or the disk's size changes. */
export interface TrackedBitmap {
  /** Its index in the bitmap directory. */
  readonly index: number;
  readonly name: string;
  readonly granularityBytes: number;
  /** Whether changes set its bits ("auto"); a disabled one is held only to follow a resize. */
  readonly enabled: boolean;
  /** One bit per granule (see the design notes). */
  readonly bits: Uint8Array;
  /** How many granules the disk has: the bits at and past it stay clear. */
  readonly granules: number;
  /** The table the data was loaded from: freed once the stored one replaced it. */
  readonly oldTableOffset: number;
  readonly oldTableEntries: number;
}

/** Bytes of bitmap data for a disk of `sizeBytes` (get_bitmap_bytes_needed). */
export function bitmapDataBytes(sizeBytes: number, granularityBytes: number): number {
  return Math.ceil(Math.ceil(sizeBytes / granularityBytes) / 8);
}

/**
 * A consistent bitmap's data (load_bitmap_data), or null when its table
 * is not one QEMU would load (see the design notes).
 */
export async function loadBitmapBits(meta: Qcow2Metadata, entry: BitmapDirectoryEntry, sizeBytes: number): Promise<Uint8Array | null> {
  const cs = meta.clusterSizeBytes;
  const dataBytes = bitmapDataBytes(sizeBytes, entry.granularityBytes);
  if (dataBytes > BITMAP_DATA_BYTES_MAX || Math.ceil(dataBytes / cs) !== entry.tableEntries) return null;
  const table = await readBitmapTable(meta, entry.tableOffset, entry.tableEntries);
  if (table === null) return null;
  const bits = new Uint8Array(dataBytes);
  for (let i = 0; i < entry.tableEntries; i++) {
    const tableEntry = decodeBitmapTableEntry(table, i, cs);
    if (tableEntry === null) return null;
    const part = bits.subarray(i * cs, Math.min(dataBytes, (i + 1) * cs));
    if (tableEntry.hostOffset === 0) {
      if (tableEntry.allOnes) part.fill(0xff);
      continue;
    }
    if ((await meta.file.read(tableEntry.hostOffset, part)) < part.length) return null;
  }
  clearBitsFrom(bits, Math.ceil(sizeBytes / entry.granularityBytes));
  return bits;
}

async function readBitmapTable(meta: Qcow2Metadata, tableOffset: number, tableEntries: number): Promise<DataView | null> {
  const table = new Uint8Array(tableEntries * BITMAP_TABLE_ENTRY_BYTES);
  if ((await meta.file.read(tableOffset, table)) < table.length) return null;
  return new DataView(table.buffer);
}

/** A consistent bitmap, loaded to be kept up to date; null when it does not load. */
export async function loadTrackedBitmap(meta: Qcow2Metadata, entry: BitmapDirectoryEntry, index: number, sizeBytes: number): Promise<TrackedBitmap | null> {
  const bits = await loadBitmapBits(meta, entry, sizeBytes);
  if (bits === null) return null;
  const granules = Math.ceil(sizeBytes / entry.granularityBytes);
  return { index, name: entry.name, granularityBytes: entry.granularityBytes, enabled: entry.auto, bits, granules, oldTableOffset: entry.tableOffset, oldTableEntries: entry.tableEntries };
}

/** A tracked bitmap for a disk resized to `sizeBytes` (hbitmap_truncate): bits past the end dropped, a new area clean. */
export function resizeTrackedBitmap(bitmap: TrackedBitmap, sizeBytes: number): TrackedBitmap {
  const bits = new Uint8Array(bitmapDataBytes(sizeBytes, bitmap.granularityBytes));
  bits.set(bitmap.bits.subarray(0, Math.min(bits.length, bitmap.bits.length)));
  const granules = Math.ceil(sizeBytes / bitmap.granularityBytes);
  clearBitsFrom(bits, granules);
  return { ...bitmap, bits, granules };
}

/** Clear the bits at and past `first` (the granules past the disk's end). */
function clearBitsFrom(bits: Uint8Array, first: number): void {
  const byte = first >>> 3;
  if (byte >= bits.length) return;
  bits[byte] &= (1 << (first & 7)) - 1;
  bits.fill(0, byte + 1);
}

/** Set the bits of every granule [guestOffset, +lengthBytes) touches. */
export function markGuestRange(bitmap: { bits: Uint8Array; granularityBytes: number; granules: number }, guestOffset: number, lengthBytes: number): void {
  if (lengthBytes <= 0) return;
  const first = Math.floor(guestOffset / bitmap.granularityBytes);
  const end = Math.min(bitmap.granules, Math.floor((guestOffset + lengthBytes - 1) / bitmap.granularityBytes) + 1);
  setBits(bitmap.bits, first, end);
}

/** Set bits [first, end). */
function setBits(bits: Uint8Array, first: number, end: number): void {
  let bit = first;
  while (bit < end && (bit & 7) !== 0) {
    bits[bit >>> 3] |= 1 << (bit & 7);
    bit++;
  }
  const fullBytesEnd = end >>> 3;
  if (bit >>> 3 < fullBytesEnd) {
    bits.fill(0xff, bit >>> 3, fullBytesEnd);
    bit = fullBytesEnd * 8;
  }
  while (bit < end) {
    bits[bit >>> 3] |= 1 << (bit & 7);
    bit++;
  }
}

/**
 * Write bitmap data to newly allocated clusters, then its table
 * (store_bitmap_data, store_bitmap); returns the table. The caller
 * flushes the refcounts before a directory points at it.
 */
export async function storeBitmapBits(meta: Qcow2Metadata, bits: Uint8Array): Promise<{ offset: number; entries: number }> {
  const cs = meta.clusterSizeBytes;
  const entries = Math.ceil(bits.length / cs);
  const table = new Uint8Array(entries * BITMAP_TABLE_ENTRY_BYTES);
  const view = new DataView(table.buffer);
  for (let i = 0; i < entries; i++) {
    const part = bits.subarray(i * cs, Math.min(bits.length, (i + 1) * cs));
    if (isAllZero(part)) continue;
    const hostOffset = await meta.allocClusters(cs);
    let cluster = part;
    if (part.length < cs) {
      cluster = new Uint8Array(cs);
      cluster.set(part);
    }
    await meta.file.write(hostOffset, cluster);
    encodeBitmapTableEntry(view, i, hostOffset);
  }
  const tableOffset = await meta.allocClusters(table.length);
  await meta.file.write(tableOffset, table);
  return { offset: tableOffset, entries };
}

/**
 * Free a bitmap table and its data clusters (free_bitmap_clusters), once no
 * directory on disk points at it. A table that no longer reads, or an
 * invalid entry in it, frees what can be read (the rest leaks, as in QEMU).
 */
export async function freeBitmapTable(meta: Qcow2Metadata, tableOffset: number, tableEntries: number): Promise<void> {
  const table = await readBitmapTable(meta, tableOffset, tableEntries);
  for (let i = 0; table !== null && i < tableEntries; i++) {
    const entry = decodeBitmapTableEntry(table, i, meta.clusterSizeBytes);
    if (entry !== null && entry.hostOffset !== 0) await meta.freeClusters(entry.hostOffset, meta.clusterSizeBytes);
  }
  await meta.freeClusters(tableOffset, tableEntries * BITMAP_TABLE_ENTRY_BYTES);
}

/** Merge `source` (another granularity possibly) into `target`: every granule of target a set source bit overlaps is set. */
export function mergeBitmapBits(target: Uint8Array, targetGranularityBytes: number, targetGranules: number, source: Uint8Array, sourceGranularityBytes: number, sourceGranules: number): void {
  let bit = 0;
  while (bit < sourceGranules) {
    if ((source[bit >>> 3] & (1 << (bit & 7))) === 0) {
      // Skip whole zero bytes quickly.
      bit = source[bit >>> 3] === 0 ? (bit | 7) + 1 : bit + 1;
      continue;
    }
    let end = bit + 1;
    while (end < sourceGranules && (source[end >>> 3] & (1 << (end & 7))) !== 0) end++;
    const first = Math.floor((bit * sourceGranularityBytes) / targetGranularityBytes);
    const last = Math.min(targetGranules, Math.floor((end * sourceGranularityBytes - 1) / targetGranularityBytes) + 1);
    setBits(target, first, last);
    bit = end;
  }
}

/** A bitmap's data read for a merge (Qcow2Image.readBitmap). */
export interface BitmapData {
  granularityBytes: number;
  bits: Uint8Array;
  /** The disk size the bits cover. */
  sizeBytes: number;
}

/** One step of `img bitmap` (qemu-img bitmap's actions), applied in order. */
export type BitmapAction =
  /** `before`: the directory place, before that bitmap when it exists (default: last). */
  | { kind: "add"; name: string; granularityBytes?: number; before?: string }
  | { kind: "remove" | "clear" | "enable" | "disable"; name: string }
  /** Set in `name` every granule `source` has set (QEMU's block-dirty-bitmap-merge). */
  | { kind: "merge"; name: string; source: BitmapSource };

/** Where a merge reads from: a bitmap of the image being changed, data read elsewhere, or why it could not be read there. */
export type BitmapSource = { name: string } | { data: BitmapData } | { unreadable: SnapstackError };

/** Why a bitmap left in-use (inconsistent) cannot be used: qemu-img's words, and the way out. */
export function inconsistentBitmapMessage(name: string): string {
  return `Bitmap '${name}' is inconsistent and cannot be used; 'snapstack img bitmap --remove' deletes it`;
}

/** A bitmap of the list `img bitmap` edits. */
export interface EditedBitmap {
  name: string;
  granularityBytes: number;
  auto: boolean;
  inUse: boolean;
  /** Its table on disk (null: added by this edit). */
  table: { offset: number; entries: number } | null;
  /** Data to store anew (new clusters), or null: the table on disk stays as it is. */
  bits: Uint8Array | null;
}

/** What an edit leaves: the new list, the tables it no longer uses, and the first action that failed (the ones before it stay done, as in qemu-img). */
export interface BitmapEdit {
  bitmaps: EditedBitmap[];
  dropped: Array<{ offset: number; entries: number }>;
  changed: boolean;
  failure: unknown;
}

/** What editBitmapList needs of the image. */
export interface BitmapEditContext {
  imageName: string;
  version: number;
  sizeBytes: number;
  clusterSizeBytes: number;
  /** The data of a bitmap on disk (it is consistent), or null when its table does not load. */
  load(bitmap: EditedBitmap): Promise<Uint8Array | null>;
}

const textEncoder = new TextEncoder();

function actionError(action: BitmapAction, code: ErrorCode, message: string): SnapstackError {
  return new SnapstackError(code, `Operation ${action.kind} on bitmap ${action.name} failed: ${message}`);
}

/** QEMU's default granularity for a new bitmap: the cluster size within 4 KiB .. 64 KiB (bdrv_get_default_bitmap_granularity). */
export function defaultBitmapGranularity(clusterSizeBytes: number): number {
  return Math.min(65536, Math.max(4096, clusterSizeBytes));
}

/** Apply `actions` in order to `current` (nothing is written: writeBitmapList does). */
export async function editBitmapList(current: readonly EditedBitmap[], actions: readonly BitmapAction[], context: BitmapEditContext): Promise<BitmapEdit> {
  const bitmaps = current.map((bitmap) => ({ ...bitmap }));
  const dropped: BitmapEdit["dropped"] = [];
  let changed = false;
  const usable = async (action: BitmapAction, name: string): Promise<EditedBitmap> => {
    const bitmap = bitmaps.find((candidate) => candidate.name === name);
    if (bitmap === undefined) throw actionError(action, "E_NOT_FOUND", `Dirty bitmap '${name}' not found`);
    if (bitmap.inUse) throw actionError(action, "E_UNSUPPORTED_FEATURE", inconsistentBitmapMessage(name));
    return bitmap;
  };
  const bitsOf = async (action: BitmapAction, bitmap: EditedBitmap): Promise<Uint8Array> => {
    bitmap.bits ??= await context.load(bitmap);
    if (bitmap.bits === null) throw actionError(action, "E_CORRUPT_IMAGE", `Bitmap '${bitmap.name}' does not load from '${context.imageName}'`);
    return bitmap.bits;
  };
  try {
    for (const action of actions) {
      if (action.kind === "add") {
        const granularityBytes = action.granularityBytes ?? defaultBitmapGranularity(context.clusterSizeBytes);
        if (action.name === "") throw actionError(action, "E_INVALID_OPTION", "Bitmap name cannot be empty");
        if (bitmaps.some((bitmap) => bitmap.name === action.name)) throw actionError(action, "E_EXISTS", `Bitmap already exists: ${action.name}`);
        if (!Number.isInteger(Math.log2(granularityBytes)) || granularityBytes < 2 ** GRANULARITY_BITS_MIN || granularityBytes > 2 ** GRANULARITY_BITS_MAX) {
          throw actionError(action, "E_INVALID_OPTION", "Granularity must be power of 2 and at least 512");
        }
        const persistent = `Can't make bitmap '${action.name}' persistent in '${context.imageName}': `;
        if (context.version < 3) throw actionError(action, "E_UNSUPPORTED_FEATURE", `${persistent}Cannot store dirty bitmaps in qcow2 v2 files`);
        const dataBytes = bitmapDataBytes(context.sizeBytes, granularityBytes);
        if (dataBytes > BITMAP_DATA_BYTES_MAX) throw actionError(action, "E_TOO_LARGE", `${persistent}Too much space will be occupied by the bitmap. Use larger granularity`);
        if (textEncoder.encode(action.name).length > BITMAP_NAME_BYTES_MAX) {
          throw actionError(action, "E_INVALID_OPTION", `${persistent}Name length exceeds maximum (${BITMAP_NAME_BYTES_MAX} characters)`);
        }
        if (bitmaps.length >= BITMAP_COUNT_MAX) throw actionError(action, "E_TOO_LARGE", `${persistent}Maximum number of persistent bitmaps is already reached`);
        const directoryBytes = [...bitmaps, action].reduce((sum, bitmap) => sum + bitmapDirectoryEntryBytes(textEncoder.encode(bitmap.name).length), 0);
        if (directoryBytes > BITMAP_DIRECTORY_BYTES_MAX) throw actionError(action, "E_TOO_LARGE", `${persistent}Not enough space in the bitmap directory`);
        const added = { name: action.name, granularityBytes, auto: true, inUse: false, table: null, bits: new Uint8Array(dataBytes) };
        const at = bitmaps.findIndex((bitmap) => bitmap.name === action.before);
        bitmaps.splice(at < 0 ? bitmaps.length : at, 0, added);
      } else if (action.kind === "remove") {
        const index = bitmaps.findIndex((bitmap) => bitmap.name === action.name);
        if (index < 0) throw actionError(action, "E_NOT_FOUND", `Dirty bitmap '${action.name}' not found`);
        const [removed] = bitmaps.splice(index, 1);
        if (removed.table !== null) dropped.push(removed.table);
      } else if (action.kind === "clear") {
        const bitmap = await usable(action, action.name);
        bitmap.bits = new Uint8Array(bitmapDataBytes(context.sizeBytes, bitmap.granularityBytes));
      } else if (action.kind === "enable" || action.kind === "disable") {
        (await usable(action, action.name)).auto = action.kind === "enable";
      } else if (action.kind === "merge") {
        const target = await usable(action, action.name);
        let source: BitmapData;
        if ("unreadable" in action.source) {
          throw actionError(action, action.source.unreadable.code, action.source.unreadable.message);
        } else if ("data" in action.source) {
          source = action.source.data;
        } else {
          const bitmap = await usable(action, action.source.name);
          source = { granularityBytes: bitmap.granularityBytes, bits: await bitsOf(action, bitmap), sizeBytes: context.sizeBytes };
        }
        if (source.sizeBytes !== context.sizeBytes) {
          throw actionError(action, "E_INVALID_OPTION", `Bitmaps are of different sizes (destination size is ${context.sizeBytes}, source size is ${source.sizeBytes}) and can't be merged`);
        }
        const targetBits = await bitsOf(action, target);
        mergeBitmapBits(targetBits, target.granularityBytes, Math.ceil(context.sizeBytes / target.granularityBytes), source.bits, source.granularityBytes, Math.ceil(source.sizeBytes / source.granularityBytes));
      }
      changed = true;
    }
  } catch (failure) {
    return { bitmaps, dropped, changed, failure };
  }
  return { bitmaps, dropped, changed, failure: null };
}

/** The bitmaps extension after writeBitmapList (null: no bitmaps left). */
export interface WrittenBitmapList {
  directory: Uint8Array | null;
  directoryOffset: number;
  entries: BitmapDirectoryEntry[];
}

/**
 * Write an edited list (update_ext_header_and_dir): changed data to new
 * clusters, a new directory to new clusters, refcounts flushed, then the
 * header switched to it (or the extension dropped when no bitmap is left),
 * synced; last the old directory and the tables no longer used are freed.
 * An interruption leaves leaks at worst.
 */
export async function writeBitmapList(meta: Qcow2Metadata, edit: BitmapEdit, oldDirectory: { offset: number; sizeBytes: number } | null): Promise<WrittenBitmapList> {
  const replaced: Array<{ offset: number; entries: number }> = [];
  const records: BitmapDirectoryEntry[] = [];
  for (const bitmap of edit.bitmaps) {
    let table = bitmap.table;
    if (bitmap.bits !== null) {
      if (table !== null) replaced.push(table);
      table = await storeBitmapBits(meta, bitmap.bits);
    }
    assert(table !== null, "a bitmap without a table has data to store");
    records.push({ tableOffset: table.offset, tableEntries: table.entries, inUse: bitmap.inUse, auto: bitmap.auto, granularityBytes: bitmap.granularityBytes, name: bitmap.name });
  }
  let directory: Uint8Array | null = null;
  let directoryOffset = 0;
  if (records.length > 0) {
    directory = encodeBitmapDirectory(records);
    directoryOffset = await meta.allocClusters(directory.length);
    await meta.file.write(directoryOffset, directory);
  }
  await meta.writeCaches();
  await meta.file.flush();
  const header = meta.header;
  header.extensions.bitmaps = directory === null ? null : { bitmapCount: records.length, directorySizeBytes: directory.length, directoryOffset };
  header.autoclearFeatures = directory === null ? header.autoclearFeatures & ~AUTOCLEAR_BITMAPS : header.autoclearFeatures | AUTOCLEAR_BITMAPS;
  // Adding the first bitmap or removing the last moves what follows the extension (the backing name).
  await meta.writeHeaderTornSafe();
  if (oldDirectory !== null) await meta.freeClusters(oldDirectory.offset, oldDirectory.sizeBytes);
  for (const table of [...edit.dropped, ...replaced]) await freeBitmapTable(meta, table.offset, table.entries);
  return { directory, directoryOffset, entries: records };
}
