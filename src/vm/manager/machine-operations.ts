/**
 * Operations on a machine's files while no QEMU uses them: create,
 * snapshot (disk and configuration), revert, delete a snapshot, diff,
 * clone, remove. The daemon's manager (machine-manager.ts) calls these for
 * stopped machines and wraps them with pause/swap/restart for running ones.
 *
 * Each multi-step operation plans on the pure tree (snapshot-tree.ts) and
 * runs under the store's journal (machine-store.ts).
 */
import { randomBytes } from "node:crypto";
import { closeSync, existsSync, linkSync, mkdirSync, openSync, rmSync, statSync } from "node:fs";
import { basename, dirname, isAbsolute, join } from "node:path";
import { SnapstackError, fromSystemError } from "../../base/errors.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { openImage } from "../../chain/open-image.ts";
import { convertImage } from "../../chain/convert-image.ts";
import { diffImages, exportDelta, type DiffRange, type JobProgress } from "../../chain/jobs/index.ts";
import { DISKS_MAX } from "../runtime/qemu-args.ts";
import { readJson, syncDirectorySync, writeJsonAtomic } from "../store/atomic-file.ts";
import { executeSteps, fileAllocatedBytes, stepPath, treeAllocatedBytes } from "../store/layer-steps.ts";
import type { MachineStore} from "../store/machine-store.ts";
import { type MachineConfig } from "../store/machine-store.ts";
import { LIVE_DISK_NAME, validateName } from "../store/names.ts";
import {
  childrenOf,
  createTree,
  diskCount,
  diskFile,
  exclusiveLayers,
  expandForDisks,
  findSnapshot,
  layerChain,
  layerFiles,
  planDelete,
  planRevert,
  planSnapshot,
  retainedBy,
  setPin,
  type LayerSize,
  type SnapshotRecord,
  type TreeRecord,
} from "../tree/snapshot-tree.ts";

/** Smallest and largest accepted machine settings. */
export const MEMORY_BYTES_MIN = 16 * 1024 * 1024;
export const MEMORY_BYTES_MAX = 1024 * 1024 * 1024 * 1024;
export const CPUS_MAX = 256;
export const DISK_BYTES_MAX = 64 * 1024 * 1024 * 1024 * 1024;
export const DESCRIPTION_BYTES_MAX = 4096;

export interface CreateMachineRequest {
  name: string;
  memoryBytes?: number;
  cpus?: number;
  diskSizeBytes?: number;
  /** Copy this image (raw or qcow2) as the machine's (first) disk. */
  diskFrom?: string;
  /** More disks (empty, these sizes), each served as its own NBD export and snapshotted with the first. */
  extraDiskSizesBytes?: number[];
  kernel?: string | null;
  initrd?: string | null;
  append?: string | null;
  cdrom?: string | null;
  extraArgs?: string[];
}

export interface OperationOptions {
  wipe?: boolean;
  onProgress?: (progress: JobProgress) => void;
  signal?: AbortSignal;
}

function usage(message: string, details: Record<string, unknown> = {}): SnapstackError {
  return new SnapstackError("E_USAGE", message, details);
}

function checkInteger(what: string, value: number, min: number, max: number): number {
  if (!Number.isSafeInteger(value) || value < min || value > max) throw new SnapstackError("E_INVALID_SIZE", `${what} ${value} must be an integer in ${min}..${max}`, { value });
  return value;
}

/** A path the machine's config names, which must exist (`regular`: and be a regular file, as QEMU's -kernel and -initrd must). */
function checkFile(what: string, path: string | null | undefined, regular = false): string | null {
  if (path === null || path === undefined) return null;
  if (!existsSync(path)) throw new SnapstackError("E_NOT_FOUND", `${what} ${path}: no such file`, { path });
  if (regular && !statSync(path).isFile()) throw new SnapstackError("E_ACCESS", `${what} ${path}: not a regular file`, { path });
  return path;
}

export function sizeOfIn(dir: string): LayerSize {
  return (file) => fileAllocatedBytes(stepPath(dir, file));
}

