/**
 * The machine manager's live operations on a real guest (TCG unless
 * SNAPSTACK_ACCEL says otherwise), driven in-process:
 * - a snapshot with VM state taken live (forced on TCG, where QEMU 7.2 is
 *   not trusted to restore it: liveSaveSupported) freezes the disks at the
 *   migration's switchover: a guest loop writing its RAM counter to the
 *   disk before printing it has printed, by then, what the disk holds or
 *   one less; with the accelerator's default path, a revert finds a disk
 *   at most one step from the RAM (one point in time);
 * - disk-only snapshots in a row while the guest writes;
 * - deleting the snapshot the VM sits on while the guest keeps writing: the
 *   merge runs on the frozen top, the guest's writes meanwhile land in a
 *   temporary layer folded back at the end; nothing is lost, every layer
 *   checks clean, no temporary layer is left.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, readdirSync, renameSync, statSync } from "node:fs";
import { join } from "node:path";
import { openImage } from "../../src/chain/open-image.ts";
import { MachineStore } from "../../src/vm/store/machine-store.ts";
import { MachineManager, writesLayerSteps } from "../../src/vm/manager/machine-manager.ts";
import { sizeOfIn } from "../../src/vm/manager/machine-operations.ts";
import { executeStep, stepPath } from "../../src/vm/store/layer-steps.ts";
import { planDelete } from "../../src/vm/tree/snapshot-tree.ts";
import { buildGuest, GuestConsole } from "../helpers/guest-kit.ts";
import { requireTools, runOk, scratchDir } from "../helpers/tools.ts";

process.env.SNAPSTACK_ACCEL ??= "tcg";

const MiB = 1024 * 1024;
const DISK_BYTES = 32 * MiB;
/** Sector the guest's loop writes its sequence number to. */
const SEQ_SECTOR = 100;
/** Where the bulk data of the delete test lives (MiB offsets). */
const BULK_MIB = 8;
const BULK_BYTES = 4 * MiB;
/** Sectors the guest writes while a delete runs. */
const DURING_DELETE_SECTOR = 24 * 2048;
const DURING_DELETE_COUNT = 40;

async function readDisk(manager: MachineManager, name: string, layerId: string, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
  const tree = manager.store.loadTree(name);
  const device = await openImage(stepPath(manager.store.machineDir(name), tree.layers[layerId].file), { readOnly: true });
  try {
    const buffer = Buffer.alloc(lengthBytes);
    await device.read(offsetBytes, buffer);
    return buffer;
  } finally {
    await device.close();
  }
}

/** Fill `lengthBytes` at `offsetBytes` of a stopped machine's top layer (or of `file`, a layer file in its directory) with `fill`. */
async function writeChunk(store: MachineStore, name: string, offsetBytes: number, lengthBytes: number, fill: number, file?: string): Promise<void> {
  const tree = store.loadTree(name);
  const device = await openImage(stepPath(store.machineDir(name), file ?? tree.layers[tree.current.layer].file));
  try {
    await device.write(offsetBytes, Buffer.alloc(lengthBytes, fill));
  } finally {
    await device.close();
  }
}

