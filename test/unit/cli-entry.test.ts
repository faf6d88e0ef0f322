/**
 * bin/snapstack runs the compiled build only while it is newer than every
 * source file, and the TypeScript sources otherwise (never a stale build).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, mkdirSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { run, scratchDir } from "../helpers/tools.ts";

const repoRoot = join(import.meta.dirname, "..", "..");

function fakeCheckout(dir: string): string {
  mkdirSync(join(dir, "bin"));
  mkdirSync(join(dir, "src", "cli"), { recursive: true });
  mkdirSync(join(dir, "dist", "cli"), { recursive: true });
  copyFileSync(join(repoRoot, "bin", "snapstack"), join(dir, "bin", "snapstack"));
  writeFileSync(join(dir, "package.json"), JSON.stringify({ type: "module" }));
  const entry = (which: string) => `export async function runCli() { process.stdout.write("${which}\\n"); return 0; }\n`;
  writeFileSync(join(dir, "src", "cli", "main.ts"), entry("sources"));
  writeFileSync(join(dir, "dist", "cli", "main.js"), entry("build"));
  return join(dir, "bin", "snapstack");
}

test("bin/snapstack prefers a fresh build and falls back to the sources when one is newer", async (t) => {
  const dir = scratchDir(t);
  const bin = fakeCheckout(dir);
  const old = new Date(Date.now() - 60_000);
  utimesSync(join(dir, "src", "cli", "main.ts"), old, old);
  assert.equal((await run(process.execPath, [bin])).stdout, "build\n");

  const newer = new Date(Date.now() + 60_000);
  utimesSync(join(dir, "src", "cli", "main.ts"), newer, newer);
  assert.equal((await run(process.execPath, [bin])).stdout, "sources\n");

  utimesSync(join(dir, "src", "cli", "main.ts"), old, old);
  const forced = await run(process.execPath, [bin], { env: { ...process.env, SNAPSTACK_RUN_SOURCES: "1" } });
  assert.equal(forced.stdout, "sources\n");
});
