/**
 * Build, with the C compiler ($CC, else cc), native/build/snapstack-img from
 * native/img-client.c (the resident helper's client: plain C) and
 * native/build/file-ops.node from native/file-ops.c (with the headers of the
 * Node that runs this script). Runs from npm's `install` (so `npm ci` in a
 * checkout and `npm install snapstack` both build them) and from `npm run
 * build`.
 *
 * The addon is optional: without it snapstack writes zeroes where it would
 * punch holes and reports files as all data (src/io/native-file-ops.ts). So a
 * machine without a compiler or Node's headers gets a one-line warning and
 * exit status 0, except under CI=true or with --required, where it fails:
 * CI tests the real thing.
 *
 * Plain JavaScript, not TypeScript: Node does not strip types in files under
 * node_modules, where this runs for an installed package.
 */
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, renameSync, rmSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

const NATIVE_DIR = dirname(fileURLToPath(import.meta.url));
const SOURCE = join(NATIVE_DIR, "file-ops.c");
const OUTPUT = join(NATIVE_DIR, "build", "file-ops.node");
const required = process.argv.includes("--required") || process.env.CI === "true";

/** Where node_api.h is: beside this Node's binary (the official tarballs, the npm `node` package), else the system's. */
function nodeIncludeDir() {
  const candidates = [join(dirname(process.execPath), "..", "include", "node"), "/usr/include/node", "/usr/local/include/node"];
  return candidates.find((dir) => existsSync(join(dir, "node_api.h")));
}

function fail(message) {
  process.stderr.write(`native: ${message}; snapstack will write zeroes instead of punching holes and will not see file holes\n`);
  process.exit(required ? 1 : (process.exitCode ?? 0));
}

const compiler = process.env.CC || "cc";
mkdirSync(join(NATIVE_DIR, "build"), { recursive: true });

/** Run the compiler with argsFor(temporary file), then move that file to `output`; returns an error message, or null. */
function compile(output, argsFor) {
  const partial = `${output}.${process.pid}.tmp`;
  const result = spawnSync(compiler, argsFor(partial), { stdio: ["ignore", "inherit", "inherit"] });
  if (result.error !== undefined || result.status !== 0) {
    rmSync(partial, { force: true });
    return result.error !== undefined ? `cannot run ${compiler}: ${result.error.message}` : `${compiler} failed (exit status ${result.status})`;
  }
  renameSync(partial, output);
  return null;
}

// snapstack-img (native/img-client.c): the native client of the resident helper (docs/cli/helper.md).
// Plain C, no Node headers. It runs bin/snapstack itself when no helper listens, so it is built
// with that file's absolute path. Without it, `snapstack img` is the way (no resident helper).
const CLIENT_SOURCE = join(NATIVE_DIR, "img-client.c");
const CLIENT_OUTPUT = join(NATIVE_DIR, "build", "snapstack-img");
const snapstackBin = resolve(NATIVE_DIR, "..", "bin", "snapstack");
const clientError = compile(CLIENT_OUTPUT, (partial) => ["-O2", "-Wall", "-Wextra", "-Werror", `-DSNAPSTACK_BIN=${JSON.stringify(snapstackBin)}`, "-o", partial, CLIENT_SOURCE]);
if (clientError !== null) {
  process.stderr.write(`native: snapstack-img not built (${clientError}); use 'snapstack img' (no resident helper)\n`);
  if (required) process.exitCode = 1;
}

const includeDir = nodeIncludeDir();
if (includeDir === undefined) fail(`no node_api.h for Node ${process.version} (looked beside ${process.execPath} and in /usr/include/node)`);
const addonError = compile(OUTPUT, (partial) => ["-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-fvisibility=hidden", `-I${includeDir}`, "-o", partial, SOURCE]);
if (addonError !== null) fail(addonError);
