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
 *   serialized, never interleaved. Clone (source and new name) and remove
 *   of a clone (it and its source) hold two, always taken in name order
 *   (KeyedMutex.runAll), so `clone A S B` and `remove B` cannot deadlock.
 * - Shutdown (the daemon stopping) lets the operations under way finish,
 *   refuses those still waiting, then quits every QEMU: none is left
 *   running without the NBD server its disks go through.
 * - Remove is refused while linked clones back onto the machine's layers
 *   (running or not), before it stops anything.
 * - A running machine: its top layer's chain is opened in this process and
 *   served by an NbdServer on a Unix socket in its run directory; QEMU
 *   reads and writes its disk only through it (QemuProcess, qemu-args.ts).
 * - Live snapshot: create the new overlay naming the top as its backing
 *   and open it on the export's current device (O(1); the chain below is
 *   the instance already serving the guest, and nothing reads through the
 *   new top before the swap). Then only the swap needs the guest stopped:
 *   - disk-only: QMP stop (QEMU drains and flushes guest I/O) -> swap the
 *     export onto the new top (flushes the old one, now the snapshot's
 *     frozen layer) -> cont;
 *   - with VM state: a live migration to the snapshot's state file (through
 *     a .partial name, renamed when complete). RAM is copied while the guest
 *     runs; at the switchover QEMU stops the guest (draining and flushing)
 *     and waits; the swap happens there, so disk, RAM and CPU are one
 *     instant; QEMU sends the rest and the guest resumes. A guest that is
 *     not "running" gets the old paused save (stop, swap, save, cont).
 *   The former top stays open below the new one (RunningMachine.held).
 *   The journal is written before and committed after, so a kill in
 *   between is finished at the next start (a snapshot whose state did not
 *   complete becomes disk-only).
 * - Revert: QEMU is killed (its state is being discarded), the export
 *   closed, the old top discarded (wiped with --wipe) and a new empty top
 *   created on the snapshot's layer; the snapshot's configuration becomes
 *   the machine's; with VM state QEMU starts from it (incoming migration)
 *   and resumes; a disk-only snapshot boots from its disk if the machine
 *   was running.
 * - Delete while running: when the plan changes only frozen layers below
 *   the top, it runs while the guest runs (the open chain keeps reading
 *   correct data through its own open files and caches: a stream only fills
 *   what a layer did not hold with what it already showed, a commit writes
 *   into a layer only under the one layer that shadows it); then the guest
 *   is paused for a moment while the export is moved to a placeholder, the
 *   chain closed and reopened, and moved back. Layers the plan removes
 *   are removed (wiped with --wipe) only after that: the old chain reads
 *   through them until it is closed, and a wipe zeroes a file in place.
 *   A running linked clone's chain is never reopened by its source's
 *   operations, so a --wipe that would remove a layer under a running
 *   clone's pinned layer is refused (E_IN_USE). When the plan changes the
 *   top itself (deleting the snapshot the VM runs on streams it into the
 *   top; a commit may rebase the top), the top is first frozen under a
 *   temporary layer (`L<n>.writes.qcow2`, opened on the served chain and
 *   swapped in during a stop/cont like a disk-only snapshot) that takes the
 *   guest's writes while the plan runs on the frozen top; the final pause
 *   commits that layer back into the top (cost: what the guest wrote during
 *   the merge) and reopens the chain. The journal holds the temporary
 *   layer's creation, the plan and the fold-back, so a replay after a kill
 *   keeps the guest's writes.
 * - Startup: every machine's journal is replayed, and a QEMU left running
 *   by a killed daemon (pid file in the run directory) is killed: its
 *   disk was served by the dead daemon and cannot continue.
 */
