/**
 * Which file a path names on this host. qemu-img learns that an output is
 * also an input from its image locks (`Failed to get "write" lock`);
 * snapstack takes no locks (Node has no fcntl), so the commands that write
 * one image while reading others compare identities before they touch it.
 */
import { statSync } from "node:fs";
import { resolve } from "node:path";

/**
 * Identity of a file on this host, or null if it cannot be stat'ed: its
 * device and inode, written as /proc/locks names a file (major:minor in
 * hex, inode in decimal), so the same key finds QEMU's locks on it
 * (io/qemu-locks.ts).
 */
export function fileKey(path: string): string | null {
  let dev: bigint;
  let ino: bigint;
  try {
    ({ dev, ino } = statSync(path, { bigint: true }));
  } catch {
    return null;
  }
  // glibc's major()/minor() of a dev_t.
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  const hex = (value: bigint): string => value.toString(16).padStart(2, "0");
  return `${hex(major)}:${hex(minor)}:${ino}`;
}

/**
 * Whether two paths name the same file: the same device and inode when
 * both exist, the same absolute path when neither does (a file about to be
 * created), never when only one exists.
 */
export function sameFile(a: string, b: string): boolean {
  const keyA = fileKey(a);
  const keyB = fileKey(b);
  if (keyA === null && keyB === null) return resolve(a) === resolve(b);
  return keyA === keyB;
}
