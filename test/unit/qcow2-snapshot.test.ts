/**
 * Internal snapshots on in-memory images: lookups, content of every state
 * through snapshot views, refcount/COPIED consistency (checkQcow2 must find
 * nothing), limits, a live image, wipe, and a randomized model test.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { createQcow2, type Qcow2CreateOptions } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2, type Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { findSnapshot, nextSnapshotId, snapshotDateNow, truncateUtf8, updateTreeRefcounts, type DecrementRecord } from "../../src/formats/qcow2/internal-snapshots.ts";
import { openSnapshotView } from "../../src/formats/qcow2/snapshot-view.ts";
import { SNAPSHOT_COUNT_MAX, decodeSnapshotTable, encodeSnapshotTable, type Qcow2Snapshot } from "../../src/formats/qcow2/snapshot-table.ts";
import { isSnapstackError } from "../../src/base/errors.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { assertClean } from "../helpers/qcow2-clean.ts";
import { readDevice } from "../helpers/read-image.ts";
import { getL1Entry } from "../../src/formats/qcow2/entries.ts";
import { FaultFile } from "../../src/io/fault-file.ts";
import { markDirty } from "../../src/formats/qcow2/table-cache.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

async function fresh(options: Partial<Qcow2CreateOptions> = {}): Promise<{ file: MemoryFile; image: Qcow2Image }> {
  const file = new MemoryFile({ name: "snap.qcow2" });
  await createQcow2(file, { sizeBytes: 4 * MiB, ...options });
  return { file, image: await openQcow2(file, { readOnly: false, backing: null }) };
}

function failsWith(code: string, errno?: number): (e: unknown) => boolean {
  return (e: unknown) => isSnapstackError(e) && e.code === code && (errno === undefined || e.details.errno === errno);
}


function assertSameBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: size`);
  const n = actual.length;
  for (let i = 0; i < n; i++) if (actual[i] !== expected[i]) assert.fail(`${what}: first difference at byte ${i} (${actual[i]} != ${expected[i]})`);
}

async function assertSnapshotReads(image: Qcow2Image, ref: string, expected: Uint8Array, what: string): Promise<void> {
  const view = await openSnapshotView(image, ref);
  try {
    assertSameBytes(await readDevice(view), expected, what);
  } finally {
    await view.close();
  }
}

function entry(id: string, name: string): Qcow2Snapshot {
  return {
    l1TableOffset: 0,
    l1Size: 0,
    id,
    name,
    dateSeconds: 0,
    dateNanoseconds: 0,
    vmClockNanoseconds: 0,
    vmStateSizeBytes: 0,
    diskSizeBytes: 0,
    icount: 0,
    extraDataSizeBytes: 24,
    unknownExtraData: new Uint8Array(0),
  };
}

test("IDs, names and lookups follow qemu-img", () => {
  const list = [entry("1", "a"), entry("7", "2"), entry("abc", "b"), entry("12x", "a")];
  assert.equal(nextSnapshotId(list), "13", "largest strtoul(id) + 1");
  assert.equal(nextSnapshotId([]), "1");
  assert.equal(findSnapshot(list, "2", "id-or-name"), 1, "a name matches when no ID does");
  assert.equal(findSnapshot([entry("1", "7"), entry("7", "x")], "7", "id-or-name"), 1, "an ID wins over a name");
  assert.equal(findSnapshot([entry("1", "7"), entry("7", "x")], "7", "name"), 0, "-d matches names only");
  assert.equal(findSnapshot(list, "a", "name"), 0, "first match");
  assert.equal(findSnapshot(list, "abc", "id"), 2);
  assert.equal(findSnapshot(list, "nope", "id-or-name"), -1);
  assert.equal(truncateUtf8("x".repeat(300), 255).length, 255);
  assert.equal(new TextEncoder().encode(truncateUtf8("é".repeat(200), 255)).length, 254, "no half characters");
  assert.equal(findSnapshot([entry("1", "y".repeat(300))], "y".repeat(255), "name"), 0, "names compare as listed (255 bytes)");
  const now = snapshotDateNow();
  assert.ok(Math.abs(now.seconds - Date.now() / 1000) < 5 && now.nanoseconds % 1000 === 0 && now.nanoseconds < 1e9, "µs·1000 as qemu-img");
});

test("create, apply and delete keep every state readable and the image clean", async () => {
  // 4 KiB clusters: 2 MiB per L2 table, so the 4 MiB disk has two.
  const { file, image } = await fresh({ clusterSizeBytes: 4 * KiB });
  const model = new Uint8Array(image.sizeBytes);
  const write = async (guestOffset: number, length: number, value: number): Promise<void> => {
    const data = new Uint8Array(length).fill(value);
    await image.write(guestOffset, data);
    model.set(data, guestOffset);
  };
  await write(0, 64 * KiB, 1);
  await write(3 * MiB, 12 * KiB, 2);
  await image.writeCompressed(2 * MiB, new Uint8Array(4 * KiB).fill(3));
  model.fill(3, 2 * MiB, 2 * MiB + 4 * KiB);
  const first = await image.createSnapshot("first", { date: { seconds: 1_700_000_000, nanoseconds: 123_456_000 } });
  assert.deepEqual(first, { id: "1", name: "first", vmStateSizeBytes: 0, dateSeconds: 1_700_000_000, dateNanoseconds: 123_456_000, vmClockNanoseconds: 0, icount: 0 });
  const atFirst = model.slice();
  await assertClean(image, file, "after create");

  await write(4 * KiB, 8 * KiB, 4); // COW inside a shared L2 table
  await write(2 * MiB, 4 * KiB, 5); // replaces the compressed cluster
  await image.discard(3 * MiB, 4 * KiB);
  model.fill(0, 3 * MiB, 3 * MiB + 4 * KiB);
  await write(MiB, 4 * KiB, 6);
  await assertClean(image, file, "after writes");
  await image.createSnapshot("second");
  const atSecond = model.slice();
  await write(0, 4 * KiB, 7);
  await assertSnapshotReads(image, "1", atFirst, "snapshot 1");
  await assertSnapshotReads(image, "second", atSecond, "snapshot 2");
  assertSameBytes(await readDevice(image), model, "active");

  await image.applySnapshot("first");
  assertSameBytes(await readDevice(image), atFirst, "active after applying 1");
  await assertClean(image, file, "after apply");
  await image.write(0, new Uint8Array(4 * KiB).fill(8)); // the applied state is writable without touching the snapshot
  await assertSnapshotReads(image, "first", atFirst, "snapshot 1 after writing over it");

  await image.deleteSnapshot("first");
  await assertClean(image, file, "after delete");
  assert.deepEqual(image.listSnapshots().map((s) => [s.id, s.name]), [["2", "second"]]);
  await image.applySnapshot("2");
  assertSameBytes(await readDevice(image), atSecond, "active after applying 2");
  await image.deleteSnapshot("2", { by: "id" });
  await assertClean(image, file, "after deleting the last one");
  assert.equal(image.header.snapshotCount, 0);
  await image.close();

  // Reopened, the table on disk says the same.
  const again = await openQcow2(new MemoryFile({ contents: file.contents() }), { readOnly: true, backing: null });
  assert.deepEqual(again.snapshots, []);
  assertSameBytes(await readDevice(again), atSecond, "reopened");
  await again.close();
});

test("bad references are coded errors that leave the image untouched", async () => {
  const { file, image } = await fresh();
  await image.write(0, new Uint8Array(4096).fill(1));
  await image.createSnapshot("2");
  await image.createSnapshot("x");
  await image.flush();
  const before = file.contents().slice();
  await assert.rejects(image.applySnapshot("nope"), failsWith("E_SNAPSHOT_NOT_FOUND", 2));
  await assert.rejects(image.deleteSnapshot("1"), failsWith("E_SNAPSHOT_NOT_FOUND"), "-d matches names, not IDs");
  await assert.rejects(openSnapshotView(image, "missing"), failsWith("E_SNAPSHOT_NOT_FOUND"));
  assertSameBytes(file.contents(), before, "file");
  await image.deleteSnapshot("2"); // the name "2", which is ID 1
  assert.deepEqual(image.listSnapshots().map((s) => s.id), ["2"]);
  await image.close();
  const readOnly = await openQcow2(new MemoryFile({ contents: file.contents(), readOnly: true }), { readOnly: true, backing: null });
  await assert.rejects(readOnly.createSnapshot("r"), failsWith("E_READ_ONLY"));
  await readOnly.close();
});

test("refcount_bits=1: the first snapshot fails with EINVAL and leaves no leak", async () => {
  const { file, image } = await fresh({ refcountBits: 1 });
  await image.write(0, new Uint8Array(128 * KiB).fill(9));
  await assert.rejects(image.createSnapshot("s"), failsWith("E_TOO_LARGE", 22));
  assert.deepEqual(image.listSnapshots(), []);
  await assertClean(image, file, "after the failed create");
  // Still fully usable: the COPIED flags were restored, writes go in place.
  await image.write(0, new Uint8Array(4096).fill(1));
  await assertClean(image, file, "after a write");
  await image.close();
});

test("refcount_bits=2: the third snapshot overflows, the first two stay", async () => {
  const { file, image } = await fresh({ refcountBits: 2 });
  await image.write(0, new Uint8Array(64 * KiB).fill(9));
  await image.createSnapshot("a");
  await image.createSnapshot("b");
  await assert.rejects(image.createSnapshot("c"), failsWith("E_TOO_LARGE", 22));
  assert.deepEqual(image.listSnapshots().map((s) => s.name), ["a", "b"]);
  await assertClean(image, file, "after the failed create");
  // Applying needs +1 too: refused the same way, image unchanged.
  await assert.rejects(image.applySnapshot("a"), failsWith("E_TOO_LARGE", 22));
  await assertClean(image, file, "after the failed apply");
  await image.deleteSnapshot("b");
  await image.applySnapshot("a");
  await assertClean(image, file, "after delete + apply");
  await image.close();
});

test("at most 65,536 snapshots: the next create is EFBIG and changes nothing", async () => {
  const { file, image } = await fresh();
  // A table of 65,536 entries without L1 tables (nothing to count), placed as QEMU would.
  const snapshots = Array.from({ length: SNAPSHOT_COUNT_MAX }, (_, i) => ({ ...entry(String(i + 1), ""), diskSizeBytes: image.sizeBytes }));
  const table = encodeSnapshotTable(snapshots);
  const meta = image.metadata;
  const tableOffset = await meta.allocClusters(table.length);
  await meta.writeCaches();
  await meta.file.write(tableOffset, table);
  const fields = new Uint8Array(12);
  new DataView(fields.buffer).setUint32(0, snapshots.length);
  new DataView(fields.buffer).setBigUint64(4, BigInt(tableOffset));
  await meta.writeHeaderBytes(60, fields);
  meta.header.snapshotCount = snapshots.length;
  meta.header.snapshotsOffset = tableOffset;
  image.replaceSnapshots(snapshots);
  await assertClean(image, file, "crafted table");
  await assert.rejects(image.createSnapshot("one too many"), failsWith("E_TOO_LARGE", 27));
  await assertClean(image, file, "after the refused create");
  await image.deleteSnapshot("65536", { by: "id" });
  const made = await image.createSnapshot("fits again");
  assert.equal(made.id, "65536");
  await assertClean(image, file, "after delete + create");
  await image.close();
});

test("open reads the snapshot table alone: one larger than the first 64 KiB piece, one followed by data", async () => {
  const { file, image } = await fresh();
  await image.createSnapshot("first");
  // Data allocated after the table: open must not read it (it read up to 64 MiB past the table).
  await image.write(0, new Uint8Array(2 * MiB).fill(3));
  await image.close();
  const reopen = (from: MemoryFile): Promise<Qcow2Image> => openQcow2(new MemoryFile({ name: "snap.qcow2", contents: from.contents() }), { readOnly: false, backing: null });
  const counted = new MemoryFile({ name: "snap.qcow2", contents: file.contents() });
  let bytesRead = 0;
  const read = counted.read.bind(counted);
  counted.read = (hostOffset: number, buffer: Uint8Array) => ((bytesRead += buffer.length), read(hostOffset, buffer));
  await (await openQcow2(counted, { readOnly: true, backing: null })).close();
  assert.ok(bytesRead < 1 * MiB, `open read ${bytesRead} bytes of a file holding 2 MiB of data after the table`);
  const reopened = await reopen(file);
  assert.deepEqual(reopened.snapshots.map((s) => s.name), ["first"]);
  // ~2,000 entries with 40-byte names: a table of ~190 KiB, read at open in growing pieces.
  const names = Array.from({ length: 2000 }, (_, i) => `snapshot-${String(i).padStart(31, "0")}`);
  const crafted = names.map((name, i) => ({ ...entry(String(i + 2), name), diskSizeBytes: reopened.sizeBytes }));
  const table = encodeSnapshotTable([...reopened.snapshots, ...crafted]);
  assert.ok(table.length > 64 * KiB * 2, "the table spans more than the first piece");
  const meta = reopened.metadata;
  const tableOffset = await meta.allocClusters(table.length);
  await meta.writeCaches();
  await meta.file.write(tableOffset, table);
  const fields = new Uint8Array(12);
  new DataView(fields.buffer).setUint32(0, 1 + crafted.length);
  new DataView(fields.buffer).setBigUint64(4, BigInt(tableOffset));
  await meta.writeHeaderBytes(60, fields);
  const written = meta.file as MemoryFile;
  await reopened.flush();
  const again = await reopen(written);
  await reopened.close();
  assert.equal(again.snapshots.length, 1 + crafted.length);
  assert.equal(again.snapshots[again.snapshots.length - 1].name, names[names.length - 1]);
  await again.deleteSnapshot(names[0]);
  assert.equal(again.snapshots.length, crafted.length);
  await again.close();
});

test("a live image: writes racing a snapshot land wholly before or after it", async () => {
  const { file, image } = await fresh({ clusterSizeBytes: 4 * KiB });
  const clusters = 64;
  await image.write(0, new Uint8Array(clusters * 4 * KiB).fill(1));
  const writes: Promise<void>[] = [];
  for (let i = 0; i < clusters; i++) {
    writes.push(image.write(i * 4 * KiB, new Uint8Array(4 * KiB).fill(2)));
    if (i === clusters / 2) writes.push(image.createSnapshot("mid").then(() => undefined));
  }
  const reads = Array.from({ length: 8 }, () => readDevice(image));
  await Promise.all([...writes, ...reads]);
  const view = await openSnapshotView(image, "mid");
  const snap = await readDevice(view);
  await view.close();
  for (let i = 0; i < clusters; i++) {
    const part = snap.subarray(i * 4 * KiB, (i + 1) * 4 * KiB);
    assert.ok(part.every((b) => b === part[0]) && (part[0] === 1 || part[0] === 2), `cluster ${i} is one whole state`);
  }
  assert.ok((await readDevice(image)).subarray(0, clusters * 4 * KiB).every((b) => b === 2));
  await assertClean(image, file, "after the race");
  await image.close();
});

/** True when `needle` occurs in `haystack`. */
function contains(haystack: Uint8Array, needle: Uint8Array): boolean {
  return Buffer.from(haystack.buffer, haystack.byteOffset, haystack.byteLength).indexOf(Buffer.from(needle)) >= 0;
}

