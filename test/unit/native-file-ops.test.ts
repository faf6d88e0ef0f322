/**
 * NodeFile's hole punching, zeroing in place, preallocation and hole
 * finding (the native addon, src/io/native-file-ops.ts) on real files in
 * the scratch directory: what each call leaves readable, how many blocks
 * the file then occupies (stat), and where its holes are. The fallback
 * without the addon is exercised in a child process with SNAPSTACK_NATIVE=0.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { closeSync, mkdtempSync, openSync, rmSync, statSync, statfsSync, writeSync } from "node:fs";
import { join } from "node:path";
import { isSnapstackError } from "../../src/base/errors.ts";
import { readSkippingHoles, writeZeroBytes } from "../../src/io/file.ts";
import { NodeFile, createNodeFile, openNodeFile } from "../../src/io/node-file.ts";
import { requireNativeFileOps, scratchDir } from "../helpers/tools.ts";

/** statfs f_type of tmpfs. */
const TMPFS_MAGIC = 0x01021994;
const KiB = 1024;
const MiB = 1024 * KiB;

function allocatedBytes(path: string): number {
  return statSync(path).blocks * 512;
}

async function readBack(file: NodeFile, offset: number, length: number): Promise<Uint8Array> {
  const buffer = new Uint8Array(length);
  await file.read(offset, buffer);
  return buffer;
}

/** A 4 MiB file: a hole, 64 KiB of 0x11 at 1 MiB, a hole, 1 MiB of 0x22 at 3 MiB. */
async function sparseFile(path: string): Promise<NodeFile> {
  const file = await createNodeFile(path);
  await file.truncate(4 * MiB);
  await file.write(1 * MiB, new Uint8Array(64 * KiB).fill(0x11));
  await file.write(3 * MiB, new Uint8Array(1 * MiB).fill(0x22));
  return file;
}

/** Run `fn` on a fresh sparseFile in the scratch directory (needs the addon), closing it afterwards. */
async function onSparseFile(t: TestContext, name: string, fn: (file: NodeFile, path: string) => Promise<void>): Promise<void> {
  if (!requireNativeFileOps(t)) return;
  const path = join(scratchDir(t), name);
  const file = await sparseFile(path);
  try {
    await fn(file, path);
  } finally {
    await file.close();
  }
}

test("holes: the data and hole runs of a sparse file, for any window", (t) =>
  onSparseFile(t, "sparse", async (file) => {
    assert.deepEqual(await file.holes(0, 4 * MiB), [
      { hostOffset: 0, lengthBytes: 1 * MiB, hole: true },
      { hostOffset: 1 * MiB, lengthBytes: 64 * KiB, hole: false },
      { hostOffset: 1 * MiB + 64 * KiB, lengthBytes: 2 * MiB - 64 * KiB, hole: true },
      { hostOffset: 3 * MiB, lengthBytes: 1 * MiB, hole: false },
    ]);
    // Windows starting inside data; past the file's end nothing is reported.
    assert.deepEqual(await file.holes(1 * MiB + 4 * KiB, 2 * MiB), [
      { hostOffset: 1 * MiB + 4 * KiB, lengthBytes: 60 * KiB, hole: false },
      { hostOffset: 1 * MiB + 64 * KiB, lengthBytes: 2 * MiB - 64 * KiB, hole: true },
      { hostOffset: 3 * MiB, lengthBytes: 4 * KiB, hole: false },
    ]);
    assert.deepEqual(await file.holes(1 * MiB + 4 * KiB, 1 * MiB), [
      { hostOffset: 1 * MiB + 4 * KiB, lengthBytes: 60 * KiB, hole: false },
      { hostOffset: 1 * MiB + 64 * KiB, lengthBytes: 1 * MiB - 60 * KiB, hole: true },
    ]);
    assert.deepEqual(await file.holes(3 * MiB + 512 * KiB, 8 * MiB), [{ hostOffset: 3 * MiB + 512 * KiB, lengthBytes: 512 * KiB, hole: false }]);
    assert.deepEqual(await file.holes(5 * MiB, 1 * MiB), []);
  }),
);