import { createHash } from "node:crypto";
import { closeSync, existsSync, fstatSync, openSync, readFileSync, readSync, renameSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SnapstackError, isSnapstackError } from "../../base/errors.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { lockLayerFile, openImage } from "../../chain/open-image.ts";
import { lockBits } from "../../io/qemu-locks.ts";
import { openNodeFile } from "../../io/node-file.ts";
import { openQcow2 } from "../../formats/qcow2/index.ts";
import { NbdServer } from "../../nbd/nbd-server.ts";
import { NbdExport } from "../../nbd/nbd-export.ts";
import { liveSaveSupported, QemuProcess, type QemuExit } from "../runtime/qemu-process.ts";
import { SUN_PATH_BYTES_MAX } from "../../io/user-socket-dir.ts";
import { runFilePaths } from "../runtime/qemu-args.ts";
import { acceleratorChoice } from "../runtime/accelerator.ts";
import { syncDirectorySync } from "../store/atomic-file.ts";
import { backsOnto, executeSteps, stepPath, type StepResult } from "../store/layer-steps.ts";
import { checkStateFile, recordStateSize, stateFilePath } from "../store/state-file.ts";
import type { MachineStore} from "../store/machine-store.ts";
import { type MachineConfig } from "../store/machine-store.ts";
import { LIVE_DISK_NAME } from "../store/names.ts";
import { expandForDisks, findSnapshot, layerFiles, planDelete, setPin, type LayerStep, type Plan, type SnapshotRecord, type TreeRecord } from "../tree/snapshot-tree.ts";
import { DeferredDevice } from "./deferred-device.ts";
import {
  cloneMachine,
  createMachine,
  deleteSnapshotStopped,
  describeTree,
  diffSnapshots,
  exportSnapshot,
  type ExportOptions,
  type ExportResult,
  prepareSnapshot,
  removeStopped,
  unpinStopped,
  revertStopped,
  sizeOfIn,
  snapshotStopped,
  type CreateMachineRequest,
  type DeleteResult,
  type DiffOptions,
  type OperationOptions,
  type TreeView,
} from "./machine-operations.ts";

/** The export name of a machine's first disk on its NBD socket (the others: diskExportName). */
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
  /** `unexpected`: QEMU went away without being asked (killed, crashed, or the guest powered off). */
  lastExit: (QemuExit & { at: string; unexpected: boolean }) | null;
}

/** One disk of a running machine: its NBD export and what it serves. */
export interface ServedDisk {
  export: NbdExport;
  /**
   * Former tops below the export's device, oldest first. A live snapshot
   * opens the new top on the running one (closeBacking false), so closing
   * the served chain means closing the export's device and then these,
   * newest first (closeChain).
   */
  held: BlockDevice[];
}

interface RunningMachine {
  process: QemuProcess;
  server: NbdServer;
  /** One per disk, in the tree's disk order (diskFile). */
  disks: ServedDisk[];
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

  /** The keys held or waited for right now. */
  busyKeys(): string[] {
    return [...this.#tails.keys()];
  }

  /** Hold several keys: taken in sorted order, so two callers can never wait on each other. */
  runAll<T>(keys: readonly string[], fn: () => Promise<T>): Promise<T> {
    const sorted = [...new Set(keys)].sort();
    const hold = (index: number): Promise<T> => (index === sorted.length ? fn() : this.run(sorted[index], () => hold(index + 1)));
    return hold(0);
  }
}

function stateNotRunning(name: string, action: string): SnapstackError {
  return new SnapstackError("E_USAGE", `machine '${name}' is not running: cannot ${action}`, { machine: name, state: "stopped" });
}

export class MachineManager {
  readonly store: MachineStore;
  #mutex = new KeyedMutex();
  #running = new Map<string, RunningMachine>();
  #lastExit = new Map<string, QemuExit & { at: string; unexpected: boolean }>();
  #log: (line: string) => void;
  #acceleratorLogged = false;
  /** Set by shutdown(): an operation not yet under way is refused, so none starts a QEMU after it. */
  #shuttingDown = false;

  constructor(store: MachineStore, options: { log?: (line: string) => void } = {}) {
    this.store = store;
    this.#log = options.log ?? (() => {});
  }

