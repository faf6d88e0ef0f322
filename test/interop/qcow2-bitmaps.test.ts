// Persistent dirty bitmaps (qemu-img bitmap) through snapstack's changes: kept valid by changes that
// leave guest data alone; the enabled ones kept up to date by changes of guest data and all of them
// resized with the disk (what QEMU's qemu-nbd -B exports as dirty equals what QEMU itself records for
// the same changes); refused where qemu-img refuses. qemu-img check stays clean.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { copyFileSync, writeFileSync } from "node:fs";
import { CrashReplay, FaultFile } from "../../src/io/fault-file.ts";
import { openQcow2, type BitmapAction } from "../../src/formats/qcow2/index.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { requireTools, run, scratchDir } from "../helpers/tools.ts";
import { ok, qemuImg, qemuIo, snapstack } from "./cli-helpers.ts";

/** An image with data, an enabled bitmap b0 and a disabled one b1, both consistent, as qemu-img leaves them. */
async function imageWithBitmaps(dir: string, name: string): Promise<string> {
  ok(await qemuImg(["create", "-q", "-f", "qcow2", name, "16M"], dir), "create");
  ok(await qemuIo(["-c", "write -P 1 0 1M", name], dir), "write");
  ok(await qemuImg(["bitmap", "--add", name, "b0"], dir), "bitmap --add b0");
  ok(await qemuImg(["bitmap", "--add", "--disable", name, "b1"], dir), "bitmap --add --disable b1");
  ok(await qemuIo(["-c", "write -P 2 8M 64k", name], dir), "write tracked by b0");
  return join(dir, name);
}

/** Leave the image's bitmaps in-use, as a crash of the program writing it leaves them (qemu-io killed). */
async function crashWhileWriting(dir: string, name: string): Promise<void> {
  const result = await qemuIo(["-c", "write -P 9 12M 4k", "-c", "sigraise 9", name], dir);
  assert.notEqual(result.code, 0, "qemu-io was killed");
}

/** Bitmap name -> flags, as qemu-img info lists them; check must be clean (exit 0, no warning). */
async function bitmapFlags(dir: string, name: string): Promise<Record<string, string[]>> {
  const check = ok(await qemuImg(["check", name], dir), `check ${name}`);
  assert.doesNotMatch(check.stderr, /lacking bitmap support/);
  return bitmapFlagsUnchecked(dir, name);
}

/** Bitmap name -> flags, as qemu-img info lists them. */
async function bitmapFlagsUnchecked(dir: string, name: string): Promise<Record<string, string[]>> {
  const info = JSON.parse(ok(await qemuImg(["info", "--output=json", name], dir), "info").stdout);
  const bitmaps: Array<{ name: string; flags: string[] }> = info["format-specific"].data.bitmaps ?? [];
  return Object.fromEntries(bitmaps.map((bitmap) => [bitmap.name, bitmap.flags]));
}

