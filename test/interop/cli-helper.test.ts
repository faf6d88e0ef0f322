/**
 * snapstack-img (native/img-client.c) with a real `snapstack helper`
 * process: the same output, errors and exit statuses as `snapstack img`,
 * relative paths in the client's directory, its umask, qemu-img check clean
 * afterwards; running the command itself when no helper listens, when told
 * not to, or when the helper is stopping; and what happens when either side
 * goes away mid-command.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { requireTools, run, scratchDir, type RunResult } from "../helpers/tools.ts";
import { assertCodedError, ok, qemuImg, snapstack, SNAPSTACK_BIN } from "./cli-helpers.ts";

const CLIENT = fileURLToPath(new URL("../../native/build/snapstack-img", import.meta.url));

function requireClient(t: TestContext): boolean {
  if (existsSync(CLIENT)) return true;
  const message = "snapstack-img not built: node native/build.mjs (needs a C compiler: apt-get install gcc)";
  if (process.env.CI === "true") throw new Error(`${message} (CI=true: it must be built)`);
  t.skip(message);
  return false;
}

interface RunningHelper {
  socketPath: string;
  process: ChildProcess;
  /** What the helper logged on stderr so far. */
  log(): string;
  /** Its exit status, or the signal that ended it. */
  exited: Promise<number | NodeJS.Signals | null>;
}

async function startHelper(t: TestContext, dir: string): Promise<RunningHelper> {
  const socketPath = join(dir, "h.sock");
  const child = spawn(process.execPath, [SNAPSTACK_BIN, "helper", "--socket", socketPath, "--idle-timeout", "0"], { stdio: ["ignore", "pipe", "pipe"] });
  let stderr = "";
  child.stderr!.on("data", (chunk) => (stderr += chunk));
  const exited = new Promise<number | NodeJS.Signals | null>((resolve) => child.once("exit", (code, signal) => resolve(code ?? signal)));
  t.after(() => child.kill("SIGKILL"));
  await new Promise<void>((resolve, reject) => {
    let stdout = "";
    child.stdout!.on("data", (chunk) => {
      stdout += chunk;
      if (stdout.includes("listening on")) resolve();
    });
    void exited.then((code) => reject(new Error(`helper exited ${code}: ${stderr}`)));
  });
  return { socketPath, process: child, log: () => stderr, exited };
}

/** snapstack-img in `cwd`, with a shell prefix (e.g. a umask) and extra environment. */
function client(args: string[], options: { cwd: string; socketPath: string; env?: NodeJS.ProcessEnv; shell?: string }): Promise<RunResult> {
  const env = { ...process.env, SNAPSTACK_HELPER_SOCKET: options.socketPath, ...options.env };
  return run("sh", ["-c", `cd "$0" && ${options.shell ?? ""} exec "$@"`, options.cwd, CLIENT, ...args], { env });
}

/** Lines the helper logged for commands it ran. */
function servedCount(helper: RunningHelper): number {
  return helper.log().split("\n").filter((line) => / exit status -?\d+, \d+ ms$/.test(line)).length;
}

/**
 * The helper has logged `count` commands (its log reaches this process
 * through a pipe, maybe after the client's exit). Commands log in order, so
 * a count reached after a later command proves an earlier one was not there.
 */
async function assertServed(helper: RunningHelper, count: number, what: string): Promise<void> {
  for (let i = 0; i < 500 && servedCount(helper) < count; i++) await new Promise((wake) => setTimeout(wake, 10));
  assert.equal(servedCount(helper), count, `${what}:\n${helper.log()}`);
}

