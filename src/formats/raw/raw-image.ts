/**
 * Raw images: the guest disk is the file, byte for byte.
 *
 * Design notes
 * - Virtual size is the file size rounded up to 512 bytes, as QEMU's block
 *   layer counts whole sectors (a 3000-byte file is a 3072-byte disk; the
 *   tail past the end of the file reads as zeroes).
 * - layerStatus reports the file's holes as zero and the rest as data, at
 *   host offset = guest offset, as qemu's file driver does (lseek
 *   SEEK_DATA / SEEK_HOLE, ImageFile.holes); the bytes of the last sector
 *   past the end of a file whose size is not a multiple of 512 are zero
 *   too. readStatus, for splitting NBD READs into data and hole chunks,
 *   lets the file answer from the data run it found last (NodeFile).
 *   Where holes cannot be seen (no native addon, io/native-file-ops.ts)
 *   everything before the file's end is data: readers then read holes
 *   (zeroes) instead of skipping them, with the same result.
 * - discard punches a hole where the file system can (ImageFile.discard),
 *   else does nothing: writing zeroes for a discard would allocate space
 *   (mkfs discards the whole disk), and NBD trim and qemu's "discard" let
 *   the range keep its old contents.
 * - writeZeroes zeroes in place (io/file.ts writeZeroBytes): a hole when
 *   the caller allows unmapping (NBD without NO_HOLE, qemu-io -u), else an
 *   allocated zero range (fallocate ZERO_RANGE), else written zero bytes;
 *   so zeroes are fast (NBD's FAST_ZERO is taken) only with the addon.
 * - Preallocation: "off" truncates and, on a file that was empty, writes
 *   the first 4 KiB (512 bytes if smaller) as qemu's allocate_first_block
 *   does, so `map` shows the same; "falloc" allocates with fallocate (zero
 *   bytes written where that is unsupported); "full" writes zeroes.
 */
import { SnapstackError } from "../../base/errors.ts";
import type { BlockDevice, LayerExtent, WriteZeroesOptions } from "../../device/block-device.ts";
import { writeZeroBytes, type ImageFile } from "../../io/file.ts";
import { WriteBehind } from "../../io/write-behind.ts";
import { createNodeFile, openNodeFile, syncDirectory } from "../../io/node-file.ts";
import { nativeFileOpsLoaded } from "../../io/native-file-ops.ts";
import { dirname } from "node:path";

export const RAW_SECTOR_BYTES = 512;

export type RawPreallocation = "off" | "falloc" | "full";
export const RAW_PREALLOCATION_MODES: readonly RawPreallocation[] = ["off", "falloc", "full"];

export function roundUpToSector(sizeBytes: number): number {
  return Math.ceil(sizeBytes / RAW_SECTOR_BYTES) * RAW_SECTOR_BYTES;
}

export function checkDeviceRange(device: { name: string; sizeBytes: number }, guestOffset: number, lengthBytes: number): void {
  if (!Number.isSafeInteger(guestOffset) || !Number.isSafeInteger(lengthBytes) || guestOffset < 0 || lengthBytes < 0 || guestOffset + lengthBytes > device.sizeBytes) {
    throw new SnapstackError(
      "E_OUT_OF_RANGE",
      `${device.name}: guest offset ${guestOffset} + length ${lengthBytes} exceeds virtual size ${device.sizeBytes}`,
      { guestOffset, lengthBytes, sizeBytes: device.sizeBytes },
    );
  }
}

export class RawImage implements BlockDevice {
  readonly format = "raw";
  readonly backing = null;
  readonly file: ImageFile;
  /** BlockDevice.writeSync, present when the file has writeSync. */
  readonly writeSync?: (guestOffset: number, data: Uint8Array) => void;
  #sizeBytes: number;
  #closed = false;
  readonly #writeBehind: WriteBehind;

  constructor(file: ImageFile, fileSizeBytes: number) {
    this.file = file;
    this.#writeBehind = new WriteBehind(file);
    this.#sizeBytes = roundUpToSector(fileSizeBytes);
    const fileWriteSync = file.writeSync?.bind(file);
    if (fileWriteSync !== undefined) {
      this.writeSync = (guestOffset, data) => {
        this.#checkWritable("write");
        checkDeviceRange(this, guestOffset, data.length);
        fileWriteSync(guestOffset, data);
      };
    }
  }

  get name(): string {
    return this.file.name;
  }

  get readOnly(): boolean {
    return this.file.readOnly;
  }

  get sizeBytes(): number {
    return this.#sizeBytes;
  }

