// One test per error code a CLI user can trigger: the code on one stderr line,
// a non-zero exit, no stack trace, and the refused image byte-for-byte unchanged.
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { closeSync, copyFileSync, existsSync, mkdirSync, openSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { spawn } from "node:child_process";
import { fileKey } from "../../src/io/file-identity.ts";
import { parseProcLocks } from "../../src/io/qemu-locks.ts";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { assertCodedError, assertUnchanged, createLuksImage, ok, qemuImg, qemuIo, snapshotFiles, snapstack } from "./cli-helpers.ts";

const HEADER_INCOMPATIBLE_FEATURES = 72;
const HEADER_L1_TABLE_OFFSET = 40;
const HEADER_AUTOCLEAR_FEATURES = 88;
const HEADER_REFCOUNT_TABLE_OFFSET = 48;

function poke(path: string, hostOffset: number, bytes: Uint8Array): void {
  const fd = openSync(path, "r+");
  try {
    writeSync(fd, bytes, 0, bytes.length, hostOffset);
  } finally {
    closeSync(fd);
  }
}

function peekU64(path: string, hostOffset: number): bigint {
  const fd = openSync(path, "r");
  try {
    const buffer = Buffer.alloc(8);
    readSync(fd, buffer, 0, 8, hostOffset);
    return buffer.readBigUInt64BE(0);
  } finally {
    closeSync(fd);
  }
}

function u64(value: bigint): Uint8Array {
  const buffer = Buffer.alloc(8);
  buffer.writeBigUInt64BE(value);
  return buffer;
}

/** A 1 MiB qcow2 image with 64 KiB of data at 0, made by QEMU. */
async function image(t: TestContext, dir: string, name = "img.qcow2"): Promise<string> {
  ok(await qemuImg(["create", "-q", "-f", "qcow2", name, "1M"], dir), "create");
  ok(await qemuIo(["-c", "write -P 0xab 0 64k", name], dir), "write");
  void t;
  return join(dir, name);
}

/** Run snapstack on files that must stay unchanged; assert the coded error. */
async function refused(dir: string, args: string[], code: string, unchanged: string[], exitCode = 1): Promise<void> {
  const before = snapshotFiles(unchanged);
  const result = await snapstack(args, { cwd: dir });
  assertCodedError(result, code, exitCode);
  assertUnchanged(before);
}

test("E_USAGE: unknown options, missing arguments, unknown commands", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir);
  await refused(dir, ["img", "info", "--foo", "img.qcow2"], "E_USAGE", [path]);
  await refused(dir, ["img", "check", "-x", "img.qcow2"], "E_USAGE", [path]);
  await refused(dir, ["img", "info", "-f"], "E_USAGE", []);
  await refused(dir, ["img", "map", "--output=xml", "img.qcow2"], "E_USAGE", [path]);
  await refused(dir, ["img", "snapshot", "-l", "-l", "img.qcow2"], "E_USAGE", [path]);
  // An abbreviation qemu-img finds ambiguous (--target-image-opts, --target-is-zero) is refused, not taken as ours.
  await refused(dir, ["img", "convert", "--target", "-n", "-O", "qcow2", "img.qcow2", "img.qcow2"], "E_USAGE", [path]);
  // A command without a qemu counterpart knows no qemu options: `diff --o` is its --output.
  ok(await snapstack(["img", "diff", "--o=json", "img.qcow2", "img.qcow2"], { cwd: dir }), "diff --o=json");
  await refused(dir, ["img", "check", "-r", "some", "img.qcow2"], "E_USAGE", [path]);
  await refused(dir, ["img", "frobnicate", "img.qcow2"], "E_USAGE", [path]);
  await refused(dir, ["io", "-c", "frob 0 1", "img.qcow2"], "E_USAGE", [path]);
  await refused(dir, ["img", "create", "-f", "qcow2", "new.qcow2", "1M", "2M"], "E_USAGE", []);
  assert.ok(!existsSync(join(dir, "new.qcow2")));
});

test("E_INVALID_SIZE: bad sizes and offsets", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir);
  await refused(dir, ["img", "create", "-f", "qcow2", "new.qcow2", "1x"], "E_INVALID_SIZE", []);
  await refused(dir, ["img", "create", "-f", "qcow2", "new.qcow2", "9E"], "E_INVALID_SIZE", []);
  assert.ok(!existsSync(join(dir, "new.qcow2")));
  await refused(dir, ["img", "resize", "img.qcow2", "5x"], "E_INVALID_SIZE", [path]);
  await refused(dir, ["io", "-c", "read 0 1x", "img.qcow2"], "E_INVALID_SIZE", [path]);
  await refused(dir, ["img", "map", "--start-offset=-5", "img.qcow2"], "E_INVALID_SIZE", [path]);
});

