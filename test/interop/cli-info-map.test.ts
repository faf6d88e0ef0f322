// snapstack img info / map vs qemu-img on images made by QEMU.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { FIXTURE_IMAGES, assertCodedError, buildFixtures, createLuksImage, ok, qemuImg, qemuIo, snapstack } from "./cli-helpers.ts";

/** actual-size depends on the file system's allocation, compared separately. */
function withoutActualSize(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(withoutActualSize);
  if (typeof value === "object" && value !== null) {
    return Object.fromEntries(Object.entries(value).filter(([key]) => key !== "actual-size").map(([key, item]) => [key, withoutActualSize(item)]));
  }
  return value;
}

test("info --output=json equals qemu-img's field by field (actual-size aside)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await buildFixtures(dir);
  for (const image of FIXTURE_IMAGES) {
    for (const extra of [[], ["--backing-chain"]]) {
      const args = ["info", "--output=json", ...extra, image];
      const ours = ok(await snapstack(["img", ...args], { cwd: dir }), `snapstack ${args.join(" ")}`);
      const theirs = ok(await qemuImg(args, dir), `qemu-img ${args.join(" ")}`);
      assert.deepEqual(withoutActualSize(JSON.parse(ours.stdout)), withoutActualSize(JSON.parse(theirs.stdout)), args.join(" "));
      // Same keys in the same printed order (QEMU's hash order).
      const keyLines = (text: string): string[] => text.split("\n").filter((line) => !line.includes('"actual-size"') && !/"date-(sec|nsec)"/.test(line));
      assert.deepEqual(keyLines(ours.stdout), keyLines(theirs.stdout), `${args.join(" ")} layout`);
    }
  }
});

test("info human output equals qemu-img's (disk size aside)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await buildFixtures(dir);
  const mask = (text: string): string => text.replace(/^disk size: .*$/gm, "disk size: X");
  for (const image of FIXTURE_IMAGES) {
    for (const extra of [[], ["--backing-chain"]]) {
      const args = ["info", ...extra, image];
      const ours = ok(await snapstack(["img", ...args], { cwd: dir }), `snapstack ${args.join(" ")}`);
      const theirs = ok(await qemuImg(args, dir), `qemu-img ${args.join(" ")}`);
      assert.equal(mask(ours.stdout), mask(theirs.stdout), args.join(" "));
    }
  }
});

/**
 * Raw files: qemu-img finds holes with lseek(SEEK_HOLE), which Node does not
 * expose, so snapstack maps a raw file as data throughout (src/formats/raw).
 */
const MAPPED_IMAGES = FIXTURE_IMAGES.filter((image) => !image.endsWith(".raw"));

test("map --output=json equals qemu-img's, also with --start-offset/--max-length", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await buildFixtures(dir);
  for (const image of MAPPED_IMAGES) {
    // The last ones reach past snapstack's 2^53 limit: "map everything" and a start past any image, as qemu-img takes them.
    for (const extra of [[], ["--start-offset=1M"], ["--start-offset=1M", "--max-length=4M"], ["--max-length", "5M"], ["--max-length=9223372036854775807"], ["--start-offset=7E"]]) {
      const args = ["map", "--output=json", ...extra, image];
      const ours = ok(await snapstack(["img", ...args], { cwd: dir }), `snapstack ${args.join(" ")}`);
      const theirs = ok(await qemuImg(args, dir), `qemu-img ${args.join(" ")}`);
      assert.equal(ours.stdout, theirs.stdout, args.join(" "));
    }
  }
});