for (const wipe of [false, true]) {
  test(`delete${wipe ? " --wipe" : " without wipe (a discard: MemoryFile reads it back as zeroes, as a punched hole)"} leaves no byte of the deleted data in the file`, async () => {
    const { file, image } = await fresh();
    const secret = createRandom(42).bytes(64 * KiB);
    await image.write(128 * KiB, secret);
    await image.createSnapshot("s");
    await image.write(128 * KiB, new Uint8Array(64 * KiB).fill(0x5a)); // copies: the secret lives on in the snapshot only
    await image.flush();
    assert.ok(contains(file.contents(), secret.subarray(1000, 5000)), "the snapshot keeps the secret");
    await image.deleteSnapshot("s", { wipe });
    assert.ok(!contains(file.contents(), secret.subarray(1000, 5000)));
    await assertClean(image, file, "after delete");
    await image.close();
  });
}

test("apply --wipe: the discarded active state is gone from the file", async () => {
  const { file, image } = await fresh();
  await image.createSnapshot("empty");
  const secret = createRandom(7).bytes(64 * KiB);
  await image.write(0, secret);
  await image.flush();
  assert.ok(contains(file.contents(), secret.subarray(0, 4096)));
  await image.applySnapshot("empty", { wipe: true });
  assert.ok(!contains(file.contents(), secret.subarray(0, 4096)));
  assert.ok((await readDevice(image)).every((b) => b === 0));
  await assertClean(image, file, "after apply");
  await image.close();
});

