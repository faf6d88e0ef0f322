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
 *   mismatch!", also before a mismatch found in the tail). `message` is
 *   qemu-img's stdout, line for line. Strict mode fails on a size difference and on any block
 *   status difference (allocation, zero, data, offset validity, end of
 *   image), answer by answer as QEMU gives them: a qcow2 layer's answer
 *   ends with the L2 table that maps it (answerEnd), which decides where the
 *   end-of-image bit is set and where the next comparison starts. Holes in raw files are seen only with the native addon
 *   (io/native-file-ops.ts); without it a raw file with holes may be
 *   judged differently from qemu-img in strict mode; non-strict results do
 *   not depend on it.
 */
import type { BlockDevice, MapExtent } from "../device/block-device.ts";
import { isSnapstackError, SnapstackError } from "../base/errors.ts";
import { ChainStatusCursor } from "./chain-status.ts";
import { Qcow2Image } from "../formats/qcow2/index.ts";
import { allocateIoBuffer } from "../io/io-buffer.ts";

/** Bytes compared per read (qemu-img's IO_BUF_SIZE). */
export const COMPARE_CHUNK_BYTES = 2 * 1024 * 1024;
const SECTOR_BYTES = 512;

export type CompareResult =
  | { identical: true; sizeMismatch: boolean; message: string }
  | { identical: false; reason: "content" | "size" | "allocation"; guestOffset?: number; sizeMismatch?: boolean; message: string };

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

interface ChainShape {
  device: BlockDevice;
  bottomDepth: number;
  bottomSizeBytes: number;
  /**
   * Per layer, the guest bytes one block status answer covers at most:
   * QEMU's qcow2 answers stop at the end of the L2 table (slice) that maps
   * the offset; a raw file's do not stop.
   */
  answerSpanBytes: number[];
}

function chainShape(device: BlockDevice): ChainShape {
  const answerSpanBytes: number[] = [];
  let bottom = device;
  for (let layer: BlockDevice | null = device; layer !== null; layer = layer.backing) {
    answerSpanBytes.push(layer instanceof Qcow2Image ? layer.metadata.geometry.l2CoverageBytes : Number.POSITIVE_INFINITY);
    bottom = layer;
  }
  return { device, bottomDepth: answerSpanBytes.length - 1, bottomSizeBytes: bottom.sizeBytes, answerSpanBytes };
}

/**
 * Where bdrv_block_status_above's answer for `entry` (which starts at the
 * offset asked about) ends: at the entry's end, or before it where a layer
 * consulted for it (those above the one that holds it, and that one; every
 * layer when nothing holds it) stops at the end of an L2 table.
 */
function answerEnd(entry: MapExtent, shape: ChainShape): number {
  let end = entry.start + entry.length;
  const consulted = entry.present ? entry.depth : Math.min(shape.bottomDepth, entry.depth + 1);
  for (let depth = 0; depth <= consulted; depth++) {
    const span = shape.answerSpanBytes[depth];
    if (Number.isFinite(span)) end = Math.min(end, (Math.floor(entry.start / span) + 1) * span);
  }
  return end;
}

/**
 * The block status bits qemu-img compare -s compares, as
 * bdrv_block_status_above computes them: allocated (a range past a shorter
 * backing counts as allocated zeroes there), zero, data, offset valid, and
 * EOF (the run reaches the end of the image; for a range unallocated down
 * to the bottom, the bottom layer's own EOF survives too). `end`: the
 * answer's end (answerEnd).
 */
function statusKey(entry: MapExtent, shape: ChainShape, end: number): string {
  const unallocatedToBottom = !entry.present && entry.depth === shape.bottomDepth;
  const allocated = !unallocatedToBottom && (entry.present || entry.depth < shape.bottomDepth);
  const eof = end === shape.device.sizeBytes || (unallocatedToBottom && end === shape.bottomSizeBytes);
  // Zeroes synthesized past a shorter backing's end carry no host offset in the chain's status (map shows one).
  const offsetValid = entry.offset !== undefined && !(!entry.present && entry.depth < shape.bottomDepth);
  return `${allocated}/${entry.zero}/${entry.data}/${offsetValid}/${eof}`;
}

function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new SnapstackError("E_ABORTED", "compare cancelled");
}

/** Where a compare failed: qemu-img exits 3 when a block status query fails, 4 when a read does. */
export type CompareFailureStage = "status" | "read";

