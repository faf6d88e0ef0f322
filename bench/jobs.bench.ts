/**
 * Jobs on chains: commit vs qemu-img commit, diff on a 1 TiB sparse image,
 * sparse restore onto a 16 GiB raw target.
 *
 * - commit: an overlay holding 256 MiB (1 MiB every 16 MiB) over a 4 GiB
 *   base, and the same 256 MiB over a 64 GiB base (1 MiB every 256 MiB), to
 *   show that time follows the overlay's data, not the disk's size. Each run
 *   commits fresh copies (cp --sparse, untimed, then sync); RUNS runs,
 *   alternating tools, and which goes first (single commits on this VM
 *   take 0.3 s or 1 s, whichever tool runs: a median of 3 was decided by
 *   that); snapstack runs as bin/snapstack (TypeScript sources:
 *   Node strips types at start-up, ~0.3 s), from a compiled copy (what
 *   an installed package runs) and as snapstack-img with a resident helper
 *   running that copy (fixtures/resident-helper.ts). After each run the
 *   committed bases are checked equal with qemu-img compare.
 * - diff: FROM is a 1 TiB image with 1 GiB of data (1 MiB every GiB), TO
 *   an overlay of it changing 1 GiB elsewhere (1 MiB every GiB, offset by
 *   512 MiB). Reported: the diff (library, in-process), and the metadata
 *   work alone (TO against itself: every range decided from metadata).
 *   No peer: qemu-img has no diff (compare stops at the first difference).
 * - restore: SOURCE = a 16 GiB base (1 GiB of data) plus an overlay
 *   changing 1 GiB; TARGET = a raw 16 GiB file holding the base. snapstack
 *   restore --from base writes the change; the peer is what qemu-img
 *   offers for the same job, convert -n onto the existing target (it
 *   rewrites the data of all 16 GiB, zeroes as holes). Four runs each,
 *   alternating which tool goes first (on this VM the first writer into
 *   page-cache memory the guest has not used yet pays several microseconds
 *   a page), medians. Bytes written are in the notes.
 */
import { statSync } from "node:fs";
import { join } from "node:path";
import { buildCompiledCli } from "./fixtures/compiled-build.ts";
import { helperRunner, startResidentHelper, type ResidentHelper } from "./fixtures/resident-helper.ts";
import { GiB, MiB, TiB, createQcow2, spreadWrites, withScratchDir, writePatterns, type PatternWrite } from "./fixtures/images.ts";
import { printRows, row, SNAPSTACK_BIN, type BenchRow } from "./fixtures/rows.ts";
import { median, runMeasured, runOrder, runTool } from "./fixtures/tools.ts";
import { openImage } from "../src/chain/open-image.ts";
import { diffImages } from "../src/chain/jobs/index.ts";

/**
 * Commit runs per tool: even, so that each tool goes first in half of them
 * (see commitCase). 10, not 6: with write-behind the two tools are within
 * ~5% of each other, and 1-2 runs of 6 landing on this VM's slow mode moved
 * a median by more than that (2026-11-27: 0.27-0.62 s for one tool in one run).
 */
const RUNS = 10;

/** How to run `snapstack img ...`: bin/snapstack (TypeScript sources) or a compiled copy (what an installed package runs). */
interface SnapstackRunner {
  label: string;
  command: string;
  prefix: string[];
  env?: NodeJS.ProcessEnv;
  /** The resident helper the runner's commands run in. */
  helper?: ResidentHelper;
}

/** The runners, and the resident helper to stop at the end (or why there is none). */
async function snapstackRunners(dir: string): Promise<{ runners: SnapstackRunner[]; helper: ResidentHelper | string }> {
  const runners: SnapstackRunner[] = [{ label: "TS sources", command: SNAPSTACK_BIN, prefix: ["img"] }];
  const cli = await buildCompiledCli(dir);
  if (cli.unavailable === null) runners.push({ label: "compiled JS", command: cli.command, prefix: [...cli.prefix, "img"] });
  const helper = await startResidentHelper(cli, dir);
  if (typeof helper !== "string") runners.push(helperRunner(helper, "snapstack-img with a resident helper"));
  return { runners, helper };
}
const COMMIT_DATA_CHUNK_BYTES = 1 * MiB;

