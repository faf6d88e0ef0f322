/**
 * Moving a VM state between QEMU's migration stream and a file, with the
 * bytes copied by a `cat` child of ours between a Unix socket and the file.
 *
 * Design notes
 * - Why not QEMU's `exec:cat > file`: QEMU 7.2 closes the pipe, then reaps
 *   the helper and SIGTERMs it if it has not exited yet, so cat can be
 *   killed with the pipe's tail unwritten; and nobody could fsync it.
 * - Why not copy in Node: every 64 KiB read is a trip through the event
 *   loop; on a loaded two-CPU host Node moved 95 MB in 0.3-1.5 s where cat
 *   needs about 0.1 s.
 * - So Node only accepts (or opens) the connection, paused so it never
 *   reads a byte itself, hands the socket and a file descriptor to `cat` as
 *   its stdin/stdout, and drops its own copy of the socket: the stream ends
 *   when QEMU and cat are done with it. We own the file descriptor, so we
 *   fsync it after cat exited 0. Progress is the file's size, polled.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, fstatSync, fsyncSync, openSync } from "node:fs";
import net from "node:net";
import { SnapstackError, fromSystemError } from "../../base/errors.ts";

/** Progress callbacks at most this often (plus one at the end). */
const PROGRESS_INTERVAL_MS = 50;
/** Pause between attempts to reach QEMU's incoming socket. */
const CONNECT_RETRY_MS = 5;
const COPY_BINARY = "cat";

export interface StateReceiver {
  /** Resolves with the file's size once the sender closed, cat exited 0 and the file is fsynced. */
  done: Promise<number>;
  /** Stop: kill the copy (done rejects with E_ABORTED). */
  abort(): void;
}

/** Listen on socketPath; copy the first connection's bytes into `path` (created or truncated, mode 0600). */
export async function receiveStateFile(socketPath: string, path: string, onProgress?: (doneBytes: number) => void): Promise<StateReceiver> {
  const server = net.createServer({ pauseOnConnect: true });
  let child: ChildProcess | null = null;
  let aborted = false;
  let settle!: { resolve: (bytes: number) => void; reject: (error: Error) => void };
  const done = new Promise<number>((resolve, reject) => (settle = { resolve, reject }));
  done.catch(() => {});
  server.on("connection", (socket) => {
    if (child !== null || aborted) {
      socket.destroy();
      return;
    }
    server.close();
    let fd: number;
    try {
      fd = openSync(path, "w", 0o600);
    } catch (error) {
      socket.destroy();
      settle.reject(fromSystemError(error, path, "create the VM state file"));
      return;
    }
    child = spawn(COPY_BINARY, [], { stdio: [socket, fd, "pipe"] });
    socket.destroy(); // cat holds its own copy; ours must not keep the stream open
    const progress = onProgress === undefined ? null : setInterval(() => onProgress(fileSize(fd)), PROGRESS_INTERVAL_MS);
    void waitForCopy(child, `writing the VM state to ${path}`).then(
      () => {
        if (progress !== null) clearInterval(progress);
        try {
          if (aborted) throw new SnapstackError("E_ABORTED", `writing the VM state to ${path} was abandoned`);
          fsyncSync(fd);
          const sizeBytes = fileSize(fd);
          onProgress?.(sizeBytes);
          settle.resolve(sizeBytes);
        } catch (error) {
          settle.reject(fromSystemError(error, path, "fsync the VM state file"));
        } finally {
          closeSync(fd);
        }
      },
      (error: Error) => {
        if (progress !== null) clearInterval(progress);
        closeSync(fd);
        settle.reject(aborted ? new SnapstackError("E_ABORTED", `writing the VM state to ${path} was abandoned`) : error);
      },
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (error) => reject(fromSystemError(error, socketPath, "listen")));
    server.listen(socketPath, () => resolve());
  });
  return {
    done,
    abort: () => {
      if (aborted) return;
      aborted = true;
      server.close();
      if (child === null) settle.reject(new SnapstackError("E_ABORTED", `writing the VM state to ${path} was abandoned`));
      else child.kill("SIGKILL");
    },
  };
}

/** Connect to socketPath (retrying until it listens) and copy the file into it; resolves once all was written. */
export async function sendStateFile(path: string, socketPath: string, deadline: number): Promise<void> {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch (error) {
    throw fromSystemError(error, path, "read the saved VM state");
  }
  try {
    const socket = await connectWithRetry(socketPath, deadline);
    const child = spawn(COPY_BINARY, [], { stdio: [fd, socket, "pipe"] });
    socket.destroy(); // the stream ends (QEMU sees EOF) when cat exits
    await waitForCopy(child, `sending the VM state ${path} to QEMU`);
  } finally {
    closeSync(fd);
  }
}

function connectWithRetry(socketPath: string, deadline: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const attempt = (): void => {
      const socket = net.createConnection({ path: socketPath });
      socket.pause();
      socket.once("connect", () => {
        socket.removeAllListeners("error");
        socket.on("error", () => {});
        resolve(socket);
      });
      socket.once("error", (error: NodeJS.ErrnoException) => {
        socket.destroy();
        if ((error.code === "ENOENT" || error.code === "ECONNREFUSED") && Date.now() < deadline) setTimeout(attempt, CONNECT_RETRY_MS);
        else reject(new SnapstackError("E_QEMU", `cannot connect to QEMU's migration socket ${socketPath}: ${error.code ?? error.message}`, { socketPath }));
      });
    };
    attempt();
  });
}

function waitForCopy(child: ChildProcess, what: string): Promise<void> {
  let stderr = "";
  child.stderr?.setEncoding("utf8");
  child.stderr?.on("data", (chunk: string) => {
    if (stderr.length < 4096) stderr += chunk;
  });
  return new Promise((resolve, reject) => {
    child.once("error", (error) => reject(new SnapstackError("E_IO", `${what}: cannot run ${COPY_BINARY}: ${error.message}`)));
    child.once("close", (code, signal) => {
      if (code === 0) resolve();
      else reject(new SnapstackError("E_IO", `${what} failed (${COPY_BINARY} ${signal ?? `exit ${code}`})${stderr.trim() ? `: ${stderr.trim()}` : ""}`));
    });
  });
}

function fileSize(fd: number): number {
  return fstatSync(fd).size;
}
