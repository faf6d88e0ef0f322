/**
 * Randomized: writes mixed with overlay create, commit (-b too), rebase,
 * stream, done by snapstack and sometimes by qemu-img, checked against a
 * raw model of every layer still in the chain after every step (qemu-img
 * compare and qemu-img check on each). Prints its seed; replay with
 * SNAPSTACK_SEED=<seed>.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { openImage } from "../../src/chain/open-image.ts";
import { commitImage, rebaseImage, streamImage } from "../../src/chain/jobs/index.ts";
import { DiskModel, assertClean, assertMatchesModel, qemuImg, snapstackOk } from "./jobs-helpers.ts";

const SIZE = 2 * 1024 * 1024;
const STEPS = 30;

interface Layer {
  name: string;
  model: DiskModel;
}

test("random writes, overlays, commit, rebase and stream keep every layer equal to its model", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  console.log(`jobs-random seed ${seed}`);
  const random = createRandom(seed);
  const dir = scratchDir(t);
  const path = (name: string): string => join(dir, name);
  let counter = 0;
  const chain: Layer[] = [{ name: "l0.qcow2", model: new DiskModel(SIZE) }];
  await qemuImg("create", "-f", "qcow2", "-o", "cluster_size=4096", path("l0.qcow2"), String(SIZE));
  const top = (): Layer => chain[chain.length - 1];
  const log: string[] = [];

  for (let step = 0; step < STEPS; step++) {
    // Below 40 write, 40-59 new overlay, then commit / rebase / stream where the chain allows.
    let roll = random.int(100);
    if (roll >= 60 && chain.length === 1) roll = 40 + random.int(20);
    if (roll >= 75 && roll < 88 && chain.length < 3) roll = 60 + random.int(15);
    const byQemu = random.int(4) === 0;
    let action: string;
    if (roll < 40) {
      const writes = 1 + random.int(4);
      const device = await openImage(path(top().name));
      try {
        for (let i = 0; i < writes; i++) {
          const offset = random.int(SIZE / 512) * 512;
          const length = Math.min(SIZE - offset, 512 * (1 + random.int(64)));
          if (random.int(5) === 0) {
            await device.writeZeroes(offset, length);
            top().model.fill(offset, length, 0);
          } else {
            const pattern = 1 + random.int(255);
            await device.write(offset, new Uint8Array(length).fill(pattern));
            top().model.fill(offset, length, pattern);
          }
        }
      } finally {
        await device.close();
      }
      action = `write x${writes}`;
    } else if (roll < 60) {
      const name = `l${++counter}.qcow2`;
      await snapstackOk("img", "create", "-f", "qcow2", "-b", top().name, "-F", "qcow2", "-o", "cluster_size=4096", path(name));
      chain.push({ name, model: top().model.clone() });
      action = `create ${name}`;
    } else if (roll < 75 && chain.length >= 2) {
      const depth = 1 + random.int(chain.length - 1);
      const base = chain[chain.length - 1 - depth];
      if (depth === 1 && byQemu) await qemuImg("commit", path(top().name));
      else if (depth === 1) await commitImage(path(top().name));
      else {
        await commitImage(path(top().name), { base: base.name });
        // The images in between no longer hold a meaningful state: the top moves onto the base.
        await rebaseImage(path(top().name), { backingFile: base.name, backingFormat: "qcow2", unsafe: true });
        chain.splice(chain.length - 1 - depth + 1, depth - 1);
      }
      base.model = top().model.clone();
      action = `commit depth ${depth}${byQemu && depth === 1 ? " (qemu-img)" : ""}`;
    } else if (roll < 88 && chain.length >= 3) {
      const depth = 2 + random.int(chain.length - 2);
      const base = chain[chain.length - 1 - depth];
      if (byQemu) await qemuImg("rebase", "-b", base.name, "-F", "qcow2", path(top().name));
      else await rebaseImage(path(top().name), { backingFile: base.name, backingFormat: "qcow2" });
      chain.splice(chain.length - 1 - depth + 1, depth - 1);
      action = `rebase onto ${base.name}${byQemu ? " (qemu-img)" : ""}`;
    } else if (chain.length >= 2) {
      const flatten = random.int(3) === 0;
      if (flatten) {
        await streamImage(path(top().name));
        chain.splice(0, chain.length - 1);
      } else {
        const depth = 1 + random.int(chain.length - 1);
        const base = chain[chain.length - 1 - depth];
        await streamImage(path(top().name), { base: base.name });
        chain.splice(chain.length - 1 - depth + 1, depth - 1);
      }
      action = `stream${flatten ? " (flatten)" : ""}`;
    } else {
      action = "skip";
    }
    log.push(`${step}: ${action} -> [${chain.map((layer) => layer.name).join(" <- ")}]`);
    for (const layer of chain) {
      await assertClean(path(layer.name)).catch((error: unknown) => assert.fail(`seed ${seed}\n${log.join("\n")}\n${String(error)}`));
      await assertMatchesModel(path(layer.name), layer.model, dir, `model-${layer.name}`).catch((error: unknown) =>
        assert.fail(`seed ${seed}\n${log.join("\n")}\n${String(error)}`),
      );
    }
  }
  t.diagnostic(log.join("\n"));
});
