/**
 * The machine store, names, the tree planner's merge choices, and journal
 * recovery of an interrupted multi-step operation.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, linkSync, mkdirSync, readFileSync, readdirSync, rmdirSync } from "node:fs";
import { join } from "node:path";
import { openImage } from "../../src/chain/open-image.ts";
import { validateName, NAME_BYTES_MAX } from "../../src/vm/store/names.ts";
import { MachineStore, resolveHome } from "../../src/vm/store/machine-store.ts";
import { executeStep, stepPath, treeAllocatedBytes } from "../../src/vm/store/layer-steps.ts";
import { writeJsonAtomic } from "../../src/vm/store/atomic-file.ts";
import { checkTree, cloneTree, createTree, diskFile, findSnapshot, planDelete, planRevert, planSnapshot, setPin, type TreeRecord } from "../../src/vm/tree/snapshot-tree.ts";
import { MachineManager } from "../../src/vm/manager/machine-manager.ts";
import { createMachine, deleteSnapshotStopped, describeTree, sizeOfIn, snapshotStopped, cloneMachine, removeStopped, revertStopped, diffSnapshots } from "../../src/vm/manager/machine-operations.ts";
import { scratchDir } from "../helpers/tools.ts";
import { readImage } from "../helpers/read-image.ts";

test("names: path separators, control characters, length and dots are refused with E_USAGE", () => {
  for (const bad of ["", "a/b", "a\\b", "a\nb", "tab\there", "\u007f", ".", "..", "-x", " lead", "trail ", "x".repeat(NAME_BYTES_MAX + 1)]) {
    assert.throws(() => validateName("machine", bad), (error: { code?: string }) => error.code === "E_USAGE", JSON.stringify(bad));
  }
  for (const good of ["web-1", "Debian 12", "snap.2024-01-01", "é", "x".repeat(NAME_BYTES_MAX)]) assert.equal(validateName("snapshot", good), good);
  // `vm diff` reads "current" as the live disk, so no snapshot may be called that; a machine may.
  assert.throws(() => validateName("snapshot", "current"), (error: { code?: string; message?: string }) => error.code === "E_USAGE" && /reserved/.test(error.message ?? ""));
  assert.equal(validateName("machine", "current"), "current");
  assert.equal(validateName("snapshot", "Current"), "Current");
  // The store's own directories start with '.' (.NAME.creating-PID) and listings skip them: no machine may.
  assert.throws(() => validateName("machine", ".hidden"), (error: { code?: string; message?: string }) => error.code === "E_USAGE" && /starts with '\.'/.test(error.message ?? ""));
  assert.equal(validateName("snapshot", ".hidden"), ".hidden");
});

test("snapshot lookup: no name ever equals another snapshot's id; built-in keys are no ids", () => {
  let tree = chainOf(["s2"]); // named s2, id s1
  const request = { description: "", createdAt: "2026-11-28T00:00:00Z", hasState: false, sizeBytes: 1 << 20 };
  // A name that is a present id is refused...
  assert.throws(() => planSnapshot(tree, { ...request, name: "s1" }), (error: { code?: string; message?: string }) => error.code === "E_SNAPSHOT_EXISTS" && /id of snapshot 's2'/.test(error.message ?? ""));
  // ...and a new id skips the number whose "sN" a present snapshot is named.
  const planned = planSnapshot(tree, { ...request, name: "other" });
  assert.equal(planned.snapshot.id, "s3");
  tree = planned.tree;
  assert.equal(findSnapshot(tree, "s2").name, "s2");
  assert.equal(findSnapshot(tree, "s3").name, "other");
  assert.equal(findSnapshot(tree, "s1").name, "s2");
  // Deleting "s2" twice (a retry) deletes it once, then finds nothing: never the other snapshot.
  tree = planDelete(tree, "s2", () => 1, { running: false }).tree;
  assert.throws(() => planDelete(tree, "s2", () => 1, { running: false }), { code: "E_SNAPSHOT_NOT_FOUND" });
  for (const key of ["constructor", "__proto__", "toString", "valueOf", "hasOwnProperty"]) {
    assert.throws(() => findSnapshot(tree, key), { code: "E_SNAPSHOT_NOT_FOUND" }, key);
    assert.throws(() => planDelete(tree, key, () => 1, { running: false }), { code: "E_SNAPSHOT_NOT_FOUND" }, key);
  }
  // A store written before names were kept apart from ids: an ambiguous reference is refused, not guessed.
  const legacy = cloneTree(tree);
  legacy.snapshots.s3.name = "s1";
  legacy.snapshots.s1 = { ...legacy.snapshots.s3, id: "s1", name: "first" };
  assert.throws(() => findSnapshot(legacy, "s1"), { code: "E_USAGE", message: /'s1' is the name of snapshot s3 and the id of snapshot 'first'/ });
});

test("home: --home, then SNAPSTACK_HOME, then ~/.local/share/snapstack", () => {
  assert.equal(resolveHome("/a", { SNAPSTACK_HOME: "/b" }), "/a");
  assert.equal(resolveHome(undefined, { SNAPSTACK_HOME: "/b" }), "/b");
  assert.equal(resolveHome(undefined, { HOME: "/h" }), "/h/.local/share/snapstack");
});

function chainOf(names: string[]): TreeRecord {
  let tree = createTree(1 << 20).tree;
  for (const name of names) tree = planSnapshot(tree, { name, description: "", createdAt: name, hasState: false, sizeBytes: 1 << 20 }).tree;
  return tree;
}

test("planner: delete a middle snapshot merges into the cheaper neighbour", () => {
  const tree = chainOf(["a", "b", "c"]);
  const layerOf = (name: string): string => Object.values(tree.snapshots).find((s) => s.name === name)!.layer;
  // b's layer is big, c's small: commit c into b's layer (cost c).
  const bigB = planDelete(tree, "b", (file) => (file.includes(layerOf("b")) ? 1000 : 10), { running: false });
  assert.deepEqual(bigB.steps.map((step) => step.kind), ["remove-snapshot-files", "commit", "rebase-unsafe", "remove-layer"]);
  checkTree(bigB.tree);
  // b's layer is small: stream it into c's layer (cost b).
  const smallB = planDelete(tree, "b", (file) => (file.includes(layerOf("b")) ? 10 : 1000), { running: false });
  assert.deepEqual(smallB.steps.map((step) => step.kind), ["remove-snapshot-files", "stream", "remove-layer"]);
  assert.equal(Object.keys(smallB.tree.layers).length, 3);
  // Deleting the current snapshot's parent while running never commits the live top away.
  const running = planDelete(tree, "c", (file) => (file.includes(layerOf("c")) ? 1000 : 1), { running: true });
  assert.deepEqual(running.steps.map((step) => step.kind), ["remove-snapshot-files", "stream", "remove-layer"]);
  assert.equal(running.tree.current.snapshot, Object.values(running.tree.snapshots).find((s) => s.name === "b")!.id);
});

test("planner: a node with two children is streamed into both; a revert drops the old top", () => {
  let tree = chainOf(["root"]);
  tree = planSnapshot(tree, { name: "left", description: "", createdAt: "1", hasState: false, sizeBytes: 1 << 20 }).tree;
  tree = planRevert(tree, "root", 1 << 20, () => 0).tree;
  tree = planSnapshot(tree, { name: "right", description: "", createdAt: "2", hasState: false, sizeBytes: 1 << 20 }).tree;
  const plan = planDelete(tree, "root", () => 100, { running: false });
  assert.equal(plan.steps.filter((step) => step.kind === "stream").length, 2);
  assert.equal(Object.keys(plan.tree.layers).length, 3);
  assert.deepEqual(Object.values(plan.tree.snapshots).map((s) => s.parent), [null, null]);
});

async function readAll(path: string): Promise<Buffer> {
  return Buffer.from(await readImage(path));
}

/** Write 64 KiB of `byte` at `offset` of the current layer of disk `disk` (0: the first). */
async function writeTop(store: MachineStore, name: string, offset: number, byte: number, disk = 0): Promise<void> {
  const tree = store.loadTree(name);
  const device = await openImage(stepPath(store.machineDir(name), diskFile(tree.layers[tree.current.layer].file, disk)));
  try {
    await device.write(offset, new Uint8Array(65536).fill(byte));
  } finally {
    await device.close();
  }
}

