/**
 * A machine's snapshot tree: a pure model (no I/O) and the planner that
 * turns "snapshot", "revert to S" and "delete S" into steps on layer files.
 *
 * Design notes
 * - Layers are qcow2 files; each has at most one parent layer (its backing
 *   file). A snapshot names the layer whose chain reads as its disk; that
 *   layer is frozen (never written again) while the snapshot names it. The
 *   current disk is one writable layer (`current.layer`, the top) whose
 *   chain is what the VM sees; `current.snapshot` is the position in the
 *   tree (the snapshot the top was created on, the parent of the next one).
 * - A layer is *owned* when something reads from it as a top: a snapshot,
 *   the current disk, a linked clone of another machine (`pins`), or it is
 *   external (the bottom of a clone, in another machine's store). Owned
 *   layers keep their content. Unowned layers exist only for the layers
 *   above them and are normalized away:
 *     0 dependants  -> removed;
 *     1 dependant C -> merged with C, whichever side holds less data:
 *                      stream L into C then C backs onto L's parent
 *                      (cost: L's data), or commit C into L, L takes C's
 *                      place and C's dependants are rebased (header only)
 *                      onto L (cost: C's data; only if C is not pinned and
 *                      not the running top);
 *     2+ dependants -> L is streamed into one of them (which then backs onto
 *                      L's parent), until one is left.
 *   So after every operation each layer is owned, and the number of layers
 *   is at most the live snapshots + 1 (the top) + pinned layers of deleted
 *   snapshots + external bases.
 * - Steps name files (relative to the machine directory, or absolute for an
 *   external base), so they can be executed and replayed from a journal
 *   after the tree itself moved on. Each step is idempotent (see
 *   layer-steps.ts).
 * - A snapshot of a deleted snapshot's children is re-parented to the
 *   deleted node's parent; the tree never loses a branch.
 * - Several disks: a layer is one file per disk (`L3.qcow2`, `L3.d1.qcow2`,
 *   ...; diskFile). The planner decides on the layer (sizes summed over its
 *   disks) and expandForDisks repeats each step for every disk, so all
 *   disks share the tree's shape and every snapshot covers all of them.
 */
import { SnapstackError, assert } from "../../base/errors.ts";

export interface LayerRecord {
  id: string;
  /** The layer this one backs onto, or null at the bottom. */
  parent: string | null;
  /** Path relative to the machine directory, or absolute for an external base. */
  file: string;
  /** A layer of another machine (the base of a linked clone): never written or removed here. */
  external?: boolean;
}

export interface SnapshotRecord {
  id: string;
  name: string;
  description: string;
  /** ISO 8601. */
  createdAt: string;
  parent: string | null;
  layer: string;
  /** The snapshot holds VM state (RAM, CPU, devices) in its state file. */
  hasState: boolean;
}

export interface TreeRecord {
  version: 1;
  layers: Record<string, LayerRecord>;
  snapshots: Record<string, SnapshotRecord>;
  current: { layer: string; snapshot: string | null };
  /** Layer id -> names of machines (linked clones) whose disks back onto it. */
  pins: Record<string, string[]>;
  nextLayerNumber: number;
  nextSnapshotNumber: number;
  /**
   * Disks after the first (absent: one disk). A layer is one file per disk:
   * `file` for the first, diskFile(file, d) for disk d; every step on a
   * layer is made for each disk (expandForDisks), so all disks share one
   * tree and every snapshot covers all of them at one point in time.
   */
  extraDisks?: Array<{ sizeBytes: number }>;
}

export type LayerStep =
  /** A new empty qcow2 layer on `backingFile` (none when null). */
  | { kind: "create-overlay"; file: string; backingFile: string | null; sizeBytes: number }
  | { kind: "stream"; fromFile: string; intoFile: string; baseFile: string | null }
  | { kind: "commit"; fromFile: string; intoFile: string }
  | { kind: "rebase-unsafe"; file: string; backingFile: string }
  | { kind: "remove-layer"; file: string }
  | { kind: "remove-snapshot-files"; snapshot: string };

export interface Plan {
  tree: TreeRecord;
  steps: LayerStep[];
  /** Files of layers the plan removes. */
  removedFiles: string[];
}

