// The qcow2 engine against qemu-img / qemu-io: images we write must check
// clean and read back identically in QEMU; images QEMU writes must read
// identically through us; chains; concurrency; a randomized workload.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, run, runOk, scratchDir } from "../helpers/tools.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { allocationMap } from "../helpers/qemu-io-differential.ts";
import type { Qcow2CreateOptions } from "../../src/formats/qcow2/create-qcow2.ts";
import {
  assertCheckClean,
  assertQemuSees,
  assertReadsAs,
  createImage,
  openChain,
  openImage,
  qemuRawContent,
  runWorkload,
} from "./qcow2-engine-helpers.ts";

const MiB = 1024 * 1024;

interface Config {
  name: string;
  create: Qcow2CreateOptions;
}

const CONFIGS: Config[] = [
  { name: "default", create: { sizeBytes: 8 * MiB } },
  { name: "512B clusters, refcount_bits=1", create: { sizeBytes: 2 * MiB + 1536, clusterSizeBytes: 512, refcountBits: 1 } },
  { name: "4K clusters, refcount_bits=64", create: { sizeBytes: 6 * MiB, clusterSizeBytes: 4096, refcountBits: 64 } },
  { name: "2M clusters", create: { sizeBytes: 24 * MiB, clusterSizeBytes: 2 * MiB } },
  { name: "compat 0.10", create: { sizeBytes: 8 * MiB, compat: "0.10" } },
  { name: "lazy refcounts", create: { sizeBytes: 8 * MiB, lazyRefcounts: true } },
  { name: "extended L2", create: { sizeBytes: 8 * MiB, extendedL2: true } },
  { name: "extended L2, 32K clusters, zstd", create: { sizeBytes: 8 * MiB, extendedL2: true, clusterSizeBytes: 32768, compressionType: "zstd" } },
  { name: "zstd", create: { sizeBytes: 8 * MiB, compressionType: "zstd" } },
];