test("E_TOO_LARGE: sizes beyond qcow2's or snapstack's limits", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir);
  await refused(dir, ["img", "resize", "img.qcow2", "9P"], "E_TOO_LARGE", [path]);
  // Relative, past the limit only with the image's own size added (a multiple of 512, as qemu-img requires).
  await refused(dir, ["img", "resize", "img.qcow2", `+${2 ** 53 - 512 * 1024}`], "E_TOO_LARGE", [path]);
  await refused(dir, ["img", "create", "-f", "qcow2", "big.qcow2", "3P"], "E_TOO_LARGE", []);
});

test("E_INVALID_OPTION: unknown or mistyped -o options", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir);
  await refused(dir, ["img", "create", "-f", "qcow2", "-o", "foo=bar", "new.qcow2", "1M"], "E_INVALID_OPTION", []);
  await refused(dir, ["img", "create", "-f", "qcow2", "-o", "lazy_refcounts=maybe", "new.qcow2", "1M"], "E_INVALID_OPTION", []);
  await refused(dir, ["img", "create", "-f", "qcow2", "-o", "size=1M", "new.qcow2", "1M"], "E_INVALID_OPTION", []);
  assert.ok(!existsSync(join(dir, "new.qcow2")));
  await refused(dir, ["img", "convert", "-O", "qcow2", "-o", "foo=1", "img.qcow2", "out.qcow2"], "E_INVALID_OPTION", [path]);
  assert.ok(!existsSync(join(dir, "out.qcow2")));
  // A mode qemu-img does not know is an invalid option (the qcow2 cases resize does not do are in cli-convert-resize-measure.test.ts).
  await refused(dir, ["img", "resize", "--preallocation=bogus", "img.qcow2", "2M"], "E_INVALID_OPTION", [path]);
  // Cache modes qemu-img does not know, before anything is opened ("Invalid cache option: bogus").
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-b", "img.qcow2", "-F", "qcow2", "top.qcow2"], dir), "overlay");
  const top = join(dir, "top.qcow2");
  await refused(dir, ["img", "commit", "-t", "bogus", "top.qcow2"], "E_INVALID_OPTION", [path, top]);
  await refused(dir, ["img", "rebase", "-T", "bogus", "-u", "-b", "", "top.qcow2"], "E_INVALID_OPTION", [path, top]);
  await refused(dir, ["img", "convert", "-T", "bogus", "-O", "raw", "img.qcow2", "out.raw"], "E_INVALID_OPTION", [path]);
  assert.ok(!existsSync(join(dir, "out.raw")));
  ok(await snapstack(["img", "convert", "-t", "writethrough", "-T", "none", "-O", "raw", "img.qcow2", "out.raw"], { cwd: dir }), "known modes");
});

test("E_OUT_OF_RANGE: I/O past the end of the disk", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir);
  await refused(dir, ["io", "-c", "write 1M 4k", "img.qcow2"], "E_OUT_OF_RANGE", [path]);
  await refused(dir, ["io", "-c", "write 1020k 8k", "img.qcow2"], "E_OUT_OF_RANGE", [path]);
  await refused(dir, ["io", "-r", "-c", "read 2G 1", "img.qcow2"], "E_OUT_OF_RANGE", [path]);
});

test("E_NOT_FOUND: a missing image", async (t) => {
  const dir = scratchDir(t);
  await refused(dir, ["img", "info", "missing.qcow2"], "E_NOT_FOUND", []);
  await refused(dir, ["io", "-c", "read 0 1", "missing.qcow2"], "E_NOT_FOUND", []);
  await refused(dir, ["img", "compare", "missing.qcow2", "missing2.qcow2"], "E_NOT_FOUND", [], 2);
});

test("E_ACCESS: a directory, or a file without permission", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  mkdirSync(join(dir, "adir"));
  await refused(dir, ["img", "info", "adir"], "E_ACCESS", []);
  if (process.getuid?.() !== 0) {
    const path = await image(t, dir);
    const { chmodSync } = await import("node:fs");
    chmodSync(path, 0o444);
    await refused(dir, ["io", "-c", "write 0 4k", "img.qcow2"], "E_ACCESS", [path]);
  }
});

