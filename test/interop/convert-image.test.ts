/**
 * convertImage against qemu-img convert: the target passes `qemu-img
 * compare` with the source and `qemu-img check`, and for qcow2 targets the
 * file is byte-identical to what `qemu-img convert` writes with the same
 * options (same host layout, same metadata).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { readFileSync, writeFileSync } from "node:fs";
import { openImage } from "../../src/chain/open-image.ts";
import { convertImage, type ConvertImageOptions } from "../../src/chain/convert-image.ts";
import { requireTools, run, runOk, scratchDir } from "../helpers/tools.ts";
import { createRandom, testSeed } from "../helpers/random.ts";

async function bash(script: string, cwd: string): Promise<void> {
  await runOk("bash", ["-euc", `cd '${cwd}'\n${script}`]);
}

const CHAIN = `qemu-img create -q -f raw base 4M
  qemu-io -f raw -c 'write -P 1 0 4M' base >/dev/null
  qemu-img create -q -f qcow2 -b base -F raw mid 6M
  qemu-io -c 'write -P 2 512k 1M' -c 'write -z 2M 128k' -c 'write -c -P 3 4M 64k' mid >/dev/null
  qemu-img create -q -f qcow2 -b mid -F qcow2 top 8M
  qemu-io -c 'write -P 4 64k 64k' -c 'write -z -u 3M 64k' -c 'write -P 0 6M 64k' -c 'write -P 5 7M 4k' top >/dev/null`;

async function ourConvert(dir: string, source: string, target: string, options: ConvertImageOptions): Promise<void> {
  const device = await openImage(join(dir, source), { readOnly: true });
  try {
    await convertImage(device, join(dir, target), options);
  } finally {
    await device.close();
  }
}

async function assertValid(dir: string, source: string, target: string): Promise<void> {
  const compare = await run("qemu-img", ["compare", join(dir, source), join(dir, target)]);
  assert.equal(compare.code, 0, `qemu-img compare ${source} ${target}: ${compare.stdout}${compare.stderr}`);
  if (readFileSync(join(dir, target)).subarray(0, 4).toString("latin1") === "QFI\xfb") {
    const check = await run("qemu-img", ["check", join(dir, target)]);
    assert.equal(check.code, 0, `qemu-img check ${target}: ${check.stdout}${check.stderr}`);
  }
}

function assertSameFile(dir: string, ours: string, theirs: string): void {
  assert.ok(readFileSync(join(dir, ours)).equals(readFileSync(join(dir, theirs))), `${ours} is byte-identical to qemu-img's ${theirs}`);
}

/** identical: false where only compressed payloads differ (snapstack's zstd encoder is not libzstd). */
const CASES: Array<{ name: string; qemuArgs: string[]; options: ConvertImageOptions; identical?: false }> = [
  { name: "qcow2", qemuArgs: ["-O", "qcow2"], options: { format: "qcow2" } },
  { name: "compressed qcow2", qemuArgs: ["-c", "-O", "qcow2"], options: { format: "qcow2", compress: true } },
  { name: "qcow2 with -B", qemuArgs: ["-O", "qcow2", "-B", "mid", "-F", "qcow2"], options: { format: "qcow2", backingFile: "mid", backingFormat: "qcow2" } },
  { name: "qcow2 -S 0", qemuArgs: ["-S", "0", "-O", "qcow2"], options: { format: "qcow2", sparseSizeBytes: 0 } },
  { name: "qcow2 -S 64k", qemuArgs: ["-S", "64k", "-O", "qcow2"], options: { format: "qcow2", sparseSizeBytes: 65536 } },
  {
    name: "qcow2 v2, 4 KiB clusters",
    qemuArgs: ["-O", "qcow2", "-o", "compat=0.10,cluster_size=4k"],
    options: { format: "qcow2", options: { compat: "0.10", cluster_size: 4096 } },
  },
  {
    name: "qcow2 refcount_bits=1, lazy refcounts, zstd",
    qemuArgs: ["-O", "qcow2", "-o", "refcount_bits=1,lazy_refcounts=on,compression_type=zstd"],
    options: { format: "qcow2", options: { refcount_bits: 1, lazy_refcounts: true, compression_type: "zstd" } },
  },
  {
    name: "compressed zstd with 2 MiB clusters",
    qemuArgs: ["-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=2M"],
    options: { format: "qcow2", compress: true, options: { compression_type: "zstd", cluster_size: 2 * 1024 * 1024 } },
    identical: false,
  },
];

