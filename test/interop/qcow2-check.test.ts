/**
 * checkQcow2 against `qemu-img check`: images made by qemu-img/qemu-io in
 * many configurations, then damaged by poking bytes. For every image and
 * repair mode, both checkers run on identical copies; the JSON report, the
 * stderr lines and the exit status must be equal, and after a repair
 * qemu-img must judge both repaired files the same way.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, readFileSync, writeFileSync, statSync, truncateSync } from "node:fs";
import { join } from "node:path";
import { requireTools, runOk, run, scratchDir } from "../helpers/tools.ts";
import { openNodeFile } from "../../src/io/node-file.ts";
import { checkQcow2, qemuCheckExitCode, toQemuCheckJson } from "../../src/formats/qcow2/check.ts";
import type { Qcow2RepairMode } from "../../src/formats/qcow2/check.ts";
import { rebuildRefcounts } from "../../src/formats/qcow2/rebuild-refcounts.ts";
import { CHECK_MESSAGES_MAX } from "../../src/formats/qcow2/reference-counter.ts";
import { formatQemuJson } from "../../src/cli/qemu-json.ts";
import { CONFIGS, DAMAGES, addRefcount, inspect, makeConfigImage, makeImage } from "../helpers/check-damage.ts";

interface Outcome {
  stdout: string;
  stderr: string;
  code: number;
}

/** Run our check the way `qemu-img check --output=json` prints. */
async function ourCheck(path: string, repair?: Qcow2RepairMode): Promise<Outcome> {
  const file = await openNodeFile(path, { readOnly: repair === undefined });
  try {
    const result = await checkQcow2(file, { repair });
    const stderr = result.messages.map((line) => line + "\n");
    if (result.failure !== null) {
      stderr.push(`qemu-img: Check failed: ${result.failure}\n`);
      return { stdout: "", stderr: stderr.join(""), code: 1 };
    }
    if (result.checkErrors > 0) stderr.push("qemu-img: Check failed\n");
    return { stdout: formatQemuJson(toQemuCheckJson(result, path)) + "\n", stderr: stderr.join(""), code: qemuCheckExitCode(result) };
  } finally {
    await file.close();
  }
}

async function qemuCheck(path: string, repair?: Qcow2RepairMode): Promise<Outcome> {
  const args = ["check", "--output=json", ...(repair ? ["-r", repair] : []), path];
  const result = await run("qemu-img", args);
  return { stdout: result.stdout, stderr: result.stderr, code: result.code };
}

/**
 * checkQcow2 keeps CHECK_MESSAGES_MAX detail lines and then one
 * "(N more lines not kept)" line: compare the kept prefix and N.
 */
function assertSameStderr(actual: string, expected: string, label: string): void {
  const actualLines = actual.split("\n");
  const dropped = actualLines.findIndex((line) => /^\(\d+ more lines not kept\)$/.test(line));
  if (dropped < 0) {
    assert.equal(actual, expected, `stderr of ${label}`);
    return;
  }
  assert.equal(dropped, CHECK_MESSAGES_MAX);
  const expectedLines = expected.split("\n");
  assert.deepEqual(actualLines.slice(0, dropped), expectedLines.slice(0, dropped), `kept stderr lines of ${label}`);
  const droppedCount = Number(/\d+/.exec(actualLines[dropped])?.[0]);
  // Both end with the same trailer (e.g. "qemu-img: Check failed") after the detail lines.
  const actualTail = actualLines.slice(dropped + 1);
  assert.deepEqual(expectedLines.slice(dropped + droppedCount), actualTail, `stderr after the dropped lines of ${label}`);
}

/** Both checkers on copies of `image`; asserts equal reports, returns qemu's. */
async function compareChecks(dir: string, image: string, repair?: Qcow2RepairMode, compareAfterRepair = true): Promise<Outcome> {
  const ours = join(dir, "ours.qcow2");
  const theirs = join(dir, "theirs.qcow2");
  copyFileSync(image, ours);
  copyFileSync(image, theirs);
  const expected = await qemuCheck(theirs, repair);
  const actual = await ourCheck(ours, repair);
  const label = `${image} ${repair ?? "(no repair)"}`;
  assert.equal(actual.stdout, expected.stdout.replaceAll(theirs, ours), `stdout of ${label}`);
  assertSameStderr(actual.stderr, expected.stderr.replaceAll(theirs, ours), label);
  assert.equal(actual.code, expected.code, `exit status of ${label}`);
  if (repair !== undefined && compareAfterRepair) {
    // After a repair, qemu-img must see the same state in both files.
    const after = await qemuCheck(ours);
    const reference = await qemuCheck(theirs);
    assert.equal(after.stdout.replaceAll(ours, "X"), reference.stdout.replaceAll(theirs, "X"), `qemu-img check after ${label}`);
    assert.equal(after.code, reference.code, `qemu-img exit status after ${label}`);
  }
  return expected;
}

