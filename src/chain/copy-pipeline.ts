/**
 * Copying guest ranges from one device to another in guest order, reads
 * running ahead of one ordered writer: the pipeline behind convert, commit,
 * stream, rebase, diff --export and restore.
 *
 * Design notes (qemu-img.c convert_co_do_copy with wr_in_order, block/commit.c)
 * - Input: ranges in ascending guest order, each "data" (read it from the
 *   source, write it) or "zero" (reads as zeroes). Data is read in chunks
 *   of at most COPY_CHUNK_BYTES.
 * - Writes are issued in guest order by one writer, as qemu-img convert
 *   (wr_in_order) and QEMU's commit job do, from the completion of the
 *   previous write (not from the loop that reads). Small data writes queued
 *   meanwhile (pieces between zero runs) are merged into one
 *   Qcow2Image.writeBatch, which allocates clusters in request order as
 *   separate writes would, so the host layout is qemu-img's. Allocation
 *   order decides a qcow2 target's layout, so a request starts only once
 *   every earlier one allocated its clusters: a batch reports that
 *   (onAllocated) before its data is written, so the next batch allocates
 *   while the data of this one is being written, and its data write is
 *   queued behind. With one batch at a time the thread that writes sat idle
 *   a quarter of the copy (measured in-process on the 1 GiB bench image:
 *   25-29% of the time no target write was outstanding, against 0-1% so,
 *   and for raw targets); that gap is qemu-img's too (wr_in_order: one
 *   write at a time), but there it is a few microseconds of C, here a
 *   thread-pool completion, the event loop and the allocation's JavaScript.
 *   Other qcow2 requests (zeroes, compressed clusters) allocate until they
 *   complete. Raw targets: COPY_WRITES_IN_FLIGHT requests, no order kept.
 * - How much runs at once was measured (whole convert commands of 1 GiB and
 *   in-process commits of 256 MiB, alternating variants, on the 2-core
 *   development VM under the load of other work). Convert: 2 reads ahead,
 *   4 MiB queued, 2 raw writes in flight and qcow2 batches of at most 1 MiB
 *   beat 1 read / 2 MiB / 1 write (qcow2 2.2 s against 3.0 s, raw 1.7 s
 *   against 2.3 s, medians of 5-7); in another run the latter beat the
 *   former 8 reads / 4 raw writes / up-to-8 MiB batches for qcow2 (1.8 s
 *   against 2.6 s) and lost for raw (1.8 s against 1.5 s); in-process,
 *   16 MiB queued or 8 MiB batches were up to twice as slow. Commit into qcow2 was fastest with one read ahead
 *   and 2 MiB queued (the jobs ask for that): 16 MiB queued with 8 MiB
 *   batches took twice the time. More requests in flight add thread-pool
 *   hops that compete with the copy for the same two cores, concurrent
 *   writes to one file serialize on its inode lock, and larger buffers are
 *   fresh memory to fault in. The limits are named so they can be measured
 *   again elsewhere.
 * - Back-pressure: reading stops while COPY_QUEUED_BYTES_MAX bytes of data
 *   wait for the writer or are being written. Buffers are reused from a
 *   free list once their writes completed; they are io/io-buffer.ts's, not
 *   page aligned (the kernel's copies into page-aligned ones ran several
 *   times slower on the AMD development VM).
 * - Zeroes: a chunk of data is split by the caller's zeroRuns (convert:
 *   runs of zero sectors of at least -S bytes; jobs: the whole chunk when
 *   it is all zero). Zero ranges and runs are, by zeroMode, skipped (a new
 *   target reads as zeroes), written as writeZeroes requests, or written
 *   as zero bytes (convert -S 0 allocates everything).
 * - Compression (qcow2 targets): each data chunk (one cluster) goes to
 *   writeCompressed, in order, one at a time.
 * - Write-behind: every COPY_WRITE_BEHIND_BYTES of data written, the
 *   writer calls target.writeBehind(), which starts an fdatasync on the
 *   thread pool unless one runs (outside the qcow2 metadata lock), so the
 *   disk writes the copy back while it runs and the caller's flush at the
 *   end waits for the last stretch only. The count of bytes lives in a
 *   WriteBehindCounter that a caller copying range after range keeps
 *   (RangeCopier: stream, rebase and diff --export copy extent by extent),
 *   and the fdatasync belongs to the device: the copy does not wait for it,
 *   the device's flush and close do, and fail if it failed
 *   (io/write-behind.ts). Measured on the development VM (256 MiB commit,
 *   medians of 9 alternating with qemu-img): the final fdatasync alone took
 *   ~130 ms, the whole commit 365 -> 284 ms (qemu-img 300 ms, which
 *   flushes once at the end; 8 and 16 MiB steps measured alike, 64 MiB
 *   a little slower). A target opened with cache "unsafe" (convert's
 *   default) flushes nothing, so there it costs nothing; convert -t
 *   writeback (and the VM manager's convert) write behind too.
 * - Rate limit (convert -r, commit -r): before each read of data the loop
 *   waits for the caller's RateLimit (chain/rate-limit.ts).
 * - Failure: the first failed write stops the writer; the loop stops
 *   reading, waits for every outstanding read and write, and rethrows it,
 *   so the caller can close the devices at once. checkpoint() (cancellation)
 *   is called before each chunk. When the loop stops for another reason (a
 *   cancel, a failed read) while a write fails for its own, both are
 *   reported (base/errors.ts withSecondFailure).
 */