/** Bytes of a layer over all its disks. */
function layerSizeIn(dir: string, tree: TreeRecord): LayerSize {
  return (file) => layerFiles(tree, file).reduce((sum, each) => sum + fileAllocatedBytes(stepPath(dir, each)), 0);
}

function extraDisks(sizes: readonly number[] | undefined): { extraDiskSizesBytes?: number[] } {
  if (sizes === undefined || sizes.length === 0) return {};
  if (sizes.length + 1 > DISKS_MAX) throw usage(`at most ${DISKS_MAX} disks per machine`);
  return { extraDiskSizesBytes: sizes.map((bytes, index) => checkInteger(`disk ${index + 2} size`, bytes, 512, DISK_BYTES_MAX)) };
}

/** Create a machine with an empty disk or a copy of an image. */
export async function createMachine(store: MachineStore, request: CreateMachineRequest): Promise<MachineConfig> {
  const name = validateName("machine", request.name);
  if (store.has(name)) throw new SnapstackError("E_EXISTS", `a machine named '${name}' already exists`, { machine: name });
  if ((request.diskSizeBytes === undefined) === (request.diskFrom === undefined)) throw usage("give exactly one of a disk size (--disk) or an image (--disk-from)");
  let diskSizeBytes = request.diskSizeBytes ?? 0;
  let source = null;
  if (request.diskFrom !== undefined) {
    source = await openImage(checkFile("disk image", request.diskFrom)!, { readOnly: true });
    diskSizeBytes = source.sizeBytes;
  }
  try {
    const config: MachineConfig = {
      name,
      memoryBytes: checkInteger("memory", request.memoryBytes ?? 512 * 1024 * 1024, MEMORY_BYTES_MIN, MEMORY_BYTES_MAX),
      cpus: checkInteger("cpus", request.cpus ?? 1, 1, CPUS_MAX),
      diskSizeBytes: checkInteger("disk size", diskSizeBytes, 512, DISK_BYTES_MAX),
      ...extraDisks(request.extraDiskSizesBytes),
      kernel: checkFile("kernel", request.kernel, true),
      initrd: checkFile("initrd", request.initrd, true),
      append: request.append ?? null,
      cdrom: checkFile("cdrom", request.cdrom),
      extraArgs: request.extraArgs ?? [],
      createdAt: new Date().toISOString(),
      cloneOf: null,
    };
    if (config.initrd !== null && config.kernel === null) throw usage("--initrd needs --kernel");
    const plan = createTree(config.diskSizeBytes, null, config.extraDiskSizesBytes);
    const copy = source;
    const firstDisk = plan.tree.layers[plan.tree.current.layer].file;
    // A copied first disk is written by the populate step; the other disks start empty.
    const steps = copy === null ? plan.steps : plan.steps.filter((step) => step.kind !== "create-overlay" || step.file !== firstDisk);
    await store.create(config, plan.tree, steps, async (dir) => {
      if (copy !== null) await convertImage(copy, join(dir, plan.tree.layers[plan.tree.current.layer].file), { format: "qcow2", targetCache: "writeback" });
    });
    return config;
  } finally {
    await source?.close();
  }
}

/** A linked clone: a new machine whose disk is an overlay on `snapshot` of `source`. */
export async function cloneMachine(store: MachineStore, sourceName: string, snapshotName: string, newName: string): Promise<MachineConfig> {
  const name = validateName("machine", newName);
  if (store.has(name)) throw new SnapstackError("E_EXISTS", `a machine named '${name}' already exists`, { machine: name });
  const sourceConfig = store.loadConfig(sourceName);
  const sourceTree = store.loadTree(sourceName);
  const snapshot = findSnapshot(sourceTree, snapshotName);
  const layer = sourceTree.layers[snapshot.layer];
  const pinned = setPin(sourceTree, layer.id, name, true, sizeOfIn(store.machineDir(sourceName)));
  store.saveTree(sourceName, pinned.tree);
  const config: MachineConfig = { ...sourceConfig, name, createdAt: new Date().toISOString(), cloneOf: { machine: sourceName, snapshot: snapshot.name, layer: layer.id } };
  const plan = createTree(config.diskSizeBytes, { file: stepPath(store.machineDir(sourceName), layer.file) }, config.extraDiskSizesBytes);
  try {
    await store.create(config, plan.tree, plan.steps);
  } catch (error) {
    store.saveTree(sourceName, setPin(store.loadTree(sourceName), layer.id, name, false, sizeOfIn(store.machineDir(sourceName))).tree);
    throw error;
  }
  return config;
}

