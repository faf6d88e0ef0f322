/**
 * The one lifecycle every job on a chain follows (commit, rebase, stream,
 * diff, restore), after QEMU's block jobs (block/commit.c: run, then
 * prepare/abort, then clean).
 *
 * Design notes
 * - States: created -> running -> completed | failed | cancelled. `run`
 *   does the work; on success `prepare` makes it visible (the header
 *   switch of rebase and stream, emptying the overlay after commit); on
 *   failure or cancellation `abort` runs instead; `clean` always runs
 *   last (closing devices). A job is run once: a second run is E_INTERNAL.
 * - Cancellation is cooperative: the worker calls `checkpoint()` between
 *   requests, which throws E_ABORTED once the AbortSignal fired. Work is
 *   ordered so that every checkpoint is a safe place to stop: data is
 *   copied before any header changes, and `prepare` runs no checkpoint,
 *   so a cancelled job never leaves a half-switched image.
 * - Progress: the worker announces the total bytes it will move or compare
 *   (`setTotal`, from a metadata-only first pass) and reports as it goes
 *   (`advance`); listeners get {job, phase, doneBytes, totalBytes,
 *   fraction}. The fraction never goes backwards.
 */
import { SnapstackError, assert, isSnapstackError } from "../../base/errors.ts";
import type { OpenImageFile } from "../open-image.ts";

export type JobState = "created" | "running" | "completed" | "failed" | "cancelled";

export interface JobProgress {
  job: string;
  phase: string;
  doneBytes: number;
  totalBytes: number;
  /** 0..1; 1 once done. */
  fraction: number;
}

/** What every job function accepts. */
export interface JobOptions {
  onProgress?: (progress: JobProgress) => void;
  signal?: AbortSignal;
  /** Opens the images' files (default: NodeFile); crash tests pass FaultFiles. */
  openFile?: OpenImageFile;
}

export interface JobSteps<T> {
  /** The work; may call job.checkpoint() and job.advance(). */
  run(job: Job): Promise<T>;
  /** Make the result visible (no cancellation inside). */
  prepare?(job: Job, result: T): Promise<void>;
  /** Undo or settle after a failure or cancellation. */
  abort?(job: Job, error: unknown): Promise<void>;
  /** Always last (close devices). */
  clean?(job: Job): Promise<void>;
}

export class Job {
  readonly name: string;
  #state: JobState = "created";
  #phase = "";
  #doneBytes = 0;
  #totalBytes = 0;
  #lastFraction = 0;
  readonly #options: JobOptions;

  constructor(name: string, options: JobOptions = {}) {
    this.name = name;
    this.#options = options;
  }

  get state(): JobState {
    return this.#state;
  }

  get doneBytes(): number {
    return this.#doneBytes;
  }

  /** Throw E_ABORTED if the job was cancelled. Call only where stopping leaves images consistent. */
  checkpoint(): void {
    if (this.#options.signal?.aborted) {
      throw new SnapstackError("E_ABORTED", `${this.name} cancelled`, { job: this.name, doneBytes: this.#doneBytes });
    }
  }

  /** Start a phase of `totalBytes` (progress restarts its byte count but not its fraction). */
  setTotal(totalBytes: number, phase = this.#phase): void {
    assert(Number.isSafeInteger(totalBytes) && totalBytes >= 0, `job total ${totalBytes} is a byte count`);
    this.#totalBytes = totalBytes;
    this.#doneBytes = 0;
    this.#phase = phase;
    this.#report();
  }

  advance(bytes: number): void {
    this.#doneBytes += bytes;
    this.#report();
  }

  #report(): void {
    const listener = this.#options.onProgress;
    if (listener === undefined) return;
    const fraction = this.#state === "completed" ? 1 : this.#totalBytes === 0 ? 0 : Math.min(1, this.#doneBytes / this.#totalBytes);
    this.#lastFraction = Math.max(this.#lastFraction, fraction);
    listener({ job: this.name, phase: this.#phase, doneBytes: this.#doneBytes, totalBytes: this.#totalBytes, fraction: this.#lastFraction });
  }

  /** Run the job's steps once, in the lifecycle above. */
  async execute<T>(steps: JobSteps<T>): Promise<T> {
    assert(this.#state === "created", `job ${this.name} is ${this.#state}, not created`);
    this.#state = "running";
    try {
      this.checkpoint();
      const result = await steps.run(this);
      this.checkpoint();
      await steps.prepare?.(this, result);
      this.#state = "completed";
      this.#report();
      return result;
    } catch (error) {
      this.#state = isSnapstackError(error) && error.code === "E_ABORTED" ? "cancelled" : "failed";
      await steps.abort?.(this, error);
      throw error;
    } finally {
      await steps.clean?.(this);
    }
  }
}

/** Run `steps` as a new job named `name`. */
export function runJob<T>(name: string, options: JobOptions, steps: JobSteps<T>): Promise<T> {
  return new Job(name, options).execute(steps);
}
