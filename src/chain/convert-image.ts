/**
 * qemu-img convert from one opened chain to a new (or existing) raw or qcow2
 * image (qemu-img.c img_convert, convert_iteration_sectors, convert_co_write).
 *
 * Design notes
 * - Status: each source range is data, zero or backing. Without a target
 *   backing, the whole source chain decides (mapImage's resolution): data
 *   is copied, zero (including unallocated everywhere) is skipped. With a
 *   target backing (-B), only the source's top layer counts: unallocated
 *   there is "backing" (left unallocated in the target so its backing shows
 *   through), except past the end of the source's backing, where it is zero
 *   (QEMU's bdrv_co_block_status rule); zero past the end of the target's
 *   backing is treated as backing too.
 * - Zero handling: a new target without backing reads as zeroes, so zero
 *   ranges and sparse runs are skipped; otherwise (existing target, or a
 *   target backing) they become writeZeroes (zero clusters in qcow2).
 *   sparseSizeBytes = 0 allocates everything: zero ranges are written as
 *   real zero bytes.
 * - Sparse detection inside data: runs of all-zero 512-byte sectors of at
 *   least sparseSizeBytes are not written (is_allocated_sectors_min),
 *   found with Buffer.indexOf on a zero pattern (native search) and checked
 *   sector by sector with memcmp.
 * - Compression (-c): whole clusters; an all-zero cluster is treated as
 *   zero, others go through writeCompressed (which stores incompressible
 *   clusters uncompressed); a final zero-length compressed write aligns the
 *   file end, as qemu-img does.
 * - Pipeline: data is read in chunks of COPY_CHUNK_BYTES with up to
 *   COPY_READS_IN_FLIGHT reads outstanding; writes are issued in guest order
 *   (qemu-img's default wr_in_order), up to COPY_WRITES_IN_FLIGHT at once
 *   to a raw target. A qcow2 target must get the host layout qemu-img
 *   produces, so its clusters are allocated strictly in guest order: the
 *   writes whose data is already read are collected (up to
 *   WRITE_BATCH_BYTES_MAX) and handed to Qcow2Image.writeBatch, which
 *   allocates them one after another as separate writes would but writes
 *   their data concurrently; the next batch starts once it completed. A
 *   batch is handed over as soon as the next chunk's read is still
 *   pending, and before any zero request (which may allocate L2 tables).
 * - The target is opened with cache "unsafe" by default, as qemu-img
 *   convert does (-t unsafe): no fdatasync, which on a slow disk would
 *   dominate the run time.
 * - Progress counts the bytes qemu-img counts (data, plus zero ranges when
 *   allocating everything), measured in a metadata-only first pass.
 */
import { SnapstackError, assert } from "../base/errors.ts";
import type { BlockDevice } from "../device/block-device.ts";
import { Qcow2Image } from "../formats/qcow2/index.ts";
import type { WriteRequest } from "../formats/qcow2/qcow2-image.ts";
import { parseImageFormat } from "./image-format.ts";
import { openImage } from "./open-image.ts";
import { walkChain } from "./map-image.ts";
import { createImage, type CreateOptionValue } from "./create-image.ts";
import type { NodeFileCacheMode } from "../io/node-file.ts";

/** Bytes per read request while copying data (memory: chunk * (reads in flight + 1)). */
export const COPY_CHUNK_BYTES = 2 * 1024 * 1024;
/** Read requests outstanding while the in-order writer works. */
export const COPY_READS_IN_FLIGHT = 8;
/**
 * Write requests outstanding for a raw target. A qcow2 target gets one at a
 * time, as qemu-img does (wr_in_order waits for each write to complete):
 * concurrent allocating writes could take host clusters out of guest order.
 */
export const COPY_WRITES_IN_FLIGHT = 4;
/**
 * Most bytes collected into one batch of writes to a qcow2 target (memory:
 * the batch's chunks stay allocated until it completes).
 */
export const WRITE_BATCH_BYTES_MAX = 8 * 1024 * 1024;
/** Guest bytes whose status is looked up at once. */
export const CONVERT_STATUS_WINDOW_BYTES = 1024 * 1024 * 1024;
/** Largest single writeZeroes request. */
const ZERO_REQUEST_BYTES_MAX = 1024 * 1024 * 1024;
const SECTOR_BYTES = 512;
export const SPARSE_SIZE_DEFAULT_BYTES = 4096;

