/**
 * The persistent dirty bitmap directory (docs/interop/qcow2.txt, "Bitmaps
 * extension"): a pure codec, no I/O. snapstack reads the directory to
 * account for the bitmaps' clusters (check), to list them (info) and to
 * size them (measure), as QEMU does; it sets the in-use flag of those a
 * change makes inconsistent and stores the ones it keeps up to date
 * (withBitmapEntriesChanged; dirty-bitmaps.ts holds their data).
 *
 * Entry: u64 bitmap table offset, u32 table entries, u32 flags (bit 0
 * in-use, bit 1 auto), u8 type (1: dirty tracking), u8 granularity bits,
 * u16 name size, u32 extra data size, then the extra data and the name,
 * padded to 8 bytes.
 */

/** QCOW2_MAX_BITMAPS and the bitmap directory limit (QCOW2_MAX_BITMAP_DIRECTORY_SIZE). */
export const BITMAP_COUNT_MAX = 65535;
export const BITMAP_DIRECTORY_BYTES_MAX = 1024 * BITMAP_COUNT_MAX;
/** BME_MAX_TABLE_SIZE, BME_MAX_NAME_SIZE. */
const BITMAP_TABLE_ENTRIES_MAX = 0x8000000;
export const BITMAP_NAME_BYTES_MAX = 1023;
/** BME_MAX_PHYS_SIZE: the most bytes of bitmap data (what QEMU holds in memory). */
export const BITMAP_DATA_BYTES_MAX = 0x20000000;
/** BME_MIN_GRANULARITY_BITS, BME_MAX_GRANULARITY_BITS. */
export const GRANULARITY_BITS_MIN = 9;
export const GRANULARITY_BITS_MAX = 31;
/** BME_RESERVED_FLAGS: QEMU 7.2 refuses a directory with any of them. */
const FLAGS_RESERVED = 0xfffffffc;
const ENTRY_HEADER_BYTES = 24;
const FLAG_IN_USE = 1;
const FLAG_AUTO = 2;

export interface BitmapDirectoryEntry {
  tableOffset: number;
  tableEntries: number;
  inUse: boolean;
  auto: boolean;
  granularityBytes: number;
  name: string;
}

const textDecoder = new TextDecoder();

/** Bytes of one directory entry (calc_dir_entry_size). */
export function bitmapDirectoryEntryBytes(nameBytes: number, extraBytes = 0): number {
  return Math.ceil((ENTRY_HEADER_BYTES + nameBytes + extraBytes) / 8) * 8;
}

/**
 * bitmap_list_load's checks: the entries of `directory`, or null when it is
 * invalid (QEMU then refuses the bitmaps, check counts no references for
 * them).
 */
export function decodeBitmapDirectory(directory: Uint8Array, bitmapCount: number, clusterSizeBytes: number): BitmapDirectoryEntry[] | null {
  if (directory.length > BITMAP_DIRECTORY_BYTES_MAX || bitmapCount > BITMAP_COUNT_MAX) return null;
  const view = new DataView(directory.buffer, directory.byteOffset, directory.byteLength);
  const entries: BitmapDirectoryEntry[] = [];
  let at = 0;
  while (at < directory.length) {
    if (at + ENTRY_HEADER_BYTES > directory.length) return null;
    const tableOffset = view.getBigUint64(at);
    const tableEntries = view.getUint32(at + 8);
    const flags = view.getUint32(at + 12);
    const type = view.getUint8(at + 16);
    const granularityBits = view.getUint8(at + 17);
    const nameBytes = view.getUint16(at + 18);
    const extraBytes = view.getUint32(at + 20);
    if (at + ENTRY_HEADER_BYTES + extraBytes + nameBytes > directory.length) return null;
    const invalid =
      tableEntries === 0 ||
      tableOffset === 0n ||
      tableOffset % BigInt(clusterSizeBytes) !== 0n ||
      tableOffset > BigInt(Number.MAX_SAFE_INTEGER) ||
      tableEntries > BITMAP_TABLE_ENTRIES_MAX ||
      tableEntries * clusterSizeBytes > BITMAP_DATA_BYTES_MAX ||
      granularityBits < GRANULARITY_BITS_MIN ||
      granularityBits > GRANULARITY_BITS_MAX ||
      (flags & FLAGS_RESERVED) !== 0 ||
      nameBytes > BITMAP_NAME_BYTES_MAX ||
      type !== 1;
    if (invalid) return null;
    const nameAt = at + ENTRY_HEADER_BYTES + extraBytes;
    entries.push({
      tableOffset: Number(tableOffset),
      tableEntries,
      inUse: (flags & FLAG_IN_USE) !== 0,
      auto: (flags & FLAG_AUTO) !== 0,
      granularityBytes: 2 ** granularityBits,
      name: textDecoder.decode(directory.subarray(nameAt, nameAt + nameBytes)),
    });
    at += bitmapDirectoryEntryBytes(nameBytes, extraBytes);
    if (entries.length > bitmapCount) return null;
  }
  return entries.length === bitmapCount ? entries : null;
}

