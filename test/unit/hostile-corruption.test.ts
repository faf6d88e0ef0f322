/**
 * Corruption is its own outcome: metadata that cannot be right (an L2 entry
 * pointing into the refcount table, the L1 table or another L2 table, an
 * L2 table placed over the refcount table, an unaligned L2 offset) marks
 * the image corrupt on disk, refuses further writes with E_CORRUPT_IMAGE
 * naming offset and structure, and leaves reads elsewhere working. The
 * overlap check stops the write before it lands.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { openQcow2, type Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { INCOMPAT_CORRUPT } from "../../src/formats/qcow2/header.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { isSnapstackError, type SnapstackError } from "../../src/base/errors.ts";
import { COPIED, getField, getU64, imageLayout, imageWithData, l2EntryOffset, setU64 } from "../helpers/crash-image-surgery.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const CS = 4 * KiB;

function isCorrupt(pattern: RegExp): (e: unknown) => boolean {
  return (e: unknown) => {
    if (!isSnapstackError(e) || e.code !== "E_CORRUPT_IMAGE") return false;
    assert.match(e.message, pattern);
    return true;
  };
}

async function cluster(image: Qcow2Image, guestCluster: number): Promise<Uint8Array> {
  const buffer = new Uint8Array(CS);
  await image.read(guestCluster * CS, buffer);
  return buffer;
}

/** After corruption: bit on disk (v3), writes refused naming the damage, reads elsewhere fine. */
async function assertMarked(file: MemoryFile, image: Qcow2Image, structure: RegExp, version: 2 | 3 = 3): Promise<void> {
  const onDisk = getField(file.contents(), "incompatibleFeatures");
  if (version === 3) assert.ok((onDisk & INCOMPAT_CORRUPT) !== 0n, "corrupt bit written to the header");
  else assert.equal(onDisk, 0n, "v2 has no corrupt bit");
  let refused: SnapstackError | null = null;
  try {
    await image.write(9 * CS, new Uint8Array(512).fill(9));
  } catch (error) {
    refused = error as SnapstackError;
  }
  assert.ok(refused !== null && refused.code === "E_CORRUPT_IMAGE", `later writes refused: ${refused?.code}`);
  assert.match(refused.message, structure);
  assert.match(refused.message, /0x[0-9a-f]+/, "names the offset");
  await assert.rejects(image.writeZeroes(0, CS), (e: unknown) => isSnapstackError(e) && e.code === "E_CORRUPT_IMAGE");
  await assert.rejects(image.discard(0, CS), (e: unknown) => isSnapstackError(e) && e.code === "E_CORRUPT_IMAGE");
  // Reads that do not touch the damage still work.
  assert.ok((await cluster(image, 1)).every((b) => b === 2));
  assert.ok((await cluster(image, 3)).every((b) => b === 4));
}

test("a data cluster mapped onto the refcount table: the write is stopped and the image marked corrupt", async () => {
  const bytes = await imageWithData({ sizeBytes: MiB, clusterSizeBytes: CS }, [0, 1, 2, 3]);
  const layout = imageLayout(bytes);
  const reftableBefore = bytes.slice(layout.refcountTableOffset, layout.refcountTableOffset + CS);
  setU64(bytes, l2EntryOffset(bytes, 2), BigInt(layout.refcountTableOffset) | COPIED);
  const file = new MemoryFile({ contents: bytes });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await assert.rejects(image.write(2 * CS + 100, new Uint8Array(200).fill(0xee)), isCorrupt(/Marking image as corrupt: Preventing invalid write on metadata \(overlaps with refcount table\): host offset 0x/));
  const after = file.contents();
  assert.deepEqual(after.slice(layout.refcountTableOffset, layout.refcountTableOffset + CS), reftableBefore, "refcount table untouched");
  await assertMarked(file, image, /refcount table/);
  await image.close();
  // Like QEMU: a marked image opens read-only only.
  await assert.rejects(openQcow2(new MemoryFile({ contents: file.contents() }), { readOnly: false, backing: null }), (e: unknown) => isSnapstackError(e) && e.code === "E_IMAGE_MARKED_CORRUPT");
  const readOnly = await openQcow2(new MemoryFile({ contents: file.contents(), readOnly: true }), { readOnly: true, backing: null });
  assert.ok((await cluster(readOnly, 0)).every((b) => b === 1));
  await readOnly.close();
});

