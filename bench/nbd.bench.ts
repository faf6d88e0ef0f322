/**
 * `snapstack nbd` vs qemu-nbd 7.2 (same qcow2 chain) and vs nbdkit's file
 * plugin (same raw file), with fio's nbd engine and with nbdcopy; and the
 * server's memory per idle connection and under load.
 *
 * Fixtures (scratch dir, removed afterwards): a 1 GiB qcow2 base filled with
 * data plus an overlay holding every fourth MiB (reads hit both layers), and
 * a 1 GiB raw file of random bytes. Write workloads run on fresh copies per
 * server so nobody writes into a file another server already grew.
 *
 * Method: fio iodepth 16, one job, time_based RUNTIME_S s over the whole 1 GiB
 * (read 1 MiB sequential, read 4 KiB random, write 1 MiB sequential, write
 * 4 KiB random); nbdcopy copies the whole export to null: (reads, with
 * multi-conn where the server offers it) and a raw file into the export
 * (writes). Servers alternate run by run (the order flips every run) and
 * each figure is the median of RUNS runs, because this machine is shared
 * and single runs vary by 2x. The notes also give each server's CPU time
 * (user + system, all threads, from /proc) per GiB or per request, median
 * over the runs: on a busy machine throughput says how much CPU a process
 * was given, CPU per unit of work what it needed.
 * Every server listens on a Unix socket; qemu-nbd and snapstack get -e 4 so
 * both offer multi-conn to nbdcopy (and snapstack, with its default
 * --workers, serves the read-only and raw exports in data worker processes:
 * its CPU and memory figures are summed over them). Ratio = snapstack / peer, higher is
 * better: targets >= 1.0 against qemu-nbd and >= 0.8 against nbdkit.
 *
 * Memory: VmRSS of the server process after 64 connections completed
 * negotiation and sit idle, minus before, per connection; and VmHWM after
 * the write workloads (peak under load, 16 requests of 1 MiB in flight),
 * with the notes giving snapstack's VmRSS when it started listening (Node
 * itself and the TypeScript loader: ~100 MiB before any client).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { copyFileSync, existsSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { RawNbdClient, negotiate } from "../test/unit/nbd-raw-client.ts";
import { GiB, MiB, withScratchDir } from "./fixtures/images.ts";
import { printRows, row, SNAPSTACK_BIN, type BenchRow } from "./fixtures/rows.ts";
import { median, runOrder, runTool } from "./fixtures/tools.ts";
import { processCpuSeconds, processMemoryBytes } from "./fixtures/proc-stats.ts";

const RUNS = 5;
const RUNTIME_S = 3;
const IDLE_CONNECTIONS = 64;

type ServerKind = "snapstack" | "qemu-nbd" | "nbdkit";

interface Server {
  kind: ServerKind;
  child: ChildProcess;
  socket: string;
  uri: string;
}

/** A server's processes: itself and its children (snapstack's data workers). */
function serverPids(pid: number): number[] {
  let children: number[] = [];
  try {
    children = readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    // no children file: the process alone
  }
  return [pid, ...children];
}

/** User + system CPU seconds of a server so far, all threads and worker processes. */
function cpuSeconds(pid: number): number {
  let total = 0;
  for (const one of serverPids(pid)) {
    try {
      total += processCpuSeconds(one);
    } catch {
      // a worker that just exited
    }
  }
  return total;
}

