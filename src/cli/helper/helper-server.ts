/**
 * The resident helper: runs `snapstack img` commands that `snapstack-img`
 * (native/img-client.c) sends over a Unix socket, one at a time, in this
 * already started and warmed-up process.
 *
 * Design notes
 * - Why: a Node process takes ~50 ms to start and ~15 ms to go away on the
 *   development VM, and loading the CLI ~25 ms more; qemu-img starts in
 *   ~9. Commands that take qemu-img 100-150 ms (internal snapshots) were
 *   dominated by that. The client is C and starts in about a millisecond;
 *   here the modules are loaded and V8 has compiled the hot loops before.
 * - A command runs here as it would in its own process: in the client's
 *   working directory (process.chdir) with its umask, its environment (the
 *   CliContext's env) and its time zone (TZ, which Node reads again when
 *   process.env.TZ is set: snapshot dates print in local time), its output
 *   framed back (helper-protocol.ts) and its exit status last. chdir,
 *   umask and TZ are process-wide, so commands run strictly one after
 *   another (a queue); a second client waits. What stays the helper's:
 *   its user, groups, limits and cgroup, libuv's thread pool size and
 *   SNAPSTACK_NATIVE (read once, at load).
 * - Paths that name the process itself (/dev/stdin, /dev/fd/N,
 *   /proc/self/...) would name the helper's: a command with such an
 *   argument is REFUSED, and the client runs it itself.
 * - What a separate process gives for free is kept:
 *   - Interruption: a signal that would end the command's own process ends
 *     this one. Once STARTED has reached it, the client, on SIGINT, SIGTERM,
 *     SIGHUP or SIGQUIT, sends this process (its pid from SO_PEERCRED)
 *     SIGKILL before it dies of the signal itself: images are left as a killed process leaves them,
 *     which the engine keeps consistent (docs/crash-safety.md). (Only a
 *     signal works while a command keeps the event loop busy with promises
 *     that need no I/O, as `img bench` over unallocated clusters does.) A
 *     client that goes away otherwise (SIGKILL) is noticed when its
 *     connection closes (onClientLost, default process.exit). Clients still
 *     queued see their connections close before STARTED and run their
 *     commands themselves.
 *   - Released resources: a process's exit closes its files and so drops
 *     QEMU's image locks. A command that left more files open than before
 *     it ran (a leak) stops the helper after it replied, so nothing stays
 *     locked (openFileCount, /proc/self/fd).
 *   - Current code: a helper started before the code on disk changed (an
 *     upgrade, a rebuild, an edit of src/) would run the old code. Before
 *     each command the code stamp is compared with the one at start; on a
 *     change the command is REFUSED (the client runs it itself, with the new
 *     code) and the helper stops.
 * - REFUSED is sent only before anything ran, so a client never runs a
 *   command twice. Requests that are not `img` commands are refused.
 * - Idle: after idleTimeoutMs without a command the helper stops.
 * - Access: the socket is created 0600; the default one sits in a private
 *   directory (io/user-socket-dir.ts, commands/helper.ts). Only a socket is
 *   ever removed from the socket path: a regular file there is an error.
 */
import { lstatSync, readdirSync, readlinkSync, rmSync } from "node:fs";
import { resolve } from "node:path";
import { createServer, type Socket } from "node:net";
import { SnapstackError } from "../../base/errors.ts";
import { listenUnixSocket } from "../../io/unix-listen.ts";
import type { CliContext } from "../context.ts";
import { encodeFrames, HelperRequestReader, type HelperRequest } from "./helper-protocol.ts";

export interface HelperServerOptions {
  socketPath: string;
  /** Stop after this long without a command; 0: never. */
  idleTimeoutMs: number;
  /** Runs one command line (runCli). */
  run: (argv: string[], context: CliContext) => Promise<number>;
  /** Changes when the code on disk changes (codeStamp in commands/helper.ts). */
  codeStamp: () => string;
  log: (line: string) => void;
  /** The client of the running command went away (default: remove the socket and end this process at once, as the client's signal would have ended the command's own). */
  onClientLost?: () => void;
  /** Files this process has open, or null where that cannot be counted (default: the entries of /proc/self/fd that are paths, not sockets or pipes). */
  openFileCount?: () => number | null;
}

export interface HelperServer {
  /** Resolves with the reason once the helper stopped listening and every command ended. */
  readonly stopped: Promise<string>;
  /** Stop: no new commands; queued ones are refused, the running one completes. */
  stop(reason: string): Promise<string>;
}

