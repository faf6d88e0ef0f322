// snapstack img create vs qemu-img create: banners, -o help and the files themselves.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileKey } from "../../src/io/file-identity.ts";
import { parseProcLocks } from "../../src/io/qemu-locks.ts";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { assertSameAsQemuImg, ok, qemuImg, snapstack } from "./cli-helpers.ts";

/** Argument lists (after "create") that must produce identical stdout and identical files. */
const CASES: string[][] = [
  ["-f", "qcow2", "IMG", "1G"],
  ["-f", "qcow2", "IMG", "0"],
  ["-f", "qcow2", "IMG", "1000"],
  ["-f", "qcow2", "IMG", "1.5G"],
  ["-f", "qcow2", "-o", "cluster_size=4096", "IMG", "10M"],
  ["-f", "qcow2", "-o", "cluster_size=512", "IMG", "16M"],
  ["-f", "qcow2", "-o", "cluster_size=2M", "IMG", "100G"],
  ["-f", "qcow2", "-o", "lazy_refcounts=on", "-o", "refcount_bits=8", "IMG", "64M"],
  ["-f", "qcow2", "-o", "compat=0.10", "IMG", "1M"],
  ["-f", "qcow2", "-o", "extended_l2=on", "IMG", "1G"],
  // Preallocated data clusters keep an empty subcluster bitmap with extended L2.
  ["-f", "qcow2", "-o", "extended_l2=on,preallocation=falloc", "IMG", "8M"],
  ["-f", "qcow2", "-o", "extended_l2=on,preallocation=full", "IMG", "8M"],
  ["-f", "qcow2", "-o", "cluster_size=4k,preallocation=full", "IMG", "3M"],
  // Size 0: no data cluster, but still a new refcount area (the table moves to the fourth cluster).
  ["-f", "qcow2", "-o", "preallocation=falloc", "IMG", "0"],
  ["-f", "qcow2", "-o", "preallocation=full,cluster_size=512", "IMG", "0"],
  ["-f", "qcow2", "-o", "compression_type=zstd", "IMG", "1G"],
  // Switched off, these ask for nothing snapstack lacks.
  ["-f", "qcow2", "-o", "encryption=off", "IMG", "1M"],
  ["-f", "qcow2", "-o", "data_file_raw=off,cluster_size=4k", "IMG", "1M"],
  ["-f", "qcow2", "-o", "size=2M", "IMG"],
  ["-fqcow2", "IMG", "4T"],
  ["IMG", "-f", "qcow2", "3M"],
  ["-f", "raw", "IMG", "1000"],
  ["IMG", "64k"],
];

for (const args of CASES) {
  test(`create ${args.join(" ")}: same banner and same bytes as qemu-img`, async (t) => {
    if (!requireTools(t, "qemu-img")) return;
    const dir = scratchDir(t);
    const ours = await snapstack(["img", "create", ...args.map((arg) => (arg === "IMG" ? "ours.img" : arg))], { cwd: dir });
    const theirs = ok(await qemuImg(["create", ...args.map((arg) => (arg === "IMG" ? "theirs.img" : arg))], dir), "qemu-img create");
    ok(ours, "snapstack img create");
    assert.equal(ours.stdout.replace("ours.img", "theirs.img"), theirs.stdout);
    assert.ok(readFileSync(join(dir, "ours.img")).equals(readFileSync(join(dir, "theirs.img"))), "files differ (cmp)");
  });
}

