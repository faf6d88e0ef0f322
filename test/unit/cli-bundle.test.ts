/**
 * The CLI bundle (scripts/build-cli.ts, what bin/snapstack runs while it is
 * fresh) behaves as the sources do: the same output for help, version (the
 * package.json found through the rewritten import.meta.url), img commands
 * (static imports in the bundle) and an error, built into a scratch folder.
 * It also starts without the Node modules an img command does not use.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";
import { buildCliBundle, staticImgCommands } from "../../scripts/build-cli.ts";
import { runCli } from "../../src/cli/main.ts";
import { captureContext } from "../../src/cli/context.ts";
import { createImage } from "../../src/chain/index.ts";
import { run, scratchDir } from "../helpers/tools.ts";

async function viaSources(argv: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const context = captureContext();
  const code = await runCli(argv, context);
  return { code, stdout: context.stdout, stderr: context.stderr };
}

/** A runner beside the bundle that calls it as bin/snapstack does. */
function writeRunner(entryPath: string): string {
  const runnerPath = join(dirname(entryPath), "runner.js");
  writeFileSync(runnerPath, `const cli = await import(${JSON.stringify(pathToFileURL(entryPath).href)});\nprocess.exitCode = await cli.runCli(process.argv.slice(2));\n`);
  return runnerPath;
}

async function viaBundle(runnerPath: string, argv: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const result = await run(process.execPath, [runnerPath, ...argv]);
  return { code: result.code, stdout: result.stdout, stderr: result.stderr };
}

test("the CLI bundle prints what the sources print (help, version, img info, a usage error)", async (t) => {
  const dir = scratchDir(t);
  const runnerPath = writeRunner(await buildCliBundle(join(dir, "bundle")));
  const image = join(dir, "disk.qcow2");
  await createImage(image, { format: "qcow2", sizeBytes: 64 * 1024 * 1024 });
  const version = (JSON.parse(readFileSync(join(import.meta.dirname, "..", "..", "package.json"), "utf8")) as { version: string }).version;
  for (const argv of [["--help"], ["--version"], ["img", "info", "--output=json", image], ["img", "snapshot", "-l", image], ["img", "nosuch"]]) {
    const expected = await viaSources(argv);
    const actual = await viaBundle(runnerPath, argv);
    assert.deepEqual(actual, expected, argv.join(" "));
  }
  assert.match((await viaBundle(runnerPath, ["--version"])).stdout, new RegExp(`version ${version.replaceAll(".", "\\.")}`));
});

test("the bundle takes Node built-ins from process.getBuiltinModule and loads neither fs/promises nor zlib for img commands", async (t) => {
  const dir = scratchDir(t);
  const entryPath = await buildCliBundle(join(dir, "bundle"));
  const bundleDir = dirname(entryPath);
  for (const file of readdirSync(bundleDir).filter((name) => name.endsWith(".js"))) {
    assert.doesNotMatch(readFileSync(join(bundleDir, file), "utf8"), /^import\b[^;]*["']node:/m, `${file} imports a built-in as an ES module`);
  }
  // A runner that reports which of Node's own modules the command loaded.
  const runnerPath = join(bundleDir, "modules.js");
  writeFileSync(
    runnerPath,
    `const cli = await import(${JSON.stringify(pathToFileURL(entryPath).href)});\n` +
      "process.exitCode = await cli.runCli(process.argv.slice(2));\n" +
      'process.getBuiltinModule("node:fs").writeFileSync(process.env.MODULES_OUT, JSON.stringify(process.moduleLoadList));\n',
  );
  const image = join(dir, "disk.qcow2");
  await createImage(image, { format: "qcow2", sizeBytes: 64 * 1024 * 1024 });
  const modulesPath = join(dir, "modules.json");
  for (const argv of [["img", "snapshot", "-c", "s", image], ["img", "info", image]]) {
    const result = await run(process.execPath, [runnerPath, ...argv], { env: { ...process.env, MODULES_OUT: modulesPath } });
    assert.equal(result.code, 0, result.stderr);
    const loaded = JSON.parse(readFileSync(modulesPath, "utf8")) as string[];
    for (const unwanted of ["NativeModule zlib", "NativeModule internal/fs/promises", "NativeModule internal/readline/interface"]) {
      assert.ok(!loaded.includes(unwanted), `${argv.join(" ")} loaded ${unwanted}`);
    }
  }
});

test("staticImgCommands turns the lazy command imports into static ones", () => {
  const source = 'import type { X } from "./context.ts";\nconst a = { load: async () => (await import("./commands/check.ts")).checkCommand };\nconst b = async () => (await import("./commands/map-x.ts")).mapCommand;\n';
  const out = staticImgCommands(source);
  assert.match(out, /^import \* as imgCommand0 from "\.\/commands\/check\.ts";\nimport \* as imgCommand1 from "\.\/commands\/map-x\.ts";\n/);
  assert.match(out, /load: async \(\) => \(imgCommand0\)\.checkCommand/);
  assert.match(out, /async \(\) => \(imgCommand1\)\.mapCommand/);
  assert.doesNotMatch(out, /await import/);
});
