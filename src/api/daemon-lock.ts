/**
 * The store's daemon lock: $SNAPSTACK_HOME/daemon.lock, created with
 * O_EXCL, holds "PID START_TIME" of its daemon (start time from
 * /proc/PID/stat, so a reused pid is not taken for the holder). A lock
 * whose holder is gone (SIGKILL, a zombie) is broken, but only if it still
 * holds what was read.
 *
 * Also the store's permission check: daemon and clients both refuse a
 * store another user could write to (they could put their own socket
 * there), and where the API socket is: $SNAPSTACK_HOME/daemon.sock, or,
 * when that path does not fit a socket address (sun_path, 107 bytes), a
 * socket named after a hash of the store in /tmp/snapstack-UID
 * (io/user-socket-dir.ts: created 0700, and refused unless it is this
 * user's and private). Kept apart
 * from daemon.ts so that `snapstack vm` can use them without loading the
 * machine manager.
 */
import { createHash } from "node:crypto";
import { closeSync, fsyncSync, openSync, readFileSync, rmSync, statSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SnapstackError, fromSystemError } from "../base/errors.ts";
import { processIdentity } from "../io/processes.ts";
import { SUN_PATH_BYTES_MAX, userSocketDirectory } from "../io/user-socket-dir.ts";

function readTextOrNull(path: string): string | null {
  try {
    return readFileSync(path, "utf8").trim();
  } catch {
    return null;
  }
}

/** The pid of the live daemon holding the store's lock, or null. */
export function daemonLockHolder(home: string): number | null {
  const held = readTextOrNull(join(home, "daemon.lock"));
  if (held === null) return null;
  const pid = Number(held.split(" ")[0]);
  return held !== "" && Number.isSafeInteger(pid) && pid > 0 && processIdentity(pid) === held ? pid : null;
}

/** Take the store's daemon lock (see the design notes); returns its release. */
export async function acquireDaemonLock(home: string): Promise<() => void> {
  const path = join(home, "daemon.lock");
  const mine = processIdentity(process.pid) ?? `${process.pid}`;
  for (let attempt = 0; attempt < 5; attempt++) {
    let fd: number;
    try {
      fd = openSync(path, "wx", 0o600);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw fromSystemError(error, path, "create the daemon lock");
      const held = readTextOrNull(path);
      if (held === null) continue; // released meanwhile
      const holderPid = daemonLockHolder(home);
      if (holderPid !== null) throw new SnapstackError("E_IN_USE", `a snapstack daemon (pid ${holderPid}) already serves ${home}`, { home, pid: holderPid });
      // The holder is gone (or the lock is garbled): break it unless someone replaced it meanwhile.
      // An empty lock may be one being written right now: give its writer a moment.
      if (held === "" && attempt === 0) {
        await new Promise((wake) => setTimeout(wake, 100));
        continue;
      }
      // (Between this read and the unlink another daemon could take the lock; the window is one system call.)
      if (readTextOrNull(path) === held) rmSync(path, { force: true });
      continue;
    }
    try {
      writeSync(fd, `${mine}\n`);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    return () => {
      if (readTextOrNull(path) === mine) rmSync(path, { force: true });
    };
  }
  throw new SnapstackError("E_IN_USE", `cannot take the daemon lock ${path}: other daemons keep starting`, { home });
}

/** The store must belong to this user and be writable by no one else (see the design notes). */
export function checkStorePermissions(home: string): void {
  let stat;
  try {
    stat = statSync(home);
  } catch (error) {
    throw fromSystemError(error, home, "check the store");
  }
  const uid = process.getuid?.();
  if (uid !== undefined && stat.uid !== uid) {
    throw new SnapstackError("E_ACCESS", `${home} belongs to uid ${stat.uid}, not to this user (${uid}): the daemon serves only a store of its own`, { path: home });
  }
  if ((stat.mode & 0o022) !== 0) {
    const mode = (stat.mode & 0o777).toString(8).padStart(4, "0");
    throw new SnapstackError("E_ACCESS", `${home} is writable by others (mode ${mode}): anyone could replace its daemon socket; run 'chmod go-w ${home}'`, { path: home, mode });
  }
}

/** The API socket of the store at `home` (see the header); creates the short directory when needed. */
export function daemonSocketPath(home: string): string {
  const own = join(home, "daemon.sock");
  if (Buffer.byteLength(own) <= SUN_PATH_BYTES_MAX) return own;
  const dir = userSocketDirectory(tmpdir());
  return join(dir, `${createHash("sha256").update(home).digest("hex").slice(0, 16)}.sock`);
}