test("E_UNKNOWN_FORMAT: a format name snapstack does not know", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir);
  await refused(dir, ["img", "info", "-f", "qed", "img.qcow2"], "E_UNKNOWN_FORMAT", [path]);
  await refused(dir, ["img", "create", "-f", "foo", "new.img", "1M"], "E_UNKNOWN_FORMAT", []);
  await refused(dir, ["img", "convert", "-O", "foo", "img.qcow2", "out.img"], "E_UNKNOWN_FORMAT", [path]);
  assert.ok(!existsSync(join(dir, "new.img")) && !existsSync(join(dir, "out.img")));
});

test("E_UNKNOWN_FORMAT: an image in a format snapstack does not open (qed, parallels, qcow) is refused, not taken for raw; -f raw opens its bytes", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  for (const format of ["qed", "parallels", "qcow"]) {
    const name = `x.${format}`;
    ok(await qemuImg(["create", "-q", "-f", format, name, "1M"], dir), `create ${format}`);
    const path = join(dir, name);
    for (const args of [["img", "info", name], ["io", "-c", "write -P 1 0 4k", name], ["img", "check", name], ["img", "convert", "-O", "raw", name, "out.raw"]]) {
      await refused(dir, args, "E_UNKNOWN_FORMAT", [path]);
      const result = await snapstack(args, { cwd: dir });
      assert.match(result.stderr, new RegExp(`is a ${format} image`), args.join(" "));
    }
    const raw = ok(await snapstack(["img", "info", "--output=json", "-f", "raw", name], { cwd: dir }), `info -f raw ${format}`);
    assert.equal(JSON.parse(raw.stdout).format, "raw");
  }
  // qcow (version 1) given as qcow2: the version is named, as qemu-img names it.
  const v1 = await snapstack(["img", "info", "-f", "qcow2", "x.qcow"], { cwd: dir });
  assertCodedError(v1, "E_UNSUPPORTED_FEATURE");
  assert.match(v1.stderr, /Unsupported qcow2 version 1/);
  assert.ok(!existsSync(join(dir, "out.raw")));
});

test("E_WRONG_FORMAT: -f qcow2 on a raw file", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "raw", "r.img", "1M"], dir), "create raw");
  writeFileSync(join(dir, "r.img"), Buffer.alloc(4096, 0x41));
  await refused(dir, ["img", "info", "-f", "qcow2", "r.img"], "E_WRONG_FORMAT", [join(dir, "r.img")]);
  await refused(dir, ["io", "-f", "qcow2", "-c", "write 0 4k", "r.img"], "E_WRONG_FORMAT", [join(dir, "r.img")]);
});

test("E_BAD_HEADER: truncated and garbled qcow2 headers", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir);
  writeFileSync(join(dir, "trunc.qcow2"), readFileSync(path).subarray(0, 50));
  await refused(dir, ["img", "info", "-f", "qcow2", "trunc.qcow2"], "E_BAD_HEADER", [join(dir, "trunc.qcow2")]);
  await refused(dir, ["img", "info", "trunc.qcow2"], "E_BAD_HEADER", [join(dir, "trunc.qcow2")]);
  copyFileSync(path, join(dir, "garbled.qcow2"));
  poke(join(dir, "garbled.qcow2"), 20, Uint8Array.of(0, 0, 0, 30)); // cluster_bits 30
  await refused(dir, ["io", "-c", "write 0 4k", "garbled.qcow2"], "E_BAD_HEADER", [join(dir, "garbled.qcow2")]);
  // The autoclear bit data-file-raw without an external data file: qemu-img refuses to open it too.
  copyFileSync(path, join(dir, "raw-bit.qcow2"));
  poke(join(dir, "raw-bit.qcow2"), HEADER_AUTOCLEAR_FEATURES, u64(2n));
  assert.equal((await qemuImg(["check", "raw-bit.qcow2"], dir)).code, 1, "qemu-img refuses it");
  for (const args of [["img", "check", "raw-bit.qcow2"], ["img", "snapshot", "-c", "s", "raw-bit.qcow2"], ["img", "resize", "raw-bit.qcow2", "2M"]]) {
    await refused(dir, args, "E_BAD_HEADER", [join(dir, "raw-bit.qcow2")]);
  }
  // What qemu-img opens without I/O, it shows: info, and create -b reading the size.
  const before = snapshotFiles([join(dir, "raw-bit.qcow2")]);
  ok(await qemuImg(["info", "raw-bit.qcow2"], dir), "qemu-img info");
  ok(await snapstack(["img", "info", "raw-bit.qcow2"], { cwd: dir }), "info");
  ok(await snapstack(["img", "create", "-q", "-f", "qcow2", "-b", "raw-bit.qcow2", "-F", "qcow2", "over.qcow2"], { cwd: dir }), "create -b");
  assertUnchanged(before);
});