test("metadata.wipeFreedClusters: any freeing operation, completed by flush", async () => {
  const { file, image } = await fresh();
  const secret = createRandom(9).bytes(64 * KiB);
  await image.write(0, secret);
  await image.flush();
  image.metadata.wipeFreedClusters = true;
  await image.discard(0, 64 * KiB);
  // A freed cluster handed out again before the flush is zeroed first, so a partial write leaves nothing behind.
  await image.write(512 * KiB, new Uint8Array(512).fill(3));
  await image.flush();
  image.metadata.wipeFreedClusters = false;
  assert.ok(!contains(file.contents(), secret.subarray(30000, 34000)));
  await assertClean(image, file, "after discard + wipe");
  await image.close();
});

test("randomized: writes, resizes and snapshot create/apply/delete against a model", async (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (SNAPSTACK_SEED=${seed} to replay)`);
  const random = createRandom(seed);
  const cs = 4 * KiB;
  const { file, image } = await fresh({ clusterSizeBytes: cs, sizeBytes: 3 * MiB });
  let active = new Uint8Array(image.sizeBytes);
  const snaps = new Map<string, Uint8Array>();
  const steps = 120;
  for (let step = 0; step < steps; step++) {
    const roll = random.int(100);
    let what: string;
    if (roll < 45) {
      const length = 1 + random.int(5 * cs);
      const offset = random.int(active.length - length);
      const data = random.bytes(length);
      await image.write(offset, data);
      active.set(data, offset);
      what = `write ${offset}+${length}`;
    } else if (roll < 52) {
      const cluster = random.int(active.length / cs);
      const data = new Uint8Array(cs).fill(random.int(4));
      try {
        await image.writeCompressed(cluster * cs, data);
        active.set(data, cluster * cs);
        what = `compressed write at cluster ${cluster}`;
      } catch {
        what = `compressed write refused at cluster ${cluster}`;
      }
    } else if (roll < 58) {
      const offset = random.int(active.length / cs) * cs;
      const length = Math.min(active.length - offset, (1 + random.int(3)) * cs);
      await image.discard(offset, length);
      active.fill(0, offset, offset + length);
      what = `discard ${offset}+${length}`;
    } else if (roll < 62) {
      const newSize = (2 + random.int(3)) * MiB;
      await image.resize(newSize, { shrink: true });
      const resized = new Uint8Array(newSize);
      resized.set(active.subarray(0, Math.min(newSize, active.length)));
      active = resized;
      what = `resize ${newSize}`;
    } else if (roll < 78 && snaps.size < 12) {
      const info = await image.createSnapshot(`s${step}`);
      snaps.set(info.id, active.slice());
      what = `create ${info.id}`;
    } else if (roll < 89 && snaps.size > 0) {
      const ids = [...snaps.keys()];
      const id = ids[random.int(ids.length)];
      await image.applySnapshot(id, { wipe: random.int(2) === 0 });
      active = (snaps.get(id) as Uint8Array).slice();
      what = `apply ${id}`;
    } else if (snaps.size > 0) {
      const ids = [...snaps.keys()];
      const id = ids[random.int(ids.length)];
      await image.deleteSnapshot(id, { by: "id", wipe: random.int(2) === 0 });
      snaps.delete(id);
      what = `delete ${id}`;
    } else {
      what = "nothing";
    }
    const where = `step ${step} (${what}), seed ${seed}`;
    assert.equal(image.sizeBytes, active.length, `${where}: size`);
    assertSameBytes(await readDevice(image), active, `${where}: active`);
    for (const [id, content] of snaps) await assertSnapshotReads(image, id, content, `${where}: snapshot ${id}`);
    await assertClean(image, file, where);
  }
  await image.close();
});

test("snapshot views read through the image's backing chain and are read-only", async () => {
  const baseFile = new MemoryFile({ name: "base.qcow2" });
  await createQcow2(baseFile, { sizeBytes: 2 * MiB });
  const base = await openQcow2(baseFile, { readOnly: false, backing: null });
  await base.write(0, new Uint8Array(2 * MiB).fill(0xb0));
  const file = new MemoryFile({ name: "top.qcow2" });
  await createQcow2(file, { sizeBytes: 2 * MiB, backingFile: "base.qcow2", backingFormat: "qcow2" });
  const image = await openQcow2(file, { readOnly: false, backing: base, closeBacking: false });
  await image.write(64 * KiB, new Uint8Array(64 * KiB).fill(1));
  await image.createSnapshot("s");
  await image.write(0, new Uint8Array(256 * KiB).fill(2));
  const expected = new Uint8Array(2 * MiB).fill(0xb0);
  expected.fill(1, 64 * KiB, 128 * KiB);
  const view = await openSnapshotView(image, "s");
  assertSameBytes(await readDevice(view), expected, "view over the backing");
  assert.equal(view.readOnly, true);
  await assert.rejects(view.write(0, new Uint8Array(1)), failsWith("E_READ_ONLY"));
  await view.close();
  // Closing the view closed neither the image's file nor its backing.
  assert.equal((await readDevice(image))[0], 2);
  assert.equal((await readDevice(base))[0], 0xb0);
  await assertClean(image, file, "overlay with a snapshot");
  await image.close();
  await base.close();
});

test("a table pointer past the end of the file is corruption, not a reason to grow the file", async () => {
  const { file, image } = await fresh();
  await image.write(0, new Uint8Array(4096).fill(1));
  const l1Offset = image.header.l1TableOffset;
  await image.close();
  const bytes = file.contents().slice();
  new DataView(bytes.buffer).setBigUint64(l1Offset, (1n << 63n) | (1n << 50n)); // L1 entry 0 -> 1 PiB, COPIED
  const hostile = new MemoryFile({ contents: bytes });
  const opened = await openQcow2(hostile, { readOnly: false, backing: null });
  await assert.rejects(opened.createSnapshot("s"), failsWith("E_CORRUPT_IMAGE"));
  assert.ok((await hostile.sizeBytes()) < 2 * MiB, "no refcount block was placed far out");
  await opened.close();
});

/** A MemoryFile that records the host offset of every read. */
class ReadRecordingFile extends MemoryFile {
  readonly readOffsets: number[] = [];
  override async read(hostOffset: number, buffer: Uint8Array): Promise<number> {
    this.readOffsets.push(hostOffset);
    return super.read(hostOffset, buffer);
  }
}

test("apply reads and rewrites only the L2 tables written since the snapshot; the shared ones stay as they were", async () => {
  // 4 KiB clusters: 2 MiB per L2 table, so the 16 MiB disk has eight.
  const { file, image } = await fresh({ sizeBytes: 16 * MiB, clusterSizeBytes: 4 * KiB });
  const model = new Uint8Array(image.sizeBytes);
  for (let table = 0; table < 8; table++) {
    const data = new Uint8Array(8 * KiB).fill(table + 1);
    await image.write(table * 2 * MiB, data);
    model.set(data, table * 2 * MiB);
  }
  await image.createSnapshot("s");
  await image.write(0, new Uint8Array(4 * KiB).fill(0xee)); // COW of L2 table 0 only
  await image.close();
  const before = file.contents().slice();
  const l1 = before.subarray(Number(new DataView(before.buffer).getBigUint64(40)));
  const sharedTables = [1, 2, 3, 4, 5, 6, 7].map((index) => getL1Entry(l1, index).l2Offset);

  const recording = new ReadRecordingFile({ name: "snap.qcow2", contents: before });
  const reopened = await openQcow2(recording, { readOnly: false, backing: null });
  recording.readOffsets.length = 0;
  await reopened.applySnapshot("s");
  await reopened.flush();
  const after = recording.contents();
  for (const l2Offset of sharedTables) {
    assert.ok(!recording.readOffsets.includes(l2Offset), `shared table at 0x${l2Offset.toString(16)} not read`);
    assertSameBytes(after.subarray(l2Offset, l2Offset + 4 * KiB), before.subarray(l2Offset, l2Offset + 4 * KiB), `shared table at 0x${l2Offset.toString(16)}`);
  }
  assertSameBytes(await readDevice(reopened), model, "active state after apply");
  await assertClean(reopened, recording, "after apply");
  await reopened.close();
});

/**
 * A clean image whose snapshot maps one cluster twice: X, written at guest
 * offset 0 (L2 table 0, shared by the snapshot and the active state), is
 * also mapped by the snapshot's own copy of L2 table 1 at 2 MiB + 4 KiB,
 * its refcount raised to match (3: two references from the snapshot, one
 * from the active state). Returns the file and what the active state and
 * the snapshot read.
 */
async function snapshotMappingOneClusterTwice(): Promise<{ file: MemoryFile; active: Uint8Array; atSnapshot: Uint8Array }> {
  const { file, image } = await fresh({ sizeBytes: 16 * MiB, clusterSizeBytes: 4 * KiB });
  const active = new Uint8Array(image.sizeBytes);
  const write = async (guestOffset: number, value: number): Promise<void> => {
    const data = new Uint8Array(4 * KiB).fill(value);
    await image.write(guestOffset, data);
    active.set(data, guestOffset);
  };
  await write(0, 0x11);
  await write(2 * MiB, 0x22);
  await image.createSnapshot("s");
  const atSnapshot = active.slice();
  atSnapshot.fill(0x11, 2 * MiB + 4 * KiB, 2 * MiB + 8 * KiB);
  await write(2 * MiB, 0x33); // the active state gets its own copy of L2 table 1
  await image.close();

  const bytes = file.contents().slice();
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const l2EntryOffset = (entry: bigint): number => Number(entry & 0x00ff_ffff_ffff_fe00n);
  const activeL1 = bytes.subarray(Number(view.getBigUint64(40)));
  const x = l2EntryOffset(view.getBigUint64(getL1Entry(activeL1, 0).l2Offset));
  const snapshotL1 = bytes.subarray(Number(view.getBigUint64(Number(view.getBigUint64(64)))));
  view.setBigUint64(getL1Entry(snapshotL1, 1).l2Offset + 8, BigInt(x));
  const refblock = Number(view.getBigUint64(Number(view.getBigUint64(48))));
  const refcountAt = refblock + (x / (4 * KiB)) * 2;
  assert.equal(view.getUint16(refcountAt), 2, "X: referenced by the shared table, from both trees");
  view.setUint16(refcountAt, 3);
  return { file: new MemoryFile({ name: "snap.qcow2", contents: bytes }), active, atSnapshot };
}

test("delete skips its final pass only over tables its -1 pass left exact: a cluster the snapshot maps twice", async () => {
  const { file, active, atSnapshot } = await snapshotMappingOneClusterTwice();
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await assertClean(image, file, "the crafted image");
  await assertSnapshotReads(image, "s", atSnapshot, "snapshot mapping X twice");
  // The -1 pass walks the shared table 0 (X: 3 -> 2, COPIED stays clear), then the snapshot's table 1
  // (X: 2 -> 1). Table 0 is the active state's too: its COPIED bit for X must now be set.
  await image.deleteSnapshot("s");
  await assertClean(image, file, "after delete");
  assertSameBytes(await readDevice(image), active, "active after delete");
  await image.close();
});

test("a -1 pass records the tables it walked, and is exact only if it decremented no cluster twice and met no compressed entry", async () => {
  const record = async (closed: MemoryFile): Promise<DecrementRecord & { snapshotTables: number[] }> => {
    const file = new MemoryFile({ name: "snap.qcow2", contents: closed.contents() });
    const image = await openQcow2(file, { readOnly: false, backing: null });
    const snapshot = image.snapshots[0];
    const l1 = new Uint8Array(snapshot.l1Size * 8);
    await file.read(snapshot.l1TableOffset, l1);
    const snapshotTables = Array.from({ length: snapshot.l1Size }, (_, i) => getL1Entry(l1, i).l2Offset).filter((offset) => offset !== 0);
    const result: DecrementRecord = { tables: new Set(), exact: false };
    await updateTreeRefcounts(image.metadata, l1, snapshot.l1Size, -1, { record: result });
    return { ...result, snapshotTables };
  };

  const plain = await fresh({ sizeBytes: 16 * MiB, clusterSizeBytes: 4 * KiB });
  for (let table = 0; table < 8; table += 3) await plain.image.write(table * 2 * MiB, new Uint8Array(8 * KiB).fill(table + 1));
  await plain.image.createSnapshot("s");
  await plain.image.close();
  const exact = await record(plain.file);
  assert.equal(exact.exact, true, "every cluster decremented once");
  assert.deepEqual([...exact.tables].sort((a, b) => a - b), exact.snapshotTables.sort((a, b) => a - b));
  assert.equal(exact.tables.size, 3);

  assert.equal((await record((await snapshotMappingOneClusterTwice()).file)).exact, false, "X decremented twice");

  const compressed = await fresh({ sizeBytes: 16 * MiB, clusterSizeBytes: 4 * KiB });
  await compressed.image.write(0, new Uint8Array(4 * KiB).fill(1));
  await compressed.image.writeCompressed(2 * MiB, new Uint8Array(4 * KiB).fill(2));
  await compressed.image.createSnapshot("s");
  await compressed.image.close();
  assert.equal((await record(compressed.file)).exact, false, "a compressed entry");
});

/** A MemoryFile that logs every write (offset) and flush, in order. */
class OpLoggingFile extends MemoryFile {
  readonly ops: Array<number | "flush"> = [];
  override writeSync(hostOffset: number, data: Uint8Array): void {
    this.ops.push(hostOffset);
    super.writeSync(hostOffset, data);
  }
  override async flush(): Promise<void> {
    this.ops.push("flush");
    await super.flush();
  }
}

test("create and delete walk uncached tables through one buffer, in QEMU's write order, to the bytes a walk of cached tables leaves", async () => {
  // 4 KiB clusters: eight 2 MiB tables, each with data.
  const seed = await fresh({ sizeBytes: 16 * MiB, clusterSizeBytes: 4 * KiB });
  for (let table = 0; table < 8; table++) await seed.image.write(table * 2 * MiB + (table % 3) * 4 * KiB, new Uint8Array(12 * KiB).fill(table + 1));
  await seed.image.close();
  const date = { seconds: 1_700_000_000, nanoseconds: 0 };

  const run = async (cached: boolean): Promise<{ file: OpLoggingFile; image: Qcow2Image }> => {
    const file = new OpLoggingFile({ name: "snap.qcow2", contents: seed.file.contents() });
    const image = await openQcow2(file, { readOnly: false, backing: null });
    if (cached) await readDevice(image); // loads every table into the cache
    assert.equal(image.metadata.l2Cache.size, cached ? 8 : 0);
    return { file, image };
  };
  const uncached = await run(false);
  const cached = await run(true);
  const meta = uncached.image.metadata;
  const tables = new Set(Array.from({ length: 8 }, (_, i) => meta.l1EntryOffset(i)));
  const refblocks = new Set(meta.reftable.filter((offset) => offset !== 0));
  const kinds = (ops: Array<number | "flush">): string[] =>
    ops.map((op) => (op === "flush" ? "F" : tables.has(op - (op % (4 * KiB))) ? "L2" : refblocks.has(op - (op % (4 * KiB))) ? "R" : op === 60 ? "H" : "other"));

  for (const { image, file } of [uncached, cached]) {
    file.ops.length = 0;
    await image.createSnapshot("s", { date });
  }
  assert.equal(uncached.image.metadata.l2Cache.size, 0, "create cached no table");
  assertSameBytes(uncached.file.contents(), cached.file.contents(), "after create");
  // Raised refcounts durable before any table loses a COPIED bit; every table durable before the header switch.
  const created = kinds(uncached.file.ops);
  const firstTable = created.indexOf("L2");
  assert.ok(firstTable > 0 && created.slice(0, firstTable).includes("R"), `refcount blocks first: ${created.join(" ")}`);
  assert.equal(created.slice(created.lastIndexOf("R", firstTable), firstTable).includes("F"), true, `a flush between: ${created.join(" ")}`);
  assert.equal(created.filter((kind) => kind === "L2").length, 8);
  assert.ok(created.slice(created.lastIndexOf("L2"), created.indexOf("H")).includes("F"), `tables flushed before the header: ${created.join(" ")}`);

  for (const { image, file } of [uncached, cached]) {
    file.ops.length = 0;
    await image.deleteSnapshot("s");
  }
  assertSameBytes(uncached.file.contents(), cached.file.contents(), "after delete");
  assert.ok(kinds(uncached.file.ops).includes("L2"), "delete wrote the tables it walked");
  for (const { image, file } of [uncached, cached]) {
    await assertClean(image, file, "after delete");
    await image.close();
  }
});

/**
 * A MemoryFile that keeps what a flush made durable, and lets a test look
 * at each write against it (what a crash just before the write would show).
 */
class DurableWatchFile extends MemoryFile {
  durable = new Uint8Array(0);
  onWrite: ((hostOffset: number, data: Uint8Array) => void) | null = null;
  override writeSync(hostOffset: number, data: Uint8Array): void {
    this.onWrite?.(hostOffset, data);
    super.writeSync(hostOffset, data);
  }
  override async flush(): Promise<void> {
    await super.flush();
    this.durable = this.contents().slice();
  }
}

/** The refcount of host cluster `cluster` in image bytes (16-bit refcounts). */
function refcountIn(bytes: Uint8Array, cluster: number, clusterSizeBytes: number): number {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const perBlock = (clusterSizeBytes * 8) / 16;
  const block = Number(view.getBigUint64(Number(view.getBigUint64(48)) + Math.floor(cluster / perBlock) * 8));
  return block === 0 || block >= bytes.length ? 0 : view.getUint16(block + (cluster % perBlock) * 2);
}

for (const writeSync of [true, false]) {
  test(`create and delete keep QEMU's write order with the caches over their bound, every table checked against what a crash would leave (${writeSync ? "synchronous writes" : "writes on the pool"})`, async () => {
    // 4 KiB clusters, 70 tables of 2 MiB with 64 clusters each: ~4,600 host clusters, three refcount
    // blocks, through a cache of four clusters (two for refcount blocks): the walks trim it.
    const cs = 4 * KiB;
    const seed = await fresh({ sizeBytes: 140 * MiB, clusterSizeBytes: cs });
    for (let table = 0; table < 70; table++) await seed.image.write(table * 2 * MiB, new Uint8Array(64 * cs).fill(table + 1));
    await seed.image.close();
    const inner = new DurableWatchFile({ name: "snap.qcow2", contents: seed.file.contents() });
    inner.durable = inner.contents().slice();
    const file = writeSync ? inner : await FaultFile.wrap(inner, { writeSync: false });
    const image = await openQcow2(file, { readOnly: false, backing: null, cacheBytesMax: 4 * cs });
    const tables = new Set(Array.from({ length: 70 }, (_, i) => image.metadata.l1EntryOffset(i)));
    const refblocks = new Set(image.metadata.reftable.filter((offset) => offset !== 0));
    const entriesOf = (hostOffset: number, data: Uint8Array): bigint[] => {
      const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
      return Array.from({ length: data.length / 8 }, (_, i) => view.getBigUint64(i * 8)).filter(() => tables.has(hostOffset - (hostOffset % cs)));
    };

    // Create: a table whose COPIED bits are cleared is written only once its clusters' raised refcounts are durable.
    let tableWrites = 0;
    inner.onWrite = (hostOffset, data) => {
      for (const entry of entriesOf(hostOffset, data)) {
        if (entry === 0n || (entry & (1n << 63n)) !== 0n) continue;
        tableWrites++;
        const cluster = Number(entry & 0x00ff_ffff_ffff_fe00n) / cs;
        assert.equal(refcountIn(inner.durable, cluster, cs), 2, `create: a table clears COPIED for cluster ${cluster} before its raised refcount is durable`);
      }
    };
    await image.createSnapshot("s");
    assert.equal(tableWrites, 70 * 64, "create cleared COPIED in every entry");

    // Delete: no refcount block is written while a table written before it is not yet durable.
    let tableUnflushed = false;
    inner.onWrite = (hostOffset) => {
      const cluster = hostOffset - (hostOffset % cs);
      if (tables.has(cluster)) tableUnflushed = true;
      if (refblocks.has(cluster)) assert.equal(tableUnflushed, false, "delete: a refcount block written before the tables that rely on it are durable");
    };
    const flush = inner.flush.bind(inner);
    inner.flush = async () => {
      await flush();
      tableUnflushed = false;
    };
    await image.deleteSnapshot("s");
    inner.onWrite = null;
    await assertClean(image, inner, "after delete");
    await image.close();
  });
}

