/**
 * Raw images: the guest disk is the file, byte for byte.
 *
 * Design notes
 * - Virtual size is the file size rounded up to 512 bytes, as QEMU's block
 *   layer counts whole sectors (a 3000-byte file is a 3072-byte disk; the
 *   tail past the end of the file reads as zeroes).
 * - layerStatus reports every range as data at host offset = guest offset,
 *   except the bytes of the last sector past the end of a file whose size is
 *   not a multiple of 512 (zero, as qemu's file driver reports them).
 *   qemu-img finds holes with lseek(SEEK_DATA/SEEK_HOLE) and reports them as
 *   `zero: true, data: false`; Node has no lseek, so snapstack cannot see
 *   holes and maps them as data. Readers of raw images therefore read holes
 *   (which return zeroes) instead of skipping them; the result is the same.
 * - discard is a no-op: Node cannot punch holes, and writing zeroes for a
 *   discard would allocate space (mkfs discards the whole disk). The range
 *   keeps its old contents, which NBD trim and qemu's "discard" permit.
 * - writeZeroes writes real zero bytes (io/file.ts writeZeroBytes).
 * - Preallocation: "off" truncates; "falloc" and "full" both write zeroes
 *   (no fallocate in Node), so "falloc" costs as much as "full".
 */
import { SnapstackError } from "../../base/errors.ts";
import type { BlockDevice, LayerExtent, WriteZeroesOptions } from "../../device/block-device.ts";
import { writeZeroBytes, type ImageFile } from "../../io/file.ts";
import { WriteBehind } from "../../io/write-behind.ts";
import { createNodeFile, openNodeFile, syncDirectory } from "../../io/node-file.ts";
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
  /** The file's size is not a multiple of 512: the virtual disk ends in bytes past the file's end. */
  #unalignedFile: boolean;
  #closed = false;
  readonly #writeBehind: WriteBehind;

  constructor(file: ImageFile, fileSizeBytes: number) {
    this.file = file;
    this.#writeBehind = new WriteBehind(file);
    this.#sizeBytes = roundUpToSector(fileSizeBytes);
    this.#unalignedFile = fileSizeBytes % RAW_SECTOR_BYTES !== 0;
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

  async writeZeroes(guestOffset: number, lengthBytes: number, _options?: WriteZeroesOptions): Promise<void> {
    this.#checkWritable("write zeroes");
    checkDeviceRange(this, guestOffset, lengthBytes);
    await writeZeroBytes(this.file, guestOffset, lengthBytes);
  }

  /** No-op (see the design notes). */
  async discard(guestOffset: number, lengthBytes: number): Promise<void> {
    this.#checkWritable("discard");
    checkDeviceRange(this, guestOffset, lengthBytes);
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

  async layerStatus(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]> {
    checkDeviceRange(this, guestOffset, lengthBytes);
    if (lengthBytes === 0) return [];
    const end = guestOffset + lengthBytes;
    if (!this.#unalignedFile || end <= this.#sizeBytes - RAW_SECTOR_BYTES) return [{ guestOffset, lengthBytes, kind: "data", hostOffset: guestOffset }];
    // The bytes of the last sector past the file's end read as zeroes: reported as such, as qemu's file driver does.
    const dataEnd = Math.min(end, Math.max(guestOffset, await this.file.sizeBytes()));
    const extents: LayerExtent[] = [];
    if (dataEnd > guestOffset) extents.push({ guestOffset, lengthBytes: dataEnd - guestOffset, kind: "data", hostOffset: guestOffset });
    if (end > dataEnd) extents.push({ guestOffset: dataEnd, lengthBytes: end - dataEnd, kind: "zero", hostOffset: dataEnd });
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
    this.#unalignedFile = newSizeBytes % RAW_SECTOR_BYTES !== 0;
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

/** Fill a freshly truncated file per the preallocation mode. */
export async function preallocateRaw(file: ImageFile, fromBytes: number, toBytes: number, preallocation: RawPreallocation): Promise<void> {
  if (preallocation === "off" || toBytes <= fromBytes) return;
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
