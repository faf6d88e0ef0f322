/**
 * Sparse ("hot") restore: make TARGET hold SOURCE's content by writing
 * only what differs.
 *
 * Design notes
 * - With `from` (KNOWN: the state TARGET holds now, e.g. an earlier image
 *   of SOURCE's chain or an internal snapshot), the differing ranges are
 *   those between KNOWN and SOURCE, found by StateComparer from metadata
 *   where they share layers; TARGET itself is never read. Without it,
 *   TARGET is compared with SOURCE by data and only differing granules are
 *   written. Either way each differing range gets SOURCE's bytes (ranges
 *   that are zero in SOURCE become zero writes), so the bytes written are
 *   the bytes that differ, rounded to the granule (512 bytes).
 * - TARGET may be a raw file, a block device (its size read from sysfs,
 *   since fstat says 0) or a qcow2 image (written through its top layer).
 *   A file target is resized to SOURCE's size first (shrinking a qcow2
 *   target drops its tail); a block device must be at least as large and
 *   keeps any bytes past SOURCE's end.
 * - TARGET must not be a file of SOURCE's or KNOWN's chain (E_INVALID_OPTION).
 * - Writes go in guest order and are flushed at the end. A cancelled or
 *   failed restore leaves TARGET a valid image holding SOURCE's content
 *   before the stop point and its old content after it.
 * - The compare runs ahead of the copy (RangeQueue, a few ranges apart):
 *   one reads and compares the next chunks while the other writes the
 *   ranges found, on the other core. The copy only writes behind the
 *   compare's position, so a compare that reads TARGET (no `from`) never
 *   reads what is being written. A failed write stops the compare at its
 *   next range; a cancelled or failed compare stops the copy at its next
 *   chunk (the copy checks the job too, so a cancel after the compare ended
 *   still stops it), which keeps the guarantee above.
 */
import { readFileSync, statSync } from "node:fs";
import { SnapstackError, withSecondFailure } from "../../base/errors.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { Qcow2Image } from "../../formats/qcow2/index.ts";
import { RawImage } from "../../formats/raw/raw-image.ts";
import { openNodeFile } from "../../io/node-file.ts";
import { parseImageFormat, parseOutputFormat, probeImageFormat } from "../image-format.ts";
import { lockLayerFile, openImage } from "../open-image.ts";
import { lockBits } from "../../io/qemu-locks.ts";
import { refuseWritingInput } from "../layer-file.ts";
import type { CopyRange } from "../copy-pipeline.ts";
import { RangeCopier } from "./copy-ranges.ts";
import { openDiskState, type DiskState } from "./disk-state.ts";
import { runJob, type JobOptions } from "./job.ts";
import { StateComparer, type DiffStats } from "./state-diff.ts";

export interface RestoreImageOptions extends JobOptions {
  /** --from: the state TARGET holds now (path or FILE@SNAPSHOT). */
  from?: string;
  sourceFormat?: string;
  targetFormat?: string;
  granularityBytes?: number;
}

export interface RestoreResult {
  /** Bytes written to TARGET (data and zeroes). */
  writtenBytes: number;
  /** Differing ranges written. */
  ranges: number;
  targetSizeBytes: number;
  compare: DiffStats;
}

const SYSFS_SECTOR_BYTES = 512;

/** Differing ranges found and not yet copied, at most (the compare waits beyond). */
const QUEUED_RANGES_MAX = 8;

/**
 * Ranges from the compare (push, in guest order) to the copy (iterated):
 * push waits while QUEUED_RANGES_MAX are queued; once the copy stopped
 * (`stop`, its failure) push rejects with that failure; once the compare
 * failed (`abort`) the copy's next pull or chunk throws
 * (`throwIfAborted`), and what is queued is dropped (the writes in flight
 * complete).
 */
class RangeQueue implements AsyncIterable<CopyRange> {
  readonly #ranges: CopyRange[] = [];
  #ended = false;
  #stopped: { error: unknown } | null = null;
  #aborted: { error: unknown } | null = null;
  #wakeCopy: (() => void) | null = null;
  #wakeCompare: (() => void) | null = null;

