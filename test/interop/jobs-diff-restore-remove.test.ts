/**
 * diff (ranges, JSON, --export), restore (bytes written, target equals
 * SOURCE) and remove (refusal, wipe) on chains and internal snapshots built
 * by qemu-img 7.2.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, linkSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { diffImages, exportDelta, openDiskState, removeImage, restoreImage } from "../../src/chain/jobs/index.ts";
import { isSnapstackError } from "../../src/base/errors.ts";
import { DiskModel, assertClean, assertMatchesModel, assertSameContent, backingOf, createQcow2, qemuImg, qemuIo, snapstack, snapstackOk } from "./jobs-helpers.ts";

const MiB = 1024 * 1024;
const KiB = 1024;

interface Entry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** base (16 MiB of data over 64 MiB) <- top (a few changes, some writing the same bytes again). */
async function baseAndTop(dir: string): Promise<{ base: string; top: string; baseModel: DiskModel; topModel: DiskModel }> {
  const base = await createQcow2(join(dir, "base.qcow2"), { sizeBytes: 64 * MiB });
  await qemuIo(base, "write -P 0x11 0 16M", "write -P 0x12 40M 1M");
  const baseModel = new DiskModel(64 * MiB);
  baseModel.fill(0, 16 * MiB, 0x11);
  baseModel.fill(40 * MiB, MiB, 0x12);
  const top = await createQcow2(join(dir, "top.qcow2"), { backing: "base.qcow2" });
  // 0x11 over 0x11 (allocated, but equal), a partial-cluster change, a zeroed range, data past base's data.
  await qemuIo(top, "write -P 0x11 1M 64k", "write -P 0x21 2M 1000", "write -z 40M 128k", "write -P 0x22 50M 256k");
  const topModel = baseModel.clone();
  topModel.fill(2 * MiB, 1000, 0x21);
  topModel.fill(40 * MiB, 128 * KiB, 0);
  topModel.fill(50 * MiB, 256 * KiB, 0x22);
  return { base, top, baseModel, topModel };
}

function expectedRanges(a: Uint8Array, b: Uint8Array, granule = 512): { start: number; length: number }[] {
  const ranges: { start: number; length: number }[] = [];
  for (let at = 0; at < Math.max(a.length, b.length); at += granule) {
    const sa = Buffer.from(a.subarray(at, at + granule));
    const sb = Buffer.from(b.subarray(at, at + granule));
    if (sa.equals(sb)) continue;
    const last = ranges[ranges.length - 1];
    const length = Math.min(granule, Math.max(a.length, b.length) - at);
    if (last !== undefined && last.start + last.length === at) last.length += length;
    else ranges.push({ start: at, length });
  }
  return ranges;
}

function mergedRanges(entries: readonly { start: number; length: number }[]): { start: number; length: number }[] {
  const out: { start: number; length: number }[] = [];
  for (const e of entries) {
    const last = out[out.length - 1];
    if (last !== undefined && last.start + last.length === e.start) last.length += e.length;
    else out.push({ start: e.start, length: e.length });
  }
  return out;
}