test("E_UNSUPPORTED_FEATURE: an unknown incompatible feature bit", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir);
  const features = peekU64(path, HEADER_INCOMPATIBLE_FEATURES);
  poke(path, HEADER_INCOMPATIBLE_FEATURES, u64(features | (1n << 40n)));
  await refused(dir, ["io", "-c", "write 0 4k", "img.qcow2"], "E_UNSUPPORTED_FEATURE", [path]);
  await refused(dir, ["img", "info", "img.qcow2"], "E_UNSUPPORTED_FEATURE", [path]);
});

test("E_CORRUPT_IMAGE: snapshot -c where a corrupt refcount table makes live metadata look free: the write is refused before it lands, and the file is left as qemu-img leaves it (marked corrupt)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir);
  // Refcount block 0 is the L1 table: the refcount table's own cluster reads as free.
  poke(path, Number(peekU64(path, HEADER_REFCOUNT_TABLE_OFFSET)), u64(peekU64(path, HEADER_L1_TABLE_OFFSET)));
  copyFileSync(path, join(dir, "theirs.qcow2"));
  const theirs = await qemuImg(["snapshot", "-c", "s", "theirs.qcow2"], dir);
  assert.equal(theirs.code, 1);
  assert.match(theirs.stderr, /Preventing invalid write on metadata \(overlaps with refcount table\)/);
  const ours = await snapstack(["img", "snapshot", "-c", "s", "img.qcow2"], { cwd: dir });
  assertCodedError(ours, "E_CORRUPT_IMAGE", 1);
  assert.ok(readFileSync(path).equals(readFileSync(join(dir, "theirs.qcow2"))), "the same bytes as qemu-img's file: the corrupt bit set, nothing overwritten");
});

test("E_CORRUPT_IMAGE: snapshot -c over an L2 table in use whose refcount is 0 is refused before the snapshot exists, as qemu-img refuses it", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = join(dir, "img.qcow2");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "img.qcow2", "4M"], dir), "create");
  ok(await qemuIo(["-c", "write -q -P 1 0 1M", "img.qcow2"], dir), "write");
  ok(await qemuImg(["snapshot", "-c", "first", "img.qcow2"], dir), "snapshot");
  ok(await qemuIo(["-c", "write -q -P 2 0 512k", "img.qcow2"], dir), "rewrite: the active L2 table is copied, refcount 1");
  const clusterBytes = 4096n;
  const l2Offset = peekU64(path, Number(peekU64(path, HEADER_L1_TABLE_OFFSET))) & 0x00fffffffffffe00n;
  const refblock = peekU64(path, Number(peekU64(path, HEADER_REFCOUNT_TABLE_OFFSET)));
  poke(path, Number(refblock + (l2Offset / clusterBytes) * 2n), Uint8Array.of(0, 0)); // 16-bit refcount 0
  copyFileSync(path, join(dir, "theirs.qcow2"));
  assert.equal((await qemuImg(["snapshot", "-c", "two", "theirs.qcow2"], dir)).code, 1, "qemu-img refuses");
  assertCodedError(await snapstack(["img", "snapshot", "-c", "two", "img.qcow2"], { cwd: dir }), "E_CORRUPT_IMAGE", 1);
  const list = ok(await qemuImg(["snapshot", "-l", "-U", "img.qcow2"], dir), "list").stdout;
  assert.ok(list.includes("first") && !list.includes("two"), list);
});

