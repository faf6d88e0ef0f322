/**
 * L1 and L2 table entries: pure codecs, no I/O (reference §5, §11).
 *
 * L1 entry: bits 9-55 L2 table offset, bit 63 COPIED, the rest reserved.
 * L2 entry (64 bits, plus a 64-bit subcluster bitmap with extended L2):
 *   bit 63 COPIED, bit 62 COMPRESSED, bits 0-61 descriptor.
 *   standard descriptor: bit 0 ZERO, bits 9-55 host cluster offset.
 *   compressed descriptor: bits 0..x-1 host byte offset, bits x..61 number
 *   of additional 512-byte sectors, x = 62 - (cluster_bits - 8).
 *   extended bitmap: bits 0-31 subcluster allocated, bits 32-63 reads as zero.
 *
 * Entries are read from and written into table bytes as two 32-bit halves so
 * the hot read path never touches BigInt. Host offsets are plain numbers; an
 * offset that does not fit a safe integer is reported by `offsetTooLarge`
 * so the caller can treat it as corruption.
 */

export const L1_ENTRY_BYTES = 8;
export const L2_ENTRY_BYTES = 8;
export const EXTENDED_L2_ENTRY_BYTES = 16;
export const SUBCLUSTERS_PER_CLUSTER = 32;
/** Compressed data is addressed in 512-byte sectors. */
export const COMPRESSED_SECTOR_BYTES = 512;

/**
 * Entry words: an entry is read as two big-endian 32-bit halves, "hi"
 * (bits 32..63) and "lo" (bits 0..31). Exported for hot loops that decode
 * entries in place (internal-snapshots.ts) instead of building L2Entry objects.
 */
export const TWO_POW_32 = 2 ** 32;
/** High-word masks (bits 32..63 of the entry). */
export const HI_COPIED = 0x80000000;
export const HI_COMPRESSED = 0x40000000;
/** bits 32-55 of an L1/L2 offset. */
export const HI_OFFSET_MASK = 0x00ffffff;
/** bits 9-31 of an L1/L2 offset. */
export const LO_OFFSET_MASK = 0xfffffe00;
/** Offset bits 53.. (hi bits 21..) do not fit a safe integer. */
export const HI_OFFSET_UNSAFE = 0x200000;
/** Reserved bits of an L1 entry: 56-62 and 0-8 (L1E_RESERVED_MASK 0x7f000000000001ff). */
const L1_HI_RESERVED = 0x7f000000;
const L1_LO_RESERVED = 0x000001ff;
/** Reserved bits of a standard L2 entry: 56-61 and 1-8 (L2E_STD_RESERVED_MASK 0x3f000000000001fe). */
const L2_HI_RESERVED = 0x3f000000;
const L2_LO_RESERVED = 0x000001fe;
const LO_ZERO = 0x1;

export interface L1Entry {
  /** Host offset of the L2 table, 0 = none. */
  l2Offset: number;
  copied: boolean;
  reservedBitsSet: boolean;
  /** The offset uses bits a JavaScript number cannot hold exactly (corrupt image). */
  offsetTooLarge: boolean;
}

export type L2EntryType = "unallocated" | "zero-plain" | "zero-alloc" | "normal" | "compressed";

export interface L2Entry {
  type: L2EntryType;
  /** normal/zero-alloc: host cluster offset; compressed: host byte offset of the data; else 0. */
  hostOffset: number;
  copied: boolean;
  /** compressed: number of 512-byte sectors touched by the data (additional sectors + 1). */
  compressedSectors: number;
  reservedBitsSet: boolean;
  offsetTooLarge: boolean;
  /** Extended L2 only: subclusters with data in this cluster (bit i = subcluster i). */
  allocBitmap: number;
  /** Extended L2 only: subclusters that read as zero. */
  zeroBitmap: number;
}

function combine(hi: number, lo: number): number {
  return hi * TWO_POW_32 + lo;
}

function offsetIsUnsafe(hiOffsetBits: number): boolean {
  return hiOffsetBits >= HI_OFFSET_UNSAFE;
}

export function decodeL1EntryWords(hi: number, lo: number): L1Entry {
  const hiOffset = hi & HI_OFFSET_MASK;
  return {
    l2Offset: combine(hiOffset, (lo & LO_OFFSET_MASK) >>> 0),
    copied: (hi & HI_COPIED) !== 0,
    reservedBitsSet: (hi & L1_HI_RESERVED) !== 0 || (lo & L1_LO_RESERVED) !== 0,
    offsetTooLarge: offsetIsUnsafe(hiOffset),
  };
}