test("(a) images written by snapstack check clean and read back identically in QEMU", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (replay with SNAPSTACK_SEED=${seed})`);
  for (const [i, config] of CONFIGS.entries()) {
    const path = join(dir, `a${i}.qcow2`);
    await createImage(path, config.create);
    const image = await openImage(path, false);
    const reference = new Uint8Array(image.sizeBytes);
    const cs = config.create.clusterSizeBytes ?? 65536;
    // A known pattern for qemu-io read -P, then random operations.
    await image.write(cs + 123, new Uint8Array(3 * cs).fill(0xa7));
    reference.fill(0xa7, cs + 123, 4 * cs + 123);
    await runWorkload(image, reference, { seed: seed + i, operations: 150, lengthMaxBytes: 3 * cs, clusterSizeBytes: cs, compressed: true });
    await image.write(10 * cs + 7, new Uint8Array(cs).fill(0x3c));
    reference.fill(0x3c, 10 * cs + 7, 11 * cs + 7);
    await assertReadsAs(image, reference, `${config.name} before close`);
    await image.close();
    await assertCheckClean(path);
    await assertQemuSees(dir, path, reference);
    const io = await run("qemu-io", ["-r", "-c", `read -P 0x3c ${10 * cs + 7} ${cs}`, path]);
    assert.equal(io.code, 0, `${config.name}: qemu-io read -P: ${io.stdout}${io.stderr}`);
    assert.doesNotMatch(io.stdout, /Pattern verification failed/);
    // Reopen read-only: same content.
    const again = await openImage(path, true);
    await assertReadsAs(again, reference, `${config.name} after reopen`);
    await again.close();
  }
});

test("(b) images made by qemu-img / qemu-io read identically through snapstack", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const at = (name: string) => join(dir, name);
  const ops = ["write -P 0xab 1000 70000", "write -z 200k 64k", "write -P 0x11 3M 1M", "write -P 0x33 5M 7000", "write -z 5244928 2048", "discard 3211264 65536"];
  const io = (path: string) => runOk("qemu-io", [...ops.flatMap((c) => ["-c", c]), path]);
  const cases: [string, string[]][] = [
    ["v3.qcow2", []],
    ["v2.qcow2", ["-o", "compat=0.10"]],
    ["extl2.qcow2", ["-o", "extended_l2=on"]],
    ["c512.qcow2", ["-o", "cluster_size=512,refcount_bits=2"]],
    ["c2m.qcow2", ["-o", "cluster_size=2M,refcount_bits=8"]],
    ["r64.qcow2", ["-o", "refcount_bits=64,cluster_size=4096"]],
  ];
  for (const [name, options] of cases) {
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", ...options, at(name), "8M"]);
    await io(at(name));
  }
  await runOk("qemu-img", ["convert", "-c", "-O", "qcow2", at("v3.qcow2"), at("zlib.qcow2")]);
  await runOk("qemu-img", ["convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", at("v3.qcow2"), at("zstd.qcow2")]);
  await runOk("qemu-img", ["convert", "-c", "-O", "qcow2", "-o", "cluster_size=2M", at("v3.qcow2"), at("zlib2m.qcow2")]);
  // Random (incompressible) data compresses to nothing smaller: stored normally.
  writeFileSync(at("random.raw"), createRandom(7).bytes(MiB));
  await runOk("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", at("random.raw"), at("random-c.qcow2")]);
  // Snapshots: the active state differs from the snapshot.
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", at("snap.qcow2"), "8M"]);
  await io(at("snap.qcow2"));
  await runOk("qemu-img", ["snapshot", "-c", "s1", at("snap.qcow2")]);
  await runOk("qemu-io", ["-c", "write -P 0x44 0 100k", at("snap.qcow2")]);
  for (const name of [...cases.map(([n]) => n), "zlib.qcow2", "zstd.qcow2", "zlib2m.qcow2", "random-c.qcow2", "snap.qcow2"]) {
    const expected = await qemuRawContent(dir, at(name));
    const image = await openImage(at(name), true);
    await assertReadsAs(image, expected, name);
    // Small unaligned reads too.
    const random = createRandom(name.length);
    for (let i = 0; i < 200; i++) {
      const offset = random.int(image.sizeBytes - 1);
      const length = 1 + random.int(Math.min(20000, image.sizeBytes - offset));
      const buffer = new Uint8Array(length);
      await image.read(offset, buffer);
      assert.ok(Buffer.from(buffer).equals(expected.subarray(offset, offset + length)), `${name} read at ${offset}+${length}`);
    }
    await image.close();
  }
  // Writing to the image with a snapshot keeps the snapshot intact.
  const snap = await openImage(at("snap.qcow2"), false);
  await snap.write(4096, new Uint8Array(200000).fill(0x55));
  await snap.writeZeroes(3 * MiB, MiB, { unmap: true });
  await snap.close();
  await assertCheckClean(at("snap.qcow2"));
  await runOk("qemu-img", ["snapshot", "-a", "s1", at("snap.qcow2")]);
  const restored = await qemuRawContent(dir, at("snap.qcow2"));
  const v3 = await qemuRawContent(dir, at("v3.qcow2"));
  assert.ok(restored.equals(v3), "snapshot content survived writes through snapstack");
});

async function buildChain(dir: string, depth: number, sizeBytes: number, seed: number): Promise<{ paths: string[]; reference: Uint8Array }> {
  const paths: string[] = [];
  const random = createRandom(seed);
  for (let i = 0; i < depth; i++) {
    const name = `layer${i}.qcow2`;
    const args = ["create", "-q", "-f", "qcow2"];
    if (i > 0) args.push("-b", `layer${i - 1}.qcow2`, "-F", "qcow2");
    // The base may be smaller than the overlays: reads past its end are zeroes.
    args.push(join(dir, name), String(i === 0 ? sizeBytes / 2 : sizeBytes));
    await runOk("qemu-img", args);
    const commands: string[] = [];
    for (let k = 0; k < 4; k++) {
      const limit = i === 0 ? sizeBytes / 2 : sizeBytes;
      const offset = random.int(limit - 70000);
      const length = 1 + random.int(69999);
      commands.push(k === 3 && i > 0 ? `write -z ${offset} ${length}` : `write -P ${(i * 4 + k) % 250 + 1} ${offset} ${length}`);
    }
    await runOk("qemu-io", [...commands.flatMap((c) => ["-c", c]), join(dir, name)]);
    paths.push(join(dir, name));
  }
  const reference = new Uint8Array(await qemuRawContent(dir, paths[paths.length - 1]));
  return { paths, reference };
}

test("(c) backing chains of depth 1, 2 and 50: read and written through Qcow2Image", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  for (const depth of [2, 3, 51]) {
    const dir = scratchDir(t);
    const sizeBytes = 4 * MiB;
    const { paths, reference } = await buildChain(dir, depth, sizeBytes, seed + depth);
    const top = await openChain(paths, true);
    await assertReadsAs(top, reference, `chain of ${depth} images`);
    await runWorkload(top, reference, { seed: seed + depth, operations: 120, lengthMaxBytes: 150000, clusterSizeBytes: 65536 });
    await assertReadsAs(top, reference, `chain of ${depth} after writes`);
    await top.close();
    const topPath = paths[paths.length - 1];
    await assertCheckClean(topPath);
    await assertQemuSees(dir, topPath, reference);
  }
});

test("(d) concurrent overlapping writes keep every byte and leak nothing", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  for (const create of [{ sizeBytes: 4 * MiB }, { sizeBytes: 4 * MiB, extendedL2: true }, { sizeBytes: 2 * MiB, clusterSizeBytes: 4096, compat: "0.10" as const }]) {
    const path = join(dir, `concurrent-${Math.random().toString(36).slice(2)}.qcow2`);
    await createImage(path, create);
    const image = await openImage(path, false);
    const reference = new Uint8Array(image.sizeBytes);
    // Many writes at once, overlapping each other, issued in a known order.
    const pending: Promise<void>[] = [];
    for (let i = 0; i < 300; i++) {
      const offset = (i * 37_813) % (image.sizeBytes - 200_000);
      const length = 1000 + ((i * 7919) % 150_000);
      const data = new Uint8Array(length).fill((i % 250) + 1);
      reference.set(data, offset);
      pending.push(image.write(offset, data));
    }
    await Promise.all(pending);
    await assertReadsAs(image, reference, "after concurrent writes");
    const seed = testSeed();
    await runWorkload(image, reference, { seed, operations: 400, lengthMaxBytes: 100_000, clusterSizeBytes: create.clusterSizeBytes ?? 65536, concurrency: 16 });
    await assertReadsAs(image, reference, `after concurrent mixed workload (seed ${seed})`);
    await image.close();
    await assertCheckClean(path);
    await assertQemuSees(dir, path, reference);
  }
});

test("(e) randomized workload against a reference buffer (SNAPSTACK_SEED replays)", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (replay with SNAPSTACK_SEED=${seed})`);
  console.log(`qcow2 randomized workload seed ${seed}`);
  const configs: Qcow2CreateOptions[] = [
    { sizeBytes: 16 * MiB + 4608 },
    { sizeBytes: 8 * MiB, clusterSizeBytes: 4096, refcountBits: 4, extendedL2: false },
    { sizeBytes: 8 * MiB, extendedL2: true, lazyRefcounts: true },
    { sizeBytes: 8 * MiB, compat: "0.10", clusterSizeBytes: 16384 },
    // 1 KiB clusters with a cache of 8 tables: L2 tables and refcount blocks are evicted all the time.
    { sizeBytes: 4 * MiB, clusterSizeBytes: 1024 },
  ];
  for (const [i, create] of configs.entries()) {
    const path = join(dir, `random${i}.qcow2`);
    await createImage(path, create);
    const cacheBytesMax = create.clusterSizeBytes === 1024 ? 8 * 1024 : undefined;
    let image = await openImage(path, false, null, cacheBytesMax);
    const reference = new Uint8Array(image.sizeBytes);
    const cs = create.clusterSizeBytes ?? 65536;
    await runWorkload(image, reference, { seed: seed + i, operations: 1500, lengthMaxBytes: 4 * cs, clusterSizeBytes: cs, compressed: true, concurrency: 4 });
    await assertReadsAs(image, reference, `config ${i} (seed ${seed + i})`);
    // Flush and keep going on a reopened image.
    await image.close();
    image = await openImage(path, false, null, cacheBytesMax);
    await runWorkload(image, reference, { seed: seed + 100 + i, operations: 500, lengthMaxBytes: 3 * cs, clusterSizeBytes: cs });
    await image.close();
    await assertCheckClean(path);
    await assertQemuSees(dir, path, reference);
  }
  const content = readFileSync(join(dir, "random0.qcow2"));
  assert.ok(content.length > 0);
});

