/**
 * bin/snapstack runs a build only while it is newer than every file and
 * folder under src/, preferring the bundle (dist/cli-bundle/, built by
 * scripts/build-cli.ts) over the tsc build (dist/cli/), and the TypeScript
 * sources otherwise (never a stale build).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, symlinkSync, utimesSync, writeFileSync } from "node:fs";
import { setTimeout as delay } from "node:timers/promises";
import { join } from "node:path";
import { run, scratchDir } from "../helpers/tools.ts";

const repoRoot = join(import.meta.dirname, "..", "..");

function fakeCheckout(dir: string): string {
  mkdirSync(join(dir, "bin"));
  mkdirSync(join(dir, "src", "cli"), { recursive: true });
  mkdirSync(join(dir, "dist", "cli"), { recursive: true });
  mkdirSync(join(dir, "dist", "cli-bundle"), { recursive: true });
  copyFileSync(join(repoRoot, "bin", "snapstack"), join(dir, "bin", "snapstack"));
  writeFileSync(join(dir, "package.json"), JSON.stringify({ type: "module" }));
  const entry = (which: string) => `export async function runCli() { process.stdout.write("${which}\\n"); return 0; }\n`;
  writeFileSync(join(dir, "src", "cli", "main.ts"), entry("sources"));
  writeFileSync(join(dir, "dist", "cli", "main.js"), entry("build"));
  writeFileSync(join(dir, "dist", "cli-bundle", "main.js"), entry("bundle"));
  return join(dir, "bin", "snapstack");
}

/** Set the modification time of paths under `dir`. */
function touch(dir: string, when: Date, ...relativePaths: string[]): void {
  for (const relativePath of relativePaths) utimesSync(join(dir, relativePath), when, when);
}

const SOURCE_PATHS = ["src", "src/cli", "src/cli/main.ts"];

test("bin/snapstack prefers a fresh bundle, then a fresh tsc build, and falls back to the sources when one is newer", async (t) => {
  const dir = scratchDir(t);
  const bin = fakeCheckout(dir);
  const old = new Date(Date.now() - 60_000);
  const now = new Date();
  touch(dir, old, ...SOURCE_PATHS);
  assert.equal((await run(process.execPath, [bin])).stdout, "bundle\n");

  // A bundle older than the sources is skipped for a fresh tsc build.
  touch(dir, new Date(Date.now() - 120_000), "dist/cli-bundle/main.js");
  assert.equal((await run(process.execPath, [bin])).stdout, "build\n");

  const newer = new Date(Date.now() + 60_000);
  touch(dir, newer, "src/cli/main.ts");
  assert.equal((await run(process.execPath, [bin])).stdout, "sources\n");

  touch(dir, old, "src/cli/main.ts");
  touch(dir, now, "dist/cli-bundle/main.js");
  const forced = await run(process.execPath, [bin], { env: { ...process.env, SNAPSTACK_RUN_SOURCES: "1" } });
  assert.equal(forced.stdout, "sources\n");
});

test("bin/snapstack: a source file deleted after the build makes the build stale (its folder changed)", async (t) => {
  const dir = scratchDir(t);
  const bin = fakeCheckout(dir);
  writeFileSync(join(dir, "src", "cli", "gone.ts"), "export {};\n");
  touch(dir, new Date(Date.now() - 60_000), ...SOURCE_PATHS, "src/cli/gone.ts");
  assert.equal((await run(process.execPath, [bin])).stdout, "bundle\n");
  rmSync(join(dir, "src", "cli", "gone.ts"));
  touch(dir, new Date(Date.now() + 60_000), "src/cli");
  assert.equal((await run(process.execPath, [bin])).stdout, "sources\n");
});

/** A Node older than bin/snapstack accepts (Debian's own node 20), if the machine has one. */
function oldNode(): string | null {
  for (const candidate of ["/usr/bin/node", "/usr/local/bin/node"]) {
    const result = spawnSync(candidate, ["--version"], { encoding: "utf8" });
    const match = /^v(\d+)\.(\d+)\./.exec(result.stdout ?? "");
    if (match && (Number(match[1]) < 22 || (Number(match[1]) === 22 && Number(match[2]) < 15))) return candidate;
  }
  return null;
}

