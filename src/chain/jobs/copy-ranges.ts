/**
 * Moving guest ranges from one device to another (commit into a base,
 * stream into an overlay, restore onto a target).
 *
 * Data is read in COPY_CHUNK_BYTES pieces with the next read overlapping
 * the previous write (two buffers, one write in flight); zero ranges, and
 * chunks that read as all zeroes, become writeZeroes requests (zero
 * clusters in qcow2 v3, as QEMU's jobs with zero detection). Every chunk is
 * a cancellation checkpoint and a progress step.
 */
import type { BlockDevice } from "../../device/block-device.ts";
import type { Job } from "./job.ts";

/** Bytes per read/write request while copying (memory: two buffers of this size). */
export const JOB_COPY_CHUNK_BYTES = 2 * 1024 * 1024;
/** Largest single writeZeroes request. */
export const ZERO_REQUEST_BYTES_MAX = 1024 * 1024 * 1024;

export class RangeCopier {
  readonly #source: BlockDevice;
  readonly #target: BlockDevice;
  readonly #job: Job | undefined;
  readonly #buffers = [new Uint8Array(JOB_COPY_CHUNK_BYTES), new Uint8Array(JOB_COPY_CHUNK_BYTES)];
  /** Bytes written to the target (data and zeroes). */
  writtenBytes = 0;

  constructor(source: BlockDevice, target: BlockDevice, job?: Job) {
    this.#source = source;
    this.#target = target;
    this.#job = job;
  }

  async copyData(start: number, length: number): Promise<void> {
    let writing: Promise<void> = Promise.resolve();
    try {
      for (let at = 0, index = 0; at < length; index++) {
        this.#job?.checkpoint();
        const chunk = Math.min(JOB_COPY_CHUNK_BYTES, length - at);
        const buffer = this.#buffers[index % 2].subarray(0, chunk);
        await this.#source.read(start + at, buffer);
        await writing;
        writing = isAllZero(buffer) ? this.#target.writeZeroes(start + at, chunk) : this.#target.write(start + at, buffer);
        writing.catch(() => {}); // awaited above or in finally; handled here so Node does not report it early
        at += chunk;
        this.writtenBytes += chunk;
        this.#job?.advance(chunk);
      }
    } finally {
      await writing;
    }
  }

  async writeZeroes(start: number, length: number): Promise<void> {
    for (let at = 0; at < length; ) {
      this.#job?.checkpoint();
      const chunk = Math.min(ZERO_REQUEST_BYTES_MAX, length - at);
      await this.#target.writeZeroes(start + at, chunk);
      at += chunk;
      this.writtenBytes += chunk;
      this.#job?.advance(chunk);
    }
  }
}

const ZERO_CHUNK = Buffer.alloc(JOB_COPY_CHUNK_BYTES);

function isAllZero(buffer: Uint8Array): boolean {
  return Buffer.from(buffer.buffer, buffer.byteOffset, buffer.byteLength).equals(ZERO_CHUNK.subarray(0, buffer.byteLength));
}
