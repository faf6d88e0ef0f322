/**
 * External tools for interop tests. On a developer's machine a missing tool
 * skips the test with a message naming the Debian package; under CI=true it
 * fails the test instead, so a missing install step can never pass silently.
 */
import { execFileSync, execFile } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { nativeFileOpsLoaded } from "../../src/io/native-file-ops.ts";
import { openNodeFile } from "../../src/io/node-file.ts";

/** Tool name -> Debian package that ships it. */
export const TOOL_PACKAGES: Record<string, string> = {
  "qemu-img": "qemu-utils",
  "qemu-io": "qemu-utils",
  "qemu-nbd": "qemu-utils",
  "qemu-system-x86_64": "qemu-system-x86",
  nbdinfo: "libnbd-bin",
  nbdcopy: "libnbd-bin",
  nbdsh: "python3-libnbd",
  nbdkit: "nbdkit",
  fio: "fio",
  cpio: "cpio",
  busybox: "busybox-static",
  cc: "build-essential",
};

const found = new Map<string, boolean>();

export function hasTool(tool: string): boolean {
  let ok = found.get(tool);
  if (ok === undefined) {
    try {
      execFileSync("sh", ["-c", `command -v ${tool}`], { stdio: "ignore" });
      ok = true;
    } catch {
      ok = false;
    }
    found.set(tool, ok);
  }
  return ok;
}

/**
 * Returns true when every tool is present. Otherwise skips the test (or,
 * under CI=true, throws so the test fails) and returns false.
 */
export function requireTools(t: TestContext, ...tools: string[]): boolean {
  const missing = tools.filter((tool) => !hasTool(tool));
  if (missing.length === 0) return true;
  const packages = [...new Set(missing.map((tool) => TOOL_PACKAGES[tool] ?? tool))].join(" ");
  const message = `missing ${missing.join(", ")}: apt-get install ${packages}`;
  if (process.env.CI === "true") throw new Error(`${message} (CI=true: tools must be installed)`);
  t.skip(message);
  return false;
}

/**
 * Returns true when the native file-ops addon (native/file-ops.c) is loaded.
 * Otherwise skips the test (or, under CI=true, throws) with how to build it.
 */
export function requireNativeFileOps(t: TestContext): boolean {
  if (nativeFileOpsLoaded()) return true;
  const message = "native addon not built: node native/build.mjs (needs a C compiler: apt-get install gcc)";
  if (process.env.CI === "true") throw new Error(`${message} (CI=true: the addon must be built)`);
  t.skip(message);
  return false;
}

/**
 * A file's allocated ranges (SEEK_DATA, through the native addon) as
 * [offset, length] pairs: what to compare between two files rather than
 * st_blocks, which also counts the file system's extent-tree blocks (they
 * differ with the order the ranges were written and punched in).
 */
export async function allocatedRanges(path: string): Promise<Array<[number, number]>> {
  const file = await openNodeFile(path, { readOnly: true });
  try {
    return ((await file.holes(0, await file.sizeBytes())) ?? []).filter((run) => !run.hole).map((run) => [run.hostOffset, run.lengthBytes]);
  } finally {
    await file.close();
  }
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run a command without a shell; never throws for a non-zero exit. */
export function run(command: string, args: string[], options: { input?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      command,
      args,
      { encoding: "utf8", maxBuffer: 256 * 1024 * 1024, env: options.env ?? process.env, timeout: options.timeoutMs ?? 120_000 },
      (error, stdout, stderr) => {
        if (error && typeof (error as NodeJS.ErrnoException).code === "string") {
          reject(error);
          return;
        }
        const code = error ? ((error as { code?: number }).code ?? 1) : 0;
        resolve({ code: typeof code === "number" ? code : 1, stdout, stderr });
      },
    );
    if (options.input !== undefined) child.stdin?.end(options.input);
    else child.stdin?.end();
  });
}

/** Run and throw with stderr if the exit code is not the expected one. */
export async function runOk(command: string, args: string[], expectedCode = 0): Promise<RunResult> {
  const result = await run(command, args);
  if (result.code !== expectedCode) {
    throw new Error(`${command} ${args.join(" ")} exited ${result.code} (expected ${expectedCode}): ${result.stderr.trim()}`);
  }
  return result;
}

/** A scratch directory removed when the test ends. */
export function scratchDir(t: TestContext, prefix = "snapstack-test-"): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}