function snapshotDescription(description: string | undefined): string {
  const text = description ?? "";
  if (Buffer.byteLength(text, "utf8") > DESCRIPTION_BYTES_MAX) throw usage(`description longer than ${DESCRIPTION_BYTES_MAX} bytes`);
  return text;
}

/** Write the snapshot's copy of the configuration (before the journal commits it). */
export function writeSnapshotConfig(store: MachineStore, name: string, snapshotId: string, config: MachineConfig): string {
  const dir = store.snapshotDir(name, snapshotId);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  writeJsonAtomic(join(dir, "config.json"), config);
  // The new directory's entry in snapshots/ is durable too, not only the file inside it.
  syncDirectorySync(dirname(dir));
  return dir;
}

export interface SnapshotRequestInput {
  snapshot: string;
  description?: string;
}

/** Plan a snapshot (used by both the stopped and the live paths). */
export function prepareSnapshot(store: MachineStore, name: string, input: SnapshotRequestInput, hasState: boolean) {
  const snapshotName = validateName("snapshot", input.snapshot);
  const config = store.loadConfig(name);
  const tree = store.loadTree(name);
  const plan = planSnapshot(tree, { name: snapshotName, description: snapshotDescription(input.description), createdAt: new Date().toISOString(), hasState, sizeBytes: config.diskSizeBytes });
  writeSnapshotConfig(store, name, plan.snapshot.id, config);
  return plan;
}

/** Snapshot a stopped machine: disk and configuration. */
export async function snapshotStopped(store: MachineStore, name: string, input: SnapshotRequestInput): Promise<SnapshotRecord> {
  const plan = prepareSnapshot(store, name, input, false);
  await store.runJournaled(name, "snapshot", plan);
  return plan.snapshot;
}

/** Revert a stopped machine's disk to a snapshot (the old top is discarded). */
export async function revertStopped(store: MachineStore, name: string, snapshotName: string, options: OperationOptions = {}): Promise<{ snapshot: SnapshotRecord; freedBytes: number }> {
  const config = store.loadConfig(name);
  const plan = planRevert(store.loadTree(name), snapshotName, config.diskSizeBytes, sizeOfIn(store.machineDir(name)));
  // The snapshot's configuration becomes the machine's, in the journal with the tree (a kill
  // between the two left the reverted disk under the configuration it was reverted from).
  const snapshotConfig = join(store.snapshotDir(name, plan.snapshot.id), "config.json");
  const reverted = existsSync(snapshotConfig) ? { ...readJson<MachineConfig>(snapshotConfig), name, cloneOf: config.cloneOf } : undefined;
  const result = await store.runJournaled(name, "revert", { ...plan, config: reverted }, options);
  return { snapshot: plan.snapshot, freedBytes: result.freedBytes };
}

export interface DeleteResult {
  snapshot: SnapshotRecord;
  freedBytes: number;
  mergedBytes: number;
}

/** Delete a snapshot of a stopped machine. */
export async function deleteSnapshotStopped(store: MachineStore, name: string, snapshotName: string, options: OperationOptions = {}): Promise<DeleteResult> {
  const plan = planDelete(store.loadTree(name), snapshotName, sizeOfIn(store.machineDir(name)), { running: false });
  const result = await store.runJournaled(name, "delete-snapshot", plan, options);
  return { snapshot: plan.snapshot, ...result };
}

export interface DiffOptions extends OperationOptions {
  /** Which disk, 1 for the first (default) up to the machine's number of disks. */
  disk?: number;
}