test("live operations on a running guest: state saved live at one instant, disk-only snapshots, delete under the running VM", { timeout: 600_000 }, async (t) => {
  if (!requireTools(t, "qemu-system-x86_64", "qemu-img")) return;
  const guest = await buildGuest();
  let switchoverLogBytes: number | null = null;
  const manager = new MachineManager(new MachineStore(scratchDir(t, "ss-vmmgr-")), {
    log: (line) => {
      // The guest is stopped while this is logged: the serial log ends where the guest was.
      if (/frozen at the switchover/.test(line)) switchoverLogBytes = statSync(manager.serialLogPath("vm")).size;
      t.diagnostic(line);
    },
  });
  t.after(() => manager.shutdown());
  const name = "vm";
  await manager.create({ name, memoryBytes: 256 * MiB, diskSizeBytes: DISK_BYTES, kernel: guest.kernelPath, initrd: guest.initrdPath, append: guest.append });
  await manager.start(name);
  let console = new GuestConsole(manager.serialLogPath(name), manager.serialSocketPath(name));
  t.after(() => console.close());
  await console.waitFor(/^READY vda/m, { timeoutMs: 120_000 });
  await console.nextCounter({ timeoutMs: 60_000 });
  const run = async (command: string, timeoutMs = 60_000): Promise<string[]> => {
    const result = await console.runCommand(command, { timeoutMs });
    assert.equal(result.exitCode, 0, `${command}: ${result.output.join("\n")}`);
    return result.output;
  };

  // 1. A loop keeps its sequence number in RAM and writes it to the disk (flushed) before printing it.
  await run(`(n=0; while [ ! -e /tmp/stop-seq ]; do n=$((n+1)); printf '%08d' $n | dd of=/dev/vda bs=512 seek=${SEQ_SECTOR} count=1 conv=sync,fsync 2>/dev/null; echo "SEQ $n" >/dev/ttyS0; sleep 0.2; done) >/dev/null 2>&1 &`);
  await console.waitFor(/^SEQ 3$/m, { timeoutMs: 60_000 });
  const seqOf = (text: string): number => Number([...text.matchAll(/^SEQ (\d+)$/gm)].at(-1)?.[1] ?? -1);
  const frozenSeqOf = async (layerId: string): Promise<number> => Number((await readDisk(manager, name, layerId, SEQ_SECTOR * 512, 8)).toString("ascii"));

  // 1a. The live path (forced: under TCG QEMU 7.2 would restore such a state unreliably, see
  //     liveSaveSupported): RAM copied while the guest runs, the disks frozen at the switchover,
  //     where the guest is stopped: the disk holds what the guest had printed by then, or one more.
  const savedLive = process.env.SNAPSTACK_LIVE_SAVE;
  process.env.SNAPSTACK_LIVE_SAVE = "1";
  let live;
  try {
    live = await manager.snapshot(name, { snapshot: "live" });
  } finally {
    if (savedLive === undefined) delete process.env.SNAPSTACK_LIVE_SAVE;
    else process.env.SNAPSTACK_LIVE_SAVE = savedLive;
  }
  assert.equal(live.snapshot.hasState, true);
  assert.ok(live.timings.stateBytes > 0);
  t.diagnostic(`live snapshot with state: total ${live.timings.totalMs.toFixed(0)} ms, guest paused ${live.timings.pausedMs.toFixed(1)} ms, state ${(live.timings.stateBytes / MiB).toFixed(1)} MiB`);
  assert.ok(switchoverLogBytes !== null, "the manager froze the disks at the switchover");
  assert.ok(live.timings.pausedMs > 0 && live.timings.pausedMs < live.timings.totalMs);
  const printedAtSwitchover = seqOf(console.text().slice(0, switchoverLogBytes));
  const frozenLive = await frozenSeqOf(live.snapshot.layer);
  t.diagnostic(`live: SEQ ${printedAtSwitchover} printed at the switchover, disk frozen at ${frozenLive}`);
  assert.ok(frozenLive === printedAtSwitchover || frozenLive === printedAtSwitchover + 1, `disk ${frozenLive} vs printed ${printedAtSwitchover}: one instant`);

  // 1b. The default path on this accelerator, then a revert: RAM and disk from one instant.
  await console.waitFor(new RegExp(`^SEQ ${frozenLive + 3}$`, "m"), { timeoutMs: 60_000 });
  const snap = await manager.snapshot(name, { snapshot: "state" });
  assert.equal(snap.snapshot.hasState, true);
  t.diagnostic(`snapshot with state (default path): total ${snap.timings.totalMs.toFixed(0)} ms, guest paused ${snap.timings.pausedMs.toFixed(1)} ms`);
  const frozenSeq = await frozenSeqOf(snap.snapshot.layer);
  await console.waitFor(new RegExp(`^SEQ ${frozenSeq + 5}$`, "m"), { timeoutMs: 60_000 });
  console.close();
  const sinceRevert = console.mark();
  await manager.revert(name, "state");
  console = new GuestConsole(manager.serialLogPath(name), manager.serialSocketPath(name));
  const firstSeq = Number((await console.waitFor(/^SEQ (\d+)$/m, { since: sinceRevert, timeoutMs: 60_000 }))[1]);
  t.diagnostic(`disk frozen at SEQ ${frozenSeq}; RAM went on with SEQ ${firstSeq}`);
  assert.ok(firstSeq === frozenSeq || firstSeq === frozenSeq + 1, `the disk (${frozenSeq}) and RAM (next SEQ ${firstSeq}) are from one instant`);
  await run("touch /tmp/stop-seq");

  // 2. Disk-only snapshots in a row while the guest writes; each freezes what was written before it.
  for (let index = 0; index < 4; index++) {
    await run(`printf 'DISK-ONLY-${index}' | dd of=/dev/vda bs=512 seek=${2048 + index} count=1 conv=sync,fsync 2>/dev/null`);
    const result = await manager.snapshot(name, { snapshot: `d${index}`, diskOnly: true });
    t.diagnostic(`disk-only snapshot d${index}: paused ${result.timings.pausedMs.toFixed(1)} ms`);
    const sector = await readDisk(manager, name, result.snapshot.layer, (2048 + index) * 512, 512);
    assert.equal(sector.toString("ascii").replace(/\0+$/, ""), `DISK-ONLY-${index}`);
  }

  // 3. Bulk data, a snapshot on top of it, more data in the top, then delete that snapshot (the
  //    one the VM sits on: its layer is merged into the running top) while the guest writes.
  await run(`dd if=/dev/urandom of=/dev/vda bs=1M seek=${BULK_MIB} count=${BULK_BYTES / MiB} conv=fsync 2>/dev/null`);
  await manager.snapshot(name, { snapshot: "bulk", diskOnly: true });
  await run(`printf 'AFTER-BULK' | dd of=/dev/vda bs=512 seek=4096 count=1 conv=sync,fsync 2>/dev/null`);
  const bulkSum = (await run(`dd if=/dev/vda bs=1M skip=${BULK_MIB} count=${BULK_BYTES / MiB} iflag=direct 2>/dev/null | md5sum`))[0].split(" ")[0];
  await run(`(i=0; while [ $i -lt ${DURING_DELETE_COUNT} ]; do printf "W-$i" | dd of=/dev/vda bs=512 seek=$((${DURING_DELETE_SECTOR}+i)) count=1 conv=sync,fsync 2>/dev/null; i=$((i+1)); done; echo WRITER-DONE >/dev/ttyS0) >/dev/null 2>&1 &`);
  const deleted = await manager.deleteSnapshot(name, "bulk");
  t.diagnostic(`deleted the current snapshot while running: merged ${(deleted.mergedBytes / MiB).toFixed(1)} MiB, guest paused ${deleted.pausedMs.toFixed(1)} ms in all`);
  assert.ok(deleted.mergedBytes >= BULK_BYTES, `the bulk data was merged (${deleted.mergedBytes})`);
  await console.waitFor(/^WRITER-DONE$/m, { since: sinceRevert, timeoutMs: 120_000 });
  assert.equal((await run(`dd if=/dev/vda bs=1M skip=${BULK_MIB} count=${BULK_BYTES / MiB} iflag=direct 2>/dev/null | md5sum`))[0].split(" ")[0], bulkSum);
  assert.deepEqual(await run(`dd if=/dev/vda bs=512 skip=4096 count=1 iflag=direct 2>/dev/null | head -c 10`), ["AFTER-BULK"]);

  // 4. Stop; every layer checks clean, no temporary layer is left, the current disk holds everything.
  console.close();
  await manager.stop(name);
  const store = manager.store;
  const tree = store.loadTree(name);
  assert.ok(!Object.values(tree.snapshots).some((snapshot) => snapshot.name === "bulk"));
  assert.deepEqual(readdirSync(join(store.machineDir(name), "layers")).filter((file) => file.includes(".writes.")), []);
  assert.ok(Object.keys(tree.layers).length <= Object.keys(tree.snapshots).length + 1);
  for (const layer of Object.values(tree.layers)) {
    assert.ok(existsSync(stepPath(store.machineDir(name), layer.file)));
    await runOk("qemu-img", ["check", stepPath(store.machineDir(name), layer.file)]);
  }
  const bulk = await readDisk(manager, name, tree.current.layer, BULK_MIB * MiB, BULK_BYTES);
  assert.equal(createHash("md5").update(bulk).digest("hex"), bulkSum);
  const during = await readDisk(manager, name, tree.current.layer, DURING_DELETE_SECTOR * 512, DURING_DELETE_COUNT * 512);
  for (let index = 0; index < DURING_DELETE_COUNT; index++) {
    assert.equal(during.subarray(index * 512, index * 512 + 16).toString("ascii").replace(/\0+$/, ""), `W-${index}`, `write ${index} made during the delete`);
  }
});