/** Bytes a layer holds (for choosing merge directions); unknown layers count 0. */
export type LayerSize = (file: string) => number;

export function layerFileName(layerId: string): string {
  return `layers/${layerId}.qcow2`;
}

/** Number of disks the tree's layers hold. */
export function diskCount(tree: TreeRecord): number {
  return 1 + (tree.extraDisks?.length ?? 0);
}

/** The file of disk `disk` of the layer whose first disk is `file` (also for an external base). */
export function diskFile(file: string, disk: number): string {
  if (disk === 0) return file;
  assert(file.endsWith(".qcow2"), `layer file ${file} ends in .qcow2`);
  return `${file.slice(0, -".qcow2".length)}.d${disk}.qcow2`;
}

/** Every file of a layer, first disk first. */
export function layerFiles(tree: TreeRecord, file: string): string[] {
  return Array.from({ length: diskCount(tree) }, (_, disk) => diskFile(file, disk));
}

/** Steps planned on first-disk files, made for every disk (identity for one disk). */
export function expandForDisks(tree: TreeRecord, steps: readonly LayerStep[]): LayerStep[] {
  const count = diskCount(tree);
  if (count === 1) return [...steps];
  const expanded: LayerStep[] = [];
  for (const step of steps) {
    if (step.kind === "remove-snapshot-files") {
      expanded.push(step);
      continue;
    }
    for (let disk = 0; disk < count; disk++) {
      const on = (file: string): string => diskFile(file, disk);
      switch (step.kind) {
        case "create-overlay":
          expanded.push({ ...step, file: on(step.file), backingFile: step.backingFile === null ? null : on(step.backingFile), sizeBytes: disk === 0 ? step.sizeBytes : tree.extraDisks![disk - 1].sizeBytes });
          break;
        case "stream":
          expanded.push({ ...step, fromFile: on(step.fromFile), intoFile: on(step.intoFile), baseFile: step.baseFile === null ? null : on(step.baseFile) });
          break;
        case "commit":
          expanded.push({ ...step, fromFile: on(step.fromFile), intoFile: on(step.intoFile) });
          break;
        case "rebase-unsafe":
          expanded.push({ ...step, file: on(step.file), backingFile: on(step.backingFile) });
          break;
        case "remove-layer":
          expanded.push({ ...step, file: on(step.file) });
          break;
      }
    }
  }
  return expanded;
}

/** A layer's bytes over all its disks. */
function layerBytes(tree: TreeRecord, sizeOf: LayerSize): LayerSize {
  return (file) => layerFiles(tree, file).reduce((sum, each) => sum + sizeOf(each), 0);
}

/** A new tree with one empty top layer (no backing, or on an external base) and the step creating it. */
export function createTree(sizeBytes: number, base: { file: string } | null = null, extraDiskSizesBytes: readonly number[] = []): Plan {
  const tree: TreeRecord = { version: 1, layers: {}, snapshots: {}, current: { layer: "", snapshot: null }, pins: {}, nextLayerNumber: 1, nextSnapshotNumber: 1 };
  if (extraDiskSizesBytes.length > 0) tree.extraDisks = extraDiskSizesBytes.map((bytes) => ({ sizeBytes: bytes }));
  let parent: string | null = null;
  if (base !== null) {
    tree.layers.base = { id: "base", parent: null, file: base.file, external: true };
    parent = "base";
  }
  const top = newLayer(tree, parent);
  tree.current.layer = top.id;
  const backingFile = parent === null ? null : tree.layers[parent].file;
  return { tree, steps: expandForDisks(tree, [{ kind: "create-overlay", file: top.file, backingFile, sizeBytes }]), removedFiles: [] };
}

export function cloneTree(tree: TreeRecord): TreeRecord {
  return structuredClone(tree);
}

function newLayer(tree: TreeRecord, parent: string | null): LayerRecord {
  const id = `L${tree.nextLayerNumber++}`;
  const layer: LayerRecord = { id, parent, file: layerFileName(id) };
  tree.layers[id] = layer;
  return layer;
}

