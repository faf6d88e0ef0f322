/**
 * `snapstack helper [--socket PATH] [--idle-timeout SECONDS]`: run the
 * resident helper (cli/helper/helper-server.ts) in the foreground until
 * SIGTERM, SIGINT, the idle timeout or a change of the code on disk.
 * `snapstack-img` (native/img-client.c) sends it `img` commands.
 *
 * The default socket is $TMPDIR/snapstack-UID/img-helper.sock (TMPDIR
 * unset: /tmp), in a directory created 0700 and refused unless it is a
 * directory (not a link), this user's and not writable by others
 * (io/user-socket-dir.ts); the client computes the same path and makes the
 * same check. SNAPSTACK_HELPER_SOCKET (or --socket) overrides it on both
 * sides, unchecked: that directory must exist.
 */
import { readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { SnapstackError } from "../../base/errors.ts";
import { SUN_PATH_BYTES_MAX, userSocketDirectory } from "../../io/user-socket-dir.ts";
import { NOT_QEMU, optionString, parseArgs } from "../args.ts";
import { expectPositionals } from "../command-helpers.ts";
import type { CliCommand, CliContext } from "../context.ts";
import { startHelperServer } from "../helper/helper-server.ts";

/** Default idle time before the helper stops (a quarter of an hour: memory back once the scripts are done). */
const IDLE_TIMEOUT_SECONDS_DEFAULT = 900;
/** Longest idle timeout: Node's timers take at most 2^31 - 1 ms (24.8 days). */
const IDLE_TIMEOUT_SECONDS_MAX = Math.floor((2 ** 31 - 1) / 1000);
const PACKAGE_ROOT = fileURLToPath(new URL("../../../", import.meta.url));

/** The helper's socket for this user: SNAPSTACK_HELPER_SOCKET, else the default (see the header); creates the default's directory. */
export function helperSocketPath(env: NodeJS.ProcessEnv): string {
  const chosen = env.SNAPSTACK_HELPER_SOCKET;
  const path = chosen !== undefined && chosen !== "" ? chosen : join(userSocketDirectory(env.TMPDIR || "/tmp"), "img-helper.sock");
  if (Buffer.byteLength(path) > SUN_PATH_BYTES_MAX) {
    throw new SnapstackError("E_USAGE", `helper socket path ${path} is longer than a socket address allows (${SUN_PATH_BYTES_MAX} bytes); set SNAPSTACK_HELPER_SOCKET to a shorter one`, { path });
  }
  return path;
}

/** Newest modification time under `path` (a file, or a folder and everything in it); 0 if it does not exist. */
function newestMtimeMs(path: string): number {
  let newest = 0;
  const pending = [path];
  while (pending.length > 0) {
    const current = pending.pop()!;
    let stat;
    try {
      stat = statSync(current);
    } catch {
      continue;
    }
    newest = Math.max(newest, stat.mtimeMs);
    if (!stat.isDirectory()) continue;
    try {
      for (const name of readdirSync(current)) pending.push(join(current, name));
    } catch {
      // Removed or replaced meanwhile (a checkout, an editor's temporary folder): its parent's time changed too.
    }
  }
  return newest;
}

/**
 * What identifies the code a command would run: the newest modification
 * time of the sources, the two builds bin/snapstack chooses from and
 * package.json (~1.5 ms for src/). bin/snapstack walks src/ the same way
 * to choose between the builds and the sources; it is plain JavaScript that
 * cannot import this module.
 */
export function codeStamp(root: string = PACKAGE_ROOT): string {
  const parts = ["src", join("dist", "cli-bundle", "main.js"), join("dist", "cli", "main.js"), "package.json"].map((part) => newestMtimeMs(join(root, part)));
  return parts.join(":");
}

function parseIdleTimeoutMs(text: string | undefined): number {
  if (text === undefined) return IDLE_TIMEOUT_SECONDS_DEFAULT * 1000;
  if (!/^[0-9]{1,10}$/.test(text)) throw new SnapstackError("E_USAGE", `--idle-timeout ${text}: not a whole number of seconds`);
  if (Number(text) > IDLE_TIMEOUT_SECONDS_MAX) throw new SnapstackError("E_USAGE", `--idle-timeout ${text}: more than ${IDLE_TIMEOUT_SECONDS_MAX} seconds (0: never)`);
  return Number(text) * 1000;
}

/** Signals that stop the helper once the running command completes (SIGHUP: the terminal that started it closed). */
const STOP_SIGNALS: readonly NodeJS.Signals[] = ["SIGTERM", "SIGINT", "SIGHUP"];

/** The command; `run` is the CLI's own entry (runCli), passed in so that this module does not import main.ts. */
export function helperCommand(run: (argv: string[], context: CliContext) => Promise<number>): CliCommand {
  return {
    name: "helper",
    synopsis: "helper [--socket PATH] [--idle-timeout SECONDS]",
    summary:
      "Run 'img' commands for snapstack-img in this resident process, one at a time, until SIGTERM, SIGINT, SIGHUP or SECONDS without a command " +
      `(default ${IDLE_TIMEOUT_SECONDS_DEFAULT}; 0: never). Saves each command Node's start-up. Socket: --socket, else $SNAPSTACK_HELPER_SOCKET, else $TMPDIR/snapstack-UID/img-helper.sock.`,
    optionHelp: ["  --socket PATH          the Unix socket to listen on", `  --idle-timeout SECONDS stop after this long without a command (default ${IDLE_TIMEOUT_SECONDS_DEFAULT}; 0: never)`],
    async run(argv, context) {
      const parsed = parseArgs(argv, [
        { name: "socket", long: "socket", value: true },
        { name: "idle", long: "idle-timeout", value: true },
      ], NOT_QEMU);
      expectPositionals(parsed.positionals, 0, 0, "");
      const idleTimeoutMs = parseIdleTimeoutMs(optionString(parsed, "idle"));
      const chosen = optionString(parsed, "socket");
      const socketPath = helperSocketPath(chosen === undefined ? context.env : { ...context.env, SNAPSTACK_HELPER_SOCKET: chosen });
      const log = (line: string): void => context.err(`${new Date().toISOString()} ${line}\n`);
      // The handlers go in first: a supervisor may signal as soon as the socket exists (as for serve).
      let signalled: NodeJS.Signals | null = null;
      let stop = (signal: NodeJS.Signals): void => void (signalled ??= signal);
      const onSignal = (signal: NodeJS.Signals): void => stop(signal);
      for (const signal of STOP_SIGNALS) process.on(signal, onSignal);
      try {
        const helper = await startHelperServer({ socketPath, idleTimeoutMs, run, codeStamp: () => codeStamp(), log });
        stop = (signal) => void helper.stop(signal);
        if (signalled !== null) stop(signalled);
        else context.out(`snapstack helper: listening on ${socketPath}\n`);
        await helper.stopped;
      } finally {
        for (const signal of STOP_SIGNALS) process.off(signal, onSignal);
      }
      return 0;
    },
  };
}