test("(f) resize grows and shrinks exactly as qemu-img resize does", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const cases: [string, number, boolean, string][] = [
    ["4M", 2 ** 30, false, ""],
    ["1G", 4 * MiB, true, ""],
    ["64M", 200 * MiB, false, "cluster_size=512"],
    ["100M", 10 * MiB, true, "cluster_size=4096"],
    ["8M", 9 * MiB, false, "compat=0.10"],
  ];
  for (const [from, to, shrink, options] of cases) {
    const theirs = join(dir, "theirs.qcow2");
    const ours = join(dir, "ours.qcow2");
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", ...(options ? ["-o", options] : []), theirs, from]);
    await runOk("qemu-io", ["-c", "write -P 1 0 1M", "-c", "write -P 2 3M 700k", "-c", "write -P 3 2200000 100000", theirs]);
    writeFileSync(ours, readFileSync(theirs));
    await runOk("qemu-img", ["resize", "-q", ...(shrink ? ["--shrink"] : []), theirs, String(to)]);
    const image = await openImage(ours, false);
    if (shrink) {
      await assert.rejects(image.resize(to, { shrink: false }), /--shrink/);
    }
    await image.resize(to, { shrink });
    assert.equal(image.sizeBytes, to);
    await image.close();
    assert.ok(readFileSync(ours).equals(readFileSync(theirs)), `${from} -> ${to} ${options}: files identical`);
    await assertCheckClean(ours);
  }
});