/** The dirty ranges of bitmap `bitmap`, as qemu-nbd -B exports them (nbdinfo --map), as [start, length] pairs. */
async function dirtyRanges(dir: string, name: string, bitmap: string): Promise<Array<[number, number]>> {
  const context = `qemu:dirty-bitmap:${bitmap}`;
  const result = ok(await run("nbdinfo", [`--map=${context}`, "--json", "--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap, join(dir, name), "]"]), `nbdinfo ${bitmap}`);
  const extents: Array<{ offset: number; length: number; type: number }> = JSON.parse(result.stdout);
  return extents.filter((extent) => extent.type === 1).map((extent) => [extent.offset, extent.length]);
}

test("bitmaps: a session that only reads changes nothing; a write keeps the enabled bitmap up to date and the disabled one as it was", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")) return;
  const dir = scratchDir(t);
  const path = await imageWithBitmaps(dir, "bm.qcow2");
  const before = readFileSync(path);
  ok(await snapstack(["io", "-c", "read -P 1 0 64k", "-c", "flush", "-c", "write 0 0", "-c", "discard 4k 0", "bm.qcow2"], { cwd: dir }), "io read and no-op changes");
  assert.ok(readFileSync(path).equals(before), "a session that only read (or changed nothing) changed the file");
  // Refused compressed writes (part of a cluster, an allocated cluster) change nothing either; qemu-io refuses them too.
  for (const command of ["write -c 0 4k", "write -c 0 64k", "write -c 64k 100k"]) {
    const ours = await snapstack(["io", "-c", command, "bm.qcow2"], { cwd: dir });
    assert.equal(ours.code, 1, `${command}: ${ours.stderr}`);
    assert.ok(readFileSync(path).equals(before), `${command}: a refused compressed write changed the file`);
  }
  assert.deepEqual(await bitmapFlags(dir, "bm.qcow2"), { b0: ["auto"], b1: [] });
  assert.deepEqual(await dirtyRanges(dir, "bm.qcow2", "b0"), [[8 * 1024 * 1024, 65536]]);
  ok(await snapstack(["io", "-c", "write -P 3 0 4k", "bm.qcow2"], { cwd: dir }), "io write");
  // Stored at close: consistent again, holding qemu-io's change and snapstack's; the disabled bitmap unchanged.
  assert.deepEqual(await bitmapFlags(dir, "bm.qcow2"), { b0: ["auto"], b1: [] });
  assert.deepEqual(await dirtyRanges(dir, "bm.qcow2", "b0"), [[0, 65536], [8 * 1024 * 1024, 65536]]);
  assert.deepEqual(await dirtyRanges(dir, "bm.qcow2", "b1"), []);
  ok(await qemuIo(["-c", "read -P 3 0 4k", "-c", "read -P 1 4k 60k", "bm.qcow2"], dir), "data after the write");
  // QEMU goes on from there: its next change adds to what snapstack stored.
  ok(await qemuIo(["-c", "write -P 4 2M 4k", "bm.qcow2"], dir), "qemu-io write after snapstack's");
  assert.deepEqual(await dirtyRanges(dir, "bm.qcow2", "b0"), [[0, 65536], [2 * 1024 * 1024, 65536], [8 * 1024 * 1024, 65536]]);
  // Bitmaps left in-use by a crash stay so through snapstack's writes, and can be removed.
  await crashWhileWriting(dir, "bm.qcow2");
  ok(await snapstack(["io", "-c", "write -P 5 5M 4k", "bm.qcow2"], { cwd: dir }), "io write over in-use bitmaps");
  assert.deepEqual(await bitmapFlags(dir, "bm.qcow2"), { b0: ["in-use", "auto"], b1: ["in-use"] });
  ok(await snapstack(["img", "bitmap", "--remove", "bm.qcow2", "b0"], { cwd: dir }), "remove the in-use bitmap");
  assert.deepEqual(await bitmapFlags(dir, "bm.qcow2"), { b1: ["in-use"] });
});

test("bitmaps: the bits snapstack records for a sequence of changes are the ones QEMU records for the same changes (granularities 512 B to 1 MiB, bitmap data over several clusters)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")) return;
  const dir = scratchDir(t);
  // 4 KiB clusters: b512's data (64 MiB / 512 / 8 = 16 KiB) spans 4 table entries, most of them all-zero.
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "base.qcow2", "64M"], dir), "create");
  ok(await qemuIo(["-c", "write -P 1 0 1M", "-c", "write -P 1 40M 1M", "base.qcow2"], dir), "write");
  const bitmaps: Array<[string, string]> = [["b512", "512"], ["b64k", "65536"], ["b1m", "1048576"]];
  for (const [bitmap, granularity] of bitmaps) ok(await qemuImg(["bitmap", "--add", "-g", granularity, "base.qcow2", bitmap], dir), `bitmap --add ${bitmap}`);
  ok(await qemuIo(["-c", "write -P 2 33M 3k", "base.qcow2"], dir), "a change QEMU records");
  copyFileSync(join(dir, "base.qcow2"), join(dir, "ours.qcow2"));
  copyFileSync(join(dir, "base.qcow2"), join(dir, "theirs.qcow2"));
  // Unaligned writes across granules and clusters, zero writes with and without unmap, whole-cluster
  // discards, a write over the last granule and a compressed cluster.
  const commands = [
    "write -P 5 1000 7000",
    "write -P 6 5M 1",
    "write -z 10M 64k",
    "write -z -u 20M 12k",
    "discard 40M 8k",
    "write -P 7 67108164 700",
    "write -c -P 8 50M 4k",
    // Discards that free no cluster: QEMU's block layer records the request all the same.
    "discard 100 200",
    "discard 47255552 100000",
  ];
  const args = commands.flatMap((command) => ["-c", command]);
  ok(await snapstack(["io", ...args, "ours.qcow2"], { cwd: dir }), "snapstack io");
  ok(await qemuIo([...args, "theirs.qcow2"], dir), "qemu-io");
  assert.deepEqual(await bitmapFlags(dir, "ours.qcow2"), await bitmapFlags(dir, "theirs.qcow2"));
  for (const [bitmap] of bitmaps) {
    const ours = await dirtyRanges(dir, "ours.qcow2", bitmap);
    assert.ok(ours.length >= commands.length, `${bitmap}: ${JSON.stringify(ours)}`);
    assert.deepEqual(ours, await dirtyRanges(dir, "theirs.qcow2", bitmap), bitmap);
  }
  ok(await qemuImg(["compare", "-f", "qcow2", "-F", "qcow2", "ours.qcow2", "theirs.qcow2"], dir), "same data");
});