test("map of a raw file whose size is not a multiple of 512: the bytes past its end are zero, as qemu-img maps them (alone and under an overlay)", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  writeFileSync(join(dir, "odd.raw"), Buffer.alloc(3000, 0x5a));
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-b", "odd.raw", "-F", "raw", "over.qcow2"], dir), "overlay");
  for (const args of [["map", "--output=json", "-f", "raw", "odd.raw"], ["map", "-f", "raw", "odd.raw"], ["map", "--output=json", "over.qcow2"], ["map", "over.qcow2"]]) {
    const ours = ok(await snapstack(["img", ...args], { cwd: dir }), `snapstack ${args.join(" ")}`);
    const theirs = ok(await qemuImg(args, dir), `qemu-img ${args.join(" ")}`);
    assert.equal(ours.stdout, theirs.stdout, args.join(" "));
  }
  assert.match(ok(await snapstack(["img", "map", "--output=json", "-f", "raw", "odd.raw"], { cwd: dir }), "map").stdout, /"start": 3000, "length": 72, "depth": 0, "present": true, "zero": true, "data": false, "offset": 3000/);
});

test("map human output equals qemu-img's, including the compressed-cluster failure", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await buildFixtures(dir);
  for (const image of MAPPED_IMAGES) {
    const ours = await snapstack(["img", "map", image], { cwd: dir });
    const theirs = await qemuImg(["map", image], dir);
    assert.equal(ours.stdout, theirs.stdout, image);
    assert.equal(ours.code, theirs.code, `${image} exit status`);
    if (theirs.code !== 0) assert.match(ours.stderr, /^snapstack: error E_UNSUPPORTED_FEATURE: File contains external, encrypted or compressed clusters\.\n$/);
  }
});

test("map on an image with a corrupt L2 entry prints what qemu-img prints before the error (human and JSON), then fails as it does", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  // 3 GiB: L2 table at 0x40000 (one table covers 512 MiB), data clusters from 0x50000 in write order.
  const cases: Array<{ name: string; writes: string[]; corruptCluster: number }> = [
    { name: "early.qcow2", writes: ["write -P 3 0 64k", "write -P 2 200M 64k", "write -P 2 300M 64k"], corruptCluster: 3200 },
    { name: "first.qcow2", writes: ["write -P 3 0 64k", "write -P 2 1M 64k"], corruptCluster: 0 },
    { name: "late.qcow2", writes: ["write -P 3 0 64k", "write -P 4 100M 128k", "write -P 2 400M 64k"], corruptCluster: 6400 },
  ];
  for (const { name, writes, corruptCluster } of cases) {
    ok(await qemuImg(["create", "-q", "-f", "qcow2", name, "3G"], dir), `create ${name}`);
    ok(await qemuIo([...writes.flatMap((command) => ["-c", command]), name], dir), `write ${name}`);
    const path = join(dir, name);
    const bytes = readFileSync(path);
    bytes[0x40000 + corruptCluster * 8 + 6] |= 0x02; // the entry's host offset + 0x200: not cluster aligned
    writeFileSync(path, bytes);
    for (const output of ["human", "json"]) {
      const ours = await snapstack(["img", "map", `--output=${output}`, name], { cwd: dir });
      const theirs = await qemuImg(["map", `--output=${output}`, name], dir);
      assert.equal(theirs.code, 1, `qemu-img map ${name}: ${theirs.stderr}`);
      assert.equal(ours.code, 1, `map ${name} ${output} exit (stderr ${ours.stderr})`);
      assert.equal(ours.stdout, theirs.stdout, `map ${name} ${output} stdout`);
      assert.match(ours.stderr, /^snapstack: error E_CORRUPT_IMAGE: .*unaligned/);
    }
  }
});

test("info lists persistent dirty bitmaps and measure sizes them, as qemu-img 7.2 prints them (JSON and human)", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "bm.qcow2", "10G"], dir), "create");
  ok(await qemuImg(["bitmap", "--add", "bm.qcow2", "a-long-bitmap-name"], dir), "bitmap 1");
  ok(await qemuImg(["bitmap", "--add", "-g", "512", "bm.qcow2", "tiny"], dir), "bitmap 2");
  ok(await qemuImg(["bitmap", "--add", "-g", "1M", "--disable", "bm.qcow2", "off"], dir), "bitmap 3 (no flags)");
  for (const args of [
    ["info", "--output=json", "bm.qcow2"],
    ["info", "bm.qcow2"],
    ["measure", "-O", "qcow2", "bm.qcow2"],
    ["measure", "--output=json", "-O", "qcow2", "-o", "cluster_size=512", "bm.qcow2"],
    ["measure", "-O", "qcow2", "-o", "compat=0.10", "bm.qcow2"],
  ]) {
    const theirs = ok(await qemuImg(args, dir), `qemu-img ${args.join(" ")}`);
    const ours = ok(await snapstack(["img", ...args], { cwd: dir }), `snapstack img ${args.join(" ")}`);
    assert.equal(ours.stdout, theirs.stdout, `img ${args.join(" ")}`);
  }
});

