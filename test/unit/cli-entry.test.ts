/**
 * bin/snapstack runs a build only while it is newer than every file and
 * folder under src/, preferring the bundle (dist/cli-bundle/, built by
 * scripts/build-cli.ts) over the tsc build (dist/cli/), and the TypeScript
 * sources otherwise (never a stale build).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, mkdirSync, rmSync, utimesSync, writeFileSync } from "node:fs";
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
