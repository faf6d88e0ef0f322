/**
 * VMDK on-disk structures, decoded (pure; no I/O): the hosted sparse
 * extent header ("KDMV", VMDK4), the stream-optimized footer, grain
 * markers, and the text descriptor, as QEMU 7.2's block/vmdk.c reads them.
 *
 * Design notes
 * - A sparse extent maps its guest sectors through a grain directory (GD,
 *   QEMU's L1: 32-bit sector offsets of grain tables) and grain tables
 *   (GT, QEMU's L2: 32-bit sector offsets of grains, `gtesPerGt` each).
 *   GTE 0 is unallocated; GTE 1 is a zeroed grain when the header's
 *   zero-grain flag is set.
 * - Stream-optimized extents store each grain zlib-compressed behind a
 *   12-byte marker (LBA, compressed size); their header may say "GD at
 *   end", and the real header is then the footer's, 1536 bytes before the
 *   end of the file (footer marker, header, end-of-stream marker).
 * - The descriptor is text. QEMU reads its fields by substring search
 *   (strstr): createType="..." (descriptor files only), CID and parentCID
 *   (hexadecimal), parentFileNameHint="..." (a backing file), and extent
 *   lines `RW <sectors> FLAT|SPARSE|VMFS|VMFSSPARSE|SESPARSE "<file>" [offset]`;
 *   lines whose access is not RW (RDONLY, NOACCESS) are skipped, as QEMU
 *   skips them (their sectors are then missing from the disk), and a blank
 *   line right before an extent line repeats that extent (QEMU's sscanf
 *   skips newlines), as in QEMU.
 */
import { SnapstackError } from "../../base/errors.ts";

export const VMDK_SECTOR_BYTES = 512;
/** "KDMV" read as a big-endian 32-bit number (VMDK4_MAGIC). */
export const VMDK4_MAGIC = 0x4b444d56;
/** "COWD": the VMFS sparse format of ESX 2 (VMDK3), not opened here. */
export const VMDK3_MAGIC = 0x434f5744;
export const VMDK4_FLAG_RGD = 1 << 1;
export const VMDK4_FLAG_ZERO_GRAIN = 1 << 2;
export const VMDK4_FLAG_COMPRESS = 1 << 16;
export const VMDK4_FLAG_MARKER = 1 << 17;
export const VMDK4_COMPRESSION_DEFLATE = 1;
/** gd_offset meaning "read the footer". */
export const VMDK4_GD_AT_END = 0xffffffffffffffffn;
/** GTE of a zeroed grain (with VMDK4_FLAG_ZERO_GRAIN). */
export const VMDK_GTE_ZEROED = 1;
/** Bytes of a grain marker before the compressed data (lba u64, size u32). */
export const GRAIN_MARKER_BYTES = 12;
/** Footer: footer marker sector, header sector, end-of-stream marker sector. */
export const FOOTER_BYTES = 1536;
/** What QEMU reads of a descriptor for CID and parentCID (DESC_SIZE). */
export const DESCRIPTOR_CID_BYTES = 20 * VMDK_SECTOR_BYTES;
/** Largest descriptor QEMU reads (vmdk_read_desc: 1 MiB - 1). */
export const DESCRIPTOR_BYTES_MAX = (1 << 20) - 1;
/** QEMU's limits (vmdk_add_extent, vmdk_open_vmdk4). */
export const GRAIN_SECTORS_MAX = 0x200000;
export const GD_ENTRIES_MAX = 32 * 1024 * 1024;
export const GTES_PER_GT_MAX = 512;
/** Create types QEMU opens from a descriptor file. */
export const DESCRIPTOR_CREATE_TYPES = ["monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"];

export interface VmdkSparseHeader {
  version: number;
  flags: number;
  capacitySectors: number;
  grainSectors: number;
  descriptorOffsetSectors: number;
  descriptorSizeSectors: number;
  gtesPerGt: number;
  rgdOffsetSectors: number;
  /** Null: "GD at end" (the footer holds the header to use). */
  gdOffsetSectors: number | null;
  grainOffsetSectors: number;
  compressAlgorithm: number;
}

function invalid(message: string): SnapstackError {
  return new SnapstackError("E_CORRUPT_IMAGE", message);
}

/** A little-endian u64 as a number; beyond 2^53 the image is corrupt for us. */
function u64(view: DataView, at: number, what: string): number {
  const value = view.getBigUint64(at, true);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid(`vmdk: ${what} ${value} is out of range`);
  return Number(value);
}

/**
 * The VMDK4 header, magic included (`bytes[0..3]`): version 4, flags 8,
 * capacity 12, grain size 20, descriptor offset 28 and size 36, GTEs per
 * GT 44, redundant GD 48, GD 56, grain offset 64, then a filler byte, four
 * check bytes and the compression algorithm at 77 (all little-endian;
 * sizes and offsets in sectors).
 */