/**
 * Changed ranges of one disk (the first unless options.disk says) between
 * two snapshots, by name or id; "current" names the live top (no snapshot
 * can be named so; one made before that rule is reached by its id).
 */
export async function diffSnapshots(store: MachineStore, name: string, from: string, to: string, options: DiffOptions = {}): Promise<{ disk: number; ranges: DiffRange[]; changedBytes: number }> {
  const { disk, fileOf } = diskStates(store, name, options.disk);
  const fromDevice = await openImage(fileOf(from), { readOnly: true });
  try {
    const toDevice = await openImage(fileOf(to), { readOnly: true });
    try {
      const result = await diffImages(fromDevice, toDevice, { onProgress: options.onProgress, signal: options.signal });
      const ranges = result.ranges;
      return { disk, ranges, changedBytes: ranges.reduce((sum, range) => sum + range.length, 0) };
    } finally {
      await toDevice.close();
    }
  } finally {
    await fromDevice.close();
  }
}

/**
 * Disk `disk` (1 for the first, the default) of a machine, checked against
 * its disks: the path of its top layer file in a snapshot ("current": the
 * live disk), by name or id.
 */
function diskStates(store: MachineStore, name: string, disk = 1): { disk: number; fileOf: (spec: string) => string } {
  const tree = store.loadTree(name);
  const dir = store.machineDir(name);
  const disks = diskCount(tree);
  if (!Number.isSafeInteger(disk) || disk < 1 || disk > disks) {
    throw usage(`disk ${disk}: machine '${name}' has ${disks === 1 ? "1 disk" : `disks 1 to ${disks}`}`, { machine: name, disk });
  }
  const layerOf = (spec: string): string => (spec === LIVE_DISK_NAME ? tree.current.layer : findSnapshot(tree, spec).layer);
  return { disk, fileOf: (spec) => stepPath(dir, diskFile(tree.layers[layerOf(spec)].file, disk - 1)) };
}

export interface ExportOptions extends DiffOptions {
  /** Format of a whole export: "qcow2" (the default) or "raw". A delta (`from`) is always qcow2. */
  format?: string;
  /** Export only what changed since this snapshot, as a qcow2 overlay whose backing file is `backing`. */
  from?: string;
  /** With `from`: an image that holds that snapshot's disk (its earlier export), the delta's backing file. */
  backing?: string;
}

export interface ExportResult {
  disk: number;
  path: string;
  format: string;
  /** Guest bytes of data copied: the disk's data, or the delta's changed clusters. */
  writtenBytes: number;
  /** With `from`: the bytes that differ (before rounding to clusters). */
  changedBytes?: number;
  backing?: string;
}

/**
 * Write one disk of a snapshot ("current": the live disk) to a new image
 * file at `path` (absolute): whole, as a standalone image (convert of its
 * layer chain, flushed), or with `from`, only the clusters that changed
 * since `from`, as a qcow2 overlay on `backing` (an earlier export of
 * `from`, checked to be an image of the disk's size; its content is the
 * caller's word). An existing file is refused (E_EXISTS): the image is
 * written under a temporary name and linked to `path` only when complete. Only the
 * machine's own operations write the layers read (and a linked clone's
 * source's): the manager holds both machines meanwhile (#withChain).
 */
