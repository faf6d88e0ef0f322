/**
 * Growing an overlay over a longer backing file (resize, commit's growBase,
 * restore): the new area reads as zeroes, durably before the new size is,
 * and a failed size write leaves the size as it was (found by reviews).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createQcow2 } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2, type Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { FaultFile, type FaultFileOptions } from "../../src/io/fault-file.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { isSnapstackError } from "../../src/base/errors.ts";
import { checkQcow2 } from "../../src/formats/qcow2/check.ts";

const MiB = 1024 * 1024;

/** A 8 MiB backing image of 0xab and an empty 1 MiB overlay on a FaultFile. */
async function overlayOverLongBacking(faults: FaultFileOptions = {}): Promise<{ file: FaultFile; backing: Qcow2Image; image: Qcow2Image }> {
  const backingFile = new MemoryFile({ name: "backing.qcow2" });
  await createQcow2(backingFile, { sizeBytes: 8 * MiB });
  const backing = await openQcow2(backingFile, { readOnly: false, backing: null });
  await backing.write(0, new Uint8Array(8 * MiB).fill(0xab));
  const overlayFile = new MemoryFile({ name: "overlay.qcow2" });
  await createQcow2(overlayFile, { sizeBytes: MiB });
  const file = await FaultFile.wrap(overlayFile, faults);
  const image = await openQcow2(file, { readOnly: false, backing, closeBacking: false });
  return { file, backing, image };
}

test("resize over a longer backing file: the grown area is zero on disk before the new size is (a crash right after shows zeroes)", async () => {
  const { file, backing, image } = await overlayOverLongBacking();
  await image.resize(4 * MiB, { shrink: false });
  // What survives a crash now: only what was flushed.
  const durable = await openQcow2(new MemoryFile({ contents: file.durableContents(), readOnly: true }), { readOnly: true, backing, closeBacking: false });
  assert.equal(durable.sizeBytes, 4 * MiB);
  const grown = new Uint8Array(3 * MiB);
  await durable.read(MiB, grown);
  assert.equal(grown.findIndex((byte) => byte !== 0), -1, "the backing file's bytes show through the grown area after a crash");
  await durable.close();
  await image.close();
  await backing.close();
});

test("resize whose size write fails leaves the size as it was, in memory as on disk", async () => {
  // The header's size field (8 bytes at offset 24) is the write that fails.
  const { backing, image } = await overlayOverLongBacking({ faults: [{ op: "write", index: 1, where: (hostOffset, length) => hostOffset === 24 && length === 8, code: "E_IO" }] });
  await assert.rejects(image.resize(4 * MiB, { shrink: false }), (error: unknown) => isSnapstackError(error));
  assert.equal(image.sizeBytes, MiB);
  await assert.rejects(image.write(2 * MiB, new Uint8Array(4096)), (error: unknown) => isSnapstackError(error) && error.code === "E_OUT_OF_RANGE");
  await image.close().catch(() => {});
  await backing.close();
});

test("a grow over a longer backing file that zeroes hundreds of L2 tables keeps the L2 cache within its bound while it runs", async () => {
  const backingFile = new MemoryFile({ name: "backing.qcow2" });
  await createQcow2(backingFile, { sizeBytes: 600 * MiB, clusterSizeBytes: 4096 });
  const backing = await openQcow2(backingFile, { readOnly: true, backing: null });
  // 4 KiB clusters: an L2 table maps 2 MiB, so growing to 512 MiB writes 256 new tables.
  let image: Qcow2Image | null = null;
  let largest = 0;
  class SamplingFile extends MemoryFile {
    override async write(hostOffset: number, data: Uint8Array): Promise<void> {
      if (image !== null) largest = Math.max(largest, image.metadata.l2Cache.size);
      await super.write(hostOffset, data);
    }
  }
  const overlayFile = new SamplingFile({ name: "overlay.qcow2" });
  await createQcow2(overlayFile, { sizeBytes: MiB, clusterSizeBytes: 4096 });
  image = await openQcow2(overlayFile, { readOnly: false, backing, closeBacking: false, cacheBytesMax: 64 * 1024 });
  const bound = image.metadata.l2Cache.entriesMax;
  await image.resize(512 * MiB, { shrink: false });
  assert.ok(bound < 64, `the test needs a small cache (bound ${bound})`);
  assert.ok(largest <= bound + 1, `the L2 cache held ${largest} tables during the grow (bound ${bound})`);
  const tail = new Uint8Array(4096).fill(1);
  await image.read(512 * MiB - 4096, tail);
  assert.equal(tail.findIndex((byte) => byte !== 0), -1);
  await image.close();
  await backing.close();
});

test("resize with metadata preallocation: wherever the process stops, no table maps a cluster past the file's end (the file grows first, as QEMU's)", async () => {
  // Every write and truncate keeps a copy of the file as it is then: what a killed process leaves.
  const states: Uint8Array[] = [];
  class RecordingFile extends MemoryFile {
    // write goes through writeSync.
    override writeSync(hostOffset: number, data: Uint8Array): void {
      super.writeSync(hostOffset, data);
      states.push(this.contents());
    }
    override async truncate(sizeBytes: number): Promise<void> {
      await super.truncate(sizeBytes);
      states.push(this.contents());
    }
  }
  const file = new RecordingFile({ name: "prealloc.qcow2" });
  await createQcow2(file, { sizeBytes: 8 * MiB });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await image.write(0, new Uint8Array(MiB).fill(1));
  await image.flush();
  states.length = 0;
  await image.resize(64 * MiB, { shrink: false });
  await image.preallocateMetadata(8 * MiB, 56 * MiB);
  await image.close();
  assert.ok(states.length > 3, `${states.length} steps recorded`);
  for (const [step, contents] of states.entries()) {
    const result = await checkQcow2(new MemoryFile({ contents, readOnly: true }));
    assert.equal(result.corruptions, 0, `step ${step} of ${states.length}: ${result.messages.slice(0, 3).join("; ")}`);
  }
});