import { assert, withSecondFailure } from "../base/errors.ts";
import type { BlockDevice, WriteZeroesOptions } from "../device/block-device.ts";
import { allocateIoBuffer, isWholeIoBuffer, wholeIoBuffer } from "../io/io-buffer.ts";
import { Qcow2Image } from "../formats/qcow2/index.ts";
import type { WriteRequest } from "../formats/qcow2/qcow2-image.ts";
import type { RateLimit } from "./rate-limit.ts";

/** Bytes per read request (qemu-img convert's IO_BUF_SIZE). */
export const COPY_CHUNK_BYTES = 2 * 1024 * 1024;
/** Read requests outstanding at once by default (memory: this many chunks). */
export const COPY_READS_IN_FLIGHT = 2;
/** Data bytes read and not yet written at most, by default (memory: about this much plus the reads in flight). */
export const COPY_QUEUED_BYTES_MAX = 4 * 1024 * 1024;
/** Write requests in flight (qcow2: the second one allocates only after the first did, see OrderedWriter). */
export const COPY_WRITES_IN_FLIGHT = 2;
/** Most data bytes merged into one Qcow2Image.writeBatch (small requests only: see the design notes). */
export const WRITE_BATCH_BYTES_MAX = 1024 * 1024;
/** Data bytes written between two write-behind flushes (see the design notes). */
export const COPY_WRITE_BEHIND_BYTES = 32 * 1024 * 1024;
/** Largest single writeZeroes request. */
export const ZERO_REQUEST_BYTES_MAX = 1024 * 1024 * 1024;

export type CopyRangeKind = "data" | "zero";

export interface CopyRange {
  start: number;
  length: number;
  kind: CopyRangeKind;
}

/** How zero ranges (and zero runs found in data) reach the target. */
export type ZeroMode =
  /** Not written: the target already reads as zeroes there. */
  | { kind: "skip" }
  /** writeZeroes requests (zero clusters in qcow2). */
  | { kind: "zeroes"; options?: WriteZeroesOptions }
  /** Written as zero bytes (allocates). */
  | { kind: "bytes" };

