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
 *   (QEMU's bdrv_co_block_status rule); for a target created here with
 *   -B, zero past the end of its backing is treated as backing too
 *   (target_backing_sectors; not for -n, where it is written).
 * - Zero handling: a new target without -B reads as zeroes, and so does
 *   one the user declares so (--target-is-zero, even with a backing file of
 *   its own), so zero ranges and sparse runs are skipped; otherwise they
 *   become writeZeroes (zero clusters in qcow2). sparseSizeBytes = 0
 *   allocates everything: zero ranges are written as real zero bytes.
 * - Sparse detection inside data: each request is split as qemu-img splits
 *   it (sparseZeroRuns: is_allocated_sectors_min with its alignment), so
 *   the target allocates what qemu-img's does. Requests are the data
 *   ranges in chunks of COPY_CHUNK_BYTES; qemu-img's also end where the
 *   source's block status does (an L2 table's end, a host discontinuity),
 *   so sources with small clusters can still differ at those edges.
 * - Compression (-c): whole clusters; an all-zero cluster is treated as
 *   zero (with -S 0 it is compressed, as every other), others go through
 *   writeCompressed (which stores incompressible clusters uncompressed); a
 *   final zero-length compressed write aligns the file end, as qemu-img does.
 * - Pipeline: copy-pipeline.ts (shared with the jobs): reads of
 *   COPY_CHUNK_BYTES run ahead of one ordered writer (qemu-img's default
 *   wr_in_order); a qcow2 target gets the writes queued meanwhile as one
 *   Qcow2Image.writeBatch, which allocates clusters in guest order as
 *   separate writes would, so the host layout is the one qemu-img produces.
 * - The target is opened with cache "unsafe" by default, as qemu-img
 *   convert does (-t unsafe): no fdatasync, which on a slow disk would
 *   dominate the run time. A new qcow2 target is also created so (its
 *   creation would fdatasync 7 times, each a thread-pool hop and a disk
 *   flush; qemu-img's creation still does 4): nothing is durable before
 *   the kernel writes it back in either tool.
 * - Read errors (chain/salvage.ts): with salvage (--salvage) a sector that
 *   cannot be read, or whose block status cannot, is copied as zeroes and
 *   reported, as qemu-img does; without it the first unreadable sector is
 *   named in the error.
 * - Progress counts the bytes qemu-img counts (data, plus zero ranges when
 *   allocating everything), measured in a metadata-only first pass that
 *   runs only when someone listens.
 */
import { SnapstackError, assert } from "../base/errors.ts";
import type { BlockDevice } from "../device/block-device.ts";
import { Qcow2Image, type BitmapData } from "../formats/qcow2/index.ts";
import { COPY_CHUNK_BYTES, copyRanges, type CopyRange, type ZeroMode } from "./copy-pipeline.ts";
import { parseOutputFormat } from "./image-format.ts";
import { openImage, type OpenImageFile } from "./open-image.ts";
import { refuseWritingInput } from "./layer-file.ts";
import { RateLimit } from "./rate-limit.ts";
import { walkChain } from "./map-image.ts";
import { locatingRead, lookupSalvaging, salvagingRead, unknownStatusWarning, unreadableSectorWarning } from "./salvage.ts";
import { createImage, type CreateOptionValue } from "./create-image.ts";
import { createNodeFile, openNodeFile, type NodeFileCacheMode } from "../io/node-file.ts";
import { isAllZero } from "../io/io-buffer.ts";

export { COPY_CHUNK_BYTES, COPY_READS_IN_FLIGHT } from "./copy-pipeline.ts";
/** Guest bytes whose status is looked up at once. */
export const CONVERT_STATUS_WINDOW_BYTES = 1024 * 1024 * 1024;
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
  /** --target-is-zero (with -n): the existing target reads as zeroes, so zero ranges are not written. */
  targetIsZero?: boolean;
  /** -r: read at most this many bytes of data per second (default: no limit). */
  rateLimitBytesPerSecond?: number;
  /** Called with the fraction done, then bytes done and total. */
  onProgress?: (fraction: number, doneBytes: number, totalBytes: number) => void;
  signal?: AbortSignal;
  /**
   * Target cache mode (qemu-img convert -t): "unsafe" (the default, as in
   * qemu-img) never syncs the target; "writeback" fdatasyncs it at the end.
   */
  targetCache?: NodeFileCacheMode;
  /**
   * --bitmaps: copy the persistent dirty bitmaps of the source's top layer
   * to the (qcow2) target, names, granularities, enabled state and bits;
   * "skip-broken" (--skip-broken-bitmaps) leaves out the inconsistent ones
   * (reported through onWarning) instead of refusing.
   */
  bitmaps?: "copy" | "skip-broken";
  /**
   * Where --bitmaps reads the bitmaps: default the source; for a snapshot
   * view (-l), the image it belongs to (bitmaps are not part of internal
   * snapshots: qemu-img copies the image's own).
   */
  bitmapSource?: BlockDevice;
  onWarning?: (message: string) => void;
  /**
   * --salvage: a sector that cannot be read (or whose block status cannot)
   * is copied as zeroes instead of failing the convert (chain/salvage.ts);
   * `onSalvaged` hears qemu-img's warning line for each.
   */
  salvage?: boolean;
  onSalvaged?: (warning: string) => void;
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
  /** --salvage: sectors whose status cannot be read are taken as data, and this hears of each; null: a failure is thrown. */
  onUnknownStatus: ((guestOffset: number, error: SnapstackError) => void) | null;
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
    const lookup = async (start: number, end: number): Promise<void> => {
      // Collected first: a lookup that fails part-way (salvaging retries it in parts) adds nothing.
      const found: StatusRange[] = [];
      if (plan.topOnly) {
        for (const extent of await source.layerStatus(start, end - start)) {
          const extentEnd = extent.guestOffset + extent.lengthBytes;
          if (extent.kind === "data") found.push({ start: extent.guestOffset, length: extent.lengthBytes, kind: "data" });
          else if (extent.kind === "zero") found.push({ start: extent.guestOffset, length: extent.lengthBytes, kind: "zero" });
          else {
            const split = Math.min(extentEnd, Math.max(extent.guestOffset, source.backing === null ? extent.guestOffset : sourceBackingEnd));
            found.push({ start: extent.guestOffset, length: split - extent.guestOffset, kind: "backing" }, { start: split, length: extentEnd - split, kind: "zero" });
          }
        }
      } else {
        await walkChain(source, start, end, (entry) => found.push({ start: entry.start, length: entry.length, kind: entry.data && !entry.zero ? "data" : "zero" }));
      }
      for (const range of found) add(range.start, range.length, range.kind);
    };
    const onUnknownStatus = plan.onUnknownStatus;
    await lookupSalvaging(
      windowStart,
      windowEnd,
      lookup,
      onUnknownStatus === null
        ? null
        : (start, length, error) => {
            onUnknownStatus(start, error);
            add(start, length, "data");
          },
    );
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

/**
 * The pipeline's ranges: data and zero ranges whole (copyRanges reads data
 * in chunks), or whole clusters when compressing; "backing" ranges need no
 * write and are left out.
 */
async function* copyJobs(plan: CopyPlan, clusterBytes: number | null): AsyncGenerator<CopyRange> {
  if (clusterBytes === null) {
    for await (const range of statusRanges(plan)) if (range.kind !== "backing") yield { start: range.start, length: range.length, kind: range.kind };
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
        if (clusterKind !== "backing") yield { start: clusterStart, length: clusterEnd - clusterStart, kind: clusterKind };
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
 * to its whole run. A probe looks at its first byte, then its last, so
 * data that is not zero mostly costs one load per stride; only sectors
 * that pass are compared whole (memcmp against a zero sector).
 */
export function findZeroRuns(data: Uint8Array, minRunBytes: number): Array<[number, number]> {
  const buffer = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const zeroSector = zeroPattern(SECTOR_BYTES);
  const length = buffer.length;
  const sectorCount = Math.ceil(length / SECTOR_BYTES);
  const stride = Math.max(1, Math.floor(minRunBytes / SECTOR_BYTES));
  const runs: Array<[number, number]> = [];
  for (let probe = 0; probe < sectorCount; ) {
    if (!isZeroSector(buffer, zeroSector, probe)) {
      probe += stride;
      continue;
    }
    let first = probe;
    while (first > 0 && isZeroSector(buffer, zeroSector, first - 1)) first--;
    let end = probe + 1;
    while (end < sectorCount && isZeroSector(buffer, zeroSector, end)) end++;
    const runStart = first * SECTOR_BYTES;
    const runEnd = Math.min(length, end * SECTOR_BYTES);
    if (runEnd - runStart >= minRunBytes) runs.push([runStart, runEnd]);
    probe = (Math.floor(end / stride) + 1) * stride;
  }
  return runs;
}

/**
 * The zero runs of one data request that qemu-img convert leaves out,
 * as [start, end) byte pairs within `data` (convert_co_write calling
 * is_allocated_sectors_min until the request is done, QEMU 7.2), for a
 * request at `guestOffset` (a multiple of 512) and -S `minSparseBytes`:
 * - A request, or what is left of it, that is all zero is left out whole,
 *   however short (the run limit shrinks to what is left).
 * - A run of data is written together with the zero runs inside it
 *   shorter than the limit; zero runs at its end are left out.
 * - Boundaries move to multiples of pow2floor(-S) (qemu's alignment; the
 *   targets here take 512-byte writes): a data run ending off one takes
 *   the sectors up to it, a zero run ending off one gives them up, and a
 *   zero run no longer than that remainder counts as data.
 * Only runs that can change the result are looked for sector by sector:
 * the request's leading and trailing zero sectors, and zero runs of at
 * least the limit inside it (findZeroRuns); shorter zero runs inside are
 * data for qemu too (they never end a write). The walk then runs qemu's
 * steps over that run list.
 */
export function sparseZeroRuns(data: Uint8Array, guestOffset: number, minSparseBytes: number): Array<[number, number]> {
  const sectors = Math.ceil(data.length / SECTOR_BYTES);
  if (sectors === 0 || minSparseBytes < SECTOR_BYTES) return [];
  const buffer = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const zeroSector = zeroPattern(SECTOR_BYTES);
  const isZero = (sector: number): boolean => isZeroSector(buffer, zeroSector, sector);
  const zeroRuns: Array<[number, number]> = []; // sector runs, ascending
  let lead = 0;
  while (lead < sectors && isZero(lead)) lead++;
  if (lead === sectors) return [[0, data.length]];
  let trail = sectors;
  while (trail > lead && isZero(trail - 1)) trail--;
  if (lead > 0) zeroRuns.push([0, lead]);
  for (const [start, end] of findZeroRuns(data.subarray(lead * SECTOR_BYTES, trail * SECTOR_BYTES), minSparseBytes)) {
    zeroRuns.push([lead + start / SECTOR_BYTES, lead + Math.ceil(end / SECTOR_BYTES)]);
  }
  if (trail < sectors) zeroRuns.push([trail, sectors]);

  const minSectors = Math.floor(minSparseBytes / SECTOR_BYTES);
  const alignment = 2 ** Math.floor(Math.log2(minSectors));
  const firstSector = Math.floor(guestOffset / SECTOR_BYTES);
  let cursor = 0; // index of the first zero run that ends after the position last asked about
  /** is_allocated_sectors at sector `at` for at most `n` sectors: [data, sectors]. */
  const allocated = (at: number, n: number): [boolean, number] => {
    while (cursor > 0 && zeroRuns[cursor - 1][1] > at) cursor--;
    while (cursor < zeroRuns.length && zeroRuns[cursor][1] <= at) cursor++;
    const run = zeroRuns[cursor];
    let zero = run !== undefined && run[0] <= at;
    const runEnd = run === undefined ? sectors : zero ? run[1] : run[0];
    let i = Math.min(runEnd, at + n) - at;
    if (i === n) return [!zero, n];
    const tail = (firstSector + at + i) % alignment;
    if (tail !== 0) {
      if (zero && i <= tail) zero = false;
      i = zero ? i - tail : Math.min(n, i + alignment - tail);
    }
    return [!zero, i];
  };
  const skipped: Array<[number, number]> = [];
  for (let at = 0; at < sectors; ) {
    const n = sectors - at;
    const min = Math.min(minSectors, n);
    const [isData, first] = allocated(at, n);
    if (!isData) {
      const last = skipped[skipped.length - 1];
      if (last !== undefined && last[1] === at) last[1] = at + first;
      else skipped.push([at, at + first]);
      at += first;
      continue;
    }
    let used = first;
    for (let checked = first; checked < n; ) {
      const [more, count] = allocated(at + checked, n - checked);
      checked += count;
      if (more) used = checked;
      else if (count >= min) break;
    }
    at += used;
  }
  return skipped.map(([start, end]) => [start * SECTOR_BYTES, Math.min(data.length, end * SECTOR_BYTES)]);
}

/** Sector `sector` of buffer (or the part of it before the buffer's end) is all zero. */
function isZeroSector(buffer: Buffer, zeroSector: Buffer, sector: number): boolean {
  const at = sector * SECTOR_BYTES;
  const end = Math.min(buffer.length, at + SECTOR_BYTES);
  return buffer[at] === 0 && buffer[end - 1] === 0 && zeroSector.compare(buffer, at, end, 0, end - at) === 0;
}

/** The target of a compressed convert: always qcow2 (checked at the edge). */
function compressingTarget(target: BlockDevice): Qcow2Image {
  assert(target instanceof Qcow2Image, "compressed convert targets are qcow2 images");
  return target;
}

/** Files of a target written with cache "unsafe" (flush does nothing), from its creation on. */
const openUnsafeFile: OpenImageFile = async (path, request) =>
  request.create ? createNodeFile(path, { cache: "unsafe" }) : openNodeFile(path, { readOnly: request.readOnly, cache: "unsafe" });

/**
 * Refuse a target that is the source or one of its backing files, before
 * it is created or written: creating it would truncate what is being read
 * (qemu-img: `Failed to get "write" lock`).
 */
async function openTarget(source: BlockDevice, targetPath: string, options: ConvertImageOptions): Promise<BlockDevice> {
  const format = parseOutputFormat(options.format);
  refuseWritingInput(targetPath, "target", [["the source image", source]]);
  const targetCache = options.targetCache ?? "unsafe";
  if (!options.targetExists) {
    await createImage(targetPath, {
      format,
      sizeBytes: source.sizeBytes,
      backingFile: options.backingFile,
      backingFormat: options.backingFormat,
      options: options.options ?? {},
      // -t unsafe: creating the target does not sync either (qcow2: 7 fdatasyncs, each a thread-pool hop and a disk flush).
      openFile: targetCache === "unsafe" ? openUnsafeFile : undefined,
    });
  }
  // A new target is written into holes only: its large writes allocate first (NodeFile's allocateLargeWrites).
  const target = await openImage(targetPath, { format, readOnly: false, cache: targetCache, allocateLargeWrites: options.targetExists !== true });
  if (target.sizeBytes < source.sizeBytes) {
    await target.close();
    throw new SnapstackError(
      "E_OUT_OF_RANGE",
      "output file is smaller than input file",
      { path: targetPath, targetBytes: target.sizeBytes, sourceBytes: source.sizeBytes },
    );
  }
  return target;
}

export async function convertImage(source: BlockDevice, targetPath: string, options: ConvertImageOptions): Promise<void> {
  const format = parseOutputFormat(options.format);
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
  // qemu-img's target_has_backing: -B (or -o backing_file) was given. A -n target's own backing does not count.
  const targetHasBacking = options.backingFile !== undefined;
  if (options.targetIsZero === true && targetHasBacking) {
    throw new SnapstackError("E_USAGE", "Cannot use --target-is-zero when the destination image has a backing file", { path: targetPath });
  }
  if (compress && options.options?.preallocation !== undefined && options.options.preallocation !== "off") {
    throw new SnapstackError("E_UNSUPPORTED_FEATURE", "Compression and preallocation not supported at the same time", { path: targetPath });
  }
  const bitmaps = await sourceBitmaps(options.bitmapSource ?? source, format, options);
  const target = await openTarget(source, targetPath, options);
  try {
    const onSalvaged = options.onSalvaged;
    const plan: CopyPlan = {
      source,
      onUnknownStatus: options.salvage === true ? (guestOffset, error) => onSalvaged?.(unknownStatusWarning(guestOffset, error)) : null,
      topOnly: targetHasBacking,
      // Only a new target created with -B: zero past its backing's end needs no write (target_backing_sectors).
      targetBackingEnd: targetHasBacking && !options.targetExists ? (target.backing?.sizeBytes ?? Number.POSITIVE_INFINITY) : Number.POSITIVE_INFINITY,
    };
    // has_zero_init: the user says so (--target-is-zero), or a new target without backing reads as zeroes.
    const zeroInit = sparseSizeBytes > 0 && (options.targetIsZero === true || (!options.targetExists && !targetHasBacking));
    const clusterBytes = compress ? compressingTarget(target).clusterSizeBytes : null;
    const chunkBytes = clusterBytes ?? COPY_CHUNK_BYTES;
    // Zero ranges and runs: allocated as bytes with -S 0; else nothing to do on a target that reads as zeroes.
    const zeroMode: ZeroMode = sparseSizeBytes === 0 ? { kind: "bytes" } : zeroInit ? { kind: "skip" } : { kind: "zeroes", options: { unmap: true } };
    const zeroRuns =
      sparseSizeBytes === 0
        ? undefined
        : compress
          ? (data: Uint8Array): Array<[number, number]> => (isAllZero(data) ? [[0, data.length]] : [])
          : (data: Uint8Array, guestOffset: number): Array<[number, number]> => sparseZeroRuns(data, guestOffset, sparseSizeBytes);

    const onProgress = options.onProgress;
    let totalBytes = 0;
    let doneBytes = 0;
    const counts = (kind: RangeKind): boolean => kind === "data" || (sparseSizeBytes === 0 && kind === "zero");
    if (onProgress !== undefined) {
      // Pass 1 (metadata only): bytes to copy, for progress.
      // Sectors of unknown status are warned about once, by the copy itself.
      const counting: CopyPlan = { ...plan, onUnknownStatus: plan.onUnknownStatus === null ? null : () => {} };
      for await (const job of copyJobs(counting, clusterBytes)) if (counts(job.kind)) totalBytes += job.length;
      onProgress(totalBytes === 0 ? 1 : 0, 0, totalBytes);
    }
    const reader = { read: options.salvage === true ? salvagingRead(source, (guestOffset, error) => onSalvaged?.(unreadableSectorWarning(guestOffset, error))) : locatingRead(source) };
    await copyRanges(reader, target, copyJobs(plan, clusterBytes), {
      zeroMode,
      zeroRuns,
      compress,
      chunkBytes,
      rateLimit: options.rateLimitBytesPerSecond === undefined ? undefined : new RateLimit(options.rateLimitBytesPerSecond),
      checkpoint: () => {
        if (options.signal?.aborted) throw new SnapstackError("E_ABORTED", `convert to ${targetPath} cancelled`, { path: targetPath });
      },
      onProgress:
        onProgress === undefined
          ? undefined
          : (kind, bytes) => {
              if (!counts(kind)) return;
              doneBytes += bytes;
              onProgress(totalBytes === 0 ? 1 : doneBytes / totalBytes, doneBytes, totalBytes);
            },
    });
    if (compress) await compressingTarget(target).writeCompressed(0, new Uint8Array(0));
    // Newest first, each one whole or not at all (qemu-img's convert_copy_bitmaps); each goes before the one
    // added after it, so the target lists them in the source's order, after any it had.
    let added: string | undefined;
    for (const bitmap of [...bitmaps].reverse()) {
      assert(target instanceof Qcow2Image, "bitmaps are copied to qcow2 targets (checked before)");
      if (bitmap.data.sizeBytes !== target.sizeBytes) {
        throw new SnapstackError(
          "E_INVALID_OPTION",
          `Failed to populate bitmap ${bitmap.name}: Bitmaps are of different sizes (destination size is ${target.sizeBytes}, source size is ${bitmap.data.sizeBytes}) and can't be merged`,
          { path: targetPath },
        );
      }
      await target.changeBitmaps([
        { kind: "add", name: bitmap.name, granularityBytes: bitmap.data.granularityBytes, before: added },
        { kind: "merge", name: bitmap.name, source: { data: bitmap.data } },
        ...(bitmap.enabled ? [] : [{ kind: "disable" as const, name: bitmap.name }]),
      ]);
      added = bitmap.name;
    }
    await target.flush();
  } finally {
    await target.close();
  }
}

/** The bitmaps --bitmaps copies (qemu-img's convert_check_bitmaps, then their data), read before the target is created. */
async function sourceBitmaps(source: BlockDevice, format: string, options: ConvertImageOptions): Promise<Array<{ name: string; enabled: boolean; data: BitmapData }>> {
  if (options.bitmaps === undefined) return [];
  const compat = options.options?.compat;
  if (format !== "qcow2" || compat === "0.10" || compat === "v2") throw new SnapstackError("E_UNSUPPORTED_FEATURE", `Format driver '${format}' does not support bitmaps`, { format });
  if (!(source instanceof Qcow2Image) || source.info().version < 3) throw new SnapstackError("E_UNSUPPORTED_FEATURE", "Source lacks bitmap support", { path: source.name });
  const bitmaps = source.info().bitmaps;
  // QEMU walks its bitmaps newest first: the one it names (or the order of its warnings) follows.
  for (const bitmap of [...bitmaps].reverse()) {
    if (!bitmap.inUse) continue;
    if (options.bitmaps === "copy") {
      throw new SnapstackError("E_UNSUPPORTED_FEATURE", `Cannot copy inconsistent bitmap '${bitmap.name}'; --skip-broken-bitmaps leaves it out, 'snapstack img bitmap --remove' deletes it`, { path: source.name });
    }
    options.onWarning?.(`Skipping inconsistent bitmap '${bitmap.name}'`);
  }
  const copied: Array<{ name: string; enabled: boolean; data: BitmapData }> = [];
  for (const bitmap of bitmaps) if (!bitmap.inUse) copied.push({ name: bitmap.name, enabled: bitmap.auto, data: await source.readBitmap(bitmap.name) });
  return copied;
}