function shifted(writes: readonly PatternWrite[], byBytes: number, patternXor: number): PatternWrite[] {
  return writes.map((w) => ({ guestOffset: w.guestOffset + byBytes, lengthBytes: w.lengthBytes, patternByte: (w.patternByte ^ patternXor) || 1 }));
}

async function copyChain(fromDir: string, toDir: string): Promise<void> {
  await runTool("rm", ["-rf", toDir]);
  await runTool("mkdir", ["-p", toDir]);
  for (const name of ["base.qcow2", "top.qcow2"]) await runTool("cp", ["--sparse=always", join(fromDir, name), join(toDir, name)]);
  await runTool("sync", []);
}

async function commitCase(dir: string, virtualSizeBytes: number, strideBytes: number, runners: readonly SnapstackRunner[]): Promise<BenchRow[]> {
  const fixture = join(dir, `fixture-${virtualSizeBytes}`);
  await runTool("mkdir", ["-p", fixture]);
  await createQcow2(join(fixture, "base.qcow2"), virtualSizeBytes);
  await writePatterns(join(fixture, "base.qcow2"), spreadWrites(virtualSizeBytes, COMMIT_DATA_CHUNK_BYTES, strideBytes * 2));
  await createQcow2(join(fixture, "top.qcow2"), virtualSizeBytes, { backingPath: "base.qcow2" });
  const overlayWrites = shifted(spreadWrites(virtualSizeBytes, COMMIT_DATA_CHUNK_BYTES, strideBytes), COMMIT_DATA_CHUNK_BYTES * 2, 0x5a);
  await writePatterns(join(fixture, "top.qcow2"), overlayWrites);
  const overlayBytes = overlayWrites.length * COMMIT_DATA_CHUNK_BYTES;
  const qemuDir = join(dir, "run-qemu");
  const snapDir = join(dir, "run-snap");
  const qemu: number[] = [];
  const snap: number[][] = runners.map(() => []);
  const checks: string[] = runners.map(() => "");
  // -1: qemu-img; otherwise the index of a snapstack runner.
  const tools = [-1, ...runners.keys()];
  for (let run = 0; run < RUNS; run++) {
    for (const tool of runOrder(run, tools)) {
      if (tool === -1) {
        await copyChain(fixture, qemuDir);
        qemu.push((await runMeasured("qemu-img", ["commit", "-q", join(qemuDir, "top.qcow2")])).wallSeconds);
        continue;
      }
      await copyChain(fixture, snapDir);
      const runner = runners[tool];
      snap[tool].push((await runMeasured(runner.command, [...runner.prefix, "commit", "-q", join(snapDir, "top.qcow2")], undefined, runner.env)).wallSeconds);
      // Against qemu-img's committed base (run 0 starts with qemu-img, so there is one).
      const same = await runMeasured("qemu-img", ["compare", "-q", join(qemuDir, "base.qcow2"), join(snapDir, "base.qcow2")]).then(
        () => true,
        () => false,
      );
      if (checks[tool] === "" || !same) checks[tool] = same ? "committed bases identical (qemu-img compare)" : "COMMITTED BASES DIFFER";
    }
  }
  return runners.map((runner, index) =>
    row(
      `commit: overlay with ${overlayBytes / MiB} MiB over a ${virtualSizeBytes / GiB} GiB disk (snapstack ${runner.label})`,
      median(snap[index]),
      median(qemu),
      "s",
      `median of ${RUNS}, alternating which tool goes first; snapstack ${snap[index].map((s) => s.toFixed(2)).join("/")} s, qemu-img ${qemu.map((s) => s.toFixed(2)).join("/")} s; ${checks[index]}${runner.helper === undefined ? "" : `; ${runner.helper.describe()}`}`,
    ),
  );
}