  /**
   * Replay journals and kill QEMUs orphaned by a killed daemon. A machine
   * whose interrupted operation cannot be finished now (the disk is full)
   * does not keep the daemon from serving the others: its next operation
   * tries again first (#finishInterrupted).
   */
  async init(): Promise<void> {
    for (const name of this.store.list()) {
      killOrphan(this.runDir(name), this.#log);
      try {
        const finished = await this.store.recover(name);
        if (finished !== null) this.#log(`machine ${name}: finished interrupted ${finished}`);
      } catch (error) {
        this.#log(`machine ${name}: cannot finish its interrupted ${this.store.pendingOperation(name) ?? "operation"} yet (${(error as Error).message}); retried at its next operation`);
      }
    }
    // What a kill between two steps of clone or remove left (no operation runs yet): a
    // half-made or half-removed machine directory, and a pin for a clone that does not
    // exist (pinned before the clone was made, or its directory removed before the unpin),
    // which would keep its layer and refuse the source's removal for ever.
    for (const leftover of this.store.removeLeftovers()) this.#log(`removed ${leftover}, left by an interrupted create or remove`);
    for (const name of this.store.list()) {
      if (this.store.hasJournal(name)) continue;
      for (const [layer, holders] of Object.entries(this.store.loadTree(name).pins)) {
        for (const clone of holders.filter((holder) => !this.store.has(holder))) {
          try {
            await unpinStopped(this.store, name, layer, clone);
            this.#log(`machine ${name}: released layer ${layer}, pinned for linked clone '${clone}', which does not exist`);
          } catch (error) {
            this.#log(`machine ${name}: cannot release layer ${layer} of missing clone '${clone}' yet (${(error as Error).message})`);
          }
        }
      }
    }
  }

  /**
   * An operation that failed part-way leaves its journal (the tree it was
   * making, and its steps): the machine's layers may already be part-way
   * there, so nothing else may run on the old tree, nor overwrite that
   * journal. On a stopped machine the journal is finished first (a step
   * that failed for lack of space succeeds once space is freed); on a
   * running one (a live operation that failed) only stop is let through,
   * and the next start finishes it.
   */
  async #finishInterrupted(name: string, allowRunning: boolean): Promise<void> {
    if (!this.store.has(name)) return;
    const operation = this.store.pendingOperation(name);
    if (operation === null) return;
    if (this.#running.has(name)) {
      if (allowRunning) return;
      throw new SnapstackError("E_IN_USE", `machine '${name}' has an unfinished ${operation}, finished with the machine stopped: stop it first`, { machine: name, operation });
    }
    try {
      await this.store.recover(name);
    } catch (error) {
      const code = isSnapstackError(error) ? error.code : "E_IO";
      throw new SnapstackError(code, `machine '${name}': cannot finish its interrupted ${operation} first: ${(error as Error).message}`, { machine: name, operation });
    }
    this.#log(`machine ${name}: finished interrupted ${operation}`);
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

  /**
   * Run a client's operation holding the machines `names` (KeyedMutex.runAll),
   * after their interrupted operations are finished; refused once shutdown()
   * began. `allowRunningJournal`: may run beside a running machine's
   * unfinished live operation (stop).
   */
  #operation<T>(names: readonly string[], fn: () => Promise<T>, allowRunningJournal = false): Promise<T> {
    return this.#mutex.runAll(names, async () => {
      if (this.#shuttingDown) throw new SnapstackError("E_ABORTED", "the snapstack daemon is shutting down", { machines: [...names] });
      for (const name of names) await this.#finishInterrupted(name, allowRunningJournal);
      return fn();
    });
  }