test("clones and removes at the same time: locks in a fixed order (no deadlock), a clone's source cannot be removed", { timeout: 120_000 }, async (t) => {
  const manager = new MachineManager(new MachineStore(scratchDir(t, "ss-vmlock-")));
  await manager.create({ name: "a", diskSizeBytes: MiB });
  await manager.snapshot("a", { snapshot: "s" });
  await manager.clone("a", "s", "b");
  await assert.rejects(manager.remove("a"), { code: "E_IN_USE", message: /linked clone\(s\) b/ });
  assert.ok(manager.store.has("a"));

  // `clone a s b` takes a then b; `remove b` (a clone of a) takes b then a. Taken in any
  // order, these two deadlock once each holds its first lock.
  const withinDeadline = <T>(promise: Promise<T>, what: string): Promise<T> =>
    Promise.race([promise, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`${what}: deadlock (no answer in 20 s)`)), 20_000).unref())]);
  for (let round = 0; round < 20; round++) {
    if (!manager.store.has("b")) await manager.clone("a", "s", "b");
    const operations = [manager.clone("a", "s", "b"), manager.remove("b"), manager.remove("a")];
    const settled = await withinDeadline(Promise.allSettled(operations), `round ${round}`);
    const [cloneAgain, removeClone, removeSource] = settled;
    // Whatever the order: the clone is removed; the second clone of b fails (b exists, or a
    // is gone) or makes b again, and then a cannot be removed.
    assert.equal(removeClone.status, "fulfilled", String((removeClone as PromiseRejectedResult).reason));
    if (cloneAgain.status === "rejected") assert.ok(["E_EXISTS", "E_NOT_FOUND"].includes((cloneAgain.reason as { code: string }).code), String(cloneAgain.reason));
    if (removeSource.status === "fulfilled") {
      assert.ok(!manager.store.has("a"));
      assert.ok(!manager.store.has("b"), "a source is never removed under a clone");
      await manager.create({ name: "a", diskSizeBytes: MiB });
      await manager.snapshot("a", { snapshot: "s" });
    } else {
      assert.equal((removeSource.reason as { code?: string }).code, "E_IN_USE");
    }
  }
});

