/**
 * Lazy refcounts and crashes: the dirty bit reaches the disk before the
 * first allocating write, a crashed dirty image is rebuilt on the next
 * read-write open, and a cluster freed since the L2 tables were last
 * written is never reused before the tables that dropped it are on disk.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createQcow2 } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2 } from "../../src/formats/qcow2/qcow2-image.ts";
import { checkQcow2 } from "../../src/formats/qcow2/check.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { CrashReplay, FaultFile } from "../../src/io/fault-file.ts";
import { createRandom } from "../helpers/random.ts";
import { decodeSector, headerIsDirty, patternBytes, SECTOR_BYTES } from "../helpers/crash-workload.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const CLUSTER = 4 * KiB;
const SECTORS_PER_CLUSTER = CLUSTER / SECTOR_BYTES;

async function lazyImage(): Promise<Uint8Array> {
  const file = new MemoryFile();
  await createQcow2(file, { sizeBytes: MiB, clusterSizeBytes: CLUSTER, lazyRefcounts: true });
  return file.contents();
}

async function readVersions(contents: Uint8Array, guestCluster: number): Promise<number[]> {
  const image = await openQcow2(new MemoryFile({ contents }), { readOnly: false, backing: null });
  const buffer = new Uint8Array(CLUSTER);
  await image.read(guestCluster * CLUSTER, buffer);
  await image.close();
  const ids: number[] = [];
  for (let i = 0; i < SECTORS_PER_CLUSTER; i++) ids.push(decodeSector(buffer, i * SECTOR_BYTES, guestCluster * SECTORS_PER_CLUSTER + i));
  return [...new Set(ids)];
}

test("lazy refcounts: the dirty bit is durable before anything is allocated", async () => {
  const initial = await lazyImage();
  const file = await FaultFile.fromBytes(initial, { recordLog: true });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await image.write(0, patternBytes(0, 16, 2));
  await image.write(100 * CLUSTER, patternBytes(100 * SECTORS_PER_CLUSTER, 8, 3));
  await image.close();
  const log = file.log ?? [];
  // The first write is the dirty bit (header byte 72..79), and a flush comes before any other write.
  const firstWrite = log.findIndex((op) => op.kind === "write");
  const op = log[firstWrite];
  assert.ok(op.kind === "write" && op.hostOffset === 72 && op.data.length === 8 && (op.data[7] & 1) === 1, "first write sets the dirty bit");
  const nextWrite = log.findIndex((o, i) => i > firstWrite && o.kind === "write");
  assert.ok(log.slice(firstWrite + 1, nextWrite).some((o) => o.kind === "flush"), "flush between the dirty bit and the first allocation");
  // Clean close: the dirty bit is cleared again.
  assert.equal(headerIsDirty(file.durableContents()), false);
});

test("lazy refcounts: a crashed dirty image is rebuilt on read-write open, not on read-only open", async () => {
  const initial = await lazyImage();
  const file = await FaultFile.fromBytes(initial);
  const image = await openQcow2(file, { readOnly: false, backing: null });
  for (let c = 0; c < 40; c++) await image.write(c * 3 * CLUSTER, patternBytes(c * 3 * SECTORS_PER_CLUSTER, 8, 10 + c));
  // A discard then an allocation writes the L2 tables (the freed cluster may be reused) but,
  // with lazy refcounts, not the refcount blocks.
  await image.discard(3 * CLUSTER, CLUSTER); // guest cluster of c = 1
  await image.write(201 * CLUSTER, patternBytes(201 * SECTORS_PER_CLUSTER, 8, 99));
  // Power fails: what was flushed is there, nothing else.
  const crashed = file.crash(() => 0, { dropProbability: 1 });
  assert.ok(headerIsDirty(crashed));
  const before = await checkQcow2(new MemoryFile({ contents: crashed, readOnly: true }));
  assert.ok(before.corruptions > 0, "stale refcounts are visible to check, as with qemu-img");

  const readOnlyImage = await openQcow2(new MemoryFile({ contents: crashed, readOnly: true }), { readOnly: true, backing: null });
  const buffer = new Uint8Array(CLUSTER);
  await readOnlyImage.read(39 * 3 * CLUSTER, buffer);
  assert.equal(decodeSector(buffer, 0, 39 * 3 * SECTORS_PER_CLUSTER), 49);
  await readOnlyImage.close();

  const rwFile = new MemoryFile({ contents: crashed });
  const reopened = await openQcow2(rwFile, { readOnly: false, backing: null });
  assert.equal(headerIsDirty(rwFile.contents()), false, "rebuilt and marked clean during open");
  const rebuilt = await checkQcow2(new MemoryFile({ contents: rwFile.contents(), readOnly: true }));
  assert.equal(rebuilt.corruptions, 0);
  assert.equal(rebuilt.checkErrors, 0);
  for (let c = 0; c < 40; c++) {
    if (c === 1) continue;
    await reopened.read(c * 3 * CLUSTER, buffer);
    assert.equal(decodeSector(buffer, 0, c * 3 * SECTORS_PER_CLUSTER), 10 + c);
  }
  await reopened.close();
});

test("lazy refcounts: a cluster freed by discard is not reused before its L2 entry is gone on disk (regression)", async () => {
  // Before the fix, lazy refcounts skipped both cache dependencies: the discard's L2 update
  // stayed in the cache while the freed cluster was handed to the next write, so a crash left
  // the discarded guest cluster pointing at the new write's data.
  const initial = await lazyImage();
  const file = await FaultFile.fromBytes(initial, { recordLog: true });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await image.write(0, patternBytes(0, SECTORS_PER_CLUSTER, 2));
  await image.flush();
  await image.discard(0, CLUSTER);
  await image.write(5 * CLUSTER, patternBytes(5 * SECTORS_PER_CLUSTER, SECTORS_PER_CLUSTER, 3));
  await image.close();
  const replay = new CrashReplay(initial, file.log ?? []);
  const random = createRandom(7);
  for (let n = 1; n <= replay.writeCount; n++) {
    for (let attempt = 0; attempt < 8; attempt++) {
      const contents = replay.crashAt(n, random.next, { dropProbability: attempt % 2 === 0 ? 0 : 0.5, tearProbability: 0 });
      const first = await readVersions(contents, 0);
      assert.ok(first.every((id) => id === 2 || id === 0), `crash at write ${n}: discarded cluster reads ${first.join(",")}`);
      const fifth = await readVersions(contents, 5);
      assert.ok(fifth.every((id) => id === 3 || id === 0), `crash at write ${n}: written cluster reads ${fifth.join(",")}`);
    }
  }
});