test("holes with knownDataOk: answered from the last data run found (whole, past the window); this file's punches and truncates forget it, another descriptor's show only without the option", (t) =>
  onSparseFile(t, "known-data", async (file, path) => {
    const data = (hostOffset: number, lengthBytes: number) => [{ hostOffset, lengthBytes, hole: false }];
    // A window inside the 1 MiB data run at 3 MiB: the lookup learns the whole run, to the file's end.
    assert.deepEqual(await file.holes(3 * MiB, 4 * KiB, { knownDataOk: true }), data(3 * MiB, 4 * KiB));
    // Punched through another descriptor: only an exact query sees the hole; a READ's may send its zeroes as data.
    const other = await openNodeFile(path, { readOnly: false });
    try {
      await other.discard(3 * MiB + 256 * KiB, 64 * KiB);
    } finally {
      await other.close();
    }
    const punched = [
      { hostOffset: 3 * MiB + 192 * KiB, lengthBytes: 64 * KiB, hole: false },
      { hostOffset: 3 * MiB + 256 * KiB, lengthBytes: 64 * KiB, hole: true },
      { hostOffset: 3 * MiB + 320 * KiB, lengthBytes: 64 * KiB, hole: false },
    ];
    assert.deepEqual(await file.holes(3 * MiB + 192 * KiB, 192 * KiB, { knownDataOk: true }), data(3 * MiB + 192 * KiB, 192 * KiB));
    assert.deepEqual(await file.holes(3 * MiB + 192 * KiB, 192 * KiB), punched);
    // The exact query learned the run after the hole; a window reaching past a run is looked up.
    assert.deepEqual(await file.holes(3 * MiB + 192 * KiB, 192 * KiB, { knownDataOk: true }), punched);
    assert.deepEqual(await file.holes(3 * MiB + 512 * KiB, 64 * KiB, { knownDataOk: true }), data(3 * MiB + 512 * KiB, 64 * KiB));
    // This file's own punch forgets the run at once, and so does a zeroInPlace.
    await file.discard(3 * MiB + 512 * KiB, 64 * KiB);
    assert.deepEqual(await file.holes(3 * MiB + 448 * KiB, 192 * KiB, { knownDataOk: true }), [
      { hostOffset: 3 * MiB + 448 * KiB, lengthBytes: 64 * KiB, hole: false },
      { hostOffset: 3 * MiB + 512 * KiB, lengthBytes: 64 * KiB, hole: true },
      { hostOffset: 3 * MiB + 576 * KiB, lengthBytes: 64 * KiB, hole: false },
    ]);
    assert.equal(await file.zeroInPlace(3 * MiB + 640 * KiB, 64 * KiB, "punch"), true);
    assert.deepEqual((await file.holes(3 * MiB + 576 * KiB, 192 * KiB, { knownDataOk: true }))?.map((run) => run.hole), [false, true, false]);
    // A truncate forgets it too: what lies past the new end is not reported at all.
    assert.deepEqual(await file.holes(3 * MiB + 896 * KiB, 64 * KiB, { knownDataOk: true }), data(3 * MiB + 896 * KiB, 64 * KiB));
    await file.truncate(3 * MiB + 900 * KiB);
    assert.deepEqual(await file.holes(3 * MiB + 896 * KiB, 64 * KiB, { knownDataOk: true }), data(3 * MiB + 896 * KiB, 4 * KiB));
    // Holes are never remembered: a write into one shows at once.
    assert.deepEqual(await file.holes(2 * MiB, 4 * KiB, { knownDataOk: true }), [{ hostOffset: 2 * MiB, lengthBytes: 4 * KiB, hole: true }]);
    await file.write(2 * MiB, new Uint8Array(4 * KiB).fill(0x33));
    assert.deepEqual(await file.holes(2 * MiB, 4 * KiB, { knownDataOk: true }), data(2 * MiB, 4 * KiB));
  }),
);

