// `snapstack img bitmap` against `qemu-img bitmap` 7.2: the same steps on two copies of an image leave the
// same bitmaps (names, flags, granularities, dirty ranges as qemu-nbd -B exports them) and a clean
// qemu-img check; every refusal has qemu-img's exit code and message, and keeps the steps before it.
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, existsSync, rmSync } from "node:fs";
import { join } from "node:path";
import { requireTools, run, scratchDir } from "../helpers/tools.ts";
import { ok, qemuImg, qemuIo, snapstack } from "./cli-helpers.ts";

interface BitmapInfo {
  name: string;
  flags: string[];
  granularity: number;
}

async function bitmapsOf(dir: string, name: string): Promise<BitmapInfo[]> {
  const check = ok(await qemuImg(["check", name], dir), `check ${name}`);
  assert.doesNotMatch(check.stdout + check.stderr, /Leaked|ERROR/);
  const info = JSON.parse(ok(await qemuImg(["info", "--output=json", name], dir), "info").stdout);
  return info["format-specific"].data.bitmaps ?? [];
}

async function dirtyRanges(dir: string, name: string, bitmap: string): Promise<Array<[number, number]>> {
  const result = ok(await run("nbdinfo", [`--map=qemu:dirty-bitmap:${bitmap}`, "--json", "--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap, join(dir, name), "]"]), `nbdinfo ${bitmap}`);
  const extents: Array<{ offset: number; length: number; type: number }> = JSON.parse(result.stdout);
  return extents.filter((extent) => extent.type === 1).map((extent) => [extent.offset, extent.length]);
}

/** Run `args` (with IMG for the image) as `qemu-img bitmap` on theirs.qcow2 and `snapstack img bitmap` on ours.qcow2; both must agree. */
async function both(dir: string, args: string[]): Promise<{ code: number; stderr: string }> {
  const theirs = await qemuImg(["bitmap", ...args.map((arg) => (arg === "IMG" ? "theirs.qcow2" : arg))], dir);
  const ours = await snapstack(["img", "bitmap", ...args.map((arg) => (arg === "IMG" ? "ours.qcow2" : arg))], { cwd: dir });
  const what = `bitmap ${args.join(" ")}`;
  assert.equal(ours.code, theirs.code, `${what}: ${ours.stderr}`);
  const expected = theirs.stderr.split("\n")[0].replace(/^qemu-img: /, "");
  if (theirs.code === 0) assert.equal(ours.stderr, "", what);
  else assert.match(ours.stderr, new RegExp(`^snapstack: error E_[A-Z_]+: ${expected.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}`), what);
  return ours;
}

async function sameBitmaps(dir: string): Promise<BitmapInfo[]> {
  const ours = await bitmapsOf(dir, "ours.qcow2");
  assert.deepEqual(ours, await bitmapsOf(dir, "theirs.qcow2"));
  for (const bitmap of ours) {
    if (bitmap.flags.includes("in-use")) continue;
    assert.deepEqual(await dirtyRanges(dir, "ours.qcow2", bitmap.name), await dirtyRanges(dir, "theirs.qcow2", bitmap.name), bitmap.name);
  }
  return ours;
}

test("img bitmap: add, enable, disable, clear, merge and remove leave what qemu-img bitmap leaves", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "theirs.qcow2", "64M"], dir), "create");
  copyFileSync(join(dir, "theirs.qcow2"), join(dir, "ours.qcow2"));
  const write = async (command: string): Promise<void> => {
    for (const name of ["ours.qcow2", "theirs.qcow2"]) ok(await qemuIo(["-c", command, name], dir), `${command} ${name}`);
  };
  await both(dir, ["--add", "IMG", "b0"]);
  await both(dir, ["--add", "-g", "512", "IMG", "fine"]);
  await both(dir, ["--add", "--disable", "-g", "1M", "IMG", "coarse"]);
  assert.deepEqual(
    (await sameBitmaps(dir)).map((bitmap) => [bitmap.name, bitmap.granularity, bitmap.flags.join(",")]),
    [["b0", 65536, "auto"], ["fine", 512, "auto"], ["coarse", 1048576, ""]],
  );
  await write("write -P 1 1000 5000");
  await write("write -P 2 40M 64k");
  await sameBitmaps(dir);
  // Merge from the same image (granularity 512 into 1 MiB), then enable the merged one and write again.
  await both(dir, ["--merge", "fine", "--enable", "IMG", "coarse"]);
  await write("write -P 3 50M 4k");
  assert.deepEqual(await dirtyRanges(dir, "ours.qcow2", "coarse"), [[0, 1048576], [40 * 1048576, 1048576], [50 * 1048576, 1048576]]);
  await both(dir, ["--clear", "--disable", "IMG", "fine"]);
  await write("write -P 4 60M 4k");
  assert.deepEqual(await dirtyRanges(dir, "ours.qcow2", "fine"), []);
  await sameBitmaps(dir);
  // Merge from another image (-b), which qemu-img opens read-only.
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "other.qcow2", "64M"], dir), "create other");
  ok(await qemuImg(["bitmap", "--add", "other.qcow2", "o"], dir), "other bitmap");
  ok(await qemuIo(["-c", "write 20M 4k", "other.qcow2"], dir), "other write");
  await both(dir, ["--merge", "o", "-b", "other.qcow2", "-F", "qcow2", "IMG", "fine"]);
  assert.deepEqual(await dirtyRanges(dir, "ours.qcow2", "fine"), [[20 * 1048576, 65536]]);
  await sameBitmaps(dir);
  // Remove them all: the extension goes (qemu-img info lists none, check clean), and a new one can be added.
  for (const name of ["b0", "coarse", "fine"]) await both(dir, ["--remove", "IMG", name]);
  assert.deepEqual(await sameBitmaps(dir), []);
  await both(dir, ["--add", "IMG", "again"]);
  await sameBitmaps(dir);
});