test("diff of an overlay against its base: exact ranges from metadata plus the allocated clusters' data", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const { base, top, baseModel, topModel } = await baseAndTop(dir);
  const from = await openDiskState(base);
  const to = await openDiskState(top);
  try {
    const result = await diffImages(from.device, to.device);
    assert.deepEqual(mergedRanges(result.ranges), expectedRanges(baseModel.bytes, topModel.bytes));
    // Only clusters allocated in top were read: 64k + 64k (partial) + 128k + 256k.
    assert.equal(result.stats.comparedBytes, 64 * KiB + 64 * KiB + 128 * KiB + 256 * KiB);
    assert.equal(result.stats.metadataEqualBytes + result.stats.comparedBytes, 64 * MiB);
    // Annotations are TO's map entries: the zeroed range is a zero cluster of depth 0.
    const zeroed = result.ranges.find((range) => range.start === 40 * MiB);
    assert.deepEqual(zeroed && { depth: zeroed.depth, present: zeroed.present, zero: zeroed.zero, data: zeroed.data }, { depth: 0, present: true, zero: true, data: false });
  } finally {
    await from.close();
    await to.close();
  }
  // The CLI: JSON entries, and the reverse direction gives the same ranges.
  const json = JSON.parse((await snapstackOk("img", "diff", "--output=json", base, top)).stdout) as Entry[];
  assert.deepEqual(mergedRanges(json), expectedRanges(baseModel.bytes, topModel.bytes));
  const reverse = JSON.parse((await snapstackOk("img", "diff", "--output=json", top, base)).stdout) as Entry[];
  assert.deepEqual(mergedRanges(reverse), mergedRanges(json));
  const human = (await snapstackOk("img", "diff", base, top)).stdout;
  assert.match(human, /^Offset +Length +Content\n/);
  assert.match(human, /0x200000 +0x400 +data\n/);
  assert.match(human, /ranges?, \d+ bytes differ/);
  const same = (await snapstackOk("img", "diff", top, top)).stdout;
  assert.match(same, /0 ranges, 0 bytes differ; 0 bytes compared by data, 67108864 bytes equal by metadata/);
});

test("diff between two sibling overlays and unrelated images falls back to data only where needed", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const { base, top, topModel } = await baseAndTop(dir);
  const sibling = await createQcow2(join(dir, "sibling.qcow2"), { backing: "base.qcow2" });
  await qemuIo(sibling, "write -P 0x31 8M 64k");
  const flat = join(dir, "flat.raw");
  await qemuImg("convert", "-O", "raw", sibling, flat);
  const siblingModel = new DiskModel(0);
  siblingModel.bytes = new Uint8Array(readFileSync(flat));
  void base;
  const json = JSON.parse((await snapstackOk("img", "diff", "--output=json", sibling, top)).stdout) as Entry[];
  assert.deepEqual(mergedRanges(json), expectedRanges(siblingModel.bytes, topModel.bytes));
  // Against a raw copy nothing is shared: the data of both is compared, the result is the same.
  const raw = JSON.parse((await snapstackOk("img", "diff", "--output=json", "-f", "raw", flat, top)).stdout) as Entry[];
  assert.deepEqual(mergedRanges(raw), expectedRanges(siblingModel.bytes, topModel.bytes));
});

test("diff --export writes an overlay of FROM that holds exactly the differing clusters and reads as TO", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const { base, top, baseModel, topModel } = await baseAndTop(dir);
  const delta = join(dir, "delta.qcow2");
  await snapstackOk("img", "diff", "-q", "--export", delta, base, top);
  await assertClean(delta);
  assert.equal(await backingOf(delta), "base.qcow2");
  await assertSameContent(delta, top);
  await assertMatchesModel(delta, topModel, dir);
  const map = JSON.parse(await qemuImg("map", "--output=json", delta)) as Entry[];
  const held = mergedRanges(map.filter((entry) => entry.depth === 0 && entry.present));
  const clusters = expectedRanges(baseModel.bytes, topModel.bytes).map((r) => ({
    start: Math.floor(r.start / 65536) * 65536,
    length: Math.ceil((r.start + r.length) / 65536) * 65536 - Math.floor(r.start / 65536) * 65536,
  }));
  assert.deepEqual(held, mergedRanges(clusters));
  // Into a directory that does not exist: that is the error, not the backing name relative to it.
  const nowhere = join(dir, "missing", "delta.qcow2");
  const refused = await snapstack("img", "diff", "-q", "--export", nowhere, base, top);
  assert.equal(refused.status, 1);
  assert.equal(refused.stderr, `snapstack: error E_NOT_FOUND: ${nowhere}: cannot create: no such file or directory\n`);
});