export interface CopyPipelineOptions {
  zeroMode: ZeroMode;
  /** Zero runs inside a chunk of data as [start, end) pairs, ascending (default: none). */
  zeroRuns?: (data: Uint8Array, guestOffset: number) => Array<[number, number]>;
  /** Data chunks go to Qcow2Image.writeCompressed (the target must be qcow2). */
  compress?: boolean;
  /** Bytes per chunk of data (default COPY_CHUNK_BYTES; a cluster when compressing). */
  chunkBytes?: number;
  /** Reads outstanding at once (default COPY_READS_IN_FLIGHT). */
  readsInFlight?: number;
  /** Data bytes read and not yet written at most (default COPY_QUEUED_BYTES_MAX). */
  queuedBytesMax?: number;
  /** Called before each chunk; throws to cancel. */
  checkpoint?: () => void;
  /** Holds reads of data to this many bytes per second (convert -r, commit -r; shared across calls). */
  rateLimit?: RateLimit;
  /** Called as ranges are handed to the writer: data bytes, then zero bytes. */
  onProgress?: (kind: CopyRangeKind, bytes: number) => void;
  /**
   * Called once, as soon as a write fails (before the copy notices it at its
   * next chunk or range): a caller feeding ranges from elsewhere stops
   * producing them.
   */
  onWriteFailure?: (error: unknown) => void;
  /** Data bytes between write-behind flushes (default COPY_WRITE_BEHIND_BYTES; 0: none). */
  writeBehindBytes?: number;
  /** Where the bytes written since the last write-behind are counted (default: this call's own; see WriteBehindCounter). */
  writeBehindCounter?: WriteBehindCounter;
  /**
   * Chunk buffers to reuse, and where they go back once written: a caller
   * that copies range after range (the jobs' RangeCopier) keeps one list, so
   * each call does not allocate and fault in new 2 MiB buffers (restore of
   * 256 ranges allocated 1 GiB of them). Default: a list of this call's own.
   */
  freeBuffers?: Uint8Array[];
}

/**
 * Data bytes written to a target since its last write-behind. A caller that
 * copies range after range into one target keeps one (as it keeps its
 * freeBuffers), so many small copies add up to a write-behind.
 */
export interface WriteBehindCounter {
  writtenBytes: number;
}

type WriteOp =
  | { kind: "data"; guestOffset: number; data: Uint8Array; done: (() => void) | null }
  | { kind: "compressed"; guestOffset: number; data: Uint8Array; done: (() => void) | null }
  | { kind: "zero"; guestOffset: number; lengthBytes: number; options: WriteZeroesOptions | undefined; done: (() => void) | null };

/**
 * Issues write requests in the order they were queued (qcow2: queued data
 * writes merged into batches, each started only once the one before has
 * allocated its clusters). enqueue() never blocks; whenBelow() is the
 * back-pressure.
 */
export class OrderedWriter {
  readonly #target: BlockDevice;
  readonly #batchTarget: Qcow2Image | null;
  /** qcow2: a request starts only after every earlier one allocated its clusters (their order decides the host layout). */
  readonly #allocationOrdered: boolean;
  readonly #requestsMax: number;
  readonly #queue: WriteOp[] = [];
  #queueHead = 0;
  /** Requests in flight. */
  #running = 0;
  /** Requests in flight whose clusters are not allocated yet (qcow2). */
  #allocating = 0;
  /** Data bytes queued or being written. */
  #pendingBytes = 0;
  /** Why the writer stopped: the first failed request, or what abort() was given first. */
  #failure: { error: unknown } | null = null;
  /** The first failed request's error, even when an abort came before it. */
  #requestFailure: { error: unknown } | null = null;
  #waiters: Array<{ bytes: number; resolve: () => void }> = [];
  /** 0: no write-behind. */
  readonly #writeBehindBytes: number;
  readonly #writeBehindCounter: WriteBehindCounter;

  readonly #onFailure: ((error: unknown) => void) | undefined;

  constructor(
    target: BlockDevice,
    options: { batch: boolean; requestsInFlight: number; onFailure?: (error: unknown) => void; writeBehindBytes?: number; writeBehindCounter?: WriteBehindCounter },
  ) {
    this.#target = target;
    this.#onFailure = options.onFailure;
    this.#writeBehindBytes = target.writeBehind === undefined ? 0 : (options.writeBehindBytes ?? 0);
    this.#writeBehindCounter = options.writeBehindCounter ?? { writtenBytes: 0 };
    this.#batchTarget = options.batch && target instanceof Qcow2Image ? target : null;
    this.#allocationOrdered = target instanceof Qcow2Image;
    // qcow2: a batch's data write overlaps the next batch's allocation (writeBatch's onAllocated); other requests allocate until they complete.
    this.#requestsMax = options.requestsInFlight;
  }

  get failed(): boolean {
    return this.#failure !== null;
  }

  /** The error of the first request that failed (not an abort's reason), or undefined. */
  get requestError(): unknown {
    return this.#requestFailure?.error;
  }

