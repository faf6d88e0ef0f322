/**
 * qemu-img commit, offline: merge an overlay (and every image between it
 * and BASE) into BASE.
 *
 * Design notes (qemu-img.c img_commit, block/commit.c, qcow2_make_empty)
 * - BASE defaults to the overlay's backing file; `-b BASE` names any image
 *   below (found as bdrv_find_backing_image does) and implies `drop`.
 * - Only ranges allocated above BASE are visited (chain-layers.ts
 *   resolveAbove asks the layers above BASE only), so the time follows the
 *   overlay's data, not the disk's size. Data ranges are read through the
 *   overlay and written into BASE; ranges that are zero above BASE become
 *   zero writes that may unmap (QEMU's active commit: a zeroed cluster of
 *   BASE is freed; with `wipe`, zeroed on disk by BASE's flush). BASE is
 *   grown to the overlay's size first if smaller.
 * - BASE is opened a second time, read-write (with its own backing chain
 *   below it, for COW padding), besides its read-only place in the
 *   overlay's chain. The copy only reads ranges held above BASE, so the
 *   read-only view never consults BASE's (changing) tables.
 * - Order: all data reaches BASE and is flushed before the overlay is
 *   touched; only then (unless `drop`) is the overlay emptied
 *   (Qcow2Image.makeEmpty: where QEMU would, by make_completely_empty,
 *   which leaves qemu-img's 256 KiB overlay; else, and with `wipe`, cluster
 *   by cluster, the clusters it frees zeroed and flushed before it
 *   returns). A cancelled or failed commit leaves the
 *   overlay untouched and reading as before; BASE then holds part of the
 *   new data (as after an interrupted qemu-img commit) but is a consistent
 *   image.
 * - Images between the overlay and BASE no longer describe a meaningful
 *   state afterwards (qemu-img says nothing); they are returned so the CLI
 *   can warn, together with other images found using BASE as backing.
 */
import { dirname } from "node:path";
import { SnapstackError } from "../../base/errors.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { Qcow2Image } from "../../formats/qcow2/index.ts";
import { RawImage } from "../../formats/raw/raw-image.ts";
import { chainLayers, openImage } from "../open-image.ts";
import { parseImageFormat } from "../image-format.ts";
import { findBackingUsers } from "./backing-users.ts";
import { fileKey } from "../../io/file-identity.ts";
import { findInChain, forEachAbove, type AboveExtent } from "./chain-layers.ts";
import { RateLimit } from "../rate-limit.ts";
import { RangeCopier } from "./copy-ranges.ts";
import { runJob, type JobOptions } from "./job.ts";

export interface CommitImageOptions extends JobOptions {
  /** Format of the overlay (probed when absent). */
  format?: string;
  /** -b: the image to commit into (default: the overlay's backing file). Implies drop. */
  base?: string;
  /** -d: leave the overlay as it is (default: empty it afterwards). */
  drop?: boolean;
  /** --wipe: the clusters freed in BASE (ranges the overlay zeroed) and when emptying the overlay are overwritten with zeroes before success. */
  wipe?: boolean;
  /** Directories searched for other images using BASE as backing (default: BASE's directory). */
  searchDirectories?: string[];
  /** -r: read at most this many bytes of the overlays' data per second (default: no limit). */
  rateLimitBytesPerSecond?: number;
}

export interface CommitResult {
  /** Path of the image committed into, as the chain names it. */
  basePath: string;
  /** Bytes written into BASE (data and zeroes). */
  committedBytes: number;
  /** The overlay was emptied. */
  emptied: boolean;
  /** Images between the overlay and BASE: their content is no longer meaningful. */
  invalidated: string[];
  /** Other images (outside this chain) whose backing file is BASE: their content changed. */
  otherUsers: string[];
}

async function growBase(base: BlockDevice, sizeBytes: number): Promise<void> {
  if (base.sizeBytes >= sizeBytes) return;
  if (base instanceof Qcow2Image) await base.resize(sizeBytes, { shrink: false });
  else if (base instanceof RawImage) await base.resize(sizeBytes);
  else throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${base.name}: cannot grow a ${base.format} image to ${sizeBytes} bytes`);
}

export async function commitImage(path: string, options: CommitImageOptions = {}): Promise<CommitResult> {
  const drop = (options.drop ?? false) || options.base !== undefined;
  // Read-write even when the overlay is left as it is (-d, -b), as qemu-img opens it: an overlay
  // marked corrupt, or one that cannot be written, is refused before BASE is touched.
  const top = await openImage(path, { format: options.format === undefined ? undefined : parseImageFormat(options.format), readOnly: false, openFile: options.openFile });
  let base: BlockDevice | null = null;
  return runJob<CommitResult>("commit", options, {
    async run(job) {
      const layers = chainLayers(top);
      if (layers.length < 2) throw new SnapstackError("E_NOT_IN_CHAIN", "Image does not have a backing file", { path });
      const baseDepth = options.base === undefined ? 1 : findInChain(layers, options.base, path);
      const baseLayer = layers[baseDepth];
      base = await openImage(baseLayer.name, { format: parseImageFormat(baseLayer.format), readOnly: false, openFile: options.openFile });
      // Zeroed ranges free the base's clusters (RangeCopier unmaps, as QEMU): with wipe, base.flush() zeroes them.
      if (options.wipe === true && base instanceof Qcow2Image) base.metadata.wipeFreedClusters = true;
      const extents: AboveExtent[] = [];
      let totalBytes = 0;
      await forEachAbove(layers, baseDepth, 0, top.sizeBytes, (extent) => {
        if (extent.kind === "below") return;
        extents.push(extent);
        totalBytes += extent.length;
      });
      job.setTotal(totalBytes, "copy");
      await growBase(base, top.sizeBytes);
      const rateLimit = options.rateLimitBytesPerSecond === undefined ? undefined : new RateLimit(options.rateLimitBytesPerSecond);
      const copier = new RangeCopier(top, base, job, rateLimit, true);
      await copier.copy(extents.map((extent) => ({ start: extent.start, length: extent.length, kind: extent.kind === "data" ? "data" : "zero" })));
      await base.flush();
      const invalidated = layers.slice(1, baseDepth).map((layer) => layer.name);
      const chainFiles = new Set(layers.map((layer) => fileKey(layer.name)));
      const directories = options.searchDirectories ?? [dirname(baseLayer.name)];
      const otherUsers = (await findBackingUsers(baseLayer.name, directories)).filter((user) => !chainFiles.has(fileKey(user)));
      return { basePath: baseLayer.name, committedBytes: copier.writtenBytes, emptied: false, invalidated, otherUsers };
    },
    async prepare(_job, result) {
      if (drop) return;
      if (top instanceof Qcow2Image) {
        await top.makeEmpty({ wipe: options.wipe ?? false });
        result.emptied = true;
      }
    },
    async clean() {
      try {
        await top.close();
      } finally {
        await (base as BlockDevice | null)?.close();
      }
    },
  });
}
