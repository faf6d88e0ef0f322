/**
 * VHDX images (Hyper-V), read-only, as QEMU 7.2's block/vhdx.c reads them,
 * so `convert`, `compare`, `info`, `map`, `check` and `dd` take Hyper-V
 * disks.
 *
 * Design notes
 * - Open (vhdx_open): file identifier, the current header (vhdx-format.ts),
 *   the region table (the first copy, else the second), the metadata, then
 *   the BAT, read whole. Refused: an image whose log may hold writes not
 *   yet applied (a non-zero log GUID), differencing images, regions that
 *   overlap, payload blocks past the end of the file ("Image has probably
 *   been truncated") or over a region (vhdx-format.ts checkBatEntries, with
 *   QEMU's quirks). Opened for `check`, those BAT problems are counted as
 *   corruptions instead, as vhdx_co_check counts them.
 * - Reads, per payload block, by its BAT state: not present, undefined,
 *   zero and unmapped read as zeroes; fully present is read from the file;
 *   partially present (differencing images only) is an I/O error, as in
 *   QEMU.
 * - layerStatus: QEMU 7.2 has no block status for vhdx, so its map shows
 *   the whole disk as data without an offset; so does this one (convert
 *   then reads every block, as qemu-img's does, and writes zeroes as holes).
 */
import { SnapstackError } from "../../base/errors.ts";
import type { BlockDevice, LayerExtent } from "../../device/block-device.ts";
import type { ImageFile } from "../../io/file.ts";
import { checkDeviceRange } from "../raw/raw-image.ts";
import { ReadOnlyImage, readBlocks, type ReadOnlyCheck } from "../read-only-image.ts";
import {
  MiB,
  PAYLOAD_BLOCK_FULLY_PRESENT,
  PAYLOAD_BLOCK_PARTIALLY_PRESENT,
  VHDX_HEADER_BYTES,
  VHDX_HEADER_OFFSETS,
  VHDX_METADATA_TABLE_BYTES,
  VHDX_REGION_TABLE_BYTES,
  VHDX_REGION_TABLE_OFFSET,
  batIndex,
  checkBatEntries,
  chunkRatio,
  currentHeader,
  decodeMetadata,
  decodeRegionTable,
  hasVhdxSignature,
  type VhdxRegions,
} from "./vhdx-format.ts";

export class VhdxImage extends ReadOnlyImage implements BlockDevice {
  readonly format = "vhdx";
  readonly sizeBytes: number;
  readonly #file: ImageFile;
  readonly #blockSizeBytes: number;
  readonly #chunkRatio: number;
  readonly #bat: BigUint64Array;

  /** What checkBatEntries found (opened for `check` only: an ordinary open refuses such an image). */
  readonly #batProblems: readonly string[];

  constructor(file: ImageFile, sizeBytes: number, blockSizeBytes: number, ratio: number, bat: BigUint64Array, batProblems: readonly string[] = []) {
    super(file.name);
    this.#batProblems = batProblems;
    this.#file = file;
    this.sizeBytes = sizeBytes;
    this.#blockSizeBytes = blockSizeBytes;
    this.#chunkRatio = ratio;
    this.#bat = bat;
  }

  /** cluster-size in info: the block size. */
  override get clusterSizeBytes(): number {
    return this.#blockSizeBytes;
  }

