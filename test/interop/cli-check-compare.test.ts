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

test("compare: a metadata error while comparing exits 3, a read error 4, each only once the walk reaches it, as qemu-img", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  // Fresh images of up to 1 GiB: L2 table at 0x40000, the first data cluster at 0x50000.
  const image = async (name: string, size: string, writes: string[], damage: Array<[number, number[]]> = []): Promise<void> => {
    ok(await qemuImg(["create", "-q", "-f", "qcow2", name, size], dir), `create ${name}`);
    ok(await qemuIo([...writes.flatMap((command) => ["-c", command]), name], dir), `write ${name}`);
    for (const [hostOffset, bytes] of damage) poke(join(dir, name), hostOffset, bytes);
  };
  const unalignedEntry = (guestCluster: number): [number, number[]] => [0x40000 + guestCluster * 8 + 6, [0x02]]; // L2 entry -> +0x200
  const notDeflate: [number, number[]] = [0x50000, new Array<number>(32).fill(0xff)];
  await image("clean.qcow2", "10M", ["write -P 7 0 64k"]);
  await image("unaligned.qcow2", "10M", ["write -P 7 0 64k"], [unalignedEntry(0)]);
  await image("zip.qcow2", "10M", ["write -c -P 7 0 64k"], [notDeflate]);
  // A content difference at 0, a corrupt entry at 200 MiB: the difference comes first.
  await image("fa.qcow2", "1G", ["write -P 1 0 64k", "write -P 2 200M 64k"]);
  await image("fb.qcow2", "1G", ["write -P 3 0 64k", "write -P 2 200M 64k"], [unalignedEntry(3200)]);
  // A damaged compressed cluster at 0, a corrupt entry at 320 KiB: the read error comes first.
  await image("zipfirst.qcow2", "10M", ["write -c -P 7 0 64k", "write -P 9 320k 64k"], [notDeflate, unalignedEntry(5)]);
  await image("plain.qcow2", "10M", ["write -P 7 0 64k", "write -P 9 320k 64k"]);
  // Sizes differ: a difference in the common part, or none, and a corrupt or unreadable tail.
  await image("short.qcow2", "1M", ["write -P 5 0 64k"]);
  await image("longbad.qcow2", "10M", ["write -P 6 0 64k", "write -P 6 2M 64k"], [unalignedEntry(32)]);
  await image("longok.qcow2", "10M", ["write -P 5 0 64k", "write -P 6 2M 64k"], [unalignedEntry(32)]);
  await image("longzip.qcow2", "10M", ["write -P 5 0 64k", "write -c -P 6 2M 64k"], [[0x50000 + 0x10000, new Array<number>(32).fill(0xff)]]);
  const cases: Array<[string[], number]> = [
    [["clean.qcow2", "unaligned.qcow2"], 3],
    [["unaligned.qcow2", "clean.qcow2"], 3],
    [["clean.qcow2", "zip.qcow2"], 4],
    [["fa.qcow2", "fb.qcow2"], 1],
    [["plain.qcow2", "zipfirst.qcow2"], 4],
    [["short.qcow2", "longbad.qcow2"], 1],
    [["short.qcow2", "longok.qcow2"], 3],
    [["longzip.qcow2", "short.qcow2"], 4],
  ];
  for (const [args, status] of cases) {
    const before = snapshotFiles(args.map((name) => join(dir, name)));
    const ours = await snapstack(["img", "compare", ...args], { cwd: dir });
    const theirs = await qemuImg(["compare", ...args], dir);
    assert.equal(theirs.code, status, `qemu-img compare ${args.join(" ")}: ${theirs.stderr}`);
    assert.equal(ours.code, status, `compare ${args.join(" ")} exit (stderr ${ours.stderr})`);
    assert.equal(ours.stdout, theirs.stdout, `compare ${args.join(" ")} stdout`);
    if (status > 1) assert.match(ours.stderr, /^snapstack: error E_[A-Z_]+: .+\n$/);
    assertUnchanged(before);
  }
});

test("check: a backing file that does not open fails the check, as qemu-img's (it once reported a clean image)", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "over.qcow2", "1M"], dir), "create over");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-u", "-b", "over.qcow2", "-F", "qcow2", "top.qcow2", "1M"], dir), "create top");
  for (const image of ["over.qcow2", "top.qcow2"]) {
    for (const output of ["human", "json"]) {
      const ours = await snapstack(["img", "check", `--output=${output}`, image], { cwd: dir });
      const theirs = await qemuImg(["check", `--output=${output}`, image], dir);
      assert.equal(theirs.code, 1, `${image}: qemu-img check fails`);
      assert.equal(ours.code, theirs.code, `${image} ${output} exit`);
      assert.equal(ours.stdout, theirs.stdout, `${image} ${output} stdout`);
      assert.equal(ours.stderr, theirs.stderr.replace("qemu-img: ", "snapstack: error E_BACKING_MISSING: "), `${image} ${output} stderr`);
    }
  }
  // A backing file QEMU opens and snapstack does not read (vmdk) leaves the check of the top as it is.
  ok(await qemuImg(["create", "-q", "-f", "vmdk", "base.vmdk", "1M"], dir), "create vmdk");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-b", "base.vmdk", "-F", "vmdk", "over-vmdk.qcow2", "1M"], dir), "create over vmdk");
  const ours = await snapstack(["img", "check", "over-vmdk.qcow2"], { cwd: dir });
  const theirs = await qemuImg(["check", "over-vmdk.qcow2"], dir);
  assert.equal(theirs.code, 0);
  assert.equal(ours.code, 0, ours.stderr);
  assert.equal(ours.stdout, theirs.stdout);
});
