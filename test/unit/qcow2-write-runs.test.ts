// The qcow2 allocating write path with multi-cluster plans (whole unallocated
// clusters of one request share a plan and get consecutive host clusters),
// data runs that span clusters, and write() with the metadata mutex released
// during the data write: content against an in-memory reference, checkQcow2
// clean (no corruption, no leak), and the host layout where it is decided.
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { createQcow2, type Qcow2CreateOptions } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2, type Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { createNodeFile } from "../../src/io/node-file.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { assertClean } from "../helpers/qcow2-clean.ts";
import { scratchDir } from "../helpers/tools.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

type Random = ReturnType<typeof createRandom>;

async function openFresh(sizeBytes: number, options: Partial<Qcow2CreateOptions>, backing: Qcow2Image | null): Promise<{ file: MemoryFile; image: Qcow2Image }> {
  const file = new MemoryFile({ name: "runs.qcow2" });
  await createQcow2(file, { sizeBytes, ...options });
  return { file, image: await openQcow2(file, { readOnly: false, backing, closeBacking: false }) };
}

/** A read-only backing image of sizeBytes filled with random data, and its bytes. */
async function backingImage(random: Random, sizeBytes: number, options: Partial<Qcow2CreateOptions>): Promise<{ image: Qcow2Image; bytes: Uint8Array }> {
  const { file, image } = await openFresh(sizeBytes, options, null);
  const bytes = random.bytes(sizeBytes);
  await image.write(0, bytes);
  await image.close();
  return { image: await openQcow2(new MemoryFile({ name: "base.qcow2", contents: file.contents(), readOnly: true }), { readOnly: true, backing: null }), bytes };
}

async function assertContent(image: Qcow2Image, expected: Uint8Array, what: string): Promise<void> {
  const actual = new Uint8Array(expected.length);
  await image.read(0, actual);
  for (let i = 0; i < expected.length; i++) if (actual[i] !== expected[i]) assert.fail(`${what}: first difference at byte ${i} (${actual[i]} != ${expected[i]})`);
}

/** Host offset of the cluster holding guestOffset in this layer (-1 when it has none). */
async function hostOffsetOf(image: Qcow2Image, guestOffset: number): Promise<number> {
  const [extent] = await image.layerStatus(guestOffset, 1);
  return extent.kind === "data" && extent.hostOffset !== undefined ? extent.hostOffset : -1;
}

for (const geometry of [
  { label: "64 KiB clusters", options: {} },
  { label: "4 KiB clusters (a request spans L2 tables)", options: { clusterSizeBytes: 4 * KiB } },
  { label: "extended L2", options: { extendedL2: true } },
]) {
  test(`a request over many unallocated clusters with COW at both ends over a backing image: ${geometry.label}`, async (t) => {
    const seed = testSeed();
    t.diagnostic(`seed ${seed}`);
    const random = createRandom(seed);
    const sizeBytes = 8 * MiB;
    const backing = await backingImage(random, sizeBytes, geometry.options);
    const { file, image } = await openFresh(sizeBytes, geometry.options, backing.image);
    const expected = Uint8Array.from(backing.bytes);
    const cs = image.clusterSizeBytes;
    // Starts and ends inside a cluster; 3 MiB covers hundreds of 4 KiB clusters and two L2 tables.
    const start = cs + 1 + random.int(cs - 2);
    const data = random.bytes(3 * MiB + random.int(cs));
    await image.write(start, data);
    expected.set(data, start);
    await assertContent(image, expected, "after the write");
    // The whole clusters of the request sit in one host run wherever no L2 table was placed between them.
    const first = await hostOffsetOf(image, start);
    assert.ok(first > 0, "the first cluster is allocated");
    assert.equal(await hostOffsetOf(image, start + cs), first + cs, "the next cluster follows on the host");
    // Overwrite part of it (in place) and a range around its end (in place + allocating + COW tail).
    const again = random.bytes(2 * cs);
    await image.write(start + cs, again);
    expected.set(again, start + cs);
    const across = random.bytes(4 * cs);
    const acrossAt = start + data.length - 2 * cs;
    await image.write(acrossAt, across);
    expected.set(across, acrossAt);
    await assertContent(image, expected, "after overwriting");
    await assertClean(image, file, "check");
    await image.close();
    await backing.image.close();
  });
}

