/**
 * The CLI bundle (scripts/build-cli.ts, what bin/snapstack runs while it is
 * fresh) behaves as the sources do: the same output for help, version (the
 * package.json found through the rewritten import.meta.url), a lazily loaded
 * img command and an error, built into a scratch folder.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";
import { buildCliBundle } from "../../scripts/build-cli.ts";
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
