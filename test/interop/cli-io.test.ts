// snapstack io vs qemu-io: same output (statistics lines aside) and same resulting images.
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { createRandom, testSeed } from "../helpers/random.ts";
import { requireTools, run, scratchDir } from "../helpers/tools.ts";
import { SNAPSTACK_BIN, buildFixtures, ok, qemuImg, qemuIo, snapstack } from "./cli-helpers.ts";

/** The statistics line ("4 KiB, 1 ops; 00.00 sec (...)") carries timings: keep only its size and op count. */
function maskTimings(text: string): string {
  return text.replace(/^(.*?, \d+ ops); .*$/gm, "$1; TIMING");
}

function commandArgs(commands: string[]): string[] {
  return commands.flatMap((command) => ["-c", command]);
}

test("io read/write/discard/flush/map print what qemu-io prints", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await buildFixtures(dir);
  copyFileSync(join(dir, "top.qcow2"), join(dir, "ours.qcow2"));
  copyFileSync(join(dir, "top.qcow2"), join(dir, "theirs.qcow2"));
  const commands = [
    "read -P 0xab 0 64k",
    "read -v 65530 12",
    "read -v 4M 40",
    "read -q 0 4k",
    "write -P 0x5a 512 3k",
    "write -z 8M 128k",
    "write -z -u 4M 64k",
    "write 10485761 5",
    "read -P 0x5a 512 3k",
    "read -P 0 -s 0 -l 512 0 1k",
    "discard 5M 64k",
    "flush",
    "read 1.5k 1.5k",
    "map",
  ];
  const ours = await snapstack(["io", ...commandArgs(commands), "ours.qcow2"], { cwd: dir });
  const theirs = await qemuIo([...commandArgs(commands), "theirs.qcow2"], dir);
  assert.equal(ours.code, theirs.code, `exit status (stderr ${ours.stderr})`);
  assert.equal(maskTimings(ours.stdout), maskTimings(theirs.stdout));
  ok(await qemuImg(["compare", "-s", "ours.qcow2", "theirs.qcow2"], dir), "images after the same commands");
  ok(await qemuImg(["check", "ours.qcow2"], dir), "check");
  assert.equal(
    ok(await qemuImg(["map", "--output=json", "ours.qcow2"], dir), "map").stdout,
    ok(await qemuImg(["map", "--output=json", "theirs.qcow2"], dir), "map").stdout,
  );
});

test("io on raw and v2 images, and compressed writes", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await buildFixtures(dir);
  for (const [image, format, commands] of [
    ["plain.raw", "raw", ["read -P 0x88 4k 4k", "write -P 0x99 1M 64k", "read -v 1M 16", "map"]],
    ["v2.qcow2", "qcow2", ["write -z 1M 64k", "read -P 0 1M 64k", "write -c 2M 64k", "read -P 0xcd 2M 64k", "map"]],
  ] as const) {
    copyFileSync(join(dir, image), join(dir, `ours-${image}`));
    copyFileSync(join(dir, image), join(dir, `theirs-${image}`));
    const ours = await snapstack(["io", "-f", format, ...commandArgs([...commands]), `ours-${image}`], { cwd: dir });
    const theirs = await qemuIo(["-f", format, ...commandArgs([...commands]), `theirs-${image}`], dir);
    assert.equal(ours.code, theirs.code, `${image} exit status (stderr ${ours.stderr})`);
    assert.equal(maskTimings(ours.stdout), maskTimings(theirs.stdout), image);
    ok(await qemuImg(["compare", "-f", format, "-F", format, `ours-${image}`, `theirs-${image}`], dir), `${image} content`);
  }
});

test("io random writes read back identically through qemu-io", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "r.qcow2", "4M"], dir), "create");
  const checks: string[] = [];
  const commands: string[] = [];
  for (let i = 0; i < 20; i++) {
    const offset = random.int(4 * 2 ** 20 - 70000);
    const length = 1 + random.int(65536);
    const pattern = random.int(256);
    commands.push(`write -P ${pattern} ${offset} ${length}`);
    checks.push(`read -P ${pattern} ${offset} ${length}`);
  }
  ok(await snapstack(["io", ...commandArgs(commands), "r.qcow2"], { cwd: dir }), "snapstack io writes");
  // Only the last write of each byte survives; verify the last write entirely, and the whole image with check.
  ok(await qemuIo(["-r", "-c", checks[checks.length - 1], "r.qcow2"], dir), "qemu-io reads the last write");
  ok(await qemuImg(["check", "r.qcow2"], dir), "check");
  const replay = join(dir, "replay.qcow2");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", replay, "4M"], dir), "create replay");
  ok(await qemuIo([...commandArgs(commands), replay], dir), "qemu-io replay");
  ok(await qemuImg(["compare", "r.qcow2", replay], dir), "same content as qemu-io's");
});

