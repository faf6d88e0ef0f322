/**
 * Starting NBD servers for interop tests: `snapstack nbd` (this checkout's
 * CLI, run by this node) and `qemu-nbd`, each on a Unix socket in a scratch
 * directory or on 127.0.0.1 with an ephemeral port. A server counts as ready
 * once its pid file exists (both write it after they listen); every process
 * is killed when the test ends.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { TestContext } from "node:test";

export const SNAPSTACK_BIN = fileURLToPath(new URL("../../bin/snapstack", import.meta.url));
export const MiB = 1024 * 1024;
const READY_WAIT_MS = 15_000;

export interface RunningServer {
  process: ChildProcess;
  /** nbd+unix:// or nbd:// URI of the (unnamed or named) export. */
  uri: string;
  socketPath?: string;
  port?: number;
  stderr(): string;
}

/** A free TCP port on 127.0.0.1 (bound and released; tests start the server right after). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => resolve(typeof address === "object" && address !== null ? address.port : 0));
    });
  });
}

async function waitReady(child: ChildProcess, pidFile: string, stderr: () => string): Promise<void> {
  const deadline = Date.now() + READY_WAIT_MS;
  while (!existsSync(pidFile) || readFileSync(pidFile, "utf8").trim() === "") {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`server exited (${child.exitCode ?? child.signalCode}): ${stderr()}`);
    if (Date.now() > deadline) throw new Error(`server not ready after ${READY_WAIT_MS} ms: ${stderr()}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

export interface ServeOptions {
  /** Extra arguments before the file name (e.g. -r, -A, -e 0, -x name). */
  args?: string[];
  /** Listen on TCP 127.0.0.1 instead of a Unix socket. */
  tcp?: boolean;
  exportName?: string;
}

/** Start `snapstack nbd` or `qemu-nbd` on `image`; killed in t.after. */
export async function startNbd(t: TestContext, which: "snapstack" | "qemu-nbd", dir: string, image: string, options: ServeOptions = {}): Promise<RunningServer> {
  const tag = `${which}-${Math.random().toString(36).slice(2, 8)}`;
  const pidFile = join(dir, `${tag}.pid`);
  const listen: string[] = [];
  let socketPath: string | undefined;
  let port: number | undefined;
  if (options.tcp) {
    port = await freePort();
    listen.push("-b", "127.0.0.1", "-p", String(port));
  } else {
    socketPath = join(dir, `${tag}.sock`);
    listen.push("-k", socketPath);
  }
  const exportArgs = options.exportName !== undefined ? ["-x", options.exportName] : [];
  const args = [...listen, ...exportArgs, `--pid-file=${pidFile}`, ...(options.args ?? []), image];
  const child =
    which === "snapstack"
      ? spawn(process.execPath, [SNAPSTACK_BIN, "nbd", ...args], { stdio: ["ignore", "ignore", "pipe"] })
      : spawn("qemu-nbd", args, { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr!.setEncoding("utf8");
  child.stderr!.on("data", (chunk: string) => {
    if (stderr.length < 100_000) stderr += chunk;
  });
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child.once("exit", resolve));
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(timer);
    }
  });
  await waitReady(child, pidFile, () => stderr);
  const name = options.exportName ?? "";
  const uri = options.tcp ? `nbd://127.0.0.1:${port}/${name}` : `nbd+unix:///${name}?socket=${socketPath}`;
  return { process: child, uri, socketPath, port, stderr: () => stderr };
}

/** Wait for a child to exit (bounded); resolves to its exit code, or null on timeout. */
export function waitExit(child: ChildProcess, timeoutMs = 10_000): Promise<number | null> {
  if (child.exitCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(null), timeoutMs);
    child.once("exit", (code) => {
      clearTimeout(timer);
      resolve(code ?? 128);
    });
  });
}