test("an old snapshot entry without a disk size gets the guest size (rounded to 512) when the table is rewritten", async () => {
  // A header size that is not a multiple of 512 (another tool's) and an entry without extra data
  // (QEMU before 2.12): the entry's disk size is the guest size, 99840, as QEMU writes it back.
  const created = await fresh({ sizeBytes: 99840 });
  await created.image.createSnapshot("s1");
  await created.image.close();
  const file = new MemoryFile({ name: "odd.qcow2", contents: created.file.contents() });
  const header = new Uint8Array(72);
  await file.read(0, header);
  const headerView = new DataView(header.buffer);
  headerView.setBigUint64(24, 100000n);
  await file.write(0, header);
  const tableOffset = Number(headerView.getBigUint64(64));
  const table = new Uint8Array(1024);
  await file.read(tableOffset, table);
  const view = new DataView(table.buffer);
  const extraBytes = view.getUint32(36);
  const namesBytes = view.getUint16(12) + view.getUint16(14);
  const stripped = new Uint8Array(table.length);
  stripped.set(table.subarray(0, 40));
  new DataView(stripped.buffer).setUint32(36, 0);
  stripped.set(table.subarray(40 + extraBytes, 40 + extraBytes + namesBytes), 40);
  await file.write(tableOffset, stripped);
  const odd = await openQcow2(file, { readOnly: false, backing: null });
  await odd.createSnapshot("s2");
  await odd.flush();
  await file.read(0, header);
  const rewritten = new Uint8Array(4096);
  await file.read(Number(headerView.getBigUint64(64)), rewritten);
  await odd.close();
  const { snapshots } = decodeSnapshotTable(rewritten, 2, 0);
  assert.deepEqual(
    snapshots.map((s) => [s.name, s.diskSizeBytes]),
    [
      ["s1", 99840],
      ["s2", 99840],
    ],
  );
});