test("bitmaps: snapshot create/delete and rebase -u keep them valid; resize resizes them as qemu-img does; snapshot -a and a resize of an inconsistent bitmap are refused as by qemu-img", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")) return;
  const dir = scratchDir(t);
  await imageWithBitmaps(dir, "meta.qcow2");
  ok(await snapstack(["img", "snapshot", "-c", "s1", "meta.qcow2"], { cwd: dir }), "snapshot -c");
  ok(await snapstack(["img", "rebase", "-u", "-b", "", "meta.qcow2"], { cwd: dir }), "rebase -u");
  assert.deepEqual(await bitmapFlags(dir, "meta.qcow2"), { b0: ["auto"], b1: [] });

  // snapshot -a: refused while the image has bitmaps, before the snapshot is looked up; nothing changes.
  for (const name of ["s1", "nosuch"]) {
    const before = readFileSync(join(dir, "meta.qcow2"));
    const ours = await snapstack(["img", "snapshot", "-a", name, "meta.qcow2"], { cwd: dir });
    assert.ok(readFileSync(join(dir, "meta.qcow2")).equals(before), `snapshot -a ${name} changed the image`);
    // (qemu-img rewrites the bitmaps it loaded read-write, even when it refuses.)
    const theirs = await qemuImg(["snapshot", "-a", name, "meta.qcow2"], dir);
    assert.equal(ours.code, theirs.code, ours.stderr);
    assert.equal(ours.stderr, theirs.stderr.replace(/^qemu-img: /, "snapstack: error E_IN_USE: "));
  }
  ok(await snapstack(["img", "snapshot", "-d", "s1", "meta.qcow2"], { cwd: dir }), "snapshot -d");
  assert.deepEqual(await bitmapFlags(dir, "meta.qcow2"), { b0: ["auto"], b1: [] });

  // A resize to the same size changes nothing.
  ok(await snapstack(["img", "resize", "meta.qcow2", "16M"], { cwd: dir }), "resize to the same size");
  assert.deepEqual(await bitmapFlags(dir, "meta.qcow2"), { b0: ["auto"], b1: [] });
  // Resizes (grow, shrink, grow past a bitmap table cluster) keep every bitmap consistent with the bits qemu-img keeps.
  ok(await qemuImg(["bitmap", "--disable", "meta.qcow2", "b0"], dir), "disable b0 (holding bits)");
  ok(await qemuImg(["bitmap", "--add", "-g", "512", "meta.qcow2", "fine"], dir), "add a 512-byte granularity bitmap");
  ok(await qemuIo(["-c", "write 15M 1M", "-c", "write 100k 1k", "meta.qcow2"], dir), "writes the enabled bitmaps record");
  copyFileSync(join(dir, "meta.qcow2"), join(dir, "theirs.qcow2"));
  for (const size of ["32M", "8M", "+600M", "-1M"]) {
    ok(await snapstack(["img", "resize", "--shrink", "meta.qcow2", size], { cwd: dir }), `resize ${size}`);
    ok(await qemuImg(["resize", "-q", "--shrink", "theirs.qcow2", size], dir), `qemu-img resize ${size}`);
    ok(await qemuIo(["-c", "write 1M 4k", "meta.qcow2"], dir), "write after the resize");
    ok(await qemuIo(["-c", "write 1M 4k", "theirs.qcow2"], dir), "write after the resize");
    assert.deepEqual(await bitmapFlags(dir, "meta.qcow2"), await bitmapFlags(dir, "theirs.qcow2"), size);
    for (const bitmap of ["b0", "b1", "fine"]) {
      assert.deepEqual(await dirtyRanges(dir, "meta.qcow2", bitmap), await dirtyRanges(dir, "theirs.qcow2", bitmap), `${size} ${bitmap}`);
    }
  }
  assert.deepEqual(await bitmapFlags(dir, "meta.qcow2"), { b0: [], b1: [], fine: ["auto"] });
  // Inconsistent when the image is opened (a crash left them in-use): qemu-img refuses a resize, and so does snapstack, changing nothing.
  await crashWhileWriting(dir, "meta.qcow2");
  const before = readFileSync(join(dir, "meta.qcow2"));
  const ours = await snapstack(["img", "resize", "meta.qcow2", "+48M"], { cwd: dir });
  assert.ok(readFileSync(join(dir, "meta.qcow2")).equals(before), "the refused resize changed the image");
  const theirs = await qemuImg(["resize", "meta.qcow2", "+48M"], dir);
  assert.equal(theirs.code, 1);
  assert.equal(ours.code, theirs.code);
  assert.match(ours.stderr, /^snapstack: error E_UNSUPPORTED_FEATURE: Bitmap 'b0' is inconsistent and cannot be used/);
});