test("shutdown while a start is spawning QEMU: the start finishes and its QEMU is quit too; an operation still waiting is refused", { timeout: 120_000 }, async (t) => {
  if (!requireTools(t, "qemu-system-x86_64")) return;
  const manager = new MachineManager(new MachineStore(scratchDir(t, "ss-vmshut-")));
  await manager.create({ name: "vm", memoryBytes: 64 * MiB, diskSizeBytes: MiB });
  // No kernel: QEMU starts and its firmware finds nothing to boot, which is enough here.
  const starting = manager.start("vm");
  // Under way: its disks are served (the socket QEMU is given exists), QEMU is being spawned.
  const socket = join(manager.runDir("vm"), "nbd.sock");
  while (!existsSync(socket)) await new Promise((resolve) => setTimeout(resolve, 1));
  const shutdown = manager.shutdown();
  const waiting = manager.start("vm");
  const started = await starting;
  assert.equal(started.state, "running");
  const alive = (): boolean => {
    try {
      process.kill(started.pid!, 0);
      return true;
    } catch {
      return false;
    }
  };
  // Whatever fails below, no QEMU outlives the test (it would keep the test process alive).
  t.after(async () => {
    if (alive()) process.kill(started.pid!, "SIGKILL");
    await manager.stop("vm", { force: true }).catch(() => {});
  });
  await shutdown;
  await assert.rejects(waiting, { code: "E_ABORTED", message: /shutting down/ });
  // Before, shutdown() looked only at the machines already running: this QEMU went on without its disks.
  assert.equal(alive(), false, `QEMU ${started.pid} still runs after shutdown()`);
  assert.equal(manager.isRunning("vm"), false);
});

