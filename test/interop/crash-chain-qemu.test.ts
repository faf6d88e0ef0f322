/**
 * The chain crash test's files judged by qemu-img itself: for a sample of
 * crash points of random chain workloads (overlay create, commit, rebase,
 * stream, guest writes and internal snapshots; test/helpers/crash-chain.ts),
 * after snapstack's own checks, every file is written out next to the
 * others (backing names resolve as in the run) and `qemu-img check` must
 * find no corruption (leaks allowed; dirty lazy-refcount images are judged
 * after snapstack's rebuild), and `qemu-img check -r leaks` must leave none.
 *
 * SNAPSTACK_SEED replays; SNAPSTACK_QEMU_CHAIN_CRASH_POINTS (default 150;
 * SNAPSTACK_SOAK=1: 3000).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { createRandom, testSeed } from "../helpers/random.ts";
import { requireTools, run, scratchDir } from "../helpers/tools.ts";
import { ChainCrashReplay, CrashedFiles, describeOp, judgeChainCrash, recordChainRun } from "../helpers/crash-chain.ts";

const SOAK = process.env.SNAPSTACK_SOAK === "1";
const POINTS = Number(process.env.SNAPSTACK_QEMU_CHAIN_CRASH_POINTS ?? (SOAK ? 3000 : 150));
const POINTS_PER_WORKLOAD = 10;

async function qemuCheck(path: string, repair?: "leaks"): Promise<{ corruptions: number; leaks: number; checkErrors: number; raw: string }> {
  const result = await run("qemu-img", ["check", "-f", "qcow2", "--output=json", ...(repair !== undefined ? ["-r", repair] : []), path]);
  const json = JSON.parse(result.stdout || "{}") as { corruptions?: number; leaks?: number; "check-errors"?: number };
  return { corruptions: json.corruptions ?? 0, leaks: json.leaks ?? 0, checkErrors: json["check-errors"] ?? 0, raw: `${result.stdout}${result.stderr}` };
}

test("qemu-img check agrees on crashed chains: leaks at most, -r leaks leaves none", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (replay with SNAPSTACK_SEED=${seed})`);
  const random = createRandom(seed);
  let points = 0;
  let files = 0;
  let leaky = 0;
  let workload = 0;
  while (points < POINTS) {
    const workloadSeed = random.int(2 ** 31);
    const wr = createRandom(workloadSeed);
    const dir = scratchDir(t, `snapstack-crash-chain-qemu-${workload++}-`);
    const chainRun = await recordChainRun(wr, dir, 25 + wr.int(30));
    try {
      const replay = new ChainCrashReplay(chainRun);
      const writes = replay.writeIndices;
      const chosen = new Set<number>();
      const count = Math.min(POINTS_PER_WORKLOAD, writes.length, POINTS - points);
      while (chosen.size < count) chosen.add(wr.int(writes.length));
      for (const i of [...chosen].sort((a, b) => a - b)) {
        const k = replay.opAt(writes[i]);
        const where = `workload seed ${workloadSeed}, crash at write ${i + 1}/${writes.length} during op ${k} (${describeOp(chainRun.ops[k])})`;
        const crashed = new CrashedFiles(replay.crashAt(writes[i], wr.next));
        await judgeChainCrash(chainRun, k, crashed, where, false);
        // The files as snapstack left them (dirty ones rebuilt), side by side.
        const out = join(dir, `crash-${points}`);
        mkdirSync(out);
        for (const [path, file] of crashed.contents) writeFileSync(join(out, basename(path)), file.contents());
        const copiedMayLag = chainRun.ops[k].kind.startsWith("snapshot-");
        for (const path of crashed.contents.keys()) {
          const target = join(out, basename(path));
          const before = await qemuCheck(target);
          assert.equal(before.checkErrors, 0, `${where}: ${basename(path)}: qemu-img check errors: ${before.raw}`);
          if (!copiedMayLag) assert.equal(before.corruptions, 0, `${where}: ${basename(path)}: qemu-img check: ${before.raw}`);
          files++;
          if (before.leaks > 0 && before.corruptions === 0) {
            leaky++;
            await qemuCheck(target, "leaks");
            const after = await qemuCheck(target);
            assert.equal(after.corruptions + after.leaks + after.checkErrors, 0, `${where}: ${basename(path)}: after qemu-img check -r leaks: ${after.raw}`);
          }
        }
        points++;
      }
    } finally {
      await chainRun.disk.close();
    }
  }
  t.diagnostic(`chain crash points checked by qemu-img: ${points}; files checked: ${files}; with leaks (none left after -r leaks): ${leaky}; corruptions: 0`);
});
