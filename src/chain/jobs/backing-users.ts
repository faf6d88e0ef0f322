/**
 * Which images use a given file: as their backing file, as their external
 * data file, or (a vmdk descriptor) as an extent file.
 *
 * A qcow2 header names its backing file (and data file), a vmdk descriptor
 * its extent files, but nothing points the other way, so the only way to
 * know is to look: every regular file in the given directories is probed
 * (its first sector), and each qcow2 image's backing and data file names
 * and each vmdk descriptor's extent names are resolved as QEMU resolves
 * them (referencedPaths) and compared by file identity with the file in
 * question. Unreadable files and files of other kinds are skipped; at most
 * BACKING_SCAN_FILES_MAX files are probed per directory.
 */
import { closeSync, openSync, readdirSync, readSync } from "node:fs";
import { join, resolve } from "node:path";
import { openNodeFile } from "../../io/node-file.ts";
import { readQcow2Header } from "../../formats/qcow2/index.ts";
import { resolveBackingPath } from "../backing-path.ts";
import { isVmdkDescriptor, probedFormatName } from "../image-format.ts";
import { DESCRIPTOR_BYTES_MAX, descriptorText, parseDescriptor } from "../../formats/vmdk/vmdk-format.ts";
import { fileKey } from "../../io/file-identity.ts";

/** Files probed per directory (bounds the work of one scan). */
export const BACKING_SCAN_FILES_MAX = 100_000;

/** The first `bytes` of the file at `path` (fewer at its end), or null when unreadable. */
function readHead(path: string, bytes: number): Buffer | null {
  let fd: number | null = null;
  try {
    fd = openSync(path, "r");
    const head = Buffer.alloc(bytes);
    return head.subarray(0, readSync(fd, head, 0, bytes, 0));
  } catch {
    return null;
  } finally {
    if (fd !== null) closeSync(fd);
  }
}

/** What a file may name other files as: qcow2 (backing, data file) or a vmdk descriptor (extents); null otherwise. */
function namingKind(path: string): "qcow2" | "vmdk descriptor" | null {
  const head = readHead(path, 512);
  if (head === null) return null;
  if (probedFormatName(head) === "qcow2") return "qcow2";
  return isVmdkDescriptor(head) ? "vmdk descriptor" : null;
}

/** How an image uses another file. */
export type FileUse = "backing file" | "data file" | "extent file";

/** The file names a qcow2 file (backing, external data file) or a vmdk descriptor (extents) stores, or none (unreadable, other kinds). */
export async function storedFileNames(path: string): Promise<Array<[FileUse, string]>> {
  const kind = namingKind(path);
  if (kind === "vmdk descriptor") {
    const text = readHead(path, DESCRIPTOR_BYTES_MAX);
    try {
      return text === null ? [] : parseDescriptor(descriptorText(text)).extents.map((extent): [FileUse, string] => ["extent file", extent.fileName]);
    } catch {
      return [];
    }
  }
  if (kind !== "qcow2") return [];
  let file;
  try {
    file = await openNodeFile(path, { readOnly: true });
  } catch {
    return [];
  }
  try {
    const header = await readQcow2Header(file);
    const names: Array<[FileUse, string]> = [];
    if (header.backingFileName !== null && header.backingFileName !== "") names.push(["backing file", header.backingFileName]);
    if (header.extensions.dataFileName !== null && header.extensions.dataFileName !== "") names.push(["data file", header.extensions.dataFileName]);
    return names;
  } catch {
    return [];
  } finally {
    await file.close();
  }
}

/**
 * Where a stored name may point: a backing name relative to its image, as
 * QEMU resolves it; a relative data file name where QEMU 7.2 opens it (the
 * opening process's working directory) and beside the image (where it was
 * likely created), so that neither reading is missed.
 */
function referencedPaths(image: string, use: FileUse, name: string): string[] {
  const paths: string[] = [];
  try {
    paths.push(resolveBackingPath(image, name));
  } catch {
    // a name QEMU would not open as a file (a protocol prefix): no file of ours
  }
  if (use === "data file") paths.push(resolve(name));
  return paths;
}

/** Images in `directories` that use `path`, each with how (paths as found, sorted by path). */
export async function findFileUsers(path: string, directories: readonly string[]): Promise<Array<{ user: string; use: FileUse }>> {
  const target = fileKey(path);
  if (target === null) return [];
  const users = new Map<string, FileUse>();
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
      if (fileKey(candidate) === target) continue;
      for (const [use, name] of await storedFileNames(candidate)) {
        if (!users.has(candidate) && referencedPaths(candidate, use, name).some((resolved) => fileKey(resolved) === target)) users.set(candidate, use);
      }
    }
  }
  return [...users].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([user, use]) => ({ user, use }));
}

/** Images in `directories` whose backing file is `path` (paths as found, sorted). */
export async function findBackingUsers(path: string, directories: readonly string[]): Promise<string[]> {
  return (await findFileUsers(path, directories)).filter((found) => found.use === "backing file").map((found) => found.user);
}
