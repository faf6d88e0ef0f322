/**
 * The daemon's machine manager: the store, the QEMU processes, the NBD
 * exports their disks use, and every operation on a machine, serialized
 * per machine.
 *
 * Design notes
 * - States of a machine: stopped | running, plus "crashed" for a QEMU that
 *   exited without being asked (its exit and stderr kept for `status`).
 *   Each entry point says which it accepts; a wrong one is a coded error
 *   naming the state (E_IN_USE for "already running", E_USAGE otherwise).
 * - One mutex per machine: two clients acting on one machine are
 *   serialized, never interleaved. Clone also takes the source's mutex.
 * - A running machine: its top layer's chain is opened in this process and
 *   served by an NbdServer on a Unix socket in its run directory; QEMU
 *   reads and writes its disk only through it (QemuProcess, qemu-args.ts).
 * - Live snapshot: create the new overlay naming the top as its backing
 *   (not opened, so the guest may still write) -> QMP stop (QEMU drains
 *   and flushes guest I/O) -> flush the export (the top is now the
 *   snapshot's frozen layer) -> open the new chain and swap the export onto
 *   it -> [disk-only: resume here; the old chain is closed after] -> save the VM state to the snapshot's
 *   state file (through a .partial name, renamed when complete) -> resume.
 *   The journal is written before and committed after, so a kill in
 *   between is finished at the next start (a snapshot whose state did not
 *   complete becomes disk-only).
 * - Revert: QEMU is killed (its state is being discarded), the export
 *   closed, the old top discarded (wiped with --wipe) and a new empty top
 *   created on the snapshot's layer; the snapshot's configuration becomes
 *   the machine's; with VM state QEMU starts from it (incoming migration)
 *   and resumes; a disk-only snapshot boots from its disk if the machine
 *   was running.
 * - Delete while running: steps that do not touch the top run while the
 *   guest runs (they only change frozen layers below it; the open chain
 *   keeps reading correct data through its open files); then the guest is
 *   paused for a moment while the export is moved to a placeholder, the
 *   chain closed and reopened, and moved back. When the plan must merge
 *   into the top itself (deleting the snapshot the VM currently runs on),
 *   the whole plan runs inside that pause: the pause then follows the
 *   deleted snapshot's own data, not the disk size. (Not done: merging
 *   into the live top while the guest writes.)
 * - Startup: every machine's journal is replayed, and a QEMU left running
 *   by a killed daemon (pid file in the run directory) is killed: its
 *   disk was served by the dead daemon and cannot continue.
 */
import { createHash } from "node:crypto";
import { closeSync, existsSync, fstatSync, openSync, readFileSync, readSync, renameSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SnapstackError, isSnapstackError } from "../../base/errors.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { openImage } from "../../chain/open-image.ts";
import { NbdServer } from "../../nbd/nbd-server.ts";
import { NbdExport } from "../../nbd/nbd-export.ts";
import { QemuProcess, type QemuExit } from "../runtime/qemu-process.ts";
import { runFilePaths, SUN_PATH_BYTES_MAX } from "../runtime/qemu-args.ts";
import { syncDirectorySync, writeJsonAtomic } from "../store/atomic-file.ts";
import { executeSteps, stepPath } from "../store/layer-steps.ts";
import type { MachineStore} from "../store/machine-store.ts";
import { type MachineConfig } from "../store/machine-store.ts";
import { findSnapshot, planDelete, type LayerStep, type SnapshotRecord, type TreeRecord } from "../tree/snapshot-tree.ts";
import { DeferredDevice } from "./deferred-device.ts";
import {
  cloneMachine,
  createMachine,
  deleteSnapshotStopped,
  describeTree,
  diffSnapshots,
  prepareSnapshot,
  removeStopped,
  revertStopped,
  sizeOfIn,
  snapshotStopped,
  type CreateMachineRequest,
  type DeleteResult,
  type OperationOptions,
  type TreeView,
} from "./machine-operations.ts";

/** The export name of a machine's disk on its NBD socket. */
export const DISK_EXPORT_NAME = "disk0";
/** Most serial log bytes `log` returns. */
export const LOG_BYTES_MAX = 4 * 1024 * 1024;
const NBD_SOCKET_NAME = "nbd.sock";

export type MachineState = "stopped" | "running" | "crashed";

export interface MachineStatus {
  name: string;
  state: MachineState;
  pid: number | null;
  accelerator: string | null;
  startedAt: string | null;
  config: MachineConfig;
  currentSnapshot: string | null;
  snapshotCount: number;
  lastExit: (QemuExit & { at: string }) | null;
}

