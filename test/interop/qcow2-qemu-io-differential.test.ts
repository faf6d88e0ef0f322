/**
 * Randomized differential test of the qcow2 engine against qemu-io 7.2:
 * random configurations and unaligned requests (test/helpers/qemu-io-differential.ts).
 *
 * SNAPSTACK_SEED replays a run; SNAPSTACK_QEMU_IO_CASE=<case seed> replays
 * one case; SNAPSTACK_QEMU_IO_CASES sets the number of cases (default 40;
 * SNAPSTACK_SOAK=1: 1000).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { describeConfig, generateCase, qemuIoCommand, runDifferentialCase } from "../helpers/qemu-io-differential.ts";

const SOAK = process.env.SNAPSTACK_SOAK === "1";
const CASES = Number(process.env.SNAPSTACK_QEMU_IO_CASES ?? (SOAK ? 1000 : 40));

test("random unaligned writes, zero writes, discards, compressed writes and snapshots: ours checks clean, reads as a byte model and as QEMU's", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const only = process.env.SNAPSTACK_QEMU_IO_CASE;
  let caseSeeds: number[];
  if (only !== undefined && only !== "") {
    caseSeeds = [Number(only)];
  } else {
    const seed = testSeed();
    t.diagnostic(`seed ${seed} (replay with SNAPSTACK_SEED=${seed})`);
    const random = createRandom(seed);
    caseSeeds = Array.from({ length: CASES }, () => random.int(2 ** 31));
  }
  let qemuSide = 0;
  let operations = 0;
  for (const caseSeed of caseSeeds) {
    const testCase = generateCase(caseSeed);
    operations += testCase.ops.length;
    const failure = await runDifferentialCase(testCase, join(dir, "case"));
    if (failure === null) continue;
    const where = `case seed ${caseSeed} (${describeConfig(testCase.config)}; replay with SNAPSTACK_QEMU_IO_CASE=${caseSeed})`;
    if (failure.kind === "qemu-side") {
      // QEMU 7.2's own image was wrong (ours read as the model says): noted, not ours to fail on.
      qemuSide++;
      t.diagnostic(`${where}: QEMU's side: ${failure.detail}`);
      continue;
    }
    assert.fail(`${where}: ${failure.kind}: ${failure.detail}\noperations:\n${testCase.ops.map((op) => `  ${qemuIoCommand(op)}`).join("\n")}`);
  }
  t.diagnostic(`${caseSeeds.length} cases, ${operations} operations; QEMU's own image wrong in ${qemuSide}`);
  assert.ok(qemuSide <= Math.max(1, caseSeeds.length / 10), "QEMU's side is blamed rarely; more often means the model or ours is wrong");
});