test("a cancelled diff --export removes the incomplete delta it created", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const { base, top } = await baseAndTop(dir);
  const from = await openDiskState(base);
  const to = await openDiskState(top);
  try {
    const { ranges } = await diffImages(from.device, to.device);
    const delta = join(dir, "delta.qcow2");
    const controller = new AbortController();
    await assert.rejects(
      exportDelta(from.path, to.device, ranges, delta, {
        from: from.device,
        signal: controller.signal,
        onProgress: (job) => {
          if (job.fraction > 0) controller.abort();
        },
      }),
      (error: unknown) => isSnapstackError(error) && error.code === "E_ABORTED",
    );
    assert.ok(!existsSync(delta), "the incomplete delta was left behind");
  } finally {
    await from.close();
    await to.close();
  }
});

test("an output that is also an input is refused (E_IN_USE) before anything is written: convert, diff --export, restore", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  // base <- mid <- top, and other <- base: every file below is read by the command that would write it.
  const base = await createQcow2(join(dir, "base.qcow2"), { sizeBytes: 4 * MiB });
  await qemuIo(base, "write -P 0x11 0 4M");
  const mid = await createQcow2(join(dir, "mid.qcow2"), { backing: "base.qcow2" });
  await qemuIo(mid, "write -P 0x22 0 64k");
  const top = await createQcow2(join(dir, "top.qcow2"), { backing: "mid.qcow2" });
  await qemuIo(top, "write -P 0x33 1M 64k");
  const other = await createQcow2(join(dir, "other.qcow2"), { backing: "base.qcow2" });
  const files = [base, mid, top, other];
  const before = files.map((file) => readFileSync(file));
  const refused: Array<[string[], RegExp]> = [
    [["convert", "-O", "qcow2", top, mid], /mid\.qcow2: cannot write the target: it is the source image's backing file .*mid\.qcow2/],
    [["convert", "-O", "qcow2", top, top], /cannot write the target: it is the source image$/m],
    // The delta over TO itself, over a layer of TO's chain, and over FROM's backing file (also TO's here).
    [["diff", "-q", "--export", top, base, top], /top\.qcow2: cannot write the delta: it is the TO image$/m],
    [["diff", "-q", "--export", mid, base, top], /mid\.qcow2: cannot write the delta: it is the TO image's backing file/],
    [["diff", "-q", "--export", base, mid, other], /base\.qcow2: cannot write the delta: it is the TO image's backing file/],
    // A layer of FROM's chain only (createImage's loop check came after it had truncated the file).
    [["diff", "-q", "--export", mid, top, other], /mid\.qcow2: cannot write the delta: it is the FROM image's backing file/],
    [["restore", "--from", mid, top, base], /base\.qcow2: cannot write the target: it is the source image's backing file/],
    [["restore", "--from", other, top, other], /other\.qcow2: cannot write the target: it is the --from image$/m],
  ];
  for (const [argv, message] of refused) {
    const result = await snapstack("img", ...argv);
    assert.equal(result.status, 1, `img ${argv.join(" ")}: ${result.stderr}`);
    assert.match(result.stderr, /^snapstack: error E_IN_USE: /);
    assert.match(result.stderr, message);
    files.forEach((file, index) => assert.ok(readFileSync(file).equals(before[index]), `img ${argv.join(" ")} changed ${file}`));
  }
  for (const file of files) await assertClean(file);
});

test("diff of internal snapshots (FILE@SNAPSHOT) against each other and the current state", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const image = await createQcow2(join(dir, "snap.qcow2"), { sizeBytes: 32 * MiB });
  await qemuIo(image, "write -P 0x01 0 8M");
  await qemuImg("snapshot", "-c", "one", image);
  const one = new DiskModel(32 * MiB);
  one.fill(0, 8 * MiB, 0x01);
  await qemuIo(image, "write -P 0x02 1M 64k", "write -P 0x03 20M 4k");
  await qemuImg("snapshot", "-c", "two", image);
  const two = one.clone();
  two.fill(MiB, 64 * KiB, 0x02);
  two.fill(20 * MiB, 4 * KiB, 0x03);
  await qemuIo(image, "write -z 0 64k");
  const now = two.clone();
  now.fill(0, 64 * KiB, 0);

  const from = await openDiskState(`${image}@one`);
  const to = await openDiskState(`${image}@two`);
  try {
    const result = await diffImages(from.device, to.device);
    assert.deepEqual(mergedRanges(result.ranges), expectedRanges(one.bytes, two.bytes));
    // Shared clusters are equal by metadata: only the two rewritten clusters were read.
    assert.equal(result.stats.comparedBytes, 2 * 64 * KiB);
  } finally {
    await from.close();
    await to.close();
  }
  const json = JSON.parse((await snapstackOk("img", "diff", "--output=json", `${image}@two`, image)).stdout) as Entry[];
  assert.deepEqual(mergedRanges(json), expectedRanges(two.bytes, now.bytes));
  const missing = await snapstack("img", "diff", `${image}@nope`, image);
  assert.equal(missing.status, 1);
  assert.match(missing.stderr, /E_SNAPSHOT_NOT_FOUND/);
  // Restore a raw copy of the current state back to snapshot "one", knowing it holds the current state.
  const target = join(dir, "target.raw");
  await qemuImg("convert", "-O", "raw", image, target);
  const restored = await restoreImage(`${image}@one`, target, { from: image });
  assert.equal(restored.writtenBytes, mergedRanges(expectedRanges(now.bytes, one.bytes)).reduce((sum, r) => sum + r.length, 0));
  await assertSameContent(target, one.save(join(dir, "one.raw")));
  await assertClean(image);
});

test("restore --from writes only the change (raw target); without --from it compares data and writes the same", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const { base, top, baseModel, topModel } = await baseAndTop(dir);
  const changed = expectedRanges(baseModel.bytes, topModel.bytes);
  const changedBytes = changed.reduce((sum, r) => sum + r.length, 0);
  // The target holds top's content; roll it back to base.
  const target = topModel.save(join(dir, "target.raw"));
  const result = await snapstackOk("img", "restore", "--from", top, base, target);
  assert.equal(result.stdout, `Restored: wrote ${changedBytes} bytes in ${changed.length} ranges.\n`);
  await assertSameContent(target, baseModel.save(join(dir, "expected.raw")));
  // Forward again without --from: data comparison finds the same ranges.
  const forward = await restoreImage(top, target);
  assert.equal(forward.writtenBytes, changedBytes);
  assert.equal(forward.ranges, changed.length);
  assert.deepEqual(new Uint8Array(readFileSync(target)), topModel.bytes);
  // Nothing left to do.
  assert.equal((await restoreImage(top, target)).writtenBytes, 0);
  // A file of SOURCE's own chain is refused as target.
  const self = await snapstack("img", "restore", top, base);
  assert.equal(self.status, 1);
  assert.match(self.stderr, /E_IN_USE: .*base\.qcow2: cannot write the target: it is the source image's backing file/);
});

test("restore onto a qcow2 target and onto a smaller raw file (grown)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const { base, top, topModel } = await baseAndTop(dir);
  const target = join(dir, "target.qcow2");
  await qemuImg("convert", "-O", "qcow2", base, target);
  const result = await restoreImage(top, target, { from: base });
  assert.ok(result.writtenBytes > 0 && result.writtenBytes <= 2 * MiB, `wrote ${result.writtenBytes}`);
  await assertClean(target);
  await assertMatchesModel(target, topModel, dir);
  const small = join(dir, "small.raw");
  writeFileSync(small, new Uint8Array(MiB));
  await restoreImage(top, small);
  assert.deepEqual(new Uint8Array(readFileSync(small)), topModel.bytes);
});

/**
 * base.qcow2 (all `baseByte`, or empty when 0) and top.qcow2 over it with
 * `changes` written by qemu-io (byte 0: write -z), and top's content.
 */
async function changedChain(dir: string, sizeBytes: number, baseByte: number, changes: { at: number; length: number; byte: number }[]): Promise<{ base: string; top: string; model: DiskModel }> {
  const base = await createQcow2(join(dir, "base.qcow2"), { sizeBytes });
  if (baseByte !== 0) await qemuIo(base, `write -P ${baseByte} 0 ${sizeBytes}`);
  const top = await createQcow2(join(dir, "top.qcow2"), { backing: "base.qcow2" });
  await qemuIo(top, ...changes.map((c) => (c.byte === 0 ? `write -z ${c.at} ${c.length}` : `write -P ${c.byte} ${c.at} ${c.length}`)));
  const model = new DiskModel(sizeBytes);
  if (baseByte !== 0) model.fill(0, sizeBytes, baseByte);
  for (const c of changes) model.fill(c.at, c.length, c.byte);
  return { base, top, model };
}

test("restore cancelled while its copy runs behind the compare: E_ABORTED, and TARGET holds SOURCE before one point and its old content after", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  // 32 separate changed ranges of 256 KiB, 2 MiB apart: more than the compare may run ahead.
  const changes = Array.from({ length: 32 }, (_, i) => ({ at: i * 2 * MiB, length: 256 * KiB, byte: i + 1 }));
  const { base, top, model: topModel } = await changedChain(dir, 64 * MiB, 0, changes);
  const old = new Uint8Array(64 * MiB);
  const target = join(dir, "target.raw");
  writeFileSync(target, old);
  const controller = new AbortController();
  await assert.rejects(
    restoreImage(top, target, {
      from: base,
      signal: controller.signal,
      onProgress: (progress) => {
        if (progress.doneBytes >= 8 * MiB) controller.abort();
      },
    }),
    (error: unknown) => isSnapstackError(error) && error.code === "E_ABORTED",
  );
  const after = new Uint8Array(readFileSync(target));
  // Granule by granule: SOURCE's bytes up to some point, the old bytes from there on.
  let switched = false;
  let restoredGranules = 0;
  for (let at = 0; at < after.length; at += 512) {
    const isSource = Buffer.from(after.subarray(at, at + 512)).equals(topModel.bytes.subarray(at, at + 512));
    const isOld = Buffer.from(after.subarray(at, at + 512)).equals(old.subarray(at, at + 512));
    assert.ok(isSource || isOld, `granule at ${at} is SOURCE's or the old content`);
    if (isSource && !isOld) {
      assert.ok(!switched, `granule at ${at} restored after an unrestored one`);
      restoredGranules++;
    } else if (!isSource) switched = true;
  }
  assert.ok(restoredGranules < 32 * 512, `stopped before the end (${restoredGranules} granules restored)`);
  // Restoring again completes it.
  await restoreImage(top, target, { from: base });
  assert.ok(Buffer.from(readFileSync(target)).equals(topModel.bytes), "TARGET is SOURCE after a second restore");
});

test("restore of 300 separate zeroed sectors: exact bytes and ranges with far more ranges than the copy queue holds", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const changes = Array.from({ length: 300 }, (_, i) => ({ at: i * 16 * KiB + 512, length: 512, byte: 0 }));
  const { base, top, model } = await changedChain(dir, 8 * MiB, 0x11, changes);
  const target = join(dir, "target.raw");
  writeFileSync(target, new Uint8Array(8 * MiB).fill(0x11));
  const result = await restoreImage(top, target, { from: base });
  assert.equal(result.ranges, 300);
  assert.equal(result.writtenBytes, 300 * 512);
  assert.ok(Buffer.from(readFileSync(target)).equals(model.bytes), "TARGET is SOURCE");
});

