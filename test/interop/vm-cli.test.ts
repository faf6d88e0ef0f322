/**
 * `snapstack vm` as a user runs it: every command as a real process
 * (bin/snapstack) against a daemon on a scratch store, which the first
 * command starts (and says so). Outputs are checked against the store
 * (layer contents, tree, sizes), bad input against the one-line coded
 * error contract (cli-helpers.ts assertCodedError).
 *
 * The first test needs no QEMU (stopped machines). The second boots the
 * test guest once and covers what needs a running VM: start/stop, the
 * serial log, live snapshots, revert to a running state, two clients at
 * once, a QEMU killed under the daemon, missing and truncated state files,
 * and a QEMU that refuses to start.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { openImage } from "../../src/chain/open-image.ts";
import { MachineStore } from "../../src/vm/store/machine-store.ts";
import type { TreeView } from "../../src/vm/manager/machine-operations.ts";
import type { MachineStatus } from "../../src/vm/manager/machine-manager.ts";
import { buildGuest } from "../helpers/guest-kit.ts";
import { requireTools, run, type RunResult } from "../helpers/tools.ts";
import {
  checkLayers,
  counterAfterRestore,
  layerPath,
  machineConsole,
  processAlive,
  qemuProcessesOf,
  readCurrentDisk,
  readDisk,
  readSnapshotDisk,
  scratchStore,
  vmCli,
  vmTestEnv,
  waitGone,
} from "../helpers/vm-daemon.ts";
import { assertCodedError } from "./cli-helpers.ts";

const KiB = 1024;
const MiB = 1024 * 1024;

/** `snapstack vm ARGS --home HOME`, expected to succeed. */
async function vmOk(home: string, args: string[]): Promise<RunResult> {
  const result = await vmCli([...args, "--home", home]);
  assert.equal(result.code, 0, `vm ${args.join(" ")} exited ${result.code}: ${result.stderr.trim()}`);
  return result;
}

async function vmJson<T>(home: string, args: string[]): Promise<T> {
  return JSON.parse((await vmOk(home, [...args, "--output=json"])).stdout) as T;
}

/** `snapstack vm ARGS --home HOME`, expected to fail with one line carrying `code`. */
async function vmFails(home: string, args: string[], code: string): Promise<RunResult> {
  const result = await vmCli([...args, "--home", home]);
  assertCodedError(result, code);
  return result;
}

/** Write `bytes` at `offset` into the current disk of a stopped machine (as its guest would). */
async function writeCurrent(home: string, name: string, offset: number, bytes: Buffer): Promise<void> {
  const device = await openImage(layerPath(home, name, new MachineStore(home).loadTree(name).current.layer));
  try {
    await device.write(offset, bytes);
    await device.flush();
  } finally {
    await device.close();
  }
}

function filled(length: number, byte: number): Buffer {
  return Buffer.alloc(length, byte);
}

/** A disk image of `sizeBytes` with `pieces` at their offsets, zero elsewhere. */
function diskWith(sizeBytes: number, pieces: Array<[number, Buffer]>): Buffer {
  const disk = Buffer.alloc(sizeBytes);
  for (const [offset, bytes] of pieces) bytes.copy(disk, offset);
  return disk;
}

function allocatedBytes(path: string): number {
  return statSync(path).blocks * 512;
}

