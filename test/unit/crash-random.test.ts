/**
 * Randomized crash consistency: run random guest workloads on a FaultFile,
 * then for many crash points (a crash during write N, with an arbitrary
 * subset of the unflushed writes landed, torn at sector boundaries) check
 * the image with our checker, reopen it, and read every sector.
 *
 * SNAPSTACK_SEED replays a run; SNAPSTACK_CRASH_WORKLOAD=<workload seed>
 * replays one workload at every write; SNAPSTACK_CRASH_POINTS sets the number
 * of crash points (default 2000; SNAPSTACK_SOAK=1: 50000).
 */
import { test } from "node:test";
import { CrashReplay } from "../../src/io/fault-file.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import {
  AllowedVersions,
  checkCrashedImage,
  describeScenario,
  prepareImages,
  randomOps,
  randomScenario,
  recordRun,
} from "../helpers/crash-workload.ts";

const SOAK = process.env.SNAPSTACK_SOAK === "1";
const CRASH_POINTS = Number(process.env.SNAPSTACK_CRASH_POINTS ?? (SOAK ? 50_000 : 2000));
/** Crash points per workload: enough to cover its writes densely, few enough to see many configurations. */
const POINTS_PER_WORKLOAD = 60;
/** Every Nth crash point also gets a write after reopening, close, check, repair and a final check. */
const THOROUGH_EVERY = SOAK ? 1 : 4;

interface Tally {
  points: number;
  workloads: number;
  dirtyPoints: number;
  leakyPoints: number;
  writes: number;
}

/** One workload: record it, then crash it at up to `pointsMax` writes (all of them when pointsMax is Infinity). */
async function crashWorkload(workloadSeed: number, pointsMax: number, tally: Tally): Promise<void> {
  const wr = createRandom(workloadSeed);
  const scenario = randomScenario(wr);
  const images = await prepareImages(scenario, wr);
  const ops = randomOps(wr, scenario, 20 + wr.int(60));
  const run = await recordRun(scenario, images, ops);
  tally.workloads++;
  const replay = new CrashReplay(images.initial, run.file.log ?? []);
  tally.writes += replay.writeCount;
  const count = Math.min(pointsMax, replay.writeCount);
  // Crash points spread over the whole run, in increasing order (CrashReplay requires it).
  const chosen = new Set<number>();
  if (count === replay.writeCount) for (let n = 1; n <= count; n++) chosen.add(n);
  while (chosen.size < count) chosen.add(1 + wr.int(replay.writeCount));
  for (const writeNumber of [...chosen].sort((a, b) => a - b)) {
    const where = `workload seed ${workloadSeed} (${describeScenario(scenario)}), crash at write ${writeNumber}/${replay.writeCount}`;
    const contents = replay.crashAt(writeNumber, wr.next);
    const allowed = new AllowedVersions(run, scenario, images, writeNumber);
    const interrupted = allowed.interruptedOp >= 0 ? run.ops[allowed.interruptedOp].kind : "open";
    const outcome = await checkCrashedImage(contents, scenario, images, allowed, `${where} during ${interrupted}`, writeNumber, interrupted.startsWith("snapshot-"), tally.points % THOROUGH_EVERY === 0);
    tally.points++;
    if (outcome.dirty) tally.dirtyPoints++;
    if (outcome.leaks > 0) tally.leakyPoints++;
  }
  await images.backing?.close();
}

test("random workloads survive a crash at any write", async (t) => {
  const tally: Tally = { points: 0, workloads: 0, dirtyPoints: 0, leakyPoints: 0, writes: 0 };
  const only = process.env.SNAPSTACK_CRASH_WORKLOAD;
  if (only !== undefined && only !== "") {
    t.diagnostic(`replaying workload seed ${only} at every write`);
    await crashWorkload(Number(only), Infinity, tally);
  } else {
    const seed = testSeed();
    t.diagnostic(`seed ${seed} (replay with SNAPSTACK_SEED=${seed})`);
    const random = createRandom(seed);
    while (tally.points < CRASH_POINTS) {
      await crashWorkload(random.int(2 ** 31), Math.min(POINTS_PER_WORKLOAD, CRASH_POINTS - tally.points), tally);
    }
  }
  t.diagnostic(
    `crash points tried: ${tally.points} over ${tally.workloads} workloads (${tally.writes} file writes); ` +
      `dirty (lazy refcounts, rebuilt on open): ${tally.dirtyPoints}; with leaks: ${tally.leakyPoints}; corruptions: 0; data lost: 0`,
  );
});
