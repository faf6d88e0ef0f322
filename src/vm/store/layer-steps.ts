/**
 * Executing the planner's steps (snapshot-tree.ts) on a machine's files.
 *
 * Design notes
 * - Every step is idempotent and checks the files before acting, so a
 *   journal replay after a kill at any point finishes the operation:
 *     create-overlay  skipped when the file exists with the expected
 *                     backing name (it may already hold guest writes);
 *     stream          skipped when the target already backs onto the base;
 *     commit          skipped when the source is gone or no longer a qcow2
 *                     on the target (its removal, maybe a wipe, was under
 *                     way); repeating it is harmless (it only adds data
 *                     the source shadows);
 *     rebase-unsafe   rewrites the header name (same result twice);
 *     remove-layer    skipped when the file is gone;
 *     remove-snapshot-files  rm -r (with wipe: state file zeroed first).
 * - Backing names are stored relative between layers of one machine
 *   ("L3.qcow2") and absolute for an external base (a clone's).
 * - Wiping: removed layers and state files are overwritten with zeroes and
 *   flushed before unlinking (remove-image.ts), and committed sources too.
 */
import { existsSync, readdirSync, rmSync, statSync, type Dirent } from "node:fs";
import { dirname, isAbsolute, join, relative, resolve } from "node:path";
import { openNodeFile } from "../../io/node-file.ts";
import { readQcow2Header } from "../../formats/qcow2/index.ts";
import { createImage } from "../../chain/create-image.ts";
import { resolveBackingPath } from "../../chain/backing-path.ts";
import { commitImage, rebaseImage, removeImage, streamImage, type JobProgress } from "../../chain/jobs/index.ts";
import type { LayerStep } from "../tree/snapshot-tree.ts";
import { syncDirectorySync } from "./atomic-file.ts";

export interface StepOptions {
  wipe?: boolean;
  onProgress?: (progress: JobProgress) => void;
  signal?: AbortSignal;
}

export interface StepResult {
  /** Bytes copied by streams and commits. */
  mergedBytes: number;
  /** Bytes of files removed. */
  freedBytes: number;
}

/** Absolute path of a layer file named in a step. */
export function stepPath(machineDir: string, file: string): string {
  return isAbsolute(file) ? file : join(machineDir, file);
}

/** The name stored in an overlay for its backing `backingPath`. */
export function backingNameFor(overlayPath: string, backingPath: string, external: boolean): string {
  return external ? resolve(backingPath) : relative(dirname(overlayPath), backingPath);
}

/** The backing file an image names (resolved), or null; null also when the file is missing. */
export async function readBackingPath(path: string): Promise<string | null> {
  const file = await openNodeFile(path, { readOnly: true });
  try {
    const header = await readQcow2Header(file);
    return header.backingFileName === null ? null : resolve(resolveBackingPath(path, header.backingFileName));
  } finally {
    await file.close();
  }
}

/** Whether `path` is a readable image whose backing file is `backingPath` (false when missing or damaged, as a half-wiped layer). */
export async function backsOnto(path: string, backingPath: string): Promise<boolean> {
  return (await readBackingPath(path).catch(() => null)) === resolve(backingPath);
}

/** Bytes a file occupies on disk (0 when missing). */
export function fileAllocatedBytes(path: string): number {
  try {
    return statSync(path).blocks * 512;
  } catch {
    return 0;
  }
}

/** Allocated bytes of every file under `dir` (symbolic links not followed), 0 when it is gone. */
export function treeAllocatedBytes(dir: string): number {
  let total = 0;
  let entries: Dirent[];
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch {
    return 0;
  }
  for (const entry of entries) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) total += treeAllocatedBytes(path);
    else if (entry.isFile()) total += fileAllocatedBytes(path);
  }
  return total;
}

async function removeFile(path: string, wipe: boolean): Promise<number> {
  if (!existsSync(path)) return 0;
  const bytes = fileAllocatedBytes(path);
  if (wipe) await removeImage(path, { wipe: true, searchDirectories: [], wipeAllNames: true });
  else rmSync(path, { force: true });
  // Durable before the journal is dropped: a layer that came back after a power loss would
  // still name the top as its backing (a writes layer), and a later --wipe of the top refuse it.
  syncDirectorySync(dirname(path));
  return bytes;
}

export async function executeStep(machineDir: string, step: LayerStep, options: StepOptions = {}): Promise<StepResult> {
  const jobOptions = { onProgress: options.onProgress, signal: options.signal };
  switch (step.kind) {
    case "create-overlay": {
      const path = stepPath(machineDir, step.file);
      if (step.backingFile === null) {
        if (!existsSync(path)) await createImage(path, { format: "qcow2", sizeBytes: step.sizeBytes });
        return { mergedBytes: 0, freedBytes: 0 };
      }
      const backingPath = stepPath(machineDir, step.backingFile);
      if (await backsOnto(path, backingPath)) return { mergedBytes: 0, freedBytes: 0 };
      await createImage(path, {
        format: "qcow2",
        sizeBytes: step.sizeBytes,
        backingFile: backingNameFor(path, backingPath, isAbsolute(step.backingFile)),
        backingFormat: "qcow2",
        unsafe: true,
      });
      return { mergedBytes: 0, freedBytes: 0 };
    }
    case "stream": {
      const into = stepPath(machineDir, step.intoFile);
      const base = step.baseFile === null ? null : resolve(stepPath(machineDir, step.baseFile));
      if ((await readBackingPath(into)) === base) return { mergedBytes: 0, freedBytes: 0 };
      const result = await streamImage(into, { ...jobOptions, base: base ?? undefined });
      return { mergedBytes: result.streamedBytes, freedBytes: 0 };
    }
    case "commit": {
      const from = stepPath(machineDir, step.fromFile);
      // Gone, or no longer a qcow2 on `into` (a wipe before its removal was interrupted): the commit was done.
      if (!(await backsOnto(from, stepPath(machineDir, step.intoFile)))) return { mergedBytes: 0, freedBytes: 0 };
      // With wipe, the clusters the commit frees in `into` (ranges `from` zeroes) are zeroed too.
      const result = await commitImage(from, { ...jobOptions, drop: true, wipe: options.wipe ?? false, searchDirectories: [] });
      return { mergedBytes: result.committedBytes, freedBytes: 0 };
    }
    case "rebase-unsafe": {
      const path = stepPath(machineDir, step.file);
      const backingPath = stepPath(machineDir, step.backingFile);
      await rebaseImage(path, { backingFile: backingNameFor(path, backingPath, isAbsolute(step.backingFile)), backingFormat: "qcow2", unsafe: true });
      return { mergedBytes: 0, freedBytes: 0 };
    }
    case "remove-layer":
      return { mergedBytes: 0, freedBytes: await removeFile(stepPath(machineDir, step.file), options.wipe ?? false) };
    case "remove-snapshot-files": {
      const dir = join(machineDir, "snapshots", step.snapshot);
      const freedBytes = await removeFile(join(dir, "state.bin"), options.wipe ?? false);
      rmSync(dir, { recursive: true, force: true });
      syncDirectorySync(dirname(dir));
      return { mergedBytes: 0, freedBytes };
    }
  }
}

/** Run steps in order, summing results. */
export async function executeSteps(machineDir: string, steps: readonly LayerStep[], options: StepOptions = {}): Promise<StepResult> {
  const total: StepResult = { mergedBytes: 0, freedBytes: 0 };
  for (const step of steps) {
    const result = await executeStep(machineDir, step, options);
    total.mergedBytes += result.mergedBytes;
    total.freedBytes += result.freedBytes;
  }
  return total;
}
