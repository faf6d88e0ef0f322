/**
 * Repair as qemu-img: for each kind of damage `qemu-img check -r all`
 * repairs (leaks, refcounts too low or too high, refcount 0 on a
 * referenced cluster, COPIED flags, L1/L2 entries unaligned, past the end,
 * at the header or with reserved bits, preallocated zero entries
 * unaligned, compressed entries with COPIED or past the end, broken
 * refcount table entries, snapshot tables with incomplete entries or too
 * much extra data, ...), `snapstack img check -r all` on one copy and
 * `qemu-img check -r all` on another; then `qemu-img check` must judge both
 * the same, and clean wherever qemu-img repaired its copy.
 * (test/interop/qcow2-check.test.ts compares the reports line by line.)
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { CONFIGS, DAMAGES, inspect, makeConfigImage } from "../helpers/check-damage.ts";
import { qemuImg, snapstack } from "./cli-helpers.ts";

/** Configurations with internal snapshots and each table layout (v2, extended L2, 512-byte clusters, 1-bit refcounts). */
const REPAIR_CONFIGS = CONFIGS.filter((config) => ["snapshots", "snapshots-c4k-v2", "extl2", "c512", "rb1"].includes(config.name));

test("check -r all repairs every damage qemu-img repairs, and qemu-img agrees", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  let damaged = 0;
  let repairedByQemu = 0;
  const kinds = new Set<string>();
  const notRepaired = new Set<string>();
  for (const config of REPAIR_CONFIGS) {
    const pristine = await makeConfigImage(dir, config);
    for (const damage of DAMAGES) {
      if (damage.repairs !== undefined && !damage.repairs.includes("all")) continue; // -r all fails in qemu-img too
      const path = join(dir, "damaged.qcow2");
      copyFileSync(pristine, path);
      const layout = inspect(path);
      if (!damage.apply(layout, path)) continue;
      if (statSync(path).size <= layout.bytes.length) writeFileSync(path, layout.bytes);
      damaged++;
      const where = `${config.name}: ${damage.name}`;
      copyFileSync(path, join(dir, "ours.qcow2"));
      copyFileSync(path, join(dir, "theirs.qcow2"));
      const ours = await snapstack(["img", "check", "-r", "all", "ours.qcow2"], { cwd: dir });
      const theirs = await qemuImg(["check", "-r", "all", "theirs.qcow2"], dir);
      assert.equal(ours.code, theirs.code, `${where}: exit status of check -r all (ours: ${ours.stderr}; qemu-img: ${theirs.stderr})`);
      const afterOurs = await qemuImg(["check", "ours.qcow2"], dir);
      const afterTheirs = await qemuImg(["check", "theirs.qcow2"], dir);
      if (afterTheirs.code === 0) {
        repairedByQemu++;
        kinds.add(damage.name);
        assert.equal(afterOurs.code, 0, `${where}: qemu-img check after snapstack's repair: ${afterOurs.stdout}${afterOurs.stderr}`);
        const ourRecheck = await snapstack(["img", "check", "ours.qcow2"], { cwd: dir });
        assert.equal(ourRecheck.code, 0, `${where}: snapstack check after its repair: ${ourRecheck.stderr}`);
      } else {
        notRepaired.add(damage.name);
        assert.equal(afterOurs.code, afterTheirs.code, `${where}: qemu-img judges both repaired copies alike`);
      }
    }
  }
  t.diagnostic(`damaged images: ${damaged}; repaired by qemu-img -r all: ${repairedByQemu}, all repaired by snapstack too (${[...kinds].join("; ")})`);
  t.diagnostic(`left damaged by qemu-img -r all in some configuration, judged alike after both repairs: ${[...notRepaired].join("; ")}`);
});