test("E_CORRUPT_IMAGE: an L1 entry pointing at an unaligned L2 table", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir);
  const l1Offset = Number(peekU64(path, HEADER_L1_TABLE_OFFSET));
  poke(path, l1Offset, u64(peekU64(path, l1Offset) + 0x200n));
  await refused(dir, ["io", "-r", "-c", "read 0 4k", "img.qcow2"], "E_CORRUPT_IMAGE", [path]);
  // Opened read-only, nothing is marked, and the message says so (qcow2_signal_corruption's wording).
  const readOnly = await snapstack(["io", "-r", "-c", "read 0 4k", "img.qcow2"], { cwd: dir });
  assert.match(readOnly.stderr, /qcow2: Image is corrupt: /);
  assert.doesNotMatch(readOnly.stderr, /Marking/);
});

test("E_IMAGE_MARKED_CORRUPT: writing to an image with the corrupt bit", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir);
  poke(path, HEADER_INCOMPATIBLE_FEATURES, u64(peekU64(path, HEADER_INCOMPATIBLE_FEATURES) | 2n));
  await refused(dir, ["io", "-c", "write 0 4k", "img.qcow2"], "E_IMAGE_MARKED_CORRUPT", [path]);
  // commit opens the overlay read-write even with -d or -b, as qemu-img: nothing is committed
  // from an image QEMU marked corrupt, into its backing file or a base further down.
  poke(path, HEADER_INCOMPATIBLE_FEATURES, u64(peekU64(path, HEADER_INCOMPATIBLE_FEATURES) & ~2n));
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "base.qcow2", "1M"], dir), "base");
  ok(await qemuImg(["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2"], dir), "rebase -u");
  poke(path, HEADER_INCOMPATIBLE_FEATURES, u64(peekU64(path, HEADER_INCOMPATIBLE_FEATURES) | 2n));
  for (const args of [["commit", "-d"], ["commit", "-b", "base.qcow2"], ["commit"]]) {
    await refused(dir, ["img", ...args, "img.qcow2"], "E_IMAGE_MARKED_CORRUPT", [path, join(dir, "base.qcow2")]);
  }
});

test("E_ENCRYPTED: a LUKS-encrypted qcow2", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  await createLuksImage(dir, "enc.qcow2");
  await refused(dir, ["io", "-r", "-c", "read 0 4k", "enc.qcow2"], "E_ENCRYPTED", [join(dir, "enc.qcow2")]);
});

test("E_READ_ONLY: a write on an image opened with -r", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir);
  await refused(dir, ["io", "-r", "-c", "write 0 4k", "img.qcow2"], "E_READ_ONLY", [path]);
});

test("E_BACKING_MISSING: an overlay whose backing file is gone", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await image(t, dir, "base.qcow2");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"], dir), "overlay");
  rmSync(join(dir, "base.qcow2"));
  const top = join(dir, "top.qcow2");
  await refused(dir, ["img", "map", "top.qcow2"], "E_BACKING_MISSING", [top]);
  await refused(dir, ["io", "-c", "write 0 4k", "top.qcow2"], "E_BACKING_MISSING", [top]);
  await refused(dir, ["img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "new.qcow2"], "E_BACKING_MISSING", []);
  // A missing new backing file for rebase: named once after the prefix, as qemu-img names it.
  await image(t, dir, "solo.qcow2");
  const ours = await snapstack(["img", "rebase", "-b", "gone.qcow2", "-F", "qcow2", "solo.qcow2"], { cwd: dir });
  const theirs = await qemuImg(["rebase", "-b", "gone.qcow2", "-F", "qcow2", "solo.qcow2"], dir);
  assertCodedError(ours, "E_NOT_FOUND");
  assert.equal(ours.stderr.replace(/^snapstack: error E_NOT_FOUND: /, ""), theirs.stderr.replace(/^qemu-img: /, ""));
});

test("E_BACKING_LOOP: two images backing each other", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", "1M"], dir), "a");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", "1M"], dir), "b");
  await refused(dir, ["img", "info", "--backing-chain", "a.qcow2"], "E_BACKING_LOOP", [join(dir, "a.qcow2"), join(dir, "b.qcow2")]);
  await refused(dir, ["io", "-c", "write 0 4k", "a.qcow2"], "E_BACKING_LOOP", [join(dir, "a.qcow2"), join(dir, "b.qcow2")]);
});