export interface ConvertImageOptions {
  format: string;
  /** `-o` options for the new target (see createImage). */
  options?: Record<string, CreateOptionValue>;
  compress?: boolean;
  /** -S: zero runs of at least this many bytes stay unallocated (default 4096; 0 allocates everything). */
  sparseSizeBytes?: number;
  /** -B / -F: the target's backing file and format; only the source's top layer is copied. */
  backingFile?: string;
  backingFormat?: string;
  /** -n: the target exists; do not create it. */
  targetExists?: boolean;
  /** Called with the fraction done, then bytes done and total. */
  onProgress?: (fraction: number, doneBytes: number, totalBytes: number) => void;
  signal?: AbortSignal;
  /**
   * Target cache mode (qemu-img convert -t): "unsafe" (the default, as in
   * qemu-img) never syncs the target; "writeback" fdatasyncs it at the end.
   */
  targetCache?: NodeFileCacheMode;
}

type RangeKind = "data" | "zero" | "backing";

interface StatusRange {
  start: number;
  length: number;
  kind: RangeKind;
}

interface CopyPlan {
  source: BlockDevice;
  topOnly: boolean;
  /** Zero past this guest offset is left to the target's backing (Infinity: none). */
  targetBackingEnd: number;
}

/** Source ranges in guest order, adjacent ranges of one kind merged. */
async function* statusRanges(plan: CopyPlan): AsyncGenerator<StatusRange> {
  const { source } = plan;
  let pending: StatusRange | null = null;
  const sourceBackingEnd = source.backing?.sizeBytes ?? 0;
  for (let windowStart = 0; windowStart < source.sizeBytes; windowStart += CONVERT_STATUS_WINDOW_BYTES) {
    const windowEnd = Math.min(source.sizeBytes, windowStart + CONVERT_STATUS_WINDOW_BYTES);
    const ranges: StatusRange[] = [];
    const add = (start: number, length: number, kind: RangeKind): void => {
      if (length <= 0) return;
      // Zero past the target backing's end needs no write: the backing ends there.
      if (kind === "zero" && start + length > plan.targetBackingEnd) {
        const split = Math.max(start, plan.targetBackingEnd);
        if (split > start) ranges.push({ start, length: split - start, kind });
        ranges.push({ start: split, length: start + length - split, kind: "backing" });
        return;
      }
      ranges.push({ start, length, kind });
    };
    if (plan.topOnly) {
      for (const extent of await source.layerStatus(windowStart, windowEnd - windowStart)) {
        const end = extent.guestOffset + extent.lengthBytes;
        if (extent.kind === "data") add(extent.guestOffset, extent.lengthBytes, "data");
        else if (extent.kind === "zero") add(extent.guestOffset, extent.lengthBytes, "zero");
        else {
          const split = Math.min(end, Math.max(extent.guestOffset, source.backing === null ? extent.guestOffset : sourceBackingEnd));
          add(extent.guestOffset, split - extent.guestOffset, "backing");
          add(split, end - split, "zero");
        }
      }
    } else {
      await walkChain(source, windowStart, windowEnd, (entry) => add(entry.start, entry.length, entry.data && !entry.zero ? "data" : "zero"));
    }
    for (const range of ranges) {
      if (pending !== null && pending.kind === range.kind && pending.start + pending.length === range.start) {
        pending.length += range.length;
        continue;
      }
      if (pending !== null) yield pending;
      pending = { ...range };
    }
  }
  if (pending !== null) yield pending;
}

/** One unit of work for the pipeline. */
interface CopyJob {
  start: number;
  length: number;
  kind: RangeKind;
}

/** Split status ranges into jobs: data in chunks (whole clusters when compressing), the rest whole. */
async function* copyJobs(plan: CopyPlan, chunkBytes: number, clusterBytes: number | null): AsyncGenerator<CopyJob> {
  if (clusterBytes === null) {
    for await (const range of statusRanges(plan)) {
      if (range.kind !== "data") {
        yield range;
        continue;
      }
      for (let at = range.start; at < range.start + range.length; at += chunkBytes) {
        yield { start: at, length: Math.min(chunkBytes, range.start + range.length - at), kind: "data" };
      }
    }
    return;
  }
  // Compression: per cluster; a cluster touched by any data is read whole.
  let clusterStart = 0;
  let clusterKind: RangeKind | null = null;
  const size = plan.source.sizeBytes;
  for await (const range of statusRanges(plan)) {
    let at = range.start;
    const end = range.start + range.length;
    while (at < end) {
      const clusterEnd = Math.min(size, clusterStart + clusterBytes);
      const piece = Math.min(end, clusterEnd) - at;
      clusterKind = clusterKind === null ? range.kind : clusterKind === range.kind ? clusterKind : "data";
      at += piece;
      if (at === clusterEnd) {
        yield { start: clusterStart, length: clusterEnd - clusterStart, kind: clusterKind };
        clusterStart = clusterEnd;
        clusterKind = null;
      }
    }
  }
}

