/**
 * Buffers for large file reads and writes (copy chunks, compare chunks).
 *
 * Design note
 * - A large ArrayBuffer starts on a page boundary (V8 maps it), and so does
 *   a page-cache page. When the kernel copies between two addresses whose
 *   offsets within a page are within a few bytes of each other, some CPUs
 *   copy several times slower (4K aliasing of the copy's loads and stores).
 *   Measured on the AMD EPYC development VM (kernel 6.18, 256 MiB of 1 MiB
 *   preads from the page cache into one buffer at different offsets from a
 *   page boundary): 108-168 ms at offsets 0, 1, 8, 4088, 4096 and 8192,
 *   26-31 ms at 16, 32, 64, 128 ... 4064 (writes from such a buffer showed
 *   no difference in isolation). `img convert` of the 1 GiB bench image
 *   (medians of 8, alternating, quiet machine): to qcow2 0.92 s page aligned
 *   against 0.68 s shifted, to raw 1.36 against 0.67 s (qemu-img 0.55 s); in
 *   one profile the kernel's copies into and out of the aligned buffers took
 *   6,600 samples, the shifted ones 1,550. So these buffers start
 *   IO_BUFFER_SHIFT_BYTES past the start of their ArrayBuffer: cache-line
 *   aligned, never page aligned (not measured on other CPUs; it costs 64
 *   bytes per buffer).
 *   Nothing needs them page aligned (no O_DIRECT).
 */

/** Where an I/O buffer starts within its ArrayBuffer. */
export const IO_BUFFER_SHIFT_BYTES = 64;

/** A zeroed buffer of `lengthBytes` for file I/O, not page aligned (see the design note). */
export function allocateIoBuffer(lengthBytes: number): Uint8Array {
  return new Uint8Array(new ArrayBuffer(lengthBytes + IO_BUFFER_SHIFT_BYTES), IO_BUFFER_SHIFT_BYTES, lengthBytes);
}

/** The whole of a buffer allocateIoBuffer returned, from any view of it. */
export function wholeIoBuffer(view: Uint8Array): Uint8Array {
  return new Uint8Array(view.buffer, IO_BUFFER_SHIFT_BYTES, view.buffer.byteLength - IO_BUFFER_SHIFT_BYTES);
}

/** Zero bytes isAllZero compares against (one per process). */
const ZERO_COMPARE_BYTES = 64 * 1024;
let zeroCompare: Buffer | null = null;

/** Whether every byte of `bytes` is zero (memcmp against zeroes, 64 KiB at a time). */
export function isAllZero(bytes: Uint8Array): boolean {
  zeroCompare ??= Buffer.alloc(ZERO_COMPARE_BYTES);
  const buffer = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let at = 0; at < buffer.length; at += ZERO_COMPARE_BYTES) {
    const end = Math.min(buffer.length, at + ZERO_COMPARE_BYTES);
    if (buffer.compare(zeroCompare, 0, end - at, at, end) !== 0) return false;
  }
  return true;
}

/** Whether `buffer` is a whole allocateIoBuffer(lengthBytes) buffer. */
export function isWholeIoBuffer(buffer: Uint8Array, lengthBytes: number): boolean {
  return buffer.byteOffset === IO_BUFFER_SHIFT_BYTES && buffer.length === lengthBytes && buffer.buffer.byteLength === lengthBytes + IO_BUFFER_SHIFT_BYTES;
}
