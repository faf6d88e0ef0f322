/**
 * Internal snapshots: create, apply and delete on a 100 GiB qcow2 image with
 * 1 GiB allocated (1 MiB every 100 MiB, so every one of its 200 L2 tables is
 * used), against `qemu-img snapshot` on the same fixture.
 *
 * Each run starts from a fresh sparse copy of the fixture (untimed, synced)
 * and does, for each tool: `-c s` (timed), a 64 MiB write with qemu-io
 * (untimed, so the apply has something to undo), `-a s` (timed), `-d s`
 * (timed). Runs alternate between the tools. Reported per operation:
 * - the snapstack CLI (bin/snapstack on the TS sources, the CLI bundle
 *   as bin/snapstack runs it after `npm install`, and snapstack-img with a
 *   resident `snapstack helper` running that bundle) against qemu-img, wall
 *   clock of the whole process (for snapstack-img, the client's), median;
 *   the helper runner's CPU and bytes written are the client's plus the
 *   helper's (fixtures/resident-helper.ts);
 * - the library call alone (Qcow2Image.createSnapshot etc., image opened
 *   beforehand, in this process) against the same qemu-img figure, which
 *   still includes qemu-img's process start and image open (~10-20 ms).
 * The notes give the bytes each CLI wrote (GNU time's %O: pages dirtied,
 * median): snapstack writes the changed pages of each L2 table, qemu-img
 * whole tables.
 * The process start of each runner is shown in the notes (`snapshot -l` on
 * an image without snapshots), and Node's own start (`node -e 0`). After
 * the runs the snapstack results are checked with `qemu-img check` and
 * compared with qemu-img's.
 * qemu-img punches holes in the clusters a delete frees (discard); the
 * snapstack runs use no --wipe (nothing is written to freed clusters).
 */
import { join } from "node:path";
import { buildCompiledCli, type CompiledCli } from "./fixtures/compiled-build.ts";
import { helperRunner, startResidentHelper, type ResidentHelper } from "./fixtures/resident-helper.ts";
import { GiB, MiB, buildSpreadImage, withScratchDir } from "./fixtures/images.ts";
import { printRows, row, SNAPSTACK_BIN, type BenchRow } from "./fixtures/rows.ts";
import { median, runMeasured, runTool } from "./fixtures/tools.ts";
import { openNodeFile } from "../src/io/node-file.ts";
import { openQcow2 } from "../src/formats/qcow2/qcow2-image.ts";

const RUNS = 7;
const VIRTUAL_SIZE_BYTES = 100 * GiB;
const CHUNK_BYTES = 1 * MiB;
const STRIDE_BYTES = 100 * MiB;
const OPERATIONS = ["create", "apply", "delete"] as const;
type Operation = (typeof OPERATIONS)[number];
const FLAG: Record<Operation, string> = { create: "-c", apply: "-a", delete: "-d" };

interface Runner {
  label: string;
  command: string;
  prefix: string[];
  unavailable: string | null;
  env?: NodeJS.ProcessEnv;
  /** The resident helper the commands run in (its CPU and writes are added to the client's). */
  helper?: ResidentHelper;
}

/** Wall and CPU seconds and bytes written (CLI runs only) per operation, one entry per run. */
type Timings = Record<Operation, { wall: number[]; cpu: number[]; written: number[] }>;

function emptyTimings(): Timings {
  return { create: { wall: [], cpu: [], written: [] }, apply: { wall: [], cpu: [], written: [] }, delete: { wall: [], cpu: [], written: [] } };
}

async function freshCopy(fixture: string, path: string): Promise<void> {
  await runTool("cp", ["--sparse=always", fixture, path]);
  await runTool("sync", []);
}

async function dirtyActiveLayer(path: string): Promise<void> {
  await runTool("qemu-io", ["-f", "qcow2", "-c", "write -q -P 7 0 64M", path]);
}

/** -c, write, -a, -d with a CLI (qemu-img or a snapstack runner), timing the three snapshot commands. */
async function cliRound(runner: Pick<Runner, "command" | "prefix" | "env" | "helper">, path: string, timings: Timings): Promise<void> {
  for (const operation of OPERATIONS) {
    if (operation === "apply") await dirtyActiveLayer(path);
    const helperCpuBefore = runner.helper?.cpuSeconds() ?? 0;
    const helperWrittenBefore = runner.helper?.writtenBytes() ?? 0;
    const measured = await runMeasured(runner.command, [...runner.prefix, "snapshot", FLAG[operation], "s", path], undefined, runner.env);
    timings[operation].wall.push(measured.wallSeconds);
    timings[operation].cpu.push(measured.cpuSeconds + (runner.helper?.cpuSeconds() ?? 0) - helperCpuBefore);
    timings[operation].written.push(measured.writtenBytes + (runner.helper?.writtenBytes() ?? 0) - helperWrittenBefore);
  }
}

/** The same round through the library, timing the calls alone. */
async function libraryRound(path: string, timings: Timings): Promise<void> {
  for (const operation of OPERATIONS) {
    if (operation === "apply") await dirtyActiveLayer(path);
    const image = await openQcow2(await openNodeFile(path, { readOnly: false }), { readOnly: false, backing: null });
    const started = performance.now();
    const cpuBefore = process.cpuUsage();
    if (operation === "create") await image.createSnapshot("s");
    else if (operation === "apply") await image.applySnapshot("s");
    else await image.deleteSnapshot("s");
    const cpu = process.cpuUsage(cpuBefore);
    timings[operation].wall.push((performance.now() - started) / 1000);
    timings[operation].cpu.push((cpu.user + cpu.system) / 1e6);
    await image.close();
  }
}

function compiledRunner(cli: CompiledCli): Runner {
  return { label: "bundle (what bin/snapstack runs after npm install)", command: cli.command, prefix: [...cli.prefix, "img"], unavailable: cli.unavailable };
}