  #withMachine<T>(name: string, fn: () => Promise<T>, allowRunningJournal = false): Promise<T> {
    return this.#operation(
      [name],
      async () => {
        this.store.require(name);
        return fn();
      },
      allowRunningJournal,
    );
  }

  /**
   * Run `fn` holding the machine and, for a linked clone, its source: the
   * clone's chain reads the source's layers, which the source's own
   * operations merge and remove (diff, export).
   */
  #withChain<T>(name: string, fn: () => Promise<T>): Promise<T> {
    const sources = this.#sourcesOf(name);
    return this.#operation([name, ...sources], async () => {
      this.store.require(name);
      if (this.#sourcesOf(name).join("\0") !== sources.join("\0")) throw new SnapstackError("E_IN_USE", `machine '${name}' changed while waiting: retry`, { machine: name });
      return fn();
    });
  }

  /** The machines whose layers `name`'s chain reads: its source, that one's source (a clone of a clone), ... */
  #sourcesOf(name: string): string[] {
    const sources: string[] = [];
    for (let machine = name; this.store.has(machine); ) {
      const source = this.store.loadConfig(machine).cloneOf?.machine;
      if (source === undefined || sources.includes(source) || source === name) break;
      sources.push(source);
      machine = source;
    }
    return sources;
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
      // A QEMU that went away unasked is "crashed" unless it exited cleanly (the guest powered off): a kill -9 counts.
      state: running !== undefined ? "running" : lastExit?.unexpected === true && (lastExit.code !== 0 || lastExit.signal !== null) ? "crashed" : "stopped",
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
    return this.#operation([request.name], () => createMachine(this.store, request));
  }

  start(name: string): Promise<MachineStatus> {
    return this.#withMachine(name, async () => {
      if (this.#running.has(name)) throw new SnapstackError("E_IN_USE", `machine '${name}' is already running`, { machine: name, state: "running" });
      await this.#start(name, null);
      return this.status(name);
    });
  }

  stop(name: string, options: { force?: boolean } = {}): Promise<MachineStatus> {
    return this.#withMachine(
      name,
      async () => {
        if (!this.#running.has(name)) throw stateNotRunning(name, "stop it");
        await this.#stop(name, options.force ?? false);
        return this.status(name);
      },
      true,
    );
  }

  remove(name: string, options: OperationOptions = {}): Promise<{ freedBytes: number }> {
    // Removing a clone changes its source's tree: hold both (in the fixed order).
    return this.#withChain(name, async () => {
      // Refused before anything is stopped: linked clones read this machine's layers.
      const clones = [...new Set(Object.values(this.store.loadTree(name).pins).flat())];
      if (clones.length > 0) throw new SnapstackError("E_IN_USE", `machine '${name}' is used by linked clone(s) ${clones.join(", ")}: remove them first`, { machine: name, clones });
      const cloneOf = this.store.loadConfig(name).cloneOf;
      if (cloneOf !== null && this.store.has(cloneOf.machine)) {
        // What the unpin will do in the source, checked before anything is removed.
        const sourceTree = this.store.loadTree(cloneOf.machine);
        const unpin = setPin(sourceTree, cloneOf.layer, name, false, sizeOfIn(this.store.machineDir(cloneOf.machine)), { running: this.#running.has(cloneOf.machine) });
        this.#refuseWipeUnderRunningClones(cloneOf.machine, sourceTree, unpin, options, name);
      }
      if (this.#running.has(name)) await this.#stop(name, true);
      const result = await removeStopped(this.store, name, options, async (sourceName, layer) => {
        const running = this.#running.get(sourceName);
        if (running === undefined) return unpinStopped(this.store, sourceName, layer, name, options);
        // The source runs: its top serves the guest and must stay its top (as a live delete-snapshot).
        const plan = setPin(this.store.loadTree(sourceName), layer, name, false, sizeOfIn(this.store.machineDir(sourceName)), { running: true });
        await this.#runLivePlan(sourceName, running, "unpin", plan, options);
      });
      this.#lastExit.delete(name);
      return result;
    });
  }

  async #start(name: string, incomingStatePath: string | null): Promise<void> {
    const config = this.store.loadConfig(name);
    const tree = this.store.loadTree(name);
    const dir = this.store.machineDir(name);
    const runDir = this.runDir(name);
    const server = new NbdServer({ log: (line) => this.#log(`machine ${name} nbd: ${line}`) });
    const disks: ServedDisk[] = [];
    try {
      for (const [disk, file] of layerFiles(tree, tree.layers[tree.current.layer].file).entries()) {
        const diskExport = new NbdExport({ name: diskExportName(disk), device: await openImage(stepPath(dir, file)) });
        server.addExport(diskExport);
        disks.push({ export: diskExport, held: [] });
      }
      const { mkdirSync } = await import("node:fs");
      mkdirSync(runDir, { recursive: true, mode: 0o700 });
      const socketPath = join(runDir, NBD_SOCKET_NAME);
      rmSync(socketPath, { force: true });
      await server.listen({ path: socketPath });
      if (!this.#acceleratorLogged) {
        this.#acceleratorLogged = true;
        this.#log(`accelerator: ${(await acceleratorChoice()).reason}`);
      }
      const process = await QemuProcess.start({
        name,
        memoryBytes: config.memoryBytes,
        cpus: config.cpus,
        disks: disks.map((served) => ({ nbdSocketPath: socketPath, exportName: served.export.name })),
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
      const running: RunningMachine = { process, server, disks, runDir, startedAt: new Date().toISOString(), stopping: false };
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
      for (const served of disks) await served.export.device.close();
      throw error;
    }
  }

  /** QEMU went away: if nobody asked, keep its exit for `status` and release the disk. */
  async #exited(name: string, running: RunningMachine, exit: QemuExit): Promise<void> {
    if (running.stopping || this.#running.get(name) !== running) return;
    await this.#mutex.run(name, async () => {
      if (running.stopping || this.#running.get(name) !== running) return;
      this.#log(`machine ${name}: QEMU exited unexpectedly (code ${exit.code}, signal ${exit.signal}): ${exit.stderr.trim()}`);
      this.#lastExit.set(name, { ...exit, at: new Date().toISOString(), unexpected: true });
      this.#running.delete(name);
      await running.server.close();
      await closeServedChain(running);
    });
  }

  async #stop(name: string, force: boolean): Promise<void> {
    const running = this.#running.get(name)!;
    running.stopping = true;
    const exit = force ? await running.process.kill() : await running.process.quit();
    this.#running.delete(name);
    await running.server.close();
    await closeServedChain(running);
    this.#lastExit.set(name, { ...exit, code: force ? exit.code : 0, at: new Date().toISOString(), unexpected: false });
  }

  /**
   * Stop serving every machine (daemon shutdown): QEMUs are quit. Operations
   * under way finish first (each machine's mutex is taken in turn), so a
   * start that is spawning QEMU right now has its QEMU quit too instead of
   * left running without its disks; operations still waiting are refused
   * (E_ABORTED).
   */
  async shutdown(): Promise<void> {
    this.#shuttingDown = true;
    for (const name of new Set([...this.#mutex.busyKeys(), ...this.#running.keys()])) {
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
    // A live save needs a running guest and an accelerator whose dirty log QEMU can trust
    // (liveSaveSupported: not TCG on QEMU 7.2); otherwise the paused save.
    const live = !diskOnly && liveSaveSupported(running.process.accelerator) && (await running.process.status()) === "running";
    const plan = prepareSnapshot(this.store, name, input, !diskOnly);
    const dir = this.store.machineDir(name);
    this.store.beginJournal(name, "snapshot", plan);
    const newTop = plan.tree.layers[plan.tree.current.layer];
    let pausedMs = 0;
    let stateBytes = 0;
    const devices: BlockDevice[] = [];
    let pausedAt: number | null = null;
    try {
      // Before any pause: create the new overlays (they name the tops as backing) and open
      // them on the exports' devices, so the pause only swaps.
      await executeSteps(dir, plan.steps);
      for (const [disk, file] of layerFiles(plan.tree, newTop.file).entries()) devices.push(await openOverlayOn(stepPath(dir, file), running.disks[disk].export.device));
      const statePath = stateFilePath(this.store.snapshotDir(name, plan.snapshot.id));
      const partial = `${statePath}.partial`;
      if (diskOnly) {
        pausedMs = await this.#swapPaused(running, devices);
      } else if (live) {
        // RAM is copied while the guest runs; at the switchover QEMU stops it (draining and
        // flushing its I/O) and the disk layer is frozen there: one instant for disk, RAM and CPU.
        const saved = await running.process.saveState(partial, {
          live: true,
          atSwitchover: async () => {
            await swapAll(running, devices);
            this.#log(`machine ${name}: snapshot ${plan.snapshot.name}: disks frozen at the switchover`);
          },
        });
        pausedMs = saved.pausedMs;
        stateBytes = saved.sizeBytes;
      } else {
        pausedAt = performance.now();
        await running.process.pause();
        await swapAll(running, devices);
        stateBytes = (await running.process.saveState(partial)).sizeBytes;
      }
      if (!diskOnly) {
        recordStateSize(this.store.snapshotDir(name, plan.snapshot.id), stateBytes);
        renameSync(partial, statePath);
        syncDirectorySync(this.store.snapshotDir(name, plan.snapshot.id));
      }
      if (pausedAt !== null) {
        await running.process.resume();
        pausedMs = performance.now() - pausedAt;
        pausedAt = null;
      }
      this.store.commitJournal(name, plan.tree);
    } catch (error) {
      await this.#ensureRunning(running, pausedAt !== null);
      if (devices.length > 0 && running.disks[0].export.device === devices[0]) {
        // The disk layer is taken: keep the snapshot (disk-only when its state did not complete).
        this.store.commitJournal(name, plan.tree);
      } else {
        for (const device of devices) await device.close().catch(() => {});
        for (const file of layerFiles(plan.tree, newTop.file)) rmSync(stepPath(dir, file), { force: true });
        rmSync(this.store.snapshotDir(name, plan.snapshot.id), { recursive: true, force: true });
        rmSync(this.store.journalPath(name), { force: true });
      }
      throw error;
    }
    return { snapshot: plan.snapshot, timings: { pausedMs, totalMs: performance.now() - started, stateBytes } };
  }

  /** After a failed live operation: continue a guest that we paused or that a save left stopped. */
  async #ensureRunning(running: RunningMachine, wePaused: boolean): Promise<void> {
    if (!running.process.running) return;
    const status = await running.process.status().catch(() => "unknown");
    if (wePaused || status === "postmigrate" || status === "finish-migrate") await running.process.resume().catch(() => {});
  }

  revert(name: string, snapshotName: string, options: OperationOptions = {}): Promise<{ snapshot: SnapshotRecord; freedBytes: number; state: MachineState; totalMs: number }> {
    return this.#withMachine(name, async () => {
      const started = performance.now();
      const target = findSnapshot(this.store.loadTree(name), snapshotName);
      // Checked before anything changes: QEMU finds a damaged state only while loading it.
      const statePath = target.hasState ? checkStateFile(this.store.snapshotDir(name, target.id), { machine: name, snapshot: target.name }) : null;
      const wasRunning = this.#running.has(name);
      if (wasRunning) await this.#stop(name, true);
      const result = await revertStopped(this.store, name, snapshotName, options);
      if (statePath !== null) await this.#start(name, statePath);
      else if (wasRunning) await this.#start(name, null);
      return { snapshot: result.snapshot, freedBytes: result.freedBytes, state: this.#running.has(name) ? "running" : "stopped", totalMs: performance.now() - started };
    });
  }

  deleteSnapshot(name: string, snapshotName: string, options: OperationOptions = {}): Promise<DeleteResult & { pausedMs: number }> {
    return this.#withMachine(name, async () => {
      const running = this.#running.get(name);
      const tree = this.store.loadTree(name);
      const plan = planDelete(tree, snapshotName, sizeOfIn(this.store.machineDir(name)), { running: running !== undefined });
      this.#refuseWipeUnderRunningClones(name, tree, plan, options);
      if (running === undefined) return { ...(await deleteSnapshotStopped(this.store, name, snapshotName, options)), pausedMs: 0 };
      const { result, pausedMs } = await this.#runLivePlan(name, running, "delete-snapshot", plan, options);
      return { snapshot: plan.snapshot, ...result, pausedMs };
    });
  }

  /**
   * A --wipe plan must not zero, in place, a layer that a running linked
   * clone still reads: the clone's chain was opened on the old tree, and
   * this machine's operations do not reopen it (an unlinked layer stays
   * readable through an open file, a wiped one reads zeroes). Refused before
   * anything changes. `leaving`: a clone being removed (it is stopped).
   */
  #refuseWipeUnderRunningClones(name: string, tree: TreeRecord, plan: Plan, options: OperationOptions, leaving?: string): void {
    if (options.wipe !== true || plan.removedFiles.length === 0) return;
    const removed = new Set(plan.removedFiles);
    for (const [layerId, holders] of Object.entries(tree.pins)) {
      const readers = holders.filter((clone) => clone !== leaving && this.#running.has(clone));
      if (readers.length === 0) continue;
      for (let id: string | null = layerId; id !== null; id = tree.layers[id].parent) {
        if (!layerFiles(tree, tree.layers[id].file).some((file) => removed.has(file))) continue;
        throw new SnapstackError(
          "E_IN_USE",
          `--wipe would zero layer ${id} of machine '${name}', which running linked clone(s) ${readers.join(", ")} still read: stop them first, or do it without --wipe`,
          { machine: name, clones: readers },
        );
      }
    }
  }

  /**
   * Carry out a plan made for a running machine (its top stays its top):
   * a delete-snapshot, or the merges a clone's removal allows in its source.
   */
  async #runLivePlan(name: string, running: RunningMachine, operation: string, plan: Plan, options: OperationOptions): Promise<{ result: StepResult; pausedMs: number }> {
    // Nothing to merge (a clone's pin released on a layer something else still owns): no pause.
    if (plan.steps.length === 0) return { result: await this.store.runJournaled(name, operation, plan, options), pausedMs: 0 };
    const dir = this.store.machineDir(name);
    const tree = this.store.loadTree(name);
    const topFiles = layerFiles(tree, tree.layers[tree.current.layer].file);
    // Layers are removed once the old chain is closed: it reads through them until then, and a
    // wipe zeroes a layer in place (an unlinked file would stay readable, a wiped one does not).
    // A replay after a kill runs the journal in its order, on a stopped machine.
    const removals = plan.steps.filter((step) => step.kind === "remove-layer");
    const merges = plan.steps.filter((step) => step.kind !== "remove-layer");
    const addUp = (a: StepResult, b: StepResult): StepResult => ({ mergedBytes: a.mergedBytes + b.mergedBytes, freedBytes: a.freedBytes + b.freedBytes });
    if (!plan.steps.some((step) => topFiles.some((file) => stepTouches(step, file)))) {
      // Only frozen layers below the top change: merge while the guest runs, then reopen.
      this.store.beginJournal(name, operation, plan, options.wipe ?? false);
      const merged = await executeSteps(dir, merges, options);
      const pausedMs = await this.#reopenPaused(name, running, plan.tree, async () => {});
      const result = addUp(merged, await executeSteps(dir, removals, options));
      this.store.commitJournal(name, plan.tree);
      return { result, pausedMs };
    }
    // The plan changes the top (merges into it, or rebases it). Freeze the top under a
    // temporary layer that takes the guest's writes while the plan runs on the frozen top;
    // then, in a short pause, fold those writes back into the top and reopen the chain.
    const { writesFile, createWrites, foldWrites } = writesLayerSteps(tree, running.disks[0].export.sizeBytes);
    this.store.beginJournal(name, operation, { tree: plan.tree, steps: [...createWrites, ...plan.steps, ...foldWrites] }, options.wipe ?? false);
    await executeSteps(dir, createWrites);
    const writesDevices: BlockDevice[] = [];
    for (const [disk, file] of layerFiles(tree, writesFile).entries()) writesDevices.push(await openOverlayOn(stepPath(dir, file), running.disks[disk].export.device));
    let pausedMs = await this.#swapPaused(running, writesDevices);
    // Fold the guest's writes back into the top (the layer both trees call the top; its header
    // names its chain) and reopen it. A fold that failed before it removed the temporary layer
    // (a full disk) leaves the guest on that layer, over the top, so nothing it wrote drops out
    // of its view; the journal stays, and the next start (only stop is let through meanwhile)
    // folds everything the guest wrote there.
    const fold = async (): Promise<void> => void (await executeSteps(dir, foldWrites));
    const writesFiles = layerFiles(tree, writesFile);
    const newTopFiles = layerFiles(plan.tree, plan.tree.layers[plan.tree.current.layer].file);
    // Per disk: the temporary layer while it is still a qcow2 on the top (the commit step's own test), else the top.
    const reopenFiles = (): Promise<string[]> =>
      Promise.all(writesFiles.map(async (file, disk) => ((await backsOnto(stepPath(dir, file), stepPath(dir, newTopFiles[disk]))) ? file : newTopFiles[disk])));
    let merged: StepResult;
    try {
      merged = await executeSteps(dir, merges, options);
    } catch (error) {
      // The plan failed part-way: the same fold and reopen, and the journal left for the next start.
      await this.#reopenPaused(name, running, plan.tree, fold, reopenFiles).catch(() => {});
      throw error;
    }
    pausedMs += await this.#reopenPaused(name, running, plan.tree, fold, reopenFiles);
    const result = addUp(merged, await executeSteps(dir, removals, options));
    this.store.commitJournal(name, plan.tree);
    return { result, pausedMs };
  }

  /** Pause the guest, move each export onto its device (opened on the export's device), resume. */
  async #swapPaused(running: RunningMachine, devices: BlockDevice[]): Promise<number> {
    const pausedAt = performance.now();
    await running.process.pause();
    try {
      await swapAll(running, devices);
    } catch (error) {
      for (const [disk, device] of devices.entries()) if (running.disks[disk].export.device !== device) await device.close().catch(() => {});
      throw error;
    } finally {
      await running.process.resume();
    }
    return performance.now() - pausedAt;
  }

  /**
   * Pause the guest, close the top's chain, run `work`, reopen the chain
   * from `tree` (or the files `reopenFiles` names once `work` is over,
   * failed or not), resume.
   */
  async #reopenPaused(name: string, running: RunningMachine, tree: TreeRecord, work: () => Promise<void>, reopenFiles?: () => Promise<string[]>): Promise<number> {
    const dir = this.store.machineDir(name);
    const pausedAt = performance.now();
    await running.process.pause();
    try {
      const placeholders = running.disks.map((served) => new DeferredDevice(`${name} ${served.export.name} (reopening)`, served.export.sizeBytes));
      for (const [disk, served] of running.disks.entries()) await closeChain(await served.export.swapDevice(placeholders[disk]), served.held);
      try {
        await work();
      } finally {
        const files = (await reopenFiles?.()) ?? layerFiles(tree, tree.layers[tree.current.layer].file);
        for (const [disk, served] of running.disks.entries()) {
          const device = await openImage(stepPath(dir, files[disk]));
          placeholders[disk].install(device);
          await served.export.swapDevice(device);
        }
      }
    } finally {
      await running.process.resume();
    }
    return performance.now() - pausedAt;
  }

  diff(name: string, from: string, to: string, options: DiffOptions = {}) {
    return this.#withChain(name, async () => {
      this.#refuseLiveDisk(name, [from, to], "compared");
      return diffSnapshots(this.store, name, from, to, options);
    });
  }

  /** One disk of a snapshot written to an image file, whole or as the delta since another (machine-operations.ts exportSnapshot). */
  export(name: string, snapshot: string, path: string, options: ExportOptions = {}): Promise<ExportResult> {
    return this.#withChain(name, async () => {
      this.#refuseLiveDisk(name, [snapshot, ...(options.from === undefined ? [] : [options.from])], "exported");
      return exportSnapshot(this.store, name, snapshot, path, options);
    });
  }

  /** A running machine's current disk changes under a reader: it is not read, a snapshot of it is. */
  #refuseLiveDisk(name: string, specs: readonly string[], what: string): void {
    if (this.#running.has(name) && specs.includes(LIVE_DISK_NAME)) {
      throw new SnapstackError("E_IN_USE", `machine '${name}' is running: its current disk cannot be ${what}; take a snapshot first`, { machine: name });
    }
  }

  clone(name: string, snapshotName: string, newName: string): Promise<MachineConfig> {
    return this.#operation([name, newName], async () => {
      this.store.require(name);
      return cloneMachine(this.store, name, snapshotName, newName);
    });
  }
}

