/**
 * Shared pieces of the CLI interop tests: run bin/snapstack with the current
 * node, run qemu-img/qemu-io, snapshot files to prove a refused command left
 * them unchanged, and assert the one-line coded error.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { run, type RunResult } from "../helpers/tools.ts";

export const SNAPSTACK_BIN = fileURLToPath(new URL("../../bin/snapstack", import.meta.url));

/** bin/snapstack run by this node (so the Node version check passes) in `cwd`. */
export function snapstack(args: string[], options: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return runIn(process.execPath, [SNAPSTACK_BIN, ...args], options.cwd, options.env);
}

export function qemuImg(args: string[], cwd?: string): Promise<RunResult> {
  return runIn("qemu-img", args, cwd);
}

export function qemuIo(args: string[], cwd?: string): Promise<RunResult> {
  return runIn("qemu-io", args, cwd);
}

/** tools.ts `run` with a working directory (relative names as a user types them). */
function runIn(command: string, args: string[], cwd?: string, env?: NodeJS.ProcessEnv): Promise<RunResult> {
  if (cwd === undefined) return run(command, args, { env });
  return run("sh", ["-c", 'cd "$0" && exec "$@"', cwd, command, ...args], { env });
}

/** The same `img` command by qemu-img and snapstack in `dir`: stdout and exit status must match. */
export async function assertSameAsQemuImg(dir: string, args: string[], what: string): Promise<void> {
  const theirs = await qemuImg(args, dir);
  const ours = await snapstack(["img", ...args], { cwd: dir });
  assert.equal(ours.code, theirs.code, `${what}: exit status (qemu-img: ${theirs.stderr.trim()}; snapstack: ${ours.stderr.trim()})`);
  assert.equal(ours.stdout, theirs.stdout, `${what}: output`);
}

/** The report commands compared by assertReportsLikeQemuImg. */
export const REPORT_COMMANDS = [["info", "--output=json"], ["info"], ["map", "--output=json"], ["map"], ["check"], ["check", "--output=json"]];

/** `info`, `map` and `check` (human and JSON) of `image` print what qemu-img prints, with the same exit status. */
export async function assertReportsLikeQemuImg(dir: string, image: string, formatArgs: string[] = []): Promise<void> {
  for (const command of REPORT_COMMANDS) await assertSameAsQemuImg(dir, [...command, ...formatArgs, image], `${command.join(" ")} ${image}`);
}

/** snapstack converts `image` to a qcow2 that checks clean and that qemu-img and snapstack compare equal to it. */
export async function assertConvertsToEqualQcow2(dir: string, image: string, formatArgs: string[] = []): Promise<void> {
  ok(await snapstack(["img", "convert", ...formatArgs, "-O", "qcow2", image, "out.qcow2"], { cwd: dir }), `convert ${image}`);
  ok(await qemuImg(["check", "out.qcow2"], dir), `check ${image} converted`);
  ok(await qemuImg(["compare", ...formatArgs, image, "out.qcow2"], dir), `qemu-img compare ${image} with snapstack's qcow2`);
  ok(await snapstack(["img", "compare", ...formatArgs, image, "out.qcow2"], { cwd: dir }), `compare ${image}`);
}

/**
 * A `format` image `name` of 8 MiB made by qemu-img (`createOptions`) and
 * written by qemu-io; snapstack's resize and io write refuse it
 * (E_READ_ONLY) and leave it as it was. Returns its bytes.
 */
export async function readOnlyFormatImage(dir: string, format: string, name: string, createOptions: string[] = [], write = "write -P 7 1M 300k"): Promise<Buffer> {
  ok(await qemuImg(["create", "-q", "-f", format, ...createOptions, name, "8M"], dir), `create ${name}`);
  ok(await qemuIo(["-f", format, "-c", write, name], dir), `write ${name}`);
  const before = readFileSync(join(dir, name));
  assertCodedError(await snapstack(["img", "resize", name, "16M"], { cwd: dir }), "E_READ_ONLY");
  assertCodedError(await snapstack(["io", "-c", "write -P 1 0 4k", name], { cwd: dir }), "E_READ_ONLY");
  assert.ok(readFileSync(join(dir, name)).equals(before), `a refused command changed ${name}`);
  return before;
}

/** Throw unless the command exited 0, with its stderr in the message. */
export function ok(result: RunResult, what: string): RunResult {
  assert.equal(result.code, 0, `${what} exited ${result.code}: ${result.stderr.trim()}`);
  return result;
}

/** Bytes of files, to prove a refused command changed nothing. */
export function snapshotFiles(paths: string[]): Map<string, Buffer> {
  return new Map(paths.map((path) => [path, readFileSync(path)]));
}