test("info on encrypted images (LUKS, AES) and images with an external data file prints what qemu-img prints; their data is still refused", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  await createLuksImage(dir, "luks.qcow2");
  await createLuksImage(dir, "luks-cbc.qcow2", "encrypt.hash-alg=sha512,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256");
  ok(await qemuImg(["create", "-q", "--object", "secret,id=sec0,data=123456", "-f", "qcow2", "-o", "encrypt.format=aes,encrypt.key-secret=sec0", "aes.qcow2", "1M"], dir), "create aes");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "external.qcow2", "1M"], dir), "create data file");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", "data_file=data2.raw,data_file_raw=on", "external-raw.qcow2", "1M"], dir), "create raw data file");
  for (const image of ["luks.qcow2", "luks-cbc.qcow2", "aes.qcow2", "external.qcow2", "external-raw.qcow2"]) {
    for (const output of ["human", "json"]) {
      const ours = ok(await snapstack(["img", "info", `--output=${output}`, image], { cwd: dir }), `snapstack info ${image}`);
      const theirs = ok(await qemuImg(["info", `--output=${output}`, image], dir), `qemu-img info ${image}`);
      // disk size / actual-size follow the file system's allocation (see the first info test): compared apart.
      const sizeless = (text: string): string => text.replace(/^disk size: .*$/m, "disk size: X").replace(/"actual-size": \d+/, '"actual-size": X');
      assert.equal(sizeless(ours.stdout), sizeless(theirs.stdout), `${image} ${output}`);
    }
    const before = readFileSync(join(dir, image));
    const code = image.startsWith("external") ? "E_UNSUPPORTED_FEATURE" : "E_ENCRYPTED";
    assertCodedError(await snapstack(["img", "map", image], { cwd: dir }), code);
    assertCodedError(await snapstack(["io", "-r", "-c", "read 0 4k", image], { cwd: dir }), code);
    assertCodedError(await snapstack(["io", "-c", "write 0 4k", image], { cwd: dir }), code);
    assert.ok(readFileSync(join(dir, image)).equals(before), `${image} changed`);
  }
  const luks = JSON.parse(ok(await snapstack(["img", "info", "--output=json", "luks-cbc.qcow2"], { cwd: dir }), "info").stdout);
  assert.equal(luks.encrypted, true);
  assert.deepEqual([luks["format-specific"].data.encrypt["cipher-alg"], luks["format-specific"].data.encrypt["ivgen-alg"], luks["format-specific"].data.encrypt["ivgen-hash-alg"]], ["aes-128", "essiv", "sha256"]);
});

test("snapshot names outside ASCII: snapshot -l and info pad by bytes, JSON escapes as qemu-img (\\u00FC, surrogate pairs, \\u007F)", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "u.qcow2", "1M"], dir), "create");
  for (const name of ["ünïcødé名前", "a\tb\u007f😀", "quote\"back\\slash"]) ok(await qemuImg(["snapshot", "-c", name, "u.qcow2"], dir), `snapshot ${name}`);
  const withoutDiskSize = (text: string): string => text.replace(/^disk size: .*\n/m, "").replace(/^ *"actual-size": \d+,\n/m, "");
  for (const command of [["snapshot", "-l"], ["info"], ["info", "--output=json"]]) {
    const theirs = ok(await qemuImg([...command, "u.qcow2"], dir), command.join(" "));
    const ours = ok(await snapstack(["img", ...command, "u.qcow2"], { cwd: dir }), command.join(" "));
    assert.equal(withoutDiskSize(ours.stdout), withoutDiskSize(theirs.stdout), command.join(" "));
  }
});