test("removing a linked clone while its source runs: the merge its pin held back runs on the live path, the source's top stays its top, no guest write is lost; --wipe under a running clone is refused", { timeout: 300_000 }, async (t) => {
  if (!requireTools(t, "qemu-system-x86_64", "qemu-img")) return;
  const guest = await buildGuest();
  const manager = new MachineManager(new MachineStore(scratchDir(t, "ss-vmunpin-")), { log: (line) => t.diagnostic(line) });
  t.after(() => manager.shutdown());
  await manager.create({ name: "u", memoryBytes: 128 * MiB, diskSizeBytes: DISK_BYTES, kernel: guest.kernelPath, initrd: guest.initrdPath, append: guest.append });
  await manager.start("u");
  assert.equal(statSync(manager.serialLogPath("u")).mode & 0o777, 0o600, "the console log is the owner's alone");
  const console = new GuestConsole(manager.serialLogPath("u"), manager.serialSocketPath("u"));
  t.after(() => console.close());
  await console.waitFor(/^READY vda/m, { timeoutMs: 120_000 });
  const run = async (command: string): Promise<string[]> => {
    const result = await console.runCommand(command, { timeoutMs: 60_000 });
    assert.equal(result.exitCode, 0, `${command}: ${result.output.join("\n")}`);
    return result.output;
  };
  const mark = (text: string, sector: number): Promise<string[]> => run(`printf '${text}' | dd of=/dev/vda bs=512 seek=${sector} count=1 conv=sync,fsync 2>/dev/null`);
  await run(`dd if=/dev/urandom of=/dev/vda bs=1M seek=24 count=2 conv=fsync 2>/dev/null`);
  const bulkSum = (await run(`dd if=/dev/vda bs=1M skip=24 count=2 iflag=direct 2>/dev/null | md5sum`))[0].split(" ")[0];
  // The bulk data lives in a's layer, under p's, on which the clone stands.
  await manager.snapshot("u", { snapshot: "a", diskOnly: true });
  await manager.snapshot("u", { snapshot: "p", diskOnly: true });
  await manager.clone("u", "p", "uc");
  // Deleting a streams its layer into p's and removes it. The running clone reads it through its
  // own open chain, which nothing reopens: --wipe (zeroing it in place) is refused while uc runs.
  await manager.start("uc");
  await assert.rejects(manager.deleteSnapshot("u", "a", { wipe: true }), { code: "E_IN_USE", message: /running linked clone\(s\) uc/ });
  assert.ok(Object.values(manager.store.loadTree("u").snapshots).some((snapshot) => snapshot.name === "a"), "the refused delete changed nothing");
  await manager.stop("uc", { force: true });
  // With the clone stopped, the same delete runs on the live path (u runs): the layer is wiped
  // once u's served chain has been reopened without it.
  await manager.deleteSnapshot("u", "a", { wipe: true });
  assert.equal((await run(`dd if=/dev/vda bs=1M skip=24 count=2 iflag=direct 2>/dev/null | md5sum`))[0].split(" ")[0], bulkSum);
  // Deleting p keeps its layer: the clone stands on it.
  await manager.deleteSnapshot("u", "p");
  await mark("AFTER-DELETE", 6144);
  // Removing the clone lets the source's tree merge that layer, with the source running (and wiped).
  await manager.remove("uc", { wipe: true });
  await mark("AFTER-REMOVE", 8192);
  // A clone of a snapshot that stays: its removal has nothing to merge.
  await manager.snapshot("u", { snapshot: "q", diskOnly: true });
  await manager.clone("u", "q", "qc");
  await manager.remove("qc");
  assert.ok(Object.values(manager.store.loadTree("u").snapshots).some((snapshot) => snapshot.name === "q"));
  await mark("AFTER-Q", 10240);
  assert.equal((await run(`dd if=/dev/vda bs=1M skip=24 count=2 iflag=direct 2>/dev/null | md5sum`))[0].split(" ")[0], bulkSum);
  console.close();
  await manager.stop("u");
  const store = manager.store;
  const tree = store.loadTree("u");
  for (const layer of Object.values(tree.layers)) {
    assert.ok(existsSync(stepPath(store.machineDir("u"), layer.file)), `${layer.file} exists`);
    await runOk("qemu-img", ["check", stepPath(store.machineDir("u"), layer.file)]);
  }
  const sector = async (at: number): Promise<string> => (await readDisk(manager, "u", tree.current.layer, at * 512, 16)).toString("ascii").replace(/\0+$/, "");
  assert.equal(await sector(6144), "AFTER-DELETE");
  assert.equal(await sector(8192), "AFTER-REMOVE");
  assert.equal(await sector(10240), "AFTER-Q");
  assert.equal(createHash("md5").update(await readDisk(manager, "u", tree.current.layer, 24 * MiB, 2 * MiB)).digest("hex"), bulkSum);
});

