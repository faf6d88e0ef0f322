/**
 * qemu-img compare (qemu-img.c img_compare, reference §13).
 *
 * Design notes
 * - Walk both chains front to back over min(size1, size2). Where both sides
 *   read as zero without storing anything (zero status), skip. Where both are
 *   allocated somewhere in their chain, read up to COMPARE_CHUNK_BYTES of
 *   each and compare in 512-byte sectors; the mismatch offset is the first
 *   differing sector. Where only one side is allocated, that side must read
 *   as zeroes (first non-zero sector is the mismatch).
 * - Sizes may differ: the longer image's tail must read as zero and the
 *   result carries sizeMismatch (qemu-img prints "Warning: Image size
 *   mismatch!"). Strict mode fails on a size difference and on any block
 *   status difference (present, zero, data, offset validity, end of image).
 */
import type { BlockDevice, MapExtent } from "../device/block-device.ts";
import { SnapstackError } from "../base/errors.ts";
import { ChainStatusCursor } from "./chain-status.ts";

/** Bytes compared per read (qemu-img's IO_BUF_SIZE). */
export const COMPARE_CHUNK_BYTES = 2 * 1024 * 1024;
const SECTOR_BYTES = 512;

export type CompareResult =
  | { identical: true; sizeMismatch: boolean; message: string }
  | { identical: false; reason: "content" | "size" | "allocation"; guestOffset?: number; message: string };

export interface CompareImagesOptions {
  strict?: boolean;
  /** Called with the fraction done (0..1), then the bytes done and total. */
  onProgress?: (fraction: number, doneBytes: number, totalBytes: number) => void;
  signal?: AbortSignal;
}

const ZEROES = Buffer.alloc(COMPARE_CHUNK_BYTES);

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(b);
}

/** Byte index of the first differing sector, or -1 (compare_buffers). Buffers of equal length. */
export function findFirstDifferentSector(a: Uint8Array, b: Uint8Array): number {
  if (sameBytes(a, b)) return -1;
  for (let i = 0; i < a.length; i += SECTOR_BYTES) {
    const end = Math.min(a.length, i + SECTOR_BYTES);
    if (!sameBytes(a.subarray(i, end), b.subarray(i, end))) return i;
  }
  return -1;
}

/** Byte index of the first sector with a non-zero byte, or -1 (find_nonzero). At most COMPARE_CHUNK_BYTES. */
export function findNonZeroSector(buffer: Uint8Array): number {
  return findFirstDifferentSector(buffer, ZEROES.subarray(0, buffer.length));
}

function statusKey(entry: MapExtent, sizeBytes: number): string {
  const eof = entry.start + entry.length === sizeBytes;
  return `${entry.present}/${entry.zero}/${entry.data}/${entry.offset !== undefined}/${eof}`;
}

function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new SnapstackError("E_ABORTED", "compare cancelled");
}

function mismatch(guestOffset: number): CompareResult {
  return { identical: false, reason: "content", guestOffset, message: `Content mismatch at offset ${guestOffset}!` };
}

export async function compareImages(a: BlockDevice, b: BlockDevice, options: CompareImagesOptions = {}): Promise<CompareResult> {
  const strict = options.strict ?? false;
  const common = Math.min(a.sizeBytes, b.sizeBytes);
  const total = Math.max(a.sizeBytes, b.sizeBytes);
  const progress = (done: number): void => options.onProgress?.(total === 0 ? 1 : done / total, done, total);
  if (strict && a.sizeBytes !== b.sizeBytes) {
    return { identical: false, reason: "size", message: "Strict mode: Image size mismatch!" };
  }
  const cursorA = new ChainStatusCursor(a);
  const cursorB = new ChainStatusCursor(b);
  const bufferA = new Uint8Array(COMPARE_CHUNK_BYTES);
  const bufferB = new Uint8Array(COMPARE_CHUNK_BYTES);
  let offset = 0;
  progress(0);
  while (offset < common) {
    throwIfAborted(options.signal);
    const statusA = await cursorA.at(offset);
    const statusB = await cursorB.at(offset);
    let chunk = Math.min(statusA.length, statusB.length);
    if (strict && statusKey(statusA, a.sizeBytes) !== statusKey(statusB, b.sizeBytes)) {
      return { identical: false, reason: "allocation", guestOffset: offset, message: `Strict mode: Offset ${offset} block status mismatch!` };
    }
    if (!(statusA.zero && statusB.zero)) {
      chunk = Math.min(chunk, COMPARE_CHUNK_BYTES);
      if (statusA.present === statusB.present) {
        if (statusA.present) {
          const sliceA = bufferA.subarray(0, chunk);
          const sliceB = bufferB.subarray(0, chunk);
          await a.read(offset, sliceA);
          await b.read(offset, sliceB);
          const at = findFirstDifferentSector(sliceA, sliceB);
          if (at >= 0) return mismatch(offset + at);
        }
      } else {
        const slice = bufferA.subarray(0, chunk);
        await (statusA.present ? a : b).read(offset, slice);
        const at = findNonZeroSector(slice);
        if (at >= 0) return mismatch(offset + at);
      }
    }
    offset += chunk;
    progress(offset);
  }
  const sizeMismatch = a.sizeBytes !== b.sizeBytes;
  if (sizeMismatch) {
    const longer = a.sizeBytes > b.sizeBytes ? a : b;
    const cursor = new ChainStatusCursor(longer);
    while (offset < total) {
      throwIfAborted(options.signal);
      const status = await cursor.at(offset);
      let chunk = status.length;
      if (status.present && !status.zero) {
        chunk = Math.min(chunk, COMPARE_CHUNK_BYTES);
        const slice = bufferA.subarray(0, chunk);
        await longer.read(offset, slice);
        const at = findNonZeroSector(slice);
        if (at >= 0) return mismatch(offset + at);
      }
      offset += chunk;
      progress(offset);
    }
  }
  return { identical: true, sizeMismatch, message: sizeMismatch ? "Warning: Image size mismatch!\nImages are identical." : "Images are identical." };
}