test("journal: an interrupted delete is finished at the next start; contents intact", async (t) => {
  const store = new MachineStore(scratchDir(t));
  await createMachine(store, { name: "m", diskSizeBytes: 1 << 20 });
  for (const [index, name] of ["a", "b", "c"].entries()) {
    await writeTop(store, "m", index * 65536, 0x11 * (index + 1));
    await snapshotStopped(store, "m", { snapshot: name });
  }
  const dir = store.machineDir("m");
  const before = describeTree(store, "m");
  const tree = store.loadTree("m");
  const contentOf = async (t2: TreeRecord, name: string): Promise<Buffer> =>
    readAll(stepPath(dir, t2.layers[Object.values(t2.snapshots).find((s) => s.name === name)!.layer].file));
  const expectedC = await contentOf(tree, "c");
  const plan = planDelete(tree, "b", sizeOfIn(dir), { running: false });
  // Simulate a kill after the journal and the first two steps.
  writeJsonAtomic(store.journalPath("m"), { operation: "delete-snapshot", steps: plan.steps, wipe: false, tree: plan.tree, startedAt: "" });
  for (const step of plan.steps.slice(0, 2)) await executeStep(dir, step);
  const reopened = new MachineStore(store.home);
  assert.equal(await reopened.recover("m"), "delete-snapshot");
  assert.equal(existsSync(reopened.journalPath("m")), false);
  const after = reopened.loadTree("m");
  checkTree(after);
  assert.deepEqual(Object.values(after.snapshots).map((s) => s.name).sort(), ["a", "c"]);
  assert.ok((await contentOf(after, "c")).equals(expectedC));
  assert.equal(readdirSync(join(dir, "layers")).length, Object.keys(after.layers).length);
  assert.equal(before.snapshots.length, 3);
});