test("(g) a dirty image (lazy refcounts, crash) is repaired on a read-write open", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = join(dir, "dirty.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "8M"]);
  // Write, then die without closing: dirty bit set, refcounts stale.
  await run("qemu-io", ["-c", "write -P 0x61 0 300k", "-c", "write -P 0x62 2M 64k", "-c", "abort", path]);
  const before = await run("qemu-img", ["check", "--output=json", path]);
  assert.notEqual(before.code, 0, "qemu-img check sees the stale refcounts");
  const reference = new Uint8Array(8 * MiB);
  reference.fill(0x61, 0, 300 * 1024);
  reference.fill(0x62, 2 * MiB, 2 * MiB + 65536);
  // Read-only opens leave it alone; a read-write open rebuilds first.
  const readOnly = await openImage(path, true);
  assert.equal(readOnly.info().dirty, true);
  await assertReadsAs(readOnly, reference, "dirty image read-only");
  await readOnly.close();
  const image = await openImage(path, false);
  assert.equal(image.info().dirty, false);
  await image.write(5 * MiB + 3, new Uint8Array(100_000).fill(0x63));
  reference.fill(0x63, 5 * MiB + 3, 5 * MiB + 3 + 100_000);
  await assertReadsAs(image, reference, "after repair and write");
  await image.close();
  await assertCheckClean(path);
  await assertQemuSees(dir, path, reference);
});

