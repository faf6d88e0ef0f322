/**
 * qemu-img rebase: give an overlay another backing file (or none).
 *
 * Design notes (qemu-img.c img_rebase)
 * - Unsafe (-u): only the header changes (backing name and format); the
 *   old backing file is not even opened, so a moved or renamed backing
 *   file can be named again.
 * - Safe: for every range the overlay does not allocate, the old chain
 *   and the new backing are compared with StateComparer: ranges that
 *   resolve to the same host data of a shared layer (rebasing onto an
 *   ancestor, or onto a copy-free sibling) or to zeroes on both sides cost
 *   no read; the rest is read and compared. Where they differ, the old
 *   content is written into the overlay. Only after all of that is flushed
 *   does the header switch (the job's prepare step), so a cancelled or
 *   failed rebase leaves the overlay on its old backing, reading as
 *   before (plus some clusters copied up, which hold the same data).
 * - `backingFile` "" removes the backing file: everything the old chain
 *   provides that is not zero is copied in first (flatten).
 * - A non-empty backing file needs its format, checked before anything
 *   is touched (qemu-img 7.2 copies first and fails at the header switch;
 *   its message is kept). The new backing name is stored as given and
 *   opened relative to the overlay. Different virtual sizes are allowed:
 *   past the end of a shorter backing both sides read as zeroes.
 */
import { SnapstackError, isSnapstackError } from "../../base/errors.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { Qcow2Image } from "../../formats/qcow2/index.ts";
import { resolveBackingPath } from "../backing-path.ts";
import { parseImageFormat } from "../image-format.ts";
import { openImage, reasonAfterOpening, type OpenImageFile } from "../open-image.ts";
import { layerKey, layerOfFile } from "../layer-file.ts";
import { ALLOCATION_WINDOW_BYTES } from "./chain-layers.ts";
import { RangeCopier } from "./copy-ranges.ts";
import { runJob, type JobOptions } from "./job.ts";
import { StateComparer, type DiffStats } from "./state-diff.ts";

export interface RebaseImageOptions extends JobOptions {
  /** Format of the overlay (probed when absent). */
  format?: string;
  /** -b: the new backing file as it will be stored ("" removes the backing file). */
  backingFile: string;
  /** -F: format of the new backing file (required unless backingFile is ""). */
  backingFormat?: string;
  /** -u: change the header only. */
  unsafe?: boolean;
  /** -U: open the backing chains (old and new, read-only) even while another process writes them. */
  forceShare?: boolean;
}

export interface RebaseResult {
  /** Bytes written into the overlay (safe mode). */
  copiedBytes: number;
  /** How the comparison was decided (safe mode). */
  compare: DiffStats | null;
}

function noBackingFormat(backingFile: string): SnapstackError {
  return new SnapstackError("E_BACKING_FORMAT", `Could not change the backing file to '${backingFile}': backing format must be specified`, { backingFile });
}

/** qemu-img's message for a backing name that does not fit the header. */
function backingSwitchError(error: unknown, backingFile: string): unknown {
  if (isSnapstackError(error) && error.code === "E_TOO_LARGE") {
    return new SnapstackError("E_TOO_LARGE", `Could not change the backing file to '${backingFile}': No space left in the file header`, { backingFile });
  }
  return error;
}

/** The header switch shared by rebase and stream, with qemu-img's message for a name that does not fit. */
export async function switchBacking(image: Qcow2Image, backingFile: string, backingFormat: string | null): Promise<void> {
  try {
    await image.changeBackingFile(backingFile === "" ? null : backingFile, backingFile === "" ? null : backingFormat);
  } catch (error) {
    throw backingSwitchError(error, backingFile);
  }
}

/**
 * Refuse, before a job copies anything, a backing name the header cannot
 * hold (qemu-img 7.2 copies first and then fails, leaving the data copied;
 * here a refused command leaves the image untouched).
 */
export function checkBackingSwitch(image: Qcow2Image, backingFile: string, backingFormat: string | null): void {
  try {
    image.checkBackingFileFits(backingFile === "" ? null : backingFile, backingFile === "" ? null : backingFormat);
  } catch (error) {
    throw backingSwitchError(error, backingFile);
  }
}

function requireQcow2(device: BlockDevice, path: string): Qcow2Image {
  if (!(device instanceof Qcow2Image)) {
    throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${path}: a ${device.format} image cannot have a backing file`, { path });
  }
  return device;
}

async function openNewBacking(path: string, backingFile: string, backingFormat: string, openFile: OpenImageFile | undefined, forceShare: boolean): Promise<BlockDevice> {
  try {
    return await openImage(resolveBackingPath(path, backingFile), { format: backingFormat, readOnly: true, openFile, forceShare });
  } catch (error) {
    if (!isSnapstackError(error)) throw error;
    // qemu-img names the file once here ("Could not open 'b': No such file or directory"), not twice as for the image itself.
    const stripped = reasonAfterOpening(error.message, resolveBackingPath(path, backingFile));
    const reason = stripped.startsWith("Could not open '") ? stripped : error.message;
    throw new SnapstackError(error.code, `Could not open new backing file '${backingFile}': ${reason}`, { ...error.details, backingFile });
  }
}

export async function rebaseImage(path: string, options: RebaseImageOptions): Promise<RebaseResult> {
  const { backingFile } = options;
  if (backingFile !== "" && options.backingFormat === undefined) throw noBackingFormat(backingFile);
  const backingFormat = options.backingFormat === undefined || backingFile === "" ? null : parseImageFormat(options.backingFormat);
  const format = options.format === undefined ? undefined : parseImageFormat(options.format);
  const top = await openImage(path, { format, readOnly: false, openBacking: !options.unsafe, openFile: options.openFile, forceShare: options.forceShare });
  let newBacking: BlockDevice | null = null;
  return runJob<RebaseResult>("rebase", options, {
    async run(job) {
      const image = requireQcow2(top, path);
      checkBackingSwitch(image, backingFile, backingFormat);
      if (options.unsafe) return { copiedBytes: 0, compare: null };
      if (backingFile !== "") newBacking = await openNewBacking(path, backingFile, backingFormat!, options.openFile, options.forceShare ?? false);
      // Refused before anything is written: the image itself in its new chain would be a loop.
      const looped = newBacking === null ? undefined : layerOfFile(newBacking, layerKey(top));
      if (looped !== undefined) throw new SnapstackError("E_BACKING_LOOP", `Backing file '${looped.name}' creates an infinite loop.`, { path, backingFile });
      const comparer = new StateComparer(image.backing, newBacking, { job });
      const copier = new RangeCopier(image, image);
      const copy = (range: { start: number; length: number }): Promise<void> => copier.copyData(range.start, range.length);
      job.setTotal(image.sizeBytes, "compare");
      for (let windowStart = 0; windowStart < image.sizeBytes; windowStart += ALLOCATION_WINDOW_BYTES) {
        const windowLength = Math.min(ALLOCATION_WINDOW_BYTES, image.sizeBytes - windowStart);
        for (const extent of await image.layerStatus(windowStart, windowLength)) {
          if (extent.kind === "unallocated") await comparer.compare(extent.guestOffset, extent.guestOffset + extent.lengthBytes, copy);
          else job.advance(extent.lengthBytes);
        }
      }
      await comparer.finish(copy);
      await image.flush();
      return { copiedBytes: copier.writtenBytes, compare: comparer.stats };
    },
    async prepare() {
      await switchBacking(top as Qcow2Image, backingFile, backingFormat);
    },
    async clean() {
      try {
        await top.close();
      } finally {
        await (newBacking as BlockDevice | null)?.close();
      }
    },
  });
}