test("machine operations: bad input, clone pins its layer, diff, remove", async (t) => {
  const store = new MachineStore(scratchDir(t));
  await assert.rejects(createMachine(store, { name: "a/b", diskSizeBytes: 1 << 20 }), { code: "E_USAGE" });
  await assert.rejects(createMachine(store, { name: "m" }), { code: "E_USAGE" });
  // A directory as the kernel: refused when the machine is made, not at its first start.
  await assert.rejects(createMachine(store, { name: "k", diskSizeBytes: 1 << 20, kernel: store.machinesDir }), { code: "E_ACCESS", message: /kernel .*: not a regular file/ });
  assert.ok(!store.has("k"));
  await createMachine(store, { name: "m", diskSizeBytes: 1 << 20 });
  await assert.rejects(createMachine(store, { name: "m", diskSizeBytes: 1 << 20 }), { code: "E_EXISTS" });
  await assert.rejects(snapshotStopped(store, "nope", { snapshot: "x" }), { code: "E_NOT_FOUND" });
  await writeTop(store, "m", 0, 0xaa);
  await snapshotStopped(store, "m", { snapshot: "one" });
  await assert.rejects(snapshotStopped(store, "m", { snapshot: "one" }), { code: "E_SNAPSHOT_EXISTS" });
  await assert.rejects(revertStopped(store, "m", "zzz"), { code: "E_SNAPSHOT_NOT_FOUND" });
  await writeTop(store, "m", 131072, 0xbb);
  await snapshotStopped(store, "m", { snapshot: "two" });
  const diff = await diffSnapshots(store, "m", "one", "two");
  assert.deepEqual(diff.ranges.map((r) => [r.start, r.length]), [[131072, 65536]]);
  // "current" is the live disk; no snapshot can take that name.
  await assert.rejects(snapshotStopped(store, "m", { snapshot: "current" }), { code: "E_USAGE" });
  await writeTop(store, "m", 262144, 0xcc);
  const live = await diffSnapshots(store, "m", "two", "current");
  assert.deepEqual(live.ranges.map((r) => [r.start, r.length]), [[262144, 65536]]);

  await cloneMachine(store, "m", "one", "c1");
  assert.deepEqual(store.loadTree("m").pins[store.loadTree("m").snapshots.s1.layer], ["c1"]);
  await deleteSnapshotStopped(store, "m", "one");
  const view = describeTree(store, "m");
  assert.deepEqual(view.snapshots.map((s) => s.name), ["two"]);
  // The clone still reads the snapshot's data.
  const cloneTree = store.loadTree("c1");
  const cloneDisk = await readAll(stepPath(store.machineDir("c1"), cloneTree.layers[cloneTree.current.layer].file));
  assert.equal(cloneDisk[0], 0xaa);
  assert.equal(cloneDisk[131072], 0);
  await assert.rejects(removeStopped(store, "m"), { code: "E_IN_USE" });
  await removeStopped(store, "c1", { wipe: true });
  assert.deepEqual(store.loadTree("m").pins, {});
  assert.equal(Object.keys(store.loadTree("m").layers).length, 2);
  await removeStopped(store, "m");
  assert.deepEqual(store.list(), []);
});