test("data clusters mapped onto the L1 table, an L2 table, a refcount block: every write stopped; onto the header: treated as unallocated", async () => {
  for (const target of ["active L1 table", "active L2 table", "refcount block", "qcow2_header"] as const) {
    const bytes = await imageWithData({ sizeBytes: MiB, clusterSizeBytes: CS }, [0, 1, 2, 3]);
    const layout = imageLayout(bytes);
    const offset =
      target === "active L1 table" ? layout.l1TableOffset : target === "active L2 table" ? layout.l2Offsets[0] : target === "refcount block" ? layout.refblockOffsets[0] : 0;
    setU64(bytes, l2EntryOffset(bytes, 2), BigInt(offset) | COPIED);
    const before = bytes.slice();
    const file = new MemoryFile({ contents: bytes });
    const image = await openQcow2(file, { readOnly: false, backing: null });
    let error: unknown = null;
    try {
      await image.write(2 * CS, new Uint8Array(CS).fill(0xee));
      await image.flush();
    } catch (e) {
      error = e;
    }
    if (target === "qcow2_header") {
      // Host offset 0 is no data cluster at all (qcow2, as QEMU: offset 0 = unallocated): the write allocates elsewhere.
      assert.equal(error, null);
      await image.close();
      const header = file.contents().slice(0, 104);
      header.fill(0, 72, 80); // incompatible features may differ (none expected, but not the point)
      const original = before.slice(0, 104);
      original.fill(0, 72, 80);
      assert.deepEqual(header, original, "header untouched");
      continue;
    }
    assert.ok(isSnapstackError(error) && error.code === "E_CORRUPT_IMAGE", `${target}: ${String(error)}`);
    assert.match(error.message, new RegExp(`overlaps with ${target}`));
    const after = file.contents();
    assert.deepEqual(after.slice(offset, offset + CS), before.slice(offset, offset + CS), `${target} untouched`);
    await assertMarked(file, image, new RegExp(target));
    await image.close();
  }
});

test("an L2 table placed over the refcount table: its write-back is stopped", async () => {
  const bytes = await imageWithData({ sizeBytes: 8 * MiB, clusterSizeBytes: CS }, [0, 1, 2, 3]);
  const layout = imageLayout(bytes);
  // L1 entry 1 (guest clusters 512..1023) points at the refcount table, COPIED: writable in place.
  setU64(bytes, layout.l1TableOffset + 8, BigInt(layout.refcountTableOffset) | COPIED);
  const reftableBefore = bytes.slice(layout.refcountTableOffset, layout.refcountTableOffset + CS);
  const file = new MemoryFile({ contents: bytes });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await assert.rejects(
    (async () => {
      await image.write(600 * CS, new Uint8Array(CS).fill(0xab));
      await image.flush();
    })(),
    isCorrupt(/overlaps with refcount table/),
  );
  assert.deepEqual(file.contents().slice(layout.refcountTableOffset, layout.refcountTableOffset + CS), reftableBefore, "refcount table untouched");
  await assertMarked(file, image, /refcount table/);
  await image.close();
});

test("an unaligned L2 table offset: reads of its range fail as corruption, the image is marked, the rest reads", async () => {
  const bytes = await imageWithData({ sizeBytes: 8 * MiB, clusterSizeBytes: CS }, [0, 1, 2, 3, 600]);
  const layout = imageLayout(bytes);
  const l1Entry = getU64(bytes, layout.l1TableOffset + 8);
  setU64(bytes, layout.l1TableOffset + 8, l1Entry + 512n);
  const file = new MemoryFile({ contents: bytes });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await assert.rejects(image.read(600 * CS, new Uint8Array(512)), isCorrupt(/L2 table offset 0x[0-9a-f]+ unaligned/));
  await assertMarked(file, image, /unaligned/);
  await image.close();
});