test("io read -P mismatch: qemu-io's line on stdout, E_PATTERN_MISMATCH on stderr, exit 1", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await buildFixtures(dir);
  const ours = await snapstack(["io", "-r", "-c", "read -P 0xac 0 4k", "base.qcow2"], { cwd: dir });
  const theirs = await qemuIo(["-r", "-c", "read -P 0xac 0 4k", "base.qcow2"], dir);
  assert.equal(ours.code, 1);
  assert.equal(theirs.code, 1);
  assert.equal(maskTimings(ours.stdout), maskTimings(theirs.stdout));
  assert.match(ours.stdout, /^Pattern verification failed at offset 0, 4096 bytes\n/);
  assert.match(ours.stderr, /^snapstack: error E_PATTERN_MISMATCH: Pattern verification failed at offset 0, 4096 bytes\n$/);
});

test("io write -n needs -z, as in qemu-io; the refused write leaves the image untouched", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "n.qcow2", "1M"], dir), "create");
  const before = readFileSync(join(dir, "n.qcow2"));
  const theirs = await qemuIo(["-c", "write -n 0 4k", "n.qcow2"], dir);
  const ours = await snapstack(["io", "-c", "write -n 0 4k", "n.qcow2"], { cwd: dir });
  assert.match(theirs.stdout + theirs.stderr, /-n requires -z to be specified/);
  assert.notEqual(ours.code, 0);
  assert.match(ours.stderr, /E_USAGE: -n requires -z to be specified/);
  assert.ok(readFileSync(join(dir, "n.qcow2")).equals(before));
  ok(await snapstack(["io", "-c", "write -z -n 0 4k", "n.qcow2"], { cwd: dir }), "write -z -n");
});

test("io write -z over many L2 tables (shared with a snapshot, compressed, allocated and empty entries) leaves the image qemu-io leaves", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  // 512-byte clusters: 64 entries per L2 table, so the zeroed range spans about 200 tables (32 with extended L2 and 16 KiB clusters).
  for (const [options, unmap] of [
    ["cluster_size=512", ""],
    ["cluster_size=512", "-u "],
    ["cluster_size=16k,extended_l2=on", ""],
    ["cluster_size=16k,extended_l2=on", "-u "],
    ["cluster_size=512,compat=0.10", ""],
  ] as const) {
    const what = `${options} ${unmap}`;
    ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", options, "base.qcow2", "8M"], dir), `${what}: create`);
    ok(await qemuIo(["-c", "write -P 0x11 0 3M", "-c", "write -c -P 0x22 3M 64k", "-c", "write -P 0x33 5M 1M", "base.qcow2"], dir), `${what}: fill`);
    ok(await qemuImg(["snapshot", "-c", "snap", "base.qcow2"], dir), `${what}: snapshot`);
    ok(await qemuIo(["-c", "write -P 0x44 1M 512k", "base.qcow2"], dir), `${what}: write after the snapshot`);
    copyFileSync(join(dir, "base.qcow2"), join(dir, "ours.qcow2"));
    copyFileSync(join(dir, "base.qcow2"), join(dir, "theirs.qcow2"));
    const command = `write -z ${unmap}7k 6M`;
    ok(await snapstack(["io", "-c", command, "ours.qcow2"], { cwd: dir }), `${what}: snapstack io`);
    ok(await qemuIo(["-c", command, "theirs.qcow2"], dir), `${what}: qemu-io`);
    ok(await qemuImg(["check", "ours.qcow2"], dir), `${what}: check`);
    ok(await qemuImg(["compare", "ours.qcow2", "theirs.qcow2"], dir), `${what}: content`);
    const map = async (file: string): Promise<string> => ok(await qemuImg(["map", "--output=json", file], dir), `${what}: map`).stdout;
    assert.equal(await map("ours.qcow2"), await map("theirs.qcow2"), `${what}: same clusters`);
    if (unmap === "" && !options.includes("compat=0.10")) {
      // Byte for byte: same tables copied from the snapshot's, same entries (where clusters are freed, with -u and in
      // v2 images, which have no zero clusters, qemu also punches their bytes out of the file; Node cannot).
      assert.ok(readFileSync(join(dir, "ours.qcow2")).equals(readFileSync(join(dir, "theirs.qcow2"))), `${what}: same bytes as qemu-io's`);
    }
    ok(await qemuImg(["snapshot", "-a", "snap", "ours.qcow2"], dir), `${what}: apply the snapshot`);
    ok(await qemuIo(["-c", "read -P 0x11 0 3M", "-c", "read -P 0x22 3M 64k", "-c", "read -P 0x33 5M 1M", "ours.qcow2"], dir), `${what}: the snapshot still holds its data`);
  }
});