  #checkWritable(action: string): void {
    if (this.readOnly) throw new SnapstackError("E_READ_ONLY", `${this.name}: cannot ${action}: image is read-only`, { path: this.name });
  }

  async read(guestOffset: number, buffer: Uint8Array): Promise<void> {
    checkDeviceRange(this, guestOffset, buffer.length);
    await this.file.read(guestOffset, buffer);
  }

  async write(guestOffset: number, data: Uint8Array): Promise<void> {
    this.#checkWritable("write");
    checkDeviceRange(this, guestOffset, data.length);
    await this.file.write(guestOffset, data);
  }

  async writeZeroes(guestOffset: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    this.#checkWritable("write zeroes");
    checkDeviceRange(this, guestOffset, lengthBytes);
    await writeZeroBytes(this.file, guestOffset, lengthBytes, options?.unmap === true ? "punch" : "allocate");
  }

  /**
   * BlockDevice.zeroesAreFast: with the native addon zeroes are made in
   * place (fallocate), whatever the range, as qemu's file driver answers
   * NBD's FAST_ZERO; without it they are written, which is not fast.
   */
  zeroesAreFast(_guestOffset: number, _lengthBytes: number): boolean {
    return this.file.zeroInPlace !== undefined && nativeFileOpsLoaded();
  }

  /** A hole where the file system can punch one (see the design notes). */
  async discard(guestOffset: number, lengthBytes: number): Promise<void> {
    this.#checkWritable("discard");
    checkDeviceRange(this, guestOffset, lengthBytes);
    if (lengthBytes > 0) await this.file.discard(guestOffset, lengthBytes);
  }

  async flush(): Promise<void> {
    // A write-behind still running finishes first; one that failed fails this flush (io/write-behind.ts).
    await this.#writeBehind.settle();
    await this.file.flush();
  }

  /** BlockDevice.writeBehind: start an fdatasync (a raw file has no metadata to keep in order). */
  writeBehind(): boolean {
    return !this.readOnly && !this.#closed && this.#writeBehind.start();
  }

  layerStatus(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]> {
    return this.#status(guestOffset, lengthBytes, false);
  }

  /** BlockDevice.readStatus: from the data run the file found last where it covers the range (NodeFile.holes). */
  readStatus(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]> {
    return this.#status(guestOffset, lengthBytes, true);
  }

  async #status(guestOffset: number, lengthBytes: number, knownDataOk: boolean): Promise<LayerExtent[]> {
    checkDeviceRange(this, guestOffset, lengthBytes);
    if (lengthBytes === 0) return [];
    const end = guestOffset + lengthBytes;
    // holes() covers the range up to the file's end (no fstat here: a raw NBD export asks for every READ).
    let runs = (await this.file.holes?.(guestOffset, lengthBytes, { knownDataOk })) ?? null;
    if (runs === null) {
      const fileEnd = Math.min(end, Math.max(guestOffset, await this.file.sizeBytes()));
      runs = fileEnd > guestOffset ? [{ hostOffset: guestOffset, lengthBytes: fileEnd - guestOffset, hole: false }] : [];
    }
    const extents: LayerExtent[] = [];
    for (const run of runs) extents.push({ guestOffset: run.hostOffset, lengthBytes: run.lengthBytes, kind: run.hole ? "zero" : "data", hostOffset: run.hostOffset });
    // The bytes of the last sector past the file's end read as zeroes: reported as such, as qemu's file driver does.
    const fileEnd = runs.length === 0 ? guestOffset : runs[runs.length - 1].hostOffset + runs[runs.length - 1].lengthBytes;
    if (end > fileEnd) {
      const last = extents[extents.length - 1];
      if (last?.kind === "zero") last.lengthBytes += end - fileEnd;
      else extents.push({ guestOffset: fileEnd, lengthBytes: end - fileEnd, kind: "zero", hostOffset: fileEnd });
    }
    return extents;
  }

  /**
   * Truncate the file to exactly newSizeBytes (as qemu-img resize does); the
   * virtual size becomes that rounded up to 512. Growing fills per the
   * preallocation mode; shrinking drops the tail.
   */
  async resize(newSizeBytes: number, options: { preallocation?: RawPreallocation } = {}): Promise<void> {
    this.#checkWritable("resize");
    const oldFileBytes = await this.file.sizeBytes();
    await this.file.truncate(newSizeBytes);
    await preallocateRaw(this.file, oldFileBytes, newSizeBytes, options.preallocation ?? "off");
    this.#sizeBytes = roundUpToSector(newSizeBytes);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      // No fdatasync may outlive the file; a failed write-behind fails the close as it would a flush.
      await this.#writeBehind.settle();
    } finally {
      await this.file.close();
    }
  }
}

export async function openRawImage(file: ImageFile): Promise<RawImage> {
  return new RawImage(file, await file.sizeBytes());
}

export async function openRaw(path: string, options: { readOnly?: boolean } = {}): Promise<RawImage> {
  const file = await openNodeFile(path, { readOnly: options.readOnly ?? false });
  try {
    return await openRawImage(file);
  } catch (error) {
    await file.close();
    throw error;
  }
}

/** qemu's MAX_BLOCKSIZE: allocate_first_block writes this much (a sector when the file is smaller). */
const FIRST_BLOCK_BYTES = 4096;

/** Fill a freshly truncated file per the preallocation mode (see the design notes). */
export async function preallocateRaw(file: ImageFile, fromBytes: number, toBytes: number, preallocation: RawPreallocation): Promise<void> {
  if (toBytes <= fromBytes) return;
  if (preallocation === "off") {
    if (fromBytes === 0) await writeZeroBytes(file, 0, toBytes < FIRST_BLOCK_BYTES ? RAW_SECTOR_BYTES : FIRST_BLOCK_BYTES);
    return;
  }
  if (preallocation === "falloc" && (await file.preallocate?.(fromBytes, toBytes - fromBytes)) === true) return;
  await writeZeroBytes(file, fromBytes, toBytes - fromBytes);
}

/**
 * Create (or overwrite, as qemu-img create does) a raw image of sizeBytes
 * rounded up to 512.
 */
export async function createRaw(path: string, sizeBytes: number, options: { preallocation?: RawPreallocation } = {}): Promise<void> {
  const preallocation = options.preallocation ?? "off";
  if (!RAW_PREALLOCATION_MODES.includes(preallocation)) {
    throw new SnapstackError("E_INVALID_OPTION", `${path}: Unsupported preallocation mode: ${preallocation}`, { path });
  }
  const rounded = roundUpToSector(sizeBytes);
  const file = await createNodeFile(path);
  try {
    await file.truncate(rounded);
    await preallocateRaw(file, 0, rounded, preallocation);
    await file.flush();
  } finally {
    await file.close();
  }
  await syncDirectory(dirname(path));
}