const zeroPatterns = new Map<number, Buffer>();
function zeroPattern(lengthBytes: number): Buffer {
  let pattern = zeroPatterns.get(lengthBytes);
  if (pattern === undefined) {
    pattern = Buffer.alloc(lengthBytes);
    zeroPatterns.set(lengthBytes, pattern);
  }
  return pattern;
}

/**
 * Zero runs of whole 512-byte sectors at least minRunBytes long, as
 * [start, end) pairs within the buffer (a partial last sector counts when
 * it is zero). A qualifying run spans at least minRunBytes / 512 sectors,
 * so it contains a sector whose index is a multiple of that stride: only
 * those sectors are probed, and a zero probe is widened sector by sector
 * to its whole run. A probe looks at two bytes first, so data that is not
 * zero costs two loads per stride; only sectors that pass are compared
 * whole (memcmp against a zero sector).
 */
export function findZeroRuns(data: Uint8Array, minRunBytes: number): Array<[number, number]> {
  const buffer = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const zeroSector = zeroPattern(SECTOR_BYTES);
  const length = buffer.length;
  const sectorCount = Math.ceil(length / SECTOR_BYTES);
  const stride = Math.max(1, Math.floor(minRunBytes / SECTOR_BYTES));
  const isZeroSector = (sector: number): boolean => {
    const at = sector * SECTOR_BYTES;
    const end = Math.min(length, at + SECTOR_BYTES);
    return (buffer[at] | buffer[end - 1]) === 0 && zeroSector.compare(buffer, at, end, 0, end - at) === 0;
  };
  const runs: Array<[number, number]> = [];
  for (let probe = 0; probe < sectorCount; ) {
    if (!isZeroSector(probe)) {
      probe += stride;
      continue;
    }
    let first = probe;
    while (first > 0 && isZeroSector(first - 1)) first--;
    let end = probe + 1;
    while (end < sectorCount && isZeroSector(end)) end++;
    const runStart = first * SECTOR_BYTES;
    const runEnd = Math.min(length, end * SECTOR_BYTES);
    if (runEnd - runStart >= minRunBytes) runs.push([runStart, runEnd]);
    probe = (Math.floor(end / stride) + 1) * stride;
  }
  return runs;
}

/** The target of a compressed convert: always qcow2 (checked at the edge). */
function compressingTarget(target: BlockDevice): Qcow2Image {
  assert(target instanceof Qcow2Image, "compressed convert targets are qcow2 images");
  return target;
}

function isAllZero(data: Uint8Array): boolean {
  return Buffer.from(data.buffer, data.byteOffset, data.byteLength).equals(zeroPattern(data.length));
}

/**
 * Issues target writes in guest order with up to writesInFlight
 * outstanding. Every write* method resolves once its requests are issued
 * (not completed), with a promise of their completion.
 */
interface IssuedWrites {
  done: Promise<void>;
}

/** Writes collected for one Qcow2Image.writeBatch call. */
interface WriteBatch {
  requests: WriteRequest[];
  bytes: number;
  /** Settles with the batch (callers await their writes through it). */
  done: Promise<void>;
  settle: (error?: unknown) => void;
}

function newBatch(): WriteBatch {
  let settle!: (error?: unknown) => void;
  const done = new Promise<void>((resolve, reject) => {
    settle = (error) => (error === undefined ? resolve() : reject(error));
  });
  done.catch(() => {}); // awaited by the writers' IssuedWrites or drain()
  return { requests: [], bytes: 0, done, settle };
}

class Copier {
  readonly target: BlockDevice;
  readonly zeroInit: boolean;
  readonly sparseSizeBytes: number;
  readonly compress: boolean;
  readonly writesInFlight: number;
  /** The qcow2 target whose plain writes go in batches (null: writes go one by one). */
  readonly #batchTarget: Qcow2Image | null;
  #batch: WriteBatch | null = null;
  #pending: Promise<void>[] = [];

  constructor(target: BlockDevice, zeroInit: boolean, sparseSizeBytes: number, compress: boolean) {
    this.target = target;
    this.zeroInit = zeroInit;
    this.sparseSizeBytes = sparseSizeBytes;
    this.compress = compress;
    this.writesInFlight = target.format === "raw" ? COPY_WRITES_IN_FLIGHT : 1;
    this.#batchTarget = target instanceof Qcow2Image && !compress ? target : null;
  }

