/**
 * Helpers for tests of the VM daemon as a separate process: start
 * `snapstack serve` as a child and SIGKILL it, run `snapstack vm`, read a
 * machine's layers from the store, check them with qemu-img, and find the
 * QEMU processes of a store (none may outlive their daemon's successor).
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import type { TestContext } from "node:test";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { openImage } from "../../src/chain/open-image.ts";
import { ApiClient } from "../../src/api/api-client.ts";
import { MachineStore } from "../../src/vm/store/machine-store.ts";
import { stepPath } from "../../src/vm/store/layer-steps.ts";
import { MachineManager } from "../../src/vm/manager/machine-manager.ts";
import { runFilePaths } from "../../src/vm/runtime/qemu-args.ts";
import { GuestConsole } from "./guest-kit.ts";
import { run, runOk, scratchDir, type RunResult } from "./tools.ts";

export const SNAPSTACK_BIN = fileURLToPath(new URL("../../bin/snapstack", import.meta.url));

/** The environment of daemons and CLIs the tests start: TCG unless SNAPSTACK_ACCEL says otherwise. */
export function vmTestEnv(extra: Record<string, string | undefined> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, SNAPSTACK_ACCEL: process.env.SNAPSTACK_ACCEL ?? "tcg", ...extra };
  for (const key of Object.keys(env)) if (env[key] === undefined) delete env[key];
  return env;
}

/** `snapstack vm ARGS` as a process; never throws for a non-zero exit. */
export function vmCli(args: string[], env: NodeJS.ProcessEnv = vmTestEnv()): Promise<RunResult> {
  return run(process.execPath, [SNAPSTACK_BIN, "vm", ...args], { env, timeoutMs: 180_000 });
}

export interface ServedDaemon {
  child: ChildProcess;
  api: ApiClient;
  stderr(): string;
}

/** `snapstack serve --home HOME` as a child process, once it answers. */
export async function startServe(home: string): Promise<ServedDaemon> {
  const child = spawn(process.execPath, [SNAPSTACK_BIN, "serve", "--home", home], { stdio: ["ignore", "ignore", "pipe"], env: vmTestEnv() });
  let stderr = "";
  child.stderr!.on("data", (chunk) => (stderr += chunk));
  const api = new ApiClient(join(home, "daemon.sock"));
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`daemon exited: ${stderr}`);
    if (await api.alive().catch(() => false)) return { child, api, stderr: () => stderr };
    await sleep(25);
  }
  child.kill("SIGKILL");
  throw new Error(`daemon did not answer: ${stderr}`);
}

/** SIGKILL a child and wait until it is gone (reaped). */
export async function killChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((resolve) => child.once("exit", resolve));
  child.kill("SIGKILL");
  await gone;
}

/**
 * A store under a fresh scratch directory. Whatever runs on it (a daemon
 * the CLI started, its QEMUs) is stopped when the test ends, before the
 * directory is removed (after-hooks run in the order they were added; a
 * daemon outliving its store would recreate it, or run on forever).
 */
export function scratchStore(t: TestContext, prefix: string, machines: string[] = [], storeName = "store"): string {
  let home = "";
  t.after(async () => {
    await stopDaemonOf(home);
    for (const pid of qemuProcessesOf(home, machines)) process.kill(pid, "SIGKILL");
  });
  home = join(scratchDir(t, prefix), storeName);
  return home;
}

/** SIGTERM the daemon named by HOME/daemon.pid (one the CLI started) and wait until it is gone. */
export async function stopDaemonOf(home: string): Promise<void> {
  let pid: number;
  try {
    pid = Number(readFileSync(join(home, "daemon.pid"), "utf8").trim());
  } catch {
    return;
  }
  if (!processAlive(pid)) return;
  process.kill(pid, "SIGTERM");
  if (!(await waitGone(pid, 30_000))) process.kill(pid, "SIGKILL");
}

/** True while `pid` exists and is not a zombie. */
export function processAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0];
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

/** Wait until `pid` is gone; false after timeoutMs. */
export async function waitGone(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (processAlive(pid)) {
    if (Date.now() > deadline) return false;
    await sleep(20);
  }
  return true;
}

