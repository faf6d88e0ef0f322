/**
 * Listening on a Unix socket path, for the three servers that do: the NBD
 * server, the resident helper and the API daemon.
 *
 * Design notes
 * - A socket file that nothing listens on any more (what a killed server
 *   leaves) is removed and the listen tried once more, as qemu-nbd does. One
 *   a live server listens on is refused, and so is any other kind of file: a
 *   path named by mistake must not lose the file it names.
 * - Whether someone listens comes first from the kernel's table
 *   (/proc/net/unix: the flag __SO_ACCEPTCON and the path as it was bound).
 *   The table holds the path as the other process gave it, relative to its
 *   own working directory: a relative one with our file's name may be ours
 *   ("maybe"). Without /proc the answer is "maybe".
 * - Callers whose servers do not mind a stray connection (the helper, the
 *   API daemon) then probe by connecting, which settles a "maybe" and also
 *   reaches a server in another network namespace the table does not list:
 *   only a refused connection (ECONNREFUSED) means dead. The NBD server does
 *   not probe: a probe would count as a client, and an NBD server without -t
 *   exits when its last client leaves; for it a "maybe" keeps the file.
 * - ownerOnly binds under umask 0177 and then chmods 0600, so that no other
 *   user can connect even for the moment between bind and chmod.
 */
import { chmodSync, lstatSync, readFileSync, rmSync } from "node:fs";
import { createConnection, type Server } from "node:net";
import { basename, isAbsolute, resolve } from "node:path";
import type { SnapstackError } from "../base/errors.ts";

/** /proc/net/unix's flag of a listening socket. */
const SO_ACCEPTCON = 0x10000;

/** Why a listen failed: a live server holds the path, the path is not a socket, or another error. */
export type UnixListenFailure = "in-use" | "not-socket" | "other";

export interface UnixListenOptions {
  /** Only this user may connect (the socket is made 0600). */
  ownerOnly: boolean;
  /** Also try to connect before calling a socket file dead (see the design notes). */
  probeByConnecting?: boolean;
  /** The error to throw for a failure; `error` is the listen's own. */
  refusal: (failure: UnixListenFailure, error: NodeJS.ErrnoException) => SnapstackError;
}

/** Listen on `path` with `server`, replacing a dead server's socket file (see the design notes). */
export async function listenUnixSocket(server: Server, path: string, options: UnixListenOptions): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    const error = await listenOnce(server, path, options.ownerOnly);
    if (error === null) break;
    if (error.code !== "EADDRINUSE" || attempt > 0) throw options.refusal("other", error);
    const kind = fileKind(path);
    if (kind === "other") throw options.refusal("not-socket", error);
    if (kind === "socket") {
      if (await isLive(path, options.probeByConnecting === true)) throw options.refusal("in-use", error);
      rmSync(path, { force: true });
    }
    // kind "missing": removed meanwhile, so try again.
  }
  if (options.ownerOnly) chmodSync(path, 0o600);
}

async function listenOnce(server: Server, path: string, ownerOnly: boolean): Promise<NodeJS.ErrnoException | null> {
  const previousUmask = ownerOnly ? process.umask(0o177) : null;
  try {
    return await new Promise((done) => {
      const onError = (error: NodeJS.ErrnoException): void => done(error);
      server.once("error", onError);
      server.listen(path, () => {
        server.off("error", onError);
        done(null);
      });
    });
  } finally {
    if (previousUmask !== null) process.umask(previousUmask);
  }
}

function fileKind(path: string): "socket" | "missing" | "other" {
  try {
    return lstatSync(path).isSocket() ? "socket" : "other";
  } catch {
    return "missing";
  }
}

/** Whether a server still listens on the socket file at `path` (see the design notes). */
async function isLive(path: string, probe: boolean): Promise<boolean> {
  const listed = someoneListens(path);
  if (listed === "yes") return true;
  if (!probe) return listed === "maybe";
  return (await connectOutcome(path)) !== "refused";
}

/**
 * Whether the kernel's table shows a listener on the Unix socket at `path`:
 * "yes" for the path itself, "maybe" for a relative path with its name (or
 * no table), "no" otherwise (see the design notes).
 */
export function someoneListens(path: string): "yes" | "maybe" | "no" {
  let table: string;
  try {
    table = readFileSync("/proc/net/unix", "utf8");
  } catch {
    return "maybe";
  }
  const wanted = resolve(path);
  const name = basename(wanted);
  let answer: "maybe" | "no" = "no";
  for (const line of table.split("\n").slice(1)) {
    const fields = line.trim().split(/\s+/);
    if (fields.length < 8 || (parseInt(fields[3], 16) & SO_ACCEPTCON) === 0) continue;
    const bound = fields.slice(7).join(" ");
    if (bound === path || resolve(bound) === wanted) return "yes";
    // A relative path was bound relative to that process's directory, which we do not know.
    if (!isAbsolute(bound) && basename(bound) === name) answer = "maybe";
  }
  return answer;
}

/** Connect to the socket at `path` and close at once: accepted, refused (nothing listens), or another error (a full backlog: alive). */
function connectOutcome(path: string): Promise<"accepted" | "refused" | "other"> {
  return new Promise((done) => {
    const probe = createConnection(path);
    probe.once("connect", () => {
      probe.destroy();
      done("accepted");
    });
    probe.once("error", (error: NodeJS.ErrnoException) => done(error.code === "ECONNREFUSED" || error.code === "ENOENT" ? "refused" : "other"));
  });
}