test("(h) opening refuses what QEMU refuses, without writing", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  const base = join(dir, "base.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", base, "8M"]);
  const pristine = readFileSync(base);
  const poked = (name: string, at: number, bytes: number[]): string => {
    const copy = Buffer.from(pristine);
    Buffer.from(bytes).copy(copy, at);
    const path = join(dir, name);
    writeFileSync(path, copy);
    return path;
  };
  const cases: [string, number, number[], boolean, string, RegExp][] = [
    ["unknown-incompat.qcow2", 79, [0x20], true, "E_UNSUPPORTED_FEATURE", /Unknown incompatible feature: 20/],
    ["corrupt.qcow2", 79, [0x02], false, "E_IMAGE_MARKED_CORRUPT", /Image is corrupt; cannot be opened read\/write/],
    ["encrypted.qcow2", 32, [0, 0, 0, 2], true, "E_ENCRYPTED", /encrypt/],
    ["l1-small.qcow2", 36, [0, 0, 0, 0], true, "E_CORRUPT_IMAGE", /L1 table is too small/],
    ["reftable-unaligned.qcow2", 48, [0, 0, 0, 0, 0, 0x01, 0x02, 0x00], true, "E_CORRUPT_IMAGE", /Reference count table offset invalid/],
    ["l1-past-eof.qcow2", 40, [0, 0, 0, 0, 0x10, 0, 0, 0], true, "E_CORRUPT_IMAGE", /Active L1 table .* beyond the end of the file/],
    ["l1-huge.qcow2", 36, [0x01, 0, 0, 0], true, "E_TOO_LARGE", /Active L1 table too large/],
    ["bad-magic.qcow2", 0, [0x51, 0x46, 0x49, 0x00], true, "E_WRONG_FORMAT", /not in qcow2 format/],
  ];
  for (const [name, at, bytes, readOnly, code, message] of cases) {
    const path = poked(name, at, bytes);
    const original = readFileSync(path);
    await assert.rejects(openImage(path, readOnly), (e: { code?: string; message?: string }) => {
      assert.equal(e.code, code, `${name}: ${e.message}`);
      assert.match(e.message ?? "", message, name);
      return true;
    });
    assert.ok(readFileSync(path).equals(original), `${name} unchanged`);
  }
  // The corrupt image still opens read-only.
  const corrupt = await openImage(join(dir, "corrupt.qcow2"), true);
  assert.equal(corrupt.info().corrupt, true);
  await corrupt.close();
  // Unknown autoclear bits are cleared before the first change of a read-write session (not by
  // a session that only reads); unknown compatible bits are kept.
  const autoclear = poked("autoclear.qcow2", 80, [0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x04]);
  const reader = await openImage(autoclear, false);
  await reader.read(0, new Uint8Array(4096));
  await reader.close();
  assert.equal(readFileSync(autoclear).readBigUInt64BE(88), 0x04n, "a session that only read kept the autoclear bits");
  const writer = await openImage(autoclear, false);
  await writer.write(0, new Uint8Array(4096).fill(1));
  await writer.close();
  const header = readFileSync(autoclear);
  assert.equal(header.readBigUInt64BE(88), 0n);
  assert.equal(header.readBigUInt64BE(80), 0x80n);
  await assertCheckClean(autoclear);
});

test("(c2) a qcow2 overlay over a raw backing file (smaller than the overlay)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const basePath = join(dir, "base.raw");
  const base = createRandom(3).bytes(3 * MiB + 512);
  writeFileSync(basePath, base);
  const topPath = join(dir, "top.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", topPath, "4M"]);
  await runOk("qemu-io", ["-c", "write -P 0x21 100000 70000", "-c", "write -z 2M 65536", topPath]);
  const reference = new Uint8Array(await qemuRawContent(dir, topPath));
  const { openRaw } = await import("../../src/formats/raw/raw-image.ts");
  const top = await openImage(topPath, false, await openRaw(basePath, { readOnly: true }));
  await assertReadsAs(top, reference, "qcow2 over raw");
  await runWorkload(top, reference, { seed: testSeed(), operations: 100, lengthMaxBytes: 200_000, clusterSizeBytes: 65536 });
  await assertReadsAs(top, reference, "qcow2 over raw after writes");
  await top.close();
  await assertCheckClean(topPath);
  await assertQemuSees(dir, topPath, reference);
});