test("create with a backing file: banner, size from the backing file, same bytes", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "base.qcow2", "5M"], dir), "base");
  for (const extra of [[], ["2M"]]) {
    const ours = ok(await snapstack(["img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "ours.qcow2", ...extra], { cwd: dir }), "ours");
    const theirs = ok(await qemuImg(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "theirs.qcow2", ...extra], dir), "theirs");
    assert.equal(ours.stdout.replace("ours.qcow2", "theirs.qcow2"), theirs.stdout);
    assert.ok(readFileSync(join(dir, "ours.qcow2")).equals(readFileSync(join(dir, "theirs.qcow2"))), `files differ with ${extra.join(" ")}`);
  }
  // -u: the backing file is not opened (it need not exist).
  const ours = ok(await snapstack(["img", "create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "u1.qcow2", "1G"], { cwd: dir }), "ours -u");
  const theirs = ok(await qemuImg(["create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "u2.qcow2", "1G"], dir), "theirs -u");
  assert.equal(ours.stdout.replace("u1.qcow2", "u2.qcow2"), theirs.stdout);
  assert.ok(readFileSync(join(dir, "u1.qcow2")).equals(readFileSync(join(dir, "u2.qcow2"))));
});

test("create refusals print the Formatting line where qemu-img does: backing file checks before it, the format's after", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "base.qcow2", "2M"], dir), "base");
  const cases: string[][] = [
    ["-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", "new.qcow2", "1G"],
    ["-f", "qcow2", "-b", "", "-F", "qcow2", "new.qcow2", "1M"],
    ["-f", "qcow2", "-b", "base.qcow2", "new.qcow2", "1M"],
    ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "base.qcow2"],
    ["-f", "qcow2", "-o", "backing_fmt=qcow2", "new.qcow2", "1G"],
    ["-f", "qcow2", "-o", "encryption=on", "new.qcow2", "1M"],
    // The backing is opened (its chain too) before its format is asked for, as bdrv_img_create does.
    ["-f", "qcow2", "-b", "missing.qcow2", "new.qcow2", "1M"],
    ["-f", "qcow2", "-b", "dangling.qcow2", "-F", "qcow2", "new.qcow2"],
  ];
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-u", "-b", "nowhere.qcow2", "-F", "qcow2", "dangling.qcow2", "1M"], dir), "an overlay whose backing is gone");
  const base = readFileSync(join(dir, "base.qcow2"));
  for (const args of cases) {
    await assertSameAsQemuImg(dir, ["create", ...args], `create ${args.join(" ")}`);
    assert.equal(existsSync(join(dir, "new.qcow2")), false, `create ${args.join(" ")}: no file left`);
    assert.ok(readFileSync(join(dir, "base.qcow2")).equals(base), `create ${args.join(" ")}: the backing file is untouched`);
  }
  const missing = await snapstack(["img", "create", "-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", "new.qcow2", "1G"], { cwd: dir });
  assert.equal(missing.stderr, "snapstack: error E_BACKING_MISSING: new.qcow2: Could not open 'missing.qcow2': No such file or directory; Could not open backing image.\n");
  assert.match((await snapstack(["img", "create", "-f", "qcow2", "-b", "missing.qcow2", "new.qcow2", "1M"], { cwd: dir })).stderr, /E_BACKING_MISSING/);
  assert.match((await snapstack(["img", "create", "-f", "qcow2", "-b", "dangling.qcow2", "-F", "qcow2", "new.qcow2"], { cwd: dir })).stderr, /E_BACKING_MISSING: .*nowhere\.qcow2/);
  const noFormat = await snapstack(["img", "create", "-f", "qcow2", "-b", "base.qcow2", "new.qcow2", "1M"], { cwd: dir });
  assert.match(noFormat.stderr, /E_BACKING_FORMAT: new\.qcow2: Backing file specified without backing format; Detected format of qcow2\./);
});

test("create -q prints nothing; -o help lists the options like qemu-img", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  const quiet = ok(await snapstack(["img", "create", "-q", "-f", "qcow2", "q.qcow2", "1M"], { cwd: dir }), "quiet");
  assert.equal(quiet.stdout + quiet.stderr, "");
  for (const args of [
    ["-f", "qcow2", "-o", "help"],
    ["-f", "qcow2", "-o", "?", "x.qcow2"],
    ["-f", "qcow2", "-o", "cluster_size=4k,help", "x.qcow2"],
    ["-f", "raw", "-o", "help"],
    ["-f", "raw", "-o", "help", "x.raw"],
  ]) {
    const ours = ok(await snapstack(["img", "create", ...args], { cwd: dir }), `ours ${args.join(" ")}`);
    const theirs = ok(await qemuImg(["create", ...args], dir), `theirs ${args.join(" ")}`);
    assert.equal(ours.stdout, theirs.stdout, args.join(" "));
  }
});

test("create and convert refuse a file a QEMU holds open (E_IN_USE, as qemu-img), leaving it untouched", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "raw", "source.raw", "1M"], dir), "source");
  for (const readOnly of [false, true]) {
    const image = readOnly ? "read.qcow2" : "write.qcow2";
    ok(await qemuImg(["create", "-q", "-f", "qcow2", image, "64M"], dir), "create the held image");
    // A running VM stands for the holder: qemu-io keeps the image open (read-write, or -r) until stdin closes.
    const holder = spawn("qemu-io", [...(readOnly ? ["-r"] : []), join(dir, image)], { stdio: ["pipe", "ignore", "ignore"] });
    const exited = new Promise<void>((resolve) => holder.on("exit", () => resolve()));
    try {
      const key = fileKey(join(dir, image)) ?? "";
      for (let tries = 0; tries < 500 && !parseProcLocks(readFileSync("/proc/locks", "utf8")).has(key); tries++) await new Promise((resolve) => setTimeout(resolve, 10));
      const before = readFileSync(join(dir, image));
      for (const args of [["create", "-q", "-f", "qcow2", image, "1M"], ["create", "-q", "-f", "raw", image, "1M"], ["convert", "-O", "qcow2", "source.raw", image]]) {
        const theirs = await qemuImg(args, dir);
        const ours = await snapstack(["img", ...args], { cwd: dir });
        assert.equal(theirs.code, 1, `qemu-img ${args.join(" ")}: ${theirs.stderr}`);
        assert.equal(ours.code, theirs.code, `${args.join(" ")}: ${ours.stderr}`);
        assert.equal(ours.stderr, `snapstack: error E_IN_USE: ${image}: Failed to get "write" lock: is another process using the image [${image}]?\n`);
        assert.ok(readFileSync(join(dir, image)).equals(before), `${args.join(" ")} (holder ${readOnly ? "reading" : "writing"}) changed the held image`);
      }
    } finally {
      holder.stdin.end("quit\n");
      await exited;
    }
    ok(await snapstack(["img", "create", "-q", "-f", "qcow2", image, "1M"], { cwd: dir }), "create once the holder is gone");
  }
});
