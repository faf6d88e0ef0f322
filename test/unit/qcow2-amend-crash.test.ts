/**
 * amend's rewrites (downgrade to version 2, a new refcount width) on
 * in-memory images with snapshots, zero clusters and sometimes a backing
 * file: the result is clean and every state reads as before; and a crash
 * at any write of the operation (writes since the last flush lost, torn or
 * landed at random) leaves an image whose check finds leaks at most, or
 * COPIED flags lagging a lowered refcount (as any interrupted snapshot
 * operation may, docs/crash-safety.md), and whose every state still reads
 * as before.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { CrashReplay, FaultFile } from "../../src/io/fault-file.ts";
import type { ImageFile } from "../../src/io/file.ts";
import { createQcow2 } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2, type Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { openSnapshotView } from "../../src/formats/qcow2/snapshot-view.ts";
import { checkQcow2 } from "../../src/formats/qcow2/check.ts";
import { openRawImage } from "../../src/formats/raw/raw-image.ts";
import type { BlockDevice } from "../../src/device/block-device.ts";
import { createRandom } from "../helpers/random.ts";
import { readDevice } from "../helpers/read-image.ts";
import { assertCrashConsistent } from "../helpers/crash-workload.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const CLUSTER = 4 * KiB;
const SIZE = 2 * MiB;
/** Crash states drawn per write: which volatile writes land, whole or torn, is random. */
const ATTEMPTS = 6;

async function backingDevice(backed: boolean): Promise<BlockDevice | null> {
  return backed ? openRawImage(new MemoryFile({ name: "base.raw", contents: new Uint8Array(SIZE).fill(0xbb) })) : null;
}

/** Active state first, then each snapshot by name. */
async function readStates(image: Qcow2Image): Promise<Map<string, Uint8Array>> {
  const states = new Map<string, Uint8Array>([["", await readDevice(image)]]);
  for (const snapshot of image.listSnapshots()) {
    const view = await openSnapshotView(image, snapshot.name);
    try {
      states.set(snapshot.name, await readDevice(view));
    } finally {
      await view.close();
    }
  }
  return states;
}

function sameStates(actual: Map<string, Uint8Array>, expected: Map<string, Uint8Array>, what: string): void {
  assert.deepEqual([...actual.keys()], [...expected.keys()], `${what}: snapshots`);
  for (const [name, bytes] of expected) {
    const got = actual.get(name);
    assert.ok(got !== undefined && Buffer.from(got).equals(bytes), `${what}: state '${name || "active"}' differs`);
  }
}

/**
 * Data, zero clusters (plain and allocated), discards and snapshots: s2
 * taken after zeroing s1's data in place, s3 of the state after, then s1
 * applied and deleted (the active state maps as data what s2 maps
 * zero-alloc).
 */
async function buildImage(backed: boolean): Promise<Uint8Array> {
  const file = new MemoryFile({ name: "image.qcow2" });
  await createQcow2(file, { sizeBytes: SIZE, clusterSizeBytes: CLUSTER, ...(backed ? { backingFile: "base.raw", backingFormat: "raw" } : {}) });
  const image = await openQcow2(file, { readOnly: false, backing: await backingDevice(backed) });
  await image.write(0, new Uint8Array(64 * KiB).fill(1));
  await image.write(1 * MiB, new Uint8Array(128 * KiB).fill(2));
  await image.writeZeroes(200 * KiB, 16 * KiB, { unmap: true });
  await image.createSnapshot("s1");
  await image.writeZeroes(8 * KiB, 24 * KiB); // zero-alloc entries over s1's data
  await image.writeZeroes(1 * MiB + 64 * KiB, 32 * KiB, { unmap: true });
  await image.write(1536 * KiB, new Uint8Array(40 * KiB).fill(3));
  await image.discard(1 * MiB, 8 * KiB);
  await image.createSnapshot("s2");
  await image.writeZeroes(1536 * KiB, 8 * KiB);
  await image.writeZeroes(300 * KiB, 8 * KiB, { unmap: true });
  // Back to s1 and s1 deleted: the active state maps as data the clusters s2 maps zero-alloc.
  await image.createSnapshot("s3");
  await image.applySnapshot("s1");
  await image.deleteSnapshot("s1");
  await image.close();
  return file.contents();
}

interface Amend {
  label: string;
  run(image: Qcow2Image): Promise<void>;
  version: number;
  refcountBits: number;
}

const AMENDS: Amend[] = [
  { label: "compat=0.10", run: (image) => image.downgradeToVersion2(), version: 2, refcountBits: 16 },
  { label: "refcount_bits=2", run: (image) => image.changeRefcountOrder(1), version: 3, refcountBits: 2 },
  { label: "refcount_bits=64", run: (image) => image.changeRefcountOrder(6), version: 3, refcountBits: 64 },
];

async function assertCleanFile(file: ImageFile, what: string): Promise<void> {
  const result = await checkQcow2(file);
  assert.deepEqual(
    { failure: result.failure, corruptions: result.corruptions, checkErrors: result.checkErrors, leaks: result.leaks },
    { failure: null, corruptions: 0, checkErrors: 0, leaks: 0 },
    `${what}: ${result.messages.join(" | ")}`,
  );
}

for (const backed of [false, true]) {
  for (const amend of AMENDS) {
    test(`amend ${amend.label}${backed ? " over a backing file" : ""}: every state kept, and after a crash at any write too`, async () => {
      const initial = await buildImage(backed);
      const before = await openQcow2(new MemoryFile({ contents: initial }), { readOnly: true, backing: await backingDevice(backed) });
      const expected = await readStates(before);
      await before.close();

      const file = await FaultFile.fromBytes(initial, { recordLog: true });
      const image = await openQcow2(file, { readOnly: false, backing: await backingDevice(backed) });
      await amend.run(image);
      assert.equal(image.header.version, amend.version);
      assert.equal(2 ** image.header.refcountOrder, amend.refcountBits);
      sameStates(await readStates(image), expected, `${amend.label}: in the same session`);
      await image.close();
      const done = file.durableContents();
      await assertCleanFile(new MemoryFile({ contents: done }), `${amend.label}: result`);
      const reopened = await openQcow2(new MemoryFile({ contents: done }), { readOnly: true, backing: await backingDevice(backed) });
      assert.equal(reopened.header.version, amend.version);
      sameStates(await readStates(reopened), expected, `${amend.label}: reopened`);
      await reopened.close();

      const replay = new CrashReplay(initial, file.log ?? []);
      assert.ok(replay.writeCount > 3, `${amend.label}: the operation wrote (${replay.writeCount} writes)`);
      const random = createRandom(replay.writeCount);
      for (let n = 1, attempt = 0; n <= replay.writeCount; attempt = (attempt + 1) % ATTEMPTS, n += attempt === 0 ? 1 : 0) {
        const contents = replay.crashAt(n, random.next);
        const what = `${amend.label}: crash at write ${n} of ${replay.writeCount} (attempt ${attempt})`;
        // Leaks, and COPIED flags lagging a lowered refcount (as after any interrupted snapshot operation), at worst.
        assertCrashConsistent(await checkQcow2(new MemoryFile({ contents })), CLUSTER, true, what);
        const crashed = await openQcow2(new MemoryFile({ contents }), { readOnly: true, backing: await backingDevice(backed) });
        try {
          sameStates(await readStates(crashed), expected, what);
        } finally {
          await crashed.close();
        }
      }
    });
  }
}
