/**
 * Internal snapshots against qemu-img 7.2, both directions:
 * - the same operations on copies of one image leave byte-identical files
 *   with the same ranges allocated: snapstack, with or without --wipe,
 *   punches holes in the clusters it frees, as qemu-img's default does
 *   (pass-discard-snapshot=on). Without the native addon snapstack cannot
 *   punch: then only --wipe (zeroes written) is compared with that, and no
 *   wipe with pass-discard-snapshot=off;
 * - snapshots made by one tool are applied and deleted by the other, with
 *   every state compared with a model and `qemu-img check` clean each step;
 * - `snapshot -l` and `info` print what qemu-img prints; errors say what
 *   qemu-img says; VM state from savevm survives;
 * - a randomized mix of both tools, checked after every step (prints its seed).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { allocatedRanges, requireTools, run, scratchDir } from "../helpers/tools.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { assertCheckClean, openImage } from "./qcow2-engine-helpers.ts";
import { SNAPSTACK_BIN, ok, qemuImg, qemuIo, snapstack as snapstackCli } from "./cli-helpers.ts";
import { openSnapshotView } from "../../src/formats/qcow2/snapshot-view.ts";
import type { SnapshotDate } from "../../src/formats/qcow2/internal-snapshots.ts";
import { nativeFileOpsLoaded } from "../../src/io/native-file-ops.ts";

const MiB = 1024 * 1024;

/** `snapstack img snapshot ARGS`. */
function snapstack(args: string[]): ReturnType<typeof snapstackCli> {
  return snapstackCli(["img", "snapshot", ...args]);
}

interface QemuSnapshotJson {
  id: string;
  name: string;
  "date-sec": number;
  "date-nsec": number;
  "vm-state-size": number;
}

async function qemuSnapshots(path: string): Promise<QemuSnapshotJson[]> {
  const info = JSON.parse(ok(await qemuImg(["info", "-U", "--output=json", path]), "qemu-img info").stdout) as { snapshots?: QemuSnapshotJson[] };
  return info.snapshots ?? [];
}

/** Guest content of an image, or of one of its snapshots, as qemu-img reads it. */
async function qemuContent(dir: string, path: string, snapshotName?: string): Promise<Buffer> {
  const out = join(dir, `content-${Math.random().toString(36).slice(2)}.raw`);
  const args = ["convert", "-U", "-O", "raw", ...(snapshotName === undefined ? [] : ["-l", `snapshot.name=${snapshotName}`]), path, out];
  ok(await qemuImg(args), `qemu-img ${args.join(" ")}`);
  return readFileSync(out);
}

