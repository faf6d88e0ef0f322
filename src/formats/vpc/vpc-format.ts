/**
 * VHD ("vpc": Virtual PC, Hyper-V, Azure) structures, decoded (pure; no
 * I/O), as QEMU 7.2's block/vpc.c reads them.
 *
 * Design notes
 * - Every VHD ends with a 512-byte footer ("conectix", big-endian fields);
 *   a dynamic or differencing disk also starts with a copy of it, which is
 *   what QEMU's probe and open read first. A fixed disk is its data
 *   followed by the footer alone (QEMU's probe takes it for raw).
 * - The checksum is the one's complement of the byte sum of the footer
 *   with its checksum field zeroed; QEMU refuses a wrong one.
 * - The disk size: Virtual PC and QEMU's own "qemu" images show the CHS
 *   geometry's size (cylinders x heads x sectors), Hyper-V and others
 *   ("win ", "qem2", "d2v ", "CTXS", "tap\0") the footer's current size,
 *   and so does a geometry at its maximum.
 * - A dynamic disk's header ("cxsparse") gives the block allocation table
 *   (BAT, 32-bit big-endian sector offsets, 0xffffffff unallocated) and
 *   the block size; each allocated block starts with a sector bitmap of
 *   `bitmapBytes`, then the data. QEMU reads the data without consulting
 *   the bitmap.
 */
import { SnapstackError } from "../../base/errors.ts";

export const VHD_SECTOR_BYTES = 512;
export const VHD_FOOTER_BYTES = 512;
export const VHD_DYNAMIC_HEADER_BYTES = 1024;
export const VHD_TYPE_FIXED = 2;
export const VHD_TYPE_DYNAMIC = 3;
export const VHD_TYPE_DIFFERENCING = 4;
export const VHD_BAT_UNALLOCATED = 0xffffffff;
/** 65535 x 16 x 255: a geometry at its maximum means "use the current size". */
export const VHD_MAX_GEOMETRY_SECTORS = 65535 * 16 * 255;
/** QEMU's largest VHD: 2040 GiB. */
export const VHD_MAX_SECTORS = 0xff000000;
/** Creator applications whose disks are the footer's current size (QEMU's use_chs table). */
const CURRENT_SIZE_CREATORS = ["win ", "qem2", "d2v ", "CTXS", "tap\0"];

export interface VhdFooter {
  creatorApp: string;
  currentSizeBytes: number;
  cylinders: number;
  heads: number;
  sectorsPerCylinder: number;
  diskType: number;
  dataOffset: number;
}

export interface VhdDynamicHeader {
  tableOffset: number;
  maxTableEntries: number;
  blockSizeBytes: number;
}

function invalid(message: string): SnapstackError {
  return new SnapstackError("E_CORRUPT_IMAGE", message);
}

const latin1 = new TextDecoder("latin1");

/** Whether 512 bytes start with the footer cookie. */
export function hasFooterCookie(bytes: Uint8Array): boolean {
  return bytes.length >= 8 && latin1.decode(bytes.subarray(0, 8)) === "conectix";
}

/** vpc_checksum: the one's complement of the byte sum, the checksum field (64..67) counted as zero. */
export function footerChecksum(bytes: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < bytes.length; i++) if (i < 64 || i >= 68) sum += bytes[i];
  return ~sum >>> 0;
}

function u64(view: DataView, at: number, what: string): number {
  const value = view.getBigUint64(at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid(`vpc: ${what} ${value} is out of range`);
  return Number(value);
}

/** The footer (checksum verified: "Incorrect header checksum", as QEMU). */
export function decodeFooter(bytes: Uint8Array): VhdFooter {
  if (bytes.length < VHD_FOOTER_BYTES || !hasFooterCookie(bytes)) throw invalid("invalid VPC image");
  const view = new DataView(bytes.buffer, bytes.byteOffset, VHD_FOOTER_BYTES);
  if (footerChecksum(bytes.subarray(0, VHD_FOOTER_BYTES)) !== view.getUint32(64)) throw invalid("Incorrect header checksum");
  return {
    dataOffset: view.getBigUint64(16) === 0xffffffffffffffffn ? -1 : u64(view, 16, "data offset"),
    creatorApp: latin1.decode(bytes.subarray(28, 32)),
    currentSizeBytes: u64(view, 48, "current size"),
    cylinders: view.getUint16(56),
    heads: bytes[58],
    sectorsPerCylinder: bytes[59],
    diskType: view.getUint32(60),
  };
}

/** The guest size in sectors QEMU shows for a footer (geometry or current size; see the notes). */
export function footerSectors(footer: VhdFooter): number {
  const geometrySectors = footer.cylinders * footer.heads * footer.sectorsPerCylinder;
  const useGeometry = !CURRENT_SIZE_CREATORS.includes(footer.creatorApp);
  return !useGeometry || geometrySectors === VHD_MAX_GEOMETRY_SECTORS ? Math.floor(footer.currentSizeBytes / VHD_SECTOR_BYTES) : geometrySectors;
}

/** The dynamic disk header at the footer's data offset. */
export function decodeDynamicHeader(bytes: Uint8Array): VhdDynamicHeader {
  if (bytes.length < VHD_DYNAMIC_HEADER_BYTES || latin1.decode(bytes.subarray(0, 8)) !== "cxsparse") throw invalid("Invalid header magic");
  const view = new DataView(bytes.buffer, bytes.byteOffset, VHD_DYNAMIC_HEADER_BYTES);
  return {
    tableOffset: u64(view, 16, "table offset"),
    maxTableEntries: view.getUint32(28),
    blockSizeBytes: view.getUint32(32),
  };
}

/** Bytes of a block's sector bitmap (one bit per sector, whole sectors). */
export function bitmapBytes(blockSizeBytes: number): number {
  return Math.ceil(blockSizeBytes / (8 * VHD_SECTOR_BYTES) / VHD_SECTOR_BYTES) * VHD_SECTOR_BYTES;
}