test("bitmaps: a crash at any write leaves the bitmap in-use, or consistent and holding every change that landed (qemu-img check: no corruption)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (replay with SNAPSTACK_SEED=${seed})`);
  const random = createRandom(seed);
  const dir = scratchDir(t);
  // A disabled bitmap with a 480-byte name first: b0's entry then starts at byte 504 of the directory, its
  // table offset in the first sector and its flags in the second, so a torn directory write could pair
  // the old table with a cleared in-use flag (the autoclear bit guards that).
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "initial.qcow2", "16M"], dir), "create");
  ok(await qemuIo(["-c", "write -P 1 0 1M", "initial.qcow2"], dir), "write");
  ok(await qemuImg(["bitmap", "--add", "--disable", "initial.qcow2", "n".repeat(480)], dir), "bitmap --add long name");
  ok(await qemuImg(["bitmap", "--add", "initial.qcow2", "b0"], dir), "bitmap --add b0");
  ok(await qemuIo(["-c", "write -P 2 8M 64k", "initial.qcow2"], dir), "write tracked by b0");
  const initial = new Uint8Array(readFileSync(join(dir, "initial.qcow2")));
  const initialRanges = await dirtyRanges(dir, "initial.qcow2", "b0");
  const file = await FaultFile.fromBytes(initial, { recordLog: true });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await image.write(4 * 1024 * 1024, new Uint8Array(100_000).fill(9));
  await image.writeZeroes(12 * 1024 * 1024, 128 * 1024);
  await image.write(1000, new Uint8Array(3000).fill(8));
  await image.close();
  const replay = new CrashReplay(initial, file.log ?? []);
  const finalRanges = [[0, 65536], [4 * 1024 * 1024, 2 * 65536], [8 * 1024 * 1024, 65536], [12 * 1024 * 1024, 128 * 1024]];
  let consistent = 0;
  for (let writeNumber = 1; writeNumber <= replay.writeCount; writeNumber++) {
    const where = `crash at write ${writeNumber}/${replay.writeCount}`;
    writeFileSync(join(dir, "crashed.qcow2"), replay.crashAt(writeNumber, random.next));
    const check = JSON.parse((await qemuImg(["check", "--output=json", "crashed.qcow2"], dir)).stdout);
    assert.equal((check.corruptions ?? 0) + (check["check-errors"] ?? 0), 0, `${where}: ${JSON.stringify(check)}`);
    const info = JSON.parse(ok(await qemuImg(["info", "--output=json", "-U", "crashed.qcow2"], dir), where).stdout);
    const b0 = ((info["format-specific"].data.bitmaps ?? []) as Array<{ name: string; flags: string[] }>).find((bitmap) => bitmap.name === "b0");
    // The autoclear bit cleared around a directory rewrite: QEMU drops the bitmaps (none is trusted).
    if (b0 === undefined) continue;
    if (b0.flags.includes("in-use")) {
      // The directory write with the stored bitmap is flushed before the last writes (freeing the old clusters).
      assert.ok(writeNumber < replay.writeCount, `${where}: the stored bitmap is still in-use at the last write`);
      continue;
    }
    consistent++;
    const ranges = await dirtyRanges(dir, "crashed.qcow2", "b0");
    if (JSON.stringify(ranges) === JSON.stringify(initialRanges)) {
      // Consistent with the old bits: no change of guest data may have landed.
      ok(await qemuImg(["compare", "-f", "qcow2", "-F", "qcow2", "crashed.qcow2", "initial.qcow2"], dir), `${where}: data changed under the old bits`);
    } else {
      assert.deepEqual(ranges, finalRanges, where);
    }
  }
  t.diagnostic(`${replay.writeCount} crash points, ${consistent} with a consistent bitmap`);
  assert.ok(consistent >= 1, "a crash point saw the stored bitmap");
});