test("readUncachedL2 with the entries a pass knows reads only the dirty chunks holding them, merged, and leaves the rest of the buffer alone", async () => {
  const { file, image } = await fresh({ sizeBytes: 1024 * MiB });
  const clusterBytes = image.metadata.clusterSizeBytes;
  const data = new Uint8Array(clusterBytes).fill(0x5a);
  // Entries 3 and 1000 are in chunks 0 and 1 (4 KiB each: 8 bytes an entry), 5000 in chunk 9.
  for (const guestCluster of [3, 1000, 5000]) await image.write(guestCluster * clusterBytes, data);
  await image.flush();
  const contents = new Uint8Array(await file.sizeBytes());
  await file.read(0, contents);
  await image.close();
  // Opened again from the bytes: no table cached.
  const copy = new MemoryFile({ name: "copy.qcow2", contents });
  const reopened = await openQcow2(copy, { readOnly: false, backing: null });
  const meta = reopened.metadata;
  const l2Offset = getL1Entry(meta.l1, 0).l2Offset;
  const reads: [number, number][] = [];
  const read = copy.read.bind(copy);
  copy.read = (hostOffset, buffer) => {
    reads.push([hostOffset - l2Offset, buffer.length]);
    return read(hostOffset, buffer);
  };
  const bytes = new Uint8Array(clusterBytes).fill(0xee);
  const table = await meta.readUncachedL2(l2Offset, bytes, Int32Array.of(3, 1000, 5000));
  copy.read = read;
  assert.deepEqual(reads, [
    [0, 8 * KiB],
    [36 * KiB, 4 * KiB],
  ]);
  const onDisk = new Uint8Array(clusterBytes);
  await copy.read(l2Offset, onDisk);
  for (const [from, to] of [
    [0, 8 * KiB],
    [36 * KiB, 40 * KiB],
  ]) {
    assertSameBytes(bytes.subarray(from, to), onDisk.subarray(from, to), `chunk bytes [${from}, ${to})`);
  }
  assert.ok(bytes.subarray(8 * KiB, 36 * KiB).every((b) => b === 0xee) && bytes.subarray(40 * KiB).every((b) => b === 0xee), "unread chunks untouched");
  for (const l2Index of [3, 1000, 5000]) assert.notEqual(table.view.getBigUint64(l2Index * 8), 0n, `entry ${l2Index} read`);
  // A change in a chunk that was not read would write the buffer's 0xee bytes over the table: refused, nothing written.
  markDirty(table, 20 * KiB, 8);
  await assert.rejects(meta.writeUncachedL2(table), /only the chunks read of a partly read L2 table/);
  const after = new Uint8Array(clusterBytes);
  await copy.read(l2Offset, after);
  assertSameBytes(after, onDisk, "table on disk after the refused write-back");
  table.dirtyChunks = 0;
  markDirty(table, 1000 * 8, 8);
  await meta.writeUncachedL2(table);
  await reopened.close();
});