  /** Write data at a guest offset: into the current batch for a qcow2 target, else as its own request. */
  async #write(start: number, data: Uint8Array, issued: Promise<void>[]): Promise<void> {
    if (this.#batchTarget === null) {
      await this.#issue(this.target.write(start, data), issued);
      return;
    }
    const batch = (this.#batch ??= newBatch());
    batch.requests.push({ guestOffset: start, data });
    batch.bytes += data.length;
    issued.push(batch.done);
    if (batch.bytes >= WRITE_BATCH_BYTES_MAX) await this.flushBatch();
  }

  /** Hand the collected writes to the target (after the previous batch completed: allocation stays in guest order). */
  async flushBatch(): Promise<void> {
    const batch = this.#batch;
    if (batch === null || this.#batchTarget === null) return;
    this.#batch = null;
    const request = this.#batchTarget.writeBatch(batch.requests);
    request.then(() => batch.settle(), (error: unknown) => batch.settle(error ?? new Error("batched write failed")));
    await this.#issue(request, []);
  }

  async #issue(request: Promise<void>, issued: Promise<void>[]): Promise<void> {
    request.catch(() => {}); // awaited below or in drain()
    this.#pending.push(request);
    issued.push(request);
    while (this.#pending.length >= this.writesInFlight) await this.#pending.shift();
  }

  /** Wait for every issued write; rethrows the first failure. */
  async drain(): Promise<void> {
    await this.flushBatch();
    const pending = this.#pending;
    this.#pending = [];
    const results = await Promise.allSettled(pending);
    for (const result of results) if (result.status === "rejected") throw result.reason;
  }

  async #zeroRange(start: number, length: number, issued: Promise<void>[]): Promise<void> {
    if (this.zeroInit || length === 0) return;
    await this.flushBatch();
    for (let at = start; at < start + length; at += ZERO_REQUEST_BYTES_MAX) {
      await this.#issue(this.target.writeZeroes(at, Math.min(ZERO_REQUEST_BYTES_MAX, start + length - at), { unmap: true }), issued);
    }
  }

  async writeZeroRange(start: number, length: number): Promise<IssuedWrites> {
    const issued: Promise<void>[] = [];
    await this.#zeroRange(start, length, issued);
    return { done: Promise.all(issued).then(() => {}) };
  }

  /** Write zeroes as real bytes (sparse size 0: allocate everything). */
  async writeZeroBytes(start: number, length: number): Promise<IssuedWrites> {
    const issued: Promise<void>[] = [];
    for (let at = start; at < start + length; at += COPY_CHUNK_BYTES) {
      const chunk = Math.min(COPY_CHUNK_BYTES, start + length - at);
      await this.#write(at, zeroPattern(COPY_CHUNK_BYTES).subarray(0, chunk), issued);
    }
    return { done: Promise.all(issued).then(() => {}) };
  }

  async writeData(start: number, data: Uint8Array): Promise<IssuedWrites> {
    const issued: Promise<void>[] = [];
    if (this.compress) {
      if (this.sparseSizeBytes > 0 && isAllZero(data)) await this.#zeroRange(start, data.length, issued);
      else await this.#issue(compressingTarget(this.target).writeCompressed(start, data), issued);
    } else if (this.sparseSizeBytes === 0) {
      await this.#write(start, data, issued);
    } else {
      let at = 0;
      for (const [runStart, runEnd] of findZeroRuns(data, this.sparseSizeBytes)) {
        if (runStart > at) await this.#write(start + at, data.subarray(at, runStart), issued);
        await this.#zeroRange(start + runStart, runEnd - runStart, issued);
        at = runEnd;
      }
      if (at < data.length) await this.#write(start + at, data.subarray(at), issued);
    }
    return { done: Promise.all(issued).then(() => {}) };
  }
}

async function openTarget(source: BlockDevice, targetPath: string, options: ConvertImageOptions): Promise<BlockDevice> {
  const format = parseImageFormat(options.format);
  if (!options.targetExists) {
    await createImage(targetPath, {
      format,
      sizeBytes: source.sizeBytes,
      backingFile: options.backingFile,
      backingFormat: options.backingFormat,
      options: options.options ?? {},
    });
  }
  const target = await openImage(targetPath, { format, readOnly: false, cache: options.targetCache ?? "unsafe" });
  if (target.sizeBytes < source.sizeBytes) {
    await target.close();
    throw new SnapstackError(
      "E_OUT_OF_RANGE",
      `${targetPath}: target is smaller (${target.sizeBytes} bytes) than the source (${source.sizeBytes} bytes)`,
      { path: targetPath },
    );
  }
  return target;
}

