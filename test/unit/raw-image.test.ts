import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { statSync, readFileSync } from "node:fs";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { RawImage, createRaw, openRaw, roundUpToSector } from "../../src/formats/raw/raw-image.ts";
import { scratchDir } from "../helpers/tools.ts";
import { createRandom, testSeed } from "../helpers/random.ts";

test("raw virtual size is the file size rounded up to 512", async () => {
  const image = new RawImage(new MemoryFile({ contents: new Uint8Array(3000).fill(1) }), 3000);
  assert.equal(image.sizeBytes, 3072);
  assert.equal(image.format, "raw");
  assert.equal(image.backing, null);
  const tail = new Uint8Array(100).fill(9);
  await image.read(2972, tail);
  assert.deepEqual(tail.subarray(0, 28), new Uint8Array(28).fill(1));
  assert.deepEqual(tail.subarray(28), new Uint8Array(72));
  assert.equal(roundUpToSector(0), 0);
  assert.equal(roundUpToSector(512), 512);
});

test("raw read/write/writeZeroes follow a shadow model; out-of-range and read-only are refused", async (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  const size = 1 << 20;
  const file = new MemoryFile();
  await file.truncate(size);
  const image = new RawImage(file, size);
  const model = new Uint8Array(size);
  for (let i = 0; i < 300; i++) {
    const offset = random.int(size - 1);
    const length = 1 + random.int(Math.min(size - offset, 70000) - 1);
    const op = random.int(3);
    if (op === 0) {
      const data = random.bytes(length);
      await image.write(offset, data);
      model.set(data, offset);
    } else if (op === 1) {
      await image.writeZeroes(offset, length);
      model.fill(0, offset, offset + length);
    } else {
      const out = new Uint8Array(length);
      await image.read(offset, out);
      assert.deepEqual(out, model.subarray(offset, offset + length));
    }
  }
  await assert.rejects(image.read(size - 10, new Uint8Array(11)), { code: "E_OUT_OF_RANGE" });
  await assert.rejects(image.write(-1, new Uint8Array(1)), { code: "E_OUT_OF_RANGE" });
  assert.deepEqual(await image.layerStatus(4096, 8192), [{ guestOffset: 4096, lengthBytes: 8192, kind: "data", hostOffset: 4096 }]);
  assert.deepEqual(await image.layerStatus(0, 0), []);
  const readOnly = new RawImage(new MemoryFile({ contents: new Uint8Array(512), readOnly: true }), 512);
  await assert.rejects(readOnly.write(0, new Uint8Array(1)), { code: "E_READ_ONLY" });
  await assert.rejects(readOnly.writeZeroes(0, 1), { code: "E_READ_ONLY" });
  await assert.rejects(readOnly.discard(0, 1), { code: "E_READ_ONLY" });
  // Discard goes to the file; a MemoryFile zeroes what it drops (the ImageFile contract allows any contents).
  await image.discard(0, 512);
  model.fill(0, 0, 512);
  const first = new Uint8Array(512).fill(1);
  await image.read(0, first);
  assert.deepEqual(first, model.subarray(0, 512));
  const rest = new Uint8Array(512);
  await image.read(512, rest);
  assert.deepEqual(rest, model.subarray(512, 1024), "only the discarded range changed");
  await image.close();
  await image.close();
});

test("raw resize truncates to the exact size and fills per preallocation", async () => {
  const file = new MemoryFile({ contents: new Uint8Array(1024).fill(5) });
  const image = new RawImage(file, 1024);
  await image.resize(1000);
  assert.equal(await file.sizeBytes(), 1000);
  assert.equal(image.sizeBytes, 1024);
  await image.resize(4096, { preallocation: "full" });
  assert.equal(image.sizeBytes, 4096);
  const out = new Uint8Array(4096);
  await image.read(0, out);
  assert.deepEqual(out.subarray(0, 1000), new Uint8Array(1000).fill(5));
  assert.deepEqual(out.subarray(1000), new Uint8Array(3096));
});

test("createRaw rounds the size, overwrites, preallocates and refuses unknown modes", async (t) => {
  const dir = scratchDir(t);
  const path = join(dir, "a.raw");
  await createRaw(path, 1000);
  assert.equal(statSync(path).size, 1024);
  await createRaw(path, 8192, { preallocation: "full" });
  assert.equal(statSync(path).size, 8192);
  assert.ok(statSync(path).blocks * 512 >= 8192, "full preallocation allocates blocks");
  assert.deepEqual(readFileSync(path), Buffer.alloc(8192));
  await assert.rejects(createRaw(path, 512, { preallocation: "metadata" as never }), { code: "E_INVALID_OPTION", message: /Unsupported preallocation mode: metadata/ });
  const image = await openRaw(path, { readOnly: true });
  assert.equal(image.sizeBytes, 8192);
  assert.equal(image.readOnly, true);
  await image.close();
  await assert.rejects(openRaw(join(dir, "missing")), { code: "E_NOT_FOUND" });
});