test("bitmaps: a crash at any write of `img bitmap` changes leaves the old bitmaps or the new ones (qemu-img check: no corruption)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (replay with SNAPSTACK_SEED=${seed})`);
  const random = createRandom(seed);
  const dir = scratchDir(t);
  await imageWithBitmaps(dir, "initial.qcow2");
  const initial = new Uint8Array(readFileSync(join(dir, "initial.qcow2")));
  const file = await FaultFile.fromBytes(initial, { recordLog: true });
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await image.changeBitmaps([
    { kind: "add", name: "b2", granularityBytes: 4096 },
    { kind: "merge", name: "b2", source: { name: "b0" } },
    { kind: "remove", name: "b0" },
  ]);
  await image.close();
  const replay = new CrashReplay(initial, file.log ?? []);
  const seen = new Set<string>();
  for (let writeNumber = 1; writeNumber <= replay.writeCount; writeNumber++) {
    const where = `crash at write ${writeNumber}/${replay.writeCount}`;
    writeFileSync(join(dir, "crashed.qcow2"), replay.crashAt(writeNumber, random.next));
    const check = JSON.parse((await qemuImg(["check", "--output=json", "crashed.qcow2"], dir)).stdout);
    assert.equal((check.corruptions ?? 0) + (check["check-errors"] ?? 0), 0, `${where}: ${JSON.stringify(check)}`);
    const flags = await bitmapFlagsUnchecked(dir, "crashed.qcow2");
    const names = Object.keys(flags).join(",");
    if (names === "b0,b1") {
      assert.deepEqual(await dirtyRanges(dir, "crashed.qcow2", "b0"), [[8 * 1024 * 1024, 65536]], where);
    } else {
      assert.equal(names, "b1,b2", where);
      assert.deepEqual(flags.b2, ["auto"], where);
      assert.deepEqual(await dirtyRanges(dir, "crashed.qcow2", "b2"), [[8 * 1024 * 1024, 65536]], where);
    }
    seen.add(names);
  }
  t.diagnostic(`${replay.writeCount} crash points, bitmap lists seen: ${[...seen].join(" / ")}`);
  assert.ok(seen.has("b1,b2"), "the last crash point has the new list");
});

test("bitmaps: commit leaves the top image's bitmaps as qemu-img commit does; a failed changeBitmaps call keeps later writes recorded", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")) return;
  const dir = scratchDir(t);
  for (const tool of ["ours", "theirs"]) {
    ok(await qemuImg(["create", "-q", "-f", "qcow2", `${tool}-base.qcow2`, "16M"], dir), "base");
    ok(await qemuImg(["bitmap", "--add", `${tool}-base.qcow2`, "bb"], dir), "base bitmap");
    ok(await qemuImg(["create", "-q", "-f", "qcow2", "-b", `${tool}-base.qcow2`, "-F", "qcow2", `${tool}-top.qcow2`], dir), "top");
    ok(await qemuImg(["bitmap", "--add", `${tool}-top.qcow2`, "bt"], dir), "top bitmap");
    ok(await qemuIo(["-c", "write -P 4 2M 100k", `${tool}-top.qcow2`], dir), "top write");
  }
  ok(await snapstack(["img", "commit", "-q", "ours-top.qcow2"], { cwd: dir }), "snapstack commit");
  ok(await qemuImg(["commit", "-q", "theirs-top.qcow2"], dir), "qemu-img commit");
  for (const [image, bitmap] of [["base", "bb"], ["top", "bt"]]) {
    assert.deepEqual(await bitmapFlags(dir, `ours-${image}.qcow2`), await bitmapFlags(dir, `theirs-${image}.qcow2`), image);
    assert.deepEqual(await dirtyRanges(dir, `ours-${image}.qcow2`, bitmap), await dirtyRanges(dir, `theirs-${image}.qcow2`, bitmap), image);
  }
  assert.deepEqual(await dirtyRanges(dir, "ours-base.qcow2", "bb"), [[2 * 1024 * 1024, 2 * 65536]]);

  // Library: a changeBitmaps call whose first action fails stores the tracked bitmaps; writes after it are still recorded.
  const file = await FaultFile.fromBytes(new Uint8Array(readFileSync(join(dir, "ours-base.qcow2"))));
  const image = await openQcow2(file, { readOnly: false, backing: null });
  await image.write(5 * 1024 * 1024, new Uint8Array(4096).fill(1));
  await assert.rejects(image.changeBitmaps([{ kind: "remove", name: "nosuch" }]), /Dirty bitmap 'nosuch' not found/);
  await image.write(9 * 1024 * 1024, new Uint8Array(4096).fill(2));
  await image.close();
  writeFileSync(join(dir, "library.qcow2"), file.durableContents());
  assert.deepEqual(await bitmapFlags(dir, "library.qcow2"), { bb: ["auto"] });
  assert.deepEqual(await dirtyRanges(dir, "library.qcow2", "bb"), [[2 * 1024 * 1024, 2 * 65536], [5 * 1024 * 1024, 65536], [9 * 1024 * 1024, 65536]]);
});

