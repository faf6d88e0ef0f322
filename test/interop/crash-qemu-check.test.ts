/**
 * The randomized crash test's images judged by qemu-img itself: for a
 * sample of crash points, `qemu-img check` of the crashed image reports no
 * corruption (leaks allowed), `qemu-img check -r leaks` then leaves none;
 * a dirty (lazy refcounts) image rebuilt by snapstack on open checks clean
 * with qemu-img. Most crash points run in the unit test with our checker.
 *
 * SNAPSTACK_SEED replays; SNAPSTACK_QEMU_CRASH_POINTS (default 300;
 * SNAPSTACK_SOAK=1: 5000).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { writeFileSync, readFileSync } from "node:fs";
import { CrashReplay } from "../../src/io/fault-file.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { requireTools, run, scratchDir } from "../helpers/tools.ts";
import { AllowedVersions, checkCrashedImage, describeScenario, headerIsDirty, openScenarioImage, prepareImages, randomOps, randomScenario, recordRun } from "../helpers/crash-workload.ts";

const SOAK = process.env.SNAPSTACK_SOAK === "1";
const POINTS = Number(process.env.SNAPSTACK_QEMU_CRASH_POINTS ?? (SOAK ? 5000 : 300));
const POINTS_PER_WORKLOAD = 10;

interface QemuCheck {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  raw: string;
}

async function qemuCheck(path: string, repair?: "leaks" | "all"): Promise<QemuCheck> {
  const args = ["check", "-f", "qcow2", "--output=json", ...(repair !== undefined ? ["-r", repair] : []), path];
  const result = await run("qemu-img", args);
  const json = JSON.parse(result.stdout || "{}") as { corruptions?: number; leaks?: number; "check-errors"?: number };
  return { corruptions: json.corruptions ?? 0, leaks: json.leaks ?? 0, checkErrors: json["check-errors"] ?? 0, raw: `${result.stdout}${result.stderr}` };
}

test("qemu-img check agrees: crashed images hold leaks at most, -r leaks leaves none", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (replay with SNAPSTACK_SEED=${seed})`);
  const random = createRandom(seed);
  const dir = scratchDir(t, "snapstack-crash-qemu-");
  const path = join(dir, "crashed.qcow2");
  let points = 0;
  let leaky = 0;
  let rebuilt = 0;
  while (points < POINTS) {
    const workloadSeed = random.int(2 ** 31);
    const wr = createRandom(workloadSeed);
    const scenario = randomScenario(wr);
    const images = await prepareImages(scenario, wr);
    const run0 = await recordRun(scenario, images, randomOps(wr, scenario, 20 + wr.int(60)));
    const replay = new CrashReplay(images.initial, run0.file.log ?? []);
    const chosen = new Set<number>();
    const count = Math.min(POINTS_PER_WORKLOAD, replay.writeCount, POINTS - points);
    while (chosen.size < count) chosen.add(1 + wr.int(replay.writeCount));
    for (const writeNumber of [...chosen].sort((a, b) => a - b)) {
      const allowed = new AllowedVersions(run0, scenario, images, writeNumber);
      const interrupted = allowed.interruptedOp >= 0 ? run0.ops[allowed.interruptedOp].kind : "open";
      const copiedMayLag = interrupted.startsWith("snapshot-");
      const where = `workload seed ${workloadSeed} (${describeScenario(scenario)}), crash at write ${writeNumber}/${replay.writeCount} during ${interrupted}`;
      const contents = replay.crashAt(writeNumber, wr.next);
      // Our checks and reads first (they also prove the image usable).
      await checkCrashedImage(contents, scenario, images, allowed, where, writeNumber, copiedMayLag, false);
      if (headerIsDirty(contents)) {
        // Lazy refcounts: snapstack rebuilds on a read-write open; QEMU must find the result clean.
        const file = new MemoryFile({ contents });
        const image = await openScenarioImage(file, scenario, images);
        await image.close();
        writeFileSync(path, file.contents());
        const after = await qemuCheck(path);
        assert.equal(after.corruptions + after.checkErrors, 0, `${where}: qemu-img check after snapstack's rebuild: ${after.raw}`);
        rebuilt++;
      } else {
        writeFileSync(path, contents);
        const crashed = await qemuCheck(path);
        assert.equal(crashed.checkErrors, 0, `${where}: qemu-img check errors: ${crashed.raw}`);
        if (!copiedMayLag) assert.equal(crashed.corruptions, 0, `${where}: qemu-img check: ${crashed.raw}`);
        if (crashed.leaks > 0 || crashed.corruptions > 0) {
          leaky++;
          await qemuCheck(path, crashed.corruptions > 0 ? "all" : "leaks");
          const repaired = await qemuCheck(path);
          assert.equal(repaired.corruptions + repaired.leaks + repaired.checkErrors, 0, `${where}: after qemu-img check -r: ${repaired.raw}`);
          // And the image QEMU repaired still reads as allowed with snapstack.
          const image = await openScenarioImage(new MemoryFile({ contents: new Uint8Array(readFileSync(path)), readOnly: true }), scenario, images, true);
          await image.close();
        }
      }
      points++;
    }
    await images.backing?.close();
  }
  t.diagnostic(`crash points checked by qemu-img: ${points}; with leaks (repaired by -r): ${leaky}; dirty images rebuilt by snapstack and checked clean: ${rebuilt}; corruptions: 0`);
});
