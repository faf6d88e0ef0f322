/**
 * VHD images ("vpc"), read-only: fixed and dynamic disks as QEMU 7.2's
 * block/vpc.c reads them, so `convert`, `compare`, `map`, `info` and `dd`
 * take Virtual PC, Hyper-V and Azure disks.
 *
 * Design notes
 * - Open (vpc_open): the footer copy at the start of the file, else the
 *   footer in the last sector, which must then be a fixed disk; the
 *   checksum must match. A dynamic disk's header gives the BAT, read whole
 *   into memory (QEMU does the same), and the block size.
 * - Reads: a fixed disk is its file from offset 0. A dynamic disk's
 *   unallocated blocks read as zeroes; an allocated block's data follows
 *   its sector bitmap (ignored for reads, as in QEMU).
 * - layerStatus is QEMU's block status: fixed, data at the guest offset
 *   (and the file's holes, through hostHoles, show as zero data as QEMU's
 *   protocol layer shows them); dynamic, allocated blocks data at their host
 *   offset, unallocated blocks zero (present: QEMU says they read as zero).
 * - Refused (E_UNSUPPORTED_FEATURE): differencing disks (they need their
 *   parent; QEMU would read the missing blocks as zeroes), disks above
 *   2040 GiB. Damaged headers and BATs get QEMU's messages (E_CORRUPT_IMAGE).
 */
import { SnapstackError } from "../../base/errors.ts";
import type { BlockDevice, LayerExtent } from "../../device/block-device.ts";
import type { FileRun, ImageFile } from "../../io/file.ts";
import { checkDeviceRange } from "../raw/raw-image.ts";
import { ReadOnlyImage, blockLayerStatus, readBlocks } from "../read-only-image.ts";
import {
  VHD_BAT_UNALLOCATED,
  VHD_DYNAMIC_HEADER_BYTES,
  VHD_FOOTER_BYTES,
  VHD_MAX_SECTORS,
  VHD_SECTOR_BYTES,
  VHD_TYPE_DIFFERENCING,
  VHD_TYPE_FIXED,
  bitmapBytes,
  decodeDynamicHeader,
  decodeFooter,
  footerSectors,
  hasFooterCookie,
} from "./vpc-format.ts";

/** Where a dynamic disk's blocks are: the BAT, and the bytes before each block's data. */
interface DynamicLayout {
  bat: Uint32Array;
  blockSizeBytes: number;
  bitmapBytes: number;
}

function corrupt(message: string, path: string): SnapstackError {
  return new SnapstackError("E_CORRUPT_IMAGE", `${path}: ${message}`, { path });
}

export class VpcImage extends ReadOnlyImage implements BlockDevice {
  readonly format = "vpc";
  readonly sizeBytes: number;
  readonly #file: ImageFile;
  /** Null: a fixed disk. */
  readonly #dynamic: DynamicLayout | null;

  constructor(file: ImageFile, sizeBytes: number, dynamic: DynamicLayout | null) {
    super(file.name);
    this.#file = file;
    this.sizeBytes = sizeBytes;
    this.#dynamic = dynamic;
  }

  /** cluster-size in info: the block size of a dynamic disk (vpc_get_info), null for a fixed one. */
  override get clusterSizeBytes(): number | null {
    return this.#dynamic?.blockSizeBytes ?? null;
  }