test("discard and zeroInPlace('punch') free the range, which reads as zeroes; the size stays", (t) =>
  onSparseFile(t, "punch", async (file, path) => {
    const before = allocatedBytes(path);
    await file.discard(3 * MiB, 256 * KiB);
    assert.equal(await file.zeroInPlace(3 * MiB + 512 * KiB, 256 * KiB, "punch"), true);
    assert.equal(await file.sizeBytes(), 4 * MiB);
    assert.equal(allocatedBytes(path), before - 512 * KiB);
    assert.deepEqual(await readBack(file, 3 * MiB, 256 * KiB), new Uint8Array(256 * KiB));
    assert.deepEqual(await readBack(file, 3 * MiB + 256 * KiB, 256 * KiB), new Uint8Array(256 * KiB).fill(0x22));
    assert.deepEqual(await readBack(file, 3 * MiB + 512 * KiB, 256 * KiB), new Uint8Array(256 * KiB));
    // A punch inside one block zeroes those bytes and keeps the rest of the block.
    assert.equal(await file.zeroInPlace(3 * MiB + 768 * KiB + 100, 200, "punch"), true);
    const block = await readBack(file, 3 * MiB + 768 * KiB, 4 * KiB);
    assert.deepEqual(block.subarray(100, 300), new Uint8Array(200));
    assert.deepEqual(block.subarray(0, 100), new Uint8Array(100).fill(0x22));
    assert.deepEqual(block.subarray(300), new Uint8Array(4 * KiB - 300).fill(0x22));
  }),
);

test("zeroInPlace('allocate') and preallocate allocate without writing; preallocate extends the file", (t) =>
  onSparseFile(t, "allocate", async (file, path) => {
    const before = allocatedBytes(path);
    // Over data it zeroes, over a hole it allocates.
    assert.equal(await file.zeroInPlace(1 * MiB, 64 * KiB, "allocate"), true);
    assert.equal(await file.zeroInPlace(0, 512 * KiB, "allocate"), true);
    assert.equal(allocatedBytes(path), before + 512 * KiB);
    assert.deepEqual(await readBack(file, 0, 2 * MiB), new Uint8Array(2 * MiB));
    assert.equal(await file.preallocate(4 * MiB, 1 * MiB), true);
    assert.equal(await file.sizeBytes(), 5 * MiB);
    assert.equal(allocatedBytes(path), before + 512 * KiB + 1 * MiB);
    assert.deepEqual(await readBack(file, 4 * MiB, 1 * MiB), new Uint8Array(1 * MiB));
  }),
);

test("writeZeroBytes: 'punch' leaves the file's size, 'allocate' grows it as a write would", async (t) => {
  if (!requireNativeFileOps(t)) return;
  const path = join(scratchDir(t), "zeroes");
  const file = await createNodeFile(path);
  try {
    await file.write(0, new Uint8Array(1 * MiB).fill(7));
    await writeZeroBytes(file, 512 * KiB, 1 * MiB, "punch");
    assert.equal(await file.sizeBytes(), 1 * MiB);
    assert.deepEqual(await readBack(file, 512 * KiB, 1 * MiB), new Uint8Array(1 * MiB));
    assert.deepEqual(await readBack(file, 0, 512 * KiB), new Uint8Array(512 * KiB).fill(7));
    assert.deepEqual(await file.holes(0, 1 * MiB), [
      { hostOffset: 0, lengthBytes: 512 * KiB, hole: false },
      { hostOffset: 512 * KiB, lengthBytes: 512 * KiB, hole: true },
    ]);
    await writeZeroBytes(file, 768 * KiB, 512 * KiB, "allocate");
    assert.equal(await file.sizeBytes(), 1280 * KiB);
    // Allocated: the first 512 KiB of data and the 512 KiB zeroed in place (SEEK_DATA may call the
    // latter a hole: ext4 reports unwritten extents so unless their pages are cached).
    assert.equal(allocatedBytes(path), 1 * MiB);
    assert.deepEqual(await readBack(file, 512 * KiB, 768 * KiB), new Uint8Array(768 * KiB));
  } finally {
    await file.close();
  }
});