test("E_IN_USE / E_BACKING_LOOP: an output that is also an input (convert onto its source or the source's backing, create and rebase onto itself) is refused before anything is written", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const base = await image(t, dir, "base.qcow2");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"], dir), "overlay");
  const top = join(dir, "top.qcow2");
  // qemu-img refuses these with its image locks; before, snapstack truncated the file it was reading and exited 0.
  await refused(dir, ["img", "convert", "-O", "qcow2", "base.qcow2", "base.qcow2"], "E_IN_USE", [base]);
  await refused(dir, ["img", "convert", "-f", "qcow2", "-O", "raw", "base.qcow2", "./base.qcow2"], "E_IN_USE", [base]);
  await refused(dir, ["img", "convert", "-n", "-O", "qcow2", "base.qcow2", "base.qcow2"], "E_IN_USE", [base]);
  await refused(dir, ["img", "convert", "-O", "qcow2", "top.qcow2", "base.qcow2"], "E_IN_USE", [base, top]);
  await refused(dir, ["img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "base.qcow2"], "E_BACKING_LOOP", [base]);
  await refused(dir, ["img", "create", "-f", "qcow2", "-b", "./new.qcow2", "-F", "qcow2", "new.qcow2", "1M"], "E_BACKING_LOOP", []);
  assert.ok(!existsSync(join(dir, "new.qcow2")));
  await refused(dir, ["img", "rebase", "-b", "base.qcow2", "-F", "qcow2", "base.qcow2"], "E_BACKING_LOOP", [base]);
  await refused(dir, ["img", "rebase", "-b", "top.qcow2", "-F", "qcow2", "base.qcow2"], "E_BACKING_LOOP", [base, top]);
  ok(await qemuImg(["check", "-q", "top.qcow2"], dir), "check");
  ok(await qemuIo(["-c", "read -P 0xab 0 64k", "top.qcow2"], dir), "data intact");
});

/** Run qemu-io interactively on `args` until the returned stop() is called; resolves once its locks are in /proc/locks. */
async function qemuIoHolding(dir: string, args: string[], image: string): Promise<() => Promise<void>> {
  const child = spawn("qemu-io", args, { cwd: dir, stdio: ["pipe", "ignore", "ignore"] });
  const exited = new Promise<void>((resolve) => child.on("exit", () => resolve()));
  const key = fileKey(image) ?? "";
  // Read fresh each time (readProcLocks reuses a look for a second).
  const locked = (): boolean => parseProcLocks(readFileSync("/proc/locks", "utf8")).has(key);
  for (let tries = 0; tries < 500 && !locked(); tries++) await new Promise((resolve) => setTimeout(resolve, 10));
  assert.ok(locked(), "qemu-io took its locks");
  return async () => {
    child.stdin.end("quit\n");
    await exited;
  };
}

test("E_IN_USE: an image a QEMU uses, as qemu-img refuses it: no write while QEMU reads or writes it, no read while it writes unless -U", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-b", "img.qcow2", "-F", "qcow2", "top.qcow2"], dir), "overlay");
  const top = join(dir, "top.qcow2");
  let stop = await qemuIoHolding(dir, ["img.qcow2"], path);
  try {
    await refused(dir, ["io", "-c", "write 0 4k", "img.qcow2"], "E_IN_USE", [path]);
    await refused(dir, ["img", "snapshot", "-c", "s", "img.qcow2"], "E_IN_USE", [path]);
    await refused(dir, ["img", "remove", "--wipe", "img.qcow2"], "E_IN_USE", [path]);
    await refused(dir, ["img", "info", "img.qcow2"], "E_IN_USE", [path]);
    await refused(dir, ["img", "check", "img.qcow2"], "E_IN_USE", [path]);
    // Through a backing chain too: the overlay is free, its backing file is not.
    await refused(dir, ["img", "map", "top.qcow2"], "E_IN_USE", [path, top]);
    ok(await snapstack(["img", "info", "-U", "img.qcow2"], { cwd: dir }), "info -U");
    ok(await snapstack(["img", "check", "-U", "img.qcow2"], { cwd: dir }), "check -U");
    ok(await snapstack(["io", "-r", "-U", "-c", "read -P 0xab 0 64k", "img.qcow2"], { cwd: dir }), "io -r -U");
  } finally {
    await stop();
  }
  // A QEMU that only reads (qemu-io -r) refuses writers, not readers.
  stop = await qemuIoHolding(dir, ["-r", "img.qcow2"], path);
  try {
    await refused(dir, ["img", "commit", "top.qcow2"], "E_IN_USE", [path, top]);
    ok(await snapstack(["img", "map", "top.qcow2"], { cwd: dir }), "map");
  } finally {
    await stop();
  }
  ok(await snapstack(["io", "-c", "write -P 0xcd 0 4k", "img.qcow2"], { cwd: dir }), "write once QEMU is gone");
});