test("a delete under a running top killed at any step: the replay keeps the guest's writes from the temporary layer", { timeout: 120_000 }, async (t) => {
  const CHUNK = 64 * 1024;
  for (let killAfter = 0; killAfter <= 6; killAfter++) {
    const store = new MachineStore(scratchDir(t, "ss-vmwrites-"));
    const manager = new MachineManager(store);
    await manager.create({ name: "m", diskSizeBytes: 4 * MiB });
    const dir = store.machineDir("m");
    const writeTop = (offsetBytes: number, fill: number, file?: string): Promise<void> => writeChunk(store, "m", offsetBytes, CHUNK, fill, file);
    await writeTop(0, 1);
    await manager.snapshot("m", { snapshot: "base" });
    await writeTop(CHUNK, 2);
    await manager.snapshot("m", { snapshot: "sits-on" });
    await writeTop(2 * CHUNK, 3);
    // What the running delete journals: the temporary layer, the plan (stream into the top), the fold-back.
    const tree = store.loadTree("m");
    const plan = planDelete(tree, "sits-on", sizeOfIn(dir), { running: true });
    const { writesFile, createWrites, foldWrites } = writesLayerSteps(tree, 4 * MiB);
    const steps = [...createWrites, ...plan.steps, ...foldWrites];
    store.beginJournal("m", "delete-snapshot", { tree: plan.tree, steps });
    // The daemon ran `killAfter` steps (the guest writing into the temporary layer once it exists), then died.
    for (const [index, step] of steps.slice(0, killAfter).entries()) {
      await executeStep(dir, step);
      if (index === 0) await writeTop(3 * CHUNK, 4, writesFile);
    }
    assert.equal(await store.recover("m"), "delete-snapshot");
    const after = store.loadTree("m");
    assert.deepEqual(Object.values(after.snapshots).map((snapshot) => snapshot.name), ["base"]);
    assert.ok(!existsSync(join(dir, writesFile)), `kill after ${killAfter}: no temporary layer left`);
    const disk = await readDisk(manager, "m", after.current.layer, 0, 4 * CHUNK);
    const expected = [1, 2, 3, killAfter >= 1 ? 4 : 0];
    for (const [index, fill] of expected.entries()) assert.ok(disk.subarray(index * CHUNK, (index + 1) * CHUNK).equals(Buffer.alloc(CHUNK, fill)), `kill after ${killAfter}: chunk ${index}`);
    for (const layer of Object.values(after.layers)) await runOk("qemu-img", ["check", stepPath(dir, layer.file)]);
  }
});

