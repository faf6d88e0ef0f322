/**
 * VHD ("vpc") images, read-only, against qemu-img 7.2 on the same files:
 * dynamic and fixed disks made by qemu-img (create + qemu-io writes, and
 * convert from data), one sized by its footer (force_size), one that says
 * Hyper-V made it. info and map (JSON and human), check, compare and a
 * convert to qcow2 must agree with qemu-img; writing is refused, the file
 * untouched; damage and differencing disks get coded errors.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { writeScatteredDisk } from "../helpers/random.ts";
import { assertCodedError, readOnlyFormatImage, assertConvertsToEqualQcow2, assertReportsLikeQemuImg, ok, qemuImg, qemuIo, snapstack } from "./cli-helpers.ts";

/** A footer at `at` rewritten by `change`, its checksum made right again (the one's complement of the byte sum). */
function patchFooter(bytes: Buffer, at: number, change: (footer: Buffer) => void): void {
  const footer = bytes.subarray(at, at + 512);
  change(footer);
  footer.writeUInt32BE(0, 64);
  let sum = 0;
  for (const byte of footer) sum += byte;
  footer.writeUInt32BE(~sum >>> 0, 64);
}

test("vpc images made by qemu-img: info, map, check, compare and convert agree with qemu-img", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  writeScatteredDisk(join(dir, "source.raw"), 24 * 1024 * 1024, 777, 20);
  const images: Array<[string, string[]]> = [];
  for (const subformat of ["dynamic", "fixed"]) {
    ok(await qemuImg(["convert", "-f", "raw", "-O", "vpc", "-o", `subformat=${subformat}`, "source.raw", `converted-${subformat}.vhd`], dir), `convert ${subformat}`);
    ok(await qemuImg(["create", "-q", "-f", "vpc", "-o", `subformat=${subformat}`, `written-${subformat}.vhd`, "64M"], dir), `create ${subformat}`);
    ok(await qemuIo(["-f", "vpc", "-c", "write -P 7 1M 300k", "-c", "write -z 8M 64k", "-c", "write -P 3 40M 1M", `written-${subformat}.vhd`], dir), `write ${subformat}`);
    // A fixed disk probes as raw (its footer is at the end only), in qemu-img as here: -f vpc.
    const format = subformat === "fixed" ? ["-f", "vpc"] : [];
    images.push([`converted-${subformat}.vhd`, format], [`written-${subformat}.vhd`, format]);
  }
  ok(await qemuImg(["create", "-q", "-f", "vpc", "-o", "force_size=on", "sized.vhd", "100M"], dir), "create force_size");
  ok(await qemuIo(["-f", "vpc", "-c", "write -P 9 99M 1M", "sized.vhd"], dir), "write force_size");
  images.push(["sized.vhd", []]);
  // Hyper-V's disks are the footer's current size, not the geometry's.
  const hyperv = readFileSync(join(dir, "written-dynamic.vhd"));
  for (const at of [0, hyperv.length - 512]) {
    patchFooter(hyperv, at, (footer) => {
      footer.write("win ", 28, "latin1");
      footer.writeBigUInt64BE(64n * 1024n * 1024n, 48);
    });
  }
  writeFileSync(join(dir, "hyperv.vhd"), hyperv);
  images.push(["hyperv.vhd", []]);
  for (const [image, format] of images) {
    await assertReportsLikeQemuImg(dir, image, format);
    await assertConvertsToEqualQcow2(dir, image, format);
  }
  ok(await snapstack(["img", "compare", "-F", "raw", "converted-dynamic.vhd", "source.raw"], { cwd: dir }), "the converted disk reads as its source");
  const hypervInfo = JSON.parse(ok(await snapstack(["img", "info", "--output=json", "hyperv.vhd"], { cwd: dir }), "info").stdout);
  assert.equal(hypervInfo["virtual-size"], 64 * 1024 * 1024, "Hyper-V: the footer's current size");
});

test("vpc is read-only: writers refuse it, the file untouched; damage and differencing disks get coded errors", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const before = await readOnlyFormatImage(dir, "vpc", "disk.vhd");
  assert.ok(readFileSync(join(dir, "disk.vhd")).equals(before), "a refused command changed the vhd");
  const create = await snapstack(["img", "create", "-f", "vpc", "new.vhd", "1M"], { cwd: dir });
  assertCodedError(create, "E_UNSUPPORTED_FEATURE");
  assert.match(create.stderr, /reads vpc images but does not write them/);

  const damaged = (name: string, change: (bytes: Buffer) => void): string => {
    const bytes = Buffer.from(before);
    change(bytes);
    writeFileSync(join(dir, name), bytes);
    return name;
  };
  const cases: Array<[string, string, RegExp]> = [
    [damaged("checksum.vhd", (bytes) => (bytes[40] ^= 1)), "E_CORRUPT_IMAGE", /Incorrect header checksum/],
    [damaged("truncated.vhd", (bytes) => bytes.fill(0, bytes.length - 512)), "E_CORRUPT_IMAGE", /truncated/],
    [damaged("magic.vhd", (bytes) => bytes.write("xxsparse", 512, "latin1")), "E_CORRUPT_IMAGE", /Invalid header magic/],
    [damaged("differencing.vhd", (bytes) => patchFooter(bytes, 0, (footer) => footer.writeUInt32BE(4, 60))), "E_UNSUPPORTED_FEATURE", /differencing/],
    [damaged("huge-bat.vhd", (bytes) => bytes.writeUInt32BE(400_000_000, 512 + 28)), "E_CORRUPT_IMAGE", /past the end of the file/],
  ];
  writeFileSync(join(dir, "truncated.vhd"), before.subarray(0, before.length - 1024));
  for (const [name, code, message] of cases) {
    const ours = await snapstack(["img", "info", name], { cwd: dir });
    assertCodedError(ours, code);
    assert.match(ours.stderr, message, name);
    if (code === "E_CORRUPT_IMAGE") assert.notEqual((await qemuImg(["info", name], dir)).code, 0, `qemu-img refuses ${name} too`);
  }
});
