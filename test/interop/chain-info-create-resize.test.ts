/**
 * imageInfo, createImage and resizeImage against qemu-img: info objects
 * equal `qemu-img info --output=json` field by field (rendered with the
 * CLI's QEMU-order JSON printer, byte for byte; actual-size is the same
 * stat() of the same file, so it matches exactly too), created images are
 * byte-identical to `qemu-img create`, resizes match `qemu-img resize`.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { readFileSync, writeFileSync, statSync, copyFileSync } from "node:fs";
import { imageInfo } from "../../src/chain/image-info.ts";
import { createImage, type CreateImageOptions } from "../../src/chain/create-image.ts";
import { resizeImage, type SizeSpec } from "../../src/chain/resize-image.ts";
import { formatQemuJson } from "../../src/cli/qemu-json.ts";
import { requireTools, run, runOk, scratchDir } from "../helpers/tools.ts";

async function bash(script: string, cwd: string): Promise<void> {
  await runOk("bash", ["-euc", `cd '${cwd}'\n${script}`]);
}

async function assertInfoLikeQemu(path: string, backingChain: boolean, format?: string): Promise<void> {
  const args = ["info", "--output=json", ...(backingChain ? ["--backing-chain"] : []), ...(format ? ["-f", format] : []), path];
  const qemu = await runOk("qemu-img", args);
  const infos = await imageInfo(path, { backingChain, format });
  const ours = formatQemuJson(backingChain ? infos : infos[0]);
  assert.deepEqual(JSON.parse(ours), JSON.parse(qemu.stdout), `info ${args.join(" ")}`);
  assert.equal(`${ours}\n`, qemu.stdout, `info ${args.join(" ")} (key order)`);
}

test("imageInfo equals qemu-img info --output=json", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await bash(
    `qemu-img create -q -f raw base.raw 3000
     qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 4M
     qemu-io -c 'write -P 1 0 64k' mid.qcow2 >/dev/null
     qemu-img snapshot -c first mid.qcow2
     qemu-img snapshot -c second mid.qcow2
     qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
     qemu-img create -q -f qcow2 -u -b mid.qcow2 -F qcow2 noformat.qcow2 4M
     # Turn the backing-format extension (first, at byte 112) into an unknown one: the format is then probed.
     printf '\x12\x34\x56\x78' | dd of=noformat.qcow2 bs=1 seek=112 conv=notrunc status=none
     qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M
     qemu-img create -q -f qcow2 -o lazy_refcounts=on,refcount_bits=4,cluster_size=16k,compression_type=zstd,extended_l2=on opts.qcow2 1G
     qemu-img create -q -f qcow2 -o cluster_size=2M big.qcow2 3T
     mkdir sub && qemu-img create -q -f qcow2 -b ../top.qcow2 -F qcow2 sub/leaf.qcow2`,
    dir,
  );
  for (const name of ["base.raw", "mid.qcow2", "top.qcow2", "noformat.qcow2", "v2.qcow2", "opts.qcow2", "big.qcow2", "sub/leaf.qcow2"]) {
    await assertInfoLikeQemu(join(dir, name), false);
  }
  for (const name of ["top.qcow2", "sub/leaf.qcow2", "noformat.qcow2"]) await assertInfoLikeQemu(join(dir, name), true);
  await assertInfoLikeQemu(join(dir, "top.qcow2"), false, "raw");
  // Relative names as typed on the command line.
  const cwd = process.cwd();
  process.chdir(dir);
  try {
    await assertInfoLikeQemu("sub/leaf.qcow2", true);
  } finally {
    process.chdir(cwd);
  }
  // A dirty lazy-refcounts image (qemu-io killed mid-write) shows dirty-flag true.
  await bash(`qemu-img create -q -f qcow2 -o lazy_refcounts=on dirty.qcow2 1M; qemu-io -c 'write -P 1 0 64k' -c 'sigraise 9' dirty.qcow2 >/dev/null 2>&1 || true`, dir);
  await assertInfoLikeQemu(join(dir, "dirty.qcow2"), false);
  await assert.rejects(imageInfo(join(dir, "missing")), { code: "E_NOT_FOUND" });
  await assert.rejects(imageInfo(join(dir, "base.raw"), { format: "qcow2" }), { code: "E_WRONG_FORMAT" });
  await assert.rejects(imageInfo(join(dir, "base.raw"), { format: "vmdk" }), { code: "E_CORRUPT_IMAGE", message: /invalid VMDK image descriptor/ });
  await assert.rejects(imageInfo(join(dir, "base.raw"), { format: "qed" }), { code: "E_UNKNOWN_FORMAT" });
});

const CREATE_CASES: Array<{ qemu: string[]; ours: CreateImageOptions; size?: number }> = [
  { qemu: ["-f", "qcow2"], ours: { format: "qcow2", options: {} }, size: 64 << 20 },
  { qemu: ["-f", "qcow2", "-o", "cluster_size=512,refcount_bits=1"], ours: { format: "qcow2", options: { cluster_size: "512", refcount_bits: "1" } }, size: 1 << 20 },
  { qemu: ["-f", "qcow2", "-o", "compat=0.10"], ours: { format: "qcow2", options: { compat: "0.10" } }, size: 10 << 20 },
  { qemu: ["-f", "qcow2", "-o", "compat=v3,lazy_refcounts=on,extended_l2=on"], ours: { format: "qcow2", options: { compat: "v3", lazy_refcounts: "on", extended_l2: true } }, size: 1 << 30 },
  { qemu: ["-f", "qcow2", "-o", "preallocation=metadata"], ours: { format: "qcow2", options: { preallocation: "metadata" } }, size: 8 << 20 },
  // A size that ends inside a cluster (subcluster): the file still reaches the end of it.
  { qemu: ["-f", "qcow2", "-o", "preallocation=metadata"], ours: { format: "qcow2", options: { preallocation: "metadata" } }, size: 1000000 },
  {
    qemu: ["-f", "qcow2", "-o", "preallocation=metadata,extended_l2=on"],
    ours: { format: "qcow2", options: { preallocation: "metadata", extended_l2: true } },
    size: 5000000,
  },
  { qemu: ["-f", "qcow2", "-o", "compression_type=zstd,cluster_size=2M"], ours: { format: "qcow2", options: { compression_type: "zstd", cluster_size: 2 * 1024 * 1024 } }, size: 1 << 30 },
  { qemu: ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"], ours: { format: "qcow2", backingFile: "base.qcow2", backingFormat: "qcow2", options: {} } },
  { qemu: ["-f", "qcow2", "-o", "backing_file=base.raw,backing_fmt=raw"], ours: { format: "qcow2", options: { backing_file: "base.raw", backing_fmt: "raw" } } },
  { qemu: ["-f", "qcow2", "-u", "-b", "nowhere.qcow2", "-F", "qcow2"], ours: { format: "qcow2", backingFile: "nowhere.qcow2", backingFormat: "qcow2", unsafe: true, options: {} }, size: 5 << 20 },
  { qemu: ["-f", "raw"], ours: { format: "raw", options: {} }, size: 1000 },
  { qemu: ["-f", "raw", "-o", "preallocation=full"], ours: { format: "raw", options: { preallocation: "full" } }, size: 1 << 20 },
];

test("createImage writes the same bytes as qemu-img create", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  await bash(`qemu-img create -q -f qcow2 base.qcow2 7M; qemu-img create -q -f raw base.raw 3M`, dir);
  for (const [index, testCase] of CREATE_CASES.entries()) {
    const theirs = join(dir, `theirs-${index}`);
    const ours = join(dir, `ours-${index}`);
    await runOk("qemu-img", ["create", "-q", ...testCase.qemu, theirs, ...(testCase.size !== undefined ? [String(testCase.size)] : [])]);
    writeFileSync(ours, "an existing file is overwritten, as qemu-img create does");
    await createImage(ours, { ...testCase.ours, sizeBytes: testCase.size });
    assert.ok(readFileSync(ours).equals(readFileSync(theirs)), `create ${testCase.qemu.join(" ")}`);
    assert.equal(statSync(ours).size, statSync(theirs).size);
  }
});

test("createImage refuses what qemu-img create refuses", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  await bash(`qemu-img create -q -f raw base.raw 3M`, dir);
  const path = join(dir, "x.qcow2");
  const expectations: Array<[CreateImageOptions, string, RegExp]> = [
    [{ format: "qcow2", backingFile: "base.raw", options: {} }, "E_BACKING_FORMAT", /Backing file specified without backing format/],
    [{ format: "qcow2", sizeBytes: 1 << 20, options: { foo: "bar" } }, "E_INVALID_OPTION", /Invalid parameter 'foo'/],
    [{ format: "qcow2", sizeBytes: 1 << 20, options: { lazy_refcounts: "maybe" } }, "E_INVALID_OPTION", /Parameter 'lazy_refcounts' expects 'on' or 'off'/],
    [{ format: "qcow2", sizeBytes: 1 << 20, options: { compat: "2.0" } }, "E_INVALID_OPTION", /Parameter 'version' does not accept value '2.0'/],
    [{ format: "qcow2", options: {} }, "E_INVALID_SIZE", /Image creation needs a size parameter/],
    [{ format: "raw", sizeBytes: 1 << 20, backingFile: "base.raw", backingFormat: "raw", options: {} }, "E_INVALID_OPTION", /Backing file not supported for file format 'raw'/],
    [{ format: "raw", sizeBytes: 1 << 20, options: { preallocation: "metadata" } }, "E_INVALID_OPTION", /Unsupported preallocation mode: metadata/],
    [{ format: "qcow2", backingFile: "missing.qcow2", backingFormat: "qcow2", options: {} }, "E_BACKING_MISSING", /missing\.qcow2/],
    [{ format: "qcow2", backingFile: "base.raw", backingFormat: "qcow2", options: {} }, "E_WRONG_FORMAT", /Image is not in qcow2 format/],
    [{ format: "qcow2", sizeBytes: 1 << 20, options: { cluster_size: 1000 } }, "E_INVALID_OPTION", /Cluster size must be a power of two/],
    [{ format: "qcow2", sizeBytes: 1 << 20, options: { "encrypt.format": "luks" } }, "E_UNSUPPORTED_FEATURE", /encrypt\.format/],
    [{ format: "vmdk", sizeBytes: 1 << 20, options: {} }, "E_UNSUPPORTED_FEATURE", /reads vmdk images but does not write them/],
    [{ format: "qed", sizeBytes: 1 << 20, options: {} }, "E_UNKNOWN_FORMAT", /Unknown file format 'qed'/],
  ];
  for (const [options, code, message] of expectations) {
    await assert.rejects(createImage(path, options), (error: Error & { code: string }) => {
      assert.equal(error.code, code, `${JSON.stringify(options)}: ${error.message}`);
      assert.match(error.message, message);
      return true;
    });
  }
  // qemu-img agrees these fail (exit 1).
  for (const args of [["-f", "qcow2", "-b", "base.raw", path], ["-f", "qcow2", "-o", "foo=bar", path, "1M"], ["-f", "qcow2", path]]) {
    assert.equal((await run("qemu-img", ["create", ...args])).code, 1, args.join(" "));
  }
});

test("resizeImage matches qemu-img resize for raw and qcow2", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await bash(
    `qemu-img create -q -f raw a.raw 1M
     qemu-io -f raw -c 'write -P 1 0 1M' a.raw >/dev/null
     qemu-img create -q -f qcow2 a.qcow2 4M
     qemu-io -c 'write -P 1 0 4M' a.qcow2 >/dev/null`,
    dir,
  );
  const steps: Array<{ file: string; qemu: string[]; spec: SizeSpec; shrink?: boolean }> = [
    { file: "a.raw", qemu: ["-f", "raw", "--shrink", "PATH", "1000"], spec: { absoluteBytes: 1000 }, shrink: true },
    { file: "a.raw", qemu: ["-f", "raw", "PATH", "+1k"], spec: { deltaBytes: 1024 } },
    { file: "a.raw", qemu: ["-f", "raw", "PATH", "3M"], spec: { absoluteBytes: 3 << 20 } },
    { file: "a.qcow2", qemu: ["PATH", "+60M"], spec: { deltaBytes: 60 << 20 } },
    { file: "a.qcow2", qemu: ["--shrink", "PATH", "--", "-62M"], spec: { deltaBytes: -(62 << 20) }, shrink: true },
    { file: "a.qcow2", qemu: ["PATH", "1G"], spec: { absoluteBytes: 1 << 30 } },
  ];
  for (const [index, step] of steps.entries()) {
    const theirs = join(dir, `theirs-${index}-${step.file}`);
    const ours = join(dir, `ours-${index}-${step.file}`);
    copyFileSync(join(dir, step.file), theirs);
    copyFileSync(join(dir, step.file), ours);
    await runOk("qemu-img", ["resize", "-q", ...step.qemu.map((arg) => (arg === "PATH" ? theirs : arg))]);
    await resizeImage(ours, step.spec, { shrink: step.shrink });
    assert.ok(readFileSync(ours).equals(readFileSync(theirs)), `resize ${step.qemu.join(" ")}`);
    copyFileSync(ours, join(dir, step.file));
  }
  const shrinkRefused = await run("qemu-img", ["resize", join(dir, "a.qcow2"), "1M"]);
  assert.match(shrinkRefused.stderr, /Use the --shrink option to perform a shrink operation\./);
  await assert.rejects(resizeImage(join(dir, "a.qcow2"), { absoluteBytes: 1 << 20 }), {
    code: "E_INVALID_SIZE",
    message: "Use the --shrink option to perform a shrink operation.",
  });
  await assert.rejects(resizeImage(join(dir, "a.raw"), { deltaBytes: -(1 << 30) }), { message: "New image size must be positive" });
});

test("growing an overlay over a longer backing file zeroes the new area byte for byte as qemu-img resize; compat=0.10 refuses untouched", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await bash(
    `qemu-img create -q -f qcow2 long.qcow2 4M
     qemu-io -c 'write -P 5 0 4M' long.qcow2 >/dev/null
     qemu-img create -q -f qcow2 short.qcow2 1000448
     qemu-io -c 'write -P 6 0 1000448' short.qcow2 >/dev/null`,
    dir,
  );
  // Unaligned and aligned old ends, backing longer or not, plain, 512 B, 2 MiB and subcluster geometries.
  const cases: Array<{ options: string; oldSize: number; newSize: number; backing: string }> = [
    { options: "cluster_size=65536", oldSize: 1000000, newSize: 3 << 20, backing: "long.qcow2" },
    { options: "cluster_size=65536", oldSize: 1 << 20, newSize: 8 << 20, backing: "long.qcow2" },
    { options: "cluster_size=512", oldSize: 1000000, newSize: 2 << 20, backing: "long.qcow2" },
    { options: "cluster_size=2097152", oldSize: 1000000, newSize: 3 << 20, backing: "long.qcow2" },
    { options: "extended_l2=on", oldSize: 1000000, newSize: 3 << 20, backing: "long.qcow2" },
    { options: "cluster_size=65536", oldSize: 1000448, newSize: 3 << 20, backing: "short.qcow2" },
  ];
  for (const [index, step] of cases.entries()) {
    const theirs = join(dir, `grow-theirs-${index}.qcow2`);
    const ours = join(dir, `grow-ours-${index}.qcow2`);
    await bash(
      `qemu-img create -q -f qcow2 -o ${step.options} -b ${step.backing} -F qcow2 ${theirs} ${step.oldSize}
       qemu-io -c 'write -P 9 4096 8192' ${theirs} >/dev/null
       cp ${theirs} ${ours}
       qemu-img resize -q ${theirs} ${step.newSize}`,
      dir,
    );
    await resizeImage(ours, { absoluteBytes: step.newSize });
    const what = `${step.options}, ${step.oldSize} -> ${step.newSize} over ${step.backing}`;
    assert.ok(readFileSync(ours).equals(readFileSync(theirs)), what);
    // Past the old end the disk reads zeroes, not the backing file's bytes.
    const compare = await runOk("qemu-img", ["compare", ours, theirs]);
    assert.match(compare.stdout, /Images are identical/, what);
  }
  const v2 = join(dir, "v2.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "long.qcow2", "-F", "qcow2", v2, "1000000"]);
  const before = readFileSync(v2);
  const refused = await run("qemu-img", ["resize", v2, "3M"]);
  assert.match(refused.stderr, /Failed to zero out new clusters: Operation not supported/);
  assert.ok(readFileSync(v2).equals(before), "qemu-img's refusal left the image as it was");
  await assert.rejects(resizeImage(v2, { absoluteBytes: 3 << 20 }), { code: "E_UNSUPPORTED_FEATURE", message: /Failed to zero out new clusters: Operation not supported/ });
  assert.ok(readFileSync(v2).equals(before), "the refused image is untouched");
});