test("with allocateLargeWrites, large writes allocate what a plain write allocates, on the thread pool, on the calling thread and vectored; the write sets the size", (t) =>
  onSparseFile(t, "allocating", async (file, path) => {
    file.allocateLargeWrites = true;
    // A twin written with plain node:fs writes, step by step: the same size and the same data runs after each.
    // (Runs, not st_blocks: ext4 may count one more block for its extent tree, where an allocated extent did
    // not merge with its neighbour yet; that is the file system's metadata, not the file's.)
    const twin = await sparseFile(`${path}.twin`);
    const twinFd = openSync(`${path}.twin`, "r+");
    const steps: Array<{ name: string; hostOffset: number; length: number; write: (data: Uint8Array) => Promise<void> | void }> = [
      { name: "write (pool)", hostOffset: 0, length: 1 * MiB, write: (data) => file.write(0, data) },
      { name: "writeSync", hostOffset: 2 * MiB, length: 512 * KiB, write: (data) => file.writeSync!(2 * MiB, data) },
      { name: "writev", hostOffset: 2 * MiB + 512 * KiB, length: 256 * KiB, write: (data) => file.writev(2 * MiB + 512 * KiB, [data.subarray(0, 100 * KiB), data.subarray(100 * KiB)]) },
      { name: "write past the end", hostOffset: 5 * MiB, length: 256 * KiB, write: (data) => file.write(5 * MiB, data) },
      { name: "overwrite", hostOffset: 3 * MiB, length: 1 * MiB, write: (data) => file.write(3 * MiB, data) },
    ];
    try {
      for (const [index, { name, hostOffset, length, write }] of steps.entries()) {
        const data = new Uint8Array(length).fill(0x31 + index);
        await write(data);
        writeSync(twinFd, data, 0, length, hostOffset);
        const size = statSync(path).size;
        assert.equal(size, statSync(`${path}.twin`).size, `${name}: file size equals a plain write's`);
        assert.deepEqual(await file.holes(0, size), await twin.holes(0, size), `${name}: data runs equal a plain write's`);
        assert.deepEqual(await readBack(file, hostOffset, length), data, `${name}: bytes read back`);
        // SEEK_DATA does not see allocated blocks never written (unwritten extents): st_blocks does.
        assert.ok(allocatedBytes(path) <= allocatedBytes(`${path}.twin`) + 4 * KiB, `${name}: no more blocks than a plain write, give or take an extent block`);
      }
      assert.deepEqual(
        (await file.holes(0, 6 * MiB))?.filter((run) => !run.hole),
        [
          { hostOffset: 0, lengthBytes: 1 * MiB + 64 * KiB, hole: false },
          { hostOffset: 2 * MiB, lengthBytes: 768 * KiB, hole: false },
          { hostOffset: 3 * MiB, lengthBytes: 1 * MiB, hole: false },
          { hostOffset: 5 * MiB, lengthBytes: 256 * KiB, hole: false },
        ],
      );
    } finally {
      closeSync(twinFd);
      await twin.close();
    }
  }));

test("a large write the system refuses fails with a coded error naming the file, from the thread pool and from this thread", async (t) => {
  if (!requireNativeFileOps(t)) return;
  const path = join(scratchDir(t), "refused");
  await (await sparseFile(path)).close();
  // Opened for reading by the system but not marked read-only: the write reaches pwrite, which fails (EBADF).
  const fd = openSync(path, "r");
  const file = new NodeFile(path, fd, false, "auto");
  file.allocateLargeWrites = true;
  try {
    const refused = (error: unknown): boolean => isSnapstackError(error) && error.code === "E_IO" && error.message.includes(path) && error.message.includes("EBADF");
    await assert.rejects(file.write(0, new Uint8Array(1 * MiB)), refused);
    await assert.rejects(file.writev(0, [new Uint8Array(256 * KiB), new Uint8Array(256 * KiB)]), refused);
    assert.throws(() => file.writeSync!(0, new Uint8Array(1 * MiB)), refused);
    assert.deepEqual(await readBack(file, 1 * MiB, 64 * KiB), new Uint8Array(64 * KiB).fill(0x11));
  } finally {
    await file.close();
  }
});