export async function exportSnapshot(store: MachineStore, name: string, snapshot: string, path: string, options: ExportOptions = {}): Promise<ExportResult> {
  const { disk, fileOf } = diskStates(store, name, options.disk);
  if (!isAbsolute(path)) throw usage(`export: ${path} is not an absolute path`, { path });
  if (existsSync(path)) throw new SnapstackError("E_EXISTS", `${path}: exists; an export never overwrites a file`, { path });
  const format = options.from === undefined ? (options.format ?? "qcow2") : "qcow2";
  if (format !== "qcow2" && format !== "raw") throw usage(`export: format '${format}' is not qcow2 or raw`, { format });
  if (options.from !== undefined && options.format !== undefined && options.format !== "qcow2") throw usage("export: a delta (--from) is a qcow2 overlay; -O raw needs a whole export", { format: options.format });
  if ((options.from === undefined) !== (options.backing === undefined)) throw usage("export: --from and --backing go together (the delta's backing file holds the --from snapshot's disk)");
  if (options.backing !== undefined && !isAbsolute(options.backing)) throw usage(`export: backing ${options.backing} is not an absolute path`, { path: options.backing });
  // Written under a temporary name in the same directory (claimed with O_EXCL), then linked to `path`
  // (link() never replaces a file, nor follows a link put there) and the temporary name removed: a
  // failed or killed export never leaves a half-written image under the name a backup would have.
  const partial = join(dirname(path), `.${basename(path)}.export-${process.pid}-${randomBytes(4).toString("hex")}`);
  let fd: number;
  try {
    fd = openSync(partial, "wx", 0o644);
  } catch (error) {
    throw fromSystemError(error, path, "create the export");
  }
  closeSync(fd);
  const source = await openImage(fileOf(snapshot), { readOnly: true }).catch((error: unknown) => {
    rmSync(partial, { force: true });
    throw error;
  });
  try {
    const result = await writeExport(fileOf, source, partial, disk, format, options);
    try {
      linkSync(partial, path);
    } catch (error) {
      throw fromSystemError(error, path, "create the export");
    }
    return { ...result, path };
  } finally {
    rmSync(partial, { force: true });
    syncDirectorySync(dirname(path));
    await source.close();
  }
}

/** exportSnapshot's copy into `path` (the claimed temporary name). */
async function writeExport(fileOf: (spec: string) => string, source: BlockDevice, path: string, disk: number, format: string, options: ExportOptions): Promise<ExportResult> {
  if (options.from === undefined) {
    // Convert counts the data it copies (its metadata pass, run when someone hears progress).
    let copiedBytes = 0;
    await convertImage(source, path, {
      format,
      targetCache: "writeback",
      signal: options.signal,
      onProgress: (fraction, doneBytes, totalBytes) => {
        copiedBytes = totalBytes;
        options.onProgress?.({ job: "export", phase: "copy", doneBytes, totalBytes, fraction });
      },
    });
    return { disk, path, format, writtenBytes: copiedBytes };
  }
  const backingPath = options.backing!;
  const from = await openImage(fileOf(options.from), { readOnly: true });
  try {
    const backing = await openImage(backingPath, { readOnly: true });
    try {
      if (backing.sizeBytes !== from.sizeBytes) {
        throw usage(`export: backing ${backingPath} is ${backing.sizeBytes} bytes, disk ${disk} of '${options.from}' ${from.sizeBytes}: it is not an export of that disk`, { path: backingPath });
      }
      const { ranges } = await diffImages(from, source, { onProgress: options.onProgress, signal: options.signal });
      const exported = await exportDelta(backingPath, source, ranges, path, { from, backing, onProgress: options.onProgress, signal: options.signal });
      return { disk, path, format, writtenBytes: exported.writtenBytes, changedBytes: ranges.reduce((sum, range) => sum + range.length, 0), backing: backingPath };
    } finally {
      await backing.close();
    }
  } finally {
    await from.close();
  }
}

/**
 * Release a clone's pin on its source's layer, and merge what nobody needs
 * any more; the default, for a source that is not running.
 */
export async function unpinStopped(store: MachineStore, source: string, layer: string, clone: string, options: OperationOptions = {}): Promise<void> {
  const plan = setPin(store.loadTree(source), layer, clone, false, sizeOfIn(store.machineDir(source)));
  await store.runJournaled(source, "unpin", plan, options);
}

/**
 * Remove a stopped machine (refused while clones use its layers). A clone's
 * pin on its source is released by `unpin` (the manager passes one that
 * takes a running source's live path: its top must not be merged away).
 */
