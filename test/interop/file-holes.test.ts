/**
 * Holes in raw files, against qemu-img, qemu-io and qemu-nbd on the same
 * files: snapstack sees them (map, NBD block status, convert) and makes
 * them (discard, write -z -u, NBD TRIM and WRITE_ZEROES, preallocation,
 * qemu's first-block allocation at create) as QEMU does, with the native
 * addon (src/io/native-file-ops.ts). Compared: map JSON exactly, the
 * blocks each file occupies (stat), and the bytes.
 */
import { createHash } from "node:crypto";
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { ok, qemuImg, qemuIo, snapstack } from "./cli-helpers.ts";
import { startNbd } from "./nbd-helpers.ts";
import { allocatedRanges, requireNativeFileOps, requireTools, runOk, scratchDir } from "../helpers/tools.ts";

/** A file's bytes as a digest: assert's diff of two large unequal buffers takes minutes. */
function digest(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

function allocatedBytes(path: string): number {
  return statSync(path).blocks * 512;
}

/** A 16 MiB raw file: holes around data at 1 MiB (64 KiB), 5 MiB (1 MiB) and the last 4 KiB. */
async function sparseRaw(dir: string, name: string): Promise<string> {
  const path = join(dir, name);
  ok(await qemuImg(["create", "-q", "-f", "raw", path, "16M"]), "qemu-img create");
  ok(await qemuIo(["-f", "raw", "-c", "write -P 0x11 1M 64k", "-c", "write -P 0x22 5M 1M", "-c", "write -P 0x33 16380k 4k", path]), "qemu-io write");
  return path;
}

async function bothMaps(path: string, extra: string[] = []): Promise<[string, string]> {
  const qemu = ok(await qemuImg(["map", "--output=json", "-f", "raw", ...extra, path]), "qemu-img map").stdout;
  const ours = ok(await snapstack(["img", "map", "--output=json", "-f", "raw", ...extra, path]), "snapstack img map").stdout;
  return [ours, qemu];
}

test("img map of a sparse raw file: holes are zero, not data, exactly as qemu-img reports them", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io") || !requireNativeFileOps(t)) return;
  const path = await sparseRaw(scratchDir(t), "sparse.raw");
  const [ours, qemu] = await bothMaps(path);
  assert.equal(ours, qemu);
  assert.match(ours, /"zero": true, "data": false/);
  for (const window of [["--start-offset", "1052672", "--max-length", "8M"], ["--start-offset", "5M"]]) {
    const [windowOurs, windowQemu] = await bothMaps(path, window);
    assert.equal(windowOurs, windowQemu, window.join(" "));
  }
});

test("img create and resize of raw files allocate what qemu-img's do (the first block; falloc; full)", async (t) => {
  if (!requireTools(t, "qemu-img") || !requireNativeFileOps(t)) return;
  const dir = scratchDir(t);
  const cases: Array<[string, string[]]> = [
    ["off, 64 MiB", ["-o", "preallocation=off", "64M"]],
    ["off, 1000 bytes", ["1000"]],
    ["falloc, 8 MiB", ["-o", "preallocation=falloc", "8M"]],
    ["full, 2 MiB", ["-o", "preallocation=full", "2M"]],
  ];
  for (const [label, args] of cases) {
    const theirs = join(dir, `qemu-${cases.findIndex((c) => c[0] === label)}.raw`);
    const mine = join(dir, `ours-${cases.findIndex((c) => c[0] === label)}.raw`);
    ok(await qemuImg(["create", "-q", "-f", "raw", theirs, ...args]), `qemu-img create ${label}`);
    ok(await snapstack(["img", "create", "-q", "-f", "raw", mine, ...args]), `snapstack img create ${label}`);
    assert.equal(allocatedBytes(mine), allocatedBytes(theirs), `allocated bytes, ${label}`);
    assert.equal(digest(mine), digest(theirs), `bytes, ${label}`);
    const [ours, qemu] = await bothMaps(mine);
    assert.equal(ours, (await bothMaps(theirs))[1].replaceAll(theirs, mine), `map, ${label}`);
    assert.equal(ours, qemu, `our map of our file, ${label}`);
  }
  // Growing an empty file allocates its first block too; growing with falloc allocates the new part.
  for (const [name, tool] of [["grow-qemu.raw", qemuImg], ["grow-ours.raw", (args: string[]) => snapstack(["img", ...args])]] as const) {
    const path = join(dir, name);
    ok(await qemuImg(["create", "-q", "-f", "raw", path, "0"]), "create empty");
    ok(await tool(["resize", "-f", "raw", path, "4M"]), `${name} resize`);
    ok(await tool(["resize", "-f", "raw", "--preallocation=falloc", path, "6M"]), `${name} resize falloc`);
  }
  assert.equal(allocatedBytes(join(dir, "grow-ours.raw")), allocatedBytes(join(dir, "grow-qemu.raw")));
  assert.equal((await bothMaps(join(dir, "grow-ours.raw")))[0], (await bothMaps(join(dir, "grow-qemu.raw")))[0].replaceAll("grow-qemu", "grow-ours"));
});