test("bitmaps: adding the first bitmap or removing the last (the header grows or shrinks before the backing name) survives a crash at any write: the old header or the new one", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (replay with SNAPSTACK_SEED=${seed})`);
  const random = createRandom(seed);
  const dir = scratchDir(t);
  const backing = `base-${"b".repeat(120)}.qcow2`;
  ok(await qemuImg(["create", "-q", "-f", "qcow2", backing, "16M"], dir), "base");
  ok(await qemuIo(["-c", "write -P 7 0 64k", backing], dir), "base data");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", "top.qcow2"], dir), "overlay");
  for (const [what, actions] of [
    ["add the first", [{ kind: "add", name: "b0" }]],
    ["remove the last", [{ kind: "remove", name: "b0" }]],
  ] as Array<[string, BitmapAction[]]>) {
    const initial = new Uint8Array(readFileSync(join(dir, "top.qcow2")));
    const before = JSON.stringify(await bitmapFlagsUnchecked(dir, "top.qcow2"));
    const file = await FaultFile.fromBytes(initial, { recordLog: true });
    const image = await openQcow2(file, { readOnly: false, backing: null });
    await image.changeBitmaps(actions);
    await image.close();
    writeFileSync(join(dir, "top.qcow2"), file.durableContents());
    const after = JSON.stringify(await bitmapFlags(dir, "top.qcow2"));
    assert.notEqual(after, before, what);
    const replay = new CrashReplay(initial, file.log ?? []);
    // Each crash point several times: which sectors of the writes in flight land is drawn at random.
    for (let point = 0; point < replay.writeCount * 4; point++) {
      const writeNumber = 1 + Math.floor(point / 4);
      const where = `${what}: crash at write ${writeNumber}/${replay.writeCount}`;
      writeFileSync(join(dir, "crashed.qcow2"), replay.crashAt(writeNumber, random.next));
      const info = JSON.parse(ok(await qemuImg(["info", "--output=json", "crashed.qcow2"], dir), where).stdout);
      assert.equal(info["backing-filename"], backing, where);
      assert.ok([before, after].includes(JSON.stringify(await bitmapFlagsUnchecked(dir, "crashed.qcow2"))), where);
      ok(await qemuIo(["-r", "-c", "read -P 7 0 64k", "crashed.qcow2"], dir), `${where}: backing data`);
      const check = JSON.parse((await qemuImg(["check", "--output=json", "crashed.qcow2"], dir)).stdout);
      assert.equal((check.corruptions ?? 0) + (check["check-errors"] ?? 0), 0, `${where}: ${JSON.stringify(check)}`);
    }
  }
});

test("bitmaps: a resize that would make a bitmap larger than QEMU can load leaves it in-use, as qemu-img does; the image still opens in QEMU", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "big.qcow2", "1G"], dir), "create");
  ok(await qemuImg(["bitmap", "--add", "-g", "512", "big.qcow2", "tiny"], dir), "fine bitmap");
  ok(await qemuImg(["bitmap", "--add", "big.qcow2", "normal"], dir), "normal bitmap");
  ok(await qemuIo(["-c", "write 0 4k", "big.qcow2"], dir), "write");
  ok(await snapstack(["img", "resize", "big.qcow2", "3T"], { cwd: dir }), "resize");
  // 3 TiB at 512 bytes a bit is 768 MiB of bitmap, past QEMU's 512 MiB: in-use, not stored; the other follows the size.
  assert.deepEqual(await bitmapFlags(dir, "big.qcow2"), { tiny: ["in-use", "auto"], normal: ["auto"] });
  ok(await qemuImg(["bitmap", "--remove", "big.qcow2", "tiny"], dir), "QEMU opens the image and removes the bitmap");
});