test("refcount changes over a range go a run at a time and stop where one would overflow (undone whole) or reach zero (freed alone)", async () => {
  const { image } = await fresh({ refcountBits: 2 });
  const meta = image.metadata;
  const cs = meta.clusterSizeBytes;
  const data = new Uint8Array(4 * cs).fill(0x42);
  await image.write(0, data);
  const mapped = await image.metadata.getL2(getL1Entry(meta.l1, 0).l2Offset);
  const first = Number(mapped.view.getBigUint64(0) & 0x00fffffffffffe00n);
  const clusters = [0, 1, 2, 3].map((i) => first / cs + i);
  const refcounts = async (): Promise<number[]> => Promise.all(clusters.map((c) => meta.getRefcount(c)));
  assert.deepEqual(await refcounts(), [1, 1, 1, 1], "four contiguous data clusters");
  // Cluster 2 raised to the maximum (3): a raise over all four stops there and is undone whole.
  await meta.increaseRefcounts(first + 2 * cs, 2 * cs);
  await meta.increaseRefcounts(first + 2 * cs, cs);
  assert.deepEqual(await refcounts(), [1, 1, 3, 2]);
  await assert.rejects(meta.increaseRefcounts(first, 4 * cs), failsWith("E_TOO_LARGE"));
  assert.deepEqual(await refcounts(), [1, 1, 3, 2], "the clusters before the overflow were lowered again");
  // A drop over all four: cluster 0 (1 -> 0) is freed alone, the rest go as a run.
  await meta.increaseRefcounts(first + cs, cs);
  await meta.freeClusters(first, 4 * cs);
  assert.deepEqual(await refcounts(), [0, 1, 2, 1]);
  assert.equal(meta.freeClusterIndex <= clusters[0], true, "the freed cluster is where the allocator looks next");
  await image.close();
});

