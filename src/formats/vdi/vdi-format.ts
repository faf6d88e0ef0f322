/**
 * VDI (VirtualBox) structures, decoded (pure; no I/O), as QEMU 7.2's
 * block/vdi.c reads them.
 *
 * Design notes
 * - A 64-byte text line, then the header (little-endian): signature
 *   0xbeda107f at 64, version 1.1, the block map's and the data's offsets,
 *   sector size, disk size, block size (QEMU opens 1 MiB only), blocks in
 *   the image and allocated, and four UUIDs (a non-null link or parent UUID
 *   is a differencing image, which QEMU does not open either).
 * - The block map: one 32-bit entry per block; below 0xfffffffe it is the
 *   block's index in the data area (data at offset_data + index x block
 *   size); 0xffffffff (never written) and 0xfffffffe (discarded) read as
 *   zeroes.
 */
import { SnapstackError } from "../../base/errors.ts";

export const VDI_SIGNATURE = 0xbeda107f;
export const VDI_VERSION_1_1 = 0x00010001;
export const VDI_SECTOR_BYTES = 512;
export const VDI_BLOCK_BYTES = 1024 * 1024;
export const VDI_TYPE_STATIC = 2;
/** Block map entries at or above this are not allocated (VDI_DISCARDED; VDI_UNALLOCATED is 0xffffffff). */
export const VDI_DISCARDED = 0xfffffffe;
/** QEMU's limit on blocks in an image (the block map, rounded up to sectors, stays within INT_MAX bytes). */
export const VDI_BLOCKS_IN_IMAGE_MAX = (2 ** 31 - VDI_SECTOR_BYTES) / 4;
export const VDI_DISK_SIZE_MAX = VDI_BLOCKS_IN_IMAGE_MAX * VDI_BLOCK_BYTES;
export const VDI_HEADER_END = 512;

export interface VdiHeader {
  version: number;
  imageType: number;
  blockMapOffset: number;
  dataOffset: number;
  sectorSize: number;
  diskSizeBytes: number;
  blockSizeBytes: number;
  blocksInImage: number;
  blocksAllocated: number;
  linkUuidNull: boolean;
  parentUuidNull: boolean;
}

/** Whether bytes 64..67 hold the VDI signature. */
export function hasVdiSignature(head: Uint8Array): boolean {
  return head.length >= 68 && new DataView(head.buffer, head.byteOffset, 68).getUint32(64, true) === VDI_SIGNATURE;
}

const isNull = (bytes: Uint8Array): boolean => bytes.every((byte) => byte === 0);

/** The header in the first VDI_HEADER_END bytes (signature not checked here). */
export function decodeVdiHeader(bytes: Uint8Array): VdiHeader {
  if (bytes.length < VDI_HEADER_END) throw new SnapstackError("E_CORRUPT_IMAGE", "vdi: the header is truncated");
  const view = new DataView(bytes.buffer, bytes.byteOffset, VDI_HEADER_END);
  const diskSize = view.getBigUint64(368, true);
  if (diskSize > BigInt(Number.MAX_SAFE_INTEGER)) throw new SnapstackError("E_TOO_LARGE", `vdi: disk size ${diskSize} is out of range`);
  return {
    version: view.getUint32(68, true),
    imageType: view.getUint32(76, true),
    blockMapOffset: view.getUint32(340, true),
    dataOffset: view.getUint32(344, true),
    sectorSize: view.getUint32(360, true),
    diskSizeBytes: Number(diskSize),
    blockSizeBytes: view.getUint32(376, true),
    blocksInImage: view.getUint32(384, true),
    blocksAllocated: view.getUint32(388, true),
    linkUuidNull: isNull(bytes.subarray(424, 440)),
    parentUuidNull: isNull(bytes.subarray(440, 456)),
  };
}

/** vdi_open's refusals, in its order, as qemu-img words them; null when QEMU opens the image. */
export function vdiHeaderProblem(header: VdiHeader, signature: number): { code: "E_WRONG_FORMAT" | "E_TOO_LARGE" | "E_UNSUPPORTED_FEATURE"; message: string } | null {
  const unsupported = (message: string) => ({ code: "E_UNSUPPORTED_FEATURE" as const, message: `unsupported VDI image (${message})` });
  if (header.diskSizeBytes > VDI_DISK_SIZE_MAX) {
    return { code: "E_TOO_LARGE", message: `Unsupported VDI image size (size is 0x${header.diskSizeBytes.toString(16)}, max supported is 0x${VDI_DISK_SIZE_MAX.toString(16)})` };
  }
  if (signature !== VDI_SIGNATURE) return { code: "E_WRONG_FORMAT", message: `Image not in VDI format (bad signature ${signature.toString(16).padStart(8, "0")})` };
  if (header.version !== VDI_VERSION_1_1) return unsupported(`version ${header.version >>> 16}.${header.version & 0xffff}`);
  if (header.blockMapOffset % VDI_SECTOR_BYTES !== 0) return unsupported(`unaligned block map offset 0x${header.blockMapOffset.toString(16)}`);
  if (header.dataOffset % VDI_SECTOR_BYTES !== 0) return unsupported(`unaligned data offset 0x${header.dataOffset.toString(16)}`);
  if (header.sectorSize !== VDI_SECTOR_BYTES) return unsupported(`sector size ${header.sectorSize} is not ${VDI_SECTOR_BYTES}`);
  if (header.blockSizeBytes !== VDI_BLOCK_BYTES) return unsupported(`block size ${header.blockSizeBytes} is not ${VDI_BLOCK_BYTES}`);
  // (QEMU rounds an odd disk size up to whole sectors first, as VBoxManage convertfromraw makes them.)
  const diskSizeBytes = Math.ceil(header.diskSizeBytes / VDI_SECTOR_BYTES) * VDI_SECTOR_BYTES;
  if (diskSizeBytes > header.blocksInImage * header.blockSizeBytes) {
    return unsupported(`disk size ${diskSizeBytes}, image bitmap has room for ${header.blocksInImage * header.blockSizeBytes}`);
  }
  if (!header.linkUuidNull) return unsupported("non-NULL link UUID");
  if (!header.parentUuidNull) return unsupported("non-NULL parent UUID");
  if (header.blocksInImage > VDI_BLOCKS_IN_IMAGE_MAX) return unsupported(`too many blocks ${header.blocksInImage}, max is ${VDI_BLOCKS_IN_IMAGE_MAX}`);
  return null;
}