test("io discard, write -z -u and write -z free or keep space as qemu-io's do, and read back zeroes", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io") || !requireNativeFileOps(t)) return;
  const dir = scratchDir(t);
  const base = join(dir, "full.raw");
  ok(await qemuImg(["create", "-q", "-f", "raw", base, "8M"]), "create");
  ok(await qemuIo(["-f", "raw", "-c", "write -P 0x5a 0 8M", base]), "fill");
  const commands = ["discard 1M 1M", "write -z -u 3M 512k", "write -z 5M 1M", "discard 7M 6k"];
  const theirs = join(dir, "qemu.raw");
  const mine = join(dir, "ours.raw");
  copyFileSync(base, theirs);
  copyFileSync(base, mine);
  ok(await qemuIo(["-f", "raw", ...commands.flatMap((command) => ["-c", command]), theirs]), "qemu-io");
  ok(await snapstack(["io", "-f", "raw", ...commands.flatMap((command) => ["-c", command]), mine]), "snapstack io");
  assert.equal(allocatedBytes(mine), allocatedBytes(theirs));
  // The 1 MiB discard and the 512 KiB write -z -u free their blocks; the 6 KiB discard frees none in either (qemu
  // aligns discards), write -z keeps its blocks allocated.
  assert.equal(allocatedBytes(mine), 8 * 1024 * 1024 - 1024 * 1024 - 512 * 1024);
  assert.equal(digest(mine), digest(theirs));
  const [ours, qemu] = await bothMaps(mine);
  assert.equal(ours, qemu);
  assert.equal(ours, (await bothMaps(theirs))[1].replaceAll(theirs, mine));
});

test("convert from a sparse raw file keeps its holes, as qemu-img convert does, also with -n into a full target", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io") || !requireNativeFileOps(t)) return;
  const dir = scratchDir(t);
  const source = await sparseRaw(dir, "source.raw");
  for (const [label, prepare] of [
    ["new target", async (_path: string) => {}],
    ["-n into a file full of data", async (path: string) => {
      ok(await qemuImg(["create", "-q", "-f", "raw", path, "16M"]), "create target");
      ok(await qemuIo(["-f", "raw", "-c", "write -P 0x77 0 16M", path]), "fill target");
    }],
  ] as const) {
    const theirs = join(dir, `qemu-${label.length}.raw`);
    const mine = join(dir, `ours-${label.length}.raw`);
    await prepare(theirs);
    await prepare(mine);
    const extra = label.startsWith("-n") ? ["-n"] : [];
    ok(await qemuImg(["convert", "-f", "raw", "-O", "raw", ...extra, source, theirs]), `qemu-img convert, ${label}`);
    ok(await snapstack(["img", "convert", "-f", "raw", "-O", "raw", ...extra, source, mine]), `snapstack img convert, ${label}`);
    assert.equal(digest(mine), digest(source), label);
    assert.equal(allocatedBytes(mine), allocatedBytes(theirs), `allocated bytes, ${label}`);
    assert.equal((await bothMaps(mine))[1], (await bothMaps(theirs))[1].replaceAll(theirs, mine), `map, ${label}`);
  }
});