test("vm CLI on stopped machines: every command, the daemon started on demand, --home and SNAPSTACK_HOME, bad input", { timeout: 240_000 }, async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const home = scratchStore(t, "ss-vmcli-");
  const DISK = 16 * MiB;

  // The first command finds no daemon, starts one and says so; the next ones reach it.
  const first = await vmOk(home, ["list"]);
  assert.match(first.stderr, /^snapstack: no daemon answered for .*store; started one \(pid \d+, log .*daemon\.log\)\n$/);
  assert.equal(first.stdout, `${"NAME".padEnd(24)} ${"STATE".padEnd(8)} ${"MEMORY".padEnd(8)} ${"DISK".padEnd(8)} SNAPSHOTS CURRENT\n`);
  const viaEnv = await vmCli(["list", "--output=json"], vmTestEnv({ SNAPSTACK_HOME: home }));
  assert.equal(viaEnv.code, 0, viaEnv.stderr);
  assert.equal(viaEnv.stderr, "", "SNAPSTACK_HOME names the same store: its daemon answers");
  assert.deepEqual(JSON.parse(viaEnv.stdout), []);
  const elsewhere = join(home, "..", "unused-store");
  const homeWins = await vmCli(["list", "--home", home], vmTestEnv({ SNAPSTACK_HOME: elsewhere }));
  assert.equal(homeWins.code, 0, homeWins.stderr);
  assert.equal(homeWins.stderr, "", "--home wins over SNAPSTACK_HOME");
  assert.equal(existsSync(elsewhere), false);

  // create: --disk and --disk-from.
  assert.equal((await vmOk(home, ["create", "a", "--disk", "16M"])).stdout, "Created machine 'a' with a 16 MiB disk.\n");
  const imagePath = join(home, "..", "source.raw");
  const imageContent = diskWith(8 * MiB, [[MiB, filled(64 * KiB, 0x5a)]]);
  writeFileSync(imagePath, imageContent);
  assert.equal((await vmOk(home, ["create", "src", "--disk-from", imagePath, "--memory", "128M", "--cpus", "2"])).stdout, "Created machine 'src' with a 8 MiB disk.\n");
  assert.ok((await readCurrentDisk(home, "src")).equals(imageContent), "--disk-from copies the image");
  const srcStatus = await vmJson<MachineStatus>(home, ["status", "src"]);
  assert.equal(srcStatus.state, "stopped");
  assert.equal(srcStatus.config.memoryBytes, 128 * MiB);
  assert.equal(srcStatus.config.cpus, 2);
  assert.equal(srcStatus.config.diskSizeBytes, 8 * MiB);
  assert.match((await vmOk(home, ["status", "a"])).stdout, /^machine: a\nstate: stopped\nmemory: 512 MiB, cpus: 1, disk: 16 MiB\ncurrent snapshot: \(none\), snapshots: 0\n$/);
  assert.equal((await vmOk(home, ["log", "a"])).stdout, "", "a machine never started has an empty console log");
  const listed = (await vmOk(home, ["list"])).stdout.split("\n").slice(1, 3).map((line) => line.split(/ +/));
  assert.deepEqual(listed, [["a", "stopped", "512", "MiB", "16", "MiB", "0", "-"], ["src", "stopped", "128", "MiB", "8", "MiB", "0", "-"]]);

  // Bad input: one line, a stable code, exit 1; nothing created.
  await vmFails(home, ["create", "b"], "E_USAGE");
  await vmFails(home, ["create", "b", "--disk", "16M", "--disk-from", imagePath], "E_USAGE");
  await vmFails(home, ["create", "a", "--disk", "1M"], "E_EXISTS");
  await vmFails(home, ["create", "x/y", "--disk", "1M"], "E_USAGE");
  await vmFails(home, ["create", "..", "--disk", "1M"], "E_USAGE");
  await vmFails(home, ["create", "bad\u0001name", "--disk", "1M"], "E_USAGE");
  await vmFails(home, ["create", "bad\nname", "--disk", "1M"], "E_USAGE");
  await vmFails(home, ["create", "c", "--disk-from", join(home, "no-such-image")], "E_NOT_FOUND");
  await vmFails(home, ["create", "c", "--disk", "lots"], "E_INVALID_SIZE");
  await vmFails(home, ["create", "c", "--disk", "1M", "--cpus", "two"], "E_USAGE");
  await vmFails(home, ["create", "c", "--disk", "1M", "--cpus", "0"], "E_USAGE");
  const kernelCopy = join(home, "..", "vmlinuz-gone");
  writeFileSync(kernelCopy, "not a kernel");
  await vmOk(home, ["create", "k", "--disk", "1M", "--kernel", kernelCopy]);
  rmSync(kernelCopy);
  const noKernel = await vmFails(home, ["start", "k"], "E_NOT_FOUND");
  assert.match(noKernel.stderr, /vmlinuz-gone/);
  assert.equal((await vmJson<MachineStatus>(home, ["status", "k"])).state, "stopped");
  await vmOk(home, ["remove", "k"]);
  await vmFails(home, ["status", "nope"], "E_NOT_FOUND");
  await vmFails(home, ["snapshots", "a/../src"], "E_USAGE");
  await vmFails(home, ["revert", "a", "nosnap"], "E_SNAPSHOT_NOT_FOUND");
  await vmFails(home, ["delete-snapshot", "nope", "s"], "E_NOT_FOUND");
  await vmFails(home, ["snapshot", "a", "s/1"], "E_USAGE");
  await vmFails(home, ["snapshot", "a", "s\u007f1"], "E_USAGE");
  await vmFails(home, ["stop", "a"], "E_USAGE");
  await vmFails(home, ["frobnicate"], "E_USAGE");
  await vmFails(home, ["snapshot", "a"], "E_USAGE");
  assert.deepEqual((await vmJson<MachineStatus[]>(home, ["list"])).map((m) => m.name), ["a", "src"]);

  // snapshot [--description] [--disk-only], diff, revert (a branch), snapshots.
  const A = filled(64 * KiB, 0xa1);
  const B = filled(128 * KiB, 0xb2);
  const C = filled(64 * KiB, 0xc3);
  await writeCurrent(home, "a", MiB, A);
  assert.match((await vmOk(home, ["snapshot", "a", "s1", "--description", "first snapshot"])).stdout, /^Snapshot 's1' of 'a' taken \(disk and configuration; paused 0\.0 ms, total \d+ ms\)\.\n$/);
  await vmFails(home, ["snapshot", "a", "s1"], "E_SNAPSHOT_EXISTS");
  await writeCurrent(home, "a", 4 * MiB, B);
  await vmOk(home, ["snapshot", "a", "s2", "--disk-only"]);
  const diff = await vmJson<{ ranges: Array<Record<string, unknown>>; changedBytes: number }>(home, ["diff", "a", "s1", "s2"]);
  assert.equal(diff.changedBytes, B.length);
  assert.deepEqual(diff.ranges.map((range) => Object.keys(range).filter((key) => key !== "offset").sort()), diff.ranges.map(() => ["data", "depth", "length", "present", "start", "zero"]), "qemu-img map's fields");
  assert.equal(diff.ranges[0].start, 4 * MiB);
  assert.equal(diff.ranges.reduce((end, range) => (range.start === end ? end + (range.length as number) : -1), 4 * MiB), 4 * MiB + B.length, "contiguous ranges cover B");
  assert.ok(diff.ranges.every((range) => range.data === true && range.zero === false && range.present === true));
  assert.equal((await vmOk(home, ["diff", "a", "s1", "s2"])).stdout, diff.ranges.map((range) => `${range.start}\t${range.length}\n`).join("") + `${diff.ranges.length} changed ranges, 128 KiB\n`);
  const withProgress = await vmOk(home, ["diff", "a", "s2", "s1", "-p"]);
  assert.match(withProgress.stderr, /diff compare: 100%\n$/, "-p shows progress on stderr");
  assert.equal((await vmOk(home, ["diff", "a", "s1", "s1"])).stdout, "0 changed ranges, 0 B\n");
  await vmFails(home, ["diff", "a", "s1", "nosnap"], "E_SNAPSHOT_NOT_FOUND");
  assert.deepEqual(await vmJson(home, ["diff", "a", "s1", "s2", "--disk", "1"]), { ...diff, disk: 1 }, "--disk 1 is the default");
  assert.match((await vmFails(home, ["diff", "a", "s1", "s2", "--disk", "2"], "E_USAGE")).stderr, /disk 2: machine 'a' has 1 disk/);
  await vmFails(home, ["diff", "a", "s1", "s2", "--disk", "first"], "E_USAGE");

  // export: s1 whole (qcow2 and raw), then s2 as the delta since s1 over s1's export; qemu-img reads the chain as s2.
  const exports = join(home, "..", "exports");
  mkdirSync(exports, { recursive: true });
  const full = join(exports, "s1.qcow2");
  assert.equal((await vmOk(home, ["export", "a", "s1", full])).stdout, `Exported disk 1 of 'a' at 's1' to ${full} (qcow2, 64 KiB of data).\n`);
  assert.equal((await vmOk(home, ["export", "a", "s1", join(exports, "s1.raw"), "-O", "raw", "-p"])).stderr.endsWith("100%\n"), true, "-p shows progress");
  const delta = join(exports, "s2-since-s1.qcow2");
  assert.match((await vmOk(home, ["export", "a", "s2", delta, "--from", "s1", "--backing", full])).stdout, /^Exported what changed on disk 1 of 'a' from 's1' to 's2' \(128 KiB\), over .*s1\.qcow2 to .*s2-since-s1\.qcow2 \(qcow2, 128 KiB of data\)\.\n$/);
  for (const [image, expected] of [[full, diskWith(DISK, [[MiB, A]])], [join(exports, "s1.raw"), diskWith(DISK, [[MiB, A]])], [delta, diskWith(DISK, [[MiB, A], [4 * MiB, B]])]] as const) {
    const expectedPath = `${image}.expected`;
    writeFileSync(expectedPath, expected);
    const compared = await run("qemu-img", ["compare", "-F", "raw", image, expectedPath]);
    assert.equal(compared.code, 0, `${image}: ${compared.stdout}${compared.stderr}`);
    if (image.endsWith(".qcow2")) assert.equal((await run("qemu-img", ["check", image])).code, 0, `qemu-img check ${image}`);
  }
  const deltaInfo = JSON.parse((await run("qemu-img", ["info", "--output=json", delta])).stdout) as Record<string, unknown>;
  assert.equal(deltaInfo["backing-filename"], "s1.qcow2", "the delta names its backing relative to itself");
  const deltaMap = JSON.parse((await run("qemu-img", ["map", "--output=json", delta])).stdout) as Array<{ start: number; length: number; depth: number; data: boolean }>;
  assert.deepEqual(deltaMap.filter((entry) => entry.depth === 0 && entry.data).map((entry) => [entry.start, entry.length]), [[4 * MiB, B.length]], "the delta holds only what changed");
  await vmFails(home, ["export", "a", "s1", full], "E_EXISTS");
  await vmFails(home, ["export", "a", "s2", join(exports, "x.qcow2"), "--from", "s1"], "E_USAGE");
  await vmFails(home, ["export", "a", "s2", join(exports, "x.qcow2"), "--from", "s1", "--backing", full, "-O", "raw"], "E_USAGE");
  await vmFails(home, ["export", "a", "s2", join(exports, "x.qcow2"), "--from", "s1", "--backing", imagePath], "E_USAGE");
  await vmFails(home, ["export", "a", "s2", join(exports, "x.qcow2"), "-O", "vmdk"], "E_USAGE");
  await vmFails(home, ["export", "a", "nosnap", join(exports, "x.qcow2")], "E_SNAPSHOT_NOT_FOUND");
  await vmFails(home, ["export", "a", "s2", join(exports, "no-dir", "x.qcow2")], "E_NOT_FOUND");
  assert.equal(existsSync(join(exports, "x.qcow2")), false, "a refused export leaves no file");

  assert.match((await vmOk(home, ["revert", "a", "s1"])).stdout, /^Reverted 'a' to 's1' in \d+ ms; it is stopped; freed .*\.\n$/);
  assert.ok((await readCurrentDisk(home, "a")).equals(diskWith(DISK, [[MiB, A]])), "reverted to s1's disk");
  await writeCurrent(home, "a", 8 * MiB, C);
  await vmOk(home, ["snapshot", "a", "s3"]);
  const tree = await vmJson<TreeView>(home, ["snapshots", "a"]);
  assert.deepEqual(tree.snapshots.map((s) => [s.name, s.parent, s.depth, s.children]), [["s1", null, 0, ["s2", "s3"]], ["s2", "s1", 1, []], ["s3", "s1", 1, []]]);
  assert.equal(tree.current.snapshot, "s3");
  assert.deepEqual(tree.snapshots.map((s) => s.current), [false, false, true]);
  assert.equal(tree.snapshots[0].description, "first snapshot");
  const storeTree = new MachineStore(home).loadTree("a");
  for (const view of tree.snapshots) {
    const own = allocatedBytes(layerPath(home, "a", storeTree.snapshots[view.id].layer));
    assert.equal(view.ownBytes, own, `${view.name}: own data size is its layer's`);
    assert.equal(view.hasState, false);
  }
  assert.equal(tree.snapshots[0].freeableBytes, 0, "s1's layer backs two branches: deleting it frees nothing");
  assert.deepEqual(tree.snapshots[0].retainedBy, ["snapshot s2", "snapshot s3"]);
  assert.equal(tree.snapshots[1].freeableBytes, tree.snapshots[1].ownBytes, "a leaf frees its own layer");
  assert.deepEqual(tree.snapshots[1].retainedBy, []);
  assert.deepEqual(tree.snapshots[2].retainedBy, ["current disk"]);
  assert.equal(tree.current.topBytes, allocatedBytes(layerPath(home, "a", storeTree.current.layer)));
  const human = (await vmOk(home, ["snapshots", "a"])).stdout.split("\n");
  assert.match(human[0], /^s1 {2}\[disk only; own .+; frees 0 B; needed by snapshot s2, snapshot s3\] {2}\S+Z {2}"first snapshot"$/);
  assert.match(human[1], /^ {2}s2 {2}\[disk only; own .+; frees .+\] {2}\S+Z$/);
  assert.match(human[2], /^ {2}s3 {2}\[disk only; own .+; frees .+; needed by current disk\] {2}\S+Z {2}<- current$/);
  assert.match(human[3], /^current disk: .+ written since s3; \d+ layer files, chain depth 3$/);

  // Two clients at once on one machine: serialized, never interleaved.
  const [p1, p2] = await Promise.all([vmCli(["snapshot", "a", "p1", "--home", home]), vmCli(["snapshot", "a", "p2", "--home", home])]);
  assert.equal(p1.code, 0, p1.stderr);
  assert.equal(p2.code, 0, p2.stderr);
  const afterBoth = await vmJson<TreeView>(home, ["snapshots", "a"]);
  const parents = Object.fromEntries(afterBoth.snapshots.map((s) => [s.name, s.parent]));
  assert.ok((parents.p1 === "s3" && parents.p2 === "p1") || (parents.p2 === "s3" && parents.p1 === "p2"), `one after the other: ${JSON.stringify(parents)}`);
  const deletes = await Promise.all([vmCli(["delete-snapshot", "a", "p1", "--home", home]), vmCli(["delete-snapshot", "a", "p1", "--home", home])]);
  const [won, lost] = deletes[0].code === 0 ? deletes : [deletes[1], deletes[0]];
  assert.equal(won.code, 0, won.stderr);
  assertCodedError(lost, "E_SNAPSHOT_NOT_FOUND");
  await vmOk(home, ["delete-snapshot", "a", "p2"]);
  assert.equal(new MachineStore(home).hasJournal("a"), false);

  // delete-snapshot --wipe of the branch point: both branches keep their disks.
  assert.match((await vmOk(home, ["delete-snapshot", "a", "s1", "--wipe"])).stdout, /^Deleted snapshot 's1' of 'a': merged .+, freed .+ \(wiped\)\.\n$/);
  await vmFails(home, ["delete-snapshot", "a", "s1"], "E_SNAPSHOT_NOT_FOUND");
  assert.deepEqual((await vmJson<TreeView>(home, ["snapshots", "a"])).snapshots.map((s) => [s.name, s.parent]), [["s2", null], ["s3", null]]);
  assert.ok((await readSnapshotDisk(home, "a", "s2")).equals(diskWith(DISK, [[MiB, A], [4 * MiB, B]])), "s2's disk");
  assert.ok((await readSnapshotDisk(home, "a", "s3")).equals(diskWith(DISK, [[MiB, A], [8 * MiB, C]])), "s3's disk");
  await checkLayers(home, "a");

  // clone: a linked clone pins its snapshot's layer; remove [--wipe].
  assert.equal((await vmOk(home, ["clone", "a", "s3", "c"])).stdout, "Created 'c', a linked clone of 'a' at 's3'.\n");
  await vmFails(home, ["clone", "a", "s3", "c"], "E_EXISTS");
  await vmFails(home, ["clone", "a", "s3", "c/d"], "E_USAGE");
  assert.match((await vmOk(home, ["status", "c"])).stdout, /\nlinked clone of a@s3\n/);
  assert.ok((await readCurrentDisk(home, "c")).equals(diskWith(DISK, [[MiB, A], [8 * MiB, C]])), "the clone's disk is s3's");
  const s3View = (await vmJson<TreeView>(home, ["snapshots", "a"])).snapshots.find((s) => s.name === "s3")!;
  assert.ok(s3View.retainedBy.includes("clone c"), JSON.stringify(s3View.retainedBy));
  assert.equal(s3View.freeableBytes, 0);
  await vmFails(home, ["remove", "a"], "E_IN_USE");
  assert.match((await vmOk(home, ["remove", "c", "--wipe"])).stdout, /^Removed 'c', freed .+ \(wiped\)\.\n$/);
  assert.match((await vmOk(home, ["remove", "a", "--wipe", "-p"])).stdout, /^Removed 'a', freed .+ \(wiped\)\.\n$/);
  await vmFails(home, ["status", "a"], "E_NOT_FOUND");
  assert.equal(existsSync(join(home, "machines", "a")), false);
  // Several disks: each snapshotted with the others.
  assert.equal((await vmOk(home, ["create", "two", "--disk", "4M", "--extra-disk", "2M"])).stdout, "Created machine 'two' with disks of 4 MiB, 2 MiB.\n");
  assert.match((await vmOk(home, ["status", "two"])).stdout, /^memory: 512 MiB, cpus: 1, disk: 4 MiB \+ 2 MiB$/m);
  await vmOk(home, ["snapshot", "two", "t1", "--description", "two\nlines \u001b[31mred"]);
  assert.equal((await vmJson<TreeView>(home, ["snapshots", "two"])).snapshots[0].description, "two\nlines \u001b[31mred");
  assert.match((await vmOk(home, ["snapshots", "two"])).stdout, /^t1 {2}\[.*\] {2}\S+Z {2}"two\\nlines \\u001b\[31mred" {2}<- current\ncurrent disk: /, "control characters escaped, one line");
  await vmFails(home, ["create", "three", "--disk", "4M", "--extra-disk", "tiny"], "E_INVALID_SIZE");
  assert.match((await vmOk(home, ["remove", "two", "--wipe"])).stdout, /^Removed 'two'/);
  assert.match((await vmOk(home, ["remove", "src"])).stdout, /^Removed 'src', freed .+\.\n$/);
  assert.deepEqual(await vmJson<MachineStatus[]>(home, ["list"]), []);

  // A daemon killed with SIGKILL leaves its socket and lock behind: the next command starts a new one.
  const killedPid = Number(readFileSync(join(home, "daemon.pid"), "utf8"));
  process.kill(killedPid, "SIGKILL");
  assert.ok(await waitGone(killedPid, 10_000));
  assert.ok(existsSync(join(home, "daemon.sock")) && existsSync(join(home, "daemon.lock")));
  const afterKill = await vmOk(home, ["list"]);
  assert.match(afterKill.stderr, /^snapstack: no daemon answered for .*; started one \(pid \d+/);
  assert.notEqual(Number(readFileSync(join(home, "daemon.pid"), "utf8")), killedPid);
});