test("a multi-cluster plan is split where allocation must leave the contiguous run (freed cluster, then first fit)", async () => {
  const cs = 64 * KiB;
  const { file, image } = await openFresh(16 * MiB, {}, null);
  const expected = new Uint8Array(16 * MiB);
  const put = async (guestOffset: number, data: Uint8Array): Promise<void> => {
    await image.write(guestOffset, data);
    expected.set(data, guestOffset);
  };
  // Guest cluster 0 at host h, guest clusters 20 and 21 at h + cs and h + 2cs.
  await put(0, new Uint8Array(cs).fill(1));
  await put(20 * cs, new Uint8Array(2 * cs).fill(2));
  const h = await hostOffsetOf(image, 0);
  assert.deepEqual([await hostOffsetOf(image, 20 * cs), await hostOffsetOf(image, 21 * cs)], [h + cs, h + 2 * cs]);
  // Free host cluster h + cs (discard without backing on v3 releases the cluster).
  await image.discard(20 * cs, cs);
  expected.fill(0, 20 * cs, 21 * cs);
  assert.equal(await hostOffsetOf(image, 20 * cs), -1);
  // One request over guest clusters 0 (in place at h) .. 4: clusters 1-4 are one plan; allocation continues
  // at h + cs (free) for one cluster, h + 2cs is taken, so clusters 2-4 get one first-fit run of three.
  const data = new Uint8Array(5 * cs - 100);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
  await put(0, data);
  await assertContent(image, expected, "after the request");
  const hosts = [];
  for (let c = 1; c < 5; c++) hosts.push(await hostOffsetOf(image, c * cs));
  assert.equal(hosts[0], h + cs, "allocation continues after the in-place cluster");
  assert.ok(hosts[1] > h + 2 * cs, "the rest is placed elsewhere");
  assert.deepEqual(hosts.slice(1), [hosts[1], hosts[1] + cs, hosts[1] + 2 * cs], "and together");
  await assertClean(image, file, "check");
  await image.close();
});

test("concurrent write() calls to adjacent and shared clusters over a backing image", async (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  const sizeBytes = 4 * MiB;
  for (const options of [{}, { clusterSizeBytes: 4 * KiB }, { extendedL2: true }] as Partial<Qcow2CreateOptions>[]) {
    const backing = await backingImage(random, sizeBytes, options);
    const { file, image } = await openFresh(sizeBytes, options, backing.image);
    const expected = Uint8Array.from(backing.bytes);
    const cs = image.clusterSizeBytes;
    for (let round = 0; round < 3; round++) {
      // Disjoint requests in random order, all in flight at once: neighbours share clusters
      // (unaligned ends), so the range lock orders some and the rest allocate concurrently.
      const requests: { guestOffset: number; data: Uint8Array }[] = [];
      for (let at = random.int(cs); requests.length < 64; ) {
        const length = 1 + random.int(random.int(3) === 0 ? 5 * cs : cs);
        if (at + length > sizeBytes) break;
        requests.push({ guestOffset: at, data: random.bytes(length) });
        at += length + (random.int(2) === 0 ? 0 : random.int(2 * cs));
      }
      for (let i = requests.length - 1; i > 0; i--) {
        const j = random.int(i + 1);
        [requests[i], requests[j]] = [requests[j], requests[i]];
      }
      await Promise.all(requests.map((r) => image.write(r.guestOffset, r.data)));
      for (const r of requests) expected.set(r.data, r.guestOffset);
      await assertContent(image, expected, `round ${round} ${JSON.stringify(options)}`);
    }
    await assertClean(image, file, `check ${JSON.stringify(options)}`);
    await image.close();
    await backing.image.close();
  }
});

test("allocation grows the refcount table in the middle of one request and of a batch", async (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  // 512-byte clusters with 64-bit refcounts: a refcount block covers 64 clusters (32 KiB) and the
  // one-cluster refcount table 64 blocks (2 MiB of host file): a 3 MiB request outgrows it.
  const options: Partial<Qcow2CreateOptions> = { clusterSizeBytes: 512, refcountBits: 64 };
  const sizeBytes = 8 * MiB;
  const { file, image } = await openFresh(sizeBytes, options, null);
  const expected = new Uint8Array(sizeBytes);
  const data = random.bytes(3 * MiB + 300);
  await image.write(100, data);
  expected.set(data, 100);
  await assertContent(image, expected, "after one request");
  const batch = [
    { guestOffset: 4 * MiB, data: random.bytes(MiB) },
    { guestOffset: 5 * MiB + 512, data: random.bytes(2 * MiB - 1024) },
  ];
  await image.writeBatch(batch);
  for (const r of batch) expected.set(r.data, r.guestOffset);
  await assertContent(image, expected, "after the batch");
  await assertClean(image, file, "check");
  await image.close();
  const reopened = await openQcow2(new MemoryFile({ name: "again.qcow2", contents: file.contents(), readOnly: true }), { readOnly: true, backing: null });
  await assertContent(reopened, expected, "after reopening");
  await reopened.close();
});