test("a backing file name that starts with NUL is no backing file (as QEMU reads it: a C string)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await image(t, dir, "base.qcow2");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"], dir), "overlay");
  const top = join(dir, "top.qcow2");
  // backing_file_offset = 8: the name starts at the offset field itself, whose first byte is 0.
  poke(top, 8, u64(8n));
  ok(await qemuIo(["-c", "read -P 0 0 64k", "top.qcow2"], dir), "qemu-io reads zeroes, no backing");
  ok(await snapstack(["io", "-c", "read -P 0 0 64k", "top.qcow2"], { cwd: dir }), "snapstack reads zeroes");
  const info = ok(await snapstack(["img", "info", "--output=json", "top.qcow2"], { cwd: dir }), "info");
  assert.equal(JSON.parse(info.stdout)["backing-filename"], undefined);
});

test("E_CHAIN_TOO_DEEP: a chain of 1,100 images", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  const layers = 1100;
  const name = (index: number): string => `l${String(index).padStart(5, "0")}.qcow2`;
  ok(await qemuImg(["create", "-q", "-f", "qcow2", name(0), "1M"], dir), "bottom");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-u", "-b", name(0), "-F", "qcow2", "template.qcow2", "1M"], dir), "template");
  const template = readFileSync(join(dir, "template.qcow2"));
  const nameOffset = Number(template.readBigUInt64BE(8));
  for (let index = 1; index <= layers; index++) {
    const bytes = Buffer.from(template);
    bytes.write(name(index - 1), nameOffset, "latin1");
    writeFileSync(join(dir, name(index)), bytes);
  }
  await refused(dir, ["img", "info", "--backing-chain", name(layers)], "E_CHAIN_TOO_DEEP", [join(dir, name(layers))]);
});

test("E_BACKING_FORMAT: -b without -F", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir, "base.qcow2");
  await refused(dir, ["img", "create", "-f", "qcow2", "-b", "base.qcow2", "new.qcow2"], "E_BACKING_FORMAT", [path]);
  await refused(dir, ["img", "create", "-f", "qcow2", "-o", "backing_file=base.qcow2", "new.qcow2"], "E_BACKING_FORMAT", [path]);
  await refused(dir, ["img", "convert", "-O", "qcow2", "-B", "base.qcow2", "base.qcow2", "out.qcow2"], "E_BACKING_FORMAT", [path]);
  // An empty backing name is refused as qemu-img refuses it ("Expected backing file name, got empty string").
  await refused(dir, ["img", "create", "-f", "qcow2", "-b", "", "-F", "qcow2", "new.qcow2", "1M"], "E_INVALID_OPTION", []);
  await refused(dir, ["img", "create", "-f", "qcow2", "-o", "backing_file=,backing_fmt=qcow2", "new.qcow2", "1M"], "E_INVALID_OPTION", []);
  assert.ok(!existsSync(join(dir, "new.qcow2")) && !existsSync(join(dir, "out.qcow2")));
});

test("E_PATTERN_MISMATCH: read -P on other data", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await image(t, dir);
  await refused(dir, ["io", "-c", "read -P 0x12 0 4k", "img.qcow2"], "E_PATTERN_MISMATCH", [path]);
  // -s past the data read leaves nothing to verify: an error, as qemu-io's, not a pass.
  await refused(dir, ["io", "-c", "read -s 5000 -P 0x12 0 4k", "img.qcow2"], "E_USAGE", [path]);
});

test("E_COMPRESSION: a damaged compressed cluster", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "c.qcow2", "1M"], dir), "create");
  ok(await qemuIo(["-c", "write -c -P 0x31 0 64k", "c.qcow2"], dir), "compressed write");
  const path = join(dir, "c.qcow2");
  const l1Offset = Number(peekU64(path, HEADER_L1_TABLE_OFFSET));
  const l2Offset = Number(peekU64(path, l1Offset) & 0x00fffffffffffe00n);
  const descriptor = peekU64(path, l2Offset);
  assert.equal(descriptor >> 62n, 1n, "L2 entry 0 is compressed");
  const dataOffset = Number(descriptor & ((1n << 54n) - 1n));
  poke(path, dataOffset, Buffer.alloc(64, 0xff));
  await refused(dir, ["io", "-r", "-c", "read 0 4k", "c.qcow2"], "E_COMPRESSION", [path]);
});
