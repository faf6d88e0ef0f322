/**
 * The store of machines under SNAPSTACK_HOME.
 *
 *   $SNAPSTACK_HOME/                      (0700)
 *     daemon.sock  daemon.pid  daemon.log  api-token
 *     machines/NAME/
 *       config.json                       the machine's configuration
 *       tree.json                         the snapshot tree (snapshot-tree.ts)
 *       journal.json                      present while a multi-step operation runs
 *       layers/L<n>.qcow2                 disk layers
 *       snapshots/s<n>/config.json        the configuration when the snapshot was taken
 *       snapshots/s<n>/state.bin          saved VM state (migration stream), if any
 *       run/                              sockets, serial log, pid file of a running VM
 *
 * Design notes
 * - config.json and tree.json are replaced atomically (atomic-file.ts).
 * - A multi-step operation (snapshot, revert, delete, unpin) first writes
 *   the journal: its steps and the tree as it will be afterwards. Then the
 *   steps run, then the new tree is written, then the journal removed. At
 *   the next start `recover` replays every step (they are idempotent) and
 *   writes the journal's tree: the operation is finished, never half done.
 *   Until then the old tree.json stays the valid description, except that
 *   layers the steps have already merged may be gone, which is why
 *   recovery rolls forward rather than back.
 * - After recovery a snapshot that claims VM state whose state file is
 *   missing (the kill came while saving it) becomes disk-only; its disk
 *   is intact.
 */
import { existsSync, mkdirSync, readdirSync, renameSync, rmSync } from "node:fs";
import { homedir } from "node:os";
import { join, resolve } from "node:path";
import { processAlive } from "../../io/processes.ts";
import { SnapstackError } from "../../base/errors.ts";
import { readJson, syncDirectorySync, writeJsonAtomic } from "./atomic-file.ts";
import { validateName } from "./names.ts";
import { checkTree, type LayerStep, type TreeRecord } from "../tree/snapshot-tree.ts";
import { executeSteps, type StepOptions, type StepResult } from "./layer-steps.ts";

export interface MachineConfig {
  name: string;
  memoryBytes: number;
  cpus: number;
  /** The first disk's size. */
  diskSizeBytes: number;
  /** Sizes of the disks after the first (absent in stores from before there could be several). */
  extraDiskSizesBytes?: number[];
  kernel: string | null;
  initrd: string | null;
  append: string | null;
  cdrom: string | null;
  extraArgs: string[];
  createdAt: string;
  /** A linked clone: the machine and snapshot its disk backs onto. */
  cloneOf: { machine: string; snapshot: string; layer: string } | null;
}

export interface JournalRecord {
  operation: string;
  steps: LayerStep[];
  wipe: boolean;
  tree: TreeRecord;
  /** The machine's configuration afterwards, when the operation changes it (a revert: the snapshot's). */
  config?: MachineConfig;
  startedAt: string;
}

/** SNAPSTACK_HOME: --home, else $SNAPSTACK_HOME, else ~/.local/share/snapstack. */
export function resolveHome(explicit: string | undefined, env: NodeJS.ProcessEnv): string {
  if (explicit !== undefined && explicit !== "") return resolve(explicit);
  if (env.SNAPSTACK_HOME !== undefined && env.SNAPSTACK_HOME !== "") return resolve(env.SNAPSTACK_HOME);
  return join(env.HOME ?? homedir(), ".local", "share", "snapstack");
}

export class MachineStore {
  readonly home: string;
  readonly machinesDir: string;

  constructor(home: string) {
    this.home = resolve(home);
    this.machinesDir = join(this.home, "machines");
    mkdirSync(this.machinesDir, { recursive: true, mode: 0o700 });
  }

  get socketPath(): string {
    return join(this.home, "daemon.sock");
  }

  machineDir(name: string): string {
    return join(this.machinesDir, validateName("machine", name));
  }

  runDir(name: string): string {
    return join(this.machineDir(name), "run");
  }

  snapshotDir(name: string, snapshotId: string): string {
    return join(this.machineDir(name), "snapshots", snapshotId);
  }

  has(name: string): boolean {
    return existsSync(join(this.machineDir(name), "config.json"));
  }

  /** Machine names, sorted; directories without a config (a create that was killed) are skipped. */
  list(): string[] {
    return readdirSync(this.machinesDir, { withFileTypes: true })
      .filter((entry) => entry.isDirectory() && !entry.name.startsWith(".") && existsSync(join(this.machinesDir, entry.name, "config.json")))
      .map((entry) => entry.name)
      .sort();
  }

  require(name: string): void {
    if (!this.has(name)) throw new SnapstackError("E_NOT_FOUND", `no machine named '${name}'`, { machine: name });
  }

  loadConfig(name: string): MachineConfig {
    this.require(name);
    return readJson<MachineConfig>(join(this.machineDir(name), "config.json"));
  }

  loadTree(name: string): TreeRecord {
    this.require(name);
    return readJson<TreeRecord>(join(this.machineDir(name), "tree.json"));
  }