test("img bitmap: every refusal as qemu-img's, the steps before it kept; an in-use bitmap can only be removed", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "theirs.qcow2", "16M"], dir), "create");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "16M"], dir), "create v2");
  copyFileSync(join(dir, "theirs.qcow2"), join(dir, "ours.qcow2"));
  await both(dir, ["--add", "IMG", "b0"]);
  for (const args of [
    ["--add", "IMG", "b0"],
    ["--add", "-g", "1000", "IMG", "g"],
    ["--add", "-g", "256", "IMG", "g"],
    ["--add", "IMG", ""],
    ["--remove", "IMG", "nosuch"],
    ["--clear", "IMG", "nosuch"],
    ["--enable", "IMG", "nosuch"],
    ["--merge", "nosuch", "IMG", "b0"],
    ["--disable", "--add", "IMG", "late"],
    ["-g", "64k", "--remove", "IMG", "b0"],
    ["IMG", "b0"],
    ["--merge", "b0", "-F", "qcow2", "IMG", "b0"],
    ["--add", "IMG"],
    ["--add", "IMG", "b1", "extra"],
  ]) {
    const result = await both(dir, args);
    assert.equal(result.code, 1, args.join(" "));
  }
  // The steps before a failed one stay done: b2 added, then the second remove fails.
  await both(dir, ["--add", "--remove", "--remove", "IMG", "b2"]);
  await both(dir, ["--add", "--clear", "--add", "IMG", "b3"]);
  assert.deepEqual((await sameBitmaps(dir)).map((bitmap) => bitmap.name), ["b0", "b3"]);
  // A version 2 image cannot store bitmaps.
  const v2 = await snapstack(["img", "bitmap", "--add", "v2.qcow2", "b0"], { cwd: dir });
  assert.equal(v2.code, 1);
  assert.match(v2.stderr, /E_UNSUPPORTED_FEATURE: Operation add on bitmap b0 failed: Can't make bitmap 'b0' persistent in '.*v2\.qcow2': Cannot store dirty bitmaps in qcow2 v2 files/);
  // In-use (a crash of the program writing the image leaves them so): everything but --remove refused.
  for (const name of ["ours.qcow2", "theirs.qcow2"]) assert.notEqual((await qemuIo(["-c", "write 0 4k", "-c", "sigraise 9", name], dir)).code, 0, "qemu-io killed");
  for (const action of ["--clear", "--enable", "--disable"]) {
    const ours = await snapstack(["img", "bitmap", action, "ours.qcow2", "b0"], { cwd: dir });
    assert.equal(ours.code, 1);
    assert.match(ours.stderr, /^snapstack: error E_UNSUPPORTED_FEATURE: Operation \w+ on bitmap b0 failed: Bitmap 'b0' is inconsistent and cannot be used/);
  }
  await both(dir, ["--remove", "IMG", "b0"]);
  assert.deepEqual((await sameBitmaps(dir)).map((bitmap) => [bitmap.name, bitmap.flags]), [["b3", ["in-use", "auto"]]]);
});