interface RunningMachine {
  process: QemuProcess;
  server: NbdServer;
  export: NbdExport;
  device: BlockDevice;
  runDir: string;
  startedAt: string;
  stopping: boolean;
}

/** Timings of a live snapshot, for the bench and the API. */
export interface SnapshotTimings {
  pausedMs: number;
  totalMs: number;
  stateBytes: number;
}

class KeyedMutex {
  #tails = new Map<string, Promise<void>>();

  async run<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.#tails.get(key) ?? Promise.resolve();
    let release!: () => void;
    const tail = new Promise<void>((resolve) => (release = resolve));
    this.#tails.set(key, tail);
    await previous;
    try {
      return await fn();
    } finally {
      release();
      if (this.#tails.get(key) === tail) this.#tails.delete(key);
    }
  }
}

function stateNotRunning(name: string, action: string): SnapstackError {
  return new SnapstackError("E_USAGE", `machine '${name}' is not running: cannot ${action}`, { machine: name, state: "stopped" });
}

export class MachineManager {
  readonly store: MachineStore;
  #mutex = new KeyedMutex();
  #running = new Map<string, RunningMachine>();
  #lastExit = new Map<string, QemuExit & { at: string }>();
  #log: (line: string) => void;

  constructor(store: MachineStore, options: { log?: (line: string) => void } = {}) {
    this.store = store;
    this.#log = options.log ?? (() => {});
  }

