// NodeFile.writev writes pieces back to back (sync and thread-pool sizes),
// and the qcow2 write path that uses it leaves the same file as the plain
// write path does.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { createNodeFile, openNodeFile, ASYNC_IO_THRESHOLD_BYTES } from "../../src/io/node-file.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { createQcow2 } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2, type WriteRequest } from "../../src/formats/qcow2/qcow2-image.ts";
import { scratchDir } from "../helpers/tools.ts";
import { createRandom, testSeed } from "../helpers/random.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

test("writev writes its pieces back to back, small (sync) and large (thread pool)", async (t) => {
  const dir = scratchDir(t);
  const random = createRandom(testSeed());
  for (const [label, pieceBytes] of [
    ["small", 700],
    ["large", ASYNC_IO_THRESHOLD_BYTES],
  ] as const) {
    const path = join(dir, `${label}.bin`);
    const file = await createNodeFile(path);
    const pieces = [random.bytes(pieceBytes), random.bytes(1), random.bytes(pieceBytes + 3)];
    const hostOffset = 12345;
    await file.writev(hostOffset, pieces);
    await file.close();
    const written = readFileSync(path);
    assert.equal(written.length, hostOffset + pieces.reduce((sum, p) => sum + p.length, 0));
    assert.ok(written.subarray(0, hostOffset).every((b) => b === 0));
    assert.ok(written.subarray(hostOffset).equals(Buffer.concat(pieces)), `${label}: pieces in order`);
  }
  const readOnly = await openNodeFile(join(dir, "small.bin"), { readOnly: true });
  await assert.rejects(readOnly.writev(0, [new Uint8Array(1)]), (e: { code?: string }) => e.code === "E_READ_ONLY");
  await readOnly.close();
});

test("qcow2 batched writes through a NodeFile (vectored) leave the file plain writes leave", async (t) => {
  const dir = scratchDir(t);
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  const requests: WriteRequest[] = [];
  for (let at = 100; at + MiB < 32 * MiB; at += MiB + random.int(3 * MiB)) requests.push({ guestOffset: at, data: random.bytes(MiB - random.int(4 * KiB)) });

  const expectedFile = new MemoryFile({ name: "expected.qcow2" });
  await createQcow2(expectedFile, { sizeBytes: 32 * MiB });
  const expected = await openQcow2(expectedFile, { readOnly: false, backing: null });
  for (const request of requests) await expected.write(request.guestOffset, request.data);
  await expected.close();

  const path = join(dir, "batched.qcow2");
  const created = await createNodeFile(path);
  await createQcow2(created, { sizeBytes: 32 * MiB });
  await created.close();
  const batched = await openQcow2(await openNodeFile(path), { readOnly: false, backing: null });
  for (let first = 0; first < requests.length; first += 4) await batched.writeBatch(requests.slice(first, first + 4));
  await batched.close();
  assert.ok(readFileSync(path).equals(Buffer.from(expectedFile.contents())), "byte-identical image files");
});