test("snapstack-img through a helper prints and exits as snapstack img does, in the client's directory", async (t) => {
  if (!requireClient(t) || !requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const helper = await startHelper(t, dir);
  const viaHelper = join(dir, "via-helper");
  const direct = join(dir, "direct");
  mkdirSync(viaHelper);
  mkdirSync(direct);
  const steps: string[][] = [
    ["create", "-f", "qcow2", "base.qcow2", "64M"],
    ["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    ["snapshot", "-c", "s1", "top.qcow2"],
    ["info", "--output=json", "--backing-chain", "top.qcow2"],
    ["map", "--output=json", "top.qcow2"],
    ["check", "top.qcow2"],
    ["compare", "base.qcow2", "top.qcow2"],
    ["commit", "top.qcow2"],
    ["snapshot", "-d", "s1", "top.qcow2"],
    ["info", "missing.qcow2"],
    ["convert", "--no-such-option"],
    ["--version"],
    ["snapshot", "--help"],
  ];
  for (const where of [viaHelper, direct]) await qemuImgOk(["create", "-f", "raw", "data.raw", "1M"], where);
  let served = 0;
  for (const step of steps) {
    if (step[0] === "commit") {
      for (const where of [viaHelper, direct]) ok(await run("qemu-io", ["-f", "qcow2", "-c", "write -P 9 1M 64k", join(where, "top.qcow2")]), "qemu-io write");
    }
    const ours = await client(step, { cwd: viaHelper, socketPath: helper.socketPath });
    const theirs = await snapstack(["img", ...step], { cwd: direct });
    const what = `img ${step.join(" ")}`;
    assert.equal(ours.code, theirs.code, `${what}: exit status (${ours.stderr.trim()} / ${theirs.stderr.trim()})`);
    // Snapshot times differ between the two runs.
    const normalize = (text: string, where: string): string => text.replaceAll(where, "DIR").replace(/"date-(n?)sec": \d+/g, '"date-$1sec": T');
    assert.equal(normalize(ours.stdout, viaHelper), normalize(theirs.stdout, direct), `${what}: stdout`);
    assert.equal(ours.stderr.replaceAll(viaHelper, "DIR"), theirs.stderr.replaceAll(direct, "DIR"), `${what}: stderr`);
    await assertServed(helper, ++served, `${what} ran in the helper`);
  }
  assertCodedError(await client(["info", "missing.qcow2"], { cwd: viaHelper, socketPath: helper.socketPath }), "E_NOT_FOUND");
  ok(await qemuImg(["check", "top.qcow2"], viaHelper), "qemu-img check after the helper's commands");
  ok(await qemuImg(["compare", "top.qcow2", join(direct, "top.qcow2")], viaHelper), "same content either way");
});

async function qemuImgOk(args: string[], cwd: string): Promise<void> {
  ok(await qemuImg(args, cwd), `qemu-img ${args.join(" ")}`);
}

test("the helper applies the client's umask, and the client runs the command itself when no helper listens or SNAPSTACK_HELPER=off", async (t) => {
  if (!requireClient(t)) return;
  const dir = scratchDir(t);
  const helper = await startHelper(t, dir);
  ok(await client(["create", "-f", "qcow2", "private.qcow2", "1M"], { cwd: dir, socketPath: helper.socketPath, shell: "umask 077 &&" }), "create with umask 077");
  assert.equal(statSync(join(dir, "private.qcow2")).mode & 0o777, 0o600);
  ok(await client(["create", "-f", "qcow2", "shared.qcow2", "1M"], { cwd: dir, socketPath: helper.socketPath, shell: "umask 022 &&" }), "create with umask 022");
  assert.equal(statSync(join(dir, "shared.qcow2")).mode & 0o777, 0o644);
  await assertServed(helper, 2, "both creates ran in the helper");

  // The same snapshot listed in the client's time zone either way.
  ok(await client(["snapshot", "-c", "s1", "shared.qcow2"], { cwd: dir, socketPath: helper.socketPath }), "snapshot -c");
  const tokyo = { TZ: "Asia/Tokyo" };
  const listed = await client(["snapshot", "-l", "shared.qcow2"], { cwd: dir, socketPath: helper.socketPath, env: tokyo });
  assert.equal(listed.stdout, (await snapstack(["img", "snapshot", "-l", "shared.qcow2"], { cwd: dir, env: { ...process.env, ...tokyo } })).stdout);
  await assertServed(helper, 4, "snapshot -c and -l ran in the helper");
  // A path naming the process itself: the client runs the command.
  const fromStdin = await run("sh", ["-c", `cd "$0" && exec "$1" info -f qcow2 /dev/stdin < private.qcow2`, dir, CLIENT], { env: { ...process.env, SNAPSTACK_HELPER_SOCKET: helper.socketPath } });
  assert.equal(fromStdin.code, 0, fromStdin.stderr);
  assert.match(fromStdin.stdout, /^virtual size: 1 MiB/m);

  const off = await client(["info", "private.qcow2"], { cwd: dir, socketPath: helper.socketPath, env: { SNAPSTACK_HELPER: "off" } });
  assert.equal(off.code, 0, off.stderr);
  assert.match(off.stdout, /^image: private\.qcow2$/m);
  ok(await client(["info", "shared.qcow2"], { cwd: dir, socketPath: helper.socketPath }), "info through the helper");
  await assertServed(helper, 5, "/dev/stdin and SNAPSTACK_HELPER=off ran without the helper, the next one with it");

  const none = await client(["info", "private.qcow2"], { cwd: dir, socketPath: join(dir, "nobody-listens.sock") });
  assert.equal(none.code, 0, none.stderr);
  assert.match(none.stdout, /^image: private\.qcow2$/m);
  assertCodedError(await client(["info", "missing.qcow2"], { cwd: dir, socketPath: join(dir, "nobody-listens.sock") }), "E_NOT_FOUND");
});

/** Start snapstack-img with `args` in `dir`; resolves once its command printed `pattern` (it is running in the helper). */
async function startedClient(dir: string, env: NodeJS.ProcessEnv, args: string[], pattern: RegExp): Promise<{ child: ChildProcess; result: Promise<RunResult & { signal: NodeJS.Signals | null }> }> {
  const child = spawn("sh", ["-c", 'cd "$0" && exec "$@"', dir, CLIENT, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stderr!.on("data", (chunk) => (stderr += chunk));
  const result = new Promise<RunResult & { signal: NodeJS.Signals | null }>((resolve) => child.once("exit", (code, signal) => resolve({ code: code ?? -1, signal, stdout, stderr })));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on("data", (chunk) => {
      stdout += chunk;
      if (pattern.test(stdout)) resolve();
    });
    void result.then(() => reject(new Error(`client ended before printing ${pattern}: ${stderr}`)));
  });
  return { child, result };
}

test("Ctrl-C on a client mid-command kills the helper, as it would kill the command's own process; a helper killed mid-command is E_ABORTED", async (t) => {
  if (!requireClient(t) || !requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-f", "qcow2", "disk.qcow2", "64M"], dir), "create");
  const env = { ...process.env, SNAPSTACK_HELPER_SOCKET: join(dir, "h.sock") };
  const longBench = ["bench", "-c", "100000000", "-s", "4k", "disk.qcow2"];

  const helper = await startHelper(t, dir);
  const interrupted = await startedClient(dir, env, longBench, /^Sending /m);
  interrupted.child.kill("SIGINT");
  // img bench over unallocated clusters never yields to the event loop: only a signal ends it.
  const ended = await Promise.race([helper.exited, new Promise((resolve) => setTimeout(() => resolve("still running after 30 s"), 30_000).unref())]);
  assert.equal(ended, "SIGKILL", `the client killed the helper:\n${helper.log()}`);
  assert.equal((await interrupted.result).signal, "SIGINT", "the client ended by its SIGINT, as its parent expects");
  ok(await qemuImg(["check", "disk.qcow2"], dir), "the image is consistent");
  // No helper now: the client runs its commands itself.
  const after = await client(["check", "disk.qcow2"], { cwd: dir, socketPath: helper.socketPath });
  assert.equal(after.code, 0, after.stderr);

  const second = await startHelper(t, dir);
  const orphan = await startedClient(dir, env, longBench, /^Sending /m);
  second.process.kill("SIGKILL");
  const result = await orphan.result;
  assert.equal(result.code, 1);
  assert.match(result.stderr, /^snapstack-img: error E_ABORTED: the snapstack helper ended before the command finished$/m);
});