for (const testCase of CASES) {
  test(`convert to ${testCase.name} is byte-identical to qemu-img convert`, async (t) => {
    if (!requireTools(t, "qemu-img", "qemu-io")) return;
    const dir = scratchDir(t);
    await bash(CHAIN, dir);
    await runOk("qemu-img", ["convert", ...testCase.qemuArgs, join(dir, "top"), join(dir, "theirs")]);
    const fractions: number[] = [];
    await ourConvert(dir, "top", "ours", { ...testCase.options, onProgress: (fraction) => fractions.push(fraction) });
    assert.equal(fractions[fractions.length - 1], 1);
    await assertValid(dir, "top", "ours");
    const ourMap = await runOk("qemu-img", ["map", "--output=json", join(dir, "ours")]);
    const theirMap = await runOk("qemu-img", ["map", "--output=json", join(dir, "theirs")]);
    assert.equal(ourMap.stdout, theirMap.stdout);
    if (testCase.identical !== false) assertSameFile(dir, "ours", "theirs");
  });
}

test("convert to raw gives qemu-img's bytes; -n writes into an existing target", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await bash(CHAIN, dir);
  await runOk("qemu-img", ["convert", "-O", "raw", join(dir, "top"), join(dir, "theirs.raw")]);
  await ourConvert(dir, "top", "ours.raw", { format: "raw" });
  assertSameFile(dir, "ours.raw", "theirs.raw");
  // -n into a target full of garbage: zero ranges must be written, not skipped.
  writeFileSync(join(dir, "existing.raw"), Buffer.alloc(8 * 1024 * 1024, 0xaa));
  await ourConvert(dir, "top", "existing.raw", { format: "raw", targetExists: true });
  assertSameFile(dir, "existing.raw", "theirs.raw");
  await bash(`qemu-img create -q -f qcow2 existing.qcow2 8M; qemu-io -c 'write -P 170 0 8M' existing.qcow2 >/dev/null`, dir);
  await ourConvert(dir, "top", "existing.qcow2", { format: "qcow2", targetExists: true });
  await assertValid(dir, "top", "existing.qcow2");
  // A target smaller than the source is refused.
  await bash(`qemu-img create -q -f qcow2 small.qcow2 1M`, dir);
  await assert.rejects(ourConvert(dir, "top", "small.qcow2", { format: "qcow2", targetExists: true }), { code: "E_OUT_OF_RANGE", message: "output file is smaller than input file" });
});

test("convert of random chains passes qemu-img compare and check", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  const dir = scratchDir(t);
  const ops = (): string => {
    const commands: string[] = [];
    for (let i = 0; i < 20; i++) {
      const offset = random.int(128) * 16384 + (random.next() < 0.3 ? random.int(32) * 512 : 0);
      const length = Math.min((1 + random.int(12)) * 8192, 4 * 1024 * 1024 - offset);
      const kind = random.int(4);
      if (kind === 0) commands.push(`-c 'write -z ${offset} ${length}'`);
      else if (kind === 1) commands.push(`-c 'discard ${offset} ${length}'`);
      else commands.push(`-c 'write -P ${1 + random.int(250)} ${offset} ${length}'`);
    }
    return commands.join(" ");
  };
  await bash(
    `qemu-img create -q -f qcow2 base 3M
     qemu-io ${ops()} base >/dev/null 2>&1 || true
     qemu-img create -q -f qcow2 -b base -F qcow2 top 4M
     qemu-io ${ops()} top >/dev/null 2>&1 || true`,
    dir,
  );
  for (const [target, options] of [
    ["t1", { format: "qcow2" }],
    ["t2", { format: "qcow2", compress: true }],
    ["t3", { format: "raw" }],
    ["t4", { format: "qcow2", backingFile: "base", backingFormat: "qcow2" }],
  ] as Array<[string, ConvertImageOptions]>) {
    await ourConvert(dir, "top", target, options);
    await assertValid(dir, "top", target);
  }
  await runOk("qemu-img", ["convert", "-O", "qcow2", join(dir, "top"), join(dir, "theirs")]);
  assertSameFile(dir, "t1", "theirs");
});
