/**
 * Regression: a compressed cluster freed and its host bytes reused by a new
 * compressed write must not read back through the stale decompressed-cluster
 * cache (found by the randomized workload with SNAPSTACK_SEED=237944569).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { createQcow2 } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2 } from "../../src/formats/qcow2/qcow2-image.ts";

test("a compressed write into reused host bytes reads back its own data", async () => {
  const file = new MemoryFile({ name: "mem.qcow2" });
  const clusterSizeBytes = 65536;
  await createQcow2(file, { sizeBytes: 4 * clusterSizeBytes });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  const first = new Uint8Array(clusterSizeBytes).fill(0x5a);
  first[0] = 249;
  await image.writeCompressed(0, first);
  const readBack = new Uint8Array(clusterSizeBytes);
  await image.read(0, readBack);
  assert.equal(readBack[0], 249, "first compressed cluster reads back (and is now cached)");
  // Free it, then compress other data: the allocator hands out the same host bytes.
  await image.writeZeroes(0, clusterSizeBytes, { unmap: true });
  const second = new Uint8Array(clusterSizeBytes).fill(0x5a);
  second[0] = 6;
  await image.writeCompressed(0, second);
  await image.read(0, readBack);
  assert.equal(readBack[0], 6);
  assert.deepEqual(readBack, second);
  await image.close();
});
