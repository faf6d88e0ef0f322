/**
 * A limit on the bytes a copy reads per second: qemu-img convert -r and
 * qemu-img commit -r (the commit job's speed).
 *
 * Design notes
 * - Before each chunk of data, the copy waits until the bytes read before it
 *   fit the rate since the first chunk: the average over the whole copy is at
 *   most bytesPerSecond, and no burst exceeds one chunk. (QEMU's ratelimit
 *   counts 100 ms slices; the long-run average is the same.)
 * - The wait is cut into slices of at most WAIT_SLICE_MS, each followed by
 *   the caller's checkpoint, so a cancel is noticed within a slice even at a
 *   rate of a few bytes per second.
 * - One RateLimit serves every copy() call of a job (jobs copy extent by
 *   extent), like the write-behind counter.
 */
import { assert } from "../base/errors.ts";

/** Longest sleep between two cancellation checkpoints while held back. */
export const WAIT_SLICE_MS = 100;

export interface RateClock {
  nowMs(): number;
  sleep(ms: number): Promise<void>;
}

const realClock: RateClock = {
  nowMs: () => Number(process.hrtime.bigint() / 1000n) / 1000,
  sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
};

export class RateLimit {
  readonly bytesPerSecond: number;
  readonly #clock: RateClock;
  #startMs: number | null = null;
  #admittedBytes = 0;

  constructor(bytesPerSecond: number, clock: RateClock = realClock) {
    assert(bytesPerSecond > 0, `rate limit ${bytesPerSecond} is a positive number of bytes per second`);
    this.bytesPerSecond = bytesPerSecond;
    this.#clock = clock;
  }

  /**
   * Resolves when `bytes` more may be read: once the bytes admitted before
   * them took their share of time since the first call. `checkpoint` runs
   * after each slice of waiting and may throw to cancel.
   */
  async admit(bytes: number, checkpoint?: () => void): Promise<void> {
    let now = this.#clock.nowMs();
    this.#startMs ??= now;
    const dueMs = this.#startMs + (this.#admittedBytes / this.bytesPerSecond) * 1000;
    this.#admittedBytes += bytes;
    while (now < dueMs) {
      await this.#clock.sleep(Math.min(WAIT_SLICE_MS, dueMs - now));
      checkpoint?.();
      now = this.#clock.nowMs();
    }
  }
}