test("diff --disk: each disk of a machine is compared on its own; a disk the machine lacks is E_USAGE", async (t) => {
  const store = new MachineStore(scratchDir(t));
  await createMachine(store, { name: "m", diskSizeBytes: 1 << 20, extraDiskSizesBytes: [2 << 20] });
  await writeTop(store, "m", 0, 0xaa, 0);
  await writeTop(store, "m", 0, 0xab, 1);
  await snapshotStopped(store, "m", { snapshot: "one" });
  // Between the snapshots only the second disk changes, at 1 MiB (past the first disk's end).
  await writeTop(store, "m", 1 << 20, 0xbb, 1);
  await snapshotStopped(store, "m", { snapshot: "two" });
  const first = await diffSnapshots(store, "m", "one", "two");
  assert.equal(first.disk, 1);
  assert.deepEqual(first.ranges, [], "the first disk did not change");
  const second = await diffSnapshots(store, "m", "one", "two", { disk: 2 });
  assert.equal(second.disk, 2);
  assert.deepEqual(second.ranges.map((r) => [r.start, r.length]), [[1 << 20, 65536]]);
  assert.equal(second.changedBytes, 65536);
  for (const disk of [0, 3, 1.5]) await assert.rejects(diffSnapshots(store, "m", "one", "two", { disk }), { code: "E_USAGE" });
});

test("remove --wipe zeroes every disk's layers before unlinking them; remove reports what the machine's directory held", async (t) => {
  const home = scratchDir(t);
  const store = new MachineStore(join(home, "store"));
  const linksDir = join(home, "links");
  mkdirSync(linksDir);
  for (const wipe of [true, false]) {
    const name = wipe ? "wiped" : "plain";
    await createMachine(store, { name, diskSizeBytes: 1 << 20, extraDiskSizesBytes: [1 << 20] });
    await writeTop(store, name, 0, 0xab, 0);
    await writeTop(store, name, 65536, 0xab, 1);
    await snapshotStopped(store, name, { snapshot: "s" });
    await writeTop(store, name, 131072, 0xab, 1);
    const layersDir = join(store.machineDir(name), "layers");
    const layerNames = readdirSync(layersDir);
    assert.ok(layerNames.some((file) => file.includes(".d1.")), `no second-disk layer among ${layerNames.join(", ")}`);
    // Hard links keep the removed files' bytes readable.
    for (const file of layerNames) linkSync(join(layersDir, file), join(linksDir, `${name}-${file}`));
    const held = treeAllocatedBytes(store.machineDir(name));
    const { freedBytes } = await removeStopped(store, name, { wipe });
    if (wipe) {
      for (const file of layerNames) assert.equal(readFileSync(join(linksDir, `${name}-${file}`)).indexOf(0xab), -1, `${file} still holds the pattern`);
    } else {
      assert.equal(freedBytes, held);
    }
  }
});

test("delete --wipe whose merge commits a layer into the deleted snapshot's: the clusters the commit frees there are zeroed too", async (t) => {
  const store = new MachineStore(scratchDir(t));
  await createMachine(store, { name: "m", diskSizeBytes: 1 << 20 });
  const pattern = Buffer.from("deleted-snapshot-secret!");
  const top = async (): Promise<Awaited<ReturnType<typeof openImage>>> => {
    const tree = store.loadTree("m");
    return openImage(stepPath(store.machineDir("m"), tree.layers[tree.current.layer].file));
  };
  let device = await top();
  // 256 KiB of the pattern in what becomes snapshot one's layer (the bigger of the two)...
  await device.write(0, Buffer.alloc(4 * 65536, pattern));
  await device.close();
  await snapshotStopped(store, "m", { snapshot: "one" });
  // ...zeroed in two's layer (zero clusters over it): committing two's layer into one's frees those clusters.
  device = await top();
  await device.writeZeroes(0, 4 * 65536);
  await device.close();
  await snapshotStopped(store, "m", { snapshot: "two" });
  const result = await deleteSnapshotStopped(store, "m", "one", { wipe: true });
  assert.ok(result.mergedBytes > 0);
  const tree = store.loadTree("m");
  assert.deepEqual(Object.values(tree.snapshots).map((snapshot) => snapshot.name), ["two"]);
  const layersDir = join(store.machineDir("m"), "layers");
  for (const file of readdirSync(layersDir)) assert.equal(readFileSync(join(layersDir, file)).indexOf(pattern), -1, `${file} still holds the deleted data`);
  device = await top();
  try {
    const guest = Buffer.alloc(4 * 65536, 1);
    await device.read(0, guest);
    assert.ok(guest.equals(Buffer.alloc(4 * 65536)), "the disk reads the zeroes");
  } finally {
    await device.close();
  }
});