test("img convert --bitmaps copies the source's bitmaps as qemu-img convert --bitmaps does; --skip-broken-bitmaps and the refusals too", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "src.qcow2", "32M"], dir), "create");
  ok(await qemuImg(["bitmap", "--add", "src.qcow2", "b0"], dir), "add b0");
  ok(await qemuImg(["bitmap", "--add", "-g", "4k", "src.qcow2", "d1"], dir), "add d1");
  ok(await qemuIo(["-c", "write -P 1 1M 10k", "-c", "write -P 2 20M 1k", "src.qcow2"], dir), "writes");
  ok(await qemuImg(["bitmap", "--disable", "src.qcow2", "d1"], dir), "disable d1");
  ok(await qemuIo(["-c", "write -P 3 30M 4k", "src.qcow2"], dir), "a write only b0 records");
  const convert = async (args: string[]): Promise<void> => {
    const theirs = await qemuImg(["convert", ...args.map((arg) => (arg === "OUT" ? "theirs.qcow2" : arg))], dir);
    const ours = await snapstack(["img", "convert", ...args.map((arg) => (arg === "OUT" ? "ours.qcow2" : arg))], { cwd: dir });
    assert.equal(ours.code, theirs.code, `${args.join(" ")}: ${ours.stderr}`);
    const message = theirs.stderr.split("\n")[0].replace(/^qemu-img: (warning: )?/, "");
    if (theirs.stderr === "") assert.equal(ours.stderr, "");
    else assert.ok(ours.stderr.includes(message), `${ours.stderr} (qemu-img: ${message})`);
  };
  await convert(["--bitmaps", "-O", "qcow2", "src.qcow2", "OUT"]);
  assert.deepEqual(
    (await sameBitmaps(dir)).map((bitmap) => [bitmap.name, bitmap.granularity, bitmap.flags.join(",")]),
    [["b0", 65536, "auto"], ["d1", 4096, ""]],
  );
  assert.deepEqual(await dirtyRanges(dir, "ours.qcow2", "d1"), [[1048576, 12288], [20 * 1048576, 4096]]);
  // A bitmap left in-use in the source: refused before the target is created, or skipped with a warning.
  assert.notEqual((await qemuIo(["-c", "write 0 4k", "-c", "sigraise 9", "src.qcow2"], dir)).code, 0, "qemu-io killed");
  for (const name of ["ours.qcow2", "theirs.qcow2"]) rmSync(join(dir, name));
  await convert(["--bitmaps", "-O", "qcow2", "src.qcow2", "OUT"]);
  assert.equal(existsSync(join(dir, "ours.qcow2")), false, "a refused convert created its target");
  await convert(["--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "src.qcow2", "OUT"]);
  assert.deepEqual(await sameBitmaps(dir), []);
  await convert(["--skip-broken-bitmaps", "-O", "qcow2", "src.qcow2", "OUT"]);
  const raw = await snapstack(["img", "convert", "--bitmaps", "-O", "raw", "src.qcow2", "out.raw"], { cwd: dir });
  assert.equal(raw.code, 1);
  assert.match(raw.stderr, /E_UNSUPPORTED_FEATURE: Format driver 'raw' does not support bitmaps/);
  assert.equal(existsSync(join(dir, "out.raw")), false);
  // A source that cannot hold bitmaps (raw, or a qcow2 read as raw) is refused, as by qemu-img.
  for (const name of ["ours.qcow2", "theirs.qcow2"]) rmSync(join(dir, name), { force: true });
  await convert(["--bitmaps", "-f", "raw", "-O", "qcow2", "src.qcow2", "OUT"]);
  assert.equal(existsSync(join(dir, "ours.qcow2")), false);
  // -n into a target of another size: the newest bitmap fails first and none is left, as qemu-img leaves it.
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "clean.qcow2", "32M"], dir), "clean source");
  ok(await qemuImg(["bitmap", "--add", "clean.qcow2", "c1"], dir), "c1");
  ok(await qemuImg(["bitmap", "--add", "clean.qcow2", "c2"], dir), "c2");
  for (const name of ["ours.qcow2", "theirs.qcow2"]) ok(await qemuImg(["create", "-q", "-f", "qcow2", name, "64M"], dir), "bigger target");
  await convert(["-n", "--bitmaps", "-O", "qcow2", "clean.qcow2", "OUT"]);
  assert.deepEqual(await sameBitmaps(dir), []);
});