test("bin/snapstack under a too-old Node runs again under the newer one, and a SIGTERM to it reaches that child", async (t) => {
  const old = oldNode();
  if (old === null) {
    t.skip("no Node older than 22.15 here (Debian's nodejs package): the re-exec path is not exercised");
    return;
  }
  const dir = scratchDir(t, "ss-entry-");
  const bin = fakeCheckout(dir);
  // The bundle's runCli records its pid and Node version, then never returns.
  writeFileSync(join(dir, "dist", "cli-bundle", "main.js"), `import { writeFileSync } from "node:fs";\nexport function runCli() { writeFileSync(process.env.PID_FILE, process.pid + " " + process.version); return new Promise(() => setInterval(() => {}, 1000)); }\n`);
  const home = join(dir, "home");
  const newNodeDir = join(home, ".cache", "snapstack", "node24", "node_modules", ".bin");
  mkdirSync(newNodeDir, { recursive: true });
  symlinkSync(process.execPath, join(newNodeDir, "node"));
  const pidFile = join(dir, "child.pid");
  const parent = spawn(old, [bin], { env: { ...process.env, HOME: home, PID_FILE: pidFile, SNAPSTACK_NODE_REEXEC: "" }, stdio: "ignore" });
  const parentExit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => parent.on("exit", (code, signal) => resolve({ code, signal })));
  let recorded = "";
  for (let tries = 0; tries < 200 && !recorded; tries++) {
    await delay(50);
    if (existsSync(pidFile)) recorded = readFileSync(pidFile, "utf8");
  }
  const [childPid, childVersion] = recorded.split(" ");
  assert.equal(childVersion, process.version, "the child runs the newer Node");
  assert.notEqual(Number(childPid), parent.pid);
  parent.kill("SIGTERM");
  assert.deepEqual(await parentExit, { code: null, signal: "SIGTERM" }, "the parent ends as its child did");
  let alive = true;
  for (let tries = 0; tries < 100 && alive; tries++) {
    try {
      process.kill(Number(childPid), 0);
      await delay(50);
    } catch {
      alive = false;
    }
  }
  if (alive) process.kill(Number(childPid), "SIGKILL");
  assert.equal(alive, false, "the child got the SIGTERM and ended");
});

test("bin/snapstack sizes libuv's thread pool for img and io commands before running them, and leaves servers and a set UV_THREADPOOL_SIZE alone", async (t) => {
  const dir = scratchDir(t);
  const bin = fakeCheckout(dir);
  // A bundle that sizes the pool as the real one does (exported beside runCli) and prints what the command sees.
  const mainSource = readFileSync(join(repoRoot, "src", "cli", "main.ts"), "utf8");
  assert.match(mainSource, /export function sizeThreadPoolFor\(/);
  writeFileSync(
    join(dir, "dist", "cli-bundle", "main.js"),
    'export function sizeThreadPoolFor(argv) { if (process.env.UV_THREADPOOL_SIZE === undefined && argv[0] === "img") process.env.UV_THREADPOOL_SIZE = "sized"; }\n' +
      'export async function runCli(argv) { process.stdout.write(`${argv[0]}:${process.env.UV_THREADPOOL_SIZE ?? "unset"}\\n`); return 0; }\n',
  );
  touch(dir, new Date(Date.now() - 60_000), ...SOURCE_PATHS);
  const env = { ...process.env };
  delete env.UV_THREADPOOL_SIZE;
  assert.equal((await run(process.execPath, [bin, "img", "info"], { env })).stdout, "img:sized\n");
  assert.equal((await run(process.execPath, [bin, "nbd"], { env })).stdout, "nbd:unset\n");
  assert.equal((await run(process.execPath, [bin, "img", "info"], { env: { ...env, UV_THREADPOOL_SIZE: "7" } })).stdout, "img:7\n");
});

test("sizeThreadPoolFor: as many pool threads as cores (2 to 4) for img and io, and libuv starts that many when set after the CLI is loaded", async () => {
  const { sizeThreadPoolFor } = await import("../../src/cli/main.ts");
  const { availableParallelism } = await import("node:os");
  const expected = String(Math.min(4, Math.max(2, availableParallelism())));
  for (const command of ["img", "io"]) {
    const env: NodeJS.ProcessEnv = {};
    sizeThreadPoolFor([command, "convert"], env);
    assert.equal(env.UV_THREADPOOL_SIZE, expected, command);
  }
  for (const command of ["nbd", "serve", "vm", "--help"]) {
    const env: NodeJS.ProcessEnv = {};
    sizeThreadPoolFor([command], env);
    assert.equal(env.UV_THREADPOOL_SIZE, undefined, command);
  }
  const preset: NodeJS.ProcessEnv = { UV_THREADPOOL_SIZE: "16" };
  sizeThreadPoolFor(["img", "convert"], preset);
  assert.equal(preset.UV_THREADPOOL_SIZE, "16");

  // The mechanism: a process that loaded the CLI and then sized the pool runs that many pool threads.
  const script = [
    `const cli = await import(${JSON.stringify(new URL("../../src/cli/main.ts", import.meta.url).href)});`,
    'delete process.env.UV_THREADPOOL_SIZE;',
    'cli.sizeThreadPoolFor(["img", "convert"]);',
    'const fs = await import("node:fs");',
    "await Promise.all([1, 2, 3, 4, 5, 6].map(() => fs.promises.stat('/')));",
    'const names = fs.readdirSync("/proc/self/task").map((task) => fs.readFileSync(`/proc/self/task/${task}/comm`, "utf8").trim());',
    'process.stdout.write(String(names.filter((name) => name === "libuv-worker").length));',
  ].join("\n");
  const result = await run(process.execPath, ["--input-type=module", "-e", script]);
  assert.equal(result.stdout, expected);
});
