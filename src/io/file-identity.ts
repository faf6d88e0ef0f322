/**
 * Which file a path names on this host. qemu-img learns that an output is
 * also an input from its image locks (`Failed to get "write" lock`);
 * snapstack takes no locks (Node has no fcntl), so the commands that write
 * one image while reading others compare identities before they touch it.
 */
import { statSync } from "node:fs";
import { resolve } from "node:path";

/** Identity of a file on this host ("dev:ino"), or null if it cannot be stat'ed. */
export function fileKey(path: string): string | null {
  try {
    const stat = statSync(path);
    return `${stat.dev}:${stat.ino}`;
  } catch {
    return null;
  }
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
