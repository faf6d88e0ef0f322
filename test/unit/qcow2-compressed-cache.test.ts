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

test("the pieces of one read that a compressed backing cluster serves share one decompression", async () => {
  // A 2 MiB compressed cluster under an overlay of 512-byte clusters: a 1 MiB read is 2048
  // pieces of it. Each used to read and inflate the whole cluster at once (gigabytes).
  const baseFile = new MemoryFile({ name: "base.qcow2" });
  const bigClusterBytes = 2 * 1024 * 1024;
  await createQcow2(baseFile, { sizeBytes: 2 * bigClusterBytes, clusterSizeBytes: bigClusterBytes });
  const base = await openQcow2(baseFile, { readOnly: false, backing: null });
  const data = new Uint8Array(bigClusterBytes);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7) % 251;
  await base.writeCompressed(0, data);
  const topFile = new MemoryFile({ name: "top.qcow2" });
  await createQcow2(topFile, { sizeBytes: 2 * bigClusterBytes, clusterSizeBytes: 512, backingFile: "base.qcow2", backingFormat: "qcow2" });
  const top = await openQcow2(topFile, { readOnly: false, backing: base });
  await top.write(4096, new Uint8Array(512).fill(1));
  let baseReads = 0;
  const read = baseFile.read.bind(baseFile);
  baseFile.read = (offset, buffer) => {
    baseReads++;
    return read(offset, buffer);
  };
  const got = new Uint8Array(1024 * 1024);
  await top.read(0, got);
  const expected = data.slice(0, got.length);
  expected.fill(1, 4096, 4608);
  assert.deepEqual(got, expected);
  assert.equal(baseReads, 1, "one read of the compressed cluster for the whole request");
  await top.close();
});