test("an operation that failed part-way is finished before the machine's next one, never overwritten; one that cannot be finished yet refuses the next, and the daemon serves the others", { timeout: 120_000 }, async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const CHUNK = 64 * 1024;
  const store = new MachineStore(scratchDir(t, "ss-vmpending-"));
  let manager = new MachineManager(store);
  await manager.create({ name: "m", diskSizeBytes: 4 * MiB });
  await manager.create({ name: "other", diskSizeBytes: 4 * MiB });
  const dir = store.machineDir("m");
  const writeTop = (offsetBytes: number, fill: number): Promise<void> => writeChunk(store, "m", offsetBytes, CHUNK, fill);
  await writeTop(0, 1);
  await manager.snapshot("m", { snapshot: "a" });
  await writeTop(CHUNK, 2);
  await manager.snapshot("m", { snapshot: "b" });
  await writeTop(2 * CHUNK, 3);
  // A delete of `a` that ran its first step and failed (as on a full disk): b's layer half merged.
  const plan = planDelete(store.loadTree("m"), "a", sizeOfIn(dir), { running: false });
  store.beginJournal("m", "delete-snapshot", plan);
  await executeStep(dir, plan.steps[0]);
  // A step that cannot run yet (a layer it needs is away): the next operation is refused, the journal kept.
  const needed = plan.steps.map((step) => ("file" in step ? step.file : null)).find((file): file is string => file !== null && existsSync(join(dir, file)));
  assert.ok(needed !== undefined, "a step names a layer file");
  renameSync(join(dir, needed), join(dir, `${needed}.away`));
  manager = new MachineManager(store);
  await manager.init(); // does not throw: the other machine is served
  await manager.snapshot("other", { snapshot: "fine" });
  await assert.rejects(manager.snapshot("m", { snapshot: "c" }), /machine 'm': cannot finish its interrupted delete-snapshot first/);
  assert.ok(store.hasJournal("m"), "the unfinished journal is kept");
  renameSync(join(dir, `${needed}.away`), join(dir, needed));
  // Now the delete is finished first, then the snapshot is taken on the tree it made.
  await manager.snapshot("m", { snapshot: "c" });
  assert.ok(!store.hasJournal("m"));
  const tree = store.loadTree("m");
  assert.deepEqual(Object.values(tree.snapshots).map((snapshot) => snapshot.name).sort(), ["b", "c"]);
  const disk = await readDisk(manager, "m", tree.current.layer, 0, 3 * CHUNK);
  for (const [index, fill] of [1, 2, 3].entries()) assert.ok(disk.subarray(index * CHUNK, (index + 1) * CHUNK).equals(Buffer.alloc(CHUNK, fill)), `chunk ${index}`);
  const atB = await readDisk(manager, "m", Object.values(tree.snapshots).find((snapshot) => snapshot.name === "b")!.layer, 0, 3 * CHUNK);
  for (const [index, fill] of [1, 2, 0].entries()) assert.ok(atB.subarray(index * CHUNK, (index + 1) * CHUNK).equals(Buffer.alloc(CHUNK, fill)), `b: chunk ${index}`);
  for (const layer of Object.values(tree.layers)) await runOk("qemu-img", ["check", stepPath(dir, layer.file)]);
});