/**
 * Find a snapshot by name or id. Only the tree's own keys count as ids (not
 * "constructor" or "__proto__"). A name that is another snapshot's id
 * (planSnapshot keeps that from happening; a store written before it did
 * may hold one) is refused as ambiguous rather than guessed: taking the
 * name first made a retried delete remove the other snapshot.
 */
export function findSnapshot(tree: TreeRecord, nameOrId: string): SnapshotRecord {
  const byName = Object.values(tree.snapshots).find((snapshot) => snapshot.name === nameOrId);
  const byId = Object.hasOwn(tree.snapshots, nameOrId) ? tree.snapshots[nameOrId] : undefined;
  if (byName !== undefined && byId !== undefined && byName !== byId) {
    throw new SnapstackError("E_USAGE", `'${nameOrId}' is the name of snapshot ${byName.id} and the id of snapshot '${byId.name}'`, {
      snapshot: nameOrId,
    });
  }
  const found = byName ?? byId;
  if (found === undefined) throw new SnapstackError("E_SNAPSHOT_NOT_FOUND", `no snapshot named '${nameOrId}'`, { snapshot: nameOrId });
  return found;
}

export function childrenOf(tree: TreeRecord, snapshotId: string | null): SnapshotRecord[] {
  return Object.values(tree.snapshots)
    .filter((snapshot) => snapshot.parent === snapshotId)
    .sort((a, b) => a.createdAt.localeCompare(b.createdAt) || a.id.localeCompare(b.id));
}

function dependants(tree: TreeRecord, layerId: string): LayerRecord[] {
  return Object.values(tree.layers)
    .filter((layer) => layer.parent === layerId)
    .sort((a, b) => a.id.localeCompare(b.id));
}

export function isOwned(tree: TreeRecord, layerId: string): boolean {
  const layer = tree.layers[layerId];
  if (layer.external === true) return true;
  if (tree.current.layer === layerId) return true;
  if ((tree.pins[layerId]?.length ?? 0) > 0) return true;
  return Object.values(tree.snapshots).some((snapshot) => snapshot.layer === layerId);
}

/** Layer ids from `layerId` down to the bottom. */
export function layerChain(tree: TreeRecord, layerId: string): string[] {
  const chain: string[] = [];
  for (let id: string | null = layerId; id !== null; id = tree.layers[id].parent) {
    assert(tree.layers[id] !== undefined, `layer ${id} exists`);
    assert(chain.length <= Object.keys(tree.layers).length, "layer chain has no loop");
    chain.push(id);
  }
  return chain;
}

/** Check the tree's invariants (our own, so assert): references resolve, no loops, every layer owned. */
export function checkTree(tree: TreeRecord): void {
  assert(tree.layers[tree.current.layer] !== undefined, `current layer ${tree.current.layer} exists`);
  assert(tree.current.snapshot === null || tree.snapshots[tree.current.snapshot] !== undefined, "current snapshot exists");
  for (const layer of Object.values(tree.layers)) {
    layerChain(tree, layer.id);
    assert(isOwned(tree, layer.id), `layer ${layer.id} is owned`);
  }
  const names = new Set<string>();
  for (const snapshot of Object.values(tree.snapshots)) {
    assert(tree.layers[snapshot.layer] !== undefined, `layer of snapshot ${snapshot.id} exists`);
    assert(snapshot.layer !== tree.current.layer, `snapshot ${snapshot.id} is not on the writable top`);
    assert(snapshot.parent === null || tree.snapshots[snapshot.parent] !== undefined, `parent of ${snapshot.id} exists`);
    assert(!names.has(snapshot.name), `snapshot name ${snapshot.name} is unique`);
    names.add(snapshot.name);
  }
}

export interface SnapshotRequest {
  name: string;
  description: string;
  createdAt: string;
  hasState: boolean;
  sizeBytes: number;
}

/**
 * Freeze the top as the new snapshot's layer and put a new empty top on it.
 * Commands take a snapshot's name or id, so no name may equal another
 * snapshot's id: a name that is a present id is refused, and a new id
 * skips the numbers whose "sN" a present snapshot has as its name.
 */
