/**
 * VDI (VirtualBox) images, read-only, against qemu-img 7.2 on the same
 * files: dynamic and static images made by qemu-img (create + qemu-io
 * writes, convert from data). info and map (JSON and human), check,
 * compare and a convert to qcow2 must agree with qemu-img; damaged block
 * maps give qemu-img's check lines and exit status; images QEMU does not
 * open (a differencing image's parent UUID, another block size) are
 * refused with its message; writing is refused, the file untouched.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { writeScatteredDisk } from "../helpers/random.ts";
import { assertCodedError, readOnlyFormatImage, assertConvertsToEqualQcow2, assertReportsLikeQemuImg, ok, qemuImg, qemuIo, snapstack } from "./cli-helpers.ts";

test("vdi images made by qemu-img: info, map, check, compare and convert agree with qemu-img, damaged block maps too", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  writeScatteredDisk(join(dir, "source.raw"), 12 * 1024 * 1024 + 1536, 99);
  const images: string[] = [];
  for (const options of ["static=off", "static=on"]) {
    const name = `converted-${options.replace("=", "-")}.vdi`;
    ok(await qemuImg(["convert", "-f", "raw", "-O", "vdi", "-o", options, "source.raw", name], dir), `convert ${options}`);
    const written = `written-${options.replace("=", "-")}.vdi`;
    ok(await qemuImg(["create", "-q", "-f", "vdi", "-o", options, written, "64M"], dir), `create ${options}`);
    ok(await qemuIo(["-f", "vdi", "-c", "write -P 7 1M 300k", "-c", "write -z 8M 64k", "-c", "write -P 3 40M 1M", written], dir), `write ${options}`);
    images.push(name, written);
  }
  // Damaged block maps (qemu-img check: "also used by", "too large", "allocated blocks mismatch").
  const base = readFileSync(join(dir, "written-static-off.vdi"));
  const mapOffset = base.readUInt32LE(340);
  const damage: Array<[string, (bytes: Buffer) => void]> = [
    ["twice.vdi", (bytes) => bytes.writeUInt32LE(bytes.readUInt32LE(mapOffset + 4), mapOffset + 8 * 4)],
    ["large.vdi", (bytes) => bytes.writeUInt32LE(999, mapOffset + 8 * 4)],
    ["count.vdi", (bytes) => bytes.writeUInt32LE(9, 388)],
  ];
  for (const [name, change] of damage) {
    const bytes = Buffer.from(base);
    change(bytes);
    writeFileSync(join(dir, name), bytes);
  }
  for (const image of [...images, ...damage.map(([name]) => name)]) {
    await assertReportsLikeQemuImg(dir, image);
    const theirs = await qemuImg(["check", image], dir);
    const ours = await snapstack(["img", "check", image], { cwd: dir });
    assert.equal(ours.stderr, theirs.stderr, `check ${image}: the lines naming the damage`);
  }
  for (const image of images) await assertConvertsToEqualQcow2(dir, image);
  ok(await snapstack(["img", "compare", "-F", "raw", "converted-static-on.vdi", "source.raw"], { cwd: dir }), "the converted image reads as its source");
});

test("vdi is read-only; images QEMU does not open are refused with its message", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const before = await readOnlyFormatImage(dir, "vdi", "disk.vdi");
  assertCodedError(await snapstack(["img", "check", "-r", "leaks", "disk.vdi"], { cwd: dir }), "E_UNSUPPORTED_FEATURE", 63);
  assert.ok(readFileSync(join(dir, "disk.vdi")).equals(before), "a refused command changed the vdi");
  const create = await snapstack(["img", "convert", "-O", "vdi", "disk.vdi", "copy.vdi"], { cwd: dir });
  assertCodedError(create, "E_UNSUPPORTED_FEATURE");
  assert.match(create.stderr, /reads vdi images but does not write them/);
  // A block map far past the end of the file: refused before its 1.6 GB are allocated.
  const huge = Buffer.from(before);
  huge.writeUInt32LE(400_000_000, 384);
  writeFileSync(join(dir, "huge.vdi"), huge);
  const hugeMap = await snapstack(["img", "info", "huge.vdi"], { cwd: dir });
  assertCodedError(hugeMap, "E_CORRUPT_IMAGE");
  assert.match(hugeMap.stderr, /block map .* past the end of the file/);
  const variants: Array<[string, (bytes: Buffer) => void]> = [
    ["parent.vdi", (bytes) => bytes.fill(0x11, 440, 456)],
    ["block.vdi", (bytes) => bytes.writeUInt32LE(2 * 1024 * 1024, 376)],
    ["version.vdi", (bytes) => bytes.writeUInt32LE(0x00010000, 68)],
  ];
  for (const [name, change] of variants) {
    const bytes = Buffer.from(before);
    change(bytes);
    writeFileSync(join(dir, name), bytes);
    const theirs = await qemuImg(["info", name], dir);
    const ours = await snapstack(["img", "info", name], { cwd: dir });
    assertCodedError(ours, "E_UNSUPPORTED_FEATURE");
    assert.equal(ours.stderr.replace(/^snapstack: error E_UNSUPPORTED_FEATURE: /, ""), theirs.stderr.replace(/^qemu-img: /, ""), name);
  }
});
