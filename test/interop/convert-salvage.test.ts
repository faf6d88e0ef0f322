// `img convert --salvage` side by side with `qemu-img convert --salvage` on damaged images made by qemu-img.
import { test } from "node:test";
import assert from "node:assert/strict";
import { closeSync, fstatSync, openSync, readFileSync, readSync, writeSync } from "node:fs";
import { join } from "node:path";
import { requireTools, run, scratchDir } from "../helpers/tools.ts";
import { assertCodedError, assertUnchanged, ok, qemuImg, snapshotFiles, snapstack } from "./cli-helpers.ts";

/** The sector offsets named by warnings of one kind, in ascending order and without repeats (qemu-img names each once per pass). */
function warnedOffsets(stderr: string, kind: "read" | "status"): number[] {
  const pattern = kind === "read" ? /warning: error while reading offset (\d+): Input\/output error$/ : /warning: error while reading block status at offset (\d+): Input\/output error$/;
  const offsets = new Set<number>();
  for (const line of stderr.split("\n")) {
    const match = pattern.exec(line);
    if (match !== null) offsets.add(Number(match[1]));
  }
  return [...offsets].sort((a, b) => a - b);
}

/** qemu-img map --output=json without host offsets (the two targets' files are laid out alike, but need not be). */
async function mapShape(dir: string, image: string): Promise<string> {
  return ok(await qemuImg(["map", "--output=json", image], dir), `map ${image}`).stdout.replace(/, "offset": \d+/g, "");
}

async function sh(dir: string, script: string): Promise<void> {
  ok(await run("bash", ["-euc", `cd '${dir}'\n${script}`]), script);
}

/** Overwrite `bytes` at `offset` from the end of `path`. */
function damageFromEnd(path: string, offsetFromEnd: number, bytes: Uint8Array): void {
  const fd = openSync(path, "r+");
  try {
    writeSync(fd, bytes, 0, bytes.length, fstatSync(fd).size - offsetFromEnd);
  } finally {
    closeSync(fd);
  }
}

test("convert --salvage: damaged compressed clusters read as zeroes sector by sector, as qemu-img: same warnings, same output, same allocation", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  // 4 MiB of patterned data, compressed by qemu-img into 64 clusters of a few hundred bytes each; then 2 KiB
  // of the compressed data near the file's end overwritten: a few clusters no longer inflate, and one (QEMU
  // packs them at byte granularity) still produces its whole cluster before its stream breaks, which QEMU reads.
  await sh(dir, `python3 -c "
import sys
sys.stdout.buffer.write(b''.join(bytes([(i * 7 + j) % 251 for j in range(256)]) * 256 for i in range(64)))" > src.raw
qemu-img convert -q -c -f raw -O qcow2 src.raw damaged.qcow2`);
  const damaged = join(dir, "damaged.qcow2");
  damageFromEnd(damaged, 12000, new Uint8Array(2048).map((_, i) => i % 256));
  const source = snapshotFiles([damaged]);

  // Without --salvage both fail: qemu-img at the start of whichever failed request came back first (its
  // requests run in parallel), snapstack at the first sector that cannot be read (checked below).
  const theirsFailed = await qemuImg(["convert", "-O", "raw", "damaged.qcow2", "q.raw"], dir);
  assert.equal(theirsFailed.code, 1, theirsFailed.stderr);
  const theirFailedByte = Number(/error while reading at byte (\d+)/.exec(theirsFailed.stderr)?.[1]);
  const oursFailed = await snapstack(["img", "convert", "-O", "raw", "damaged.qcow2", "s.raw"], { cwd: dir });
  assertCodedError(oursFailed, "E_COMPRESSION");
  const ourFailedByte = Number(/error while reading at byte (\d+): compressed cluster does not inflate to 65536 bytes/.exec(oursFailed.stderr)?.[1]);

  for (const format of ["raw", "qcow2"]) {
    const theirs = ok(await qemuImg(["convert", "--salvage", "-O", format, "damaged.qcow2", `q.${format}`], dir), `qemu-img convert --salvage -O ${format}`);
    const ours = ok(await snapstack(["img", "convert", "--salvage", "-O", format, "damaged.qcow2", `s.${format}`], { cwd: dir }), `convert --salvage -O ${format}`);
    const lost = warnedOffsets(theirs.stderr, "read");
    assert.ok(lost.length >= 128 && lost.length % 128 === 0, `qemu-img lost whole clusters (${lost.length} sectors)`);
    assert.equal(ourFailedByte, lost[0], "without --salvage, snapstack names the first sector qemu-img cannot read");
    assert.ok(lost.includes(theirFailedByte), `qemu-img's failed request starts at a sector it cannot read (${theirFailedByte})`);
    assert.deepEqual(warnedOffsets(ours.stderr, "read"), lost, "the same sectors are reported unreadable");
    assert.equal(ours.stderr.split("\n").filter((line) => line !== "").length, lost.length, "one warning per sector, nothing else");
    assert.ok(!/^snapstack: error/m.test(ours.stderr));
    ok(await qemuImg(["compare", `q.${format}`, `s.${format}`], dir), `-O ${format}: snapstack's output equals qemu-img's`);
    if (format === "qcow2") {
      assert.equal(await mapShape(dir, "s.qcow2"), await mapShape(dir, "q.qcow2"), "the lost sectors are left unallocated, as by qemu-img");
      ok(await qemuImg(["check", "s.qcow2"], dir), "check");
    }
  }
  // The salvaged output differs from the original only in the lost clusters.
  const differs = await qemuImg(["compare", "-f", "raw", "-F", "raw", "src.raw", "s.raw"], dir);
  assert.equal(differs.code, 1, differs.stdout);

  // -q: no warnings; -C: refused, as qemu-img refuses it.
  const quiet = ok(await snapstack(["img", "convert", "--salvage", "-q", "-O", "raw", "damaged.qcow2", "quiet.raw"], { cwd: dir }), "--salvage -q");
  assert.equal(quiet.stderr, "");
  ok(await qemuImg(["compare", "-f", "raw", "-F", "raw", "q.raw", "quiet.raw"], dir), "-q: the same output");
  const theirsOffload = await qemuImg(["convert", "--salvage", "-C", "-O", "raw", "damaged.qcow2", "qc.raw"], dir);
  assert.equal(theirsOffload.code, 1);
  assert.match(theirsOffload.stderr, /Cannot use copy offloading in salvaging mode/);
  const oursOffload = await snapstack(["img", "convert", "--salvage", "-C", "-O", "raw", "damaged.qcow2", "sc.raw"], { cwd: dir });
  assertCodedError(oursOffload, "E_USAGE");
  assert.match(oursOffload.stderr, /Cannot use copy offloading in salvaging mode/);
  assertUnchanged(source);
});