  async read(guestOffset: number, buffer: Uint8Array): Promise<void> {
    checkDeviceRange(this, guestOffset, buffer.length);
    this.checkOpen();
    const layout = this.#dynamic;
    if (layout === null) {
      await this.#file.read(guestOffset, buffer);
      return;
    }
    await readBlocks(this.#file, layout.blockSizeBytes, (at) => this.#hostOffset(layout, at), guestOffset, buffer);
  }

  async layerStatus(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]> {
    checkDeviceRange(this, guestOffset, lengthBytes);
    this.checkOpen();
    const layout = this.#dynamic;
    if (layout === null) return lengthBytes === 0 ? [] : [{ guestOffset, lengthBytes, kind: "data", hostOffset: guestOffset }];
    return blockLayerStatus(layout.blockSizeBytes, (at) => this.#hostOffset(layout, at), guestOffset, lengthBytes);
  }

  /** A fixed disk's holes (QEMU's block status recurses into the file); null for a dynamic one. */
  async hostHoles(hostOffset: number, lengthBytes: number): Promise<FileRun[] | null> {
    return this.#dynamic === null ? ((await this.#file.holes?.(hostOffset, lengthBytes)) ?? null) : null;
  }

  /** get_image_offset: the host offset of a guest byte of a dynamic disk, or null when its block is unallocated. */
  #hostOffset(layout: DynamicLayout, guestOffset: number): number | null {
    const index = Math.floor(guestOffset / layout.blockSizeBytes);
    if (index >= layout.bat.length || layout.bat[index] === VHD_BAT_UNALLOCATED) return null;
    return layout.bat[index] * VHD_SECTOR_BYTES + layout.bitmapBytes + (guestOffset % layout.blockSizeBytes);
  }

  protected async closeFiles(): Promise<void> {
    await this.#file.close();
  }
}

/** vpc_open on `file` (locked by the caller, which closes it on failure; the device closes it after). */
export async function openVpc(file: ImageFile): Promise<VpcImage> {
  const path = file.name;
  const fileSizeBytes = await file.sizeBytes();
  let footerBytes = new Uint8Array(VHD_FOOTER_BYTES);
  await file.read(0, footerBytes);
  let fixed = false;
  if (!hasFooterCookie(footerBytes)) {
    if (fileSizeBytes < VHD_FOOTER_BYTES) throw corrupt("File too small for a VHD header", path);
    footerBytes = new Uint8Array(VHD_FOOTER_BYTES);
    await file.read(fileSizeBytes - VHD_FOOTER_BYTES, footerBytes);
    if (!hasFooterCookie(footerBytes) || new DataView(footerBytes.buffer).getUint32(60) !== VHD_TYPE_FIXED) throw corrupt("invalid VPC image", path);
    fixed = true;
  }
  let footer;
  try {
    footer = decodeFooter(footerBytes);
  } catch (error) {
    throw error instanceof SnapstackError ? corrupt(error.message, path) : error;
  }
  if (footer.diskType === VHD_TYPE_DIFFERENCING) throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${path}: differencing VHD disks (which need their parent) are not supported`, { path });
  const sectors = footerSectors(footer);
  if (sectors > VHD_MAX_SECTORS) throw new SnapstackError("E_TOO_LARGE", `${path}: a VHD larger than 2040 GiB is not supported`, { path });
  if (fixed || footer.diskType === VHD_TYPE_FIXED) return new VpcImage(file, sectors * VHD_SECTOR_BYTES, null);

  if (footer.dataOffset < 0) throw corrupt("Invalid header magic", path);
  const headerBytes = new Uint8Array(VHD_DYNAMIC_HEADER_BYTES);
  await file.read(footer.dataOffset, headerBytes);
  let header;
  try {
    header = decodeDynamicHeader(headerBytes);
  } catch (error) {
    throw error instanceof SnapstackError ? corrupt(error.message, path) : error;
  }
  const blockSizeBytes = header.blockSizeBytes;
  if (blockSizeBytes < VHD_SECTOR_BYTES || (blockSizeBytes & (blockSizeBytes - 1)) !== 0) throw corrupt(`Invalid block size ${blockSizeBytes}`, path);
  if ((sectors * VHD_SECTOR_BYTES) / blockSizeBytes > 0xffffffff) throw corrupt("Too many blocks", path);
  if (header.maxTableEntries * blockSizeBytes < sectors * VHD_SECTOR_BYTES) throw corrupt("Page table too small", path);
  if (header.maxTableEntries > 0x7fffffff / 4) throw corrupt(`Max Table Entries too large (${header.maxTableEntries})`, path);
  // Before allocating it (up to 2 GiB): a BAT past the end of the file is damage, not a disk.
  if (header.tableOffset + header.maxTableEntries * 4 > fileSizeBytes) throw corrupt("the block allocation table lies past the end of the file", path);
  const batBytes = new Uint8Array(header.maxTableEntries * 4);
  await file.read(header.tableOffset, batBytes);
  const batView = new DataView(batBytes.buffer);
  const bat = new Uint32Array(header.maxTableEntries);
  const bitmap = bitmapBytes(blockSizeBytes);
  let freeDataBlockOffset = Math.ceil((header.tableOffset + batBytes.length) / VHD_SECTOR_BYTES) * VHD_SECTOR_BYTES;
  for (let i = 0; i < bat.length; i++) {
    bat[i] = batView.getUint32(i * 4);
    if (bat[i] !== VHD_BAT_UNALLOCATED) freeDataBlockOffset = Math.max(freeDataBlockOffset, bat[i] * VHD_SECTOR_BYTES + bitmap + blockSizeBytes);
  }
  if (freeDataBlockOffset > fileSizeBytes) {
    throw corrupt("block-vpc: free_data_block_offset points after the end of file. The image has been truncated.", path);
  }
  return new VpcImage(file, sectors * VHD_SECTOR_BYTES, { bat, blockSizeBytes, bitmapBytes: bitmap });
}