async function waitFor(check: () => boolean, what: string, child: ChildProcess): Promise<void> {
  for (let i = 0; i < 750; i++) {
    if (check()) return;
    if (child.exitCode !== null) throw new Error(`${what}: exited ${child.exitCode}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  throw new Error(`${what}: not ready after 15 s`);
}

async function startServer(kind: ServerKind, dir: string, image: string, format: "raw" | "qcow2", readOnly: boolean, shared = "4"): Promise<Server> {
  const socket = join(dir, `${kind}-${Math.random().toString(36).slice(2, 8)}.sock`);
  const pidFile = `${socket}.pid`;
  const ro = readOnly ? ["-r"] : [];
  let child: ChildProcess;
  if (kind === "snapstack") {
    child = spawn(process.execPath, [SNAPSTACK_BIN, "nbd", "-t", "-e", shared, "-f", format, ...ro, "-k", socket, `--pid-file=${pidFile}`, image], { stdio: "ignore" });
  } else if (kind === "qemu-nbd") {
    child = spawn("qemu-nbd", ["-t", "-e", shared, "-f", format, ...ro, "-k", socket, `--pid-file=${pidFile}`, image], { stdio: "ignore" });
  } else {
    child = spawn("nbdkit", ["-f", ...ro, "-U", socket, "-P", pidFile, "file", image], { stdio: "ignore" });
  }
  await waitFor(() => existsSync(pidFile) && existsSync(socket), kind, child);
  return { kind, child, socket, uri: `nbd+unix:///?socket=${socket}` };
}

async function stopServer(server: Server): Promise<void> {
  if (server.child.exitCode !== null) return;
  const exited = new Promise((resolve) => server.child.once("exit", resolve));
  server.child.kill("SIGTERM");
  await exited;
}

interface FioResult {
  mibPerSecond: number;
  iops: number;
}

async function fio(uri: string, rw: string, blockSize: string): Promise<FioResult> {
  const out = await runTool("fio", [
    "--name=bench",
    "--ioengine=nbd",
    `--uri=${uri}`,
    `--rw=${rw}`,
    `--bs=${blockSize}`,
    "--iodepth=16",
    "--size=1G",
    "--time_based",
    `--runtime=${RUNTIME_S}`,
    "--output-format=json",
  ]);
  const job = (JSON.parse(out.slice(out.indexOf("{"))) as { jobs: Array<{ read: { bw: number; iops: number }; write: { bw: number; iops: number } }> }).jobs[0];
  const side = rw.includes("write") ? job.write : job.read;
  return { mibPerSecond: side.bw / 1024, iops: side.iops };
}

/** Figures of one server over the runs of one workload. */
interface Figures {
  values: number[];
  /** Server CPU per unit of work (ms per GiB or us per request). */
  cpu: number[];
}

function cpuNote(kinds: ServerKind[], figures: Map<ServerKind, Figures>, unit: string): string {
  return `server CPU ${kinds.map((kind) => `${kind} ${median(figures.get(kind)!.cpu).toFixed(0)}`).join(", ")} ${unit}`;
}

async function nbdcopySeconds(args: string[]): Promise<number> {
  const started = performance.now();
  await runTool("nbdcopy", args);
  return (performance.now() - started) / 1000;
}

/** Sum over the server's processes (snapstack's data workers included). */
function vmStatusBytes(pid: number, field: "VmRSS" | "VmHWM"): number {
  let total = 0;
  for (const one of serverPids(pid)) {
    total += processMemoryBytes(one, field);
  }
  return total;
}

interface Fixture {
  label: string;
  format: "raw" | "qcow2";
  /** Image served read-only. */
  image: string;
  /** Makes a fresh writable copy for one server's write runs. */
  writableCopy(tag: string): string;
  peer: ServerKind;
  target: number;
}

const WORKLOADS: Array<{ name: string; rw: string; bs: string; unit: "MiB/s" | "IOPS"; writes: boolean }> = [
  { name: "seq read 1 MiB", rw: "read", bs: "1M", unit: "MiB/s", writes: false },
  { name: "rand read 4 KiB", rw: "randread", bs: "4k", unit: "IOPS", writes: false },
  { name: "seq write 1 MiB", rw: "write", bs: "1M", unit: "MiB/s", writes: true },
  { name: "rand write 4 KiB", rw: "randwrite", bs: "4k", unit: "IOPS", writes: true },
];

async function fixtureRows(dir: string, fixture: Fixture, rawSource: string): Promise<BenchRow[]> {
  const rows: BenchRow[] = [];
  const kinds: ServerKind[] = ["snapstack", fixture.peer];
  const readers = new Map<ServerKind, Server>();
  for (const kind of kinds) readers.set(kind, await startServer(kind, dir, fixture.image, fixture.format, true));
  const writers = new Map<ServerKind, Server>();
  for (const kind of kinds) writers.set(kind, await startServer(kind, dir, fixture.writableCopy(kind), fixture.format, false));
  const ourIdleRss = vmStatusBytes(readers.get("snapstack")!.child.pid!, "VmRSS");
  const emptyFigures = (): Map<ServerKind, Figures> => new Map(kinds.map((kind) => [kind, { values: [], cpu: [] }]));
  try {
    for (const workload of WORKLOADS) {
      const figures = emptyFigures();
      for (let run = 0; run < RUNS; run++) {
        for (const kind of runOrder(run, kinds)) {
          const server = (workload.writes ? writers : readers).get(kind)!;
          const cpuBefore = cpuSeconds(server.child.pid!);
          const result = await fio(server.uri, workload.rw, workload.bs);
          const cpu = cpuSeconds(server.child.pid!) - cpuBefore;
          const figure = figures.get(kind)!;
          figure.values.push(workload.unit === "IOPS" ? result.iops : result.mibPerSecond);
          figure.cpu.push(workload.unit === "IOPS" ? (cpu * 1e6) / (result.iops * RUNTIME_S) : (cpu * 1e3 * 1024) / (result.mibPerSecond * RUNTIME_S));
        }
      }
      const ours = median(figures.get("snapstack")!.values);
      const theirs = median(figures.get(fixture.peer)!.values);
      const runs = kinds.map((kind) => `${kind} ${figures.get(kind)!.values.map((v) => v.toFixed(0)).join("/")}`).join(", ");
      const cpu = cpuNote(kinds, figures, workload.unit === "IOPS" ? "us/request" : "ms/GiB");
      const notes = `fio nbd iodepth 16, ${RUNTIME_S} s x ${RUNS}, median; runs ${runs}; ${cpu}; target ratio >= ${fixture.target}`;
      rows.push(row(`nbd ${fixture.label} fio ${workload.name} vs ${fixture.peer}`, ours, theirs, workload.unit, notes));
    }
    // nbdcopy: whole export to null: (reads), raw file into the export (writes).
    for (const direction of ["read", "write"] as const) {
      const figures = emptyFigures();
      for (let run = 0; run < RUNS; run++) {
        for (const kind of runOrder(run, kinds)) {
          const server = (direction === "read" ? readers : writers).get(kind)!;
          const args = direction === "read" ? [server.uri, "null:"] : [rawSource, server.uri];
          const cpuBefore = cpuSeconds(server.child.pid!);
          const seconds = await nbdcopySeconds(args);
          const figure = figures.get(kind)!;
          figure.values.push(GiB / MiB / seconds);
          figure.cpu.push((cpuSeconds(server.child.pid!) - cpuBefore) * 1e3);
        }
      }
      const ours = median(figures.get("snapstack")!.values);
      const theirs = median(figures.get(fixture.peer)!.values);
      const what = direction === "read" ? "export -> null:" : "raw file -> export";
      const notes = `1 GiB, wall clock, median of ${RUNS}; ${cpuNote(kinds, figures, "ms/GiB")}; target ratio >= ${fixture.target}`;
      rows.push(row(`nbd ${fixture.label} nbdcopy ${what} vs ${fixture.peer}`, ours, theirs, "MiB/s", notes));
    }
    const ourWriter = writers.get("snapstack")!;
    const peerWriter = writers.get(fixture.peer)!;
    rows.push(
      row(
        `nbd ${fixture.label} server peak RSS under load vs ${fixture.peer}`,
        vmStatusBytes(ourWriter.child.pid!, "VmHWM") / MiB,
        vmStatusBytes(peerWriter.child.pid!, "VmHWM") / MiB,
        "MiB",
        `VmHWM after the write workloads (16 x 1 MiB in flight); snapstack's VmRSS before any client ${(ourIdleRss / MiB).toFixed(0)} MiB; lower is better`,
      ),
    );
  } finally {
    for (const server of [...readers.values(), ...writers.values()]) await stopServer(server);
  }
  return rows;
}

/** RSS growth per idle negotiated connection. */
async function idleConnectionBytes(dir: string, kind: ServerKind, image: string): Promise<number> {
  const server = await startServer(kind, dir, image, "qcow2", true, "0");
  const clients: RawNbdClient[] = [];
  try {
    // Warm up one connection so lazily loaded code is not counted.
    const warm = await RawNbdClient.connect({ path: server.socket });
    clients.push(warm);
    await negotiate(warm);
    await new Promise((resolve) => setTimeout(resolve, 300));
    const before = vmStatusBytes(server.child.pid!, "VmRSS");
    for (let i = 0; i < IDLE_CONNECTIONS; i++) {
      const client = await RawNbdClient.connect({ path: server.socket });
      clients.push(client);
      await negotiate(client, { contexts: ["base:allocation"] });
    }
    await new Promise((resolve) => setTimeout(resolve, 300));
    return (vmStatusBytes(server.child.pid!, "VmRSS") - before) / IDLE_CONNECTIONS;
  } finally {
    for (const client of clients) client.close();
    await stopServer(server);
  }
}

export default async function nbdBench(): Promise<BenchRow[]> {
  return withScratchDir("nbd", async (dir) => {
    const base = join(dir, "base.qcow2");
    const top = join(dir, "top.qcow2");
    const raw = join(dir, "disk.raw");
    await runTool("qemu-img", ["create", "-q", "-f", "qcow2", base, "1G"]);
    await runTool("qemu-io", ["-f", "qcow2", "-c", "write -q -P 0x11 0 1G", base]);
    await runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top]);
    const overlayWrites: string[] = [];
    for (let mib = 0; mib < 1024; mib += 4) overlayWrites.push("-c", `write -q -P 0x22 ${mib}M 1M`);
    await runTool("qemu-io", ["-f", "qcow2", ...overlayWrites, top]);
    await runTool("dd", ["if=/dev/urandom", `of=${raw}`, "bs=1M", "count=1024", "status=none"]);
    const copies: string[] = [];
    const copy = (source: string, tag: string): string => {
      const path = `${source}.${tag}`;
      copyFileSync(source, path);
      copies.push(path);
      return path;
    };
    const rows: BenchRow[] = [];
    rows.push(
      ...(await fixtureRows(dir, { label: "qcow2 chain", format: "qcow2", image: top, writableCopy: (tag) => copy(top, tag), peer: "qemu-nbd", target: 1 }, raw)),
    );
    for (const path of copies.splice(0)) rmSync(path, { force: true });
    rows.push(...(await fixtureRows(dir, { label: "raw file", format: "raw", image: raw, writableCopy: (tag) => copy(raw, tag), peer: "nbdkit", target: 0.8 }, raw)));
    const ours = await idleConnectionBytes(dir, "snapstack", top);
    const theirs = await idleConnectionBytes(dir, "qemu-nbd", top);
    rows.push(row("nbd memory per idle connection vs qemu-nbd", ours / 1024, theirs / 1024, "KiB", `VmRSS growth over ${IDLE_CONNECTIONS} negotiated idle connections / ${IDLE_CONNECTIONS}; lower is better`));
    return rows;
  });
}

if (import.meta.main) printRows(import.meta.filename, await nbdBench());
