/**
 * VHDX (Hyper-V) images, read-only, against qemu-img 7.2 on the same
 * files: dynamic (default and 1 MiB blocks) and fixed disks made by
 * qemu-img (create + qemu-io writes, convert from data). info, map, check,
 * compare and a convert to qcow2 must agree with qemu-img; damaged headers
 * and truncated files get coded errors; an image whose log may hold
 * unapplied writes is refused; writing is refused, the file untouched.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { writeScatteredDisk } from "../helpers/random.ts";
import { crc32c } from "../../src/formats/vhdx/vhdx-format.ts";
import { assertCodedError, readOnlyFormatImage, assertConvertsToEqualQcow2, assertReportsLikeQemuImg, assertSameAsQemuImg, ok, qemuImg, qemuIo, snapstack } from "./cli-helpers.ts";

test("vhdx images made by qemu-img: info, map, check, compare and convert agree with qemu-img", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  writeScatteredDisk(join(dir, "source.raw"), 20 * 1024 * 1024, 31337);
  ok(await qemuImg(["convert", "-f", "raw", "-O", "vhdx", "source.raw", "converted.vhdx"], dir), "convert");
  ok(await qemuImg(["convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M", "source.raw", "converted-1m.vhdx"], dir), "convert, 1 MiB blocks");
  const images = ["converted.vhdx", "converted-1m.vhdx"];
  for (const [name, options] of [
    ["dynamic.vhdx", "subformat=dynamic"],
    ["small-blocks.vhdx", "block_size=1M,log_size=1M"],
    ["fixed.vhdx", "subformat=fixed"],
  ]) {
    ok(await qemuImg(["create", "-q", "-f", "vhdx", "-o", options, name, "48M"], dir), `create ${name}`);
    ok(await qemuIo(["-f", "vhdx", "-c", "write -P 7 1M 300k", "-c", "write -z 8M 64k", "-c", "write -P 3 40M 1M", name], dir), `write ${name}`);
    images.push(name);
  }
  for (const image of images) {
    await assertReportsLikeQemuImg(dir, image);
    await assertConvertsToEqualQcow2(dir, image);
  }
  ok(await snapstack(["img", "compare", "-F", "raw", "converted-1m.vhdx", "source.raw"], { cwd: dir }), "the converted image reads as its source");
});

test("vhdx is read-only; damaged headers, truncated files and pending logs get coded errors", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const before = await readOnlyFormatImage(dir, "vhdx", "disk.vhdx", ["-o", "block_size=1M"], "write -P 7 1M 3M");
  assert.ok(readFileSync(join(dir, "disk.vhdx")).equals(before), "a refused command changed the vhdx");
  const target = await snapstack(["img", "convert", "-O", "vhdx", "disk.vhdx", "copy.vhdx"], { cwd: dir });
  assertCodedError(target, "E_UNSUPPORTED_FEATURE");
  assert.match(target.stderr, /reads vhdx images but does not write them/);

  // Both headers damaged.
  const headers = Buffer.from(before);
  headers[64 * 1024 + 20] ^= 1;
  headers[128 * 1024 + 20] ^= 1;
  writeFileSync(join(dir, "headers.vhdx"), headers);
  const noHeader = await snapstack(["img", "info", "headers.vhdx"], { cwd: dir });
  assertCodedError(noHeader, "E_CORRUPT_IMAGE");
  assert.match(noHeader.stderr, /No valid VHDX header found/);
  assert.notEqual((await qemuImg(["info", "headers.vhdx"], dir)).code, 0, "qemu-img refuses it too");

  // Truncated: the last payload block is gone.
  writeFileSync(join(dir, "truncated.vhdx"), before.subarray(0, before.length - 1024 * 1024));
  const truncated = await snapstack(["img", "info", "truncated.vhdx"], { cwd: dir });
  assertCodedError(truncated, "E_CORRUPT_IMAGE");
  assert.match(truncated.stderr, /points after end of file/);
  assert.notEqual((await qemuImg(["info", "truncated.vhdx"], dir)).code, 0, "qemu-img refuses it too");
  // check counts it as a corruption with qemu-img's line and exit status (it opens the image for the check).
  // Cut inside a block, then cut short of a whole sector (which QEMU rounds up to 512 bytes: it still opens).
  writeFileSync(join(dir, "cut.vhdx"), before.subarray(0, before.length - 500_000));
  for (const command of [["check"], ["check", "--output=json"]]) {
    const theirs = await qemuImg([...command, "cut.vhdx"], dir);
    const ours = await snapstack(["img", ...command, "cut.vhdx"], { cwd: dir });
    assert.equal(theirs.code, 2, `qemu-img ${command.join(" ")}: ${theirs.stderr}`);
    assert.equal(ours.code, theirs.code, `${command.join(" ")}: ${ours.stderr}`);
    assert.equal(ours.stdout, theirs.stdout, command.join(" "));
    assert.equal(ours.stderr.replace(/^snapstack: /, "qemu-img: "), theirs.stderr, command.join(" "));
  }
  assert.match((await snapstack(["img", "info", "cut.vhdx"], { cwd: dir })).stderr, /VHDX BAT entry \d+ end offset \d+ points after end of file/);
  writeFileSync(join(dir, "cut-sector.vhdx"), before.subarray(0, before.length - 300));
  assert.equal((await qemuImg(["info", "cut-sector.vhdx"], dir)).code, 0, "qemu-img opens a vhdx short of less than a sector");
  await assertSameAsQemuImg(dir, ["info", "--output=json", "cut-sector.vhdx"], "a vhdx short of less than a sector");

  // A log GUID in both headers (checksums made right): the log may hold writes not yet applied.
  const logged = Buffer.from(before);
  for (const at of [64 * 1024, 128 * 1024]) {
    logged.fill(0x5a, at + 48, at + 64);
    logged.writeUInt32LE(0, at + 4);
    logged.writeUInt32LE(crc32c(logged.subarray(at, at + 4096)), at + 4);
  }
  writeFileSync(join(dir, "logged.vhdx"), logged);
  const log = await snapstack(["img", "info", "logged.vhdx"], { cwd: dir });
  assertCodedError(log, "E_UNSUPPORTED_FEATURE");
  assert.match(log.stderr, /log/);
});
