/**
 * `snapstack img bench` against `qemu-img bench` 7.2: the lines printed for
 * the same options, the bytes a write run leaves (the same request
 * sequence, compared with qemu-img compare on copies), flushes, refusals
 * with qemu-img's messages, and what snapstack does differently (a wrap
 * never runs past the end; -d 0 and O_DIRECT refused).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync } from "node:fs";
import { join } from "node:path";
import { assertCodedError, ok, qemuImg, qemuIo, snapstack } from "./cli-helpers.ts";
import { requireTools, scratchDir } from "../helpers/tools.ts";

/** The output without the run time, which differs run to run. */
function withoutTime(stdout: string): string {
  return stdout.replace(/Run completed in \d+\.\d{3} seconds\./, "Run completed in N seconds.");
}

async function qcow2WithData(dir: string, name: string): Promise<string> {
  const path = join(dir, name);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", path, "8M"]), "create");
  ok(await qemuIo(["-f", "qcow2", "-c", "write -q -P 0x11 0 8M", path]), "qemu-io");
  return path;
}

test("img bench prints qemu-img bench's lines and a write run leaves the bytes qemu-img's leaves (patterns, offsets, steps, depth, flushes)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const runs: string[][] = [
    ["-c", "1000"],
    // Runs that do not wrap: snapstack wraps before the end where 7.2 wraps at it (third test).
    ["-c", "50", "-d", "4", "-s", "64k", "-S", "128k", "-o", "1M", "-w", "--pattern=5"],
    ["-c", "500", "-d", "8", "-s", "8k", "-S", "0", "-w", "--pattern=0x2a", "--flush-interval=100"],
    ["-c", "100", "-d", "16", "-w", "--pattern=7", "--flush-interval=20", "--no-drain", "-o", "4M"],
    ["-c", "0", "-w"],
  ];
  for (const args of runs) {
    const ours = await qcow2WithData(dir, "ours.qcow2");
    const theirs = join(dir, "theirs.qcow2");
    copyFileSync(ours, theirs);
    const mine = ok(await snapstack(["img", "bench", "-f", "qcow2", ...args, ours]), `snapstack img bench ${args.join(" ")}`);
    const qemu = ok(await qemuImg(["bench", "-f", "qcow2", ...args, theirs]), `qemu-img bench ${args.join(" ")}`);
    assert.equal(withoutTime(mine.stdout), withoutTime(qemu.stdout), args.join(" "));
    assert.match(mine.stdout, /Run completed in \d+\.\d{3} seconds\.\n$/);
    ok(await qemuImg(["check", "-q", ours]), "qemu-img check");
    ok(await qemuImg(["compare", "-q", "-f", "qcow2", "-F", "qcow2", ours, theirs]), `same bytes after ${args.join(" ")}`);
  }
  // The writes landed where they were sent: 64 KiB of 5 from 1 MiB in 128 KiB steps.
  const path = await qcow2WithData(dir, "check.qcow2");
  ok(await snapstack(["img", "bench", "-w", "-c", "3", "-s", "64k", "-S", "128k", "-o", "1M", "--pattern=5", path]), "bench");
  ok(await qemuIo(["-f", "qcow2", "-c", "read -P 5 1M 64k", "-c", "read -P 0x11 1088k 64k", "-c", "read -P 5 1152k 64k", "-c", "read -P 5 1280k 64k", "-c", "read -P 0x11 1344k 64k", path]), "the pattern where it was sent, the old bytes between");
});

test("img bench refuses what qemu-img bench refuses, with its messages, and what snapstack cannot measure truthfully", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await qcow2WithData(dir, "a.qcow2");
  const cases: Array<[string[], string, RegExp, boolean]> = [
    [["-c", "abc"], "E_INVALID_OPTION", /Invalid request count specified/, true],
    [["-w", "--pattern=300"], "E_INVALID_OPTION", /Invalid pattern byte specified/, true],
    [["--flush-interval=5"], "E_USAGE", /--flush-interval is only available in write tests/, true],
    [["-w", "--flush-interval=3"], "E_INVALID_OPTION", /Flush interval can't be smaller than depth/, true],
    [["-w", "--flush-interval=3", "--no-drain"], "E_INVALID_OPTION", /Flush interval can't be smaller than depth/, true],
    [["-i", "bogus"], "E_INVALID_OPTION", /Invalid aio option: bogus/, true],
    [["-t", "bogus"], "E_INVALID_OPTION", /Invalid cache option: bogus/, true],
    [["-w", "-U"], "E_USAGE", /force-share=on can only be used with read-only images/, true],
    // qemu-img 7.2 hangs on -d 0; snapstack refuses it.
    [["-d", "0"], "E_INVALID_OPTION", /Invalid queue depth specified/, false],
    // No O_DIRECT here: refused rather than measured through the page cache.
    [["-n"], "E_UNSUPPORTED_FEATURE", /cache mode none/, false],
    [["-t", "directsync"], "E_UNSUPPORTED_FEATURE", /directsync/, false],
    // QEMU's alias for none.
    [["-t", "off"], "E_UNSUPPORTED_FEATURE", /off/, false],
  ];
  for (const [args, code, message, qemuRefuses] of cases) {
    const result = await snapstack(["img", "bench", ...args, path]);
    assertCodedError(result, code);
    assert.match(result.stderr, message, args.join(" "));
    if (qemuRefuses) assert.notEqual((await qemuImg(["bench", ...args, path])).code, 0, `qemu-img refuses ${args.join(" ")} too`);
  }
  // A first request past the end: qemu-img fails it with EIO after its first line; snapstack fails it, coded, before any request.
  const past = await snapstack(["img", "bench", "-c", "1", "-o", "8M", path]);
  assert.equal(past.code, 1);
  assert.match(past.stderr, /E_OUT_OF_RANGE/);
  assert.notEqual((await qemuImg(["bench", "-c", "1", "-o", "8M", path])).code, 0);
});

test("img bench wraps before the end: a step that qemu-img 7.2 wraps into a request past the end (EIO) runs to completion", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = join(dir, "small.raw");
  ok(await qemuImg(["create", "-q", "-f", "raw", path, "1M"]), "create");
  // 4 KiB requests 6 KiB apart: 7.2's offsets reach 1 MiB - 2 KiB, whose request would end 2 KiB past the end.
  ok(await snapstack(["img", "bench", "-f", "raw", "-w", "--pattern=9", "-c", "2000", "-s", "4k", "-S", "6k", path]), "snapstack img bench");
  const size = (await qemuImg(["info", "--output=json", path])).stdout;
  assert.equal(JSON.parse(size)["virtual-size"], 1048576, "nothing written past the end");
  // Offsets 0, 6k, ... 1014k, then 0 again (1020k is a multiple of 6k): the pattern there, zeroes between.
  ok(await qemuIo(["-f", "raw", "-c", "read -P 9 0 4k", "-c", "read -P 0 4k 2k", "-c", "read -P 9 6k 4k", "-c", "read -P 9 1014k 4k", "-c", "read -P 0 1018k 6k", path]), "where the requests went");
});