/**
 * Run one step of the walk; a failure carries `details.stage` so the CLI can
 * exit as qemu-img does (cli/exit-codes.ts), and in the longer image's tail
 * `details.sizeMismatch` (qemu-img has printed its size warning by then).
 * Errors that are not SnapstackErrors (bugs) pass through untouched.
 */
async function staged<T>(stage: CompareFailureStage, step: () => Promise<T>, inTail = false): Promise<T> {
  try {
    return await step();
  } catch (error) {
    if (!isSnapstackError(error)) throw error;
    const details = { ...error.details, cause: error.details.cause ?? error, stage, ...(inTail ? { sizeMismatch: true } : {}) };
    throw new SnapstackError(error.code, error.message, details);
  }
}

/** A content difference; past the common size, qemu-img has printed the size warning first. */
function mismatch(guestOffset: number, sizeMismatch = false): CompareResult {
  const message = `${sizeMismatch ? "Warning: Image size mismatch!\n" : ""}Content mismatch at offset ${guestOffset}!`;
  return { identical: false, reason: "content", guestOffset, message, ...(sizeMismatch ? { sizeMismatch } : {}) };
}

export async function compareImages(a: BlockDevice, b: BlockDevice, options: CompareImagesOptions = {}): Promise<CompareResult> {
  const strict = options.strict ?? false;
  const common = Math.min(a.sizeBytes, b.sizeBytes);
  const total = Math.max(a.sizeBytes, b.sizeBytes);
  const progress = (done: number): void => options.onProgress?.(total === 0 ? 1 : done / total, done, total);
  if (strict && a.sizeBytes !== b.sizeBytes) {
    return { identical: false, reason: "size", message: "Strict mode: Image size mismatch!" };
  }
  const shapeA = chainShape(a);
  const shapeB = chainShape(b);
  const cursorA = new ChainStatusCursor(a);
  const cursorB = new ChainStatusCursor(b);
  const bufferA = allocateIoBuffer(COMPARE_CHUNK_BYTES);
  const bufferB = allocateIoBuffer(COMPARE_CHUNK_BYTES);
  let offset = 0;
  progress(0);
  while (offset < common) {
    throwIfAborted(options.signal);
    const statusA = await staged("status", () => cursorA.at(offset));
    const statusB = await staged("status", () => cursorB.at(offset));
    let chunk = Math.min(statusA.length, statusB.length);
    if (strict) {
      const endA = answerEnd(statusA, shapeA);
      const endB = answerEnd(statusB, shapeB);
      if (statusKey(statusA, shapeA, endA) !== statusKey(statusB, shapeB, endB)) {
        return { identical: false, reason: "allocation", guestOffset: offset, message: `Strict mode: Offset ${offset} block status mismatch!` };
      }
      // Step as qemu-img steps, answer by answer: its next comparison (of the EOF bit too) starts there.
      chunk = Math.min(endA, endB) - offset;
    }
    if (!(statusA.zero && statusB.zero)) {
      chunk = Math.min(chunk, COMPARE_CHUNK_BYTES);
      if (statusA.present === statusB.present) {
        if (statusA.present) {
          const sliceA = bufferA.subarray(0, chunk);
          const sliceB = bufferB.subarray(0, chunk);
          await staged("read", () => a.read(offset, sliceA));
          await staged("read", () => b.read(offset, sliceB));
          const at = findFirstDifferentSector(sliceA, sliceB);
          if (at >= 0) return mismatch(offset + at);
        }
      } else {
        const slice = bufferA.subarray(0, chunk);
        await staged("read", () => (statusA.present ? a : b).read(offset, slice));
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
      const status = await staged("status", () => cursor.at(offset), true);
      let chunk = status.length;
      if (status.present && !status.zero) {
        chunk = Math.min(chunk, COMPARE_CHUNK_BYTES);
        const slice = bufferA.subarray(0, chunk);
        await staged("read", () => longer.read(offset, slice), true);
        const at = findNonZeroSector(slice);
        if (at >= 0) return mismatch(offset + at, true);
      }
      offset += chunk;
      progress(offset);
    }
  }
  return { identical: true, sizeMismatch, message: sizeMismatch ? "Warning: Image size mismatch!\nImages are identical." : "Images are identical." };
}