  /** The host offset of a guest byte, or null when its block reads as zeroes. */
  readonly #locate = (guestOffset: number): number | null => {
    const block = Math.floor(guestOffset / this.#blockSizeBytes);
    const entry = this.#bat[batIndex(block, this.#chunkRatio)] ?? 0n;
    const state = Number(entry & 7n);
    if (state === PAYLOAD_BLOCK_FULLY_PRESENT) return Number(entry >> 20n) * MiB + (guestOffset % this.#blockSizeBytes);
    if (state === PAYLOAD_BLOCK_PARTIALLY_PRESENT || state === 4 || state > 7) {
      throw new SnapstackError("E_IO", `${this.name}: payload block ${block} is in a state a non-differencing image cannot have (${state})`, { path: this.name, errno: 5 });
    }
    return null;
  };

  async read(guestOffset: number, buffer: Uint8Array): Promise<void> {
    checkDeviceRange(this, guestOffset, buffer.length);
    this.checkOpen();
    await readBlocks(this.#file, this.#blockSizeBytes, this.#locate, guestOffset, buffer);
  }

  async layerStatus(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]> {
    checkDeviceRange(this, guestOffset, lengthBytes);
    this.checkOpen();
    return lengthBytes === 0 ? [] : [{ guestOffset, lengthBytes, kind: "data" }];
  }

  /** vhdx_co_check: each BAT problem is a corruption, reported through error_report as qemu-img does. */
  override async check(): Promise<ReadOnlyCheck> {
    this.checkOpen();
    return { corruptions: this.#batProblems.length, messages: this.#batProblems.map((message) => `${ERROR_REPORT_PREFIX}${message}`), failure: null };
  }

  protected async closeFiles(): Promise<void> {
    await this.#file.close();
  }
}

/** error_report()'s prefix on qemu-img's lines (the CLI prints its own name instead). */
const ERROR_REPORT_PREFIX = "qemu-img: ";

function corrupt(message: string, path: string): SnapstackError {
  return new SnapstackError("E_CORRUPT_IMAGE", `${path}: ${message}`, { path });
}

async function readAt(file: ImageFile, hostOffset: number, lengthBytes: number): Promise<Uint8Array> {
  const bytes = new Uint8Array(lengthBytes);
  await file.read(hostOffset, bytes);
  return bytes;
}

/** vhdx_open on `file` (locked by the caller, which closes it on failure; the device closes it after). */
export async function openVhdx(file: ImageFile, settings: { check?: boolean } = {}): Promise<VhdxImage> {
  const path = file.name;
  const prefix = (error: unknown): unknown => (error instanceof SnapstackError && !error.message.startsWith(path) ? new SnapstackError(error.code, `${path}: ${error.message}`, { path }) : error);
  try {
    if (!hasVhdxSignature(await readAt(file, 0, 8))) throw corrupt("Not a VHDX file (no 'vhdxfile' identifier)", path);
    const header = currentHeader(await readAt(file, VHDX_HEADER_OFFSETS[0], VHDX_HEADER_BYTES), await readAt(file, VHDX_HEADER_OFFSETS[1], VHDX_HEADER_BYTES));
    if (!header.logGuidNull) {
      throw new SnapstackError(
        "E_UNSUPPORTED_FEATURE",
        `${path}: the VHDX log may hold writes not yet applied (a non-zero log GUID); snapstack opens vhdx read-only and does not replay logs: open the image read-write once with QEMU or Hyper-V`,
        { path },
      );
    }
    let regions: VhdxRegions;
    try {
      regions = decodeRegionTable(await readAt(file, VHDX_REGION_TABLE_OFFSET, VHDX_REGION_TABLE_BYTES));
    } catch (error) {
      if (!(error instanceof SnapstackError) || error.code !== "E_CORRUPT_IMAGE") throw error;
      regions = decodeRegionTable(await readAt(file, VHDX_REGION_TABLE_OFFSET + VHDX_REGION_TABLE_BYTES, VHDX_REGION_TABLE_BYTES));
    }
    // vhdx_open_region_tables: each entry may not overlap the log or an entry before it.
    const registered: Array<[number, number]> = [[header.logOffset, header.logOffset + header.logLengthBytes]];
    for (const [start, end] of regions.all) {
      // QEMU's list puts each new region first: the one named is the last registered that overlaps.
      const hit = registered.findLast(([otherStart, otherEnd]) => !(start >= otherEnd || end <= otherStart));
      if (hit !== undefined) throw corrupt(`VHDX region ${start}-${end} overlaps with region ${hit[0]}-${hit[1]}`, path);
      registered.push([start, end]);
    }
    const metadata = decodeMetadata(await readAt(file, regions.metadataOffset, Math.max(VHDX_METADATA_TABLE_BYTES, regions.metadataLengthBytes)));
    if (metadata.hasParent) throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${path}: differencing VHDX images are not supported`, { path });
    const ratio = chunkRatio(metadata);
    const dataBlocks = Math.ceil(metadata.virtualDiskBytes / metadata.blockSizeBytes);
    const entries = dataBlocks === 0 ? 0 : batIndex(dataBlocks - 1, ratio) + 1;
    if (entries * 8 > regions.batLengthBytes) throw corrupt("Invalid VHDX BAT: smaller than the disk needs", path);
    const fileSizeBytes = await file.sizeBytes();
    if (regions.batOffset + entries * 8 > fileSizeBytes) throw corrupt("Invalid VHDX BAT: it lies past the end of the file", path);
    const batBytes = await readAt(file, regions.batOffset, entries * 8);
    const view = new DataView(batBytes.buffer);
    const bat = new BigUint64Array(entries);
    for (let i = 0; i < entries; i++) bat[i] = view.getBigUint64(i * 8, true);
    const context = { ...metadata, chunkRatio: ratio, fileSizeBytes, regions: registered };
    // As QEMU: an open stops at the first problem; one for `check` (BDRV_O_CHECK) counts them all instead.
    const problems = checkBatEntries(bat, context, settings.check !== true);
    if (settings.check !== true && problems.length > 0) throw corrupt(problems[0], path);
    // QEMU's size is total_sectors, whole logical sectors: a virtual size that is not a multiple of one is rounded down.
    const sizeBytes = Math.floor(metadata.virtualDiskBytes / metadata.logicalSectorBytes) * metadata.logicalSectorBytes;
    return new VhdxImage(file, sizeBytes, metadata.blockSizeBytes, ratio, bat, problems);
  } catch (error) {
    throw prefix(error);
  }
}
