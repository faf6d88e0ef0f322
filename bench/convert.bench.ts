/**
 * `snapstack img convert` vs `qemu-img convert`, whole command, wall clock.
 *
 * Fixture: a qcow2 image with 1 GiB of data spread over a 4 GiB virtual disk
 * (1 MiB every 4 MiB, written by qemu-io), converted to qcow2 and to raw.
 * Each configuration runs RUNS times, alternating the tools so drift in the
 * host's writeback hits all alike, and which tool goes first (on this VM a
 * run now and then takes 1.3-3 s instead of 0.4, whichever tool it is: see
 * docs/benchmarks.md on page cache the host must back again, so a median of
 * 5 moved with where those fell); the output is deleted and `sync` run
 * (untimed) before every run; the page cache holds the source (it was just
 * written). snapstack runs three ways: bin/snapstack on the TypeScript
 * sources (Node strips the types of every module at start-up), the same CLI
 * from a throwaway JavaScript build (what an installed package with dist/
 * runs), and snapstack-img sending the command to a resident helper that
 * runs that build (fixtures/resident-helper.ts; the client's wall clock,
 * the helper's CPU and memory in the notes).
 * Reported: median seconds, ratio snapstack / qemu-img (target <= 1.0);
 * each tool's CPU time and peak RSS (GNU time) are in the notes. After the
 * timed runs the last output of each snapstack variant is checked with
 * `qemu-img compare`, so a fast but wrong conversion cannot pass unnoticed.
 */
import { rmSync } from "node:fs";
import { join } from "node:path";
import { buildCompiledCli, type CompiledCli } from "./fixtures/compiled-build.ts";
import { helperRunner, startResidentHelper, type ResidentHelper } from "./fixtures/resident-helper.ts";
import { buildSpreadImage, GiB, MiB, withScratchDir } from "./fixtures/images.ts";
import { printRows, row, SNAPSTACK_BIN, snapstackCliPresent, type BenchRow } from "./fixtures/rows.ts";
import { median, runMeasured, runOrder, runTool, type MeasuredRun } from "./fixtures/tools.ts";

/** Runs per tool: odd (a true median) and alternating which tool goes first. */
const RUNS = 9;
const VIRTUAL_SIZE_BYTES = 4 * GiB;
const CHUNK_BYTES = 1 * MiB;
const STRIDE_BYTES = 4 * MiB;

/** One way of running a converter: the command and arguments that precede `convert ...`. */
interface Runner {
  label: string;
  command: string;
  prefix: string[];
  /** Why this runner cannot run, or null. */
  unavailable: string | null;
  env?: NodeJS.ProcessEnv;
  /** The resident helper the runner's commands run in (their CPU is spent there). */
  helper?: ResidentHelper;
}

async function settle(outputPath: string): Promise<void> {
  rmSync(outputPath, { force: true });
  await runTool("sync", []);
}

function summarize(runs: readonly MeasuredRun[]): string {
  return `wall ${runs.map((r) => r.wallSeconds.toFixed(2)).join("/")} s, median CPU ${median(runs.map((r) => r.cpuSeconds)).toFixed(2)} s, peak RSS ${(median(runs.map((r) => r.peakRssBytes)) / MiB).toFixed(0)} MiB`;
}

/** The snapstack CLI from a compiled copy: import its main module and run it as bin/snapstack does. */
function compiledRunner(cli: CompiledCli): Runner {
  return { label: "snapstack, compiled JS", command: cli.command, prefix: [...cli.prefix, "img"], unavailable: cli.unavailable };
}


async function convertCase(sourcePath: string, outputPath: string, outputFormat: "qcow2" | "raw", runners: readonly Runner[]): Promise<BenchRow[]> {
  const convertArgs = ["convert", "-f", "qcow2", "-O", outputFormat, sourcePath, outputPath];
  const qemuRuns: MeasuredRun[] = [];
  const snapRuns: MeasuredRun[][] = runners.map(() => []);
  const helperCpu: number[][] = runners.map(() => []);
  const snapErrors: (string | null)[] = runners.map((r) => r.unavailable);
  const compared: string[] = runners.map(() => "");
  // -1: qemu-img; otherwise the index of a snapstack runner.
  const tools = [-1, ...runners.keys()];
  for (let run = 0; run < RUNS; run++) {
    for (const tool of runOrder(run, tools)) {
      if (tool !== -1 && snapErrors[tool] !== null) continue;
      await settle(outputPath);
      if (tool === -1) {
        qemuRuns.push(await runMeasured("qemu-img", convertArgs));
        continue;
      }
      const runner = runners[tool];
      try {
        const cpuBefore = runner.helper?.cpuSeconds() ?? 0;
        snapRuns[tool].push(await runMeasured(runner.command, [...runner.prefix, ...convertArgs], undefined, runner.env));
        if (runner.helper !== undefined) helperCpu[tool].push(runner.helper.cpuSeconds() - cpuBefore);
      } catch (error) {
        snapErrors[tool] = (error as Error).message.split("\n")[0].slice(0, 300);
        continue;
      }
      if (run === RUNS - 1) {
        compared[tool] = await runMeasured("qemu-img", ["compare", "-q", "-f", "qcow2", "-F", outputFormat, sourcePath, outputPath]).then(
          () => "output identical (qemu-img compare)",
          () => "OUTPUT DIFFERS from source (qemu-img compare)",
        );
      }
    }
  }
  rmSync(outputPath, { force: true });
  const qemuMedian = median(qemuRuns.map((r) => r.wallSeconds));
  return runners.map((runner, index) => {
    const name = `convert qcow2->${outputFormat} (1 GiB data / 4 GiB), ${runner.label}`;
    const notes = [`median of ${RUNS}, alternating which tool goes first`, `target ratio <= 1.0`, `qemu-img: ${summarize(qemuRuns)}`];
    const error = snapErrors[index];
    if (error !== null) return row(name, null, qemuMedian, "s", [...notes, `snapstack failed: ${error}`].join("; "));
    notes.push(`snapstack: ${summarize(snapRuns[index])}`, compared[index]);
    if (runner.helper !== undefined) notes.push(`the client's CPU and RSS above; the helper's median CPU ${median(helperCpu[index]).toFixed(2)} s; ${runner.helper.describe()}`);
    return row(name, median(snapRuns[index].map((r) => r.wallSeconds)), qemuMedian, "s", notes.join("; "));
  });
}

export default async function convertBench(): Promise<BenchRow[]> {
  return withScratchDir("convert", async (dir) => {
    const sourcePath = join(dir, "source.qcow2");
    await buildSpreadImage(sourcePath, VIRTUAL_SIZE_BYTES, CHUNK_BYTES, STRIDE_BYTES);
    const cli = await buildCompiledCli(dir);
    const helper = await startResidentHelper(cli, dir);
    const runners: Runner[] = [
      { label: "bin/snapstack on TS sources", command: process.execPath, prefix: [SNAPSTACK_BIN, "img"], unavailable: snapstackCliPresent() ? null : "bin/snapstack missing" },
      compiledRunner(cli),
      // Wall clock of the client; the notes give the helper's CPU and memory apart.
      helperRunner(helper, "snapstack-img with a resident helper (compiled JS)"),
    ];
    try {
      return [...(await convertCase(sourcePath, join(dir, "out.qcow2"), "qcow2", runners)), ...(await convertCase(sourcePath, join(dir, "out.raw"), "raw", runners))];
    } finally {
      if (typeof helper !== "string") await helper.stop();
    }
  });
}

if (import.meta.main) printRows(import.meta.filename, await convertBench());