test("io -U writes nothing: qemu-io allows force-share only read-only (-r)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "u.qcow2", "1M"], dir), "create");
  const before = readFileSync(join(dir, "u.qcow2"));
  const theirs = await qemuIo(["-U", "-c", "write -P 5 0 4k", "u.qcow2"], dir);
  assert.match(theirs.stdout + theirs.stderr, /force-share=on can only be used with read-only images/);
  const ours = await snapstack(["io", "-U", "-c", "write -P 5 0 4k", "u.qcow2"], { cwd: dir });
  assert.equal(ours.code, 1);
  assert.match(ours.stderr, /E_USAGE: force-share=on can only be used with read-only images/);
  assert.ok(readFileSync(join(dir, "u.qcow2")).equals(before));
  ok(await snapstack(["io", "-U", "-r", "-c", "read -P 0 0 4k", "u.qcow2"], { cwd: dir }), "io -U -r");
});

test("io commands that fail print on stdout what qemu-io prints there (and the coded error on stderr)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "e.qcow2", "1M"], dir), "create");
  ok(await qemuIo(["-c", "write 0 64k", "e.qcow2"], dir), "write");
  const failing = [
    "write -n 0 4k",
    "write -z -P 1 0 4k",
    "write -u 0 4k",
    "write -c 1 512",
    "read 0 3G",
    "read x 4k",
    "read 0 4y",
    "discard 2M 4k",
    "write 2M 4k",
    "write -z 2M 4k",
    "read -s 1 0 4k",
    "read 2M 4k",
    "write -P 300 0 4k",
    "write -c 0 4k",
    "write -c 0 64k",
    "read -P 0 -s 1k -l 4k 0 4k",
    "write -z 0 2G",
    "write 0 3G",
    "truncate -5",
    "readv 1M 512",
    "writev 1M 512",
    // A bad option or argument count: qemu-io's usage line of the command on stdout, or its argument count check.
    "read -x 0 1",
    "read 0 1 2",
    "read 0 -1",
    "readv -s 0 1",
    "aio_read -x 0 1",
    "aio_write -c 0 1",
    "writev -z 0 1",
    "discard -x 0 1",
    "read 0",
    "write -P",
    // Numbers up to INT64_MAX parse as in qemu-io; the request limits and the disk end then refuse them.
    "read 0 1E",
    "discard 0 1E",
    "read 7E 1",
    "write 7E 512",
    "write -z 7E 1E",
    "read 8E 1",
  ];
  for (const command of failing) {
    copyFileSync(join(dir, "e.qcow2"), join(dir, "ours.qcow2"));
    copyFileSync(join(dir, "e.qcow2"), join(dir, "theirs.qcow2"));
    const theirs = await qemuIo(["-c", command, "theirs.qcow2"], dir);
    const ours = await snapstack(["io", "-c", command, "ours.qcow2"], { cwd: dir });
    assert.equal(theirs.code, 1, `${command}: qemu-io fails`);
    assert.equal(ours.code, 1, command);
    assert.equal(ours.stdout, theirs.stdout, command);
    assert.match(ours.stderr, /^snapstack: error E_[A-Z_]+: .+\n$/, command);
    assert.ok(readFileSync(join(dir, "ours.qcow2")).equals(readFileSync(join(dir, "e.qcow2"))), `${command}: image changed`);
  }
  // A failed aio_read reports as qemu-io's aio_read_done does ("readv failed"), the exit status stays.
  const aio = [await snapstack(["io", "-c", "aio_read 1M 512", "e.qcow2"], { cwd: dir }), await qemuIo(["-c", "aio_read 1M 512", "e.qcow2"], dir)];
  assert.equal(aio[0].stdout, aio[1].stdout, "aio_read past the end");
  assert.equal(aio[0].code, aio[1].code, "aio_read past the end: exit status");
  // Read-only (-r): a command that writes is refused before its arguments are read, nothing on stdout.
  for (const command of ["write 0 4k", "discard 0 4k", "writev 0 512", "aio_write 0 512", "truncate 2M", "write -c 0 2M", "write -z -P 1 0 4k"]) {
    const theirs = await qemuIo(["-r", "-c", command, "e.qcow2"], dir);
    const ours = await snapstack(["io", "-r", "-c", command, "e.qcow2"], { cwd: dir });
    assert.equal(ours.code, theirs.code, `-r ${command}: exit status`);
    assert.equal(ours.stdout, theirs.stdout, `-r ${command}: stdout`);
    assert.equal(theirs.stderr, "qemu-io: Block node is read-only\n", `-r ${command}: qemu-io's stderr`);
    assert.equal(ours.stderr, "snapstack: error E_READ_ONLY: Block node is read-only\n", `-r ${command}: stderr`);
  }
  // The word count is checked first, read-only or not, naming the command as typed.
  for (const command of ["w", "write -x", "t 1M 2M 3M 4M", "truncate", "r 0"]) {
    for (const readOnly of [["-r"], []]) {
      const theirs = await qemuIo([...readOnly, "-c", command, "e.qcow2"], dir);
      const ours = await snapstack(["io", ...readOnly, "-c", command, "e.qcow2"], { cwd: dir });
      const where = `${readOnly.join("")} ${command}`;
      assert.match(theirs.stderr, /^bad argument count \d+ to \w+, expected .*\n$/, where);
      assert.equal(ours.code, theirs.code, where);
      assert.equal(ours.stdout, theirs.stdout, where);
      assert.equal(ours.stderr, `snapstack: error E_USAGE: ${theirs.stderr}`, where);
    }
  }
});