export function getL1Entry(table: Uint8Array, index: number): L1Entry {
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  return decodeL1EntryWords(view.getUint32(index * 8), view.getUint32(index * 8 + 4));
}

/** Only the L2 offset of an L1 entry (the hot path). */
export function getL1EntryOffset(view: DataView, index: number): number {
  return combine(view.getUint32(index * 8) & HI_OFFSET_MASK, (view.getUint32(index * 8 + 4) & LO_OFFSET_MASK) >>> 0);
}

export function encodeL1Entry(entry: { l2Offset: number; copied: boolean }): bigint {
  return BigInt(entry.l2Offset) | (entry.copied ? 1n << 63n : 0n);
}

export function setL1Entry(table: Uint8Array, index: number, entry: { l2Offset: number; copied: boolean }): void {
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  view.setBigUint64(index * 8, encodeL1Entry(entry));
}

/** Field layout of compressed descriptors for one cluster size. */
export interface CompressedLayout {
  /** Bit position of the sector count (csize_shift). */
  sectorCountShift: number;
  /** Width mask of the additional-sector count (csize_mask). */
  sectorCountMask: number;
}

export function compressedLayout(clusterBits: number): CompressedLayout {
  const countBits = clusterBits - 8;
  return { sectorCountShift: 62 - countBits, sectorCountMask: 2 ** countBits - 1 };
}

/** Decode a compressed descriptor (bits 0-61) given as two 32-bit halves. */
function decodeCompressedWords(hi: number, lo: number, clusterBits: number): { hostOffset: number; sectors: number; offsetTooLarge: boolean } {
  const { sectorCountShift, sectorCountMask } = compressedLayout(clusterBits);
  // sectorCountShift >= 49 for cluster bits <= 21, so both fields' high parts are in `hi`.
  const hiShift = sectorCountShift - 32;
  const hiOffset = hi & (2 ** hiShift - 1);
  const additional = Math.floor((hi & 0x3fffffff) / 2 ** hiShift) & sectorCountMask;
  return { hostOffset: combine(hiOffset, lo >>> 0), sectors: additional + 1, offsetTooLarge: offsetIsUnsafe(hiOffset) };
}

/** Encode a compressed descriptor including bit 62 (COPIED is never set). */
export function encodeCompressedDescriptor(hostOffset: number, compressedBytes: number, clusterBits: number): bigint {
  const { sectorCountShift, sectorCountMask } = compressedLayout(clusterBits);
  const additional = Math.floor((hostOffset + compressedBytes - 1) / COMPRESSED_SECTOR_BYTES) - Math.floor(hostOffset / COMPRESSED_SECTOR_BYTES);
  if (additional > sectorCountMask || additional < 0) throw new RangeError(`compressed size ${compressedBytes} does not fit the descriptor`);
  if (hostOffset >= 2 ** sectorCountShift) throw new RangeError(`compressed host offset ${hostOffset} does not fit the descriptor`);
  return (1n << 62n) | (BigInt(additional) << BigInt(sectorCountShift)) | BigInt(hostOffset);
}

export function decodeCompressedDescriptor(descriptor: bigint, clusterBits: number): { hostOffset: number; sectors: number; lengthBytes: number } {
  const hi = Number((descriptor >> 32n) & 0xffffffffn);
  const lo = Number(descriptor & 0xffffffffn);
  const { hostOffset, sectors } = decodeCompressedWords(hi, lo, clusterBits);
  return { hostOffset, sectors, lengthBytes: compressedReadBytes(hostOffset, sectors) };
}

/** Bytes QEMU reads for a compressed cluster: to the end of its last sector. */
export function compressedReadBytes(hostOffset: number, sectors: number): number {
  return sectors * COMPRESSED_SECTOR_BYTES - (hostOffset % COMPRESSED_SECTOR_BYTES);
}

export function decodeL2EntryWords(hi: number, lo: number, clusterBits: number, bitmapHi = 0, bitmapLo = 0): L2Entry {
  const copied = (hi & HI_COPIED) !== 0;
  if (hi & HI_COMPRESSED) {
    const c = decodeCompressedWords(hi, lo, clusterBits);
    return {
      type: "compressed",
      hostOffset: c.hostOffset,
      copied,
      compressedSectors: c.sectors,
      reservedBitsSet: false,
      offsetTooLarge: c.offsetTooLarge,
      allocBitmap: bitmapLo,
      zeroBitmap: bitmapHi,
    };
  }
  const hiOffset = hi & HI_OFFSET_MASK;
  const hostOffset = combine(hiOffset, (lo & LO_OFFSET_MASK) >>> 0);
  const zero = (lo & LO_ZERO) !== 0;
  let type: L2EntryType;
  if (zero) type = hostOffset !== 0 ? "zero-alloc" : "zero-plain";
  else type = hostOffset !== 0 ? "normal" : "unallocated";
  return {
    type,
    hostOffset,
    copied,
    compressedSectors: 0,
    reservedBitsSet: (hi & L2_HI_RESERVED) !== 0 || (lo & L2_LO_RESERVED) !== 0,
    offsetTooLarge: offsetIsUnsafe(hiOffset),
    allocBitmap: bitmapLo,
    zeroBitmap: bitmapHi,
  };
}

