/**
 * VDI images (VirtualBox), read-only, as QEMU 7.2's block/vdi.c reads
 * them, so `convert`, `compare`, `map`, `info`, `check` and `dd` take
 * VirtualBox disks.
 *
 * Design notes
 * - Open (vdi_open): the header checked in QEMU's order with its messages
 *   (vdi-format.ts), the guest size rounded up to whole sectors, the block
 *   map read whole into memory.
 * - Reads: an allocated block's data is at offset_data + index x 1 MiB;
 *   unallocated and discarded blocks read as zeroes.
 * - layerStatus is QEMU's block status: unallocated blocks zero (present),
 *   allocated ones data at their host offset; for a static (preallocated)
 *   image QEMU also asks the file (BDRV_BLOCK_RECURSE): hostHoles.
 * - check is vdi_co_check: block map entries out of range or used twice,
 *   and the allocated count, each a corruption with QEMU's line; nothing is
 *   repaired (-r: "does not support checks", as qemu-img).
 */
import { SnapstackError } from "../../base/errors.ts";
import type { BlockDevice, LayerExtent } from "../../device/block-device.ts";
import type { FileRun, ImageFile } from "../../io/file.ts";
import { checkDeviceRange } from "../raw/raw-image.ts";
import { ReadOnlyImage, blockLayerStatus, readBlocks, type ReadOnlyCheck } from "../read-only-image.ts";
import { VDI_DISCARDED, VDI_HEADER_END, VDI_SECTOR_BYTES, VDI_TYPE_STATIC, decodeVdiHeader, vdiHeaderProblem, type VdiHeader } from "./vdi-format.ts";

export class VdiImage extends ReadOnlyImage implements BlockDevice {
  readonly format = "vdi";
  readonly sizeBytes: number;
  readonly #file: ImageFile;
  readonly #header: VdiHeader;
  readonly #blockMap: Uint32Array;

  constructor(file: ImageFile, header: VdiHeader, blockMap: Uint32Array) {
    super(file.name);
    this.#file = file;
    this.#header = header;
    this.#blockMap = blockMap;
    this.sizeBytes = Math.ceil(header.diskSizeBytes / VDI_SECTOR_BYTES) * VDI_SECTOR_BYTES;
  }

  /** cluster-size in info (vdi_get_info): the block size. */
  override get clusterSizeBytes(): number {
    return this.#header.blockSizeBytes;
  }

  /** The host offset of a guest byte, or null when its block is not allocated. */
  readonly #locate = (guestOffset: number): number | null => {
    const blockBytes = this.#header.blockSizeBytes;
    const entry = this.#blockMap[Math.floor(guestOffset / blockBytes)];
    if (entry === undefined || entry >= VDI_DISCARDED) return null;
    return this.#header.dataOffset + entry * blockBytes + (guestOffset % blockBytes);
  };

  async read(guestOffset: number, buffer: Uint8Array): Promise<void> {
    checkDeviceRange(this, guestOffset, buffer.length);
    this.checkOpen();
    await readBlocks(this.#file, this.#header.blockSizeBytes, this.#locate, guestOffset, buffer);
  }

  async layerStatus(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]> {
    checkDeviceRange(this, guestOffset, lengthBytes);
    this.checkOpen();
    return blockLayerStatus(this.#header.blockSizeBytes, this.#locate, guestOffset, lengthBytes);
  }

  /** A static image's holes (QEMU's block status recurses into its file); null for a dynamic one. */
  async hostHoles(hostOffset: number, lengthBytes: number): Promise<FileRun[] | null> {
    return this.#header.imageType === VDI_TYPE_STATIC ? ((await this.#file.holes?.(hostOffset, lengthBytes)) ?? null) : null;
  }

  /** vdi_co_check: corruptions and QEMU's lines for them. */
  override async check(): Promise<ReadOnlyCheck> {
    this.checkOpen();
    const blocks = this.#header.blocksInImage;
    const owner = new Uint32Array(blocks).fill(0xffffffff);
    const messages: string[] = [];
    let allocated = 0;
    for (let block = 0; block < blocks; block++) {
      const entry = this.#blockMap[block];
      if (entry >= VDI_DISCARDED) continue;
      if (entry >= blocks) {
        messages.push(`ERROR: block index ${block} too large, is ${entry}`);
        continue;
      }
      allocated++;
      if (owner[entry] >= VDI_DISCARDED) owner[entry] = entry;
      else messages.push(`ERROR: block index ${owner[entry]} also used by ${entry}`);
    }
    if (allocated !== this.#header.blocksAllocated) messages.push(`ERROR: allocated blocks mismatch, is ${allocated}, should be ${this.#header.blocksAllocated}`);
    return { corruptions: messages.length, messages, failure: null };
  }

  protected async closeFiles(): Promise<void> {
    await this.#file.close();
  }
}

/** vdi_open on `file` (locked by the caller, which closes it on failure; the device closes it after). */
export async function openVdi(file: ImageFile): Promise<VdiImage> {
  const path = file.name;
  const headerBytes = new Uint8Array(VDI_HEADER_END);
  await file.read(0, headerBytes);
  const header = decodeVdiHeader(headerBytes);
  const problem = vdiHeaderProblem(header, new DataView(headerBytes.buffer).getUint32(64, true));
  if (problem !== null) throw new SnapstackError(problem.code, `${path}: ${problem.message}`, { path });
  const mapLengthBytes = Math.ceil((header.blocksInImage * 4) / VDI_SECTOR_BYTES) * VDI_SECTOR_BYTES;
  // Before allocating it (up to 2 GiB): a block map past the end of the file is damage, not a disk.
  if (header.blockMapOffset + header.blocksInImage * 4 > (await file.sizeBytes())) {
    throw new SnapstackError("E_CORRUPT_IMAGE", `${path}: the block map (${header.blocksInImage} blocks) lies past the end of the file`, { path });
  }
  const mapBytes = new Uint8Array(mapLengthBytes);
  await file.read(header.blockMapOffset, mapBytes);
  const view = new DataView(mapBytes.buffer);
  const blockMap = new Uint32Array(header.blocksInImage);
  for (let i = 0; i < blockMap.length; i++) blockMap[i] = view.getUint32(i * 4, true);
  return new VdiImage(file, header, blockMap);
}
