/**
 * EIO and ENOSPC in the middle of operations: the failing operation ends in
 * a clear coded error (E_IO / E_NO_SPACE, never E_INTERNAL or an untyped
 * exception), the image stays consistent (checks clean but for leaks), the
 * image object keeps working for the operations that follow, and nothing
 * flushed before is lost, whether the process then goes on or crashes.
 *
 * SNAPSTACK_SEED replays; SNAPSTACK_FAULT_WORKLOAD=<workload seed> replays one
 * workload; SNAPSTACK_FAULT_POINTS sets the number of fault
 * points (default 160; SNAPSTACK_SOAK=1: 3000).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { checkQcow2 } from "../../src/formats/qcow2/check.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { FaultFile, type FaultPlan } from "../../src/io/fault-file.ts";
import { isSnapstackError } from "../../src/base/errors.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import {
  PossibleVersions,
  applyOp,
  assertCrashConsistent,
  assertNoCorruption,
  checkCrashedImage,
  describeScenario,
  openScenarioImage,
  prepareImages,
  randomOps,
  randomScenario,
  recordRun,
  headerIsDirty,
  verifyGuest,
  type CrashScenario,
  type PreparedImages,
  type Random,
} from "../helpers/crash-workload.ts";

const SOAK = process.env.SNAPSTACK_SOAK === "1";
const FAULT_POINTS = Number(process.env.SNAPSTACK_FAULT_POINTS ?? (SOAK ? 3000 : 160));
const POINTS_PER_WORKLOAD = 8;

interface FaultTally {
  points: number;
  failedOps: number;
  byCode: Record<string, number>;
}

type FaultCase = { kind: "write" | "flush"; index: number; code: "E_IO" | "E_NO_SPACE"; sticky: boolean } | { kind: "full"; limitBytes: number };

function describeCase(c: FaultCase): string {
  return c.kind === "full" ? `file system full at ${c.limitBytes} bytes` : `${c.code} on ${c.kind} #${c.index}${c.sticky ? " and every later one" : ""}`;
}

async function faultWorkload(workloadSeed: number, pointsMax: number, tally: FaultTally): Promise<void> {
  const wr: Random = createRandom(workloadSeed);
  const scenario = randomScenario(wr);
  const images = await prepareImages(scenario, wr);
  // Snapshots are created and deleted under faults; apply is left out (its result depends on what a failed write left).
  const ops = randomOps(wr, scenario, 15 + wr.int(40), { apply: false });
  // A clean run tells how many writes and flushes there are, and how big the file gets.
  const clean = await recordRun(scenario, images, ops);
  const writes = clean.file.writeCount;
  const flushes = clean.file.flushCount;
  const finalSize = clean.file.durableContents().length;
  for (let p = 0; p < pointsMax; p++) {
    const roll = wr.next();
    const c: FaultCase =
      roll < 0.55
        ? { kind: "write", index: 1 + wr.int(writes), code: wr.next() < 0.5 ? "E_IO" : "E_NO_SPACE", sticky: wr.next() < 0.2 }
        : roll < 0.8
          ? { kind: "flush", index: 1 + wr.int(Math.max(1, flushes)), code: "E_IO", sticky: false }
          : { kind: "full", limitBytes: images.initial.length + wr.int(Math.max(1, finalSize - images.initial.length)) };
    const where = `workload seed ${workloadSeed} (${describeScenario(scenario)}), ${describeCase(c)}`;
    const faults: FaultPlan[] = c.kind === "full" ? [] : [{ op: c.kind, index: c.index, code: c.code, sticky: c.sticky }];
    const file = await FaultFile.fromBytes(images.initial, { name: "faulty.qcow2", faults, ...(c.kind === "full" ? { sizeLimitBytes: c.limitBytes } : {}) });
    const model = new PossibleVersions(images.initialVersions, scenario);
    const expectedCodes = c.kind === "full" ? ["E_NO_SPACE"] : [c.code];
    let image;
    try {
      image = await openScenarioImage(file, scenario, images);
    } catch (error) {
      assert.ok(isSnapstackError(error) && expectedCodes.includes(error.code), `${where}: open failed with ${String(error)}`);
      tally.points++;
      continue;
    }
    let closed = false;
    let closeSucceeded = false;
    let crashedCopy: { contents: Uint8Array; model: PossibleVersions; copiedMayLag: boolean } | null = null;
    // A failed snapshot operation may have left COPIED flags behind their refcounts, as in QEMU.
    let snapshotOpFailed = false;
    const maybeCreated = new Set<string>();
    for (const op of ops) {
      try {
        await applyOp(image, op);
        model.apply(op, true);
        if (op.kind === "close") closed = closeSucceeded = true;
      } catch (error) {
        if (op.kind === "snapshot-delete" && maybeCreated.has(op.name) && isSnapstackError(error) && error.code === "E_SNAPSHOT_NOT_FOUND") continue;
        if (!isSnapstackError(error) || !expectedCodes.includes(error.code)) {
          assert.fail(`${where}: ${op.kind} failed with ${isSnapstackError(error) ? `${error.code}: ${error.message}` : String(error)}\n${(error as Error).stack}`);
        }
        tally.failedOps++;
        tally.byCode[error.code] = (tally.byCode[error.code] ?? 0) + 1;
        model.apply(op, false);
        if (op.kind === "snapshot-create") maybeCreated.add(op.name);
        if (op.kind.startsWith("snapshot-")) snapshotOpFailed = true;
        // What a crash right after the first failure would leave.
        crashedCopy ??= { contents: file.crash(wr.next), model: model.crashed(), copiedMayLag: snapshotOpFailed };
        if (op.kind === "close") {
          // close gives up the file even when it fails; the disk holds what it holds.
          closed = true;
        }
      }
    }
    if (!closed) await image.close().catch(() => undefined);
    tally.points++;
    if (crashedCopy !== null) await checkCrashedImage(crashedCopy.contents, scenario, images, crashedCopy.model, `${where}: crash after the failure`, p, crashedCopy.copiedMayLag);
    // The file as the process left it (every write that succeeded is in it): consistent, and
    // every sector reads what the operations that succeeded (or maybe succeeded) wrote; after a
    // failed close, what was durable or written since.
    const onDisk = file.crash(() => 0.99, { dropProbability: 0, tearProbability: 0 });
    await checkLeftImage(onDisk, scenario, images, closeSucceeded ? model : model.crashed(), where, snapshotOpFailed);
  }
  await images.backing?.close();
}

async function checkLeftImage(contents: Uint8Array, scenario: CrashScenario, images: PreparedImages, model: PossibleVersions, where: string, copiedMayLag: boolean): Promise<void> {
  const result = await checkQcow2(new MemoryFile({ contents, readOnly: true }));
  if (!headerIsDirty(contents)) assertCrashConsistent(result, scenario.clusterSizeBytes, copiedMayLag, `${where}: check of the image left behind`);
  const image = await openScenarioImage(new MemoryFile({ contents }), scenario, images);
  await verifyGuest(image, model, `${where}: image left behind`);
  await image.close();
}

test("EIO and ENOSPC mid-operation: coded errors, consistent images, nothing flushed lost", async (t) => {
  const tally: FaultTally = { points: 0, failedOps: 0, byCode: {} };
  const only = process.env.SNAPSTACK_FAULT_WORKLOAD;
  if (only !== undefined && only !== "") {
    t.diagnostic(`replaying workload seed ${only}`);
    await faultWorkload(Number(only), POINTS_PER_WORKLOAD, tally);
  } else {
    const seed = testSeed();
    t.diagnostic(`seed ${seed} (replay with SNAPSTACK_SEED=${seed})`);
    const random = createRandom(seed);
    while (tally.points < FAULT_POINTS) {
      await faultWorkload(random.int(2 ** 31), Math.min(POINTS_PER_WORKLOAD, FAULT_POINTS - tally.points), tally);
    }
  }
  t.diagnostic(`fault points tried: ${tally.points}; operations failed: ${tally.failedOps} (${Object.entries(tally.byCode).map(([code, n]) => `${code} ${n}`).join(", ")}); corruptions: 0; flushed data lost: 0`);
});

test("a failed L1 entry write leaves the in-memory L1 as on disk: later writes through that range are not lost (regression)", async () => {
  // Before the fix, getL2ForWrite pointed the in-memory L1 entry at the new L2 table before
  // writing it; when that write failed, later writes went through the new table and reached
  // the disk, but no L1 write ever published it: after close they read as zeroes.
  const { createQcow2 } = await import("../../src/formats/qcow2/create-qcow2.ts");
  const { openQcow2 } = await import("../../src/formats/qcow2/qcow2-image.ts");
  const { imageLayout } = await import("../helpers/crash-image-surgery.ts");
  const memory = new MemoryFile();
  await createQcow2(memory, { sizeBytes: 4 * 1024 * 1024, clusterSizeBytes: 4096 });
  const l1TableOffset = imageLayout(memory.contents()).l1TableOffset;
  const file = await FaultFile.fromBytes(memory.contents(), {
    faults: [{ op: "write", index: 1, code: "E_IO", where: (hostOffset) => hostOffset === l1TableOffset }],
  });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  const data = new Uint8Array(4096).fill(0x5a);
  await assert.rejects(image.write(2 * 1024 * 1024, data), (e: unknown) => isSnapstackError(e) && e.code === "E_IO");
  await image.write(2 * 1024 * 1024, data);
  await image.close();
  const contents = file.durableContents();
  assertNoCorruption(await checkQcow2(new MemoryFile({ contents, readOnly: true })), "after the failed L1 write");
  const reopened = await openQcow2(new MemoryFile({ contents, readOnly: true }), { readOnly: true, backing: null });
  const back = new Uint8Array(4096);
  await reopened.read(2 * 1024 * 1024, back);
  assert.deepEqual(back, data);
  await reopened.close();
});

test("snapshot create whose header switch fails does not undo refcounts the new table may rely on (regression)", async () => {
  // Before the fix, a failed flush after the snapshot table header switch ran the create's undo
  // path: the raised refcounts were lowered although the switch could be on disk, and a crash
  // then left a snapshot whose clusters had refcount 1 with two references.
  const { createQcow2 } = await import("../../src/formats/qcow2/create-qcow2.ts");
  const { openQcow2 } = await import("../../src/formats/qcow2/qcow2-image.ts");
  const memory = new MemoryFile();
  await createQcow2(memory, { sizeBytes: 1024 * 1024, clusterSizeBytes: 65536 });
  const initial = memory.contents();
  const run = async (faults: FaultPlan[]): Promise<FaultFile> => {
    const file = await FaultFile.fromBytes(initial, { recordLog: true, faults });
    const image = await openQcow2(file, { readOnly: false, backing: null });
    for (let c = 0; c < 8; c++) await image.write(c * 65536, new Uint8Array(65536).fill(c + 1));
    await image.flush();
    await image.createSnapshot("s").catch((error: unknown) => assert.ok(isSnapstackError(error) && error.code === "E_IO", String(error)));
    await image.close().catch(() => undefined);
    return file;
  };
  const clean = await run([]);
  const log = clean.log ?? [];
  const switchAt = log.findIndex((op) => op.kind === "write" && op.hostOffset === 60);
  const flushIndex = log.slice(0, switchAt).filter((op) => op.kind === "flush").length + 1;
  const file = await run([{ op: "flush", index: flushIndex, code: "E_IO" }]);
  // Power fails with every write the process made on the platter.
  const contents = file.crash(() => 0.99, { dropProbability: 0, tearProbability: 0 });
  const result = await checkQcow2(new MemoryFile({ contents, readOnly: true }));
  assert.equal(result.messages.filter((line) => /^ERROR cluster \d+ refcount=\d+ reference=\d+/.test(line)).length, 0, result.messages.join("\n"));
});