test("NBD raw export: block status sees holes as qemu-nbd does; TRIM and WRITE_ZEROES punch and allocate as qemu-nbd --discard=unmap", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdsh") || !requireNativeFileOps(t)) return;
  const dir = scratchDir(t);
  const source = await sparseRaw(dir, "served.raw");
  const theirs = await sparseRaw(dir, "qemu.raw"); // made the same way: a copy would fill holes (copyFileSync) or punch zero blocks (cp)
  const ourServer = await startNbd(t, "snapstack", dir, source, { args: ["-t", "-f", "raw", "--discard=unmap"] });
  const theirServer = await startNbd(t, "qemu-nbd", dir, theirs, { args: ["-t", "-f", "raw", "--discard=unmap"] });
  const maps = await Promise.all([ourServer, theirServer].map(async (server) => (await runOk("nbdinfo", ["--map", "--json", server.uri])).stdout));
  assert.equal(maps[0], maps[1]);
  assert.match(maps[0], /"type": 3/);
  // The last zero asks for FAST_ZERO: both servers zero in place, so both take it (without the addon
  // snapstack would refuse it with ENOTSUP, as a server that would write zeroes must).
  const script = `
h.trim(1048576, 1048576)
h.zero(524288, 5242880, nbd.CMD_FLAG_NO_HOLE)
h.zero(1048576, 5767168)
h.zero(65536, 16711680, nbd.CMD_FLAG_FAST_ZERO)
h.flush()
`;
  for (const server of [ourServer, theirServer]) await runOk("nbdsh", ["-u", server.uri, "-c", script]);
  assert.equal(digest(source), digest(theirs));
  assert.equal(allocatedBytes(source), allocatedBytes(theirs));
  const after = await Promise.all([ourServer, theirServer].map(async (server) => (await runOk("nbdinfo", ["--map", "--json", server.uri])).stdout));
  assert.equal(after[0], after[1]);
});

/**
 * An nbdsh script printing, for each [offset, length], the chunks of a
 * structured READ (libnbd's pread_structured: status 1 data, 2 hole) as
 * JSON lines, and the SHA-256 of the bytes.
 */
function chunkScript(ranges: Array<[number, number]>): string {
  return `
import hashlib, json
for (offset, length) in ${JSON.stringify(ranges)}:
    chunks = []
    def chunk(subbuf, at, status, error):
        chunks.append([status, at, len(subbuf)])
        return 0
    data = h.pread_structured(length, offset, chunk)
    print(json.dumps({"offset": offset, "chunks": chunks, "sha256": hashlib.sha256(data).hexdigest()}))
`;
}

test("NBD raw export: structured READs send the file's holes as hole chunks, the same chunks qemu-nbd sends, before and after TRIM and WRITE_ZEROES", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdsh") || !requireNativeFileOps(t)) return;
  const dir = scratchDir(t);
  const source = await sparseRaw(dir, "served.raw");
  const theirs = await sparseRaw(dir, "qemu.raw");
  // One process: its TRIM forgets the data run it knew (with data workers, another worker's READ may
  // still send a punched range's zeroes as data, the same bytes; see NodeFile's design notes).
  const ourServer = await startNbd(t, "snapstack", dir, source, { args: ["-t", "-f", "raw", "--discard=unmap", "--workers=0"] });
  const theirServer = await startNbd(t, "qemu-nbd", dir, theirs, { args: ["-t", "-f", "raw", "--discard=unmap"] });
  const MiB = 1024 * 1024;
  const ranges: Array<[number, number]> = [
    [0, 8 * MiB],
    [8 * MiB, 8 * MiB],
    [MiB - 4096, 73728],
    [5 * MiB + 512 * 1024, MiB],
    [0, 65536],
  ];
  const chunksOf = async (): Promise<[string, string]> => {
    const [ours, qemu] = await Promise.all([ourServer, theirServer].map(async (server) => (await runOk("nbdsh", ["-u", server.uri, "-c", chunkScript(ranges)])).stdout));
    return [ours, qemu];
  };
  const [before, qemuBefore] = await chunksOf();
  assert.equal(before, qemuBefore);
  const first = JSON.parse(before.split("\n")[0]) as { chunks: number[][] };
  assert.deepEqual(
    first.chunks.map(([status]) => status),
    [1, 2, 1, 2, 1, 2],
    "data at 0 (qemu's first block), 1 MiB and 5 MiB, holes between",
  );
  // A READ inside one data run, then the run punched by this server and written again: each READ
  // after a change sees it.
  for (const server of [ourServer, theirServer]) {
    await runOk("nbdsh", ["-u", server.uri, "-c", "h.pread(1048576, 5242880)\nh.trim(1048576, 5505024)\nh.zero(65536, 1048576)\nh.pwrite(b'\\x44' * 65536, 8388608)\nh.flush()"]);
  }
  const [after, qemuAfter] = await chunksOf();
  assert.equal(after, qemuAfter);
  assert.notEqual(after, before);
  assert.equal(digest(source), digest(theirs));
});

