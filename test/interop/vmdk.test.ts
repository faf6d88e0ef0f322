/**
 * vmdk images, read-only, against qemu-img 7.2 on the same files: every
 * subformat qemu-img creates (sparse, stream-optimized, flat, split), made
 * the way such disks arrive (qemu-img convert from data, qemu-io writes,
 * zeroed grains, a size that ends inside a grain). info and map (JSON and
 * human), check, compare and a convert to qcow2 must agree with qemu-img;
 * writing is refused, the file untouched; damage is reported with a coded
 * error; a qcow2 overlay over a vmdk reads and writes through.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, run, scratchDir } from "../helpers/tools.ts";
import { writeScatteredDisk } from "../helpers/random.ts";
import { assertCodedError, readOnlyFormatImage, assertConvertsToEqualQcow2, assertReportsLikeQemuImg, assertSameAsQemuImg, ok, qemuImg, qemuIo, snapstack } from "./cli-helpers.ts";

const SUBFORMATS = ["monolithicSparse", "streamOptimized", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"];


test("vmdk subformats made by qemu-img: info, map, check, compare and convert agree with qemu-img", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  // 9 MiB + 3 KiB: the last 64 KiB grain is partial (stream-optimized stores it short).
  const sizeBytes = 9 * 1024 * 1024 + 3 * 1024;
  writeScatteredDisk(join(dir, "source.raw"), sizeBytes, 4242, 24);
  const images: string[] = [];
  for (const subformat of SUBFORMATS) {
    // As disks arrive: converted from data (an OVA's stream-optimized disk, an exported flat disk).
    const converted = `${subformat}.vmdk`;
    ok(await qemuImg(["convert", "-f", "raw", "-O", "vmdk", "-o", `subformat=${subformat}`, "source.raw", converted], dir), `convert to ${subformat}`);
    images.push(converted);
  }
  // Written in place by qemu-io: partial grains, zeroes as zeroed grains (zeroed_grain=on) and as data.
  for (const [name, options] of [
    ["written.vmdk", "subformat=monolithicSparse"],
    ["zeroed.vmdk", "subformat=monolithicSparse,zeroed_grain=on"],
    ["flat-written.vmdk", "subformat=monolithicFlat"],
  ]) {
    ok(await qemuImg(["create", "-q", "-f", "vmdk", "-o", options, name, "16M"], dir), `create ${name}`);
    ok(await qemuIo(["-f", "vmdk", "-c", "write -P 7 1M 300k", "-c", "write -z 8M 128k", "-c", "write -P 9 8200k 4k", "-c", "write -P 3 15M 1M", name], dir), `write ${name}`);
    images.push(name);
  }
  for (const image of images) {
    await assertReportsLikeQemuImg(dir, image);
    await assertConvertsToEqualQcow2(dir, image);
    ok(await snapstack(["img", "convert", "-O", "raw", image, "out.raw"], { cwd: dir }), `convert ${image} to raw`);
    ok(await qemuImg(["compare", "-f", "vmdk", "-F", "raw", image, "out.raw"], dir), `qemu-img compare ${image} with snapstack's raw`);
  }
  for (const image of images.slice(0, SUBFORMATS.length)) {
    ok(await snapstack(["img", "compare", "-F", "raw", image, "source.raw"], { cwd: dir }), `compare ${image} with its source`);
  }
  // A compressed grain past the stored data of the short last grain: the image's last byte reads back.
  const tail = ok(await snapstack(["io", "-r", "-c", `read -v ${sizeBytes - 16} 16`, "streamOptimized.vmdk"], { cwd: dir }), "read the last bytes").stdout;
  const theirTail = ok(await qemuIo(["-r", "-c", `read -v ${sizeBytes - 16} 16`, "streamOptimized.vmdk"], dir), "qemu-io read the last bytes").stdout;
  assert.equal(tail.split("\n")[0], theirTail.split("\n")[0]);
});

test("vmdk is read-only: writers refuse it, the file untouched; damaged and unsupported images get coded errors", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const before = await readOnlyFormatImage(dir, "vmdk", "disk.vmdk");
  assertCodedError(await snapstack(["img", "snapshot", "-c", "s", "disk.vmdk"], { cwd: dir }), "E_READ_ONLY");
  assertCodedError(await snapstack(["img", "check", "-r", "all", "disk.vmdk"], { cwd: dir }), "E_UNSUPPORTED_FEATURE", 63);
  assert.ok(readFileSync(join(dir, "disk.vmdk")).equals(before), "a refused command changed the vmdk");
  for (const args of [
    ["create", "-f", "vmdk", "new.vmdk", "1M"],
    ["convert", "-O", "vmdk", "disk.vmdk", "new.vmdk"],
    ["measure", "-O", "vmdk", "--size", "1G"],
  ]) {
    const result = await snapstack(["img", ...args], { cwd: dir });
    assertCodedError(result, "E_UNSUPPORTED_FEATURE");
    assert.match(result.stderr, /reads vmdk images but does not write them/);
  }

  // A grain table entry pointing past the end of the file: qemu-img check's line and failure.
  const damaged = Buffer.from(before);
  const gdSector = Number(damaged.readBigUInt64LE(56));
  const gtSector = damaged.readUInt32LE(gdSector * 512);
  damaged.writeUInt32LE(0x100000, gtSector * 512 + 16 * 4); // the grain at 1 MiB
  writeFileSync(join(dir, "damaged.vmdk"), damaged);
  const theirs = await qemuImg(["check", "damaged.vmdk"], dir);
  const ours = await snapstack(["img", "check", "damaged.vmdk"], { cwd: dir });
  assert.equal(ours.code, theirs.code);
  assert.equal(ours.stderr.split("\n")[0], theirs.stderr.split("\n")[0]);
  assert.match(ours.stderr, /E_IO: Check failed: Invalid argument/);

  // A compressed grain whose data does not inflate.
  writeFileSync(join(dir, "source.raw"), new Uint8Array(1024 * 1024).fill(0x33));
  ok(await qemuImg(["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "source.raw", "stream.vmdk"], dir), "convert");
  const stream = readFileSync(join(dir, "stream.vmdk"));
  const grainSector = Number(stream.readBigUInt64LE(64)); // the first grain follows the metadata
  stream.fill(0xff, grainSector * 512 + 12, grainSector * 512 + 40);
  writeFileSync(join(dir, "broken-stream.vmdk"), stream);
  assertCodedError(await snapstack(["img", "convert", "-O", "raw", "broken-stream.vmdk", "broken.raw"], { cwd: dir }), "E_COMPRESSION");
  assert.notEqual((await qemuImg(["convert", "-O", "raw", "broken-stream.vmdk", "broken-q.raw"], dir)).code, 0, "qemu-img refuses it too");

  // An extent line without its closing quote: sscanf still reads the name, so a SPARSE extent opens
  // (it used to be skipped: a 0-byte disk that converted to an empty file); a FLAT one lacks its offset.
  ok(await qemuImg(["create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "unquoted.vmdk", "64M"], dir), "create split sparse");
  ok(await qemuIo(["-f", "vmdk", "-c", "write -P 0x11 0 1M", "unquoted.vmdk"], dir), "write it");
  const unquoted = readFileSync(join(dir, "unquoted.vmdk"), "latin1");
  assert.ok(unquoted.includes('SPARSE "unquoted-s001.vmdk"'), "the descriptor names its extent");
  writeFileSync(join(dir, "unquoted.vmdk"), unquoted.replace('SPARSE "unquoted-s001.vmdk"', 'SPARSE "unquoted-s001.vmdk'), "latin1");
  await assertSameAsQemuImg(dir, ["info", "--output=json", "unquoted.vmdk"], "info of an extent line without its closing quote");
  await assertConvertsToEqualQcow2(dir, "unquoted.vmdk");
  ok(await qemuImg(["create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", "unquoted-flat.vmdk", "64M"], dir), "create split flat");
  const flat = readFileSync(join(dir, "unquoted-flat.vmdk"), "latin1");
  writeFileSync(join(dir, "unquoted-flat.vmdk"), flat.replace('FLAT "unquoted-flat-f001.vmdk" 0', 'FLAT "unquoted-flat-f001.vmdk'), "latin1");
  assert.match((await qemuImg(["info", "unquoted-flat.vmdk"], dir)).stderr, /Invalid extent line/);
  const flatInfo = await snapstack(["img", "info", "unquoted-flat.vmdk"], { cwd: dir });
  assertCodedError(flatInfo, "E_CORRUPT_IMAGE");
  assert.match(flatInfo.stderr, /Invalid extent line: RW 131072 FLAT "unquoted-flat-f001\.vmdk$/m);

  // sscanf's whitespace: none needed between a number and a word, and newlines count as whitespace.
  writeFileSync(join(dir, "flat.bin"), Buffer.alloc(1024 * 1024, 0x5c));
  const flatDescriptor = (extent: string): string => `# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n${extent}\n`;
  for (const [name, extent] of [
    ["glued.vmdk", 'RW 2048FLAT "flat.bin" 0'],
    ["wrapped.vmdk", 'RW 2048 FLAT\n"flat.bin" 0'],
    ["offset-below.vmdk", 'RW 2048 FLAT "flat.bin"\r\n0'],
  ]) {
    writeFileSync(join(dir, name), flatDescriptor(extent));
    await assertSameAsQemuImg(dir, ["info", "--output=json", name], `info of the extent line ${JSON.stringify(extent)}`);
  }

  // Linked clones and create types QEMU does not open.
  ok(await qemuImg(["create", "-q", "-f", "vmdk", "-b", "disk.vmdk", "-F", "vmdk", "clone.vmdk"], dir), "create a linked clone");
  const clone = await snapstack(["img", "info", "clone.vmdk"], { cwd: dir });
  assertCodedError(clone, "E_UNSUPPORTED_FEATURE");
  assert.match(clone.stderr, /parentFileNameHint/);
  writeFileSync(join(dir, "custom.vmdk"), '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="custom"\n\nRW 2048 FLAT "disk-flat.vmdk" 0\n');
  const custom = await snapstack(["img", "info", "custom.vmdk"], { cwd: dir });
  assertCodedError(custom, "E_UNSUPPORTED_FEATURE");
  assert.match(custom.stderr, /Unsupported image type 'custom'/);
  assert.match((await qemuImg(["info", "custom.vmdk"], dir)).stderr, /Unsupported image type 'custom'/);
});

test("vmdk descriptors with several files: maps name and split by file, holes of every flat extent, UTF-8 names, mixed extents; remove keeps descriptors and extents together", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  // 5 GiB split in three 2 GiB flat files (qemu-img's own subformat): every file's holes show.
  ok(await qemuImg(["create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", "split.vmdk", "5G"], dir), "create split");
  ok(await qemuIo(["-f", "vmdk", "-c", "write -P 1 100M 1M", "-c", "write -P 2 2100M 1M", "-c", "write -P 3 4500M 1M", "split.vmdk"], dir), "write split");
  // Two flat files whose host offsets line up with the guest's: not one run (qemu-img compares the files).
  writeFileSync(join(dir, "flat-a.bin"), Buffer.alloc(100 * 512, 0x61));
  writeFileSync(join(dir, "flat-é.bin"), Buffer.alloc(200 * 512, 0x62));
  ok(await qemuImg(["create", "-q", "-f", "vmdk", "sparse-part.vmdk", "1M"], dir), "a sparse extent file");
  ok(await qemuIo(["-f", "vmdk", "-c", "write -P 9 64k 64k", "sparse-part.vmdk"], dir), "write it");
  const descriptor = (extents: string): string => `# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n${extents}\n`;
  writeFileSync(join(dir, "contig.vmdk"), descriptor('RW 100 FLAT "flat-a.bin" 0\nRW 100 FLAT "flat-é.bin" 100'));
  writeFileSync(join(dir, "mixed.vmdk"), descriptor('RW 100 FLAT "flat-a.bin" 0\nRW 2048 SPARSE "sparse-part.vmdk"'));
  for (const image of ["split.vmdk", "contig.vmdk", "mixed.vmdk"]) {
    for (const command of [["info", "--output=json"], ["map", "--output=json"], ["map"]]) await assertSameAsQemuImg(dir, [...command, image], `${command.join(" ")} ${image}`);
  }
  await assertSameAsQemuImg(dir, ["measure", "-O", "qcow2", "split.vmdk"], "measure of the split image (its holes are holes)");
  ok(await snapstack(["img", "convert", "-O", "qcow2", "mixed.vmdk", "mixed.qcow2"], { cwd: dir }), "convert the mixed image");
  ok(await qemuImg(["compare", "mixed.vmdk", "mixed.qcow2"], dir), "compare the mixed image");

  // remove: an extent a descriptor uses is refused, and so is a descriptor whose data is elsewhere.
  const extentRemoved = await snapstack(["img", "remove", "flat-a.bin"], { cwd: dir });
  assertCodedError(extentRemoved, "E_IN_USE");
  assert.match(extentRemoved.stderr, /used as extent file by/);
  const descriptorRemoved = await snapstack(["img", "remove", "--wipe", "contig.vmdk"], { cwd: dir });
  assertCodedError(descriptorRemoved, "E_UNSUPPORTED_FEATURE");
  assert.match(descriptorRemoved.stderr, /extent file 'flat-a\.bin', which would be left behind/);
  assert.ok(readFileSync(join(dir, "flat-a.bin")).equals(Buffer.alloc(100 * 512, 0x61)), "the extent is untouched");
});

test("a qcow2 overlay over a vmdk: reads fall through to the vmdk, writes land in the overlay, as qemu-io sees them", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", "base.vmdk", "4M"], dir), "create");
  ok(await run("sh", ["-c", `cd '${dir}' && head -c 4194304 /dev/urandom > data.raw && qemu-img convert -f raw -O vmdk -o subformat=streamOptimized data.raw base.vmdk`]), "fill");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-b", "base.vmdk", "-F", "vmdk", "top.qcow2"], dir), "overlay");
  ok(await snapstack(["io", "-c", "write -P 9 1000k 100k", "top.qcow2"], { cwd: dir }), "write through snapstack");
  ok(await qemuIo(["-c", "read -P 9 1000k 100k", "top.qcow2"], dir), "qemu-io reads snapstack's write");
  ok(await qemuIo(["-f", "raw", "-c", "write -P 9 1000k 100k", "data.raw"], dir), "the same write on the raw model");
  ok(await qemuImg(["compare", "-F", "raw", "top.qcow2", "data.raw"], dir), "the overlay reads as the model");
  await assertSameAsQemuImg(dir, ["map", "--output=json", "top.qcow2"], "map of the overlay");
  ok(await qemuImg(["check", "top.qcow2"], dir), "check");
});