test("restore without --from onto a qcow2 target: 40 changes inside clusters, TARGET read ahead while written behind", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  // 1000 bytes at odd offsets, 300 KiB apart: every range ends inside a 64 KiB cluster of TARGET.
  const changes = Array.from({ length: 40 }, (_, i) => ({ at: i * 300 * KiB + 777, length: 1000, byte: 0x40 + i }));
  const { base, top, model } = await changedChain(dir, 16 * MiB, 0x11, changes);
  const target = join(dir, "target.qcow2");
  await qemuImg("convert", "-O", "qcow2", base, target);
  const result = await restoreImage(top, target);
  assert.equal(result.ranges, 40);
  // 1000 bytes at offset 777 span granules [512, 2048): 3 granules each.
  assert.equal(result.writtenBytes, 40 * 3 * 512);
  await assertClean(target);
  await assertMatchesModel(target, model, dir);
});

test("remove refuses an image used as backing file, naming the user; removes (and wipes) otherwise", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const { base, top } = await baseAndTop(dir);
  const refused = await snapstack("img", "remove", base);
  assert.equal(refused.status, 1);
  assert.match(refused.stderr, /E_IN_USE: Image '.*base\.qcow2' is used as backing file by '.*top\.qcow2'/);
  assert.ok(existsSync(base));
  await assert.rejects(removeImage(join(dir, "missing.qcow2")), (error) => isSnapstackError(error) && error.code === "E_NOT_FOUND");
  const wiped = await snapstackOk("img", "remove", "--wipe", top);
  assert.match(wiped.stdout, /^Wiped \d+ bytes\.\n$/);
  assert.ok(!existsSync(top));
  await snapstackOk("img", "remove", base);
  assert.ok(!existsSync(base));
});

