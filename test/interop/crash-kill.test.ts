/**
 * Real process kills: a child process (test/helpers/crash-kill-child.ts)
 * writes large ranges, flushes, creates and deletes internal snapshots and
 * commits its overlay into the base image on real files, and is sent
 * SIGKILL at a random moment, many times over the same files. After each
 * kill both checkers (ours and qemu-img check) find no corruption, every
 * guest sector reads what was flushed or written after, every snapshot
 * reads as taken, and the files go on being used by the next child.
 *
 * SNAPSTACK_SEED replays; SNAPSTACK_KILLS sets the number of kills
 * (default 24; SNAPSTACK_SOAK=1: 300).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { readFileSync } from "node:fs";
import { createRandom, testSeed } from "../helpers/random.ts";
import { requireTools, run, scratchDir } from "../helpers/tools.ts";
import { openImage } from "../../src/chain/open-image.ts";
import { createImage } from "../../src/chain/create-image.ts";
import { checkQcow2 } from "../../src/formats/qcow2/check.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import type { Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { PossibleVersions, SECTOR_BYTES, assertCrashConsistent, decodeSector, verifyGuest, verifySnapshots, type CrashScenario } from "../helpers/crash-workload.ts";

const SOAK = process.env.SNAPSTACK_SOAK === "1";
const KILLS = Number(process.env.SNAPSTACK_KILLS ?? (SOAK ? 300 : 24));
const MiB = 1024 * 1024;
const SIZE_BYTES = 16 * MiB;
const CLUSTER_BYTES = 65536;
const CHILD = fileURLToPath(new URL("../helpers/crash-kill-child.ts", import.meta.url));

const scenario: CrashScenario = {
  clusterSizeBytes: CLUSTER_BYTES,
  refcountBits: 16,
  compat: "1.1",
  lazyRefcounts: false,
  extendedL2: false,
  sizeBytes: SIZE_BYTES,
  withBacking: true,
  cacheBytesMax: 32 * MiB,
};

interface RoundResult {
  lines: string[];
  stderr: string;
  exitedBeforeKill: boolean;
}

/** Start a child, kill it `delayMs` after it is ready. */
function runChild(topPath: string, seed: number, firstId: number, delayMs: number): Promise<RoundResult> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CHILD, topPath, String(seed), String(firstId)], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    let killed = false;
    child.stdout.on("data", (chunk: Buffer) => {
      stdout += chunk.toString();
      if (!killed && stdout.includes("READY\n")) {
        killed = true;
        setTimeout(() => child.kill("SIGKILL"), delayMs);
      }
    });
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    child.on("exit", (code, signal) => {
      resolve({ lines: stdout.split("\n").filter((l) => l !== ""), stderr, exitedBeforeKill: signal !== "SIGKILL" || code !== null });
    });
  });
}

/** Current sector versions of a device (every sector must decode). */
async function readVersions(device: Qcow2Image): Promise<Int32Array> {
  // (typed loosely: the model keeps arrays of any buffer)
  const versions = new Int32Array(device.sizeBytes / SECTOR_BYTES);
  const chunk = new Uint8Array(MiB);
  for (let offset = 0; offset < device.sizeBytes; offset += MiB) {
    await device.read(offset, chunk);
    for (let at = 0; at < MiB; at += SECTOR_BYTES) {
      const sector = (offset + at) / SECTOR_BYTES;
      versions[sector] = decodeSector(chunk, at, sector);
      assert.ok(versions[sector] >= 0, `sector ${sector} decodes`);
    }
  }
  return versions;
}