export function decodeSparseHeader(bytes: Uint8Array): VmdkSparseHeader {
  if (bytes.length < 79) throw invalid("vmdk: the sparse extent header is truncated");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const gdAtEnd = view.getBigUint64(56, true) === VMDK4_GD_AT_END;
  return {
    version: view.getUint32(4, true),
    flags: view.getUint32(8, true),
    capacitySectors: u64(view, 12, "capacity"),
    grainSectors: u64(view, 20, "grain size"),
    descriptorOffsetSectors: u64(view, 28, "descriptor offset"),
    descriptorSizeSectors: u64(view, 36, "descriptor size"),
    gtesPerGt: view.getUint32(44, true),
    rgdOffsetSectors: u64(view, 48, "redundant grain directory offset"),
    gdOffsetSectors: gdAtEnd ? null : u64(view, 56, "grain directory offset"),
    grainOffsetSectors: u64(view, 64, "grain offset"),
    compressAlgorithm: view.getUint16(77, true),
  };
}

/**
 * The header in a stream-optimized footer (the last FOOTER_BYTES of the
 * file), checked as QEMU checks it ("Invalid footer").
 */
export function decodeFooter(bytes: Uint8Array): VmdkSparseHeader {
  if (bytes.length !== FOOTER_BYTES) throw invalid("vmdk: Invalid footer");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const footerMarkerOk = view.getUint32(8, true) === 0 && view.getUint32(12, true) === 3;
  const eosOk = view.getBigUint64(1024, true) === 0n && view.getUint32(1032, true) === 0 && view.getUint32(1036, true) === 0;
  if (!footerMarkerOk || view.getUint32(512) !== VMDK4_MAGIC || !eosOk) throw invalid("vmdk: Invalid footer");
  const header = decodeSparseHeader(bytes.subarray(512, 1024));
  if (header.gdOffsetSectors === null) throw invalid("vmdk: the footer's grain directory offset is not set");
  return header;
}

/** A grain marker: the compressed bytes it announces, within `bytes`. */
export function grainMarkerPayload(bytes: Uint8Array): Uint8Array {
  const size = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(8, true);
  if (size === 0 || size > bytes.length - GRAIN_MARKER_BYTES) throw invalid("vmdk: a compressed grain's marker announces an impossible size");
  return bytes.subarray(GRAIN_MARKER_BYTES, GRAIN_MARKER_BYTES + size);
}

export type VmdkExtentType = "FLAT" | "SPARSE" | "VMFS" | "VMFSSPARSE" | "SESPARSE";

export interface VmdkExtentLine {
  sectors: number;
  type: VmdkExtentType;
  fileName: string;
  /** FLAT: where the extent starts in its file, in sectors (VMFS: 0). */
  flatOffsetSectors: number;
}

export interface VmdkDescriptor {
  /** createType="..." or null when absent. */
  createType: string | null;
  /** CID and parentCID as QEMU reads them (null: missing or not hexadecimal). */
  cid: number | null;
  parentCid: number | null;
  /** parentFileNameHint="..." (a backing file) or null. */
  parentFileNameHint: string | null;
  extents: VmdkExtentLine[];
}

/** The text of a descriptor: up to the first NUL, as QEMU's C strings end; UTF-8, as file names are (QEMU passes the bytes through). */
export function descriptorText(bytes: Uint8Array): string {
  const end = bytes.indexOf(0);
  // ignoreBOM keeps a leading byte-order mark as text, as C sees its bytes.
  return new TextDecoder("utf-8", { ignoreBOM: true }).decode(end < 0 ? bytes : bytes.subarray(0, end));
}

/**
 * vmdk_parse_description: the quoted value after `name` + 2 characters
 * (`="`): null when `name` is absent; "unterminated" when the value has no
 * closing quote or is longer than `lengthMax` (QEMU's buffer), which QEMU
 * refuses.
 */
function quotedValue(text: string, name: string, lengthMax: number): string | null | "unterminated" {
  const at = text.indexOf(name);
  if (at < 0) return null;
  const start = at + name.length + 2;
  if (start >= text.length) return "unterminated";
  const end = text.indexOf('"', start);
  return end < 0 || end - start + 1 > lengthMax ? "unterminated" : text.slice(start, end);
}

/** vmdk_read_cid: the hexadecimal number after `name` and one character (`=`), as sscanf %x reads it. */
function cidValue(text: string, name: string): number | null {
  const at = text.indexOf(name);
  if (at < 0) return null;
  const match = /^[ \t\n\r]*(?:0[xX])?([0-9a-fA-F]+)/.exec(text.slice(at + name.length + 1));
  return match === null ? null : Number.parseInt(match[1].slice(-8), 16) >>> 0;
}

