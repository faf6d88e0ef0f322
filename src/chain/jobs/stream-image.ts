/**
 * Stream, offline (QEMU's block-stream job without a running VM): pull
 * into an overlay every range that the images between it and BASE
 * provide, then make BASE its backing file, leaving the chain shorter.
 *
 * Design notes (block/stream.c)
 * - Ranges the overlay allocates are left alone; ranges held by a layer
 *   strictly between the overlay and BASE (resolveAbove with depth >= 1)
 *   are read through the overlay's chain and written into the overlay
 *   (zero ranges as zero writes). Ranges that fall through to BASE are not
 *   touched: they read the same after the switch.
 * - Without BASE, the whole chain is pulled in and the backing file
 *   removed (a flatten).
 * - The header switch is the job's prepare step, after everything is
 *   flushed: a cancelled or failed stream leaves the overlay on its old
 *   backing, reading as before.
 * - The new backing name: BASE's path relative to the overlay's directory
 *   (absolute if the name stored above BASE was absolute); its format is
 *   the format BASE was opened with.
 */
import { isAbsolute, resolve } from "node:path";
import { relativeBackingName } from "../backing-path.ts";
import { SnapstackError } from "../../base/errors.ts";
import { Qcow2Image } from "../../formats/qcow2/index.ts";
import { parseImageFormat } from "../image-format.ts";
import { chainLayers, openImage } from "../open-image.ts";
import { findInChain, forEachAbove, type AboveExtent } from "./chain-layers.ts";
import { RangeCopier } from "./copy-ranges.ts";
import { runJob, type JobOptions } from "./job.ts";
import { checkBackingSwitch, switchBacking } from "./rebase-image.ts";

export interface StreamImageOptions extends JobOptions {
  format?: string;
  /** --base: the image that becomes the backing file (default: none, the chain is flattened). */
  base?: string;
}

export interface StreamResult {
  /** Bytes written into the overlay. */
  streamedBytes: number;
  /** The backing name now stored in the overlay ("" when none). */
  backingFile: string;
}

export async function streamImage(path: string, options: StreamImageOptions = {}): Promise<StreamResult> {
  const top = await openImage(path, { format: options.format === undefined ? undefined : parseImageFormat(options.format), readOnly: false, openFile: options.openFile });
  let backing: { name: string; format: string | null } = { name: "", format: null };
  return runJob<StreamResult>("stream", options, {
    async run(job) {
      if (!(top instanceof Qcow2Image)) throw new SnapstackError("E_NOT_IN_CHAIN", "Image does not have a backing file", { path });
      const layers = chainLayers(top);
      const baseDepth = options.base === undefined ? layers.length : findInChain(layers, options.base, path);
      if (baseDepth === 1) {
        backing = { name: top.header.backingFileName ?? "", format: top.header.backingFormat };
      } else if (baseDepth < layers.length) {
        const stored = top.header.backingFileName ?? "";
        const basePath = layers[baseDepth].name;
        const name = isAbsolute(stored) ? resolve(basePath) : relativeBackingName(path, basePath);
        backing = { name, format: layers[baseDepth].format };
      }
      const extents: AboveExtent[] = [];
      let totalBytes = 0;
      await forEachAbove(layers, baseDepth, 0, top.sizeBytes, (extent) => {
        if (extent.kind === "below" || extent.depth === 0) return;
        extents.push(extent);
        totalBytes += extent.length;
      });
      job.setTotal(totalBytes, "copy");
      checkBackingSwitch(top, backing.name, backing.format);
      const copier = new RangeCopier(top, top, job);
      for (const extent of extents) {
        if (extent.kind === "data") await copier.copyData(extent.start, extent.length);
        else await copier.writeZeroes(extent.start, extent.length);
      }
      await top.flush();
      return { streamedBytes: copier.writtenBytes, backingFile: backing.name };
    },
    async prepare() {
      await switchBacking(top as Qcow2Image, backing.name, backing.format);
    },
    async clean() {
      await top.close();
    },
  });
}
