/**
 * Crash-safe small files: write a temporary sibling, fsync it, rename it
 * over the target, fsync the directory. A kill at any moment leaves either
 * the old or the new content under the name, never a mix.
 */
import { closeSync, fsyncSync, openSync, readFileSync, renameSync, rmSync, writeSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { SnapstackError, fromSystemError } from "../../base/errors.ts";

/**
 * Tests on throwaway stores may turn fsync off (setDurableWrites(false));
 * the daemon never does.
 */
let durableWrites = true;

export function setDurableWrites(durable: boolean): void {
  durableWrites = durable;
}

export function syncDirectorySync(path: string): void {
  if (!durableWrites) return;
  const fd = openSync(path, "r");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

export function writeFileAtomic(path: string, content: string | Uint8Array): void {
  const temporary = join(dirname(path), `.${basename(path)}.tmp-${process.pid}`);
  try {
    const fd = openSync(temporary, "w", 0o600);
    try {
      const bytes = typeof content === "string" ? Buffer.from(content, "utf8") : content;
      let written = 0;
      while (written < bytes.length) written += writeSync(fd, bytes, written, bytes.length - written);
      if (durableWrites) fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(temporary, path);
    syncDirectorySync(dirname(path));
  } catch (error) {
    rmSync(temporary, { force: true });
    throw fromSystemError(error, path, "write");
  }
}

export function writeJsonAtomic(path: string, value: unknown): void {
  writeFileAtomic(path, JSON.stringify(value, null, 2) + "\n");
}

/** Read a JSON file written by writeJsonAtomic; a garbled one is E_BAD_HEADER naming it. */
export function readJson<T>(path: string): T {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (error) {
    throw fromSystemError(error, path, "read");
  }
  try {
    return JSON.parse(text) as T;
  } catch (error) {
    throw new SnapstackError("E_BAD_HEADER", `${path}: not valid JSON: ${(error as Error).message}`, { path });
  }
}
