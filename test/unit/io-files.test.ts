import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import fs, { writeFileSync, readFileSync, chmodSync } from "node:fs";
import { isSnapstackError } from "../../src/base/errors.ts";
import { createNodeFile, openNodeFile, syncDirectory } from "../../src/io/node-file.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import type { ImageFile } from "../../src/io/file.ts";
import { scratchDir } from "../helpers/tools.ts";
import { createRandom, testSeed } from "../helpers/random.ts";

/** The ImageFile contract, run against every implementation. */
async function exerciseContract(file: ImageFile, seed: number): Promise<void> {
  const random = createRandom(seed);
  assert.equal(await file.sizeBytes(), 0);
  // Reads past EOF are zero-filled and report 0 bytes from the file.
  const past = new Uint8Array(16).fill(7);
  assert.equal(await file.read(100, past), 0);
  assert.deepEqual(past, new Uint8Array(16));
  // Writing past EOF extends the file with a zero gap.
  const data = random.bytes(5000);
  await file.write(3000, data);
  assert.equal(await file.sizeBytes(), 8000);
  const gap = new Uint8Array(3000).fill(9);
  assert.equal(await file.read(0, gap), 3000);
  assert.deepEqual(gap, new Uint8Array(3000));
  // A read straddling EOF returns the partial count and zero-fills the rest.
  const straddle = new Uint8Array(1000).fill(9);
  assert.equal(await file.read(7500, straddle), 500);
  assert.deepEqual(straddle.subarray(0, 500), data.subarray(4500));
  assert.deepEqual(straddle.subarray(500), new Uint8Array(500));
  // Shadow model: random overwrites and reads.
  const model = new Uint8Array(1 << 16);
  model.set(data, 3000);
  for (let i = 0; i < 200; i++) {
    const offset = random.int(60000);
    const length = 1 + random.int(4000);
    if (random.next() < 0.5) {
      const chunk = random.bytes(length);
      await file.write(offset, chunk);
      model.set(chunk, offset);
    } else {
      const out = new Uint8Array(length);
      await file.read(offset, out);
      assert.deepEqual(out, model.subarray(offset, offset + length), `read ${offset}+${length}`);
    }
  }
  // Shrink then grow: the regrown tail reads as zeroes.
  const size = await file.sizeBytes();
  await file.truncate(100);
  await file.truncate(size);
  const tail = new Uint8Array(size - 100);
  await file.read(100, tail);
  assert.deepEqual(tail, new Uint8Array(size - 100));
  await file.flush();
  await file.discard(0, 10);
  await file.close();
  await file.close(); // idempotent
}

test("MemoryFile honours the ImageFile contract", async (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  await exerciseContract(new MemoryFile(), seed);
});

test("NodeFile honours the ImageFile contract in sync, async and small-async (writes) modes", async (t) => {
  const dir = scratchDir(t);
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  await exerciseContract(await createNodeFile(join(dir, "a.img")), seed);
  await exerciseContract(await createNodeFile(join(dir, "b.img"), { ioMode: "async" }), seed);
  await (await createNodeFile(join(dir, "c.img"))).close();
  const split = await openNodeFile(join(dir, "c.img"), { ioMode: "sync", writeIoMode: "small-async" });
  assert.equal(split.writeIoMode, "small-async");
  await exerciseContract(split, seed);
  // Same seed, same operations: every mode leaves the same bytes.
  assert.deepEqual(readFileSync(join(dir, "a.img")), readFileSync(join(dir, "b.img")));
  assert.deepEqual(readFileSync(join(dir, "a.img")), readFileSync(join(dir, "c.img")));
});