interface Queued {
  socket: Socket;
  request: HelperRequest;
  /** The client closed its connection (it went away). */
  gone: boolean;
}

/**
 * Files (not sockets, pipes or other kernel objects) this process has open:
 * the connections of clients that come and go while a command runs must
 * not count as a leak.
 */
function procOpenFileCount(): number | null {
  let names: string[];
  try {
    names = readdirSync("/proc/self/fd");
  } catch {
    return null;
  }
  let files = 0;
  for (const name of names) {
    try {
      if (readlinkSync(`/proc/self/fd/${name}`).startsWith("/")) files++;
    } catch {
      // closed meanwhile (the readdir's own descriptor among them)
    }
  }
  return files;
}

/** Remove the socket file at `path`, if a socket is there (never another kind of file). */
function removeSocketFile(path: string): void {
  try {
    if (lstatSync(path).isSocket()) rmSync(path, { force: true });
  } catch {
    // gone already
  }
}

/** Arguments that name the process running the command (see the design notes). */
const PROCESS_OWN_PATH = /(^|[=,])\/(dev\/(stdin|stdout|stderr|tty)(?![\w.-])|dev\/fd\/|proc\/(self|thread-self)\/)/;

/** Set process.env.TZ to `zone` (undefined: unset); returns the previous value. */
function setTimeZone(zone: string | undefined): string | undefined {
  const previous = process.env.TZ;
  if (zone === undefined) delete process.env.TZ;
  else process.env.TZ = zone;
  return previous;
}

