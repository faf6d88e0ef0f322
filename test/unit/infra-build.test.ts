/**
 * `npm run build` (tsc -p tsconfig.build.json) emits a loadable library:
 * dist/index.js with rewritten .js imports and dist/index.d.ts, exporting the
 * same names as src/index.ts. Built into a scratch directory, never dist/.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { run, scratchDir } from "../helpers/tools.ts";

const repoRoot = join(import.meta.dirname, "..", "..");
const tscPath = join(repoRoot, "node_modules", "typescript", "bin", "tsc");

test("npm run build emits dist/index.js and dist/index.d.ts that export what src/index.ts does", async (t) => {
  if (!existsSync(join(repoRoot, "src", "index.ts"))) {
    t.skip("src/index.ts does not exist yet");
    return;
  }
  const outDir = scratchDir(t, "snapstack-build-");
  const result = await run(process.execPath, [tscPath, "-p", join(repoRoot, "tsconfig.build.json"), "--outDir", outDir]);
  assert.equal(result.code, 0, `tsc -p tsconfig.build.json failed:\n${result.stdout}${result.stderr}`);
  assert.ok(existsSync(join(outDir, "index.js")), "no index.js");
  assert.ok(existsSync(join(outDir, "index.d.ts")), "no index.d.ts");
  const built = await import(pathToFileURL(join(outDir, "index.js")).href);
  const source = await import(pathToFileURL(join(repoRoot, "src", "index.ts")).href);
  assert.deepEqual(Object.keys(built).sort(), Object.keys(source).sort());
});
