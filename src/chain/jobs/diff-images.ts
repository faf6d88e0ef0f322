/**
 * snapstack img diff: the byte ranges where two disk states differ, and
 * the delta overlay that turns the first into the second.
 *
 * Design notes
 * - The ranges come from StateComparer (state-diff.ts): from allocation
 *   metadata where the states share layers (an image and its ancestor,
 *   overlays of one base, a snapshot and the image it lives in), from
 *   data only where metadata cannot decide. `stats` tells the two apart.
 * - The delta (--export) is a new qcow2 overlay whose backing file is
 *   FROM and whose virtual size is TO's; it holds every cluster that
 *   contains a differing byte, with TO's content (all-zero clusters as
 *   zero clusters), and nothing else. So FROM + delta reads as TO, and
 *   the delta can be shipped and rebased elsewhere. Its cluster size is
 *   TO's (when qcow2) so the clusters line up with TO's allocation.
 * - Writing the delta happens after the comparison; a cancelled or failed
 *   export removes the incomplete delta file it created.
 */
import { existsSync, rmSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { relativeBackingName } from "../backing-path.ts";
import { SnapstackError } from "../../base/errors.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { Qcow2Image } from "../../formats/qcow2/index.ts";
import { createImage } from "../create-image.ts";
import { refuseWritingInput } from "../layer-file.ts";
import { openImage } from "../open-image.ts";
import { RangeCopier } from "./copy-ranges.ts";
import { runJob, type Job, type JobOptions } from "./job.ts";
import { diffStates, type DiffRange, type DiffStats } from "./state-diff.ts";

export interface DiffImagesOptions extends JobOptions {
  /** Comparison granule in bytes (default 512). */
  granularityBytes?: number;
}

export interface DiffResult {
  fromSizeBytes: number;
  toSizeBytes: number;
  ranges: DiffRange[];
  stats: DiffStats;
}

/** Where `from` and `to` differ (read-only on both). */
export function diffImages(from: BlockDevice, to: BlockDevice, options: DiffImagesOptions = {}): Promise<DiffResult> {
  return runJob("diff", options, {
    async run(job) {
      const ranges: DiffRange[] = [];
      const stats = await diffStates(from, to, (range) => void ranges.push(range), { job, granularityBytes: options.granularityBytes });
      return { fromSizeBytes: from.sizeBytes, toSizeBytes: to.sizeBytes, ranges, stats };
    },
  });
}

export interface ExportDeltaOptions extends JobOptions {
  /** FROM, opened: its format is the delta's backing format, and the delta may not be a layer of its chain. */
  from: BlockDevice;
  /**
   * The image at the backing path when it is not FROM itself but a copy of
   * FROM's content (a VM snapshot's earlier export): its format is the
   * delta's backing format, and the delta may not be a layer of its chain either.
   */
  backing?: BlockDevice;
}

/** Cluster-aligned ranges covering `ranges` (merged), clipped to sizeBytes. */
export function clusterSpans(ranges: readonly { start: number; length: number }[], clusterSizeBytes: number, sizeBytes: number): { start: number; length: number }[] {
  const spans: { start: number; length: number }[] = [];
  for (const range of ranges) {
    const start = Math.floor(range.start / clusterSizeBytes) * clusterSizeBytes;
    const end = Math.min(sizeBytes, Math.ceil((range.start + range.length) / clusterSizeBytes) * clusterSizeBytes);
    if (end <= start) continue;
    const last = spans[spans.length - 1];
    if (last !== undefined && start <= last.start + last.length) last.length = Math.max(last.length, end - last.start);
    else spans.push({ start, length: end - start });
  }
  return spans;
}

async function copySpans(to: BlockDevice, delta: BlockDevice, spans: readonly { start: number; length: number }[], job: Job): Promise<number> {
  const copier = new RangeCopier(to, delta, job);
  job.setTotal(spans.reduce((sum, span) => sum + span.length, 0), "export");
  for (const span of spans) await copier.copyData(span.start, span.length);
  await delta.flush();
  return copier.writtenBytes;
}

/**
 * Write the delta overlay at `deltaPath`: backing file `fromPath` (stored
 * relative to the delta), holding TO's content in every cluster where
 * `ranges` (from diffImages) say FROM and TO differ.
 */
export async function exportDelta(fromPath: string, to: BlockDevice, ranges: readonly DiffRange[], deltaPath: string, options: ExportDeltaOptions): Promise<{ writtenBytes: number; clusterSizeBytes: number }> {
  // Creating the delta over a layer of TO's or FROM's chain would wipe what it reads or stands on
  // (createImage's backing-loop check comes only after it truncated the file).
  refuseWritingInput(deltaPath, "delta", [
    ["the TO image", to],
    ["the FROM image", options.from],
    ...(options.backing === undefined ? [] : [["the backing image", options.backing] as [string, BlockDevice]]),
  ]);
  const clusterSizeBytes = to instanceof Qcow2Image ? to.clusterSizeBytes : 65536;
  // Where the delta cannot be created, say so (a backing name relative to a missing directory would be reported instead).
  if (!existsSync(dirname(resolve(deltaPath)))) throw new SnapstackError("E_NOT_FOUND", `${deltaPath}: cannot create: no such file or directory`, { path: deltaPath });
  const backingName = relativeBackingName(deltaPath, fromPath);
  await createImage(deltaPath, {
    format: "qcow2",
    sizeBytes: to.sizeBytes,
    backingFile: backingName,
    backingFormat: (options.backing ?? options.from).format,
    options: { cluster_size: clusterSizeBytes },
  });
  const delta = await openImage(deltaPath, { format: "qcow2", readOnly: false });
  if (delta.backing === null) {
    await delta.close();
    throw new SnapstackError("E_INTERNAL", `${deltaPath}: the delta was created without its backing file`);
  }
  const spans = clusterSpans(ranges, clusterSizeBytes, to.sizeBytes);
  try {
    return await runJob("diff-export", options, {
      async run(job) {
        return { writtenBytes: await copySpans(to, delta, spans, job), clusterSizeBytes };
      },
      async clean() {
        await delta.close();
      },
    });
  } catch (error) {
    rmSync(deltaPath, { force: true });
    throw error;
  }
}