test("a read-only file refuses to punch, zero or preallocate with E_READ_ONLY and stays as it was", async (t) => {
  if (!requireNativeFileOps(t)) return;
  const path = join(scratchDir(t), "ro");
  await (await sparseFile(path)).close();
  const before = allocatedBytes(path);
  const file = await openNodeFile(path, { readOnly: true });
  try {
    for (const attempt of [() => file.discard(3 * MiB, 4 * KiB), () => file.zeroInPlace(3 * MiB, 4 * KiB, "punch"), () => file.preallocate(0, 4 * KiB)]) {
      await assert.rejects(attempt(), (error) => isSnapstackError(error) && error.code === "E_READ_ONLY");
    }
    assert.equal(allocatedBytes(path), before);
    assert.deepEqual(await readBack(file, 3 * MiB, 4 * KiB), new Uint8Array(4 * KiB).fill(0x22));
  } finally {
    await file.close();
  }
});

test("SNAPSTACK_NATIVE=0: no holes seen, nothing punched, zeroes written instead", (t) => {
  const path = join(scratchDir(t), "fallback");
  const script = `
    import { createNodeFile } from "./src/io/node-file.ts";
    import { writeZeroBytes } from "./src/io/file.ts";
    import { nativeFileOpsLoaded } from "./src/io/native-file-ops.ts";
    const file = await createNodeFile(${JSON.stringify(path)});
    await file.write(0, new Uint8Array(65536).fill(7));
    await file.truncate(1048576);
    file.allocateLargeWrites = true; // asks for the addon's allocating write, which falls back to node:fs
    await file.write(524288, new Uint8Array(524288).fill(9));
    const holes = await file.holes(0, 1048576);
    const punched = await file.zeroInPlace(0, 4096, "punch");
    await file.discard(4096, 4096);
    await writeZeroBytes(file, 8192, 4096, "punch");
    const bytes = new Uint8Array(1048576);
    await file.read(0, bytes);
    await file.close();
    console.log(JSON.stringify({ loaded: nativeFileOpsLoaded(), holes, punched, kept: [...new Set(bytes.subarray(4096, 8192))], zeroed: [...new Set(bytes.subarray(8192, 12288))], large: [...new Set(bytes.subarray(524288))] }));`;
  const output = execFileSync(process.execPath, ["--input-type=module", "-e", script], { cwd: join(import.meta.dirname, "../.."), env: { ...process.env, SNAPSTACK_NATIVE: "0" } });
  assert.deepEqual(JSON.parse(output.toString()), { loaded: false, holes: null, punched: false, kept: [7], zeroed: [0], large: [9] });
});

test("zeroInPlace('allocate') on tmpfs, which lacks FALLOC_FL_ZERO_RANGE: a punched hole allocated again, as qemu falls back", async (t) => {
  if (!requireNativeFileOps(t)) return;
  let dir: string;
  try {
    if (statfsSync("/dev/shm").type !== TMPFS_MAGIC) throw new Error("not tmpfs");
    dir = mkdtempSync("/dev/shm/snapstack-test-");
  } catch {
    t.skip("no tmpfs at /dev/shm");
    return;
  }
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, "zero");
  const file = await createNodeFile(path);
  try {
    await file.write(0, new Uint8Array(1 * MiB).fill(7));
    assert.equal(await file.zeroInPlace(256 * KiB, 256 * KiB, "allocate"), true);
    assert.equal(allocatedBytes(path), 1 * MiB, "still allocated");
    assert.deepEqual(await readBack(file, 256 * KiB, 256 * KiB), new Uint8Array(256 * KiB));
    assert.deepEqual(await readBack(file, 512 * KiB, 4 * KiB), new Uint8Array(4 * KiB).fill(7));
  } finally {
    await file.close();
  }
});