export async function startHelperServer(options: HelperServerOptions): Promise<HelperServer> {
  const openFileCount = options.openFileCount ?? procOpenFileCount;
  const onClientLost =
    options.onClientLost ??
    (() => {
      removeSocketFile(options.socketPath);
      process.exit(1);
    });
  const startStamp = options.codeStamp();
  const homeDirectory = process.cwd();
  const queue: Queued[] = [];
  let running: Queued | null = null;
  let stopReason: string | null = null;
  let resolveStopped: (reason: string) => void = () => {};
  const stopped = new Promise<string>((resolve) => (resolveStopped = resolve));
  let idleTimer: NodeJS.Timeout | null = null;

  const send = (socket: Socket, kind: Parameters<typeof encodeFrames>[0], payload: string | Uint8Array): void => {
    if (!socket.destroyed) socket.write(encodeFrames(kind, payload));
  };
  const refuse = (socket: Socket, reason: string): void => {
    send(socket, "refused", reason);
    socket.end();
  };

  const armIdleTimer = (): void => {
    if (idleTimer !== null) clearTimeout(idleTimer);
    idleTimer = null;
    if (options.idleTimeoutMs > 0 && stopReason === null) {
      idleTimer = setTimeout(() => void stop(`idle for ${options.idleTimeoutMs / 1000} s`), options.idleTimeoutMs);
      idleTimer.unref();
    }
  };

  const server = createServer((socket) => {
    const reader = new HelperRequestReader();
    let received = false;
    socket.on("error", () => socket.destroy());
    socket.on("data", (chunk: Buffer) => {
      if (received) return; // nothing is expected after the request
      let request: HelperRequest | null;
      try {
        request = reader.feed(chunk);
      } catch (error) {
        received = true;
        refuse(socket, (error as Error).message);
        return;
      }
      if (request === null) return;
      received = true;
      if (request.argv[0] !== "img") {
        refuse(socket, `the helper runs 'img' commands only, not '${request.argv[0] ?? ""}'`);
        return;
      }
      const ownPath = request.argv.find((argument) => PROCESS_OWN_PATH.test(argument) || PROCESS_OWN_PATH.test(resolve(request.cwd, argument)));
      if (ownPath !== undefined) {
        refuse(socket, `'${ownPath}' names the process that runs the command`);
        return;
      }
      if (stopReason !== null) {
        refuse(socket, `the helper is stopping (${stopReason})`);
        return;
      }
      item = { socket, request, gone: false };
      queue.push(item);
      void pump();
    });
    let item: Queued | null = null;
    let away = false;
    const onGone = (): void => {
      if (away) return;
      away = true;
      if (item !== null) item.gone = true;
      if (running !== null && running.socket === socket) {
        options.log(`the client of '${running.request.argv.slice(0, 2).join(" ")}' went away while it ran: the helper stops, as the command's own process would`);
        onClientLost();
      }
    };
    socket.on("end", onGone);
    socket.on("close", onGone);
  });

  /** Files open before the next command (undefined: not counted yet; null: cannot be counted). */
  let filesBefore: number | null | undefined;

  async function runOne(item: Queued): Promise<void> {
    const { socket, request } = item;
    const stamp = options.codeStamp();
    if (stamp !== startStamp) {
      refuse(socket, "the code on disk changed since the helper started");
      void stop("the code on disk changed since it started");
      return;
    }
    try {
      process.chdir(request.cwd);
    } catch (error) {
      refuse(socket, `cannot enter ${request.cwd}: ${(error as Error).message}`);
      return;
    }
    // The count after the last command is the count before this one (nothing opens files between
    // commands; clients' sockets are not counted): one /proc scan per command, not two.
    if (filesBefore === undefined) filesBefore = openFileCount();
    const previousUmask = process.umask(request.umask);
    const previousTimeZone = setTimeZone(request.env.TZ);
    running = item;
    const startedAtMs = performance.now();
    send(socket, "started", String(process.pid));
    let status: number;
    try {
      const context: CliContext = {
        out: (text) => send(socket, "stdout", text),
        err: (text) => send(socket, "stderr", text),
        env: request.env,
      };
      status = await options.run(request.argv, context);
    } catch (error) {
      // runCli reports every failure itself; this is a bug in the helper.
      send(socket, "stderr", `snapstack: error E_INTERNAL: ${(error as Error).message}\n`);
      status = 1;
    } finally {
      running = null;
      process.umask(previousUmask);
      setTimeZone(previousTimeZone);
      try {
        process.chdir(homeDirectory);
      } catch {
        // The helper's own directory is gone: stay where the command ran.
      }
    }
    send(socket, "exit", String(status));
    socket.end();
    options.log(`'${request.argv.slice(0, 2).join(" ")}' in ${request.cwd}: exit status ${status}, ${(performance.now() - startedAtMs).toFixed(0)} ms`);
    const filesAfter = openFileCount();
    if (filesBefore !== null && filesAfter !== null && filesAfter > filesBefore) {
      void stop(`'${request.argv.slice(0, 2).join(" ")}' left ${filesAfter - filesBefore} more files open than before it ran; stopping releases them and their image locks`);
    }
    filesBefore = filesAfter;
  }

  let pumping = false;
  async function pump(): Promise<void> {
    if (pumping) return;
    pumping = true;
    try {
      for (let item = queue.shift(); item !== undefined; item = queue.shift()) {
        // One turn of the event loop first: a command that kept it busy may have kept a queued
        // client's going away (Ctrl-C before its command started) from being seen.
        await new Promise((resolve) => setImmediate(resolve));
        if (item.gone || item.socket.destroyed) continue;
        if (stopReason !== null) {
          refuse(item.socket, `the helper is stopping (${stopReason})`);
          continue;
        }
        if (idleTimer !== null) clearTimeout(idleTimer);
        try {
          await runOne(item);
        } catch (error) {
          // Not the command's failure (runCli reports those): the helper's own. Its state is unknown.
          item.socket.destroy();
          void stop(`internal error: ${(error as Error).message}`);
        }
        armIdleTimer();
      }
    } finally {
      pumping = false;
    }
    if (stopReason !== null) finish();
  }

  let finished = false;
  function finish(): void {
    if (finished || pumping || stopReason === null) return;
    finished = true;
    if (idleTimer !== null) clearTimeout(idleTimer);
    resolveStopped(stopReason);
  }

  function stop(reason: string): Promise<string> {
    if (stopReason === null) {
      stopReason = reason;
      options.log(`stopping: ${reason}`);
      // Stop listening now (libuv removes the socket file as it closes the listener), not once the
      // running command ends: by then another helper may listen on the same path. Connections
      // already open go on; new clients find no socket and run their commands themselves.
      server.close();
      for (const item of queue.splice(0)) refuse(item.socket, `the helper is stopping (${reason})`);
      finish();
    }
    return stopped;
  }

  await listenUnixSocket(server, options.socketPath, {
    ownerOnly: true,
    probeByConnecting: true,
    refusal: (failure, error) => {
      const path = options.socketPath;
      if (failure === "in-use") return new SnapstackError("E_IN_USE", `a helper already listens on ${path}`, { path });
      if (failure === "not-socket") return new SnapstackError("E_EXISTS", `${path} exists and is not a socket; choose another --socket`, { path });
      return new SnapstackError("E_IO", `cannot listen on ${path}: ${error.message}`, { path });
    },
  });
  armIdleTimer();
  return { stopped, stop };
}
