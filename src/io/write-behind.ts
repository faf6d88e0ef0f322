/**
 * Write-behind: one background fdatasync at a time for a file that a long
 * copy is filling, so the disk writes the copy back while it runs and the
 * flush at its end waits for the last stretch only (chain/copy-pipeline.ts
 * decides when; the devices own this object).
 *
 * Design notes
 * - start() returns at once and starts ImageFile.flush() unless one is
 *   already running (then it does nothing and says so: the copy asks again
 *   after its next write).
 * - The device's flush() calls settle() first: it waits for the running
 *   write-behind and fails if any write-behind failed. The failure is kept
 *   for every later settle(): Linux reports a failed writeback to one
 *   fdatasync only, so a later flush could succeed although data was lost.
 * - The device's close() calls settle() too, so no fdatasync runs on a
 *   closed (or reused) descriptor.
 * - No order is promised or needed: an early fdatasync only makes durable
 *   sooner what the kernel's own writeback could have; the devices keep
 *   every order their formats need with their own flushes. Those cannot
 *   miss a write-back error that a write-behind's fdatasync took (Linux
 *   reports one to a single fdatasync per open file): NodeFile runs flushes
 *   one at a time and fails every flush after a failed one.
 */
import type { ImageFile } from "./file.ts";

export class WriteBehind {
  readonly #file: ImageFile;
  #running: Promise<void> | null = null;
  #failure: { error: unknown } | null = null;

  constructor(file: ImageFile) {
    this.#file = file;
  }

  /** Start an fdatasync of what was written so far, unless one runs; whether it started one. */
  start(): boolean {
    if (this.#running !== null) return false;
    let flushing: Promise<void>;
    try {
      flushing = this.#file.flush();
    } catch (error) {
      flushing = Promise.reject(error);
    }
    this.#running = flushing.then(
      () => {
        this.#running = null;
      },
      (error: unknown) => {
        this.#running = null;
        this.#failure ??= { error };
      },
    );
    return true;
  }

  /** Wait for the running write-behind; throw the first one that failed (every time). */
  async settle(): Promise<void> {
    while (this.#running !== null) await this.#running;
    if (this.#failure !== null) throw this.#failure.error;
  }
}