/** Live qemu-system processes whose command line names a path under `home` (or the machine run dirs of it). */
export function qemuProcessesOf(home: string, machines: string[] = []): number[] {
  const needles = [home];
  // (MachineStore creates its directory: not for a store already removed.)
  if (existsSync(home)) {
    const manager = new MachineManager(new MachineStore(home));
    needles.push(...machines.map((name) => manager.runDir(name)));
  }
  const pids: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    let commandLine: string;
    try {
      commandLine = readFileSync(`/proc/${entry}/cmdline`, "utf8");
    } catch {
      continue;
    }
    if (commandLine.includes("qemu-system") && needles.some((needle) => commandLine.includes(needle)) && processAlive(Number(entry))) pids.push(Number(entry));
  }
  return pids;
}

/** The guest console of a machine served by a daemon in another process. */
export function machineConsole(home: string, name: string): GuestConsole {
  const manager = new MachineManager(new MachineStore(home));
  return new GuestConsole(manager.serialLogPath(name), runFilePaths(manager.runDir(name)).serialSocket);
}

/**
 * The first counter the guest prints after a revert to a saved state.
 * `since` and `before` are the log's end and the last counter before the
 * revert. The old QEMU may print a few more counters after `since` before
 * it is killed; the restored one starts over from an earlier value, so
 * its first counter is the first not larger than the one before it.
 */
export async function counterAfterRestore(guestConsole: GuestConsole, since: number, before: number | null, timeoutMs = 60_000): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const counters = [...guestConsole.text(since).matchAll(/^COUNTER (\d+)$/gm)].map((match) => Number(match[1]));
    let previous = before ?? Number.MAX_SAFE_INTEGER;
    for (const counter of counters) {
      if (counter <= previous) return counter;
      previous = counter;
    }
    if (Date.now() > deadline) throw new Error(`no restored counter within ${timeoutMs} ms after a revert (counters since: ${counters.join(" ")})`);
    await sleep(50);
  }
}

/** Absolute path of a layer of a machine. */
export function layerPath(home: string, name: string, layerId: string): string {
  const store = new MachineStore(home);
  return stepPath(store.machineDir(name), store.loadTree(name).layers[layerId].file);
}

/** The whole virtual disk of an image (with its backing chain); `forceShare` reads beside a writer (qemu-img -U). */
export async function readDisk(path: string, options: { forceShare?: boolean } = {}): Promise<Buffer> {
  const device = await openImage(path, { readOnly: true, forceShare: options.forceShare });
  try {
    const buffer = Buffer.alloc(device.sizeBytes);
    await device.read(0, buffer);
    return buffer;
  } finally {
    await device.close();
  }
}

/** The disk a snapshot holds (its layer's chain). */
export function readSnapshotDisk(home: string, name: string, snapshot: string): Promise<Buffer> {
  const tree = new MachineStore(home).loadTree(name);
  const record = Object.values(tree.snapshots).find((candidate) => candidate.name === snapshot);
  assert.ok(record !== undefined, `machine ${name} has a snapshot ${snapshot}`);
  return readDisk(layerPath(home, name, record.layer));
}

/** The machine's current disk (its top layer's chain). */
export function readCurrentDisk(home: string, name: string): Promise<Buffer> {
  const tree = new MachineStore(home).loadTree(name);
  return readDisk(layerPath(home, name, tree.current.layer));
}

/** qemu-img check on every layer file of a machine; the files are exactly the tree's. */
export async function checkLayers(home: string, name: string): Promise<number> {
  const store = new MachineStore(home);
  const dir = store.machineDir(name);
  const tree = store.loadTree(name);
  const own = Object.values(tree.layers).filter((layer) => layer.external !== true);
  assert.deepEqual(readdirSync(join(dir, "layers")).sort(), own.map((layer) => layer.file.slice("layers/".length)).sort(), `machine ${name}: layer files are the tree's`);
  for (const layer of own) await runOk("qemu-img", ["check", stepPath(dir, layer.file)]);
  return own.length;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((wake) => setTimeout(wake, ms));
}