export async function convertImage(source: BlockDevice, targetPath: string, options: ConvertImageOptions): Promise<void> {
  const format = parseImageFormat(options.format);
  const sparseSizeBytes = options.sparseSizeBytes ?? SPARSE_SIZE_DEFAULT_BYTES;
  if (!Number.isSafeInteger(sparseSizeBytes) || sparseSizeBytes < 0 || sparseSizeBytes % SECTOR_BYTES !== 0) {
    throw new SnapstackError("E_INVALID_SIZE", `sparse size ${sparseSizeBytes} must be a multiple of ${SECTOR_BYTES}`);
  }
  const compress = options.compress ?? false;
  if (compress && format !== "qcow2") {
    throw new SnapstackError("E_UNSUPPORTED_FEATURE", "Compression not supported for this file format", { format });
  }
  if (options.backingFile !== undefined && options.backingFormat === undefined) {
    throw new SnapstackError("E_BACKING_FORMAT", "Use of backing file requires explicit backing format", { backingFile: options.backingFile });
  }
  const target = await openTarget(source, targetPath, options);
  try {
    const targetHasBacking = target.backing !== null;
    const plan: CopyPlan = {
      source,
      topOnly: options.backingFile !== undefined,
      targetBackingEnd: target.backing?.sizeBytes ?? Number.POSITIVE_INFINITY,
    };
    const zeroInit = !options.targetExists && sparseSizeBytes > 0 && !targetHasBacking;
    const copier = new Copier(target, zeroInit, sparseSizeBytes, compress);
    const clusterBytes = compress ? compressingTarget(target).clusterSizeBytes : null;

    const chunkBytes = clusterBytes ?? COPY_CHUNK_BYTES;
    // Pass 1 (metadata only): bytes to copy, for progress.
    let totalBytes = 0;
    for await (const job of copyJobs(plan, chunkBytes, clusterBytes)) {
      if (job.kind === "data" || (sparseSizeBytes === 0 && job.kind === "zero")) totalBytes += job.length;
    }
    let doneBytes = 0;
    const report = (): void => options.onProgress?.(totalBytes === 0 ? 1 : doneBytes / totalBytes, doneBytes, totalBytes);
    report();

    // Pass 2: reads in flight, writes in order.
    const free: Uint8Array[] = [];
    const inFlight: Array<{ job: CopyJob; buffer: Uint8Array | null; read: Promise<void> | null; readDone: boolean }> = [];
    const jobs = copyJobs(plan, chunkBytes, clusterBytes);
    let exhausted = false;
    const refill = async (): Promise<void> => {
      while (!exhausted && inFlight.length < COPY_READS_IN_FLIGHT) {
        const next = await jobs.next();
        if (next.done) {
          exhausted = true;
          break;
        }
        const job = next.value;
        if (job.kind !== "data") {
          inFlight.push({ job, buffer: null, read: null, readDone: false });
          continue;
        }
        const buffer = (free.pop() ?? new Uint8Array(chunkBytes)).subarray(0, job.length);
        const read = source.read(job.start, buffer);
        const entry = { job, buffer, read, readDone: false };
        read.then(
          () => (entry.readDone = true),
          () => {}, // awaited in order below; keep it from counting as unhandled meanwhile
        );
        inFlight.push(entry);
      }
    };
    try {
      await refill();
      while (inFlight.length > 0) {
        if (options.signal?.aborted) throw new SnapstackError("E_ABORTED", `convert to ${targetPath} cancelled`, { path: targetPath });
        const { job, buffer, read } = inFlight.shift()!;
        if (read !== null && buffer !== null) {
          await read;
          const written = await copier.writeData(job.start, buffer);
          // The buffer is reusable once its writes completed.
          written.done.then(() => free.push(new Uint8Array(buffer.buffer, 0, chunkBytes)), () => {});
          doneBytes += job.length;
          // Batched writes wait for no read: hand them over unless the next data chunk is already read.
          if (!(inFlight.find((entry) => entry.read !== null)?.readDone ?? false)) await copier.flushBatch();
        } else if (job.kind === "zero") {
          if (sparseSizeBytes === 0) {
            await copier.writeZeroBytes(job.start, job.length);
            doneBytes += job.length;
          } else {
            await copier.writeZeroRange(job.start, job.length);
          }
        }
        report();
        await refill();
      }
    } finally {
      // Let outstanding reads settle before the caller may close the source.
      await Promise.allSettled(inFlight.map((entry) => entry.read));
    }
    await copier.drain();
    if (compress) await compressingTarget(target).writeCompressed(0, new Uint8Array(0));
    await target.flush();
  } finally {
    await target.close();
  }
}