test("NodeFile maps OS errors to coded errors and enforces read-only", async (t) => {
  const dir = scratchDir(t);
  await assert.rejects(openNodeFile(join(dir, "missing")), { code: "E_NOT_FOUND" });
  await assert.rejects(openNodeFile(dir), (error: { code: string }) => ["E_ACCESS", "E_IO"].includes(error.code));
  const path = join(dir, "x.img");
  writeFileSync(path, "hello");
  await assert.rejects(createNodeFile(path, { exclusive: true }), { code: "E_EXISTS" });
  const file = await openNodeFile(path, { readOnly: true });
  await assert.rejects(file.write(0, new Uint8Array(1)), { code: "E_READ_ONLY" });
  await assert.rejects(file.truncate(0), { code: "E_READ_ONLY" });
  const buffer = new Uint8Array(5);
  assert.equal(await file.read(0, buffer), 5);
  assert.equal(Buffer.from(buffer).toString(), "hello");
  await file.close();
  await assert.rejects(file.read(0, buffer), { code: "E_IO" });
  if (process.getuid?.() !== 0) {
    chmodSync(path, 0o400);
    await assert.rejects(openNodeFile(path), { code: "E_ACCESS" });
  }
  // createNodeFile without exclusive truncates, like qemu-img create.
  const again = await createNodeFile(path);
  assert.equal(await again.sizeBytes(), 0);
  assert.ok((await again.allocatedBytes()) >= 0);
  await again.close();
  await syncDirectory(dir);
  await assert.rejects(syncDirectory(join(dir, "nope")), { code: "E_NOT_FOUND" });
});

test("MemoryFile read-only and initial contents", async () => {
  const file = new MemoryFile({ contents: new Uint8Array([1, 2, 3]), readOnly: true, name: "m" });
  await assert.rejects(file.write(0, new Uint8Array(1)), { code: "E_READ_ONLY" });
  const out = new Uint8Array(4);
  assert.equal(await file.read(0, out), 3);
  assert.deepEqual(out, new Uint8Array([1, 2, 3, 0]));
  assert.deepEqual(file.contents(), new Uint8Array([1, 2, 3]));
});

test("NodeFile flushes run one at a time: callers that arrive meanwhile share the next fdatasync", async (t) => {
  const dir = scratchDir(t);
  const file = await createNodeFile(join(dir, "f.img"));
  let calls = 0;
  let running = 0;
  t.mock.method(fs, "fdatasync", (fd: number, callback: (error: NodeJS.ErrnoException | null) => void) => {
    calls++;
    running++;
    assert.equal(running, 1, "never two fdatasyncs at once");
    setTimeout(() => {
      running--;
      callback(null);
    }, 20);
  });
  await file.write(0, new Uint8Array(4096).fill(1));
  const first = file.flush();
  await file.write(4096, new Uint8Array(4096).fill(2));
  await Promise.all([first, file.flush(), file.flush(), file.flush()]);
  assert.equal(calls, 2, "the first flush, then one for the three that waited");
  await file.flush();
  assert.equal(calls, 3);

  // A caller that flushes again the moment its flush returns, while another waited: still one at a time.
  const waited = (async () => {
    await Promise.resolve();
    await file.flush();
  })();
  const again = file.flush().then(() => file.flush());
  await Promise.all([waited, again]);
  assert.ok(calls >= 5 && calls <= 6, `each caller's flush started after its call, none beside another (${calls} calls)`);
  // close waits for a running fdatasync (it must not run on a closed, maybe reused, descriptor).
  const closeSync = fs.closeSync;
  t.mock.method(fs, "closeSync", (fd: number) => {
    assert.equal(running, 0, "no fdatasync runs when the descriptor is closed");
    closeSync(fd);
  });
  const last = file.flush();
  await file.close();
  await last;
});

test("NodeFile: after a failed flush, every later flush fails too, also one that waited beside it (a write-back error is reported once)", async (t) => {
  const dir = scratchDir(t);
  const file = await createNodeFile(join(dir, "f.img"));
  let calls = 0;
  t.mock.method(fs, "fdatasync", (fd: number, callback: (error: NodeJS.ErrnoException | null) => void) => {
    calls++;
    const error = calls === 1 ? Object.assign(new Error("EIO: i/o error, fdatasync"), { code: "EIO", errno: -5, syscall: "fdatasync" }) : null;
    setTimeout(() => callback(error), 10);
  });
  await file.write(0, new Uint8Array(4096).fill(1));
  const failsWithEio = (error: unknown): boolean => isSnapstackError(error) && error.code === "E_IO";
  const [first, beside] = await Promise.allSettled([file.flush(), file.flush()]);
  assert.ok(first.status === "rejected" && failsWithEio(first.reason), "the flush that failed");
  assert.ok(beside.status === "rejected" && failsWithEio(beside.reason), "a flush that waited beside it");
  await assert.rejects(file.flush(), failsWithEio, "a later flush");
  assert.equal(calls, 1, "no fdatasync after the failure: the kernel would report success");
  await file.close();
});