async function diffCase(dir: string): Promise<BenchRow[]> {
  const from = join(dir, "diff-from.qcow2");
  const to = join(dir, "diff-to.qcow2");
  await createQcow2(from, TiB);
  await writePatterns(from, spreadWrites(TiB, MiB, GiB));
  await createQcow2(to, TiB, { backingPath: "diff-from.qcow2" });
  await writePatterns(to, shifted(spreadWrites(TiB, MiB, GiB), 512 * MiB, 0x33));
  const fromDevice = await openImage(from, { readOnly: true });
  const toDevice = await openImage(to, { readOnly: true });
  try {
    const started = performance.now();
    const result = await diffImages(fromDevice, toDevice);
    const diffSeconds = (performance.now() - started) / 1000;
    const metaStarted = performance.now();
    const self = await diffImages(toDevice, toDevice);
    const metadataSeconds = (performance.now() - metaStarted) / 1000;
    return [
      row(
        "diff: 1 TiB sparse image, two states differing in 1 GiB",
        diffSeconds,
        null,
        "s",
        `${result.stats.ranges} ranges, ${(result.stats.differingBytes / MiB).toFixed(0)} MiB differ; ${(result.stats.comparedBytes / MiB).toFixed(0)} MiB read and compared, ${(result.stats.metadataEqualBytes / GiB).toFixed(0)} GiB equal by metadata`,
      ),
      row("diff: metadata work alone on the same 1 TiB chain", metadataSeconds, null, "s", `TO against itself: ${(self.stats.metadataEqualBytes / GiB).toFixed(0)} GiB decided from metadata, ${self.stats.comparedBytes} bytes read (target < 1 s)`),
    ];
  } finally {
    await fromDevice.close();
    await toDevice.close();
  }
}

/** Runs of each tool in the restore case (alternating which goes first: an even count). */
const RESTORE_RUNS = 4;

async function restoreCase(dir: string): Promise<BenchRow> {
  const size = 16 * GiB;
  const base = join(dir, "restore-base.qcow2");
  const top = join(dir, "restore-top.qcow2");
  await createQcow2(base, size);
  await writePatterns(base, spreadWrites(size, 4 * MiB, 64 * MiB));
  await createQcow2(top, size, { backingPath: "restore-base.qcow2" });
  await writePatterns(top, shifted(spreadWrites(size, 4 * MiB, 64 * MiB), 32 * MiB, 0x77));
  const fixture = join(dir, "restore-fixture.raw");
  await runTool("qemu-img", ["convert", "-O", "raw", base, fixture]);
  const target = join(dir, "restore-target.raw");
  // Alternating, snapstack first in odd runs: on this VM, writing into page-cache pages the
  // guest has not used before costs several microseconds a page, so whoever runs first pays more.
  const snapRuns: number[] = [];
  const qemuRuns: number[] = [];
  let written = "?";
  let check = "";
  for (let run = 0; run < RESTORE_RUNS; run++) {
    for (const tool of runOrder(run, ["snapstack", "qemu-img"] as const)) {
      await runTool("cp", ["--sparse=always", fixture, target]);
      await runTool("sync", []);
      if (tool === "qemu-img") {
        qemuRuns.push((await runMeasured("qemu-img", ["convert", "-n", "-O", "raw", top, target])).wallSeconds);
        continue;
      }
      const snap = await runMeasured(SNAPSTACK_BIN, ["img", "restore", "--from", base, top, target]);
      snapRuns.push(snap.wallSeconds);
      written = /wrote (\d+) bytes/.exec(snap.stdout)?.[1] ?? "?";
      const same = await runMeasured("qemu-img", ["compare", "-q", "-F", "raw", top, target]).then(
        () => true,
        () => false,
      );
      if (!same || check === "") check = same ? "target identical to SOURCE" : "TARGET DIFFERS";
    }
  }
  const seconds = (runs: number[]): string => runs.map((v) => v.toFixed(2)).join("/");
  return row(
    "restore: 1 GiB change onto a raw 16 GiB target",
    median(snapRuns),
    median(qemuRuns),
    "s",
    `median of ${RESTORE_RUNS}, alternating; snapstack ${seconds(snapRuns)} s, wrote ${written} bytes (${(Number(written) / GiB).toFixed(2)} GiB), ${check}; peer: qemu-img convert -n (rewrites the data of the whole target; target file ${(statSync(target).size / GiB).toFixed(0)} GiB) ${seconds(qemuRuns)} s`,
  );
}

export default async function jobsBench(): Promise<BenchRow[]> {
  return withScratchDir("jobs", async (dir) => {
    const rows: BenchRow[] = [];
    const { runners, helper } = await snapstackRunners(dir);
    try {
      rows.push(...(await commitCase(dir, 4 * GiB, 16 * MiB, runners)));
      rows.push(...(await commitCase(dir, 64 * GiB, 256 * MiB, runners)));
    } finally {
      if (typeof helper !== "string") await helper.stop();
    }
    rows.push(...(await diffCase(dir)));
    rows.push(await restoreCase(dir));
    return rows;
  });
}

if (import.meta.main) printRows("bench/jobs.bench.ts", await jobsBench());