test("io readv/writev/aio_read/aio_write/aio_flush/length/info/alloc/truncate/sleep print what qemu-io prints and leave the same image", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const sessions: Array<[string, string, string[]]> = [
    [
      "qcow2",
      "cluster_size=64k",
      [
        "write -P 1 64k 128k",
        "length",
        "info",
        "alloc 0 1M",
        "alloc 64k",
        "alloc 0",
        "alloc 65537 3",
        "alloc 9M 4M",
        "alloc 11M",
        "alloc 0 7E",
        "alloc 7E",
        "readv -P 1 64k 4k 4k",
        "writev -P 2 1M 4k 8k",
        "readv -v 1M 16 16",
        "aio_write -P 3 2M 64k",
        "aio_flush",
        // Requests in flight together complete in either order (in qemu-io too): one at a time here.
        "aio_read -P 3 2M 64k",
        "aio_flush",
        "aio_read -P 4 2M 4k",
        "aio_flush",
        "aio_write -z 2M 4k 4k",
        "aio_write 30M 4k",
        "aio_flush",
        "truncate 20M 1",
        "length",
        "sleep 10",
        "sleep x",
        "map",
      ],
    ],
    ["qcow2", "extended_l2=on,cluster_size=128k", ["info", "write -P 7 4k 8k", "alloc 0 128k", "truncate 64k", "length", "map"]],
    ["raw", "", ["info", "length", "alloc 0 4k", "writev -P 5 0 1 2 3", "readv -P 5 0 6", "truncate 2M", "length", "truncate -m falloc 3M", "length"]],
    // An aio read that finds other bytes reports it and leaves the exit status at 0, as qemu-io does; -z takes any length.
    ["raw", "", ["write -P 1 0 512", "aio_read -P 5 0 512", "aio_flush", "write -z -n 0 3M", "aio_write -z 0 2G", "aio_flush", "length"]],
  ];
  for (const [format, options, commands] of sessions) {
    const what = `${format} ${options}`;
    ok(await qemuImg(["create", "-q", "-f", format, ...(options === "" ? [] : ["-o", options]), "base.img", "10M"], dir), `${what}: create`);
    copyFileSync(join(dir, "base.img"), join(dir, "ours.img"));
    copyFileSync(join(dir, "base.img"), join(dir, "theirs.img"));
    const ours = await snapstack(["io", "-f", format, ...commandArgs(commands), "ours.img"], { cwd: dir });
    const theirs = await qemuIo(["-f", format, ...commandArgs(commands), "theirs.img"], dir);
    assert.equal(ours.code, theirs.code, `${what}: exit status (stderr ${ours.stderr})`);
    assert.equal(maskTimings(ours.stdout), maskTimings(theirs.stdout), what);
    ok(await qemuImg(["compare", "-f", format, "-F", format, "ours.img", "theirs.img"], dir), `${what}: content`);
  }
});