test("in-place overwrites across L2 tables with a cache too small to hold them (the loading path) and with it holding them", async (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  // 4 KiB clusters: an L2 table covers 2 MiB; a cache of 3 clusters holds about one table and a refcount block.
  const options: Partial<Qcow2CreateOptions> = { clusterSizeBytes: 4 * KiB };
  const sizeBytes = 8 * MiB;
  for (const cacheBytesMax of [3 * 4 * KiB, undefined]) {
    const file = new MemoryFile({ name: "cache.qcow2" });
    await createQcow2(file, { sizeBytes, ...options });
    const image = await openQcow2(file, { readOnly: false, backing: null, cacheBytesMax });
    const expected = random.bytes(sizeBytes);
    await image.write(0, expected);
    const fileBytesBefore = file.contents().length;
    for (let i = 0; i < 40; i++) {
      const at = random.int(sizeBytes - 1);
      const data = random.bytes(1 + random.int(Math.min(sizeBytes - at, 5 * MiB) - 1));
      await image.write(at, data);
      expected.set(data, at);
    }
    await assertContent(image, expected, `cache ${cacheBytesMax ?? "default"}`);
    await assertClean(image, file, `check, cache ${cacheBytesMax ?? "default"}`);
    assert.equal(file.contents().length, fileBytesBefore, "overwrites allocate nothing");
    await image.close();
  }
});

test("write() calls on a file with writeSync (NodeFile: the data is written on the calling thread), allocating then in place, concurrent, over a backing image", async (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  const sizeBytes = 4 * MiB;
  const backing = await backingImage(random, sizeBytes, {});
  const file = await createNodeFile(join(scratchDir(t), "sync.qcow2"));
  const fileWriteSync = file.writeSync;
  assert.ok(fileWriteSync !== undefined, "NodeFile offers writeSync");
  // Counted: synchronous writes of 256 KiB or more (data; metadata tables are one 64 KiB cluster).
  let syncWrites = 0;
  (file as { writeSync?: (hostOffset: number, data: Uint8Array) => void }).writeSync = (hostOffset, data) => {
    if (data.length >= 256 * KiB) syncWrites++;
    fileWriteSync(hostOffset, data);
  };
  await createQcow2(file, { sizeBytes });
  const image = await openQcow2(file, { readOnly: false, backing: backing.image, closeBacking: false });
  const expected = Uint8Array.from(backing.bytes);
  // 256 KiB-aligned writes (whole clusters, one host piece each: the synchronous branch) and unaligned ones (COW padding).
  const requests: { guestOffset: number; data: Uint8Array }[] = [];
  for (let at = 0; at + 256 * KiB <= sizeBytes; at += 512 * KiB) requests.push({ guestOffset: at, data: random.bytes(256 * KiB) });
  for (let i = 0; i < 8; i++) {
    const at = 256 * KiB + i * 512 * KiB + 1 + random.int(100 * KiB);
    requests.push({ guestOffset: at, data: random.bytes(1 + random.int(150 * KiB)) });
  }
  await Promise.all(requests.map((r) => image.write(r.guestOffset, r.data)));
  for (const r of requests) expected.set(r.data, r.guestOffset);
  await assertContent(image, expected, "after the writes");
  const allocatingSyncWrites = syncWrites;
  assert.ok(allocatingSyncWrites >= sizeBytes / (512 * KiB), `allocating writes went out synchronously (${allocatingSyncWrites})`);
  // Again, in place now (and partly allocating where the unaligned writes left clusters unallocated).
  const again = requests.map((r) => ({ guestOffset: r.guestOffset, data: random.bytes(r.data.length) }));
  await Promise.all(again.map((r) => image.write(r.guestOffset, r.data)));
  for (const r of again) expected.set(r.data, r.guestOffset);
  await assertContent(image, expected, "after overwriting");
  assert.ok(syncWrites - allocatingSyncWrites >= sizeBytes / (512 * KiB), `in-place writes went out synchronously (${syncWrites - allocatingSyncWrites})`);
  // Over 1 MiB: the file's own path (a synchronous pwrite that long would stall the event loop).
  const beforeLarge = syncWrites;
  const large = random.bytes(2 * MiB);
  await image.write(0, large);
  expected.set(large, 0);
  assert.equal(syncWrites, beforeLarge, "a 2 MiB write is not synchronous");
  await assertContent(image, expected, "after a 2 MiB write");
  await assertClean(image, file, "after overwriting");
  await image.close();
  await backing.image.close();
});