function assertSameContent(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: size`);
  const a = Buffer.from(actual.buffer, actual.byteOffset, actual.byteLength);
  if (!a.equals(Buffer.from(expected.buffer, expected.byteOffset, expected.byteLength))) {
    let i = 0;
    while (actual[i] === expected[i]) i++;
    assert.fail(`${what}: first difference at byte ${i}`);
  }
}

/** File offsets of the alignment padding between snapshot table entries. */
function tablePadding(file: Buffer): Set<number> {
  const count = file.readUInt32BE(60);
  const tableOffset = Number(file.readBigUInt64BE(64));
  const padding = new Set<number>();
  let at = 0;
  for (let i = 0; i < count; i++) {
    for (; at % 8 !== 0; at++) padding.add(tableOffset + at);
    const entry = tableOffset + at;
    at += 40 + file.readUInt32BE(entry + 36) + file.readUInt16BE(entry + 12) + file.readUInt16BE(entry + 14);
  }
  return padding;
}

type Step = { op: "create" | "apply" | "delete"; name: string } | { op: "io"; commands: string[] };

const STEPS: Step[] = [
  { op: "create", name: "one" },
  { op: "io", commands: ["write -P 0xdd 0 64k", "write -P 0xee 6M 64k", "write -z 5M 64k"] },
  { op: "create", name: "two" },
  { op: "io", commands: ["write -P 0x11 32k 96k", "discard 1M 128k"] },
  { op: "apply", name: "one" },
  { op: "io", commands: ["write -P 0x22 0 8k"] },
  { op: "delete", name: "two" },
  { op: "create", name: "three" },
  { op: "delete", name: "one" },
  { op: "apply", name: "three" },
  { op: "delete", name: "three" },
];

const LAYOUTS: { label: string; options: string }[] = [
  { label: "defaults", options: "" },
  { label: "compat=0.10", options: "compat=0.10" },
  { label: "4 KiB clusters", options: "cluster_size=4k" },
  { label: "extended L2", options: "extended_l2=on,cluster_size=128k" },
  { label: "refcount_bits=4", options: "refcount_bits=4" },
  { label: "lazy refcounts", options: "lazy_refcounts=on" },
];

for (const layout of LAYOUTS) {
  for (const wipe of [false, true]) {
    test(`same bytes and allocation as qemu-img snapshot (${layout.label}, ${wipe ? "--wipe" : "no wipe"})`, async (t) => {
      if (!requireTools(t, "qemu-img", "qemu-io")) return;
      const dir = scratchDir(t);
      const base = join(dir, "base.qcow2");
      ok(await qemuImg(["create", "-f", "qcow2", ...(layout.options ? ["-o", layout.options] : []), base, "8M"]), "create");
      ok(await qemuIo(["-c", "write -P 0xaa 0 1M", "-c", "write -P 0xbb 5M 256k", "-c", "write -c -P 0xcc 2M 128k", base]), "qemu-io");
      const q = join(dir, "q.qcow2");
      const s = join(dir, "s.qcow2");
      copyFileSync(base, q);
      copyFileSync(base, s);
      const punches = nativeFileOpsLoaded();
      const qemuTarget = wipe || punches ? [q] : ["--image-opts", `driver=qcow2,pass-discard-snapshot=off,file.filename=${q}`];
      const padding = new Set<number>();
      for (const [index, step] of STEPS.entries()) {
        const what = `step ${index} ${JSON.stringify(step)}`;
        if (step.op === "io") {
          for (const path of [q, s]) ok(await qemuIo(step.commands.flatMap((c) => ["-c", c]).concat(path)), `${what} on ${path}`);
          continue;
        }
        const flag = { create: "-c", apply: "-a", delete: "-d" }[step.op];
        ok(await qemuImg(["snapshot", flag, step.name, ...qemuTarget]), `${what}: qemu-img`);
        const image = await openImage(s, false);
        try {
          if (step.op === "create") {
            const made = (await qemuSnapshots(q)).at(-1) as QemuSnapshotJson;
            const date: SnapshotDate = { seconds: made["date-sec"], nanoseconds: made["date-nsec"] };
            await image.createSnapshot(step.name, { date, wipe });
          } else if (step.op === "apply") {
            await image.applySnapshot(step.name, { wipe });
          } else {
            await image.deleteSnapshot(step.name, { wipe });
          }
        } finally {
          await image.close();
        }
        const qBytes = readFileSync(q);
        const sBytes = readFileSync(s);
        assert.equal(sBytes.length, qBytes.length, `${what}: file size`);
        // QEMU writes table entries one by one, leaving whatever the cluster held in the
        // padding between them; snapstack writes zeroes there. Nothing else may differ.
        for (const at of tablePadding(sBytes)) padding.add(at); // old tables keep their padding after being freed
        for (let i = 0; i < sBytes.length; i++) {
          if (sBytes[i] !== qBytes[i] && !(sBytes[i] === 0 && padding.has(i))) {
            assert.fail(`${what}: files differ at byte ${i} (cluster ${Math.floor(i / 65536)} of 64 KiB)`);
          }
        }
        if (punches) assert.deepEqual(await allocatedRanges(s), await allocatedRanges(q), `${what}: allocated ranges`);
        await assertCheckClean(s);
      }
    });
  }
}

test("snapshots made by qemu-img, applied and deleted by snapstack, and the other way round", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = join(dir, "x.qcow2");
  ok(await qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=16k", path, "4M"]), "create");
  const model = new Map<string, Buffer>();
  ok(await qemuIo(["-c", "write -P 0x31 0 512k", "-c", "write -c -P 0x32 1M 64k", path]), "io");
  ok(await qemuImg(["snapshot", "-c", "q1", path]), "qemu-img -c q1");
  model.set("q1", await qemuContent(dir, path));
  ok(await qemuIo(["-c", "write -P 0x33 16k 64k", "-c", "write -z 1M 16k", path]), "io");
  ok(await qemuImg(["resize", path, "6M"]), "resize");
  ok(await qemuIo(["-c", "write -P 0x34 5M 64k", path]), "io");
  ok(await qemuImg(["snapshot", "-c", "q2", path]), "qemu-img -c q2");
  model.set("q2", await qemuContent(dir, path));

  // snapstack applies a qemu snapshot of another size, then deletes the other.
  ok(await snapstack(["-a", "q1", path]), "snapstack -a q1");
  assertSameContent(await qemuContent(dir, path), model.get("q1") as Buffer, "active after snapstack -a q1 (size restored)");
  await assertCheckClean(path);
  ok(await snapstack(["-d", "q2", path]), "snapstack -d q2");
  await assertCheckClean(path);
  assertSameContent(await qemuContent(dir, path, "q1"), model.get("q1") as Buffer, "q1 after deleting q2");

  // snapstack creates; qemu-img applies and deletes.
  ok(await qemuIo(["-c", "write -P 0x35 0 32k", path]), "io");
  ok(await snapstack(["-c", "s1", path]), "snapstack -c s1");
  model.set("s1", await qemuContent(dir, path));
  await assertCheckClean(path);
  ok(await qemuIo(["-c", "write -P 0x36 0 1M", path]), "io");
  ok(await snapstack(["-c", "s2", path]), "snapstack -c s2");
  model.set("s2", await qemuContent(dir, path));
  for (const name of ["q1", "s1", "s2"]) assertSameContent(await qemuContent(dir, path, name), model.get(name) as Buffer, `qemu reads ${name}`);
  ok(await qemuImg(["snapshot", "-a", "s1", path]), "qemu-img -a s1");
  assertSameContent(await qemuContent(dir, path), model.get("s1") as Buffer, "active after qemu-img -a s1");
  await assertCheckClean(path);
  ok(await qemuImg(["snapshot", "-d", "q1", path]), "qemu-img -d q1");
  ok(await qemuImg(["snapshot", "-d", "s2", path]), "qemu-img -d s2");
  await assertCheckClean(path);
  assertSameContent(await qemuContent(dir, path, "s1"), model.get("s1") as Buffer, "s1 at the end");
  const image = await openImage(path, true);
  const view = await openSnapshotView(image, "s1");
  const seen = new Uint8Array(view.sizeBytes);
  await view.read(0, seen);
  await view.close();
  await image.close();
  assertSameContent(seen, model.get("s1") as Buffer, "snapstack's view of s1");
});

test("snapshot -l and info list snapshots exactly as qemu-img (long and empty names, both tools' entries)", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  const path = join(dir, "l.qcow2");
  ok(await qemuImg(["create", "-f", "qcow2", path, "1M"]), "create");
  assert.equal(ok(await snapstack(["-l", path]), "-l without snapshots").stdout, "", "nothing listed without snapshots");
  ok(await qemuImg(["snapshot", "-c", "made by qemu", path]), "qemu -c");
  ok(await snapstack(["-c", "x".repeat(300), path]), "snapstack -c long");
  ok(await snapstack(["-c", "", path]), "snapstack -c empty");
  // 300 bytes of 3-byte pairs: the 255-byte cut falls between characters (a cut inside one prints
  // a lone byte in qemu-img; snapstack drops the partial character).
  ok(await qemuImg(["snapshot", "-c", "aé".repeat(100), path]), "qemu -c multibyte");
  ok(await snapstack(["-q", "-c", "made by snapstack", path]), "snapstack -c -q");
  const env = { ...process.env, TZ: "America/New_York" };
  const ours = await run(process.execPath, [SNAPSTACK_BIN, "img", "snapshot", "-l", path], { env });
  const theirs = await run("qemu-img", ["snapshot", "-l", path], { env });
  assert.equal(ours.code, 0, ours.stderr);
  assert.equal(ours.stdout, theirs.stdout);
  assert.match(ours.stdout, /^Snapshot list:\nID {8}TAG {15}VM SIZE {16}DATE {5}VM CLOCK {5}ICOUNT\n1 {9}made by qemu/);
  const ourInfo = JSON.parse(ok(await snapstackCli(["img", "info", "--output=json", path]), "info").stdout) as { snapshots: unknown };
  const qemuInfo = JSON.parse(ok(await qemuImg(["info", "--output=json", path]), "qemu info").stdout) as { snapshots: unknown };
  assert.deepEqual(ourInfo.snapshots, qemuInfo.snapshots);
});

test("errors say what qemu-img says, with exit status 1", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = join(dir, "e.qcow2");
  const raw = join(dir, "e.raw");
  const one = join(dir, "one.qcow2");
  ok(await qemuImg(["create", "-f", "qcow2", path, "1M"]), "create");
  ok(await qemuImg(["create", "-f", "raw", raw, "1M"]), "create raw");
  ok(await qemuImg(["create", "-f", "qcow2", "-o", "refcount_bits=1", one, "1M"]), "create refcount_bits=1");
  ok(await qemuIo(["-c", "write 0 64k", one]), "io");
  ok(await qemuImg(["snapshot", "-c", "first", path]), "-c first");
  const cases: { args: string[]; code: string }[] = [
    { args: ["-a", "nope", path], code: "E_SNAPSHOT_NOT_FOUND" },
    { args: ["-d", "1", path], code: "E_SNAPSHOT_NOT_FOUND" }, // ID 1 exists, but -d matches names
    { args: ["-d", "nope", path], code: "E_SNAPSHOT_NOT_FOUND" },
    { args: ["-c", "x", raw], code: "E_UNSUPPORTED_FEATURE" },
    { args: ["-a", "x", raw], code: "E_UNSUPPORTED_FEATURE" },
    { args: ["-d", "x", raw], code: "E_SNAPSHOT_NOT_FOUND" },
    { args: ["-l", "-c", "x", path], code: "E_USAGE" },
  ];
  for (const { args, code } of cases) {
    const ours = await snapstack(args);
    const theirs = await qemuImg(["snapshot", ...args]);
    assert.equal(ours.code, 1, `${args.join(" ")}: exit`);
    assert.equal(theirs.code, 1, `qemu-img ${args.join(" ")}: exit`);
    const qemuLine = theirs.stderr.split("\n").find((line) => line.startsWith("qemu-img: ")) as string;
    const ourLine = ours.stderr.trim();
    assert.match(ourLine, new RegExp(`^snapstack: error ${code}: `), ourLine);
    const message = ourLine.replace(/^snapstack: error \S+: /, "").replace(/; try 'snapstack img snapshot --help'$/, "");
    assert.equal(message, qemuLine.slice("qemu-img: ".length), args.join(" "));
  }
  // refcount_bits=1: the first snapshot overflows. Same line; snapstack leaves no leak (qemu-img leaks the L1 copy).
  const before = readFileSync(one);
  const copy = join(dir, "one-copy.qcow2");
  writeFileSync(copy, before);
  const ours = await snapstack(["-c", "s", one]);
  const theirs = await qemuImg(["snapshot", "-c", "s", copy]);
  assert.equal(ours.code, 1);
  assert.equal(theirs.code, 1);
  assert.equal(ours.stderr.trim(), "snapstack: error E_TOO_LARGE: Could not create snapshot 's': -22 (Invalid argument)");
  assert.equal(theirs.stderr.trim(), "qemu-img: Could not create snapshot 's': -22 (Invalid argument)");
  await assertCheckClean(one);
  assert.equal((await qemuSnapshots(one)).length, 0);
  assert.ok(readFileSync(one).equals(before), "the refused snapshot left the file byte for byte as it was");
  // refcount_bits=2, 512-byte clusters: the third snapshot overflows after two that fit; the file stays as it was.
  const two = join(dir, "two.qcow2");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", "refcount_bits=2,cluster_size=512", two, "1M"]), "create");
  ok(await qemuIo(["-c", "write -P 1 0 4k", two]), "io");
  for (const name of ["s1", "s2"]) ok(await qemuImg(["snapshot", "-c", name, two]), `snapshot ${name}`);
  const beforeThird = readFileSync(two);
  const third = await snapstack(["-c", "s3", two]);
  assert.equal(third.code, 1, third.stderr);
  assert.match(third.stderr, /E_TOO_LARGE/);
  assert.ok(readFileSync(two).equals(beforeThird), "the refused third snapshot left the file byte for byte as it was");
  // An apply onto a smaller snapshot whose +1 pass overflows (refcount_bits=2, cluster 0 at 3):
  // refused before the resize, so the active data past the snapshot's size is still there.
  // (qemu-img resizes first and then fails: it loses that data.)
  const shrinking = join(dir, "shrinking.qcow2");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", "refcount_bits=2", shrinking, "16M"]), "create");
  ok(await qemuIo(["-c", "write -P 0x11 0 64k", shrinking]), "io");
  ok(await qemuImg(["snapshot", "-c", "s1", shrinking]), "snapshot s1");
  ok(await qemuImg(["resize", "-q", shrinking, "20M"]), "resize");
  ok(await qemuImg(["snapshot", "-c", "s2", shrinking]), "snapshot s2");
  ok(await qemuIo(["-c", "write -P 0x22 18M 64k", shrinking]), "io past 16M");
  const beforeApply = readFileSync(shrinking);
  const apply = await snapstack(["-a", "s1", shrinking]);
  assert.equal(apply.code, 1, apply.stderr);
  assert.equal(apply.stderr.trim(), "snapstack: error E_TOO_LARGE: Could not apply snapshot 's1': Failed to load snapshot: Invalid argument");
  assert.ok(readFileSync(shrinking).equals(beforeApply), "the refused apply left the file byte for byte as it was");
});

test("snapshots with VM state from savevm: listed, kept, applied, deleted; loadvm still works", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-system-x86_64")) return;
  const dir = scratchDir(t);
  const path = join(dir, "vm.qcow2");
  ok(await qemuImg(["create", "-f", "qcow2", path, "16M"]), "create");
  ok(await qemuIo(["-c", "write -P 0x41 0 1M", path]), "io");
  const monitor = async (commands: string[]): Promise<string> => {
    const result = await run(
      "qemu-system-x86_64",
      ["-M", "none", "-nodefaults", "-display", "none", "-drive", `file=${path},if=none,id=d0,format=qcow2`, "-monitor", "stdio"],
      { input: `${commands.join("\n")}\nquit\n` },
    );
    assert.equal(result.code, 0, result.stderr);
    return result.stdout;
  };
  await monitor(["savevm vmsnap"]);
  const saved = (await qemuSnapshots(path))[0];
  assert.ok(saved["vm-state-size"] > 0, "savevm stored VM state");
  assert.equal(ok(await snapstack(["-l", path]), "-l").stdout, ok(await qemuImg(["snapshot", "-l", path]), "qemu -l").stdout);
  const atSave = await qemuContent(dir, path);

  ok(await qemuIo(["-c", "write -P 0x42 0 64k", path]), "io");
  ok(await snapstack(["-c", "disk-only", path]), "-c next to a VM state snapshot");
  await assertCheckClean(path);
  ok(await snapstack(["-a", "vmsnap", path]), "-a vmsnap");
  await assertCheckClean(path);
  assertSameContent(await qemuContent(dir, path), atSave, "active after -a vmsnap");
  const kept = (await qemuSnapshots(path)).find((s) => s.name === "vmsnap") as QemuSnapshotJson;
  assert.equal(kept["vm-state-size"], saved["vm-state-size"], "VM state size kept");
  ok(await snapstack(["-d", "disk-only", path]), "-d disk-only");
  await assertCheckClean(path);
  const out = await monitor(["loadvm vmsnap"]);
  assert.ok(!/error|Error|failed/.test(out), `loadvm: ${out}`);
  ok(await snapstack(["-d", "vmsnap", path]), "-d vmsnap");
  await assertCheckClean(path);
  assert.equal((await qemuSnapshots(path)).length, 0);
});

test("randomized: qemu-img/qemu-io and snapstack take turns; every state checked after every step", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (SNAPSTACK_SEED=${seed} to replay)`);
  const random = createRandom(seed);
  const dir = scratchDir(t);
  const path = join(dir, "r.qcow2");
  const clusterBytes = 8 * 1024;
  ok(await qemuImg(["create", "-f", "qcow2", "-o", `cluster_size=${clusterBytes}`, path, "2M"]), "create");
  let active = Buffer.alloc(2 * MiB);
  const snaps = new Map<string, Buffer>(); // by name (unique here)
  let made = 0;
  for (let step = 0; step < 40; step++) {
    const byQemu = random.int(2) === 0;
    const roll = random.int(10);
    let what: string;
    if (roll < 4) {
      const offset = random.int(active.length / 512 - 64) * 512;
      const length = (1 + random.int(64)) * 512;
      const value = 1 + random.int(250);
      if (byQemu) ok(await qemuIo(["-c", `write -P ${value} ${offset} ${length}`, path]), "qemu-io write");
      else {
        const image = await openImage(path, false);
        await image.write(offset, Buffer.alloc(length, value));
        await image.close();
      }
      active.fill(value, offset, offset + length);
      what = `write ${offset}+${length}=${value}`;
    } else if (roll < 6 && snaps.size < 8) {
      const name = `n${made++}`;
      ok(await (byQemu ? qemuImg(["snapshot", "-c", name, path]) : snapstack(["-c", name, path])), `-c ${name}`);
      snaps.set(name, Buffer.from(active));
      what = `create ${name}`;
    } else if (roll < 8 && snaps.size > 0) {
      const names = [...snaps.keys()];
      const name = names[random.int(names.length)];
      ok(await (byQemu ? qemuImg(["snapshot", "-a", name, path]) : snapstack(["-a", name, path])), `-a ${name}`);
      active = Buffer.from(snaps.get(name) as Buffer);
      what = `apply ${name}`;
    } else if (snaps.size > 0) {
      const names = [...snaps.keys()];
      const name = names[random.int(names.length)];
      ok(await (byQemu ? qemuImg(["snapshot", "-d", name, path]) : snapstack(["-d", name, path])), `-d ${name}`);
      snaps.delete(name);
      what = `delete ${name}`;
    } else {
      what = "nothing";
    }
    const where = `step ${step} (${byQemu ? "qemu" : "snapstack"} ${what}), seed ${seed}`;
    await assertCheckClean(path);
    assertSameContent(await qemuContent(dir, path), active, `${where}: active (qemu-img)`);
    const image = await openImage(path, true);
    try {
      for (const [name, content] of snaps) {
        const view = await openSnapshotView(image, name);
        const seen = new Uint8Array(view.sizeBytes);
        await view.read(0, seen);
        await view.close();
        assertSameContent(seen, content, `${where}: snapshot ${name} (snapstack view)`);
      }
    } finally {
      await image.close();
    }
  }
  for (const [name, content] of snaps) assertSameContent(await qemuContent(dir, path, name), content, `snapshot ${name} (qemu-img) at the end, seed ${seed}`);
});