/**
 * Open a new top layer (just created, empty) on `backing`, the export's
 * current device: O(1) whatever the chain's depth, and the chain below is
 * the instance already serving the guest (no second instance with its own
 * caches). The new top does not close `backing` (see RunningMachine.held).
 */
async function openOverlayOn(path: string, backing: BlockDevice): Promise<BlockDevice> {
  const file = await openNodeFile(path);
  try {
    lockLayerFile(file, path, 0, path, lockBits("write"));
    return await openQcow2(file, { readOnly: false, backing, closeBacking: false });
  } catch (error) {
    await file.close().catch(() => {});
    throw error;
  }
}

/** Close a served chain: its top, then the former tops it sat on (emptying `held`), newest first. */
async function closeChain(top: BlockDevice, held: BlockDevice[]): Promise<void> {
  await top.close();
  for (const device of held.splice(0).reverse()) await device.close();
}

async function closeServedChain(running: RunningMachine): Promise<void> {
  for (const served of running.disks) await closeChain(served.export.device, served.held);
}

/**
 * Move every disk's export onto its new device (all disks at one instant:
 * the guest is stopped), all or none. A swap fails
 * before it installs anything (the old device's flush failed): the disks
 * already moved are moved back (the guest is stopped throughout, so their
 * new overlays took no write), so a snapshot never freezes some disks and
 * leaves the guest writing into the frozen layer of another.
 */
