/**
 * Concurrency primitives for one open image.
 *
 * - AsyncMutex serializes metadata updates (allocation, L2 changes, flush).
 * - RangeLock gives exclusive access to a range of guest clusters to one
 *   write, zero or discard request at a time, so two requests never decide
 *   the allocation of the same cluster concurrently.
 * - ReadGate lets a request that is about to free host clusters wait until
 *   every read that started before it has finished, so a read never sees a
 *   freed host cluster reused for other data. Reads do not wait for anything.
 */

export class AsyncMutex {
  #tail: Promise<void> = Promise.resolve();

  /** Run `fn` with the mutex held. */
  async run<T>(fn: () => Promise<T>): Promise<T> {
    const previous = this.#tail;
    let release!: () => void;
    this.#tail = new Promise<void>((resolve) => {
      release = resolve;
    });
    await previous;
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

interface HeldRange {
  start: number;
  end: number;
  released: Promise<void>;
}

export class RangeLock {
  readonly #held: HeldRange[] = [];

  /**
   * Take [start, end) after every earlier request overlapping it has
   * released (first come, first served: requests on the same clusters run in
   * the order they were issued). Returns the release function.
   */
  async acquire(start: number, end: number): Promise<() => void> {
    const conflicts = this.#held.filter((h) => h.start < end && start < h.end).map((h) => h.released);
    let release!: () => void;
    const held: HeldRange = {
      start,
      end,
      released: new Promise<void>((resolve) => {
        release = resolve;
      }),
    };
    this.#held.push(held);
    if (conflicts.length > 0) await Promise.all(conflicts);
    return () => {
      const index = this.#held.indexOf(held);
      if (index >= 0) this.#held.splice(index, 1);
      release();
    };
  }
}

export class ReadGate {
  #epoch = 0;
  readonly #active = new Map<number, number>();
  readonly #waiters: { epoch: number; resolve: () => void }[] = [];

  enter(): number {
    const epoch = this.#epoch;
    this.#active.set(epoch, (this.#active.get(epoch) ?? 0) + 1);
    return epoch;
  }

  leave(epoch: number): void {
    const count = (this.#active.get(epoch) ?? 1) - 1;
    if (count > 0) {
      this.#active.set(epoch, count);
      return;
    }
    this.#active.delete(epoch);
    for (let i = this.#waiters.length - 1; i >= 0; i--) {
      const waiter = this.#waiters[i];
      if (!this.#busyUpTo(waiter.epoch)) {
        this.#waiters.splice(i, 1);
        waiter.resolve();
      }
    }
  }

  #busyUpTo(epoch: number): boolean {
    for (const key of this.#active.keys()) if (key <= epoch) return true;
    return false;
  }

  /** Resolve once all reads that entered before this call have left. */
  drain(): Promise<void> {
    const epoch = this.#epoch++;
    if (!this.#busyUpTo(epoch)) return Promise.resolve();
    return new Promise((resolve) => this.#waiters.push({ epoch, resolve }));
  }
}