test("v2: no corrupt bit to set, but the session refuses writes after corruption", async () => {
  const bytes = await imageWithData({ sizeBytes: MiB, clusterSizeBytes: CS, compat: "0.10" }, [0, 1, 2, 3]);
  const layout = imageLayout(bytes);
  setU64(bytes, l2EntryOffset(bytes, 2), BigInt(layout.refcountTableOffset) | COPIED);
  const file = new MemoryFile({ contents: bytes });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await assert.rejects(image.write(2 * CS, new Uint8Array(512)), isCorrupt(/overlaps with refcount table/));
  await assertMarked(file, image, /refcount table/, 2);
  await image.close();
});

test("healthy images never trip the overlap check (tables freed and their clusters reused)", async () => {
  // Small clusters and a tiny cache: L2 tables copied on write after a discard-heavy history,
  // refcount blocks placed, the refcount table grown, clusters freed and handed out again.
  const file = new MemoryFile();
  const { createQcow2 } = await import("../../src/formats/qcow2/create-qcow2.ts");
  await createQcow2(file, { sizeBytes: 32 * MiB, clusterSizeBytes: 512, refcountBits: 64 });
  const image = await openQcow2(file, { readOnly: false, backing: null, cacheBytesMax: 8 * 512 });
  for (let round = 0; round < 3; round++) {
    for (let i = 0; i < 400; i++) await image.write(((i * 7919 + round) % 65536) * 512, new Uint8Array(512).fill(i & 0xff));
    await image.discard(0, 16 * MiB);
    await image.flush();
  }
  await image.resize(40 * MiB, { shrink: false });
  for (let i = 0; i < 400; i++) await image.write(32 * MiB + i * 512 * 3, new Uint8Array(512).fill(1));
  await image.close();
});

test("an L1 entry beyond 2^53 is corruption, not an internal error (regression)", async () => {
  const bytes = await imageWithData({ sizeBytes: 8 * MiB, clusterSizeBytes: CS }, [0, 1, 2, 3]);
  const layout = imageLayout(bytes);
  setU64(bytes, layout.l1TableOffset + 8, (1n << 54n) | COPIED); // aligned, but no safe integer
  const file = new MemoryFile({ contents: bytes });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await assert.rejects(image.read(600 * CS, new Uint8Array(512)), isCorrupt(/beyond 8 PiB/));
  await assertMarked(file, image, /beyond 8 PiB/);
  await image.close();
});

test("data or tables a cluster or more past the end of the file are never written (the file is not grown to 2^50 bytes) (regression)", async () => {
  for (const where of ["L2 entry", "L1 entry"] as const) {
    const bytes = await imageWithData({ sizeBytes: 8 * MiB, clusterSizeBytes: CS }, [0, 1, 2, 3]);
    const layout = imageLayout(bytes);
    if (where === "L2 entry") setU64(bytes, l2EntryOffset(bytes, 2), (1n << 50n) | COPIED);
    else setU64(bytes, layout.l1TableOffset + 8, (1n << 50n) | COPIED);
    const file = new MemoryFile({ contents: bytes });
    const image = await openQcow2(file, { readOnly: false, backing: null });
    const guestCluster = where === "L2 entry" ? 2 : 600;
    await assert.rejects(
      (async () => {
        await image.write(guestCluster * CS, new Uint8Array(CS).fill(7));
        await image.flush();
      })(),
      isCorrupt(/beyond the end of the image file/),
      where,
    );
    assert.ok(file.contents().length < 2 * bytes.length, `${where}: file not grown`);
    await assertMarked(file, image, /beyond the end/);
    await image.close();
  }
});
