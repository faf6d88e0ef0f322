/**
 * A private directory for a user's Unix sockets: BASE/snapstack-UID,
 * created 0700 and refused unless it is a real directory (not a symbolic
 * link), this user's, and not writable by others. Whoever can put a socket
 * there can pose as the server behind it. Used where a socket has no other
 * place: the daemon's when its store path is too long for a socket address
 * (api/daemon-lock.ts), and the resident helper's default
 * (cli/commands/helper.ts); native/img-client.c makes the same check.
 */
import { lstatSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { SnapstackError, fromSystemError } from "../base/errors.ts";

/** Longest Unix socket path (sun_path is 108 bytes with its NUL). */
export const SUN_PATH_BYTES_MAX = 107;

/** BASE/snapstack-UID, created if missing and checked (see the header); returns its path. */
export function userSocketDirectory(base: string): string {
  const uid = process.getuid?.() ?? 0;
  const dir = join(base, `snapstack-${uid}`);
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (error) {
    throw fromSystemError(error, dir, "create the socket directory");
  }
  let stat;
  try {
    stat = lstatSync(dir);
  } catch (error) {
    throw fromSystemError(error, dir, "check the socket directory");
  }
  if (!stat.isDirectory()) throw new SnapstackError("E_ACCESS", `${dir} is not a directory (a symbolic link?): sockets are kept only in a private directory of this user's`, { path: dir });
  if (stat.uid !== uid) throw new SnapstackError("E_ACCESS", `${dir} belongs to uid ${stat.uid}, not to this user (${uid}): a socket there could be anyone's`, { path: dir });
  if ((stat.mode & 0o022) !== 0) {
    const mode = (stat.mode & 0o777).toString(8).padStart(4, "0");
    throw new SnapstackError("E_ACCESS", `${dir} is writable by others (mode ${mode}): anyone could replace a socket in it; run 'chmod go-w ${dir}'`, { path: dir, mode });
  }
  return dir;
}