test("a raise over a run that holds freed clusters waiting for their punch takes them out of the pending punches", async () => {
  const { image } = await fresh();
  const meta = image.metadata;
  const cs = meta.clusterSizeBytes;
  await image.write(0, new Uint8Array(4 * cs).fill(0x42));
  const first = Number((await meta.getL2(getL1Entry(meta.l1, 0).l2Offset)).view.getBigUint64(0) & 0x00fffffffffffe00n);
  await meta.whileFreeing({}, async () => {
    await meta.freeClusters(first + cs, 2 * cs);
    assert.equal(meta.discardsPending, 2, "the freed clusters wait for their punch");
    assert.equal(await meta.allocClustersAt(first + cs, 2), 2, "allocated again, as one run");
    assert.equal(meta.discardsPending, 0, "in use again: no punch for them");
  });
  assert.deepEqual(await Promise.all([0, 1, 2, 3].map((i) => meta.getRefcount(first / cs + i))), [1, 1, 1, 1]);
  await image.close();
});

test("a snapshot's raise over a cluster in use whose refcount is 0 (a corrupt image) is refused, nothing of the run changed", async () => {
  const { image } = await fresh();
  const meta = image.metadata;
  const cs = meta.clusterSizeBytes;
  await image.write(0, new Uint8Array(4 * cs).fill(0x42));
  const first = Number((await meta.getL2(getL1Entry(meta.l1, 0).l2Offset)).view.getBigUint64(0) & 0x00fffffffffffe00n);
  // The third data cluster counted as free, as a damaged refcount block would say.
  await meta.freeClusters(first + 2 * cs, cs);
  await assert.rejects(meta.increaseRefcounts(first, 4 * cs), (error: unknown) => isSnapstackError(error) && error.code === "E_CORRUPT_IMAGE" && /is in use but its refcount is 0/.test(error.message));
  assert.deepEqual(await Promise.all([0, 1, 2, 3].map((i) => meta.getRefcount(first / cs + i))), [1, 1, 0, 1], "the raises before it undone");
  // Past every refcount block: no block is placed for it.
  const blocksBefore = meta.reftable.filter((offset) => offset !== 0).length;
  const beyond = meta.geometry.refcountBlockEntries * meta.reftable.length * cs;
  await assert.rejects(meta.increaseRefcounts(beyond, cs), /no refcount block covers it/);
  assert.equal(meta.reftable.filter((offset) => offset !== 0).length, blocksBefore);
  await image.close();
});
