// The metadata caches stay within their bound on the read path too, and the
// L2 cache hands the memory of evicted tables back instead of leaving it to
// the garbage collector.
import { test } from "node:test";
import assert from "node:assert/strict";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { createQcow2 } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2 } from "../../src/formats/qcow2/qcow2-image.ts";
import { TableCache } from "../../src/formats/qcow2/table-cache.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

test("reads alone keep the L2 cache within its bound", async () => {
  const clusterBytes = 4 * KiB;
  const l2CoverageBytes = (clusterBytes / 8) * clusterBytes; // 2 MiB per L2 table
  const sizeBytes = 64 * MiB;
  const file = new MemoryFile({ name: "many-tables.qcow2" });
  await createQcow2(file, { sizeBytes, clusterSizeBytes: clusterBytes });
  const writer = await openQcow2(file, { readOnly: false, backing: null });
  for (let at = 0; at < sizeBytes; at += l2CoverageBytes) await writer.write(at + 512, new Uint8Array([at / l2CoverageBytes + 1]));
  await writer.close();

  const image = await openQcow2(new MemoryFile({ name: file.name, contents: file.contents(), readOnly: true }), {
    readOnly: true,
    backing: null,
    cacheBytesMax: 8 * clusterBytes,
  });
  const cache = image.metadata.l2Cache;
  const byte = new Uint8Array(1);
  for (let round = 0; round < 3; round++) {
    for (let at = 0; at < sizeBytes; at += l2CoverageBytes) {
      await image.read(at + 512, byte);
      assert.equal(byte[0], at / l2CoverageBytes + 1);
      assert.ok(cache.size <= cache.entriesMax, `cache holds ${cache.size} tables, bound ${cache.entriesMax}`);
    }
  }
  await image.close();
});

test("the last eviction hold released trims; freeEvicted detaches evicted tables at the next trim", async () => {
  const tableBytes = 512;
  const file = new MemoryFile({ name: "tables", contents: new Uint8Array(64 * tableBytes).fill(7) });
  const cache = new TableCache(file, tableBytes, 4, { freeEvicted: true });
  const release = cache.holdEviction();
  const held = [];
  for (let i = 0; i < 8; i++) held.push(await cache.get(i * tableBytes));
  assert.equal(cache.size, 8, "nothing evicted while held");
  release();
  assert.equal(cache.size, 3, "trimmed to 3/4 of the bound on release");
  const evicted = held.filter((table) => cache.peek(table.hostOffset) === undefined);
  assert.equal(evicted.length, 5);
  assert.ok(evicted.every((table) => table.bytes.length === tableBytes), "still readable until the next trim");
  for (let i = 8; i < 10; i++) await cache.get(i * tableBytes);
  assert.ok(evicted.every((table) => table.bytes.length === 0), "detached at the next trim");
  assert.throws(() => evicted[0].view.getUint32(0), TypeError);
});
