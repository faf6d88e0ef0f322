// snapstack img check / compare vs qemu-img: output and exit statuses.
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, openSync, writeSync, closeSync } from "node:fs";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { FIXTURE_IMAGES, buildFixtures, ok, qemuImg, qemuIo, snapshotFiles, assertUnchanged, snapstack } from "./cli-helpers.ts";

function poke(path: string, hostOffset: number, bytes: number[]): void {
  const fd = openSync(path, "r+");
  try {
    writeSync(fd, Uint8Array.from(bytes), 0, bytes.length, hostOffset);
  } finally {
    closeSync(fd);
  }
}

/** A 10 MiB image with 256 KiB of data: clusters 5.. are data; the refcount block is at 0x20000. */
async function damagedImages(dir: string): Promise<void> {
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "clean.qcow2", "10M"], dir), "create");
  ok(await qemuIo(["-c", "write 0 256k", "clean.qcow2"], dir), "write");
  copyFileSync(join(dir, "clean.qcow2"), join(dir, "leak.qcow2"));
  poke(join(dir, "leak.qcow2"), 0x20000 + 2 * 5, [0, 2]); // refcount 2, one reference: a leak
  copyFileSync(join(dir, "leak.qcow2"), join(dir, "corrupt.qcow2"));
  poke(join(dir, "corrupt.qcow2"), 0x20000 + 2 * 6, [0, 0]); // refcount 0, referenced: corruption
}

test("check: same stdout, stderr details and exit status as qemu-img (clean, leaks, corruptions, raw)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await buildFixtures(dir);
  await damagedImages(dir);
  for (const image of [...FIXTURE_IMAGES, "clean.qcow2", "leak.qcow2", "corrupt.qcow2"]) {
    for (const output of ["human", "json"]) {
      const before = snapshotFiles([join(dir, image)]);
      const ours = await snapstack(["img", "check", `--output=${output}`, image], { cwd: dir });
      assertUnchanged(before);
      const theirs = await qemuImg(["check", `--output=${output}`, image], dir);
      assert.equal(ours.code, theirs.code, `${image} ${output} exit (stderr ${ours.stderr})`);
      assert.equal(ours.stdout, theirs.stdout, `${image} ${output}`);
      if (image === "plain.raw") {
        assert.equal(ours.code, 63);
        assert.match(ours.stderr, /^snapstack: error E_UNSUPPORTED_FEATURE: This image format does not support checks\n$/);
      } else {
        assert.equal(ours.stderr, theirs.stderr.replaceAll("qemu-img: ", "snapstack: "), `${image} ${output} stderr`);
      }
    }
  }
});

test("check -r leaks / -r all repair like qemu-img", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await damagedImages(dir);
  for (const [image, mode] of [["leak.qcow2", "leaks"], ["leak.qcow2", "all"], ["corrupt.qcow2", "all"], ["corrupt.qcow2", "leaks"]]) {
    copyFileSync(join(dir, image), join(dir, "ours.qcow2"));
    copyFileSync(join(dir, image), join(dir, "theirs.qcow2"));
    const ours = await snapstack(["img", "check", "-r", mode, "ours.qcow2"], { cwd: dir });
    const theirs = await qemuImg(["check", "-r", mode, "theirs.qcow2"], dir);
    assert.equal(ours.code, theirs.code, `${image} -r ${mode}`);
    assert.equal(ours.stdout, theirs.stdout, `${image} -r ${mode}`);
    // Whatever snapstack repaired, qemu-img must find it in the same state.
    const recheckOurs = await qemuImg(["check", "--output=json", "ours.qcow2"], dir);
    const recheckTheirs = await qemuImg(["check", "--output=json", "theirs.qcow2"], dir);
    assert.equal(recheckOurs.code, recheckTheirs.code, `${image} -r ${mode}: qemu-img check after repair`);
  }
});

test("compare: messages and exit statuses as qemu-img", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await buildFixtures(dir);
  ok(await qemuImg(["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"], dir), "flatten");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "empty64.qcow2", "64M"], dir), "empty");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "empty128.qcow2", "128M"], dir), "empty 128M");
  const pairs: string[][] = [
    ["top.qcow2", "flat.qcow2"],
    ["base.qcow2", "top.qcow2"],
    ["base.qcow2", "empty64.qcow2"],
    ["empty64.qcow2", "empty128.qcow2"],
    ["-s", "empty64.qcow2", "empty128.qcow2"],
    ["-s", "top.qcow2", "flat.qcow2"],
    ["-q", "base.qcow2", "top.qcow2"],
    ["-f", "qcow2", "-F", "qcow2", "top.qcow2", "flat.qcow2"],
    ["-f", "raw", "plain.raw", "plain.raw"],
  ];
  for (const args of pairs) {
    const ours = await snapstack(["img", "compare", ...args], { cwd: dir });
    const theirs = await qemuImg(["compare", ...args], dir);
    assert.equal(ours.code, theirs.code, `compare ${args.join(" ")} exit (stderr ${ours.stderr})`);
    assert.equal(ours.stdout, theirs.stdout, `compare ${args.join(" ")}`);
  }
  const missing = await snapstack(["img", "compare", "base.qcow2", "nonexistent.qcow2"], { cwd: dir });
  assert.equal(missing.code, 2);
  assert.match(missing.stderr, /^snapstack: error E_NOT_FOUND: /);
});

test("compare: a metadata error while comparing exits 3, a read error 4, as qemu-img", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  // Fresh 10 MiB images: L2 table at 0x40000, the first data cluster at 0x50000.
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "clean.qcow2", "10M"], dir), "create");
  ok(await qemuIo(["-c", "write -P 7 0 64k", "clean.qcow2"], dir), "write");
  copyFileSync(join(dir, "clean.qcow2"), join(dir, "unaligned.qcow2"));
  poke(join(dir, "unaligned.qcow2"), 0x40000 + 6, [0x02]); // L2 entry 0 -> 0x50200: not cluster aligned
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "zip.qcow2", "10M"], dir), "create compressed");
  ok(await qemuIo(["-c", "write -c -P 7 0 64k", "zip.qcow2"], dir), "write compressed");
  poke(join(dir, "zip.qcow2"), 0x50000, new Array<number>(32).fill(0xff)); // not a deflate stream
  const cases: Array<[string[], number]> = [
    [["clean.qcow2", "unaligned.qcow2"], 3],
    [["unaligned.qcow2", "clean.qcow2"], 3],
    [["clean.qcow2", "zip.qcow2"], 4],
  ];
  for (const [args, status] of cases) {
    const before = snapshotFiles(args.map((name) => join(dir, name)));
    const ours = await snapstack(["img", "compare", ...args], { cwd: dir });
    const theirs = await qemuImg(["compare", ...args], dir);
    assert.equal(theirs.code, status, `qemu-img compare ${args.join(" ")}: ${theirs.stderr}`);
    assert.equal(ours.code, status, `compare ${args.join(" ")} exit (stderr ${ours.stderr})`);
    assert.match(ours.stderr, /^snapstack: error E_[A-Z_]+: .+\n$/);
    assertUnchanged(before);
  }
});