export async function swapAll(running: { disks: ServedDisk[] }, devices: readonly BlockDevice[]): Promise<void> {
  let swapped = 0;
  try {
    for (; swapped < running.disks.length; swapped++) running.disks[swapped].held.push(await running.disks[swapped].export.swapDevice(devices[swapped]));
  } catch (error) {
    for (let disk = swapped - 1; disk >= 0; disk--) {
      const served = running.disks[disk];
      await served.export.swapDevice(served.held.pop()!);
    }
    throw error;
  }
}

/** The NBD export name of disk `disk` ("disk0" for the first, as before there could be several). */
export function diskExportName(disk: number): string {
  return `disk${disk}`;
}

/**
 * The temporary layer that takes a running guest's writes while a delete
 * merges into its top: its creation (on the top) and its fold-back (commit
 * into the top, remove). Journaled around the delete plan's own steps.
 */
export function writesLayerSteps(tree: TreeRecord, sizeBytes: number): { writesFile: string; createWrites: LayerStep[]; foldWrites: LayerStep[] } {
  const topFile = tree.layers[tree.current.layer].file;
  const writesFile = `layers/${tree.current.layer}.writes.qcow2`;
  return {
    writesFile,
    createWrites: expandForDisks(tree, [{ kind: "create-overlay", file: writesFile, backingFile: topFile, sizeBytes }]),
    foldWrites: expandForDisks(tree, [
      { kind: "commit", fromFile: writesFile, intoFile: topFile },
      { kind: "remove-layer", file: writesFile },
    ]),
  };
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