test("vm CLI with a running guest: start, log, live snapshots, two clients, revert, a killed QEMU, bad state files, stop", { timeout: 300_000 }, async (t) => {
  if (!requireTools(t, "qemu-system-x86_64", "qemu-img")) return;
  const guest = await buildGuest();
  const home = scratchStore(t, "ss-vmcli-run-", ["g", "bad"]);
  await vmOk(home, ["list"]);

  // A QEMU that fails to start: its stderr in the one error line.
  await vmOk(home, ["create", "bad", "--disk", "1M", "--memory", "64M", "--qemu-arg", "-no-such-option"]);
  const badStart = await vmFails(home, ["start", "bad"], "E_QEMU");
  assert.match(badStart.stderr, /no-such-option/, "QEMU's own message is shown");
  assert.equal((await vmJson<MachineStatus>(home, ["status", "bad"])).state, "stopped");

  await vmOk(home, ["create", "g", "--memory", "128M", "--disk", "16M", "--kernel", guest.kernelPath, "--initrd", guest.initrdPath, "--append", guest.append]);
  const started = await vmOk(home, ["start", "g"]);
  assert.match(started.stdout, /^Started 'g' \(pid \d+, (tcg|kvm)\)\.\n$/);
  await vmFails(home, ["start", "g"], "E_IN_USE");
  let guestConsole = machineConsole(home, "g");
  t.after(() => guestConsole.close());
  await guestConsole.waitFor(/^READY vda/m, { timeoutMs: 120_000 });
  await guestConsole.nextCounter({ timeoutMs: 30_000 });
  assert.match((await vmOk(home, ["log", "g"])).stdout, /READY vda[\s\S]*COUNTER \d+/, "vm log shows the serial console");
  assert.match((await vmOk(home, ["log", "g", "--bytes", "100"])).stdout, /^[\s\S]{1,100}$/);
  const running = await vmJson<MachineStatus>(home, ["status", "g"]);
  assert.equal(running.state, "running");
  assert.match((await vmOk(home, ["status", "g"])).stdout, new RegExp(`^state: running \\(pid ${running.pid}, (tcg|kvm)\\)$`, "m"));

  const writeMarker = async (text: string, sector: number): Promise<void> => {
    const result = await guestConsole.runCommand(`printf '${text}' | dd of=/dev/vda bs=512 seek=${sector} count=1 conv=sync,fsync 2>&1 && sync`, { timeoutMs: 60_000 });
    assert.equal(result.exitCode, 0, result.output.join("\n"));
  };
  const readMarker = async (sector: number): Promise<string> => {
    const result = await guestConsole.runCommand(`dd if=/dev/vda bs=512 skip=${sector} count=1 2>/dev/null | head -c 16 | tr -d '\\000'`, { timeoutMs: 60_000 });
    return result.output.join("");
  };

  // A live snapshot with VM state, then two clients snapshotting at once.
  await writeMarker("ONE", 2048);
  const since = guestConsole.mark();
  const lowAtS1 = await guestConsole.nextCounter({ since });
  assert.match((await vmOk(home, ["snapshot", "g", "s1", "--description", "live"])).stdout, /^Snapshot 's1' of 'g' taken \(disk, VM state and configuration; paused [\d.]+ ms, total \d+ ms\)\.\n$/);
  // The snapshot's instant lies between the request and its answer; the guest prints a counter every 200 ms.
  const highAtS1 = guestConsole.lastCounter(since)!;
  const fromS1 = (counter: number): boolean => counter >= lowAtS1 && counter <= highAtS1 + 1;
  await writeMarker("TWO", 4096);
  const [c1, c2] = await Promise.all([vmCli(["snapshot", "g", "c1", "--disk-only", "--home", home]), vmCli(["snapshot", "g", "c2", "--home", home])]);
  assert.equal(c1.code, 0, c1.stderr);
  assert.equal(c2.code, 0, c2.stderr);
  let tree = await vmJson<TreeView>(home, ["snapshots", "g"]);
  const parents = Object.fromEntries(tree.snapshots.map((s) => [s.name, s.parent]));
  assert.ok((parents.c1 === "s1" && parents.c2 === "c1") || (parents.c2 === "s1" && parents.c1 === "c2"), `one after the other: ${JSON.stringify(parents)}`);
  assert.deepEqual(tree.snapshots.map((s) => [s.name, s.hasState]).sort(), [["c1", false], ["c2", true], ["s1", true]]);
  const c2View = tree.snapshots.find((s) => s.name === "c2")!;
  const stateOf = (id: string): string => join(new MachineStore(home).snapshotDir("g", id), "state.bin");
  assert.ok(c2View.freeableBytes >= allocatedBytes(stateOf(c2View.id)), "what deleting c2 frees counts its state file");
  assert.match((await vmOk(home, ["status", "g"])).stdout, /^current snapshot: c[12], snapshots: 3$/m);
  const diff = await vmJson<{ ranges: Array<{ start: number; length: number }> }>(home, ["diff", "g", "s1", "c2"]);
  assert.ok(diff.ranges.some((range) => range.start <= 4096 * 512 && range.start + range.length >= 4097 * 512), "the diff holds the sector written between s1 and c2");
  await vmFails(home, ["diff", "g", "s1", "current"], "E_IN_USE");
  // A running machine's snapshots export while it runs; its current disk does not.
  const exported = join(home, "..", "g-s1.qcow2");
  await vmOk(home, ["export", "g", "s1", exported]);
  // s1's layer is read beside the daemon as qemu-img -U would (the daemon opened it for writing when it was the top).
  const s1Record = Object.values(new MachineStore(home).loadTree("g").snapshots).find((snapshot) => snapshot.name === "s1")!;
  const [s1Disk, exportedDisk] = await Promise.all([readDisk(layerPath(home, "g", s1Record.layer), { forceShare: true }), readDisk(exported)]);
  assert.ok(exportedDisk.equals(s1Disk), "the export holds s1's disk");
  await vmFails(home, ["export", "g", "current", join(home, "..", "g-now.qcow2")], "E_IN_USE");

  // "Reinstall", then revert to s1: the VM runs from that instant again.
  await writeMarker("LATER", 2048);
  guestConsole.close();
  let mark = guestConsole.mark();
  const beforeRevert = guestConsole.lastCounter(0);
  const reverted = await vmOk(home, ["revert", "g", "s1", "-p"]);
  assert.match(reverted.stdout, /^Reverted 'g' to 's1' in \d+ ms; it is running; freed .+\.\n$/);
  guestConsole = machineConsole(home, "g");
  const firstAfter = await counterAfterRestore(guestConsole, mark, beforeRevert);
  assert.ok(fromS1(firstAfter), `counter ${firstAfter} continues from s1's (${lowAtS1}..${highAtS1})`);
  assert.equal(await readMarker(2048), "ONE");
  assert.equal(await readMarker(4096), "");

  // A snapshot whose state file is missing: refused before anything changes.
  const c2Id = c2View.id;
  const pidBefore = (await vmJson<MachineStatus>(home, ["status", "g"])).pid;
  renameSync(stateOf(c2Id), `${stateOf(c2Id)}.away`);
  const missing = await vmFails(home, ["revert", "g", "c2"], "E_NOT_FOUND");
  assert.match(missing.stderr, /state file/);
  renameSync(`${stateOf(c2Id)}.away`, stateOf(c2Id));
  const stillRunning = await vmJson<MachineStatus>(home, ["status", "g"]);
  assert.equal(stillRunning.state, "running");
  assert.equal(stillRunning.pid, pidBefore);

  // A truncated state file: refused against the size recorded at the snapshot, before the
  // running machine or its disk changes; the snapshot reverts once the file is back.
  const saved = `${stateOf(c2Id)}.saved`;
  copyFileSync(stateOf(c2Id), saved);
  truncateSync(stateOf(c2Id), Math.floor(statSync(saved).size / 2));
  const truncated = await vmFails(home, ["revert", "g", "c2"], "E_STATE_DAMAGED");
  assert.match(truncated.stderr, /truncated/);
  const afterTruncated = await vmJson<MachineStatus>(home, ["status", "g"]);
  assert.equal(afterTruncated.state, "running");
  assert.equal(afterTruncated.pid, pidBefore);
  renameSync(saved, stateOf(c2Id));
  guestConsole.close();
  mark = guestConsole.mark();
  assert.match((await vmOk(home, ["revert", "g", "c2"])).stdout, /it is running/);
  guestConsole = machineConsole(home, "g");
  await guestConsole.nextCounter({ since: mark, timeoutMs: 60_000 });
  assert.equal(await readMarker(4096), "TWO");

  // QEMU killed under the daemon: status tells, stop refuses, revert recovers.
  const victim = (await vmJson<MachineStatus>(home, ["status", "g"])).pid!;
  guestConsole.close();
  process.kill(victim, "SIGKILL");
  assert.ok(await waitGone(victim, 10_000));
  let status = await vmJson<MachineStatus>(home, ["status", "g"]);
  for (let tries = 0; status.state === "running" && tries < 100; tries++) status = await vmJson<MachineStatus>(home, ["status", "g"]);
  assert.equal(status.state, "crashed");
  assert.equal(status.lastExit?.signal, "SIGKILL");
  assert.equal(status.lastExit?.unexpected, true);
  assert.match((await vmOk(home, ["status", "g"])).stdout, /^last exit: code null signal SIGKILL at /m);
  await vmFails(home, ["stop", "g"], "E_USAGE");
  assert.match((await vmOk(home, ["revert", "g", "s1"])).stdout, /it is running/);
  // Killed again, and reverted at once (before the daemon may have noticed).
  const second = (await vmJson<MachineStatus>(home, ["status", "g"])).pid!;
  process.kill(second, "SIGKILL");
  mark = guestConsole.mark();
  assert.match((await vmOk(home, ["revert", "g", "s1"])).stdout, /it is running/);
  guestConsole = machineConsole(home, "g");
  const afterKill = await counterAfterRestore(guestConsole, mark, null);
  assert.ok(fromS1(afterKill), `counter ${afterKill} continues from s1's (${lowAtS1}..${highAtS1})`);

  // Delete while running, stop, stop --force, remove.
  assert.match((await vmOk(home, ["delete-snapshot", "g", "c1"])).stdout, /^Deleted snapshot 'c1' of 'g'/);
  tree = await vmJson<TreeView>(home, ["snapshots", "g"]);
  assert.deepEqual(tree.snapshots.map((s) => s.name).sort(), ["c2", "s1"]);
  guestConsole.close();
  const quitPid = (await vmJson<MachineStatus>(home, ["status", "g"])).pid!;
  assert.equal((await vmOk(home, ["stop", "g"])).stdout, "Stopped 'g'.\n");
  assert.equal(processAlive(quitPid), false);
  assert.equal((await vmJson<MachineStatus>(home, ["status", "g"])).state, "stopped");
  assert.match((await vmOk(home, ["revert", "g", "c2"])).stdout, /it is running/);
  const forcedPid = (await vmJson<MachineStatus>(home, ["status", "g"])).pid!;
  assert.equal((await vmOk(home, ["stop", "g", "--force"])).stdout, "Stopped 'g'.\n");
  assert.equal(processAlive(forcedPid), false);
  await checkLayers(home, "g");
  assert.match((await vmOk(home, ["revert", "g", "s1"])).stdout, /it is running/);
  const removedPid = (await vmJson<MachineStatus>(home, ["status", "g"])).pid!;
  assert.match((await vmOk(home, ["remove", "g", "--wipe"])).stdout, /^Removed 'g'/);
  assert.equal(processAlive(removedPid), false, "removing a running machine stops its QEMU");
  await vmOk(home, ["remove", "bad"]);
  assert.deepEqual(qemuProcessesOf(home, ["g", "bad"]), []);
});
