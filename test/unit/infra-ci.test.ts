/**
 * Structural checks on the CI and test plumbing: cheap, but they catch the
 * edits that would silently make CI test less (a dropped lint step, a tool
 * table out of step with the test helpers, a bin entry pointing nowhere).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { TOOL_PACKAGES } from "../helpers/tools.ts";

const repoRoot = join(import.meta.dirname, "..", "..");
const readRepoFile = (path: string): string => readFileSync(join(repoRoot, path), "utf8");

test("package.json: npm test runs scripts/test.sh, bin points at bin/snapstack, engines match ensure-node", () => {
  const pkg = JSON.parse(readRepoFile("package.json"));
  assert.equal(pkg.scripts.test, "bash scripts/test.sh");
  assert.deepEqual(pkg.bin, { snapstack: "bin/snapstack" });
  assert.equal(pkg.engines.node, ">=22.15");
  const ensureNode = readRepoFile("scripts/ensure-node.sh");
  assert.match(ensureNode, /^NODE_MIN_MAJOR=22$/m);
  assert.match(ensureNode, /^NODE_MIN_MINOR=15$/m);
});

test("package.json ships every C source native/build.mjs compiles (npm's install script builds them where the package lands)", () => {
  const pkg = JSON.parse(readRepoFile("package.json")) as { files: string[]; scripts: Record<string, string> };
  assert.equal(pkg.scripts.install, "node native/build.mjs");
  const build = readRepoFile("native/build.mjs");
  const sources = [...build.matchAll(/join\(NATIVE_DIR, "([\w-]+\.c)"\)/g)].map((match) => `native/${match[1]}`);
  assert.deepEqual(sources.sort(), ["native/file-ops.c", "native/img-client.c"]);
  for (const source of sources) assert.ok(pkg.files.includes(source), `${source} is in package.json's files`);
  assert.ok(pkg.files.includes("native/build.mjs"));
});

test("scripts/test.sh runs tools, lint, typecheck and node:test over unit and interop", () => {
  const script = readRepoFile("scripts/test.sh");
  assert.match(script, /step tools bash scripts\/ensure-tools\.sh/);
  assert.match(script, /step lint eslint /);
  assert.match(script, /step typecheck tsc --noEmit -p tsconfig\.json/);
  assert.match(script, /step tests node --test --test-reporter=spec/);
  assert.ok(script.includes('"test/unit/**/*.test.ts" "test/interop/**/*.test.ts"'));
  assert.match(script, /bash scripts\/ensure-node\.sh --no-install/);
});

test(".ci/run installs tools, obtains Node, runs npm ci then npm test, and fails on failure", () => {
  const script = readRepoFile(".ci/run");
  assert.match(script, /^set -euo pipefail$/m);
  // Commands at the start of a line (the header comment names them too).
  const steps = [/^bash scripts\/ensure-tools\.sh$/m, /^node_bin="\$\(bash scripts\/ensure-node\.sh\)"$/m, /^npm ci\b/m, /^npm test\b/m];
  const order = steps.map((step) => {
    const at = script.search(step);
    assert.notEqual(at, -1, `.ci/run does not run ${step}`);
    return at;
  });
  assert.deepEqual(
    order,
    [...order].sort((a, b) => a - b),
    "steps out of order",
  );
  assert.match(script, /exit "\$status"/);
});

test("scripts/ensure-tools.sh knows every tool in TOOL_PACKAGES with the same Debian package", () => {
  const script = readRepoFile("scripts/ensure-tools.sh");
  const table = new Map<string, string>();
  for (const match of script.matchAll(/^ {2}"(\S+) (\S+) [^"]+"$/gm)) table.set(match[1], match[2]);
  assert.ok(table.size > 0, "no tool table found in ensure-tools.sh");
  for (const [tool, pkg] of Object.entries(TOOL_PACKAGES)) {
    assert.equal(table.get(tool), pkg, `tool ${tool}`);
  }
});

test("shell scripts parse (bash -n)", () => {
  for (const path of [".ci/run", "scripts/test.sh", "scripts/ensure-node.sh", "scripts/ensure-tools.sh", "scripts/setup.sh"]) {
    execFileSync("bash", ["-n", join(repoRoot, path)]);
  }
});

test("ensure-node.sh --no-install prints a node that is at least 22.15", () => {
  const nodePath = execFileSync("bash", [join(repoRoot, "scripts/ensure-node.sh"), "--no-install", "--quiet"], {
    encoding: "utf8",
    env: { ...process.env, PATH: `${join(process.execPath, "..")}:${process.env.PATH ?? ""}` },
  }).trim();
  const version = execFileSync(nodePath, ["--version"], { encoding: "utf8" }).trim();
  const [major, minor] = version.slice(1).split(".").map(Number);
  assert.ok(major > 22 || (major === 22 && minor >= 15), `${nodePath} is ${version}`);
});
