/**
 * Randomized test of the snapshot tree on a stopped machine (no QEMU):
 * thousands of write / snapshot / revert / delete operations against a
 * model of every snapshot's disk content. Checks every snapshot's bytes,
 * the current disk, that the layer files on disk are exactly the tree's,
 * and that layers <= live snapshots + 1. Prints its seed
 * (SNAPSTACK_SEED=<seed> replays; SNAPSTACK_VM_OPS sets the count).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { openImage } from "../../src/chain/open-image.ts";
import { MachineStore } from "../../src/vm/store/machine-store.ts";
import { setDurableWrites } from "../../src/vm/store/atomic-file.ts";
import { stepPath } from "../../src/vm/store/layer-steps.ts";
import { checkTree } from "../../src/vm/tree/snapshot-tree.ts";
import { createMachine, deleteSnapshotStopped, revertStopped, snapshotStopped } from "../../src/vm/manager/machine-operations.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { scratchDir } from "../helpers/tools.ts";
import { readImage } from "../helpers/read-image.ts";

const DISK_BYTES = 1024 * 1024;
const OPS = Number(process.env.SNAPSTACK_VM_OPS ?? 2000);
const CHECK_EVERY = 100;


test("thousands of snapshot/revert/delete operations match a model; layers <= snapshots + 1", async (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (SNAPSTACK_SEED=${seed} to replay), ${OPS} operations`);
  console.log(`vm-tree-random seed ${seed}`);
  const random = createRandom(seed);
  setDurableWrites(false);
  t.after(() => setDurableWrites(true));
  // On tmpfs when there is one: the test is about content, not durability, and fsync dominates elsewhere.
  const root = existsSync("/dev/shm") ? mkdtempSync("/dev/shm/snapstack-vm-random-") : scratchDir(t, "snapstack-vm-random-");
  t.after(() => rmSync(root, { recursive: true, force: true }));
  const store = new MachineStore(root);
  await createMachine(store, { name: "m", diskSizeBytes: DISK_BYTES });
  const dir = store.machineDir("m");
  let current = new Uint8Array(DISK_BYTES);
  const model = new Map<string, Uint8Array>();
  let serial = 0;
  const counts = { write: 0, snapshot: 0, revert: 0, delete: 0, wipe: 0 };

  const check = async (full: boolean): Promise<void> => {
    const tree = store.loadTree("m");
    checkTree(tree);
    assert.equal(store.hasJournal("m"), false);
    const snapshotCount = Object.keys(tree.snapshots).length;
    assert.equal(snapshotCount, model.size);
    const layerCount = Object.keys(tree.layers).length;
    assert.ok(layerCount <= snapshotCount + 1, `layers ${layerCount} <= snapshots ${snapshotCount} + 1`);
    const files = readdirSync(join(dir, "layers")).sort();
    assert.deepEqual(files, Object.values(tree.layers).map((layer) => layer.file.slice("layers/".length)).sort());
    if (!full) return;
    assert.deepEqual(await readImage(stepPath(dir, tree.layers[tree.current.layer].file)), current, "current disk");
    for (const snapshot of Object.values(tree.snapshots)) {
      const actual = await readImage(stepPath(dir, tree.layers[snapshot.layer].file));
      assert.ok(Buffer.from(actual).equals(Buffer.from(model.get(snapshot.name)!)), `snapshot ${snapshot.name} content`);
    }
  };

  for (let op = 0; op < OPS; op++) {
    const names = [...model.keys()];
    const roll = random.next();
    if (roll < 0.35) {
      const tree = store.loadTree("m");
      const device = await openImage(stepPath(dir, tree.layers[tree.current.layer].file));
      try {
        for (let writes = 1 + random.int(4); writes > 0; writes--) {
          const length = 512 * (1 + random.int(16));
          const offset = 512 * random.int((DISK_BYTES - length) / 512);
          const data = random.next() < 0.2 ? new Uint8Array(length) : random.bytes(length);
          if (data.every((byte) => byte === 0)) await device.writeZeroes(offset, length);
          else await device.write(offset, data);
          current.set(data, offset);
        }
      } finally {
        await device.close();
      }
      counts.write++;
    } else if (roll < 0.6 || names.length === 0) {
      const name = `snap-${serial++}`;
      await snapshotStopped(store, "m", { snapshot: name, description: `op ${op}` });
      model.set(name, current.slice());
      counts.snapshot++;
    } else if (roll < 0.75) {
      const name = names[random.int(names.length)];
      await revertStopped(store, "m", name);
      current = model.get(name)!.slice();
      counts.revert++;
    } else {
      const name = names[random.int(names.length)];
      const wipe = random.next() < 0.1;
      await deleteSnapshotStopped(store, "m", name, { wipe });
      model.delete(name);
      counts.delete++;
      if (wipe) counts.wipe++;
    }
    await check(op % CHECK_EVERY === CHECK_EVERY - 1);
  }
  await check(true);
  t.diagnostic(`operations: ${JSON.stringify(counts)}; snapshots left ${model.size}`);
});
