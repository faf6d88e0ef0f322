/**
 * VHDX (Hyper-V) structures, decoded (pure; no I/O), as QEMU 7.2's
 * block/vhdx.c reads them (the layout is Microsoft's VHDX specification
 * 1.00; every field little-endian, GUIDs in their mixed-endian form).
 *
 * Design notes
 * - Layout: the file identifier ("vhdxfile") at 0; two headers ("head",
 *   4 KiB, CRC-32C) at 64 and 128 KiB, the valid one with the larger
 *   sequence number in charge; two copies of the region table ("regi",
 *   64 KiB, CRC-32C) at 192 and 256 KiB naming the BAT and the metadata
 *   region; the metadata table ("metadata") holding the block size, the
 *   virtual disk size and the logical sector size.
 * - The BAT: 64-bit entries, the state in bits 0-2 and the block's file
 *   offset in MiB in bits 20-63. Payload block entries are interleaved with
 *   sector bitmap entries: after every `chunkRatio` payload entries comes
 *   one bitmap entry (chunkRatio = 2^23 x logical sector size / block size).
 * - A non-zero log GUID in the header means the log may hold writes not
 *   yet applied to the file; QEMU replays it when opening read-write and
 *   refuses a read-only open when it finds entries to replay. Here (read
 *   only) such an image is refused: open and close it read-write in QEMU
 *   (or Hyper-V) once to replay its log.
 */
import { SnapstackError } from "../../base/errors.ts";

export const VHDX_HEADER_OFFSETS = [64 * 1024, 128 * 1024];
export const VHDX_HEADER_BYTES = 4096;
export const VHDX_REGION_TABLE_OFFSET = 192 * 1024;
export const VHDX_REGION_TABLE_BYTES = 64 * 1024;
export const VHDX_METADATA_TABLE_BYTES = 64 * 1024;
export const MiB = 1024 * 1024;
export const VHDX_BLOCK_BYTES_MIN = MiB;
export const VHDX_BLOCK_BYTES_MAX = 256 * MiB;
/** QEMU's largest virtual disk: 64 TiB. */
export const VHDX_DISK_BYTES_MAX = 64 * 1024 * 1024 * MiB;
export const VHDX_ENTRY_COUNT_MAX = 2047;

/** BAT entry states (bits 0-2). */
export const PAYLOAD_BLOCK_NOT_PRESENT = 0;
export const PAYLOAD_BLOCK_UNDEFINED = 1;
export const PAYLOAD_BLOCK_ZERO = 2;
export const PAYLOAD_BLOCK_UNMAPPED = 3;
export const PAYLOAD_BLOCK_UNMAPPED_V095 = 5;
export const PAYLOAD_BLOCK_FULLY_PRESENT = 6;
export const PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7;

function corrupt(message: string): SnapstackError {
  return new SnapstackError("E_CORRUPT_IMAGE", message);
}

/** The 16 bytes of a GUID as stored (first three fields little-endian). */
export function guidBytes(text: string): Uint8Array {
  const hex = text.replace(/-/g, "");
  const bytes = Uint8Array.from({ length: 16 }, (_, i) => Number.parseInt(hex.slice(2 * i, 2 * i + 2), 16));
  return Uint8Array.from([bytes[3], bytes[2], bytes[1], bytes[0], bytes[5], bytes[4], bytes[7], bytes[6], ...bytes.subarray(8)]);
}

const sameBytes = (a: Uint8Array, b: Uint8Array): boolean => a.length === b.length && a.every((byte, i) => byte === b[i]);