  /** Replay journals and kill QEMUs orphaned by a killed daemon. */
  async init(): Promise<void> {
    for (const name of this.store.list()) {
      killOrphan(this.runDir(name), this.#log);
      const finished = await this.store.recover(name);
      if (finished !== null) this.#log(`machine ${name}: finished interrupted ${finished}`);
    }
  }

  /** A run directory whose socket paths fit sun_path: the machine's own, or a short one under /tmp. */
  runDir(name: string): string {
    const own = this.store.runDir(name);
    const longest = Math.max(...Object.values(runFilePaths(own)).map((path) => Buffer.byteLength(path)), Buffer.byteLength(join(own, NBD_SOCKET_NAME)));
    if (longest <= SUN_PATH_BYTES_MAX) return own;
    const hash = createHash("sha256").update(own).digest("hex").slice(0, 16);
    return join(tmpdir(), `snapstack-${process.getuid?.() ?? 0}`, hash);
  }

  serialLogPath(name: string): string {
    return join(this.store.machineDir(name), "serial.log");
  }

  #withMachine<T>(name: string, fn: () => Promise<T>): Promise<T> {
    return this.#mutex.run(name, async () => {
      this.store.require(name);
      return fn();
    });
  }

  // ------------------------------------------------------------ queries

  list(): MachineStatus[] {
    return this.store.list().map((name) => this.status(name));
  }

  status(name: string): MachineStatus {
    const config = this.store.loadConfig(name);
    const tree = this.store.loadTree(name);
    const running = this.#running.get(name);
    const lastExit = this.#lastExit.get(name) ?? null;
    return {
      name,
      state: running !== undefined ? "running" : lastExit !== null && lastExit.code !== 0 && lastExit.signal === null ? "crashed" : "stopped",
      pid: running?.process.pid ?? null,
      accelerator: running?.process.accelerator ?? null,
      startedAt: running?.startedAt ?? null,
      config,
      currentSnapshot: tree.current.snapshot === null ? null : tree.snapshots[tree.current.snapshot].name,
      snapshotCount: Object.keys(tree.snapshots).length,
      lastExit,
    };
  }

  snapshots(name: string): TreeView {
    return describeTree(this.store, name);
  }

  /** The tail of the serial console log. */
  log(name: string, bytes = 64 * 1024): string {
    this.store.require(name);
    const path = this.serialLogPath(name);
    if (!existsSync(path)) return "";
    const fd = openSync(path, "r");
    try {
      const size = fstatSync(fd).size;
      const length = Math.min(size, Math.max(0, Math.min(bytes, LOG_BYTES_MAX)));
      const buffer = Buffer.alloc(length);
      readSync(fd, buffer, 0, length, size - length);
      return buffer.toString("utf8");
    } finally {
      closeSync(fd);
    }
  }

  isRunning(name: string): boolean {
    return this.#running.has(name);
  }

  /** The serial console socket of a running machine (tests type on it). */
  serialSocketPath(name: string): string {
    const running = this.#running.get(name);
    if (running === undefined) throw stateNotRunning(name, "open the serial console");
    return running.process.serialSocketPath;
  }

  // ------------------------------------------------------------ lifecycle

  create(request: CreateMachineRequest): Promise<MachineConfig> {
    return this.#mutex.run(request.name, () => createMachine(this.store, request));
  }

  start(name: string): Promise<MachineStatus> {
    return this.#withMachine(name, async () => {
      if (this.#running.has(name)) throw new SnapstackError("E_IN_USE", `machine '${name}' is already running`, { machine: name, state: "running" });
      await this.#start(name, null);
      return this.status(name);
    });
  }

  stop(name: string, options: { force?: boolean } = {}): Promise<MachineStatus> {
    return this.#withMachine(name, async () => {
      if (!this.#running.has(name)) throw stateNotRunning(name, "stop it");
      await this.#stop(name, options.force ?? false);
      return this.status(name);
    });
  }

  remove(name: string, options: OperationOptions = {}): Promise<{ freedBytes: number }> {
    return this.#withMachine(name, async () => {
      if (this.#running.has(name)) await this.#stop(name, true);
      const config = this.store.loadConfig(name);
      const remove = (): Promise<{ freedBytes: number }> => removeStopped(this.store, name, options);
      // Removing a clone changes its source's tree: take the source's mutex too.
      const result = config.cloneOf !== null && config.cloneOf.machine !== name ? await this.#mutex.run(config.cloneOf.machine, remove) : await remove();
      this.#lastExit.delete(name);
      return result;
    });
  }

  async #start(name: string, incomingStatePath: string | null): Promise<void> {
    const config = this.store.loadConfig(name);
    const tree = this.store.loadTree(name);
    const dir = this.store.machineDir(name);
    const runDir = this.runDir(name);
    const device = await openImage(stepPath(dir, tree.layers[tree.current.layer].file));
    const server = new NbdServer({ log: (line) => this.#log(`machine ${name} nbd: ${line}`) });
    const diskExport = new NbdExport({ name: DISK_EXPORT_NAME, device });
    server.addExport(diskExport);
    try {
      const { mkdirSync } = await import("node:fs");
      mkdirSync(runDir, { recursive: true, mode: 0o700 });
      const socketPath = join(runDir, NBD_SOCKET_NAME);
      rmSync(socketPath, { force: true });
      await server.listen({ path: socketPath });
      const process = await QemuProcess.start({
        name,
        memoryBytes: config.memoryBytes,
        cpus: config.cpus,
        disks: [{ nbdSocketPath: socketPath, exportName: DISK_EXPORT_NAME }],
        kernelPath: config.kernel ?? undefined,
        initrdPath: config.initrd ?? undefined,
        append: config.append ?? undefined,
        cdromPath: config.cdrom ?? undefined,
        // Workaround: with -kernel QEMU's linuxboot ROM takes bootindex 0, which qemu-args.ts
        // also gives the first disk unless the CD-ROM comes first (reported to the runtime's owner).
        bootFrom: config.kernel !== null ? "cdrom" : undefined,
        extraArgs: config.extraArgs,
        runDir,
        serialLogPath: this.serialLogPath(name),
        incomingStatePath: incomingStatePath ?? undefined,
      });
      const running: RunningMachine = { process, server, export: diskExport, device, runDir, startedAt: new Date().toISOString(), stopping: false };
      this.#running.set(name, running);
      this.#lastExit.delete(name);
      void process.exited.then((exit) => this.#exited(name, running, exit));
      if (incomingStatePath !== null) await process.resume();
      this.#log(`machine ${name}: started (pid ${process.pid}, ${process.accelerator})`);
    } catch (error) {
      const running = this.#running.get(name);
      if (running !== undefined) {
        this.#running.delete(name);
        await running.process.kill();
      }
      await server.close();
      await diskExport.device.close();
      throw error;
    }
  }

  /** QEMU went away: if nobody asked, keep its exit for `status` and release the disk. */
  async #exited(name: string, running: RunningMachine, exit: QemuExit): Promise<void> {
    if (running.stopping || this.#running.get(name) !== running) return;
    await this.#mutex.run(name, async () => {
      if (running.stopping || this.#running.get(name) !== running) return;
      this.#log(`machine ${name}: QEMU exited unexpectedly (code ${exit.code}, signal ${exit.signal}): ${exit.stderr.trim()}`);
      this.#lastExit.set(name, { ...exit, at: new Date().toISOString() });
      this.#running.delete(name);
      await running.server.close();
      await running.export.device.close();
    });
  }

  async #stop(name: string, force: boolean): Promise<void> {
    const running = this.#running.get(name)!;
    running.stopping = true;
    const exit = force ? await running.process.kill() : await running.process.quit();
    this.#running.delete(name);
    await running.server.close();
    await running.export.device.close();
    this.#lastExit.set(name, { ...exit, code: force ? exit.code : 0, at: new Date().toISOString() });
  }

  /** Stop serving every machine (daemon shutdown): QEMUs are quit. */
  async shutdown(): Promise<void> {
    for (const name of [...this.#running.keys()]) {
      await this.#mutex.run(name, async () => {
        if (this.#running.has(name)) await this.#stop(name, false);
      });
    }
  }

  // ------------------------------------------------------------ snapshots

  snapshot(name: string, input: { snapshot: string; description?: string; diskOnly?: boolean }): Promise<{ snapshot: SnapshotRecord; timings: SnapshotTimings }> {
    return this.#withMachine(name, async () => {
      const started = performance.now();
      const running = this.#running.get(name);
      if (running === undefined) {
        const snapshot = await snapshotStopped(this.store, name, input);
        return { snapshot, timings: { pausedMs: 0, totalMs: performance.now() - started, stateBytes: 0 } };
      }
      return this.#liveSnapshot(name, running, input, started);
    });
  }

  async #liveSnapshot(name: string, running: RunningMachine, input: { snapshot: string; description?: string; diskOnly?: boolean }, started: number) {
    const diskOnly = input.diskOnly ?? false;
    const plan = prepareSnapshot(this.store, name, input, !diskOnly);
    const dir = this.store.machineDir(name);
    this.store.beginJournal(name, "snapshot", plan);
    const newTop = plan.tree.layers[plan.tree.current.layer];
    let pausedMs = 0;
    let stateBytes = 0;
    // The new overlay names the top as backing without opening it: create it before pausing.
    await executeSteps(dir, plan.steps);
    const pausedAt = performance.now();
    await running.process.pause();
    let resumed = false;
    const resume = async (): Promise<void> => {
      if (resumed) return;
      resumed = true;
      await running.process.resume();
      pausedMs = performance.now() - pausedAt;
    };
    let swapped = false;
    try {
      await running.export.flush();
      const device = await openImage(stepPath(dir, newTop.file));
      const old = await running.export.swapDevice(device);
      swapped = true;
      if (diskOnly) await resume();
      await old.close();
      if (!diskOnly) {
        const statePath = join(this.store.snapshotDir(name, plan.snapshot.id), "state.bin");
        const partial = `${statePath}.partial`;
        stateBytes = (await running.process.saveState(partial)).sizeBytes;
        renameSync(partial, statePath);
        syncDirectorySync(this.store.snapshotDir(name, plan.snapshot.id));
        await resume();
      }
      this.store.commitJournal(name, plan.tree);
    } catch (error) {
      await resume().catch(() => {});
      if (swapped) {
        // The disk layer is taken: keep the snapshot (disk-only when its state did not complete).
        this.store.commitJournal(name, plan.tree);
      } else {
        rmSync(stepPath(dir, newTop.file), { force: true });
        rmSync(this.store.snapshotDir(name, plan.snapshot.id), { recursive: true, force: true });
        rmSync(this.store.journalPath(name), { force: true });
      }
      throw error;
    }
    return { snapshot: plan.snapshot, timings: { pausedMs, totalMs: performance.now() - started, stateBytes } };
  }

  revert(name: string, snapshotName: string, options: OperationOptions = {}): Promise<{ snapshot: SnapshotRecord; freedBytes: number; state: MachineState; totalMs: number }> {
    return this.#withMachine(name, async () => {
      const started = performance.now();
      const target = findSnapshot(this.store.loadTree(name), snapshotName);
      const statePath = join(this.store.snapshotDir(name, target.id), "state.bin");
      if (target.hasState && (!existsSync(statePath) || statSync(statePath).size === 0)) {
        throw new SnapstackError("E_NOT_FOUND", `snapshot '${target.name}' of machine '${name}': its VM state file ${statePath} is missing or empty`, { machine: name, snapshot: target.name, path: statePath });
      }
      const wasRunning = this.#running.has(name);
      if (wasRunning) await this.#stop(name, true);
      const result = await revertStopped(this.store, name, snapshotName, options);
      const snapshotConfig = join(this.store.snapshotDir(name, target.id), "config.json");
      if (existsSync(snapshotConfig)) {
        const config = JSON.parse(readFileSync(snapshotConfig, "utf8")) as MachineConfig;
        writeJsonAtomic(join(this.store.machineDir(name), "config.json"), { ...config, name, cloneOf: this.store.loadConfig(name).cloneOf });
      }
      if (target.hasState) await this.#start(name, statePath);
      else if (wasRunning) await this.#start(name, null);
      return { snapshot: result.snapshot, freedBytes: result.freedBytes, state: this.#running.has(name) ? "running" : "stopped", totalMs: performance.now() - started };
    });
  }

  deleteSnapshot(name: string, snapshotName: string, options: OperationOptions = {}): Promise<DeleteResult & { pausedMs: number }> {
    return this.#withMachine(name, async () => {
      const running = this.#running.get(name);
      if (running === undefined) return { ...(await deleteSnapshotStopped(this.store, name, snapshotName, options)), pausedMs: 0 };
      const dir = this.store.machineDir(name);
      const tree = this.store.loadTree(name);
      const plan = planDelete(tree, snapshotName, sizeOfIn(dir), { running: true });
      const topFile = tree.layers[tree.current.layer].file;
      const touchesTop = plan.steps.some((step) => stepTouches(step, topFile));
      this.store.beginJournal(name, "delete-snapshot", plan, options.wipe ?? false);
      let result = { mergedBytes: 0, freedBytes: 0 };
      if (!touchesTop) result = await executeSteps(dir, plan.steps, options);
      const pausedMs = await this.#reopenPaused(name, running, plan.tree, async () => {
        if (touchesTop) result = await executeSteps(dir, plan.steps, options);
      });
      this.store.commitJournal(name, plan.tree);
      return { snapshot: plan.snapshot, ...result, pausedMs };
    });
  }

  /** Pause the guest, close the top's chain, run `work`, reopen the chain from `tree`, resume. */
  async #reopenPaused(name: string, running: RunningMachine, tree: TreeRecord, work: () => Promise<void>): Promise<number> {
    const dir = this.store.machineDir(name);
    const pausedAt = performance.now();
    await running.process.pause();
    try {
      const placeholder = new DeferredDevice(`${name} (reopening)`, running.export.sizeBytes);
      const old = await running.export.swapDevice(placeholder);
      await old.close();
      try {
        await work();
      } finally {
        const device = await openImage(stepPath(dir, tree.layers[tree.current.layer].file));
        placeholder.install(device);
        await running.export.swapDevice(device);
      }
    } finally {
      await running.process.resume();
    }
    return performance.now() - pausedAt;
  }

  diff(name: string, from: string, to: string, options: OperationOptions = {}) {
    return this.#withMachine(name, async () => {
      if (this.#running.has(name) && (from === "current" || to === "current")) {
        throw new SnapstackError("E_IN_USE", `machine '${name}' is running: its current disk cannot be compared; take a snapshot first`, { machine: name });
      }
      return diffSnapshots(this.store, name, from, to, options);
    });
  }

  clone(name: string, snapshotName: string, newName: string): Promise<MachineConfig> {
    return this.#withMachine(name, () => this.#mutex.run(newName, () => cloneMachine(this.store, name, snapshotName, newName)));
  }
}

function stepTouches(step: LayerStep, file: string): boolean {
  switch (step.kind) {
    case "stream":
      return step.intoFile === file || step.fromFile === file;
    case "commit":
      return step.fromFile === file || step.intoFile === file;
    case "rebase-unsafe":
    case "remove-layer":
    case "create-overlay":
      return step.file === file;
    case "remove-snapshot-files":
      return false;
  }
}

/** Kill a QEMU whose pid file a killed daemon left behind (only if it is a QEMU). */
function killOrphan(runDir: string, log: (line: string) => void): void {
  const pidFile = runFilePaths(runDir).pidFile;
  if (!existsSync(pidFile)) return;
  const pid = Number(readFileSync(pidFile, "utf8").trim());
  rmSync(pidFile, { force: true });
  if (!Number.isSafeInteger(pid) || pid <= 1) return;
  try {
    const commandLine = readFileSync(`/proc/${pid}/cmdline`, "utf8");
    if (!commandLine.includes("qemu-system") || !commandLine.includes(runDir)) return;
    process.kill(pid, "SIGKILL");
    log(`killed QEMU ${pid} left running by a previous daemon (${runDir})`);
  } catch (error) {
    if (!isSnapstackError(error)) return;
  }
}