test("several disks: each its own NBD export, all in every snapshot at one instant; revert and delete (running and stopped) keep them together", { timeout: 600_000 }, async (t) => {
  if (!requireTools(t, "qemu-system-x86_64", "qemu-img")) return;
  const guest = await buildGuest();
  const store = new MachineStore(scratchDir(t, "ss-vmdisks-"));
  const manager = new MachineManager(store);
  t.after(() => manager.shutdown());
  const name = "two";
  await assert.rejects(manager.create({ name: "bad", diskSizeBytes: MiB, extraDiskSizesBytes: [0] }), { code: "E_INVALID_SIZE" });
  await manager.create({ name, memoryBytes: 256 * MiB, diskSizeBytes: 16 * MiB, extraDiskSizesBytes: [8 * MiB], kernel: guest.kernelPath, initrd: guest.initrdPath, append: guest.append });
  assert.deepEqual(store.loadConfig(name).extraDiskSizesBytes, [8 * MiB]);
  const dir = store.machineDir(name);
  const diskFiles = (layerId: string): string[] => {
    const tree = store.loadTree(name);
    return [tree.layers[layerId].file, tree.layers[layerId].file.replace(/\.qcow2$/, ".d1.qcow2")].map((file) => stepPath(dir, file));
  };
  const readSector = async (file: string, sector: number): Promise<string> => {
    const device = await openImage(file, { readOnly: true });
    try {
      const buffer = Buffer.alloc(512);
      await device.read(sector * 512, buffer);
      return buffer.toString("ascii").replace(/\0+$/, "");
    } finally {
      await device.close();
    }
  };

  await manager.start(name);
  let console = new GuestConsole(manager.serialLogPath(name), manager.serialSocketPath(name));
  t.after(() => console.close());
  await console.waitFor(/^READY vda vdb/m, { timeoutMs: 120_000 });
  const run = async (command: string): Promise<string[]> => {
    const result = await console.runCommand(command, { timeoutMs: 60_000 });
    assert.equal(result.exitCode, 0, `${command}: ${result.output.join("\n")}`);
    return result.output;
  };
  const mark = (device: string, text: string, sector: number): Promise<string[]> => run(`printf '${text}' | dd of=/dev/${device} bs=512 seek=${sector} count=1 conv=sync,fsync 2>/dev/null`);
  const readMark = async (device: string, sector: number): Promise<string> => (await run(`dd if=/dev/${device} bs=512 skip=${sector} count=1 iflag=direct 2>/dev/null | tr -d '\\000'`)).join("");
  assert.equal((await run("cat /sys/block/vdb/size"))[0], String((8 * MiB) / 512));

  await mark("vda", "A-ONE", 0);
  await mark("vdb", "B-ONE", 0);
  const one = await manager.snapshot(name, { snapshot: "one" });
  assert.equal(one.snapshot.hasState, true);
  const [frozenA, frozenB] = diskFiles(one.snapshot.layer);
  assert.equal(await readSector(frozenA, 0), "A-ONE");
  assert.equal(await readSector(frozenB, 0), "B-ONE");
  await mark("vda", "A-TWO", 0);
  await mark("vdb", "B-TWO", 0);
  await manager.snapshot(name, { snapshot: "two", diskOnly: true });
  await mark("vdb", "B-TOP", 1);

  // Delete "two" (the VM sits on it): both disks' layers merge into their running tops.
  const deleted = await manager.deleteSnapshot(name, "two");
  t.diagnostic(`deleted with two disks while running: merged ${deleted.mergedBytes} bytes, paused ${deleted.pausedMs.toFixed(1)} ms`);
  assert.equal(await readMark("vda", 0), "A-TWO");
  assert.equal(await readMark("vdb", 0), "B-TWO");
  assert.equal(await readMark("vdb", 1), "B-TOP");

  // Revert "one": both disks and RAM come back.
  console.close();
  await manager.revert(name, "one");
  console = new GuestConsole(manager.serialLogPath(name), manager.serialSocketPath(name));
  assert.equal(await readMark("vda", 0), "A-ONE");
  assert.equal(await readMark("vdb", 0), "B-ONE");
  assert.equal(await readMark("vdb", 1), "");
  console.close();
  await manager.stop(name);

  // Stopped: snapshot, delete, layer files per disk, all checked clean.
  await manager.snapshot(name, { snapshot: "three" });
  await manager.deleteSnapshot(name, "one");
  const tree = store.loadTree(name);
  assert.deepEqual(Object.values(tree.snapshots).map((snapshot) => snapshot.name), ["three"]);
  const files = readdirSync(join(dir, "layers")).sort();
  assert.deepEqual(files, Object.values(tree.layers).flatMap((layer) => diskFiles(layer.id).map((file) => file.slice(join(dir, "layers").length + 1))).sort());
  for (const file of files) await runOk("qemu-img", ["check", join(dir, "layers", file)]);
  const [threeA, threeB] = diskFiles(tree.snapshots[Object.keys(tree.snapshots)[0]].layer);
  assert.equal(await readSector(threeA, 0), "A-ONE");
  assert.equal(await readSector(threeB, 0), "B-ONE");
  // A linked clone gets both disks, each on the source's layer of that disk.
  await manager.clone(name, "three", "copy");
  const copyTree = store.loadTree("copy");
  const copyTop = copyTree.layers[copyTree.current.layer].file;
  assert.equal(await readSector(stepPath(store.machineDir("copy"), copyTop), 0), "A-ONE");
  assert.equal(await readSector(stepPath(store.machineDir("copy"), copyTop.replace(/\.qcow2$/, ".d1.qcow2")), 0), "B-ONE");
  await assert.rejects(manager.remove(name), { code: "E_IN_USE" });
  await manager.remove("copy");
  assert.equal((await manager.remove(name, { wipe: true })).freedBytes > 0, true);
  assert.ok(!existsSync(dir));
});
