// `snapstack img dd` against `qemu-img dd` 7.2: the same operands give byte-identical outputs (raw and
// qcow2), the same exit codes and messages.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { ok, qemuImg, qemuIo, snapstack } from "./cli-helpers.ts";

test("img dd: outputs byte for byte qemu-img dd's, refusals with its messages", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "in.qcow2", "4M"], dir), "create");
  ok(await qemuIo(["-c", "write -P 1 0 64k", "-c", "write -P 2 2M 4k", "-c", "write -P 3 4190000 4304", "in.qcow2"], dir), "write");
  const cases = [
    "if=in.qcow2 of=OUT.raw",
    "-O qcow2 if=in.qcow2 of=OUT.qcow2 bs=64k count=10 skip=1",
    "if=in.qcow2 of=OUT.raw bs=1M skip=2",
    "if=in.qcow2 of=OUT.raw skip=100",
    "if=in.qcow2 of=OUT.raw bs=1000 skip=3",
    "-O qcow2 if=in.qcow2 of=OUT.qcow2 count=1 bs=1000",
    "if=in.qcow2 of=OUT.raw bs=4k bs=8k count=3",
    "if=in.qcow2 of=OUT.raw count=0",
    "-f raw if=in.qcow2 of=OUT.raw bs=512 count=1",
    "if=in.qcow2 of=OUT.raw count=3 bs=1M skip=1",
    "if=in.qcow2 of=OUT.raw skip=100000",
    "of=OUT.raw if=in.qcow2 bs=0x1000",
    "if=in.qcow2",
    "if=in.qcow2 of=OUT.raw bs=0",
    "if=in.qcow2 of=OUT.raw bs=3G",
    "if=in.qcow2 of=OUT.raw bs=1k count=-1",
    "if=in.qcow2 of=OUT.raw foo=1",
    "if=in.qcow2 of=OUT.raw bad",
    "if=nosuch of=OUT.raw",
    // Block counts up to 2^63, the first bad operand reported.
    "if=in.qcow2 of=OUT.raw count=1E",
    "if=in.qcow2 of=OUT.raw skip=9223372036854775807",
    "if=in.qcow2 of=OUT.raw count=9223372036854775808",
    "if=in.qcow2 of=OUT.raw skip=8E",
    "if=in.qcow2 of=OUT.raw skip=18446744073709551615",
    "if=in.qcow2 of=OUT.raw bs=abc",
    "if=in.qcow2 of=OUT.raw bs=1E",
    "if=in.qcow2 of=OUT.raw count=abc foo=1",
    "of=OUT.raw count=abc",
  ];
  for (const text of cases) {
    const args = (name: string): string[] => text.replaceAll("OUT", name).split(" ");
    for (const name of ["theirs", "ours"]) for (const ext of [".raw", ".qcow2"]) rmSync(join(dir, name + ext), { force: true });
    const theirs = await qemuImg(["dd", ...args("theirs")], dir);
    const ours = await snapstack(["img", "dd", ...args("ours")], { cwd: dir });
    assert.equal(ours.code, theirs.code, `${text}: ${ours.stderr}`);
    const message = theirs.stderr.split("\n")[0].replace(/^qemu-img: /, "");
    if (theirs.stderr === "") assert.equal(ours.stderr, "", text);
    else assert.ok(ours.stderr.includes(message), `${text}: ${ours.stderr} (qemu-img: ${message})`);
    const ext = text.includes("-O qcow2") ? ".qcow2" : ".raw";
    assert.equal(existsSync(join(dir, "ours" + ext)), existsSync(join(dir, "theirs" + ext)), `${text}: output created`);
    if (existsSync(join(dir, "theirs" + ext))) {
      assert.ok(readFileSync(join(dir, "ours" + ext)).equals(readFileSync(join(dir, "theirs" + ext))), `${text}: outputs differ`);
    }
  }
  // An output that is the input is refused before anything is created.
  const before = readFileSync(join(dir, "in.qcow2"));
  const same = await snapstack(["img", "dd", "-O", "raw", "if=in.qcow2", "of=in.qcow2"], { cwd: dir });
  assert.equal(same.code, 1);
  assert.match(same.stderr, /E_IN_USE/);
  assert.ok(readFileSync(join(dir, "in.qcow2")).equals(before));
});