for (const config of CONFIGS) {
  test(`check matches qemu-img: ${config.name}, undamaged and damaged`, async (t) => {
    if (!requireTools(t, "qemu-img", "qemu-io")) return;
    const dir = scratchDir(t);
    const pristine = await makeConfigImage(dir, config);
    for (const repair of [undefined, "leaks", "all"] as const) await compareChecks(dir, pristine, repair);
    let applied = 0;
    for (const damage of DAMAGES) {
      const path = join(dir, `damaged.qcow2`);
      copyFileSync(pristine, path);
      const layout = inspect(path);
      if (!damage.apply(layout, path)) continue;
      if (statSync(path).size <= layout.bytes.length) writeFileSync(path, layout.bytes);
      applied++;
      await t.test(damage.name, async () => {
        for (const repair of damage.repairs ?? [undefined, "leaks", "all"]) await compareChecks(dir, path, repair);
      });
    }
    t.diagnostic(`${applied} damages applied`);
  });
}

test("check matches qemu-img: backing file, preallocation, bitmaps, empty, big sparse, convert -c", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const base = await makeImage(dir, "base.qcow2", [], ["write -P 7 0 8M"]);
  const overlay = join(dir, "overlay.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay]);
  await runOk("qemu-io", ["-c", "write -P 8 64k 64k", "-c", "write -z 1M 64k", "-c", "discard 2M 64k", overlay]);
  const images = [
    overlay,
    await makeImage(dir, "prealloc.qcow2", ["-o", "preallocation=metadata"], []),
    await makeImage(dir, "prealloc4k.qcow2", ["-o", "preallocation=metadata,cluster_size=4k"], []),
    await makeImage(dir, "bitmaps.qcow2", [], []),
    await makeImage(dir, "lazy.qcow2", ["-o", "lazy_refcounts=on"]),
  ];
  await runOk("qemu-img", ["bitmap", "--add", images[3], "b0"]);
  await runOk("qemu-img", ["bitmap", "--add", "-g", "512", images[3], "b1"]);
  await runOk("qemu-io", ["-c", "write 0 1M", images[3]]);
  const empty = join(dir, "empty.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", empty, "0"]);
  const big = join(dir, "big.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", big, "100G"]);
  await runOk("qemu-io", ["-c", "write -P 1 50G 64k", big]);
  const converted = join(dir, "converted.qcow2");
  await runOk("qemu-img", ["convert", "-c", "-O", "qcow2", base, converted]);
  images.push(empty, big, converted);
  for (const image of images) {
    // The overlay must stay next to its backing file: check in place (no repair).
    if (image === overlay) {
      const expected = await qemuCheck(image);
      const actual = await ourCheck(image);
      assert.equal(actual.stdout, expected.stdout);
      assert.equal(actual.code, expected.code);
      continue;
    }
    // A read-write open by QEMU stores persistent bitmaps again on close (new
    // clusters), which snapstack does not do: compare the check reports only.
    const compareAfterRepair = image !== images[3];
    for (const repair of [undefined, "leaks", "all"] as const) await compareChecks(dir, image, repair, compareAfterRepair);
  }
});

test("check reports like qemu-img when the header or tables are hostile", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const pristine = await makeImage(dir, "p.qcow2", []);
  const pokes: { name: string; at: number; bytes: number[] }[] = [
    { name: "70000 snapshots", at: 60, bytes: [0, 1, 0x11, 0x70] },
    { name: "one snapshot at offset 0 (the header)", at: 60, bytes: [0, 0, 0, 1] },
    { name: "snapshot table unaligned", at: 64, bytes: [0, 0, 0, 0, 0, 0, 1, 0] },
    { name: "no refcount table", at: 56, bytes: [0, 0, 0, 0] },
    { name: "4 Mi L1 entries", at: 36, bytes: [0, 0x40, 0, 0] },
  ];
  // The first refcount block far past the end of any file: past 2^53 (QEMU reads zeroes there, refcount 0), and past 2^63.
  const reftableOffset = Number(readFileSync(pristine).readBigUInt64BE(48));
  pokes.push({ name: "refcount block at 2^59", at: reftableOffset, bytes: [0x08] }, { name: "refcount block at 2^63", at: reftableOffset, bytes: [0x80] });
  for (const poke of pokes) {
    const path = join(dir, "hostile.qcow2");
    copyFileSync(pristine, path);
    const bytes = readFileSync(path);
    bytes.set(poke.bytes, poke.at);
    writeFileSync(path, bytes);
    await t.test(poke.name, async () => {
      for (const repair of [undefined, "leaks"] as const) await compareChecks(dir, path, repair);
    });
  }
  // Refused at open by both.
  for (const [at, value, message] of [
    [36, [1, 0, 0, 0], "Active L1 table too large"],
    [56, [0, 0, 0x10, 0], "Reference count table too large"],
    [40, [0, 0, 0, 0, 0, 3, 2, 0], "Active L1 table offset invalid"],
    [48, [0, 0, 0, 0, 0, 1, 2, 0], "Reference count table offset invalid"],
  ] as const) {
    const path = join(dir, "refused.qcow2");
    copyFileSync(pristine, path);
    const bytes = readFileSync(path);
    bytes.set(value, at);
    writeFileSync(path, bytes);
    const expected = await qemuCheck(path);
    assert.equal(expected.code, 1);
    assert.match(expected.stderr, new RegExp(message));
    const file = await openNodeFile(path, { readOnly: true });
    await assert.rejects(checkQcow2(file), (error: Error) => error.message === message);
    await file.close();
  }
});