/** bin/snapstack forced onto the TypeScript sources (a checkout being edited). */
const SOURCES_RUNNER: Runner = {
  label: "bin/snapstack on the TS sources",
  command: "env",
  prefix: ["SNAPSTACK_RUN_SOURCES=1", process.execPath, SNAPSTACK_BIN, "img"],
  unavailable: null,
};

/** Median wall time of `snapshot -l` on an image without snapshots: process start + open. */
async function startupSeconds(command: string, prefix: string[], path: string, env?: NodeJS.ProcessEnv): Promise<number> {
  const runs: number[] = [];
  for (let i = 0; i < RUNS; i++) runs.push((await runMeasured(command, [...prefix, "snapshot", "-l", path], undefined, env)).wallSeconds);
  return median(runs);
}

/** Median wall time of `node -e 0`: the part of any snapstack process start that is Node's own. */
async function nodeStartSeconds(): Promise<number> {
  const runs: number[] = [];
  for (let i = 0; i < RUNS; i++) runs.push((await runMeasured(process.execPath, ["-e", "0"])).wallSeconds);
  return median(runs);
}

/** "81/214/540 ms (median CPU 12 ms)". */
function describe(times: { wall: number[]; cpu: number[]; written: number[] }): string {
  const written = times.written.length > 0 ? `, wrote ${(median(times.written) / MiB).toFixed(1)} MiB` : "";
  return `${times.wall.map((v) => (v * 1000).toFixed(0)).join("/")} ms (median CPU ${(median(times.cpu) * 1000).toFixed(0)} ms${written})`;
}

export default async function snapshotBench(): Promise<BenchRow[]> {
  return withScratchDir("snapshot", async (dir) => {
    const fixture = join(dir, "fixture.qcow2");
    await buildSpreadImage(fixture, VIRTUAL_SIZE_BYTES, CHUNK_BYTES, STRIDE_BYTES);
    const cliBuild = await buildCompiledCli(dir);
    const helper = await startResidentHelper(cliBuild, dir);
    try {
      return await measureAll(fixture, dir, [SOURCES_RUNNER, compiledRunner(cliBuild), helperRunner(helper, "snapstack-img with a resident helper (bundle)")]);
    } finally {
      if (typeof helper !== "string") await helper.stop();
    }
  });
}

async function measureAll(fixture: string, dir: string, runners: Runner[]): Promise<BenchRow[]> {
  const qemu = emptyTimings();
  const library = emptyTimings();
  const cli = runners.map(() => emptyTimings());
  const errors: (string | null)[] = runners.map((r) => r.unavailable);
  const qemuPath = join(dir, "qemu.qcow2");
  const snapPath = join(dir, "snap.qcow2");
  const libPath = join(dir, "lib.qcow2");
  for (let run = 0; run < RUNS; run++) {
    await freshCopy(fixture, qemuPath);
    await cliRound({ command: "qemu-img", prefix: [] }, qemuPath, qemu);
    for (const [index, runner] of runners.entries()) {
      if (errors[index] !== null) continue;
      await freshCopy(fixture, snapPath);
      try {
        await cliRound(runner, snapPath, cli[index]);
      } catch (error) {
        errors[index] = (error as Error).message.split("\n")[0].slice(0, 300);
      }
    }
    await freshCopy(fixture, libPath);
    await libraryRound(libPath, library);
  }
  const checked = await runMeasured("qemu-img", ["check", "-q", libPath]).then(
    () => "qemu-img check clean",
    () => "QEMU-IMG CHECK FAILED",
  );
  const same = await runMeasured("qemu-img", ["compare", "-q", qemuPath, libPath]).then(
    () => "content equal to qemu-img's",
    () => "CONTENT DIFFERS from qemu-img's",
  );
  const qemuStart = await startupSeconds("qemu-img", [], fixture);
  const runnerStart: number[] = [];
  for (const [index, runner] of runners.entries()) runnerStart.push(errors[index] === null ? await startupSeconds(runner.command, runner.prefix, fixture, runner.env) : 0);
  const nodeStart = await nodeStartSeconds();
  const rows: BenchRow[] = [];
  for (const operation of OPERATIONS) {
    const qemuMedian = median(qemu[operation].wall);
    const base = `snapshot ${FLAG[operation]} (${operation}) on 100 GiB with 1 GiB allocated`;
    rows.push(
      row(
        `${base}, library call`,
        median(library[operation].wall),
        qemuMedian,
        "s",
        `median of ${RUNS}; library ${describe(library[operation])} (image already open), qemu-img ${describe(qemu[operation])} (whole process; its start + open ${(qemuStart * 1000).toFixed(0)} ms); ${checked}, ${same}`,
      ),
    );
    for (const [index, runner] of runners.entries()) {
      const name = `${base}, CLI ${runner.label}`;
      if (errors[index] !== null) {
        rows.push(row(name, null, qemuMedian, "s", `snapstack failed: ${errors[index]}`));
        continue;
      }
      const start =
        runner.helper === undefined
          ? `of which process start + open ~${(runnerStart[index] * 1000).toFixed(0)} ms (Node alone, node -e 0: ${(nodeStart * 1000).toFixed(0)} ms)`
          : `CPU and writes the client's and the helper's; snapshot -l through it ~${(runnerStart[index] * 1000).toFixed(0)} ms; ${runner.helper.describe()}`;
      rows.push(row(name, median(cli[index][operation].wall), qemuMedian, "s", `median of ${RUNS}; snapstack ${describe(cli[index][operation])}, ${start}; qemu-img ${describe(qemu[operation])}`));
    }
  }
  return rows;
}

if (import.meta.main) printRows(import.meta.filename, await snapshotBench());
