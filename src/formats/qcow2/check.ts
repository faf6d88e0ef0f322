/**
 * `qemu-img check` for qcow2: the same findings, counts, stderr lines,
 * repairs and exit class as QEMU 7.2 (qcow2_co_check_locked,
 * qcow2_check_refcounts; qemu-img.c img_check / collect_image_check).
 *
 * Design notes
 * - One pass = open (header checks as qcow2_do_open in check mode; failures
 *   throw coded errors, qemu-img's "Could not open"), read the snapshot
 *   table tolerantly, walk all references (reference-counter.ts), compare
 *   with the stored refcounts, check COPIED flags in the active tables.
 * - Repair (`repair: "leaks" | "all"`) runs the pass with QEMU's fix bits;
 *   if anything was fixed, a second read-only pass runs and its result is
 *   returned with the fixed counts of the first, exactly as qemu-img does.
 *   `-r all` rebuilds the refcount structure (rebuild-refcounts.ts) when a
 *   referenced cluster has refcount 0 or a refcount block is unusable.
 *   A repair pass with no check errors and no corruptions left clears the
 *   dirty and corrupt bits.
 * - A pass that cannot complete returns `failure` (qemu-img prints only the
 *   stderr lines and "Check failed: <failure>", no report, exit 1).
 * - Snapshot table damage that only a new table fixes (too much extra
 *   data in an entry, incomplete v3 entries) is repaired under `-r all`
 *   after the refcount pass, as QEMU's qcow2_check_fix_snapshot_table
 *   (rebuild-refcounts.ts rewriteSnapshotTable); overhanging snapshots are
 *   dropped at once by rewriting the header's count.
 */
import { SnapstackError } from "../../base/errors.ts";
import type { ImageFile } from "../../io/file.ts";
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, guestSizeOf } from "./header.ts";
import {
  CHECK_CLUSTERS_MAX,
  CheckFailure,
  CheckReport,
  ClusterCounts,
  FIX_ERRORS,
  FIX_LEAKS,
  STRERROR,
  StoredRefcounts,
  calculateRefcounts,
  checkOflagCopied,
  clustersForBytes,
  compareRefcounts,
  openCheckState,
  readSnapshotTable,
  writeIncompatibleFeatures,
} from "./reference-counter.ts";
import type { FixMode, Qcow2CheckState } from "./reference-counter.ts";
import { rewriteSnapshotTable, writeRefcountStructure } from "./rebuild-refcounts.ts";

export type Qcow2RepairMode = "leaks" | "all";

export interface Qcow2CheckOptions {
  /** qemu-img check -r leaks | -r all. The file must be writable. */
  repair?: Qcow2RepairMode;
}

/** What qemu-img check reports (QAPI ImageCheck) plus its stderr lines. */
export interface Qcow2CheckResult {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  /** (highest cluster with a refcount or a reference + 1) x cluster size. */
  imageEndOffset: number;
  /** Virtual disk clusters. */
  totalClusters: number;
  /** Guest clusters allocated in the active L1 (normal, preallocated zero, compressed). */
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /**
   * Detail lines qemu-img prints on stderr, in order. Lines QEMU prints
   * through error_report() start with "qemu-img: " (QEMU_IMG_PREFIX).
   */
  messages: string[];
  /**
   * The check could not complete: the strerror text qemu-img prints as
   * "Check failed: <failure>" (no report on stdout, exit 1). null otherwise.
   */
  failure: string | null;
}

function resultFrom(report: CheckReport, failure: string | null): Qcow2CheckResult {
  return {
    checkErrors: report.checkErrors,
    corruptions: report.corruptions,
    leaks: report.leaks,
    corruptionsFixed: report.corruptionsFixed,
    leaksFixed: report.leaksFixed,
    imageEndOffset: report.imageEndOffset,
    totalClusters: report.totalClusters,
    allocatedClusters: report.allocatedClusters,
    fragmentedClusters: report.fragmentedClusters,
    compressedClusters: report.compressedClusters,
    messages: report.allMessages(),
    failure,
  };
}

/**
 * Check a qcow2 image like `qemu-img check [-r leaks|all]`. Throws coded
 * errors only where qemu-img cannot open the image (bad header, tables too
 * large or misaligned) or for I/O errors; everything else is in the result.
 */
export async function checkQcow2(file: ImageFile, options: Qcow2CheckOptions = {}): Promise<Qcow2CheckResult> {
  const fix: FixMode = options.repair === "all" ? FIX_LEAKS | FIX_ERRORS : options.repair === "leaks" ? FIX_LEAKS : 0;
  if (fix !== 0 && file.readOnly) {
    throw new SnapstackError("E_READ_ONLY", `${file.name}: cannot repair an image opened read-only`);
  }
  const first = await checkPass(file, fix);
  if (first.failure !== null || (first.corruptionsFixed === 0 && first.leaksFixed === 0)) return first;
  // "Double checking the fixed image now..."
  const second = await checkPass(file, 0);
  return {
    ...second,
    corruptionsFixed: first.corruptionsFixed,
    leaksFixed: first.leaksFixed,
    messages: [...first.messages, ...second.messages],
  };
}

