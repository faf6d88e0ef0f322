// Qcow2Image.writeBatch must leave exactly the file that the same writes
// issued one by one with write() leave (convert relies on it for qemu-img's
// layout), whatever the geometry, alignment and existing content.
import { test } from "node:test";
import assert from "node:assert/strict";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { createQcow2, type Qcow2CreateOptions } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2, type Qcow2Image, type WriteRequest } from "../../src/formats/qcow2/qcow2-image.ts";
import { isSnapstackError } from "../../src/base/errors.ts";
import { createRandom, testSeed } from "../helpers/random.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE_BYTES = 8 * MiB;

type Random = ReturnType<typeof createRandom>;

async function openFresh(options: Partial<Qcow2CreateOptions>, backing: Qcow2Image | null): Promise<{ file: MemoryFile; image: Qcow2Image }> {
  const file = new MemoryFile({ name: "batch.qcow2" });
  await createQcow2(file, { sizeBytes: SIZE_BYTES, ...options });
  return { file, image: await openQcow2(file, { readOnly: false, backing, closeBacking: false }) };
}

/** A read-only qcow2 backing image with a few data ranges. */
async function backingImage(random: Random): Promise<Qcow2Image> {
  const { file, image } = await openFresh({}, null);
  for (let i = 0; i < 8; i++) await image.write(random.int(SIZE_BYTES - 256 * KiB), random.bytes(1 + random.int(256 * KiB)));
  await image.close();
  return openQcow2(new MemoryFile({ name: "base.qcow2", contents: file.contents(), readOnly: true }), { readOnly: true, backing: null });
}

/**
 * Ascending, non-overlapping requests of random sizes and gaps (some share a
 * cluster, some span L2 tables); with `aligned`, whole clusters (no COW
 * padding: the batches whose data writes overlap).
 */
function randomRequests(random: Random, clusterBytes: number, aligned = false): WriteRequest[] {
  const requests: WriteRequest[] = [];
  const align = (bytes: number): number => (aligned ? Math.ceil(bytes / clusterBytes) * clusterBytes : bytes);
  let at = align(random.int(clusterBytes));
  while (requests.length < 40) {
    const length = align(1 + random.int(random.int(4) === 0 ? 3 * clusterBytes : clusterBytes / 2 + 1));
    if (at + length > SIZE_BYTES) break;
    requests.push({ guestOffset: at, data: random.bytes(length) });
    at += length + align(random.int(3) === 0 ? 0 : random.int(random.int(2) === 0 ? clusterBytes : 64 * clusterBytes));
  }
  return requests;
}

const GEOMETRIES: Array<{ label: string; options: Partial<Qcow2CreateOptions>; backing: boolean }> = [
  { label: "64 KiB clusters", options: {}, backing: false },
  { label: "4 KiB clusters, 1-bit refcounts (small L2 tables)", options: { clusterSizeBytes: 4 * KiB, refcountBits: 1 }, backing: false },
  { label: "64 KiB clusters over a backing image (COW padding)", options: {}, backing: true },
  { label: "extended L2 over a backing image", options: { extendedL2: true }, backing: true },
  { label: "compat 0.10", options: { compat: "0.10" }, backing: false },
];

/**
 * Batches as convert's writer issues them: each started once the one before
 * reported its clusters allocated (onAllocated), two in flight at most.
 */
async function writeOverlapped(image: Qcow2Image, batches: WriteRequest[][]): Promise<void> {
  let previous: { allocated: Promise<void>; done: Promise<void> } | null = null;
  for (const batch of batches) {
    if (previous !== null) await previous.allocated;
    const before = previous;
    let allocated!: () => void;
    const started = { allocated: new Promise<void>((resolve) => (allocated = resolve)), done: image.writeBatch(batch, { onAllocated: () => allocated() }) };
    if (before !== null) await before.done;
    previous = started;
  }
  await previous?.done;
}

for (const overlapped of [false, true]) for (const geometry of GEOMETRIES) {
  test(`writeBatch${overlapped ? " (overlapped, onAllocated)" : ""} leaves the file write() leaves: ${geometry.label}`, async (t) => {
    const seed = testSeed();
    t.diagnostic(`seed ${seed}`);
    const random = createRandom(seed);
    const backing = geometry.backing ? await backingImage(random) : null;
    const one = await openFresh(geometry.options, backing);
    const batched = await openFresh(geometry.options, backing);
    const clusterBytes = one.image.clusterSizeBytes;
    for (let round = 0; round < 3; round++) {
      // Later rounds overwrite earlier data: in-place and allocating writes mixed in a batch.
      const requests = randomRequests(random, clusterBytes, overlapped && round !== 1);
      for (const request of requests) await one.image.write(request.guestOffset, request.data);
      const batches: WriteRequest[][] = [];
      for (let first = 0; first < requests.length; ) {
        const end = first + 1 + random.int(8);
        batches.push(requests.slice(first, end));
        first = end;
      }
      if (overlapped) await writeOverlapped(batched.image, batches);
      else for (const batch of batches) await batched.image.writeBatch(batch);
    }
    const expected = new Uint8Array(SIZE_BYTES);
    const actual = new Uint8Array(SIZE_BYTES);
    await one.image.read(0, expected);
    await batched.image.read(0, actual);
    assert.ok(Buffer.from(expected).equals(Buffer.from(actual)), "same guest content");
    await one.image.close();
    await batched.image.close();
    assert.ok(Buffer.from(one.file.contents()).equals(Buffer.from(batched.file.contents())), "byte-identical image files");
    await backing?.close();
  });
}

test("writeBatch refuses requests out of order or overlapping, before writing", async () => {
  const { file, image } = await openFresh({}, null);
  const before = file.contents().slice();
  const isOutOfRange = (e: unknown): boolean => isSnapstackError(e) && e.code === "E_OUT_OF_RANGE";
  await assert.rejects(image.writeBatch([{ guestOffset: MiB, data: new Uint8Array(10) }, { guestOffset: 0, data: new Uint8Array(10) }]), isOutOfRange);
  await assert.rejects(image.writeBatch([{ guestOffset: 0, data: new Uint8Array(100) }, { guestOffset: 99, data: new Uint8Array(10) }]), isOutOfRange);
  await assert.rejects(image.writeBatch([{ guestOffset: SIZE_BYTES - 1, data: new Uint8Array(2) }]), isOutOfRange);
  assert.ok(Buffer.from(file.contents()).equals(Buffer.from(before)), "nothing written");
  await image.writeBatch([]);
  await image.close();
});