export function planSnapshot(tree: TreeRecord, request: SnapshotRequest): Plan & { snapshot: SnapshotRecord } {
  const present = Object.values(tree.snapshots);
  if (present.some((snapshot) => snapshot.name === request.name)) {
    throw new SnapstackError("E_SNAPSHOT_EXISTS", `a snapshot named '${request.name}' already exists`, { snapshot: request.name });
  }
  if (Object.hasOwn(tree.snapshots, request.name)) {
    const holder = tree.snapshots[request.name];
    throw new SnapstackError("E_SNAPSHOT_EXISTS", `'${request.name}' is the id of snapshot '${holder.name}': choose another name`, { snapshot: request.name });
  }
  const next = cloneTree(tree);
  const frozen = next.current.layer;
  while (present.some((snapshot) => snapshot.name === `s${next.nextSnapshotNumber}`)) next.nextSnapshotNumber++;
  const snapshot: SnapshotRecord = {
    id: `s${next.nextSnapshotNumber++}`,
    name: request.name,
    description: request.description,
    createdAt: request.createdAt,
    parent: next.current.snapshot,
    layer: frozen,
    hasState: request.hasState,
  };
  next.snapshots[snapshot.id] = snapshot;
  const top = newLayer(next, frozen);
  next.current = { layer: top.id, snapshot: snapshot.id };
  checkTree(next);
  return {
    tree: next,
    snapshot,
    steps: expandForDisks(next, [{ kind: "create-overlay", file: top.file, backingFile: next.layers[frozen].file, sizeBytes: request.sizeBytes }]),
    removedFiles: [],
  };
}

/** Discard the top, put a new empty top on the snapshot's layer. */
export function planRevert(tree: TreeRecord, nameOrId: string, sizeBytes: number, sizeOf: LayerSize): Plan & { snapshot: SnapshotRecord } {
  const next = cloneTree(tree);
  const snapshot = findSnapshot(next, nameOrId);
  const oldTop = next.layers[next.current.layer];
  const top = newLayer(next, snapshot.layer);
  next.current = { layer: top.id, snapshot: snapshot.id };
  const steps: LayerStep[] = [{ kind: "create-overlay", file: top.file, backingFile: next.layers[snapshot.layer].file, sizeBytes }];
  const removedFiles: string[] = [];
  normalize(next, steps, removedFiles, sizeOf, { runningTop: null });
  assert(next.layers[oldTop.id] === undefined, "the old top is gone after a revert");
  checkTree(next);
  return { tree: next, snapshot, steps: expandForDisks(next, steps), removedFiles: removedFiles.flatMap((file) => layerFiles(next, file)) };
}

export interface DeleteOptions {
  /** The top is in use by a running VM: never commit it away (its file stays the top). */
  running: boolean;
}

/** Remove a snapshot node; merge or drop the layers nobody needs any more. */
export function planDelete(tree: TreeRecord, nameOrId: string, sizeOf: LayerSize, options: DeleteOptions): Plan & { snapshot: SnapshotRecord } {
  const next = cloneTree(tree);
  const snapshot = findSnapshot(next, nameOrId);
  for (const child of childrenOf(next, snapshot.id)) child.parent = snapshot.parent;
  if (next.current.snapshot === snapshot.id) next.current.snapshot = snapshot.parent;
  delete next.snapshots[snapshot.id];
  const steps: LayerStep[] = [{ kind: "remove-snapshot-files", snapshot: snapshot.id }];
  const removedFiles: string[] = [];
  normalize(next, steps, removedFiles, sizeOf, { runningTop: options.running ? next.current.layer : null });
  checkTree(next);
  return { tree: next, snapshot, steps: expandForDisks(next, steps), removedFiles: removedFiles.flatMap((file) => layerFiles(next, file)) };
}

/** Pin or unpin a layer for a linked clone. */
export function setPin(tree: TreeRecord, layerId: string, machine: string, pinned: boolean, sizeOf: LayerSize, options: DeleteOptions = { running: false }): Plan {
  const next = cloneTree(tree);
  const pins = new Set(next.pins[layerId] ?? []);
  if (pinned) pins.add(machine);
  else pins.delete(machine);
  if (pins.size > 0) next.pins[layerId] = [...pins].sort();
  else delete next.pins[layerId];
  const steps: LayerStep[] = [];
  const removedFiles: string[] = [];
  if (!pinned) normalize(next, steps, removedFiles, sizeOf, { runningTop: options.running ? next.current.layer : null });
  checkTree(next);
  return { tree: next, steps: expandForDisks(next, steps), removedFiles: removedFiles.flatMap((file) => layerFiles(next, file)) };
}

