/**
 * Moving guest ranges from one device to another (commit into a base,
 * stream into an overlay, rebase, diff --export, restore onto a target).
 *
 * The copy itself is chain/copy-pipeline.ts, shared with convert: reads
 * run ahead of one ordered writer, and a qcow2 target gets the data queued
 * meanwhile as one batched write. Zero ranges, and chunks that read as all
 * zeroes, become writeZeroes requests (zero clusters in qcow2 v3, as QEMU's
 * jobs with zero detection). Every chunk is a cancellation checkpoint and a
 * progress step.
 */
import type { BlockDevice } from "../../device/block-device.ts";
import { COPY_CHUNK_BYTES, copyRanges, type CopyRange, type WriteBehindCounter } from "../copy-pipeline.ts";
import type { RateLimit } from "../rate-limit.ts";
import type { Job } from "./job.ts";

/** Bytes per read request while copying. */
export const JOB_COPY_CHUNK_BYTES = COPY_CHUNK_BYTES;
/** Reads outstanding at once while copying (memory: this many chunks). */
const JOB_READS_IN_FLIGHT = 1;
/** Data bytes read and not yet written at most (one chunk being written, one read). */
const JOB_QUEUED_BYTES_MAX = JOB_COPY_CHUNK_BYTES;
export { ZERO_REQUEST_BYTES_MAX } from "../copy-pipeline.ts";

const ZERO_CHUNK = Buffer.alloc(JOB_COPY_CHUNK_BYTES);

/** The whole chunk as one zero run when it is all zeroes. */
function wholeZeroRun(data: Uint8Array): Array<[number, number]> {
  const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  return bytes.equals(ZERO_CHUNK.subarray(0, data.byteLength)) ? [[0, data.byteLength]] : [];
}

export class RangeCopier {
  readonly #source: BlockDevice;
  readonly #target: BlockDevice;
  readonly #job: Job | undefined;
  /** Chunk buffers kept from one copy() to the next. */
  readonly #freeBuffers: Uint8Array[] = [];
  /** Bytes written since the target's last write-behind, across copy() calls (jobs copy extent by extent). */
  readonly #writeBehindCounter: WriteBehindCounter = { writtenBytes: 0 };
  /** Bytes written to the target (data and zeroes). */
  writtenBytes = 0;

  readonly #rateLimit: RateLimit | undefined;
  readonly #unmapZeroes: boolean;

  /**
   * `rateLimit` holds every copy() of this copier to its rate (commit -r).
   * `unmapZeroes`: zero ranges may release the target's clusters (commit,
   * as QEMU's active commit writes zeroes with MAY_UNMAP: a zeroed cluster
   * of the base is freed, not kept allocated with its old bytes).
   */
  constructor(source: BlockDevice, target: BlockDevice, job?: Job, rateLimit?: RateLimit, unmapZeroes = false) {
    this.#source = source;
    this.#target = target;
    this.#job = job;
    this.#rateLimit = rateLimit;
    this.#unmapZeroes = unmapZeroes;
  }

  /**
   * Copy ranges in ascending guest order, pipelined across ranges; returns
   * once all writes completed. `checkpoint` (called before each chunk, after
   * the job's own) and `onWriteFailure` serve a caller that feeds ranges as
   * it finds them (restore).
   */
  async copy(ranges: AsyncIterable<CopyRange> | Iterable<CopyRange>, options: { checkpoint?: () => void; onWriteFailure?: (error: unknown) => void } = {}): Promise<void> {
    const job = this.#job;
    const extra = options.checkpoint;
    await copyRanges(this.#source, this.#target, ranges, {
      zeroMode: { kind: "zeroes", options: this.#unmapZeroes ? { unmap: true } : undefined },
      zeroRuns: wholeZeroRun,
      // One read ahead of the write: measured fastest for commit (see copy-pipeline.ts).
      readsInFlight: JOB_READS_IN_FLIGHT,
      queuedBytesMax: JOB_QUEUED_BYTES_MAX,
      freeBuffers: this.#freeBuffers,
      writeBehindCounter: this.#writeBehindCounter,
      rateLimit: this.#rateLimit,
      checkpoint: job === undefined && extra === undefined ? undefined : () => {
        job?.checkpoint();
        extra?.();
      },
      onWriteFailure: options.onWriteFailure,
      onProgress: (_kind, bytes) => {
        this.writtenBytes += bytes;
        job?.advance(bytes);
      },
    });
  }

  async copyData(start: number, length: number): Promise<void> {
    await this.copy([{ start, length, kind: "data" }]);
  }

  async writeZeroes(start: number, length: number): Promise<void> {
    await this.copy([{ start, length, kind: "zero" }]);
  }
}