export function l2EntryBytes(extendedL2: boolean): number {
  return extendedL2 ? EXTENDED_L2_ENTRY_BYTES : L2_ENTRY_BYTES;
}

/** Entries per L2 table (one cluster). */
export function l2EntriesPerTable(clusterBits: number, extendedL2: boolean): number {
  return 2 ** clusterBits / l2EntryBytes(extendedL2);
}

export function getL2Entry(view: DataView, index: number, extendedL2: boolean, clusterBits: number): L2Entry {
  if (extendedL2) {
    const at = index * EXTENDED_L2_ENTRY_BYTES;
    return decodeL2EntryWords(view.getUint32(at), view.getUint32(at + 4), clusterBits, view.getUint32(at + 8), view.getUint32(at + 12));
  }
  const at = index * L2_ENTRY_BYTES;
  return decodeL2EntryWords(view.getUint32(at), view.getUint32(at + 4), clusterBits);
}

/** What to store in an L2 entry. */
export type L2EntryValue =
  | { type: "unallocated" }
  | { type: "zero-plain" }
  | { type: "zero-alloc"; hostOffset: number; copied: boolean }
  | { type: "normal"; hostOffset: number; copied: boolean }
  | { type: "compressed"; hostOffset: number; compressedBytes: number };

/**
 * Encode the 64-bit word of an L2 entry. With extended L2 "zero" types are
 * expressed through the bitmap, so the ZERO flag is never set: zero-plain
 * becomes offset 0 and zero-alloc becomes a normal entry.
 */
export function encodeL2Entry(value: L2EntryValue, clusterBits: number, extendedL2 = false): bigint {
  switch (value.type) {
    case "unallocated":
      return 0n;
    case "zero-plain":
      return extendedL2 ? 0n : 1n;
    case "zero-alloc":
    case "normal": {
      const flags = (value.copied ? 1n << 63n : 0n) | (value.type === "zero-alloc" && !extendedL2 ? 1n : 0n);
      return BigInt(value.hostOffset) | flags;
    }
    case "compressed":
      return encodeCompressedDescriptor(value.hostOffset, value.compressedBytes, clusterBits);
  }
}

export function encodeL2Bitmap(allocBitmap: number, zeroBitmap: number): bigint {
  return (BigInt(zeroBitmap >>> 0) << 32n) | BigInt(allocBitmap >>> 0);
}

/** Store an entry word (and, with extended L2, its bitmap) at `index`. */
export function setL2EntryWords(view: DataView, index: number, extendedL2: boolean, word: bigint, allocBitmap = 0, zeroBitmap = 0): void {
  if (extendedL2) {
    const at = index * EXTENDED_L2_ENTRY_BYTES;
    view.setBigUint64(at, word);
    view.setUint32(at + 8, zeroBitmap >>> 0);
    view.setUint32(at + 12, allocBitmap >>> 0);
  } else {
    view.setBigUint64(index * L2_ENTRY_BYTES, word);
  }
}

/** Subcluster type as QEMU's qcow2_get_subcluster_type. */
export type SubclusterType = "unallocated-plain" | "unallocated-alloc" | "zero-plain" | "zero-alloc" | "normal" | "compressed" | "invalid";

export function subclusterType(entry: L2Entry, subclusterIndex: number): SubclusterType {
  switch (entry.type) {
    case "compressed":
      return "compressed";
    case "normal":
      if ((entry.allocBitmap & entry.zeroBitmap) !== 0) return "invalid";
      if ((entry.zeroBitmap >>> subclusterIndex) & 1) return "zero-alloc";
      if ((entry.allocBitmap >>> subclusterIndex) & 1) return "normal";
      return "unallocated-alloc";
    case "unallocated":
      if (entry.allocBitmap !== 0) return "invalid";
      if ((entry.zeroBitmap >>> subclusterIndex) & 1) return "zero-plain";
      return "unallocated-plain";
    default:
      // ZERO flag set on an extended entry is invalid.
      return "invalid";
  }
}
