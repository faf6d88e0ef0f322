/**
 * Randomized crash consistency over backing chains: random workloads mix
 * guest writes, zero-writes, discards, flushes and internal snapshot
 * create/apply/delete on the top image with overlay create, commit (into
 * the backing file, or with -b into a deeper layer), rebase (safe and
 * unsafe) and stream, on chains of 1-4 layers (plus images left
 * out of the chain by rebase and stream), every file on a FaultFile sharing
 * one crash moment. For many crash points (a crash during journal write N:
 * each file keeps its flushed state plus a random subset of its later
 * writes, torn at sectors) every file checks clean but for leaks, opens
 * with its chain, reads an allowed state, and its snapshots read as taken.
 *
 * SNAPSTACK_SEED replays a run; SNAPSTACK_CHAIN_CRASH_WORKLOAD=<seed>
 * replays one workload at every write; SNAPSTACK_CHAIN_CRASH_POINTS sets
 * the number of crash points (default 1000; SNAPSTACK_SOAK=1: 20000).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createQcow2 } from "../../src/formats/qcow2/create-qcow2.ts";
import { decodeQcow2Header } from "../../src/formats/qcow2/header.ts";
import { openQcow2 } from "../../src/formats/qcow2/qcow2-image.ts";
import { CrashReplay, FaultFile } from "../../src/io/fault-file.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { scratchDir } from "../helpers/tools.ts";
import { ChainCrashReplay, CrashedFiles, describeOp, judgeChainCrash, recordChainRun } from "../helpers/crash-chain.ts";

const MiB = 1024 * 1024;
const SOAK = process.env.SNAPSTACK_SOAK === "1";
const CRASH_POINTS = Number(process.env.SNAPSTACK_CHAIN_CRASH_POINTS ?? (SOAK ? 20_000 : 1000));
const POINTS_PER_WORKLOAD = 40;
/** Every Nth crash point also repairs leaks, writes to the newest image and checks again. */
const THOROUGH_EVERY = SOAK ? 1 : 4;

interface Tally {
  points: number;
  workloads: number;
  writes: number;
  files: number;
  leakyFiles: number;
  dirtyFiles: number;
  unopenedCreates: number;
  byOp: Map<string, number>;
}

async function crashWorkload(workloadSeed: number, dir: string, pointsMax: number, tally: Tally): Promise<void> {
  const random = createRandom(workloadSeed);
  const run = await recordChainRun(random, dir, 25 + random.int(30));
  try {
    tally.workloads++;
    const replay = new ChainCrashReplay(run);
    const writes = replay.writeIndices;
    tally.writes += writes.length;
    const count = Math.min(pointsMax, writes.length);
    const chosen = new Set<number>();
    if (count === writes.length) for (let i = 0; i < count; i++) chosen.add(i);
    while (chosen.size < count) chosen.add(random.int(writes.length));
    for (const i of [...chosen].sort((a, b) => a - b)) {
      const index = writes[i];
      const k = replay.opAt(index);
      const where = `workload seed ${workloadSeed}, crash at write ${i + 1}/${writes.length} during op ${k} (${describeOp(run.ops[k])})`;
      const crashed = new CrashedFiles(replay.crashAt(index, random.next));
      const outcome = await judgeChainCrash(run, k, crashed, where, tally.points % THOROUGH_EVERY === 0);
      tally.points++;
      tally.files += outcome.files;
      tally.leakyFiles += outcome.leakyFiles;
      tally.dirtyFiles += outcome.dirtyFiles;
      tally.unopenedCreates += outcome.unopenedCreates;
      const kind = run.ops[k].kind;
      tally.byOp.set(kind, (tally.byOp.get(kind) ?? 0) + 1);
    }
  } finally {
    await run.disk.close();
  }
}

test("chains with jobs survive a crash at any write", async (t) => {
  const tally: Tally = { points: 0, workloads: 0, writes: 0, files: 0, leakyFiles: 0, dirtyFiles: 0, unopenedCreates: 0, byOp: new Map() };
  let workload = 0;
  const only = process.env.SNAPSTACK_CHAIN_CRASH_WORKLOAD;
  if (only !== undefined && only !== "") {
    t.diagnostic(`replaying workload seed ${only} at every write`);
    await crashWorkload(Number(only), scratchDir(t, "snapstack-crash-chain-"), Infinity, tally);
  } else {
    const seed = testSeed();
    t.diagnostic(`seed ${seed} (replay with SNAPSTACK_SEED=${seed})`);
    const random = createRandom(seed);
    while (tally.points < CRASH_POINTS) {
      const dir = scratchDir(t, `snapstack-crash-chain-${workload++}-`);
      await crashWorkload(random.int(2 ** 31), dir, Math.min(POINTS_PER_WORKLOAD, CRASH_POINTS - tally.points), tally);
    }
  }
  const byOp = [...tally.byOp].sort((a, b) => b[1] - a[1]).map(([kind, n]) => `${kind} ${n}`).join(", ");
  t.diagnostic(
    `crash points tried: ${tally.points} over ${tally.workloads} chain workloads (${tally.writes} file writes); interrupted ops: ${byOp}; ` +
      `files judged: ${tally.files} (with leaks: ${tally.leakyFiles}; dirty, rebuilt: ${tally.dirtyFiles}; interrupted creates that do not open: ${tally.unopenedCreates}); corruptions: 0; data lost: 0`,
  );
});

test("a backing file switch torn at any sector leaves the old name or the new one (regression)", async () => {
  // 64 KiB clusters: the feature name table pushes the backing name past the first sector.
  for (const [oldName, newName] of [
    ["layer1.qcow2", "layer0.qcow2"],
    ["layer1.qcow2", "base-layer-10.qcow2"],
    ["layer1.qcow2", null],
    [null, "layer0.qcow2"],
  ] as const) {
    const created = new MemoryFile({ name: "top.qcow2" });
    await createQcow2(created, { sizeBytes: MiB, ...(oldName === null ? {} : { backingFile: oldName, backingFormat: "qcow2" }) });
    const file = await FaultFile.fromBytes(created.contents(), { recordLog: true });
    const image = await openQcow2(file, { readOnly: false, backing: null });
    await image.changeBackingFile(newName, newName === null ? null : "qcow2");
    await image.close();
    const replay = new CrashReplay(created.contents(), file.log ?? []);
    const random = createRandom(7);
    for (let write = 1; write <= replay.writeCount; write++) {
      // Same write, many tearings (CrashReplay takes crash points in order: one replay per draw).
      for (let draw = 0; draw < 40; draw++) {
        const again = new CrashReplay(created.contents(), file.log ?? []);
        const header = decodeQcow2Header(again.crashAt(write, random.next, { dropProbability: 0.2, tearProbability: 0.6 }).subarray(0, 64 * 1024));
        assert.ok(([oldName, newName] as (string | null)[]).includes(header.backingFileName), `${oldName} -> ${newName}: crash at write ${write} of ${replay.writeCount}: backing name ${JSON.stringify(header.backingFileName)}`);
      }
    }
  }
});