  async push(range: CopyRange): Promise<void> {
    while (this.#ranges.length >= QUEUED_RANGES_MAX && this.#stopped === null) await new Promise<void>((resolve) => (this.#wakeCompare = resolve));
    if (this.#stopped !== null) throw this.#stopped.error;
    this.#ranges.push(range);
    this.#wake();
  }

  /** No more ranges: the copy ends after the queued ones. */
  end(): void {
    this.#ended = true;
    this.#wake();
  }

  /** The copy failed: pushes reject with its error. */
  stop(error: unknown): void {
    this.#stopped = { error };
    this.#wake();
  }

  /** The compare failed or was cancelled: the copy stops at its next range or chunk. */
  abort(error: unknown): void {
    this.#aborted = { error };
    this.#wake();
  }

  /** For the copy's checkpoint: throw once aborted. */
  throwIfAborted(): void {
    if (this.#aborted !== null) throw this.#aborted.error;
  }

  #wake(): void {
    const copy = this.#wakeCopy;
    const compare = this.#wakeCompare;
    this.#wakeCopy = null;
    this.#wakeCompare = null;
    copy?.();
    compare?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<CopyRange> {
    for (;;) {
      this.throwIfAborted();
      const range = this.#ranges.shift();
      if (range !== undefined) {
        this.#wake();
        yield range;
      } else if (this.#ended) return;
      else await new Promise<void>((resolve) => (this.#wakeCopy = resolve));
    }
  }
}

/** Size of a block device from /sys/dev/block/MAJ:MIN/size (512-byte sectors). */
function blockDeviceSizeBytes(path: string, rdev: number): number {
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | (Math.floor(rdev / 4096) & ~0xff);
  try {
    return Number(readFileSync(`/sys/dev/block/${major}:${minor}/size`, "utf8").trim()) * SYSFS_SECTOR_BYTES;
  } catch {
    throw new SnapstackError("E_IO", `${path}: cannot read the size of block device ${major}:${minor}`, { path });
  }
}

/** Open TARGET read-write: a block device as raw (unless it holds qcow2), anything else through openImage. */
async function openTarget(path: string, format: string | undefined): Promise<{ device: BlockDevice; isBlockDevice: boolean }> {
  let stat;
  try {
    stat = statSync(path);
  } catch {
    stat = null;
  }
  if (stat === null || !stat.isBlockDevice()) {
    return { device: await openImage(path, { format: format === undefined ? undefined : parseImageFormat(format), readOnly: false, locks: { resize: true } }), isBlockDevice: false };
  }
  const file = await openNodeFile(path, { readOnly: false });
  try {
    // A format snapstack only reads (a vmdk written to the device, say) is refused, not overwritten as raw.
    const probed = parseOutputFormat(format === undefined ? await probeImageFormat(file, path) : parseImageFormat(format));
    if (probed === "qcow2") {
      await file.close();
      return { device: await openImage(path, { format: "qcow2", readOnly: false }), isBlockDevice: true };
    }
    lockLayerFile(file, path, 0, path, lockBits("write", { raw: true }));
    return { device: new RawImage(file, blockDeviceSizeBytes(path, stat.rdev)), isBlockDevice: true };
  } catch (error) {
    await file.close();
    throw error;
  }
}

async function matchSize(target: BlockDevice, sizeBytes: number, isBlockDevice: boolean): Promise<void> {
  if (target.sizeBytes === sizeBytes) return;
  if (isBlockDevice) {
    if (target.sizeBytes < sizeBytes) {
      throw new SnapstackError("E_INVALID_SIZE", `${target.name}: block device of ${target.sizeBytes} bytes is smaller than the source (${sizeBytes} bytes)`, { path: target.name });
    }
    return;
  }
  if (target instanceof Qcow2Image) await target.resize(sizeBytes, { shrink: true });
  else if (target instanceof RawImage) await target.resize(sizeBytes);
  else throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${target.name}: cannot resize a ${target.format} target`);
}

export async function restoreImage(sourceSpec: string, targetPath: string, options: RestoreImageOptions = {}): Promise<RestoreResult> {
  const opened: DiskState[] = [];
  let target: BlockDevice | null = null;
  return runJob<RestoreResult>("restore", options, {
    async run(job) {
      const source = await openDiskState(sourceSpec, { format: options.sourceFormat });
      opened.push(source);
      const known = options.from === undefined ? null : await openDiskState(options.from);
      if (known !== null) opened.push(known);
      refuseWritingInput(targetPath, "target", [["the source image", source.device], ...(known === null ? [] : [["the --from image", known.device] as const])]);
      const { device, isBlockDevice } = await openTarget(targetPath, options.targetFormat);
      target = device;
      await matchSize(device, source.device.sizeBytes, isBlockDevice);
      const comparer = new StateComparer(known?.device ?? device, source.device, { job, granularityBytes: options.granularityBytes });
      const copier = new RangeCopier(source.device, device);
      let ranges = 0;
      const queue = new RangeQueue();
      job.setTotal(source.device.sizeBytes, "restore");
      const copying = copier
        .copy(queue, {
          checkpoint: () => {
            job.checkpoint();
            queue.throwIfAborted();
          },
          onWriteFailure: (error) => queue.stop(error),
        })
        .catch((error: unknown) => {
          queue.stop(error);
          throw error;
        });
      copying.catch(() => {}); // awaited below; a failure before that is not unhandled
      const write = async (range: { start: number; length: number; zero: boolean }): Promise<void> => {
        const length = Math.min(range.length, source.device.sizeBytes - range.start);
        if (length <= 0) return;
        ranges++;
        await queue.push({ start: range.start, length, kind: range.zero ? "zero" : "data" });
      };
      try {
        await comparer.compare(0, source.device.sizeBytes, write);
        await comparer.finish(write);
      } catch (error) {
        // A failed copy made the push reject with its own error; else the copy stops where it is,
        // and a failure of its own meanwhile is reported with the compare's.
        queue.abort(error);
        throw withSecondFailure(error, await copying.then(() => undefined, (copyError: unknown) => copyError));
      }
      queue.end();
      await copying;
      await device.flush();
      return { writtenBytes: copier.writtenBytes, ranges, targetSizeBytes: device.sizeBytes, compare: comparer.stats };
    },
    async clean() {
      try {
        await (target as BlockDevice | null)?.close();
      } finally {
        for (const state of opened) await state.close();
      }
    },
  });
}