  enqueue(op: WriteOp): void {
    if (this.#failure !== null) {
      op.done?.();
      return;
    }
    if (op.kind !== "zero") this.#pendingBytes += op.data.length;
    this.#queue.push(op);
    this.#pump();
  }

  /** Resolves once at most `bytes` data bytes are pending (or the writer failed). */
  whenBelow(bytes: number): Promise<void> {
    if (this.#pendingBytes <= bytes || this.#failure !== null) return Promise.resolve();
    return new Promise((resolve) => this.#waiters.push({ bytes, resolve }));
  }

  /** Wait until nothing is queued or being written. */
  async idle(): Promise<void> {
    while (!this.#isIdle()) await new Promise<void>((resolve) => this.#waiters.push({ bytes: -1, resolve }));
  }

  #isIdle(): boolean {
    return this.#running === 0 && this.#queueHead === this.#queue.length;
  }

  /** Wait until every queued request completed; rethrows the first failure. */
  async drain(): Promise<void> {
    await this.idle();
    if (this.#failure !== null) throw this.#failure.error;
  }

  /** Stop: requests not yet started are dropped (the one in flight completes). */
  abort(error: unknown): void {
    this.#failure ??= { error };
    this.#pump();
  }

  /** The next requests to run together: a batch of qcow2 data writes, or one request. */
  #take(): WriteOp[] {
    const first = this.#queue[this.#queueHead++];
    if (first.kind !== "data" || this.#batchTarget === null) return [first];
    const ops = [first];
    let bytes = first.data.length;
    let end = first.guestOffset + first.data.length;
    while (this.#queueHead < this.#queue.length) {
      const next = this.#queue[this.#queueHead];
      if (next.kind !== "data" || next.guestOffset < end || bytes + next.data.length > WRITE_BATCH_BYTES_MAX) break;
      ops.push(next);
      bytes += next.data.length;
      end = next.guestOffset + next.data.length;
      this.#queueHead++;
    }
    return ops;
  }

  #run(ops: readonly WriteOp[], onAllocated: () => void): Promise<void> {
    const first = ops[0];
    switch (first.kind) {
      case "data":
        if (this.#batchTarget !== null) {
          const requests: WriteRequest[] = ops.map((op) => ({ guestOffset: op.guestOffset, data: (op as { data: Uint8Array }).data }));
          return this.#batchTarget.writeBatch(requests, { onAllocated });
        }
        return this.#target.write(first.guestOffset, first.data);
      case "compressed":
        assert(this.#target instanceof Qcow2Image, "compressed writes go to qcow2 images");
        return this.#target.writeCompressed(first.guestOffset, first.data);
      case "zero":
        return this.#target.writeZeroes(first.guestOffset, first.lengthBytes, first.options);
    }
  }

  #pump(): void {
    if (this.#failure !== null) this.#discardQueue();
    while (this.#running < this.#requestsMax && this.#allocating === 0 && this.#queueHead < this.#queue.length) {
      const ops = this.#take();
      this.#running++;
      let allocated = !this.#allocationOrdered;
      const onAllocated = (): void => {
        if (allocated) return;
        allocated = true;
        this.#allocating--;
        this.#pump();
      };
      if (!allocated) this.#allocating++;
      let request: Promise<void>;
      try {
        request = this.#run(ops, onAllocated);
      } catch (error) {
        request = Promise.reject(error);
      }
      request.then(
        () => this.#finish(ops, null, onAllocated),
        (error: unknown) => this.#finish(ops, { error }, onAllocated),
      );
    }
    if (this.#queueHead > 1024 || this.#queueHead === this.#queue.length) {
      this.#queue.splice(0, this.#queueHead);
      this.#queueHead = 0;
    }
    this.#wake();
  }

  #finish(ops: readonly WriteOp[], failure: { error: unknown } | null, onAllocated: () => void): void {
    this.#running--;
    onAllocated();
    if (failure !== null) this.#fail(failure);
    for (const op of ops) {
      if (op.kind !== "zero") {
        this.#pendingBytes -= op.data.length;
        if (failure === null) this.#writeBehindCounter.writtenBytes += op.data.length;
      }
      op.done?.();
    }
    if (this.#writeBehindBytes > 0 && this.#writeBehindCounter.writtenBytes >= this.#writeBehindBytes && this.#failure === null) {
      // While the last one still runs, ask again after the next write (the count goes on).
      try {
        if (this.#target.writeBehind?.() === true) this.#writeBehindCounter.writtenBytes = 0;
      } catch (error) {
        this.#fail({ error });
      }
    }
    this.#pump();
  }

  /** A request failed: the first failure stops the writer. */
  #fail(failure: { error: unknown }): void {
    this.#requestFailure ??= failure;
    if (this.#failure === null) {
      this.#failure = failure;
      this.#onFailure?.(failure.error);
    }
  }

  /** After a failure nothing more is written: release what waits. */
  #discardQueue(): void {
    while (this.#queueHead < this.#queue.length) {
      const op = this.#queue[this.#queueHead++];
      if (op.kind !== "zero") this.#pendingBytes -= op.data.length;
      op.done?.();
    }
    this.#queue.length = 0;
    this.#queueHead = 0;
  }

  #wake(): void {
    const idle = this.#isIdle();
    const waiting = this.#waiters;
    this.#waiters = [];
    for (const waiter of waiting) {
      const ready = waiter.bytes < 0 ? idle : this.#pendingBytes <= waiter.bytes || this.#failure !== null;
      if (ready) waiter.resolve();
      else this.#waiters.push(waiter);
    }
  }
}