test("convert --salvage: sectors under a corrupt L1 entry are taken as data and read as zeroes, as qemu-img; -p warns once per sector", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  // 4 KiB clusters: an L2 table maps 2 MiB. The second L1 entry is moved off its cluster boundary.
  await sh(dir, "qemu-img create -q -f qcow2 -o cluster_size=4k l1.qcow2 6M; qemu-io -f qcow2 -c 'write -q -P 7 0 6M' l1.qcow2");
  const path = join(dir, "l1.qcow2");
  const fd = openSync(path, "r+");
  try {
    const header = Buffer.alloc(48);
    readSync(fd, header, 0, 48, 0);
    const l1Offset = Number(header.readBigUInt64BE(40));
    const entry = Buffer.alloc(8);
    readSync(fd, entry, 0, 8, l1Offset + 8);
    entry.writeBigUInt64BE(entry.readBigUInt64BE(0) + 512n);
    writeSync(fd, entry, 0, 8, l1Offset + 8);
  } finally {
    closeSync(fd);
  }
  const source = snapshotFiles([path]);

  // Without --salvage both fail, naming the same first sector.
  const theirsFailed = await qemuImg(["convert", "-O", "raw", "l1.qcow2", "qf.raw"], dir);
  assert.equal(theirsFailed.code, 1);
  assert.match(theirsFailed.stderr, /error while reading block status at offset 2097152: Input\/output error/);
  const oursFailed = await snapstack(["img", "convert", "-O", "raw", "l1.qcow2", "sf.raw"], { cwd: dir });
  assertCodedError(oursFailed, "E_CORRUPT_IMAGE");
  assert.match(oursFailed.stderr, /error while reading block status at offset 2097152: L2 table offset 0x[0-9a-f]+ unaligned \(L1 index: 0x1\)/);

  const theirs = ok(await qemuImg(["convert", "--salvage", "-O", "raw", "l1.qcow2", "q.raw"], dir), "qemu-img convert --salvage");
  const ours = ok(await snapstack(["img", "convert", "--salvage", "-p", "-O", "raw", "l1.qcow2", "s.raw"], { cwd: dir }), "convert --salvage -p");
  const sectors = Array.from({ length: (2 << 20) / 512 }, (_, i) => (2 << 20) + i * 512);
  for (const kind of ["status", "read"] as const) {
    assert.deepEqual(warnedOffsets(theirs.stderr, kind), sectors, `qemu-img: every sector of the second 2 MiB (${kind})`);
    assert.deepEqual(warnedOffsets(ours.stderr, kind), sectors, `snapstack: every sector of the second 2 MiB (${kind})`);
  }
  const warnings = ours.stderr.split("\n").filter((line) => line.startsWith("snapstack: warning:"));
  assert.equal(warnings.length, 2 * sectors.length, "each sector once for its status and once for its read, with -p too");
  ok(await qemuImg(["compare", "-f", "raw", "-F", "raw", "q.raw", "s.raw"], dir), "snapstack's output equals qemu-img's");
  // Outside the damaged table the data written is there; under it, zeroes.
  const bytes = readFileSync(join(dir, "s.raw"));
  const MiB = 1 << 20;
  assert.ok(bytes.subarray(0, 2 * MiB).every((byte) => byte === 7) && bytes.subarray(4 * MiB, 6 * MiB).every((byte) => byte === 7), "the readable data");
  assert.ok(bytes.subarray(2 * MiB, 4 * MiB).every((byte) => byte === 0), "zeroes where nothing could be read");
  assertUnchanged(source);
});
