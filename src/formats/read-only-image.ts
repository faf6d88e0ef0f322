/**
 * What every read-only image format (vmdk, vpc) shares: writes refused
 * with E_READ_ONLY, a flush that has nothing to do, close once, and no use
 * after close. A format extends it with its reads and layerStatus; the
 * block-mapped ones (a dynamic VHD, a VDI) read and report status with
 * readBlocks and blockLayerStatus.
 */
import { SnapstackError } from "../base/errors.ts";
import type { LayerExtent } from "../device/block-device.ts";
import type { ImageFile } from "../io/file.ts";

/** What a read-only format's check found. */
export interface ReadOnlyCheck {
  corruptions: number;
  messages: string[];
  failure: string | null;
}

export abstract class ReadOnlyImage {
  abstract readonly format: string;
  readonly readOnly = true;
  readonly backing = null;
  readonly name: string;
  #closed = false;

  constructor(name: string) {
    this.name = name;
  }

  /** Close the files the image holds (once). */
  protected abstract closeFiles(): Promise<void>;

  /** info's cluster-size (QEMU's get_info), or null when it shows none. */
  get clusterSizeBytes(): number | null {
    return null;
  }

  /**
   * The format's own check (qemu-img check; it repairs nothing): the
   * corruptions, QEMU's lines for them, and a failure that stopped it; null
   * when the format has none ("This image format does not support checks").
   */
  async check(): Promise<ReadOnlyCheck | null> {
    return null;
  }

  protected checkOpen(): void {
    if (this.#closed) throw new SnapstackError("E_INTERNAL", `${this.name}: the image was used after it was closed`, { path: this.name });
  }

  #refuse(action: string): never {
    throw new SnapstackError("E_READ_ONLY", `${this.name}: cannot ${action}: snapstack opens ${this.format} images read-only`, { path: this.name });
  }

  async write(): Promise<void> {
    this.#refuse("write");
  }

  async writeZeroes(): Promise<void> {
    this.#refuse("write zeroes");
  }

  async discard(): Promise<void> {
    this.#refuse("discard");
  }

  async flush(): Promise<void> {
    this.checkOpen();
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.closeFiles();
  }
}

/** Where a guest byte of a block-mapped disk is: a host offset, or null when its block is not allocated (reads as zeroes). */
export type BlockLocator = (guestOffset: number) => number | null;

/** Read a disk cut into `blockBytes` blocks (a dynamic VHD, a VDI): unallocated blocks read as zeroes. */
export async function readBlocks(file: ImageFile, blockBytes: number, locate: BlockLocator, guestOffset: number, buffer: Uint8Array): Promise<void> {
  for (let done = 0; done < buffer.length; ) {
    const at = guestOffset + done;
    const length = Math.min(buffer.length - done, blockBytes - (at % blockBytes));
    const target = buffer.subarray(done, done + length);
    const hostOffset = locate(at);
    if (hostOffset === null) target.fill(0);
    else await file.read(hostOffset, target);
    done += length;
  }
}

/**
 * Block status of such a disk as QEMU's vpc and vdi drivers give it:
 * unallocated blocks zero (they read as zeroes: present), allocated ones
 * data at their host offset, neighbours merged.
 */
export function blockLayerStatus(blockBytes: number, locate: BlockLocator, guestOffset: number, lengthBytes: number): LayerExtent[] {
  const out: LayerExtent[] = [];
  const end = guestOffset + lengthBytes;
  for (let at = guestOffset; at < end; ) {
    const length = Math.min(end - at, blockBytes - (at % blockBytes));
    const hostOffset = locate(at);
    const last = out[out.length - 1];
    if (hostOffset === null) {
      if (last?.kind === "zero") last.lengthBytes += length;
      else out.push({ guestOffset: at, lengthBytes: length, kind: "zero" });
    } else if (last?.kind === "data" && last.hostOffset !== undefined && last.hostOffset + last.lengthBytes === hostOffset) {
      last.lengthBytes += length;
    } else {
      out.push({ guestOffset: at, lengthBytes: length, kind: "data", hostOffset });
    }
    at += length;
  }
  return out;
}