test("readSkippingHoles: the bytes read() gives, zeroes past the end included, without reading the holes", (t) =>
  onSparseFile(t, "skip.bin", async (file) => {
    const reads: [number, number][] = [];
    const counting = {
      read: (hostOffset: number, buffer: Uint8Array) => {
        reads.push([hostOffset, buffer.length]);
        return file.read(hostOffset, buffer);
      },
      holes: (hostOffset: number, lengthBytes: number) => file.holes(hostOffset, lengthBytes),
      holesReliable: () => true,
    };
    for (const [offset, length] of [
      [0, 4 * MiB],
      [1 * MiB + 4 * KiB, 2 * MiB],
      [3 * MiB + 512 * KiB, 1 * MiB],
      [5 * MiB, 64 * KiB],
    ]) {
      reads.length = 0;
      const skipped = new Uint8Array(length).fill(0xee);
      await readSkippingHoles(counting, offset, skipped);
      assert.deepEqual(skipped, await readBack(file, offset, length), `bytes of [${offset}, +${length})`);
      const dataBytes = Math.max(0, Math.min(offset + length, 1 * MiB + 64 * KiB) - Math.max(offset, 1 * MiB)) + Math.max(0, Math.min(offset + length, 4 * MiB) - Math.max(offset, 3 * MiB));
      assert.equal(
        reads.reduce((sum, [, bytes]) => sum + bytes, 0),
        dataBytes,
        `bytes read for [${offset}, +${length}): ${JSON.stringify(reads)}`,
      );
    }
    // Where the file system's answers are not known to be exact: one plain read.
    reads.length = 0;
    const plain = new Uint8Array(2 * MiB);
    await readSkippingHoles({ ...counting, holesReliable: () => false }, 0, plain);
    assert.deepEqual(reads, [[0, 2 * MiB]]);
    assert.deepEqual(plain, await readBack(file, 0, 2 * MiB));
  }));

test("cached tells whether the page cache holds a range; readSkippingHoles reads a cached range in one call", (t) =>
  onSparseFile(t, "cached.bin", async (file, path) => {
    if ((await file.cached(0, 4096)) === null) {
      // Linux before 6.5 has no cachestat: callers then skip holes without asking.
      t.diagnostic("cachestat unsupported by this kernel: cached() reports null");
      return;
    }
    // The holes were never read: no page holds them yet. The data just written is cached.
    assert.equal(await file.cached(0, 64 * KiB), false, "a hole never read");
    assert.equal(await file.cached(3 * MiB, 1 * MiB), true, "data just written");
    // Everything read once: data pages and the zero pages of the holes are cached now (tmpfs
    // reads its holes from the shared zero page instead, so they stay uncached there).
    await readBack(file, 0, 4 * MiB);
    const tmpfs = statfsSync(path).type === TMPFS_MAGIC;
    if (!tmpfs) assert.equal(await file.cached(0, 4 * MiB), true);
    assert.equal(file.holesReliable(), true, "ext4, xfs, btrfs and tmpfs answer exactly");
    assert.equal(await file.cached(4 * MiB - 100, 4096), false, "a range past the end is not all cached");
    const calls: string[] = [];
    const counting = {
      read: (hostOffset: number, buffer: Uint8Array) => {
        calls.push(`read ${hostOffset}+${buffer.length}`);
        return file.read(hostOffset, buffer);
      },
      holes: (hostOffset: number, lengthBytes: number) => {
        calls.push(`holes ${hostOffset}`);
        return file.holes(hostOffset, lengthBytes);
      },
      cached: (hostOffset: number, lengthBytes: number) => file.cached(hostOffset, lengthBytes),
      holesReliable: () => true,
    };
    if (tmpfs) return;
    const at = 1 * MiB - 32 * KiB;
    const table = new Uint8Array(64 * KiB).fill(0xee);
    await readSkippingHoles(counting, at, table);
    assert.deepEqual(table, await readBack(file, at, 64 * KiB));
    assert.deepEqual(calls, [`read ${at}+${64 * KiB}`], "a cached range: one read, no seeking");
  }));