/**
 * sscanf("%10s %ld %10s \"%511[^\n\r\"]\" %ld") run from a line's start
 * over the rest of the descriptor, as vmdk_parse_extents runs it: a space
 * in the format matches any run of C whitespace (newlines too, and none at
 * all, so "2048FLAT" reads as two fields), %ld and %s skip whitespace
 * first, %10s reads at most 10 characters. Without the closing quote (or
 * past 511 characters of name) sscanf still has its 4th match and stops
 * there: a SPARSE extent named by what it read, a FLAT one invalid for lack
 * of an offset, as QEMU decides.
 */
const WS = "[ \\t\\n\\v\\f\\r]*";
/** A field read as sscanf reads it: as much as it can, never less to let a later field match ((?=(x))\k<x> does not backtrack). */
const field = (name: string, pattern: string): string => `(?=(?<${name}>${pattern}))\\k<${name}>`;
const WORD = "[^ \\t\\n\\v\\f\\r]{1,10}";
const NUMBER = "[+-]?\\d+";
/** Sticky: matched where a line's leading whitespace ends, over the rest of the descriptor. */
const EXTENT_LINE = new RegExp(
  `${field("access", WORD)}${WS}${field("sectors", NUMBER)}${WS}${field("type", WORD)}${WS}"(?<name>[^\\n\\r"]{1,511})(?:"(?:${WS}(?<offset>${NUMBER}))?)?`,
  "y",
);
/** C's isspace in the C locale. */
const C_WHITESPACE = " \t\n\v\f\r";
const EXTENT_TYPES: readonly string[] = ["FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"];

/** The extent sscanf reads at `at` (a line start past its whitespace), null for none; throws for an invalid line. */
function extentAt(text: string, at: number): VmdkExtentLine | null {
  EXTENT_LINE.lastIndex = at;
  const match = EXTENT_LINE.exec(text);
  if (match === null || match.groups!.access !== "RW") return null;
  const { sectors: sectorsText, type, name: fileName, offset: offsetText } = match.groups!;
  const sectors = Number(sectorsText);
  let flatOffsetSectors = offsetText === undefined ? -1 : Number(offsetText);
  const line = (): string => {
    const lineEnd = text.indexOf("\n", at);
    return text.slice(at, lineEnd < 0 ? text.length : lineEnd).replace(/\r$/, "");
  };
  if (type === "FLAT" ? flatOffsetSectors < 0 : offsetText !== undefined) throw invalid(`vmdk: Invalid extent line: ${line()}`);
  if (type === "VMFS") flatOffsetSectors = 0;
  if (sectors <= 0 || !EXTENT_TYPES.includes(type)) return null;
  if (!Number.isSafeInteger(sectors * VMDK_SECTOR_BYTES) || !Number.isSafeInteger(flatOffsetSectors * VMDK_SECTOR_BYTES)) {
    throw invalid(`vmdk: an extent's size or offset is beyond what snapstack addresses: ${line()}`);
  }
  return { sectors, type: type as VmdkExtentType, fileName, flatOffsetSectors };
}

/** Parse a descriptor as vmdk_open_desc_file and vmdk_parse_extents do. */
export function parseDescriptor(text: string): VmdkDescriptor {
  // QEMU reads CID, parentCID and parentFileNameHint from the first DESCRIPTOR_CID_BYTES only.
  const head = text.slice(0, DESCRIPTOR_CID_BYTES);
  const extents: VmdkExtentLine[] = [];
  // QEMU runs sscanf from the start of every line, and sscanf skips whitespace, newlines included: a
  // blank line right before an extent line reads that extent too (twice in all). So does this. Every
  // line start of a run of blank lines reaches the same place: it is skipped to once and read once.
  let skippedTo = 0;
  let readAt = -1;
  let read: VmdkExtentLine | null = null;
  for (let start = 0; start < text.length; ) {
    let at = Math.max(start, skippedTo);
    while (at < text.length && C_WHITESPACE.includes(text[at])) at++;
    skippedTo = at;
    if (at !== readAt) {
      readAt = at;
      read = extentAt(text, at);
    }
    if (read !== null) extents.push({ ...read });
    const newline = text.indexOf("\n", start);
    start = newline < 0 ? text.length : newline + 1;
  }
  const createType = quotedValue(text, "createType", 128);
  const parentFileNameHint = quotedValue(head, "parentFileNameHint", 4096);
  if (parentFileNameHint === "unterminated") throw invalid("vmdk: the descriptor's parentFileNameHint has no closing quote");
  return {
    createType: createType === "unterminated" ? null : createType,
    cid: cidValue(head, "CID"),
    parentCid: cidValue(head, "parentCID"),
    parentFileNameHint,
    extents,
  };
}
