/**
 * Which images use a given file as their backing file.
 *
 * A qcow2 header names its backing file but nothing points the other way,
 * so the only way to know is to look: every regular file in the given
 * directories is probed (4 bytes), and each qcow2 image's backing name is
 * resolved as QEMU resolves it (relative to that image) and compared by
 * file identity with the image in question. Unreadable files and files
 * that are not qcow2 are skipped; at most BACKING_SCAN_FILES_MAX files are
 * probed per directory.
 */
import { closeSync, openSync, readdirSync, readSync } from "node:fs";
import { join, resolve } from "node:path";
import { openNodeFile } from "../../io/node-file.ts";
import { QCOW2_MAGIC, readQcow2Header } from "../../formats/qcow2/index.ts";
import { resolveBackingPath } from "../backing-path.ts";
import { fileKey } from "../../io/file-identity.ts";

/** Files probed per directory (bounds the work of one scan). */
export const BACKING_SCAN_FILES_MAX = 100_000;

function startsWithQcow2Magic(path: string): boolean {
  let fd: number | null = null;
  try {
    fd = openSync(path, "r");
    const magic = Buffer.alloc(4);
    return readSync(fd, magic, 0, 4, 0) === 4 && magic.readUInt32BE(0) === QCOW2_MAGIC;
  } catch {
    return false;
  } finally {
    if (fd !== null) closeSync(fd);
  }
}

/** The backing name stored in a qcow2 file, or null (none, or unreadable). */
async function storedBackingName(path: string): Promise<string | null> {
  let file;
  try {
    file = await openNodeFile(path, { readOnly: true });
  } catch {
    return null;
  }
  try {
    return (await readQcow2Header(file)).backingFileName;
  } catch {
    return null;
  } finally {
    await file.close();
  }
}

/** Images in `directories` whose backing file is `path` (paths as found, sorted). */
export async function findBackingUsers(path: string, directories: readonly string[]): Promise<string[]> {
  const target = fileKey(path);
  if (target === null) return [];
  const users = new Set<string>();
  const seenDirectories = new Set<string>();
  for (const directory of directories) {
    const absolute = resolve(directory);
    if (seenDirectories.has(absolute)) continue;
    seenDirectories.add(absolute);
    let entries;
    try {
      entries = readdirSync(directory, { withFileTypes: true });
    } catch {
      continue;
    }
    let probed = 0;
    for (const entry of entries) {
      if (!entry.isFile() || probed >= BACKING_SCAN_FILES_MAX) continue;
      probed++;
      const candidate = join(directory, entry.name);
      if (fileKey(candidate) === target || !startsWithQcow2Magic(candidate)) continue;
      const name = await storedBackingName(candidate);
      if (name === null || name === "") continue;
      let resolved: string;
      try {
        resolved = resolveBackingPath(candidate, name);
      } catch {
        continue;
      }
      if (fileKey(resolved) === target) users.add(candidate);
    }
  }
  return [...users].sort();
}