/** qcow2_co_check_locked: one check (and repair) pass. */
async function checkPass(file: ImageFile, fix: FixMode): Promise<Qcow2CheckResult> {
  const state = await openCheckState(file, fix !== 0);
  const report = new CheckReport();
  try {
    const snapshotTableCorruptions = await readSnapshotTable(state, report, fix);
    await checkRefcounts(state, report, fix);
    if (snapshotTableCorruptions > 0 && fix & FIX_ERRORS) {
      await rewriteSnapshotTable(state, report);
      report.corruptionsFixed += snapshotTableCorruptions;
      report.corruptions -= snapshotTableCorruptions;
    }
  } catch (error) {
    if (error instanceof CheckFailure) return resultFrom(report, error.strerror);
    throw error;
  }
  if (fix !== 0 && report.checkErrors === 0 && report.corruptions === 0 && state.header.version === 3) {
    const clean = state.header.incompatibleFeatures & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
    if (clean !== state.header.incompatibleFeatures) {
      state.header.incompatibleFeatures = clean;
      await writeIncompatibleFeatures(state);
    }
  }
  if (fix !== 0) await file.flush();
  return resultFrom(report, null);
}

/** qcow2_check_refcounts. */
async function checkRefcounts(state: Qcow2CheckState, report: CheckReport, fix: FixMode): Promise<void> {
  const fileClusters = clustersForBytes(state, state.fileSizeBytes);
  if (fileClusters > CHECK_CLUSTERS_MAX) {
    report.checkErrors++;
    throw new CheckFailure(STRERROR.EFBIG);
  }
  // bs->total_sectors is the virtual size in whole sectors.
  report.totalClusters = clustersForBytes(state, guestSizeOf(state.header));

  const counts = new ClusterCounts(fileClusters, state.refcountMax);
  const outcome = await calculateRefcounts(state, report, counts, fix);
  const stored = new StoredRefcounts(state, report);

  // Compare without fixing first; the result is discarded if a fix follows.
  const beforeCompare = report.saveCounters();
  let highestCluster = await compareRefcounts(state, report, stored, counts, 0, outcome);

  if (outcome.rebuild && fix & FIX_ERRORS) {
    const beforeRebuild = report.saveCounters();
    let freshLeaks = 0;
    report.say("Rebuilding refcount structure");
    await writeRefcountStructure(state, report, counts);
    stored.invalidate();
    report.corruptions = 0;
    report.leaks = 0;
    // The references changed (new table and blocks): count again. The
    // allocation figures of this walk are not kept (qemu-img reports the
    // double-check pass anyway).
    outcome.rebuild = false;
    counts.clear();
    const figures = { allocated: report.allocatedClusters, fragmented: report.fragmentedClusters, compressed: report.compressedClusters };
    await calculateRefcounts(state, report, counts, 0);
    report.allocatedClusters = figures.allocated;
    report.fragmentedClusters = figures.fragmented;
    report.compressedClusters = figures.compressed;
    if (fix & FIX_LEAKS) {
      // The old structure is leaked now; fix that, keeping only leaks that remain.
      const saved = report.saveCounters();
      report.restoreCounters({ checkErrors: 0, corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0 });
      highestCluster = await compareRefcounts(state, report, stored, counts, FIX_LEAKS, outcome);
      if (outcome.rebuild) report.say("ERROR rebuilt refcount structure is still broken");
      freshLeaks = report.leaks;
      report.restoreCounters(saved);
    }
    if (report.corruptions < beforeRebuild.corruptions) report.corruptionsFixed += beforeRebuild.corruptions - report.corruptions;
    if (report.leaks < beforeRebuild.leaks) report.leaksFixed += beforeRebuild.leaks - report.leaks;
    report.leaks += freshLeaks;
  } else if (fix !== 0) {
    if (outcome.rebuild) {
      report.say("ERROR need to rebuild refcount structures");
      report.checkErrors++;
      throw new CheckFailure(STRERROR.EIO);
    }
    if (report.leaks > 0 || report.corruptions > 0) {
      report.restoreCounters(beforeCompare);
      highestCluster = await compareRefcounts(state, report, stored, counts, fix, outcome);
    }
  }

  await checkOflagCopied(state, report, stored, fix);
  report.imageEndOffset = (highestCluster + 1) * state.clusterSizeBytes;
}

/**
 * qemu-img check --output=json as an object with QAPI ImageCheck's keys in
 * QAPI order (format with src/cli/qemu-json.ts formatQemuJson, which applies
 * QEMU's print order). Optional keys appear only when non-zero, as
 * collect_image_check sets has_* = (value != 0). Not meaningful for a
 * result with `failure` (qemu-img prints no report then).
 */
export function toQemuCheckJson(result: Qcow2CheckResult, filename: string, format = "qcow2"): Record<string, string | number> {
  const json: Record<string, string | number> = { filename, format, "check-errors": result.checkErrors };
  const optional: [string, number][] = [
    ["image-end-offset", result.imageEndOffset],
    ["corruptions", result.corruptions],
    ["leaks", result.leaks],
    ["corruptions-fixed", result.corruptionsFixed],
    ["leaks-fixed", result.leaksFixed],
    ["total-clusters", result.totalClusters],
    ["allocated-clusters", result.allocatedClusters],
    ["fragmented-clusters", result.fragmentedClusters],
    ["compressed-clusters", result.compressedClusters],
  ];
  for (const [key, value] of optional) if (value !== 0) json[key] = value;
  return json;
}

/** qemu-img check's exit status: 1 check not completed, 2 corruptions, 3 only leaks, 0 clean. */
export function qemuCheckExitCode(result: Qcow2CheckResult): 0 | 1 | 2 | 3 {
  if (result.failure !== null || result.checkErrors > 0) return 1;
  if (result.corruptions > 0) return 2;
  if (result.leaks > 0) return 3;
  return 0;
}
