/**
 * Daemon restart: the daemon (`snapstack serve`, a child process) is
 * killed with SIGKILL at random moments of snapshot, revert and delete
 * requests, then restarted. After each restart the store must be
 * consistent (journal replayed, tree invariants, layer files exactly the
 * tree's, layers <= snapshots + 1), every snapshot's disk must hold what
 * it held when taken, and every snapshot must still revert correctly.
 * Stopped machines (no QEMU) keep it bounded; the disk is large enough
 * that merges take a while. Prints its seed.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { openImage } from "../../src/chain/open-image.ts";
import { MachineStore } from "../../src/vm/store/machine-store.ts";
import { stepPath } from "../../src/vm/store/layer-steps.ts";
import { checkTree } from "../../src/vm/tree/snapshot-tree.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { scratchDir } from "../helpers/tools.ts";
import { killChild, readDisk, startServe } from "../helpers/vm-daemon.ts";

const DISK_BYTES = 64 * 1024 * 1024;
const ROUNDS = Number(process.env.SNAPSTACK_VM_RESTARTS ?? 12);

test("SIGKILL of the daemon during snapshot/revert/delete: consistent store, every snapshot reverts correctly", { timeout: 240_000 }, async (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (SNAPSTACK_SEED=${seed} to replay)`);
  console.log(`vm-daemon-restart seed ${seed}`);
  const random = createRandom(seed);
  let daemon = null as Awaited<ReturnType<typeof startServe>> | null;
  t.after(() => (daemon !== null ? killChild(daemon.child) : undefined)); // before the directory's removal
  const home = scratchDir(t, "ss-restart-");
  daemon = await startServe(home);
  await daemon.api.request("POST", "/machines", { name: "m", diskSizeBytes: DISK_BYTES });
  const store = new MachineStore(home);
  const dir = store.machineDir("m");
  const topPath = (): string => {
    const tree = store.loadTree("m");
    return stepPath(dir, tree.layers[tree.current.layer].file);
  };
  const model = new Map<string, Buffer>();
  let serial = 0;
  let interrupted = 0;

  const scribble = async (): Promise<void> => {
    const device = await openImage(topPath());
    try {
      for (let writes = 0; writes < 8; writes++) {
        const length = 1024 * 1024;
        await device.write(random.int(DISK_BYTES / length) * length, random.bytes(length));
      }
    } finally {
      await device.close();
    }
  };

  const checkStore = async (): Promise<void> => {
    const tree = store.loadTree("m");
    checkTree(tree);
    assert.equal(store.hasJournal("m"), false, "journal replayed");
    assert.ok(Object.keys(tree.layers).length <= Object.keys(tree.snapshots).length + 1);
    assert.deepEqual(readdirSync(join(dir, "layers")).sort(), Object.values(tree.layers).map((l) => l.file.slice(7)).sort());
    const names = Object.values(tree.snapshots).map((s) => s.name);
    for (const name of names) assert.ok(model.has(name), `snapshot ${name} is known`);
    for (const name of [...model.keys()]) if (!names.includes(name)) model.delete(name); // a delete that completed
    for (const snapshot of Object.values(tree.snapshots)) {
      assert.ok((await readDisk(stepPath(dir, tree.layers[snapshot.layer].file))).equals(model.get(snapshot.name)!), `snapshot ${snapshot.name} content`);
    }
  };

  for (let round = 0; round < ROUNDS; round++) {
    await scribble();
    const current = await readDisk(topPath());
    const names = [...model.keys()];
    const roll = random.next();
    let request: Promise<unknown>;
    let pendingSnapshot: string | null = null;
    if (roll < 0.4 || names.length < 2) {
      pendingSnapshot = `s${serial++}`;
      model.set(pendingSnapshot, current);
      request = daemon.api.request("POST", "/machines/m/snapshots", { snapshot: pendingSnapshot });
    } else if (roll < 0.65) {
      request = daemon.api.request("POST", `/machines/m/snapshots/${names[random.int(names.length)]}/revert`, { wipe: random.next() < 0.3 });
    } else {
      request = daemon.api.request("DELETE", `/machines/m/snapshots/${names[random.int(names.length)]}${random.next() < 0.3 ? "?wipe=1" : ""}`);
    }
    let finished = false;
    request.then(
      () => (finished = true),
      () => (finished = true),
    );
    await new Promise((wake) => setTimeout(wake, random.int(150)));
    if (!finished) interrupted++;
    await killChild(daemon.child);
    daemon = await startServe(home);
    if (pendingSnapshot !== null && !Object.values(store.loadTree("m").snapshots).some((s) => s.name === pendingSnapshot)) model.delete(pendingSnapshot);
    await checkStore();
  }
  // Every snapshot still reverts correctly.
  for (const name of [...model.keys()]) {
    await daemon.api.request("POST", `/machines/m/snapshots/${name}/revert`, {});
    assert.ok((await readDisk(topPath())).equals(model.get(name)!), `revert to ${name}`);
  }
  await checkStore();
  t.diagnostic(`${ROUNDS} kills, ${interrupted} during a request; ${model.size} snapshots at the end`);
});