test("daemon start: a kill between two steps of clone or remove leaves no pin for a missing clone and no staging directory", async (t) => {
  const store = new MachineStore(scratchDir(t));
  await createMachine(store, { name: "src", diskSizeBytes: 1 << 20 });
  await writeTop(store, "src", 0, 0x5a);
  await snapshotStopped(store, "src", { snapshot: "s" });
  await cloneMachine(store, "src", "s", "kept");
  // Killed after the pin was saved, before the clone existed: its staging directory and the pin remain.
  const tree = store.loadTree("src");
  const layer = Object.values(tree.snapshots)[0].layer;
  store.saveTree("src", setPin(tree, layer, "ghost", true, sizeOfIn(store.machineDir("src"))).tree);
  const deadPid = 4194305; // above the kernel's largest pid: never a live process
  const staging = join(store.machinesDir, `.ghost.creating-${deadPid}`);
  mkdirSync(join(staging, "layers"), { recursive: true });
  const live = join(store.machinesDir, `.busy.creating-${process.pid}`);
  mkdirSync(live);
  assert.deepEqual(store.loadTree("src").pins[layer], ["ghost", "kept"]);
  const lines: string[] = [];
  await new MachineManager(store, { log: (line) => lines.push(line) }).init();
  assert.deepEqual(store.loadTree("src").pins[layer], ["kept"], lines.join("\n"));
  assert.ok(!existsSync(staging), "the dead process's staging directory is gone");
  assert.ok(existsSync(live), "a live process's staging directory is left alone");
  assert.ok(lines.some((line) => /released layer .* 'ghost'/.test(line)), lines.join("\n"));
  // With the real clone gone too, the source can be removed.
  await removeStopped(store, "kept");
  await removeStopped(store, "src");
  assert.ok(!store.has("src"));
});

test("revert: the snapshot's configuration comes back with its disk, in the journal (a replay after a failed revert brings both)", async (t) => {
  const store = new MachineStore(scratchDir(t));
  await createMachine(store, { name: "m", diskSizeBytes: 1 << 20, memoryBytes: 256 << 20 });
  await snapshotStopped(store, "m", { snapshot: "a" });
  const changed = { ...store.loadConfig("m"), memoryBytes: 512 << 20, cpus: 3 };
  writeJsonAtomic(join(store.machineDir("m"), "config.json"), changed);
  // The revert's new top cannot be created (a directory holds its name): it fails after writing its journal.
  const tree = store.loadTree("m");
  const blocker = stepPath(store.machineDir("m"), `layers/L${tree.nextLayerNumber}.qcow2`);
  mkdirSync(blocker);
  await assert.rejects(revertStopped(store, "m", "a"));
  assert.ok(store.hasJournal("m"));
  assert.equal(store.loadConfig("m").memoryBytes, 512 << 20, "nothing applied yet");
  rmdirSync(blocker);
  assert.equal(await store.recover("m"), "revert");
  const config = store.loadConfig("m");
  assert.deepEqual([config.memoryBytes, config.cpus, config.name], [256 << 20, 1, "m"]);
  assert.equal(store.loadTree("m").current.snapshot, Object.values(store.loadTree("m").snapshots)[0].id);
  // And directly: a revert that runs through brings the configuration as well.
  writeJsonAtomic(join(store.machineDir("m"), "config.json"), changed);
  await revertStopped(store, "m", "a");
  assert.equal(store.loadConfig("m").memoryBytes, 256 << 20);
});