test("io and map whose reader goes away (| head) run to their end and exit as qemu-io and qemu-img do", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "raw", "ours.img", "4M"], dir), "create");
  ok(await qemuImg(["create", "-q", "-f", "raw", "theirs.img", "4M"], dir), "create");
  // ~5 MB of hex dump: the reader is gone long before it ends; the write after it must still happen.
  const commands = "-c 'read -v 0 1M' -c 'write -P 0x5a 1M 64k'";
  const piped = (tool: string, image: string) =>
    run("bash", ["-c", `cd '${dir}' && ${tool} -f raw ${commands} ${image} | head -c 10 >/dev/null; exit \${PIPESTATUS[0]}`]);
  const ours = await piped(`'${process.execPath}' '${SNAPSTACK_BIN}' io`, "ours.img");
  const theirs = await piped("qemu-io", "theirs.img");
  assert.equal(ours.stderr, "");
  assert.equal(ours.code, theirs.code, "exit status (qemu-io: 0)");
  ok(await qemuImg(["compare", "-f", "raw", "-F", "raw", "ours.img", "theirs.img"], dir), "the write after the closed output happened");
  ok(await qemuIo(["-f", "raw", "-c", "read -P 0x5a 1M 64k", "ours.img"], dir), "written pattern");
  // map of an image with ~4,000 entries (more output than a pipe holds): exit status as qemu-img's.
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "many.qcow2", "1G"], dir), "create");
  const writes = Array.from({ length: 2048 }, (_, i) => `write -q ${i * 256}k 64k`).join("\n");
  ok(await run("sh", ["-c", `cd '${dir}' && printf '${writes}\\n' | qemu-io -f qcow2 many.qcow2 >/dev/null`]), "fill");
  const mapPiped = (tool: string) => run("bash", ["-c", `cd '${dir}' && ${tool} map many.qcow2 | head -1 >/dev/null; exit \${PIPESTATUS[0]}`]);
  const ourMap = await mapPiped(`'${process.execPath}' '${SNAPSTACK_BIN}' img`);
  const theirMap = await mapPiped("qemu-img");
  assert.equal(ourMap.stderr, "");
  assert.equal(ourMap.code, theirMap.code, "map exit status (qemu-img: 0)");
});

test("io takes qemu-io's -t, -n, -i and -d unmap (refusing bad values with its messages); -d ignore is refused, not ignored", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "o.qcow2", "1M"], dir), "create");
  const commands = ["-c", "write -P 5 0 4k", "-c", "read -P 5 0 4k", "-c", "flush"];
  const timing = (text: string): string => text.replace(/^.*ops\/sec\)\n/gm, "");
  for (const options of [["-t", "none"], ["-t", "unsafe"], ["--cache=writeback"], ["-n"], ["-i", "threads"], ["-d", "unmap"], ["-t", "directsync", "-d", "on"]]) {
    const theirs = await qemuIo([...options, ...commands, "o.qcow2"], dir);
    const ours = await snapstack(["io", ...options, ...commands, "o.qcow2"], { cwd: dir });
    assert.equal(ours.code, 0, `${options.join(" ")}: ${ours.stderr}`);
    assert.equal(timing(ours.stdout), timing(theirs.stdout), options.join(" "));
  }
  for (const [options, message] of [
    [["-t", "bogus"], "Invalid cache option: bogus"],
    [["-d", "bogus"], "Invalid discard option: bogus"],
    [["-i", "bogus"], "Invalid aio option: bogus"],
  ] as const) {
    const theirs = await qemuIo([...options, ...commands, "o.qcow2"], dir);
    const ours = await snapstack(["io", ...options, ...commands, "o.qcow2"], { cwd: dir });
    assert.equal(theirs.stderr, `qemu-io: ${message}\n`);
    assert.equal(ours.code, theirs.code, options.join(" "));
    assert.equal(ours.stdout, theirs.stdout, options.join(" "));
    assert.match(ours.stderr, new RegExp(`^snapstack: error E_INVALID_OPTION: ${message}\\n$`));
  }
  const ignored = await snapstack(["io", "-d", "ignore", "-c", "discard 0 64k", "o.qcow2"], { cwd: dir });
  assert.equal(ignored.code, 1);
  assert.match(ignored.stderr, /^snapstack: error E_UNSUPPORTED_FEATURE: -d ignore is not supported/);
});