test("remove refuses what it would lose or leave behind: a symbolic link, a hard-linked file to wipe, an image with an external data file, a data file in use", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const { base, top } = await baseAndTop(dir);
  const before = readFileSync(base);
  // Through a link in another directory: the overlay that uses the target is not in the link's directory.
  const elsewhere = scratchDir(t);
  const link = join(elsewhere, "link.qcow2");
  symlinkSync(base, link);
  const viaLink = await snapstack("img", "remove", "--wipe", link);
  assert.equal(viaLink.status, 1);
  assert.equal(viaLink.stderr, `snapstack: error E_ACCESS: ${link}: cannot remove: a symbolic link; name the image it points to\n`);
  assert.ok(existsSync(link));
  // A second name for the file: the wipe would erase it under that one too. Without --wipe only the name goes.
  const second = join(dir, "second-name.qcow2");
  linkSync(top, second);
  const hardLinked = await snapstack("img", "remove", "--wipe", second);
  assert.equal(hardLinked.status, 1);
  assert.match(hardLinked.stderr, /^snapstack: error E_IN_USE: .*second-name\.qcow2: cannot wipe: the file has 2 names \(hard links\)/);
  await snapstackOk("img", "remove", second);
  assert.ok(!existsSync(second) && existsSync(top));
  assert.deepEqual(readFileSync(base), before, "the base is untouched");
  await assertClean(top);
  // External data file: removing the qcow2 would leave the guest data behind; the data file is in use.
  await qemuImg("create", "-q", "-f", "qcow2", "-o", `data_file=${join(dir, "img.data")}`, join(dir, "img.qcow2"), "4M");
  await qemuIo(join(dir, "img.qcow2"), "write -P 0x5a 0 1M");
  const withData = await snapstack("img", "remove", "--wipe", join(dir, "img.qcow2"));
  assert.equal(withData.status, 1);
  assert.match(withData.stderr, /^snapstack: error E_UNSUPPORTED_FEATURE: .*img\.qcow2: cannot remove: its guest data is in the external data file '.*img\.data'/);
  const dataInUse = await snapstack("img", "remove", join(dir, "img.data"));
  assert.equal(dataInUse.status, 1);
  assert.match(dataInUse.stderr, /^snapstack: error E_IN_USE: Image '.*img\.data' is used as data file by '.*img\.qcow2'/);
  assert.ok(existsSync(join(dir, "img.qcow2")) && existsSync(join(dir, "img.data")));
  await qemuIo(join(dir, "img.qcow2"), "read -P 0x5a 0 1M");
});

test("remove --search finds users in other directories", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const other = scratchDir(t);
  const base = await createQcow2(join(dir, "base.qcow2"), { sizeBytes: MiB });
  await createQcow2(join(other, "user.qcow2"), { backing: base });
  const refused = await snapstack("img", "remove", "--search", other, base);
  assert.match(refused.stderr, /E_IN_USE: .*user\.qcow2/);
  assert.ok(existsSync(base));
});