test("SIGKILL at random moments: both checkers clean, flushed data and snapshots intact", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (replay with SNAPSTACK_SEED=${seed}); ${KILLS} kills`);
  const random = createRandom(seed);
  const dir = scratchDir(t, "snapstack-kill-");
  const basePath = join(dir, "base.qcow2");
  const topPath = join(dir, "top.qcow2");
  await createImage(basePath, { format: "qcow2", sizeBytes: SIZE_BYTES });
  await createImage(topPath, { format: "qcow2", sizeBytes: SIZE_BYTES, backingFile: "base.qcow2", backingFormat: "qcow2" });

  let versions: Int32Array = new Int32Array(SIZE_BYTES / SECTOR_BYTES);
  const snapshotVersions = new Map<string, Int32Array>();
  let writesSeen = 0;
  let snapshotOps = 0;
  let commits = 0;
  let leakyKills = 0;
  for (let kill = 0; kill < KILLS; kill++) {
    const delayMs = 30 + random.int(700);
    const result = await runChild(topPath, random.int(2 ** 31), (kill + 1) * 1_000_000, delayMs);
    assert.ok(!result.exitedBeforeKill, `child ${kill} died on its own:\n${result.stderr}`);
    const where = `kill ${kill} after ${delayMs} ms (last step: ${result.lines[result.lines.length - 1] ?? "none"})`;

    // Replay the child's announcements into the model.
    const model = new PossibleVersions(versions, scenario);
    const current = versions.slice();
    const required = new Map(snapshotVersions);
    const optional = new Map<string, Int32Array>();
    let snapshotInFlight = false;
    for (const line of result.lines) {
      const [kind, ...args] = line.split(" ");
      if (kind === "W") {
        const [id, guestOffset, lengthBytes] = args.map(Number);
        model.apply({ kind: "write", guestOffset, lengthBytes, id }, true);
        current.fill(id, guestOffset / SECTOR_BYTES, (guestOffset + lengthBytes) / SECTOR_BYTES);
        writesSeen++;
        snapshotInFlight = false;
      } else if (kind === "F" || kind === "C" || kind === "C!" || kind === "SC!" || kind === "SD!") {
        model.apply({ kind: "flush" }, true);
        if (kind === "SC!") {
          optional.delete(args[0]);
          required.set(args[0], current.slice());
        }
        if (kind === "SD!") optional.delete(args[0]);
        if (kind === "C!") commits++;
        snapshotInFlight = false;
      } else if (kind === "SC") {
        optional.set(args[0], current.slice());
        snapshotInFlight = true;
        snapshotOps++;
      } else if (kind === "SD") {
        optional.set(args[0], required.get(args[0]) as Int32Array);
        required.delete(args[0]);
        snapshotInFlight = true;
        snapshotOps++;
      }
    }
    const oracle = Object.assign(model.crashed(), { snapshots: { required, optional } });

    // Both checkers, on both files.
    for (const path of [topPath, basePath]) {
      const contents = new Uint8Array(readFileSync(path));
      const ours = await checkQcow2(new MemoryFile({ name: path, contents, readOnly: true }));
      assertCrashConsistent(ours, CLUSTER_BYTES, snapshotInFlight && path === topPath, `${where}: our check of ${path}`);
      const theirs = await run("qemu-img", ["check", "-f", "qcow2", "--output=json", path]);
      const json = JSON.parse(theirs.stdout || "{}") as { corruptions?: number; leaks?: number; "check-errors"?: number };
      if (!(snapshotInFlight && path === topPath)) assert.equal(json.corruptions ?? 0, 0, `${where}: qemu-img check of ${path}: ${theirs.stdout}${theirs.stderr}`);
      assert.equal(json["check-errors"] ?? 0, 0, `${where}: qemu-img check errors on ${path}`);
      if ((json.leaks ?? 0) > 0 || (json.corruptions ?? 0) > 0) {
        leakyKills++;
        // QEMU repairs what a kill left (-r all also settles lagging COPIED flags), then checks clean.
        await run("qemu-img", ["check", "-f", "qcow2", "-r", (json.corruptions ?? 0) > 0 ? "all" : "leaks", path]);
        const after = await run("qemu-img", ["check", "-f", "qcow2", path]);
        assert.equal(after.code, 0, `${where}: qemu-img check after repair of ${path}: ${after.stdout}${after.stderr}`);
      }
    }

    // Every sector and snapshot as the model allows; then adopt what is there for the next round.
    const device = (await openImage(topPath, { readOnly: true })) as Qcow2Image;
    try {
      await verifyGuest(device, oracle, where);
      await verifySnapshots(device, oracle.snapshots, where);
      versions = await readVersions(device);
      snapshotVersions.clear();
      for (const snapshot of device.snapshots) {
        snapshotVersions.set(snapshot.name, (oracle.snapshots.required.get(snapshot.name) ?? oracle.snapshots.optional.get(snapshot.name)) as Int32Array);
      }
    } finally {
      await device.close();
    }
  }
  t.diagnostic(`kills tried: ${KILLS} (${writesSeen} large writes announced, ${snapshotOps} snapshot creates/deletes, ${commits} commits completed); kills leaving leaks: ${leakyKills}; corruptions: 0; data lost: 0`);
});
