// Compressed cluster payloads: QEMU's zlib semantics (one inflate(Z_FINISH) into a cluster-sized buffer).
import { test } from "node:test";
import assert from "node:assert/strict";
import zlib from "node:zlib";
import { SnapstackError } from "../../src/base/errors.ts";
import { compressCluster, compressedStreamBytes, decompressCluster } from "../../src/formats/qcow2/compression.ts";
import { COMPRESSION_TYPE_ZLIB } from "../../src/formats/qcow2/header.ts";

const CLUSTER_BYTES = 65536;

/** A cluster of bytes that compress, different for each seed. */
function cluster(seed: number): Uint8Array {
  const bytes = new Uint8Array(CLUSTER_BYTES);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (Math.floor(i / 97) * 31 + seed * 7) % 251;
  return bytes;
}

/** A raw deflate stream of `data` that does not end: flushed to a byte boundary, no final block. */
function openStream(data: Uint8Array): Buffer {
  return zlib.deflateRawSync(data, { finishFlush: zlib.constants.Z_SYNC_FLUSH });
}

/** A byte that starts a block of the reserved type 3: inflate fails there ("invalid block type"). */
const BROKEN_BLOCK = Buffer.from([0xff, 0xff, 0xff, 0xff]);

test("decompressCluster: a stream QEMU wrote round-trips", () => {
  const data = cluster(1);
  const compressed = compressCluster(data, COMPRESSION_TYPE_ZLIB, CLUSTER_BYTES);
  assert.ok(compressed !== null);
  // QEMU packs compressed clusters at byte granularity: what follows the stream is the next one's bytes.
  const input = Buffer.concat([compressed, Buffer.from(openStream(cluster(2)))]);
  assert.deepEqual(Buffer.from(decompressCluster(input, COMPRESSION_TYPE_ZLIB, CLUSTER_BYTES)), Buffer.from(data));
  assert.equal(compressedStreamBytes(input, COMPRESSION_TYPE_ZLIB, CLUSTER_BYTES), compressed.length);
});

test("decompressCluster: a stream that goes on past one cluster gives its first cluster, as QEMU's inflate into a cluster-sized buffer", () => {
  const first = cluster(3);
  const input = zlib.deflateRawSync(Buffer.concat([first, cluster(4)]));
  assert.deepEqual(Buffer.from(decompressCluster(input, COMPRESSION_TYPE_ZLIB, CLUSTER_BYTES)), Buffer.from(first));
  const taken = compressedStreamBytes(input, COMPRESSION_TYPE_ZLIB, CLUSTER_BYTES);
  assert.ok(taken > 0 && taken < input.length, `the first cluster takes part of the stream (${taken} of ${input.length} bytes)`);
  // And that part alone is enough.
  assert.deepEqual(Buffer.from(decompressCluster(input.subarray(0, taken), COMPRESSION_TYPE_ZLIB, CLUSTER_BYTES)), Buffer.from(first));
});

test("decompressCluster: damage is seen where QEMU's one inflate call meets it: after the symbol that needs output past the cluster, not before", () => {
  const data = cluster(5);
  // Damage after more output than a cluster: QEMU's call stops at the first literal of the next cluster's
  // data (its buffer is full) and never reads the damage.
  const damagedLater = Buffer.concat([openStream(Buffer.concat([data, cluster(6)])), BROKEN_BLOCK]);
  assert.throws(() => zlib.inflateRawSync(damagedLater), /invalid block type/, "node:zlib alone refuses the stream");
  assert.deepEqual(Buffer.from(decompressCluster(damagedLater, COMPRESSION_TYPE_ZLIB, CLUSTER_BYTES)), Buffer.from(data));
  const taken = compressedStreamBytes(damagedLater, COMPRESSION_TYPE_ZLIB, CLUSTER_BYTES);
  assert.ok(taken > 0 && taken < openStream(Buffer.concat([data, cluster(6)])).length, `the cluster took ${taken} bytes, before the damage`);
  assert.deepEqual(Buffer.from(decompressCluster(damagedLater.subarray(0, taken), COMPRESSION_TYPE_ZLIB, CLUSTER_BYTES)), Buffer.from(data));

  // Damage right after the cluster's data: with the buffer full, zlib still decodes the end of the block,
  // the flush's empty stored block and the next block's header, which is invalid: EIO in QEMU.
  const damagedAfter = Buffer.concat([openStream(data), BROKEN_BLOCK]);
  const refused = (error: unknown): boolean => error instanceof SnapstackError && error.code === "E_COMPRESSION" && /does not inflate to 65536 bytes: invalid block type/.test(error.message);
  assert.throws(() => decompressCluster(damagedAfter, COMPRESSION_TYPE_ZLIB, CLUSTER_BYTES), refused);
  // And damage before a cluster of output.
  const damagedBefore = Buffer.concat([openStream(data.subarray(0, CLUSTER_BYTES / 2)), BROKEN_BLOCK, openStream(data.subarray(CLUSTER_BYTES / 2))]);
  assert.throws(() => decompressCluster(damagedBefore, COMPRESSION_TYPE_ZLIB, CLUSTER_BYTES), refused);
  // A stream that ends short of a cluster.
  assert.throws(
    () => decompressCluster(zlib.deflateRawSync(data.subarray(0, 1000)), COMPRESSION_TYPE_ZLIB, CLUSTER_BYTES),
    (error: unknown) => error instanceof SnapstackError && error.code === "E_COMPRESSION" && /1000 bytes, expected 65536/.test(error.message),
  );
});
