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
