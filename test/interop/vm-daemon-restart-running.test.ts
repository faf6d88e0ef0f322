/**
 * Daemon restart with a RUNNING machine: the daemon (`snapstack serve`, a
 * child process) is killed with SIGKILL at random moments of a live
 * snapshot (with VM state or disk-only), a revert (to a running state) and
 * a delete on a real guest (test guest kit, TCG), then restarted.
 *
 * What a killed daemon leaves, as defined by docs/vm.md: its QEMU is an
 * orphan whose disk nobody serves any more; the next daemon kills it at
 * start (no QEMU outlives that), replays the journal, and the machine is
 * stopped. Checked after every restart:
 *   - no QEMU of the store is left, the machine is stopped;
 *   - the store is consistent: no journal, the tree loads and keeps its
 *     invariants, layer files are exactly the tree's, layers <= snapshots
 *     + 1, `qemu-img check` passes on every layer;
 *   - every snapshot's disk holds what the guest had written when it was
 *     taken (a snapshot the kill interrupted exists completely or not at
 *     all; one whose state save was cut becomes disk-only), a state file
 *     exists for every snapshot that claims one, and the current disk is
 *     the old one or, for an interrupted revert, the target's.
 * The machine is brought back by reverting to a snapshot with state (the
 * guest must resume and read its markers back) or, with none left (a kill
 * cut a state save), by booting; the last snapshot with state is never
 * the target of a delete, to keep boots rare. At the end every snapshot
 * is reverted to and checked.
 *
 * Prints its seed (SNAPSTACK_SEED replays); SNAPSTACK_VM_RUNNING_RESTARTS
 * sets the number of kills (default 10: about a minute here).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";
import { MachineStore } from "../../src/vm/store/machine-store.ts";
import { checkTree } from "../../src/vm/tree/snapshot-tree.ts";
import type { MachineStatus } from "../../src/vm/manager/machine-manager.ts";
import { buildGuest, type GuestConsole } from "../helpers/guest-kit.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import {
  checkLayers,
  counterAfterRestore,
  killChild,
  machineConsole,
  qemuProcessesOf,
  readCurrentDisk,
  readSnapshotDisk,
  sleep,
  startServe,
  waitGone,
  type ServedDaemon,
} from "../helpers/vm-daemon.ts";

const MiB = 1024 * 1024;
const DISK_BYTES = 16 * MiB;
const MEMORY_BYTES = 128 * MiB;
const ROUNDS = Number(process.env.SNAPSTACK_VM_RUNNING_RESTARTS ?? 10);
/** Marker slots: one 512-byte sector at each MiB from 1 to MARKER_SLOTS. */
const MARKER_SLOTS = 8;
/** Kills land this long after the request was sent, at most (live operations here take 0.1 to 1 s). */
const KILL_DELAY_MS_MAX = 900;
const GUEST_TIMEOUT_MS = 90_000;

/** Slot -> text: what the guest wrote to its disk. */
type Markers = Map<number, string>;

interface ModelSnapshot {
  markers: Markers;
  /**
   * Bounds of the guest's counter at the snapshot's instant, when it completed normally: the
   * last one printed before the request and the last one printed when it returned.
   */
  counter: { low: number; high: number } | null;
}

function expectedDisk(markers: Markers): Buffer {
  const disk = Buffer.alloc(DISK_BYTES);
  for (const [slot, text] of markers) disk.write(text, slot * MiB, "ascii");
  return disk;
}

