/**
 * Reuse of reply and payload buffers, so a steady stream of same-sized
 * requests (fio, nbdcopy, qemu-img convert) allocates nothing: each buffer
 * returns here when the socket has handed it to the kernel (reads) or the
 * device has finished with it (writes).
 *
 * Bounded: at most buffersPerSizeMax free buffers of one size and
 * pooledBytesMax bytes in all; past that a returned buffer is left to the
 * garbage collector. Only whole buffers from take() come back (a view into
 * a larger ArrayBuffer would pin it), so give() ignores anything else.
 */
export const POOLED_BYTES_MAX = 16 * 1024 * 1024;
export const BUFFERS_PER_SIZE_MAX = 128;
/** Buffers smaller than this come from Node's own slab allocator instead. */
export const POOLED_BUFFER_BYTES_MIN = 4096;

export class BufferPool {
  readonly pooledBytesMax: number;
  #free = new Map<number, Buffer[]>();
  #pooledBytes = 0;

  constructor(pooledBytesMax = POOLED_BYTES_MAX) {
    this.pooledBytesMax = pooledBytesMax;
  }

  /** Bytes held in free buffers. */
  get pooledBytes(): number {
    return this.#pooledBytes;
  }

  /** A buffer of exactly `length` bytes with arbitrary contents. */
  take(length: number): Buffer {
    if (length < POOLED_BUFFER_BYTES_MIN) return Buffer.allocUnsafe(length);
    const buffer = this.#free.get(length)?.pop();
    if (buffer !== undefined) {
      this.#pooledBytes -= length;
      return buffer;
    }
    return Buffer.allocUnsafeSlow(length);
  }

  give(buffer: Buffer): void {
    const length = buffer.length;
    if (length < POOLED_BUFFER_BYTES_MIN || buffer.byteOffset !== 0 || buffer.buffer.byteLength !== length) return;
    if (this.#pooledBytes + length > this.pooledBytesMax) return;
    let list = this.#free.get(length);
    if (list === undefined) {
      list = [];
      this.#free.set(length, list);
    }
    if (list.length >= BUFFERS_PER_SIZE_MAX) return;
    list.push(buffer);
    this.#pooledBytes += length;
  }

  /** Drop every free buffer (when the server goes idle or closes). */
  clear(): void {
    this.#free.clear();
    this.#pooledBytes = 0;
  }
}