export async function removeStopped(
  store: MachineStore,
  name: string,
  options: OperationOptions = {},
  unpin: (source: string, layer: string) => Promise<void> = (source, layer) => unpinStopped(store, source, layer, name, options),
): Promise<{ freedBytes: number }> {
  const tree = store.loadTree(name);
  const config = store.loadConfig(name);
  const clones = [...new Set(Object.values(tree.pins).flat())];
  if (clones.length > 0) throw new SnapstackError("E_IN_USE", `machine '${name}' is used by linked clone(s) ${clones.join(", ")}: remove them first`, { machine: name, clones });
  let freedBytes = 0;
  if (options.wipe) {
    // Every disk's layers (expandForDisks), not only the first disk's.
    const steps = expandForDisks(tree, [
      ...Object.values(tree.snapshots).map((snapshot) => ({ kind: "remove-snapshot-files" as const, snapshot: snapshot.id })),
      // Top layers first: a wiped layer must have no overlay left in the directory.
      ...Object.values(tree.layers)
        .filter((layer) => layer.external !== true)
        .sort((a, b) => layerChain(tree, b.id).length - layerChain(tree, a.id).length)
        .map((layer) => ({ kind: "remove-layer" as const, file: layer.file })),
    ]);
    freedBytes = (await executeSteps(store.machineDir(name), steps, { wipe: true })).freedBytes;
  }
  // What removing the directory frees besides: everything in it without --wipe (every disk's layers, RAM state files).
  freedBytes += treeAllocatedBytes(store.machineDir(name));
  store.removeMachine(name);
  if (config.cloneOf !== null && store.has(config.cloneOf.machine)) await unpin(config.cloneOf.machine, config.cloneOf.layer);
  return { freedBytes };
}

export interface SnapshotView {
  id: string;
  name: string;
  description: string;
  createdAt: string;
  parent: string | null;
  children: string[];
  hasState: boolean;
  current: boolean;
  /** Bytes in this snapshot's own layer. */
  ownBytes: number;
  /** Bytes deleting it would free before merges (0 when others still need the layer). */
  freeableBytes: number;
  /** What keeps the layer alive besides this snapshot (clones, layers above). */
  retainedBy: string[];
  depth: number;
}

export interface TreeView {
  machine: string;
  current: { snapshot: string | null; topBytes: number };
  /** Layer files the machine holds. */
  layerCount: number;
  /** Layers the current disk reads through. */
  chainDepth: number;
  snapshots: SnapshotView[];
}

/** The tree in display order (depth-first, children by creation time). */
export function describeTree(store: MachineStore, name: string, tree: TreeRecord = store.loadTree(name)): TreeView {
  const sizeOf = layerSizeIn(store.machineDir(name), tree);
  const nameOf = (id: string | null): string | null => (id === null ? null : tree.snapshots[id].name);
  const views: SnapshotView[] = [];
  const stack: Array<{ id: string; depth: number }> = childrenOf(tree, null)
    .reverse()
    .map((s) => ({ id: s.id, depth: 0 }));
  while (stack.length > 0) {
    const { id, depth } = stack.pop()!;
    const snapshot = tree.snapshots[id];
    const children = childrenOf(tree, id);
    const ownBytes = sizeOf(tree.layers[snapshot.layer].file);
    const freeable = exclusiveLayers(tree, id).reduce((sum, layer) => sum + sizeOf(tree.layers[layer].file), 0);
    views.push({
      id,
      name: snapshot.name,
      description: snapshot.description,
      createdAt: snapshot.createdAt,
      parent: nameOf(snapshot.parent),
      children: children.map((child) => child.name),
      hasState: snapshot.hasState,
      current: tree.current.snapshot === id,
      ownBytes,
      freeableBytes: freeable + (snapshot.hasState ? fileAllocatedBytes(join(store.snapshotDir(name, id), "state.bin")) : 0),
      retainedBy: retainedBy(tree, id),
      depth,
    });
    for (const child of [...children].reverse()) stack.push({ id: child.id, depth: depth + 1 });
  }
  return {
    machine: name,
    current: { snapshot: nameOf(tree.current.snapshot), topBytes: sizeOf(tree.layers[tree.current.layer].file) },
    layerCount: Object.values(tree.layers).filter((layer) => layer.external !== true).length,
    chainDepth: layerChain(tree, tree.current.layer).length,
    snapshots: views,
  };
}