const textEncoder = new TextEncoder();

/** A bitmap directory holding `records` in order (bitmap_list_store: no extra data). */
export function encodeBitmapDirectory(records: readonly BitmapDirectoryEntry[]): Uint8Array {
  const names = records.map((record) => textEncoder.encode(record.name));
  const directory = new Uint8Array(names.reduce((sum, name) => sum + bitmapDirectoryEntryBytes(name.length), 0));
  const view = new DataView(directory.buffer);
  let at = 0;
  records.forEach((record, index) => {
    view.setBigUint64(at, BigInt(record.tableOffset));
    view.setUint32(at + 8, record.tableEntries);
    view.setUint32(at + 12, (record.inUse ? FLAG_IN_USE : 0) | (record.auto ? FLAG_AUTO : 0));
    view.setUint8(at + 16, 1);
    view.setUint8(at + 17, Math.log2(record.granularityBytes));
    view.setUint16(at + 18, names[index].length);
    directory.set(names[index], at + ENTRY_HEADER_BYTES);
    at += bitmapDirectoryEntryBytes(names[index].length);
  });
  return directory;
}

/** Bytes of one bitmap table entry. */
export const BITMAP_TABLE_ENTRY_BYTES = 8;
/** BME_TABLE_ENTRY_RESERVED_MASK (bits 1-8 and 56-63) and BME_TABLE_ENTRY_OFFSET_MASK, as high and low words. */
const TABLE_RESERVED_HI = 0xff000000;
const TABLE_RESERVED_LO = 0x1fe;
const TABLE_OFFSET_HI = 0x00ffffff;
const TABLE_OFFSET_LO = 0xfffffe00;
const TABLE_ALL_ONES = 1;

/**
 * Entry `index` of a bitmap table (check_table_entry): the host offset of
 * its cluster of bitmap data, or 0 with `allOnes` telling an all-ones
 * cluster from an all-zeroes one; null when the entry is invalid (reserved
 * bits set, or an offset that is unaligned or carries bit 0).
 */
export function decodeBitmapTableEntry(table: DataView, index: number, clusterSizeBytes: number): { hostOffset: number; allOnes: boolean } | null {
  const hi = table.getUint32(index * BITMAP_TABLE_ENTRY_BYTES);
  const lo = table.getUint32(index * BITMAP_TABLE_ENTRY_BYTES + 4);
  if ((hi & TABLE_RESERVED_HI) !== 0 || (lo & TABLE_RESERVED_LO) !== 0) return null;
  const hostOffset = (hi & TABLE_OFFSET_HI) * 2 ** 32 + ((lo & TABLE_OFFSET_LO) >>> 0);
  const allOnes = (lo & TABLE_ALL_ONES) !== 0;
  if (hostOffset !== 0 && (allOnes || hostOffset % clusterSizeBytes !== 0)) return null;
  return { hostOffset, allOnes };
}

/** Set entry `index` of a bitmap table to a data cluster at `hostOffset` (0: all zeroes). */
export function encodeBitmapTableEntry(table: DataView, index: number, hostOffset: number): void {
  table.setUint32(index * BITMAP_TABLE_ENTRY_BYTES, Math.floor(hostOffset / 2 ** 32));
  table.setUint32(index * BITMAP_TABLE_ENTRY_BYTES + 4, hostOffset % 2 ** 32);
}

/** What withBitmapEntriesChanged changes in one entry. */
export interface BitmapEntryChange {
  inUse: boolean;
  /** A new bitmap table, when given. */
  tableOffset?: number;
  tableEntries?: number;
}

/**
 * A copy of a valid `directory` (decodeBitmapDirectory accepted it) with
 * the entries at the indexes of `changes` (in directory order) changed.
 * Every entry keeps its size, so the copy can replace the directory in
 * place. Setting in-use is QEMU's mark of a bitmap whose data no longer
 * matches the disk (what a crash of the program that was updating it
 * leaves): QEMU lists such a bitmap as in-use, never loads its data, and
 * lets it be removed. Clearing it with a new table is storing the bitmap.
 */
export function withBitmapEntriesChanged(directory: Uint8Array, changes: ReadonlyMap<number, BitmapEntryChange>): Uint8Array {
  const copy = directory.slice();
  const view = new DataView(copy.buffer, copy.byteOffset, copy.byteLength);
  for (let at = 0, index = 0; at + ENTRY_HEADER_BYTES <= copy.length; index++) {
    const change = changes.get(index);
    if (change !== undefined) {
      const flags = view.getUint32(at + 12);
      view.setUint32(at + 12, change.inUse ? flags | FLAG_IN_USE : flags & ~FLAG_IN_USE);
      if (change.tableOffset !== undefined) view.setBigUint64(at, BigInt(change.tableOffset));
      if (change.tableEntries !== undefined) view.setUint32(at + 8, change.tableEntries);
    }
    at += bitmapDirectoryEntryBytes(view.getUint16(at + 18), view.getUint32(at + 20));
  }
  return copy;
}