export const BAT_REGION_GUID = guidBytes("2DC27766-F623-4200-9D64-115E9BFD4A08");
export const METADATA_REGION_GUID = guidBytes("8B7CA206-4790-4B9A-B8FE-575F050F886E");
const FILE_PARAMETERS_GUID = guidBytes("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
const VIRTUAL_DISK_SIZE_GUID = guidBytes("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
const PAGE83_GUID = guidBytes("BECA12AB-B2E6-4523-93EF-C309E000C746");
const LOGICAL_SECTOR_SIZE_GUID = guidBytes("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
const PHYSICAL_SECTOR_SIZE_GUID = guidBytes("CDA348C7-445D-4471-9CC9-E9885251C556");
const PARENT_LOCATOR_GUID = guidBytes("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");

let crcTable: Uint32Array | null = null;

/** CRC-32C (Castagnoli), as VHDX checksums its headers and region tables. */
export function crc32c(bytes: Uint8Array): number {
  if (crcTable === null) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0x82f63b78 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let crc = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) crc = crcTable[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

/** Whether a structure's CRC-32C (its field at 4..7 counted as zero) matches. */
function checksumOk(bytes: Uint8Array): boolean {
  const stored = new DataView(bytes.buffer, bytes.byteOffset, 8).getUint32(4, true);
  const copy = bytes.slice();
  copy.fill(0, 4, 8);
  return crc32c(copy) === stored;
}

const ascii = (bytes: Uint8Array): string => String.fromCharCode(...bytes);

export function hasVhdxSignature(head: Uint8Array): boolean {
  return head.length >= 8 && ascii(head.subarray(0, 8)) === "vhdxfile";
}

export interface VhdxHeader {
  sequenceNumber: bigint;
  logGuidNull: boolean;
  version: number;
  /** The log region: registered with the region table's entries, as QEMU does. */
  logOffset: number;
  logLengthBytes: number;
}

/** One header copy, or null when it is not valid (signature, checksum, version 1). */
export function decodeHeader(bytes: Uint8Array): VhdxHeader | null {
  if (bytes.length < VHDX_HEADER_BYTES || ascii(bytes.subarray(0, 4)) !== "head" || !checksumOk(bytes.subarray(0, VHDX_HEADER_BYTES))) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, VHDX_HEADER_BYTES);
  const version = view.getUint16(66, true);
  if (version !== 1) return null;
  return {
    sequenceNumber: view.getBigUint64(8, true),
    logGuidNull: bytes.subarray(48, 64).every((byte) => byte === 0),
    version,
    logLengthBytes: view.getUint32(68, true),
    logOffset: Number(view.getBigUint64(72, true)),
  };
}

/** vhdx_parse_header: the valid header with the larger sequence number. */
export function currentHeader(first: Uint8Array, second: Uint8Array): VhdxHeader {
  const a = decodeHeader(first);
  const b = decodeHeader(second);
  if (a === null && b === null) throw corrupt("No valid VHDX header found");
  if (a === null) return b!;
  if (b === null) return a;
  return b.sequenceNumber > a.sequenceNumber ? b : a;
}

export interface VhdxRegions {
  batOffset: number;
  batLengthBytes: number;
  metadataOffset: number;
  metadataLengthBytes: number;
  /** Every entry of the table, in its order: [start, end) in bytes. */
  all: Array<[number, number]>;
}

/** The region table: where the BAT and the metadata region are. */
export function decodeRegionTable(bytes: Uint8Array): VhdxRegions {
  if (bytes.length < VHDX_REGION_TABLE_BYTES || ascii(bytes.subarray(0, 4)) !== "regi" || !checksumOk(bytes.subarray(0, VHDX_REGION_TABLE_BYTES))) {
    throw corrupt("Invalid VHDX region table");
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, VHDX_REGION_TABLE_BYTES);
  const count = view.getUint32(8, true);
  if (count > VHDX_ENTRY_COUNT_MAX) throw corrupt("Invalid VHDX region table: too many entries");
  let bat: [number, number] | null = null;
  let metadata: [number, number] | null = null;
  const all: Array<[number, number]> = [];
  for (let i = 0; i < count; i++) {
    const at = 16 + i * 32;
    const guid = bytes.subarray(at, at + 16);
    const offset = Number(view.getBigUint64(at + 16, true));
    const length = view.getUint32(at + 24, true);
    const required = (view.getUint32(at + 28, true) & 1) !== 0;
    if (offset % MiB !== 0 || length % MiB !== 0) throw corrupt("Invalid VHDX region table: a region is not 1 MiB aligned");
    all.push([offset, offset + length]);
    if (sameBytes(guid, BAT_REGION_GUID)) bat = [offset, length];
    else if (sameBytes(guid, METADATA_REGION_GUID)) metadata = [offset, length];
    else if (required) throw new SnapstackError("E_UNSUPPORTED_FEATURE", "Unsupported VHDX region: a required region snapstack does not know");
  }
  if (bat === null || metadata === null) throw corrupt("Invalid VHDX region table: no BAT or no metadata region");
  return { batOffset: bat[0], batLengthBytes: bat[1], metadataOffset: metadata[0], metadataLengthBytes: metadata[1], all };
}

export interface VhdxMetadata {
  blockSizeBytes: number;
  hasParent: boolean;
  virtualDiskBytes: number;
  logicalSectorBytes: number;
}

/**
 * The metadata table (the first 64 KiB of the metadata region, `region`):
 * block size and parent flag, virtual disk size, logical sector size; a
 * required item snapstack does not know is refused, as QEMU refuses it.
 */
export function decodeMetadata(region: Uint8Array): VhdxMetadata {
  if (region.length < VHDX_METADATA_TABLE_BYTES || ascii(region.subarray(0, 8)) !== "metadata") throw corrupt("Invalid VHDX metadata table");
  const view = new DataView(region.buffer, region.byteOffset, region.byteLength);
  const count = view.getUint16(10, true);
  if (count > VHDX_ENTRY_COUNT_MAX) throw corrupt("Invalid VHDX metadata table: too many entries");
  const item = (offset: number, length: number, need: number): DataView => {
    if (length < need || offset + length > region.length) throw corrupt("Invalid VHDX metadata: an item lies outside its region");
    return new DataView(region.buffer, region.byteOffset + offset, length);
  };
  let fileParameters: DataView | null = null;
  let diskSize: DataView | null = null;
  let sectorSize: DataView | null = null;
  for (let i = 0; i < count; i++) {
    const at = 32 + i * 32;
    const guid = region.subarray(at, at + 16);
    const offset = view.getUint32(at + 16, true);
    const length = view.getUint32(at + 20, true);
    const required = (view.getUint32(at + 24, true) & 4) !== 0;
    if (sameBytes(guid, FILE_PARAMETERS_GUID)) fileParameters = item(offset, length, 8);
    else if (sameBytes(guid, VIRTUAL_DISK_SIZE_GUID)) diskSize = item(offset, length, 8);
    else if (sameBytes(guid, LOGICAL_SECTOR_SIZE_GUID)) sectorSize = item(offset, length, 4);
    else if (sameBytes(guid, PARENT_LOCATOR_GUID)) throw new SnapstackError("E_UNSUPPORTED_FEATURE", "Differencing VHDX images (a parent locator) are not supported");
    else if (!sameBytes(guid, PAGE83_GUID) && !sameBytes(guid, PHYSICAL_SECTOR_SIZE_GUID) && required) {
      throw new SnapstackError("E_UNSUPPORTED_FEATURE", "Unsupported VHDX metadata: a required item snapstack does not know");
    }
  }
  if (fileParameters === null || diskSize === null || sectorSize === null) throw corrupt("Invalid VHDX metadata: a required item is missing");
  const blockSizeBytes = fileParameters.getUint32(0, true);
  const hasParent = (fileParameters.getUint32(4, true) & 2) !== 0;
  const virtualDisk = diskSize.getBigUint64(0, true);
  const logicalSectorBytes = sectorSize.getUint32(0, true);
  if (blockSizeBytes < VHDX_BLOCK_BYTES_MIN || blockSizeBytes > VHDX_BLOCK_BYTES_MAX || (blockSizeBytes & (blockSizeBytes - 1)) !== 0) {
    throw corrupt(`Invalid VHDX block size ${blockSizeBytes}`);
  }
  if (logicalSectorBytes !== 512 && logicalSectorBytes !== 4096) throw corrupt(`Invalid VHDX logical sector size ${logicalSectorBytes}`);
  if (virtualDisk > BigInt(VHDX_DISK_BYTES_MAX)) throw new SnapstackError("E_TOO_LARGE", `VHDX virtual disk size ${virtualDisk} exceeds 64 TiB`);
  return { blockSizeBytes, hasParent, virtualDiskBytes: Number(virtualDisk), logicalSectorBytes };
}

/** Payload blocks per sector bitmap block. */
export function chunkRatio(metadata: VhdxMetadata): number {
  return (2 ** 23 * metadata.logicalSectorBytes) / metadata.blockSizeBytes;
}

/** The BAT index of payload block `block` (bitmap entries interleaved). */
export function batIndex(block: number, ratio: number): number {
  return block + Math.floor(block / ratio);
}

/** What checkBatEntries needs of the image besides its BAT. */
export interface VhdxBatContext {
  blockSizeBytes: number;
  chunkRatio: number;
  virtualDiskBytes: number;
  logicalSectorBytes: number;
  /** The image file's size. */
  fileSizeBytes: number;
  /** The log and the region table's entries, [start, end) in bytes, in the order QEMU registers them. */
  regions: ReadonlyArray<readonly [number, number]>;
}

const INT64_MAX = 2n ** 63n - 1n;
const UINT64_MASK = 2n ** 64n - 1n;

/**
 * vhdx_check_bat_entries: QEMU's messages for fully present BAT entries
 * past the end of the file or over a region, in its order and with its
 * arithmetic (kept, quirks included, so that `check` counts what qemu-img
 * counts):
 * - every entry is looked at, sector bitmap entries too;
 * - the file size is rounded up to 512 bytes (bdrv_getlength);
 * - a block's length is the block size, less for the disk's last block,
 *   computed from the entry's BAT index (bitmap entries counted) with
 *   unsigned wrap-around, and from the disk size in whole logical sectors
 *   (QEMU's total_sectors: a size that is not a multiple of 512 is rounded
 *   down). QEMU opens 512-byte logical sectors only; for 4 KiB ones, which
 *   snapstack opens, whole 4 KiB sectors count;
 * - the region check runs for `chunkRatio` fully present entries, then
 *   skips one, counting fully present entries only;
 * - an overlap names the region registered last among those it overlaps
 *   (QEMU's list puts each new region first).
 * `firstOnly` stops at the first problem (an open); `check` counts them all.
 */
export function checkBatEntries(bat: BigUint64Array, context: VhdxBatContext, firstOnly: boolean): string[] {
  const messages: string[] = [];
  const blockSizeBytes = context.blockSizeBytes;
  const fileSizeBytes = Math.ceil(context.fileSizeBytes / 512) * 512;
  const totalBytes = Math.floor(context.virtualDiskBytes / context.logicalSectorBytes) * context.logicalSectorBytes;
  const overlapping = (start: number, end: number): readonly [number, number] | undefined =>
    context.regions.findLast(([regionStart, regionEnd]) => !(start >= regionEnd || end <= regionStart));
  let payBlocks = context.chunkRatio;
  for (let i = 0; i < bat.length; i++) {
    if (Number(bat[i] & 7n) !== PAYLOAD_BLOCK_FULLY_PRESENT) continue;
    const regionChecked = payBlocks !== 0;
    payBlocks = regionChecked ? payBlocks - 1 : context.chunkRatio;
    // Numbers for what a sound image has (offsets below 2^52); exact 64-bit arithmetic only for an entry with a problem.
    const offsetMiB = Number(bat[i] >> 20n);
    if (offsetMiB < 2 ** 32) {
      const offset = offsetMiB * MiB;
      const left = totalBytes - i * blockSizeBytes;
      const blockLength = left < 0 ? blockSizeBytes : Math.min(left, blockSizeBytes);
      if (offset + blockLength <= fileSizeBytes && !(regionChecked && overlapping(offset, offset + blockSizeBytes) !== undefined)) continue;
    }
    if (entryProblems(messages, i, bat[i] & ~0xfffffn, BigInt(blockSizeBytes), BigInt(fileSizeBytes), BigInt(totalBytes), regionChecked, overlapping, firstOnly) && firstOnly) break;
  }
  return messages;
}

/** QEMU's checks of one fully present entry, in 64-bit arithmetic; true when it added a message. */
function entryProblems(
  messages: string[],
  i: number,
  offset: bigint,
  blockSize: bigint,
  fileSize: bigint,
  totalBytes: bigint,
  regionChecked: boolean,
  overlapping: (start: number, end: number) => readonly [number, number] | undefined,
  firstOnly: boolean,
): boolean {
  const before = messages.length;
  const left = (totalBytes - BigInt(i) * blockSize) & UINT64_MASK;
  const blockLength = left < blockSize ? left : blockSize;
  if (offset > INT64_MAX - blockSize) messages.push(`VHDX BAT entry ${i} offset overflow.`);
  if (firstOnly && messages.length > before) return true;
  if (offset >= fileSize) {
    messages.push(`VHDX BAT entry ${i} start offset ${offset} points after end of file (${fileSize}). Image has probably been truncated.`);
  } else if (offset + blockLength > fileSize) {
    messages.push(`VHDX BAT entry ${i} end offset ${offset + blockLength - 1n} points after end of file (${fileSize}). Image has probably been truncated.`);
  }
  if (firstOnly && messages.length > before) return true;
  if (regionChecked) {
    const end = offset + blockSize;
    // Regions lie within the file (below 2^53): an offset past that overlaps none.
    const hit = offset < BigInt(Number.MAX_SAFE_INTEGER) ? overlapping(Number(offset), Number(end)) : undefined;
    if (hit !== undefined) messages.push(`VHDX region ${offset}-${end} overlaps with region ${hit[0]}-${hit[1]}`);
  }
  return messages.length > before;
}