  saveTree(name: string, tree: TreeRecord): void {
    checkTree(tree);
    writeJsonAtomic(join(this.machineDir(name), "tree.json"), tree);
  }

  /**
   * Create a machine: directories, the first layer's steps, tree and config.
   * The config is written last, so a kill before it leaves a directory
   * `list` ignores and `create` may reuse.
   */
  async create(config: MachineConfig, tree: TreeRecord, steps: LayerStep[], populate?: (dir: string) => Promise<void>): Promise<void> {
    const dir = this.machineDir(config.name);
    if (this.has(config.name)) throw new SnapstackError("E_EXISTS", `a machine named '${config.name}' already exists`, { machine: config.name });
    rmSync(dir, { recursive: true, force: true });
    const staging = join(this.machinesDir, `.${config.name}.creating-${process.pid}`);
    rmSync(staging, { recursive: true, force: true });
    for (const sub of ["layers", "snapshots", "run"]) mkdirSync(join(staging, sub), { recursive: true, mode: 0o700 });
    try {
      await executeSteps(staging, steps);
      await populate?.(staging);
      writeJsonAtomic(join(staging, "tree.json"), tree);
      writeJsonAtomic(join(staging, "config.json"), config);
      renameSync(staging, dir);
      syncDirectorySync(this.machinesDir);
    } catch (error) {
      rmSync(staging, { recursive: true, force: true });
      throw error;
    }
  }

  /**
   * Remove the staging and trash directories (`.NAME.creating-PID`,
   * `.NAME.removing-PID`) that a process killed half-way through create or
   * remove left, when that process is gone. Called at daemon start, when no
   * operation runs. Returns their names.
   */
  removeLeftovers(): string[] {
    const removed: string[] = [];
    for (const entry of readdirSync(this.machinesDir, { withFileTypes: true })) {
      const match = /^\..+\.(?:creating|removing)-(\d+)$/.exec(entry.name);
      if (!entry.isDirectory() || match === null || processAlive(Number(match[1]))) continue;
      rmSync(join(this.machinesDir, entry.name), { recursive: true, force: true });
      removed.push(entry.name);
    }
    return removed;
  }

  /** Remove a machine's directory (its layers are wiped first by the caller when asked). */
  removeMachine(name: string): void {
    const dir = this.machineDir(name);
    const trash = join(this.machinesDir, `.${name}.removing-${process.pid}`);
    renameSync(dir, trash);
    syncDirectorySync(this.machinesDir);
    rmSync(trash, { recursive: true, force: true });
  }

  journalPath(name: string): string {
    return join(this.machineDir(name), "journal.json");
  }

  hasJournal(name: string): boolean {
    return existsSync(this.journalPath(name));
  }

  /** Run a planned operation under the journal (see the design notes). */
  async runJournaled(name: string, operation: string, plan: { tree: TreeRecord; steps: LayerStep[]; config?: MachineConfig }, options: StepOptions = {}): Promise<StepResult> {
    checkTree(plan.tree);
    const record: JournalRecord = { operation, steps: plan.steps, wipe: options.wipe ?? false, tree: plan.tree, config: plan.config, startedAt: new Date().toISOString() };
    writeJsonAtomic(this.journalPath(name), record);
    const result = await executeSteps(this.machineDir(name), plan.steps, options);
    this.commitJournal(name, plan.tree, plan.config);
    return result;
  }

  /** Write the journal (for operations whose steps run in several phases, like a live snapshot). */
  beginJournal(name: string, operation: string, plan: { tree: TreeRecord; steps: LayerStep[] }, wipe = false): void {
    checkTree(plan.tree);
    writeJsonAtomic(this.journalPath(name), { operation, steps: plan.steps, wipe, tree: plan.tree, startedAt: new Date().toISOString() } satisfies JournalRecord);
  }

  /** The journal's steps are done: write its configuration (if it has one) and tree, and drop it. */
  commitJournal(name: string, tree: TreeRecord, config?: MachineConfig): void {
    if (config !== undefined) writeJsonAtomic(join(this.machineDir(name), "config.json"), config);
    this.saveTree(name, this.#withStatesChecked(name, tree));
    rmSync(this.journalPath(name), { force: true });
    syncDirectorySync(this.machineDir(name));
  }

  /** The operation an unfinished journal records, or null. */
  pendingOperation(name: string): string | null {
    return this.hasJournal(name) ? readJson<JournalRecord>(this.journalPath(name)).operation : null;
  }

  /** Finish an interrupted operation; returns its name, or null when there was none. */
  async recover(name: string): Promise<string | null> {
    if (!this.hasJournal(name)) return null;
    const record = readJson<JournalRecord>(this.journalPath(name));
    await executeSteps(this.machineDir(name), record.steps, { wipe: record.wipe });
    this.commitJournal(name, record.tree, record.config);
    return record.operation;
  }

  #withStatesChecked(name: string, tree: TreeRecord): TreeRecord {
    for (const snapshot of Object.values(tree.snapshots)) {
      if (snapshot.hasState && !existsSync(join(this.snapshotDir(name, snapshot.id), "state.bin"))) snapshot.hasState = false;
    }
    return tree;
  }
}