/**
 * Merge or remove unowned layers until every layer is owned (the rules in
 * the design notes). Mutates `tree`, appends to `steps`.
 */
function normalize(tree: TreeRecord, steps: LayerStep[], removedFiles: string[], sizeOfDisk: LayerSize, options: { runningTop: string | null }): void {
  const sizeOf = layerBytes(tree, sizeOfDisk);
  const stepsMax = Object.keys(tree.layers).length * 4 + 4;
  for (let round = 0; ; round++) {
    assert(round <= stepsMax, "normalize terminates");
    const unowned = Object.values(tree.layers)
      .filter((layer) => !isOwned(tree, layer.id))
      .sort((a, b) => a.id.localeCompare(b.id))[0];
    if (unowned === undefined) return;
    const above = dependants(tree, unowned.id);
    const parent = unowned.parent === null ? null : tree.layers[unowned.parent];
    if (above.length === 0) {
      steps.push({ kind: "remove-layer", file: unowned.file });
      removedFiles.push(unowned.file);
      delete tree.layers[unowned.id];
      continue;
    }
    if (above.length === 1) {
      const child = above[0];
      const canCommit = (tree.pins[child.id]?.length ?? 0) === 0 && child.id !== options.runningTop && child.external !== true;
      if (canCommit && sizeOf(child.file) < sizeOf(unowned.file)) {
        // Commit the child into the unowned layer; the unowned layer takes the child's place.
        steps.push({ kind: "commit", fromFile: child.file, intoFile: unowned.file });
        for (const grandchild of dependants(tree, child.id)) {
          steps.push({ kind: "rebase-unsafe", file: grandchild.file, backingFile: unowned.file });
          grandchild.parent = unowned.id;
        }
        for (const snapshot of Object.values(tree.snapshots)) if (snapshot.layer === child.id) snapshot.layer = unowned.id;
        if (tree.current.layer === child.id) tree.current.layer = unowned.id;
        steps.push({ kind: "remove-layer", file: child.file });
        removedFiles.push(child.file);
        delete tree.layers[child.id];
        continue;
      }
    }
    // Stream the unowned layer into one dependant (the smallest, so the copy is cheapest to hold).
    const target = [...above].sort((a, b) => sizeOf(a.file) - sizeOf(b.file) || a.id.localeCompare(b.id))[0];
    steps.push({ kind: "stream", fromFile: unowned.file, intoFile: target.file, baseFile: parent === null ? null : parent.file });
    target.parent = unowned.parent;
  }
}

/** Layers only this snapshot's node keeps alive: what deleting it would free (before merges). */
export function exclusiveLayers(tree: TreeRecord, snapshotId: string): string[] {
  const snapshot = tree.snapshots[snapshotId];
  const owners = Object.values(tree.snapshots).filter((other) => other.layer === snapshot.layer).length;
  if (owners > 1 || tree.current.layer === snapshot.layer || (tree.pins[snapshot.layer]?.length ?? 0) > 0) return [];
  // With two or more layers above, its data is copied into all but one of them: nothing is freed.
  if (dependants(tree, snapshot.layer).length > 1) return [];
  return [snapshot.layer];
}

/** Why a snapshot's layer cannot be freed by deleting it, for the tree listing. */
export function retainedBy(tree: TreeRecord, snapshotId: string): string[] {
  const layer = tree.snapshots[snapshotId].layer;
  const users = (layerId: string): string[] => {
    const names = Object.values(tree.snapshots)
      .filter((snapshot) => snapshot.layer === layerId)
      .map((snapshot) => `snapshot ${snapshot.name}`);
    if (tree.current.layer === layerId) names.push("current disk");
    return names.length > 0 ? names : [`layer ${layerId}`];
  };
  return [...(tree.pins[layer] ?? []).map((machine) => `clone ${machine}`), ...dependants(tree, layer).flatMap((dep) => users(dep.id))];
}