/** Zeroes to write from when zero ranges are written as bytes. */
let zeroChunk: Uint8Array | null = null;
function zeroBytes(lengthBytes: number): Uint8Array {
  if (zeroChunk === null || zeroChunk.length < lengthBytes) zeroChunk = new Uint8Array(Math.max(lengthBytes, COPY_CHUNK_BYTES));
  return zeroChunk.subarray(0, lengthBytes);
}

interface Slot {
  start: number;
  length: number;
  /** null: a zero range (nothing to read). */
  buffer: Uint8Array | null;
  read: Promise<void> | null;
  readDone: boolean;
}

/**
 * Copy `ranges` (ascending guest order) from `source` to `target`. Returns
 * once every write completed (not flushed: the caller flushes).
 */
export async function copyRanges(source: Pick<BlockDevice, "read">, target: BlockDevice, ranges: AsyncIterable<CopyRange> | Iterable<CopyRange>, options: CopyPipelineOptions): Promise<void> {
  const chunkBytes = options.chunkBytes ?? COPY_CHUNK_BYTES;
  const compress = options.compress ?? false;
  const zeroMode = options.zeroMode;
  const readsMax = options.readsInFlight ?? COPY_READS_IN_FLIGHT;
  const queuedBytesMax = options.queuedBytesMax ?? COPY_QUEUED_BYTES_MAX;
  const writer = new OrderedWriter(target, {
    batch: !compress,
    requestsInFlight: COPY_WRITES_IN_FLIGHT,
    onFailure: options.onWriteFailure,
    writeBehindBytes: options.writeBehindBytes ?? COPY_WRITE_BEHIND_BYTES,
    writeBehindCounter: options.writeBehindCounter,
  });
  // Whole buffers only: a freed buffer is rebuilt from its ArrayBuffer (consume()).
  const free = (options.freeBuffers ?? []).filter((buffer) => isWholeIoBuffer(buffer, chunkBytes));
  if (options.freeBuffers !== undefined) options.freeBuffers.length = 0;
  const slots: Slot[] = [];
  let readsInFlight = 0;

  /** The requests that write zeroes over [start, start + length), by zeroMode. */
  const zeroOps = (start: number, length: number, ops: WriteOp[]): void => {
    const end = start + length;
    if (zeroMode.kind === "zeroes") {
      for (let at = start; at < end; at += ZERO_REQUEST_BYTES_MAX) {
        ops.push({ kind: "zero", guestOffset: at, lengthBytes: Math.min(end, at + ZERO_REQUEST_BYTES_MAX) - at, options: zeroMode.options, done: null });
      }
    } else if (zeroMode.kind === "bytes") {
      // Compressing (whole clusters): zero clusters are compressed too, as qemu-img convert -c -S 0 does.
      const kind = compress ? "compressed" : "data";
      for (let at = start; at < end; at += chunkBytes) ops.push({ kind, guestOffset: at, data: zeroBytes(Math.min(end, at + chunkBytes) - at), done: null });
    }
  };

  /** The requests for one chunk of read data: split around its zero runs, or one compressed write. */
  const dataOps = (start: number, data: Uint8Array): WriteOp[] => {
    const ops: WriteOp[] = [];
    const runs = options.zeroRuns?.(data, start) ?? [];
    if (compress) {
      const allZero = runs.length === 1 && runs[0][0] === 0 && runs[0][1] === data.length;
      if (allZero) zeroOps(start, data.length, ops);
      else ops.push({ kind: "compressed", guestOffset: start, data, done: null });
      return ops;
    }
    let at = 0;
    for (const [runStart, runEnd] of runs) {
      if (runStart > at) ops.push({ kind: "data", guestOffset: start + at, data: data.subarray(at, runStart), done: null });
      zeroOps(start + runStart, runEnd - runStart, ops);
      at = runEnd;
    }
    if (at < data.length) ops.push({ kind: "data", guestOffset: start + at, data: data.subarray(at), done: null });
    return ops;
  };

  /** Queue requests in order; `done` runs once all of them completed (at once when there are none). */
  const enqueue = (ops: WriteOp[], done: (() => void) | null): void => {
    if (done !== null) {
      let left = ops.length;
      const one = (): void => {
        if (--left <= 0) done();
      };
      for (const op of ops) op.done = one;
      if (ops.length === 0) done();
    }
    for (const op of ops) writer.enqueue(op);
  };

  const startRead = (start: number, length: number): void => {
    const buffer = (free.pop() ?? allocateIoBuffer(chunkBytes)).subarray(0, length);
    const slot: Slot = { start, length, buffer, read: null, readDone: false };
    readsInFlight++;
    slot.read = source.read(start, buffer).finally(() => {
      readsInFlight--;
      slot.readDone = true;
    });
    slot.read.catch(() => {}); // awaited in order by consume()
    slots.push(slot);
  };

  /** Hand the oldest slot to the writer (waiting for its read). */
  const consume = async (): Promise<void> => {
    const slot = slots[0];
    if (slot.buffer === null) {
      slots.shift();
      options.checkpoint?.();
      const ops: WriteOp[] = [];
      zeroOps(slot.start, slot.length, ops);
      enqueue(ops, null);
      options.onProgress?.("zero", slot.length);
      return;
    }
    await slot.read;
    slots.shift();
    const whole = wholeIoBuffer(slot.buffer);
    enqueue(dataOps(slot.start, slot.buffer), () => free.push(whole));
    options.onProgress?.("data", slot.length);
  };

  /** Wait for every outstanding read and write. */
  const settle = async (): Promise<void> => {
    await Promise.allSettled(slots.map((slot) => slot.read));
    await writer.idle();
  };

  try {
    for await (const range of ranges) {
      if (range.kind === "zero") {
        slots.push({ start: range.start, length: range.length, buffer: null, read: null, readDone: true });
        // Hand over what is ready now: a run of zero ranges is written as it comes, not at the next data.
        while (slots.length > 0 && slots[0].readDone) await consume();
        if (writer.failed) break;
        continue;
      }
      for (let at = range.start; at < range.start + range.length; at += chunkBytes) {
        while (slots.length > 0 && (slots[0].readDone || readsInFlight >= readsMax || slots.length >= 2 * readsMax)) {
          await consume();
        }
        if (writer.failed) break;
        options.checkpoint?.();
        await writer.whenBelow(queuedBytesMax);
        const length = Math.min(chunkBytes, range.start + range.length - at);
        if (options.rateLimit !== undefined) await options.rateLimit.admit(length, options.checkpoint);
        startRead(at, length);
      }
      if (writer.failed) break;
    }
    while (slots.length > 0 && !writer.failed) await consume();
  } catch (error) {
    writer.abort(error);
    // Outstanding reads and writes settle before the caller may close the devices; a write that
    // failed for its own reason meanwhile is reported with the loop's error, not dropped.
    await settle();
    throw withSecondFailure(error, writer.requestError);
  }
  await settle();
  await writer.drain();
  // Every write completed: the buffers are free for the caller's next copy.
  options.freeBuffers?.push(...free);
}