/** A 16 MiB qcow2 image (64 KiB clusters) with 8 MiB of data and an internal snapshot of the first 2 MiB, made by qemu-img. */
async function qcow2WithData(dir: string, name: string): Promise<string> {
  const path = join(dir, name);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", path, "16M"]), "qemu-img create");
  ok(await qemuIo(["-c", "write -P 0x11 0 2M", path]), "qemu-io write");
  ok(await qemuImg(["snapshot", "-c", "s1", path]), "qemu-img snapshot");
  ok(await qemuIo(["-c", "write -P 0x22 2M 6M", path]), "qemu-io write");
  return path;
}

test("qcow2: guest discards and unmapping zero writes punch the clusters they free, as qemu-io's do (shared clusters stay)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io") || !requireNativeFileOps(t)) return;
  const dir = scratchDir(t);
  const theirs = await qcow2WithData(dir, "qemu.qcow2");
  const mine = await qcow2WithData(dir, "ours.qcow2");
  // 0-1M is shared with the snapshot (nothing freed); 3-4M and 6M+ are not.
  const commands = ["discard 0 1M", "discard 3M 1M", "write -z -u 6M 512k", "write -z 7M 512k", "discard 5M 4k"];
  ok(await qemuIo([...commands.flatMap((command) => ["-c", command]), theirs]), "qemu-io");
  ok(await snapstack(["io", ...commands.flatMap((command) => ["-c", command]), mine]), "snapstack io");
  assert.deepEqual(await allocatedRanges(mine), await allocatedRanges(theirs));
  assert.ok(allocatedBytes(mine) < 8.5 * 1024 * 1024 - 1.5 * 1024 * 1024, `${allocatedBytes(mine)} bytes allocated: the freed 1.5 MiB is not`);
  ok(await qemuImg(["check", mine]), "qemu-img check");
  ok(await qemuImg(["compare", "-f", "qcow2", "-F", "qcow2", mine, theirs]), "qemu-img compare");
});

test("qcow2 NBD export with --discard=unmap: TRIM punches what it frees, as qemu-nbd's does", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdsh") || !requireNativeFileOps(t)) return;
  const dir = scratchDir(t);
  const theirs = await qcow2WithData(dir, "qemu.qcow2");
  const mine = await qcow2WithData(dir, "ours.qcow2");
  const ourServer = await startNbd(t, "snapstack", dir, mine, { args: ["-t", "-f", "qcow2", "--discard=unmap"] });
  const theirServer = await startNbd(t, "qemu-nbd", dir, theirs, { args: ["-t", "-f", "qcow2", "--discard=unmap"] });
  for (const server of [ourServer, theirServer]) await runOk("nbdsh", ["-u", server.uri, "-c", "h.trim(2097152, 2097152)\nh.zero(1048576, 6291456)\nh.flush()"]);
  assert.deepEqual(await allocatedRanges(mine), await allocatedRanges(theirs));
  assert.ok(allocatedBytes(mine) < 8.5 * 1024 * 1024 - 3 * 1024 * 1024, `${allocatedBytes(mine)} bytes allocated: the freed 3 MiB is not`);
});

test("qcow2 that looks metadata-preallocated: data over holes in the file is zero in map and NBD block status, as qemu-img and qemu-nbd say", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo") || !requireNativeFileOps(t)) return;
  const dir = scratchDir(t);
  const path = join(dir, "prealloc.qcow2");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, "8M"]), "create");
  ok(await qemuIo(["-c", "write -P 0x44 1M 64k", "-c", "write -P 0x45 3M 4k", path]), "qemu-io");
  const ours = ok(await snapstack(["img", "map", "--output=json", path]), "snapstack img map").stdout;
  assert.equal(ours, ok(await qemuImg(["map", "--output=json", path]), "qemu-img map").stdout);
  assert.match(ours, /"zero": true, "data": true/);
  const maps = [];
  for (const which of ["snapstack", "qemu-nbd"] as const) {
    const server = await startNbd(t, which, dir, path, { args: ["-r", "-f", "qcow2"] });
    maps.push((await runOk("nbdinfo", ["--map", "--json", server.uri])).stdout);
  }
  assert.equal(maps[0], maps[1]);
  assert.match(maps[0], /"type": 2/);
});