test("(i) the same operations through qemu-io and snapstack give the same qemu-img map", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  type Op = ["write", number, number] | ["zero", number, number, boolean] | ["discard", number, number] | ["compressed", number, number];
  const K = 1024;
  const ops: Op[] = [
    ["write", 0, 200 * K],
    ["write", 300 * K + 5, 10 * K],
    ["zero", 64 * K, 64 * K, false],
    ["zero", 128 * K, 64 * K, true],
    ["zero", 512 * K, 192 * K, false],
    ["zero", 800 * K + 100, 1000, false],
    ["discard", 0, 64 * K],
    ["discard", 1024 * K, 256 * K],
    ["write", 1100 * K, 4 * K],
    ["zero", 1536 * K, 2 * K, false],
    ["write", 1600 * K + 4 * K, 4 * K],
    ["compressed", 1792 * K, 64 * K],
    ["write", 70 * K, 3 * K],
    ["compressed", 1920 * K, 128 * K],
    ["write", 1950 * K, 1 * K],
  ];
  const qemuCommand = (op: Op): string =>
    op[0] === "write" ? `write -P 0x5e ${op[1]} ${op[2]}` : op[0] === "compressed" ? `write -c -P 0x5e ${op[1]} ${op[2]}` : op[0] === "zero" ? `write -z ${op[3] ? "-u " : ""}${op[1]} ${op[2]}` : `discard ${op[1]} ${op[2]}`;
  const variants: [string, string[], Qcow2CreateOptions][] = [
    ["v3", [], { sizeBytes: 2 * MiB }],
    ["v2", ["-o", "compat=0.10"], { sizeBytes: 2 * MiB, compat: "0.10" }],
    ["extl2", ["-o", "extended_l2=on"], { sizeBytes: 2 * MiB, extendedL2: true }],
  ];
  for (const withBacking of [false, true]) {
    const basePath = join(dir, "base.qcow2");
    if (withBacking) {
      await runOk("qemu-img", ["create", "-q", "-f", "qcow2", basePath, "2M"]);
      await runOk("qemu-io", ["-c", "write -P 0x77 0 2M", basePath]);
    }
    for (const [name, qemuOptions, create] of variants) {
      const theirs = join(dir, `${name}-theirs.qcow2`);
      const ours = join(dir, `${name}-ours.qcow2`);
      const backingArgs = withBacking ? ["-b", "base.qcow2", "-F", "qcow2"] : [];
      await runOk("qemu-img", ["create", "-q", "-f", "qcow2", ...qemuOptions, ...backingArgs, theirs, "2M"]);
      await runOk("qemu-io", [...ops.flatMap((op) => ["-c", qemuCommand(op)]), theirs]);
      await createImage(ours, withBacking ? { ...create, backingFile: "base.qcow2", backingFormat: "qcow2" } : create);
      const image = await openImage(ours, false, withBacking ? await openImage(basePath, true) : null);
      for (const op of ops) {
        if (op[0] === "write") await image.write(op[1], new Uint8Array(op[2]).fill(0x5e));
        else if (op[0] === "compressed") await image.writeCompressed(op[1], new Uint8Array(op[2]).fill(0x5e));
        else if (op[0] === "zero") await image.writeZeroes(op[1], op[2], { unmap: op[3] });
        else await image.discard(op[1], op[2]);
      }
      await image.close();
      await assertCheckClean(ours);
      assert.deepEqual(await allocationMap(ours), await allocationMap(theirs), `${name}${withBacking ? " with backing" : ""}: qemu-img map`);
      const compare = await run("qemu-img", ["compare", ours, theirs]);
      assert.equal(compare.code, 0, `${name}: ${compare.stdout}`);
    }
  }
});