export function assertUnchanged(before: Map<string, Buffer>): void {
  for (const [path, bytes] of before) assert.ok(readFileSync(path).equals(bytes), `${path} was modified`);
}

/** A refused command: non-zero exit, exactly one stderr line with the code. */
export function assertCodedError(result: RunResult, code: string, exitCode = 1): void {
  assert.equal(result.code, exitCode, `exit status (stderr: ${result.stderr.trim()})`);
  const lines = result.stderr.split("\n").filter((line) => line !== "");
  assert.equal(lines.length, 1, `one stderr line, got: ${JSON.stringify(result.stderr)}`);
  assert.match(lines[0], new RegExp(`^snapstack: error ${code}: \\S`), lines[0]);
  assert.ok(!result.stderr.includes("    at "), "no stack trace");
}

/** Run qemu tools in `dir`, failing loudly. */
async function qemuSteps(dir: string, steps: Array<["qemu-img" | "qemu-io", string[]]>): Promise<void> {
  for (const [tool, args] of steps) ok(await runIn(tool, args, dir), `${tool} ${args.join(" ")}`);
}

/**
 * Images made by QEMU in `dir` (names relative to it):
 * - base.qcow2: 64 MiB; data at 0, a zero cluster at 1M, a compressed cluster at 2M, data at 5M..5M+192k
 * - top.qcow2: overlay of base.qcow2 with data at 4M and 5M+64k
 * - snap.qcow2: 16 MiB, 4 KiB clusters, one internal snapshot "s1", data written after it
 * - v2.qcow2: compat 0.10, some data
 * - plain.raw: raw 3 MiB with data
 * - sub/base.qcow2 and sub/top.qcow2 (backing named relative to sub/)
 */
export async function buildFixtures(dir: string): Promise<void> {
  await qemuSteps(dir, [
    ["qemu-img", ["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]],
    ["qemu-io", ["-c", "write -P 0xab 0 64k", "-c", "write -z 1M 64k", "-c", "write -c -P 0x11 2M 64k", "-c", "write -P 0x22 5M 192k", "base.qcow2"]],
    ["qemu-img", ["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]],
    ["qemu-io", ["-c", "write -P 0x33 4M 128k", "-c", "write -P 0x44 5308416 4k", "top.qcow2"]],
    ["qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "snap.qcow2", "16M"]],
    ["qemu-io", ["-c", "write -P 0x55 0 8k", "snap.qcow2"]],
    ["qemu-img", ["snapshot", "-c", "s1", "snap.qcow2"]],
    ["qemu-io", ["-c", "write -P 0x66 4k 8k", "snap.qcow2"]],
    ["qemu-img", ["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "8M"]],
    ["qemu-io", ["-c", "write -P 0x77 1M 100k", "v2.qcow2"]],
    ["qemu-img", ["create", "-q", "-f", "raw", "plain.raw", "3M"]],
    ["qemu-io", ["-f", "raw", "-c", "write -P 0x88 4k 4k", "plain.raw"]],
  ]);
  await runIn("mkdir", ["-p", "sub"], dir);
  await qemuSteps(dir, [
    ["qemu-img", ["create", "-q", "-f", "qcow2", "sub/base.qcow2", "1M"]],
    ["qemu-io", ["-c", "write 0 64k", "sub/base.qcow2"]],
    ["qemu-img", ["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "sub/top.qcow2"]],
  ]);
}

export const FIXTURE_IMAGES = ["base.qcow2", "top.qcow2", "snap.qcow2", "v2.qcow2", "plain.raw", "sub/top.qcow2"];

/**
 * A LUKS-encrypted qcow2 image made by qemu-img (secret "123456"), with
 * `options` added to -o. qemu-img 7.2 times PBKDF2 for LUKS and fails with
 * "Unable to get accurate CPU usage" when its first 2^15 iterations take no
 * measurable CPU time (a QEMU bug on fast machines, fixed upstream in 2025):
 * with SHA-256 (SHA-NI) 7 of 20 creations failed here, with SHA-512 none of
 * 20. Retried anyway.
 */
export async function createLuksImage(dir: string, name: string, options = "encrypt.hash-alg=sha512"): Promise<void> {
  const create = () =>
    qemuImg(["create", "-q", "--object", "secret,id=sec0,data=123456", "-f", "qcow2", "-o", `encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,${options}`, name, "1M"], dir);
  let created = await create();
  for (let attempt = 1; attempt < 5 && created.code !== 0 && created.stderr.includes("Unable to get accurate CPU usage"); attempt++) created = await create();
  ok(created, `create ${name}`);
}
