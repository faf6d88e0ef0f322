/**
 * Persistent dirty bitmaps kept up to date while snapstack changes guest
 * data (docs/interop/qcow2.txt "Bitmaps"; QEMU 7.2 block/qcow2-bitmap.c:
 * load_bitmap_data, store_bitmap, qcow2_store_persistent_dirty_bitmaps).
 *
 * Design notes
 * - Which bitmaps: the enabled ("auto") ones that are consistent (not
 *   in-use) when the first change of guest data comes (Qcow2Image
 *   #prepareChange). Their data is loaded into memory, then their in-use
 *   flag is set on disk, as QEMU does when it opens an image read-write: a
 *   crash from there on leaves them in-use, which QEMU reports as
 *   inconsistent and a backup tool answers with a full copy. Disabled
 *   bitmaps are not loaded: nothing changes them, they stay valid on disk.
 * - Tracking: every change of guest data (write, zero write, discard,
 *   compressed write, emptying) sets the bits of the granules it touches
 *   before it starts, so a failed change leaves its bits set: a bitmap may
 *   over-state a change, never miss one.
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
 * - Not done: a resize marks every bitmap in-use instead of resizing the
 *   tracked ones (Qcow2Image.resize).
 */
import { isAllZero } from "../../io/io-buffer.ts";
import { BITMAP_DATA_BYTES_MAX, BITMAP_TABLE_ENTRY_BYTES, decodeBitmapTableEntry, encodeBitmapTableEntry, type BitmapDirectoryEntry } from "./bitmap-directory.ts";
import type { Qcow2Metadata } from "./metadata.ts";

/** An enabled bitmap held in memory while guest data changes. */
export interface TrackedBitmap {
  /** Its index in the bitmap directory. */
  readonly index: number;
  readonly name: string;
  readonly granularityBytes: number;
  /** One bit per granule (see the design notes). */
  readonly bits: Uint8Array;
  /** How many granules the disk has: the bits at and past it stay clear. */
  readonly granules: number;
  /** The table the data was loaded from and its data clusters: freed once the stored one replaced them. */
  readonly oldTableOffset: number;
  readonly oldTableEntries: number;
  readonly oldDataClusters: readonly number[];
}

/** Bytes of bitmap data for a disk of `sizeBytes` (get_bitmap_bytes_needed). */
export function bitmapDataBytes(sizeBytes: number, granularityBytes: number): number {
  return Math.ceil(Math.ceil(sizeBytes / granularityBytes) / 8);
}

/**
 * Load a consistent bitmap's data (load_bitmap_data), or null when its
 * table is not one QEMU would load (see the design notes).
 */
export async function loadTrackedBitmap(meta: Qcow2Metadata, entry: BitmapDirectoryEntry, index: number, sizeBytes: number): Promise<TrackedBitmap | null> {
  const cs = meta.clusterSizeBytes;
  const dataBytes = bitmapDataBytes(sizeBytes, entry.granularityBytes);
  if (dataBytes > BITMAP_DATA_BYTES_MAX || Math.ceil(dataBytes / cs) !== entry.tableEntries) return null;
  const table = new Uint8Array(entry.tableEntries * BITMAP_TABLE_ENTRY_BYTES);
  if ((await meta.file.read(entry.tableOffset, table)) < table.length) return null;
  const view = new DataView(table.buffer);
  const bits = new Uint8Array(dataBytes);
  const oldDataClusters: number[] = [];
  for (let i = 0; i < entry.tableEntries; i++) {
    const tableEntry = decodeBitmapTableEntry(view, i, cs);
    if (tableEntry === null) return null;
    const part = bits.subarray(i * cs, Math.min(dataBytes, (i + 1) * cs));
    if (tableEntry.hostOffset === 0) {
      if (tableEntry.allOnes) part.fill(0xff);
      continue;
    }
    if ((await meta.file.read(tableEntry.hostOffset, part)) < part.length) return null;
    oldDataClusters.push(tableEntry.hostOffset);
  }
  const granules = Math.ceil(sizeBytes / entry.granularityBytes);
  clearBitsFrom(bits, granules);
  return { index, name: entry.name, granularityBytes: entry.granularityBytes, bits, granules, oldTableOffset: entry.tableOffset, oldTableEntries: entry.tableEntries, oldDataClusters };
}

/** Clear the bits at and past `first` (the granules past the disk's end). */
function clearBitsFrom(bits: Uint8Array, first: number): void {
  const byte = first >>> 3;
  if (byte >= bits.length) return;
  bits[byte] &= (1 << (first & 7)) - 1;
  bits.fill(0, byte + 1);
}

/** Set the bits of every granule [guestOffset, +lengthBytes) touches. */
export function markGuestRange(bitmap: TrackedBitmap, guestOffset: number, lengthBytes: number): void {
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

/** Where one stored bitmap's new table is. */
export interface StoredBitmap {
  index: number;
  tableOffset: number;
}

/**
 * Write a bitmap's data and table to newly allocated clusters
 * (store_bitmap_data, store_bitmap); the caller flushes the refcounts
 * before the directory points at the table, then frees the old clusters
 * (freeOldBitmapClusters).
 */
export async function storeBitmapData(meta: Qcow2Metadata, bitmap: TrackedBitmap): Promise<StoredBitmap> {
  const cs = meta.clusterSizeBytes;
  const entries = Math.ceil(bitmap.bits.length / cs);
  const table = new Uint8Array(entries * BITMAP_TABLE_ENTRY_BYTES);
  const view = new DataView(table.buffer);
  for (let i = 0; i < entries; i++) {
    const part = bitmap.bits.subarray(i * cs, Math.min(bitmap.bits.length, (i + 1) * cs));
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
  return { index: bitmap.index, tableOffset };
}

/** Free the table and data clusters a stored bitmap no longer uses (free_bitmap_clusters). */
export async function freeOldBitmapClusters(meta: Qcow2Metadata, bitmap: TrackedBitmap): Promise<void> {
  for (const hostOffset of bitmap.oldDataClusters) await meta.freeClusters(hostOffset, meta.clusterSizeBytes);
  await meta.freeClusters(bitmap.oldTableOffset, bitmap.oldTableEntries * BITMAP_TABLE_ENTRY_BYTES);
}
