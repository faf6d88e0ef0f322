/**
 * compareImages against `qemu-img compare` (and -s): same verdict, same
 * message, same mismatch offset, on pairs of images made with qemu-io.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { openImage } from "../../src/chain/open-image.ts";
import { compareImages } from "../../src/chain/compare-images.ts";
import { requireTools, run, runOk, scratchDir } from "../helpers/tools.ts";
import { createRandom, testSeed } from "../helpers/random.ts";

async function bash(script: string, cwd: string): Promise<void> {
  await runOk("bash", ["-euc", `cd '${cwd}'\n${script}`]);
}

async function assertLikeQemu(a: string, b: string, strict: boolean): Promise<void> {
  const qemu = await run("qemu-img", ["compare", ...(strict ? ["-s"] : []), a, b]);
  assert.ok(qemu.code === 0 || qemu.code === 1, `qemu-img compare failed: ${qemu.stderr}`);
  const left = await openImage(a, { readOnly: true });
  const right = await openImage(b, { readOnly: true });
  try {
    const result = await compareImages(left, right, { strict });
    assert.equal(result.identical, qemu.code === 0, `${a} vs ${b} strict=${strict}: qemu said ${qemu.stdout}`);
    assert.equal(`${result.message}\n`, qemu.stdout, `${a} vs ${b} strict=${strict}`);
  } finally {
    await left.close();
    await right.close();
  }
}

const PAIRS: Array<{ name: string; script: string }> = [
  {
    name: "identical content, different allocation",
    script: `qemu-img create -q -f qcow2 a 4M
      qemu-io -c 'write -P 1 0 1M' -c 'write -z 2M 64k' a >/dev/null
      qemu-img create -q -f qcow2 b 4M
      qemu-io -c 'write -P 1 0 1M' -c 'write -P 0 3M 64k' b >/dev/null`,
  },
  {
    name: "one differing byte in a data cluster",
    script: `qemu-img create -q -f qcow2 a 4M
      qemu-io -c 'write -P 1 0 1M' a >/dev/null
      qemu-img create -q -f qcow2 b 4M
      qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 300000 1' b >/dev/null`,
  },
  {
    name: "data on one side only",
    script: `qemu-img create -q -f qcow2 a 4M
      qemu-img create -q -f qcow2 b 4M
      qemu-io -c 'write -P 3 2M 512' b >/dev/null`,
  },
  {
    name: "sizes differ, extra area zero",
    script: `qemu-img create -q -f qcow2 a 4M
      qemu-io -c 'write -P 1 0 64k' a >/dev/null
      qemu-img create -q -f qcow2 b 8M
      qemu-io -c 'write -P 1 0 64k' -c 'write -z 6M 64k' b >/dev/null`,
  },
  {
    name: "sizes differ, extra area has data",
    script: `qemu-img create -q -f qcow2 a 4M
      qemu-img create -q -f qcow2 b 8M
      qemu-io -c 'write -P 5 7M 4k' b >/dev/null`,
  },
  {
    name: "chain against its flattened copy (raw without holes)",
    script: `qemu-img create -q -f qcow2 base 4M
      qemu-io -c 'write -P 1 0 4M' base >/dev/null
      qemu-img create -q -f qcow2 -b base -F qcow2 a
      qemu-io -c 'write -P 2 1M 64k' -c 'write -z 2M 64k' a >/dev/null
      qemu-img convert -S 0 -O raw a b`,
  },
  {
    name: "overlay larger than its backing against an empty image",
    script: `qemu-img create -q -f qcow2 base 2M
      qemu-img create -q -f qcow2 -b base -F qcow2 a 4M
      qemu-img create -q -f qcow2 b 4M`,
  },
  {
    name: "overlay larger than its backing against a copy",
    script: `qemu-img create -q -f qcow2 base 2M
      qemu-io -c 'write -P 1 0 2M' base >/dev/null
      qemu-img create -q -f qcow2 -b base -F qcow2 a 4M
      qemu-io -c 'write -P 2 3M 64k' a >/dev/null
      qemu-img convert -O qcow2 a b`,
  },
  {
    name: "extended L2 against plain clusters over a backing file shorter than both (zeroes past its end carry no host offset)",
    script: `qemu-img create -q -f qcow2 base 512
      qemu-img create -q -f qcow2 -o cluster_size=64k -b base -F qcow2 a 2M
      qemu-img create -q -f qcow2 -o cluster_size=2M,extended_l2=on -b base -F qcow2 b 2M
      qemu-io -c 'write -P 1 1M 64k' a >/dev/null
      qemu-io -c 'write -P 1 1M 64k' b >/dev/null`,
  },
  {
    name: "4 KiB clusters against 64 KiB ones: QEMU's status answers end with each L2 table, so only one reaches the end (strict: EOF bit)",
    script: `qemu-img create -q -f qcow2 -o cluster_size=4096 a 4M
      qemu-img create -q -f qcow2 b 4M`,
  },
  {
    name: "512-byte clusters over a 512-byte backing file, one zero cluster (strict: answers stepped table by table)",
    script: `qemu-img create -q -f qcow2 base 512
      qemu-img create -q -f qcow2 -o cluster_size=512 -b base -F qcow2 a 1M
      qemu-img create -q -f qcow2 -o cluster_size=512 -b base -F qcow2 b 1M
      qemu-io -c 'write -z 64k 512' b >/dev/null`,
  },
  {
    name: "compressed against plain",
    script: `qemu-img create -q -f qcow2 a 4M
      qemu-io -c 'write -c -P 7 0 64k' -c 'write -c -P 8 1M 64k' a >/dev/null
      qemu-img create -q -f qcow2 b 4M
      qemu-io -c 'write -P 7 0 64k' -c 'write -P 8 1M 64k' b >/dev/null`,
  },
];

for (const pair of PAIRS) {
  test(`compare like qemu-img: ${pair.name}`, async (t) => {
    if (!requireTools(t, "qemu-img", "qemu-io")) return;
    const dir = scratchDir(t);
    await bash(pair.script, dir);
    for (const strict of [false, true]) {
      await assertLikeQemu(join(dir, "a"), join(dir, "b"), strict);
      await assertLikeQemu(join(dir, "b"), join(dir, "a"), strict);
    }
  });
}

test("compare like qemu-img on random writes", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  const dir = scratchDir(t);
  const shared: string[] = [];
  for (let i = 0; i < 10; i++) shared.push(`-c 'write -P ${1 + random.int(100)} ${random.int(60) * 65536} ${(1 + random.int(4)) * 4096}'`);
  const extra = random.int(2) === 0 ? `-c 'write -P 200 ${random.int(4000) * 1024} 1'` : `-c 'write -z ${random.int(60) * 65536} 65536'`;
  await bash(
    `qemu-img create -q -f qcow2 a 4M
     qemu-img create -q -f qcow2 b 4M
     qemu-io ${shared.join(" ")} a >/dev/null
     qemu-io ${shared.join(" ")} ${extra} b >/dev/null`,
    dir,
  );
  await assertLikeQemu(join(dir, "a"), join(dir, "b"), false);
  await assertLikeQemu(join(dir, "b"), join(dir, "a"), false);
});