test("rebuildRefcounts repairs a crashed lazy-refcounts image so qemu-img finds it clean", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  for (const options of ["lazy_refcounts=on", "lazy_refcounts=on,cluster_size=4k,refcount_bits=64", "lazy_refcounts=on,extended_l2=on"]) {
    const path = join(dir, "crashed.qcow2");
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-o", options, path, "64M"]);
    // abort: the process dies with the dirty bit set and refcounts not updated.
    await run("qemu-io", ["-c", "write -P 1 0 1M", "-c", "write -P 3 8M 64k", "-c", "write -P 4 20M 3M", "-c", "abort", path]);
    const before = await qemuCheck(path);
    assert.equal(before.code, 2, `${options}: the crash left corruptions`);
    const file = await openNodeFile(path);
    const result = await rebuildRefcounts(file);
    await file.close();
    assert.equal(result.header.incompatibleFeatures & 1n, 0n, "dirty bit cleared");
    assert.match(result.messages.join("\n"), /Rebuilding refcount structure/);
    const after = await qemuCheck(path);
    assert.equal(after.code, 0, `${options}: clean after rebuild: ${after.stderr}`);
    assert.equal((await ourCheck(path)).code, 0);
    for (const [pattern, offset, length] of [
      [1, "0", "1M"],
      [3, "8M", "64k"],
      [4, "20M", "3M"],
    ] as const) {
      await runOk("qemu-io", ["-r", "-c", `read -P ${pattern} ${offset} ${length}`, path]);
    }
  }
});

test("rebuildRefcounts on a dirty image with snapshots and wrong refcounts keeps every snapshot readable", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await makeImage(dir, "dirty.qcow2", ["-o", "lazy_refcounts=on,cluster_size=4k"]);
  await runOk("qemu-img", ["snapshot", "-c", "s1", path]);
  await runOk("qemu-io", ["-c", "write -P 9 0 64k", path]);
  // Damage: zero every refcount in the first block except the header's, and set the dirty bit.
  const layout = inspect(path);
  for (let cluster = 1; cluster < 64; cluster++) addRefcount(layout, cluster, -1000);
  layout.bytes[79] |= 1;
  writeFileSync(path, layout.bytes);
  assert.equal((await qemuCheck(path)).code, 2);
  const file = await openNodeFile(path);
  await rebuildRefcounts(file);
  await file.close();
  assert.equal((await qemuCheck(path)).code, 0);
  await runOk("qemu-io", ["-r", "-c", "read -P 9 0 64k", "-c", "read -P 2 1M 64k", path]);
  await runOk("qemu-img", ["snapshot", "-a", "s1", path]);
  await runOk("qemu-io", ["-r", "-c", "read -P 1 0 64k", "-c", "read -P 3 2M 2M", "-c", "read -P 0 6M 64k", path]);
  assert.equal((await qemuCheck(path)).code, 0);
});

test("repairing leaks leaves an image both checkers call clean", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await makeImage(dir, "leaky.qcow2", []);
  // Leak three clusters past the current end.
  const layout = inspect(path);
  const clusters = Math.ceil(layout.bytes.length / layout.clusterSize);
  truncateSync(path, (clusters + 3) * layout.clusterSize);
  const grown = inspect(path);
  for (let i = 0; i < 3; i++) addRefcount(grown, clusters + i, 1);
  writeFileSync(path, grown.bytes);
  assert.equal((await qemuCheck(path)).code, 3);
  const file = await openNodeFile(path);
  const repaired = await checkQcow2(file, { repair: "leaks" });
  await file.close();
  assert.equal(repaired.leaksFixed, 3);
  assert.equal(qemuCheckExitCode(repaired), 0);
  assert.equal((await qemuCheck(path)).code, 0);
  assert.equal((await ourCheck(path)).code, 0);
});
