/**
 * Build native/build/file-ops.node from native/file-ops.c with the C compiler
 * ($CC, else cc) and the headers of the Node that runs this script. Runs from
 * npm's `install` (so `npm ci` in a checkout and `npm install snapstack` both
 * build it) and from `npm run build`.
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
  process.exit(required ? 1 : 0);
}

const includeDir = nodeIncludeDir();
if (includeDir === undefined) fail(`no node_api.h for Node ${process.version} (looked beside ${process.execPath} and in /usr/include/node)`);
const compiler = process.env.CC || "cc";
mkdirSync(dirname(OUTPUT), { recursive: true });
const partial = `${OUTPUT}.${process.pid}.tmp`;
const args = ["-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-fvisibility=hidden", `-I${includeDir}`, "-o", partial, SOURCE];
const result = spawnSync(compiler, args, { stdio: ["ignore", "inherit", "inherit"] });
if (result.error !== undefined || result.status !== 0) {
  rmSync(partial, { force: true });
  fail(result.error !== undefined ? `cannot run ${compiler}: ${result.error.message}` : `${compiler} failed (exit status ${result.status})`);
}
renameSync(partial, OUTPUT);

// snapstack-img (native/img-client.c): the native front end of the resident helper. It runs
// bin/snapstack itself when no helper listens, so it is built with that file's absolute path.
const CLIENT_SOURCE = join(NATIVE_DIR, "img-client.c");
const CLIENT_OUTPUT = join(NATIVE_DIR, "build", "snapstack-img");
const snapstackBin = resolve(NATIVE_DIR, "..", "bin", "snapstack");
const clientPartial = `${CLIENT_OUTPUT}.${process.pid}.tmp`;
const clientArgs = ["-O2", "-Wall", "-Wextra", "-Werror", `-DSNAPSTACK_BIN=${JSON.stringify(snapstackBin)}`, "-o", clientPartial, CLIENT_SOURCE];
const clientResult = spawnSync(compiler, clientArgs, { stdio: ["ignore", "inherit", "inherit"] });
if (clientResult.error !== undefined || clientResult.status !== 0) {
  rmSync(clientPartial, { force: true });
  process.stderr.write(`native: ${compiler} failed to build snapstack-img; use 'snapstack img' (no resident helper)\n`);
  process.exit(required ? 1 : 0);
}
renameSync(clientPartial, CLIENT_OUTPUT);