test("SIGKILL of the daemon during live snapshot, revert and delete of a running VM: no leaked QEMU, consistent store, every snapshot reverts", { timeout: 600_000 }, async (t) => {
  if (!requireTools(t, "qemu-system-x86_64", "qemu-img")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (SNAPSTACK_SEED=${seed} to replay)`);
  console.log(`vm-daemon-restart-running seed ${seed}`);
  const random = createRandom(seed);
  const guest = await buildGuest();
  // (Assigned in closures or later: typed so that the compiler does not take them for always null.)
  let daemon = null as ServedDaemon | null;
  let guestConsole = null as GuestConsole | null;
  let home = "";
  // Registered before the scratch directory's removal, so it runs first.
  t.after(async () => {
    guestConsole?.close();
    if (daemon !== null) await killChild(daemon.child);
    for (const pid of qemuProcessesOf(home, ["vm"])) process.kill(pid, "SIGKILL");
  });
  home = scratchDir(t, "ss-restart-run-");
  const store = new MachineStore(home);
  daemon = await startServe(home);
  const api = (): ServedDaemon["api"] => daemon!.api;
  await api().request("POST", "/machines", { name: "vm", memoryBytes: MEMORY_BYTES, diskSizeBytes: DISK_BYTES, kernel: guest.kernelPath, initrd: guest.initrdPath, append: guest.append });

  const model = new Map<string, ModelSnapshot>();
  let current: Markers = new Map();
  let serial = 0;
  let interrupted = 0;
  const opsDone: string[] = [];

  const status = (): Promise<MachineStatus> => api().request<MachineStatus>("GET", "/machines/vm");
  const openConsole = (): GuestConsole => {
    guestConsole?.close();
    guestConsole = machineConsole(home, "vm");
    return guestConsole;
  };
  const writeMarker = async (slot: number, text: string): Promise<void> => {
    const result = await guestConsole!.runCommand(`printf '${text}' | dd of=/dev/vda bs=512 seek=${slot * 2048} count=1 conv=sync,fsync 2>&1 && sync`, { timeoutMs: GUEST_TIMEOUT_MS });
    assert.equal(result.exitCode, 0, result.output.join("\n"));
    current = new Map(current).set(slot, text);
  };
  const readMarker = async (slot: number): Promise<string> => {
    const result = await guestConsole!.runCommand(`dd if=/dev/vda bs=512 skip=${slot * 2048} count=1 2>/dev/null | head -c 16 | tr -d '\\000'`, { timeoutMs: GUEST_TIMEOUT_MS });
    return result.output.join("");
  };
  /** The guest reads back what the model says, at one slot that holds a marker (or slot 1). */
  const guestAgrees = async (markers: Markers): Promise<void> => {
    const slots = [...markers.keys()];
    const slot = slots.length > 0 ? slots[random.int(slots.length)] : 1;
    assert.equal(await readMarker(slot), markers.get(slot) ?? "", `the guest reads slot ${slot}`);
  };

  /**
   * Revert through the API to a snapshot with state; the guest resumes from it. A running
   * machine is stopped first, so that every counter after `since` is the restored guest's.
   */
  const revertRunning = async (name: string): Promise<void> => {
    guestConsole?.close();
    if ((await status()).state === "running") await api().request("POST", "/machines/vm/stop", { force: true });
    const since = guestConsole?.mark() ?? 0;
    const result = await api().request<{ state: string }>("POST", `/machines/vm/snapshots/${name}/revert`, {});
    assert.equal(result.state, "running");
    openConsole();
    const counter = await counterAfterRestore(guestConsole!, since, null, GUEST_TIMEOUT_MS);
    const expected = model.get(name)!.counter;
    if (expected !== null) assert.ok(counter >= expected.low && counter <= expected.high + 1, `revert to ${name}: counter ${counter} continues from ${expected.low}..${expected.high}`);
    current = new Map(model.get(name)!.markers);
    await guestAgrees(current);
  };

  /** Bring a stopped machine up: a snapshot with state if any (resumes), else a boot. */
  const bringUp = async (): Promise<void> => {
    const withState = Object.values(store.loadTree("vm").snapshots).filter((snapshot) => snapshot.hasState);
    if (withState.length > 0) {
      await revertRunning(withState[random.int(withState.length)].name);
      return;
    }
    const since = guestConsole?.mark() ?? 0;
    await api().request("POST", "/machines/vm/start");
    openConsole();
    await guestConsole!.waitFor(/^READY vda/m, { since, timeoutMs: GUEST_TIMEOUT_MS });
    await guestAgrees(current);
  };

  const checkAfterRestart = async (op: { kind: string; target: string | null; pending: string | null; before: Markers }): Promise<void> => {
    const tree = store.loadTree("vm");
    checkTree(tree);
    assert.equal(store.hasJournal("vm"), false, "journal replayed");
    assert.ok(Object.keys(tree.layers).length <= Object.keys(tree.snapshots).length + 1, "layers <= snapshots + 1");
    await checkLayers(home, "vm");
    const names = Object.values(tree.snapshots).map((snapshot) => snapshot.name);
    if (op.pending !== null && names.includes(op.pending)) model.set(op.pending, { markers: op.before, counter: null });
    for (const name of [...model.keys()]) {
      if (names.includes(name)) continue;
      assert.equal(name, op.kind === "delete" ? op.target : null, `snapshot ${name} vanished`);
      model.delete(name);
    }
    assert.deepEqual(names.sort(), [...model.keys()].sort(), "the tree holds the model's snapshots");
    for (const snapshot of Object.values(tree.snapshots)) {
      assert.ok((await readSnapshotDisk(home, "vm", snapshot.name)).equals(expectedDisk(model.get(snapshot.name)!.markers)), `snapshot ${snapshot.name}: its disk`);
      if (snapshot.hasState) {
        const statePath = join(store.snapshotDir("vm", snapshot.id), "state.bin");
        assert.ok(existsSync(statePath) && statSync(statePath).size > 0, `snapshot ${snapshot.name}: its state file`);
      }
    }
    const disk = await readCurrentDisk(home, "vm");
    if (disk.equals(expectedDisk(op.before))) current = op.before;
    else {
      assert.equal(op.kind, "revert", "only a revert changes the current disk");
      assert.ok(disk.equals(expectedDisk(model.get(op.target!)!.markers)), `the current disk is the old one or ${op.target}'s`);
      current = new Map(model.get(op.target!)!.markers);
    }
  };

  // Boot once; a first snapshot with state, taken without a kill (its counter is known).
  await bringUp();
  await guestConsole!.nextCounter({ timeoutMs: GUEST_TIMEOUT_MS });
  await writeMarker(1, "BASE");
  const low = guestConsole!.lastCounter(0)!;
  await api().request("POST", "/machines/vm/snapshots", { snapshot: "base" });
  model.set("base", { markers: new Map(current), counter: { low, high: guestConsole!.lastCounter(0)! } });

  for (let round = 0; round < ROUNDS; round++) {
    if ((await status()).state !== "running") await bringUp();
    await writeMarker(1 + random.int(MARKER_SLOTS), `R${round}-${random.int(1000)}`);
    const names = [...model.keys()];
    // The last snapshot with VM state is not deleted: without one, bringing the machine back is a boot (slow under TCG).
    const withState = Object.values(store.loadTree("vm").snapshots).filter((snapshot) => snapshot.hasState).map((snapshot) => snapshot.name);
    const deletable = withState.length === 1 ? names.filter((name) => name !== withState[0]) : names;
    const roll = random.next();
    const before = new Map(current);
    let op: { kind: string; target: string | null; pending: string | null; before: Markers };
    let request: Promise<unknown>;
    const kind = names.length === 0 || roll < 0.4 || (roll >= 0.7 && deletable.length === 0) ? "snapshot" : roll < 0.7 ? "revert" : "delete";
    if (kind === "snapshot") {
      const name = `s${serial++}`;
      const diskOnly = random.next() < 0.3;
      op = { kind: diskOnly ? "snapshot --disk-only" : "snapshot", target: null, pending: name, before };
      request = api().request("POST", "/machines/vm/snapshots", { snapshot: name, diskOnly });
    } else if (kind === "revert") {
      const target = names[random.int(names.length)];
      const wipe = random.next() < 0.3;
      op = { kind: "revert", target, pending: null, before };
      request = api().request("POST", `/machines/vm/snapshots/${target}/revert`, { wipe });
    } else {
      const target = deletable[random.int(deletable.length)];
      const wipe = random.next() < 0.3;
      op = { kind: "delete", target, pending: null, before };
      request = api().request("DELETE", `/machines/vm/snapshots/${target}${wipe ? "?wipe=1" : ""}`);
    }
    let finished = false;
    request.then(
      () => (finished = true),
      () => (finished = true),
    );
    // Skewed toward short delays: most kills land inside the operation, some after it.
    const delayMs = Math.floor(KILL_DELAY_MS_MAX * random.next() ** 2);
    await sleep(delayMs);
    if (!finished) interrupted++;
    opsDone.push(`${op.kind}${op.target !== null ? ` ${op.target}` : ""}${op.pending !== null ? ` ${op.pending}` : ""} +${delayMs}ms${finished ? "" : " (cut)"}`);
    const orphans = qemuProcessesOf(home, ["vm"]);
    await killChild(daemon!.child);
    daemon = await startServe(home);

    // The new daemon killed the orphaned QEMU before answering; the machine is stopped.
    for (const pid of orphans) assert.ok(await waitGone(pid, 10_000), `QEMU ${pid} of the killed daemon is gone`);
    assert.deepEqual(qemuProcessesOf(home, ["vm"]), [], "no QEMU left running");
    assert.equal((await status()).state, "stopped");
    await checkAfterRestart(op);
  }
  t.diagnostic(`${ROUNDS} kills, ${interrupted} during a request: ${opsDone.join("; ")}`);

  // Every snapshot still reverts correctly: disk-only ones on the stopped machine (their disk),
  // then those with state (the guest resumes and reads its markers).
  if ((await status()).state === "running") await api().request("POST", "/machines/vm/stop", { force: true });
  const tree = store.loadTree("vm");
  for (const snapshot of Object.values(tree.snapshots).filter((s) => !s.hasState)) {
    const result = await api().request<{ state: string }>("POST", `/machines/vm/snapshots/${snapshot.name}/revert`, {});
    assert.equal(result.state, "stopped");
    assert.ok((await readCurrentDisk(home, "vm")).equals(expectedDisk(model.get(snapshot.name)!.markers)), `revert to ${snapshot.name}: its disk`);
  }
  for (const snapshot of Object.values(tree.snapshots).filter((s) => s.hasState)) await revertRunning(snapshot.name);
  guestConsole?.close();
  await api().request("POST", "/machines/vm/stop", { force: true }).catch(() => {});
  await checkLayers(home, "vm");
  for (const snapshot of Object.values(store.loadTree("vm").snapshots)) {
    assert.ok((await readSnapshotDisk(home, "vm", snapshot.name)).equals(expectedDisk(model.get(snapshot.name)!.markers)), `snapshot ${snapshot.name} after all reverts`);
  }
  t.diagnostic(`${model.size} snapshots at the end (${Object.values(tree.snapshots).filter((s) => s.hasState).length} with VM state)`);
});
