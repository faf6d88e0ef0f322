/**
 * The persistent dirty bitmap directory (docs/interop/qcow2.txt, "Bitmaps
 * extension"): a pure codec, no I/O. snapstack does not update bitmaps; it
 * reads the directory to account for the bitmaps' clusters (check), to
 * list them (info) and to size them (measure), as QEMU does, and sets the
 * in-use flag of those a change makes inconsistent (withBitmapsInUse).
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
const BITMAP_NAME_BYTES_MAX = 1023;
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

/**
 * A copy of a valid `directory` (decodeBitmapDirectory accepted it) with
 * the in-use flag set on the entries at `indexes` (in directory order):
 * QEMU's mark of a bitmap whose data no longer matches the disk (what a
 * crash of the program that was updating it leaves). QEMU lists such a
 * bitmap as in-use, never loads its data, and lets it be removed.
 */
export function withBitmapsInUse(directory: Uint8Array, indexes: ReadonlySet<number>): Uint8Array {
  const copy = directory.slice();
  const view = new DataView(copy.buffer, copy.byteOffset, copy.byteLength);
  for (let at = 0, index = 0; at + ENTRY_HEADER_BYTES <= copy.length; index++) {
    if (indexes.has(index)) view.setUint32(at + 12, view.getUint32(at + 12) | FLAG_IN_USE);
    at += bitmapDirectoryEntryBytes(view.getUint16(at + 18), view.getUint32(at + 20));
  }
  return copy;
}
