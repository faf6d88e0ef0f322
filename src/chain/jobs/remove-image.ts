/**
 * snapstack img remove: delete an image file, unless another image still
 * uses it as its backing file.
 *
 * Design notes
 * - Users are found by scanning the image's own directory and any others
 *   given (backing-users.ts); an image elsewhere that uses it cannot be
 *   known, so the caller names the directories where overlays live.
 * - `wipe` overwrites the file's bytes with zeroes (chunks that already
 *   read as zero, such as holes, are skipped so sparse files stay sparse)
 *   and flushes before the file is unlinked, so the data is not left in
 *   the freed blocks. Zeroes are written, never a hole punched: a
 *   punched block goes back to the file system holding its old bytes,
 *   which is what removing the file without a wipe already does.
 * - The directory is synced after the unlink.
 * - Refused, with nothing touched (E_IN_USE unless said otherwise):
 *   - a file another image uses, as backing file or as external data file;
 *   - a file any other process holds open (its image locks: a QEMU, a
 *     snapstack server, even a reader that shares everything with -U;
 *     stricter than qemu-img, which has no remove);
 *   - a symbolic link (E_ACCESS): the users found would be those of the
 *     link's directory, the wipe would erase the file it points to, and
 *     the unlink would remove only the link;
 *   - with `wipe`, a file with other hard links: the wipe would erase the
 *     data under its other names too;
 *   - a qcow2 image with an external data file (E_UNSUPPORTED_FEATURE):
 *     its guest data is in that other file, which removing this one would
 *     leave behind unwiped.
 */
import { lstatSync, unlinkSync } from "node:fs";
import { dirname } from "node:path";
import { SnapstackError, fromSystemError } from "../../base/errors.ts";
import { openNodeFile, syncDirectory } from "../../io/node-file.ts";
import { findFileUsers, storedFileNames } from "./backing-users.ts";
import { lockBits, lockImageFile } from "../../io/qemu-locks.ts";
import { runJob, type JobOptions } from "./job.ts";
import { allocateIoBuffer } from "../../io/io-buffer.ts";

/** Bytes read and (when not zero) overwritten per step of a wipe. */
export const WIPE_CHUNK_BYTES = 8 * 1024 * 1024;

export interface RemoveImageOptions extends JobOptions {
  /** Overwrite the data with zeroes and flush before unlinking. */
  wipe?: boolean;
  /** More directories to search for images using this one as backing. */
  searchDirectories?: string[];
  /** Wipe a file with other names (hard links) too: for a caller that owns the file (the VM store), not for a user's. */
  wipeAllNames?: boolean;
}

export interface RemoveResult {
  /** Bytes overwritten with zeroes. */
  wipedBytes: number;
}

export async function removeImage(path: string, options: RemoveImageOptions = {}): Promise<RemoveResult> {
  let stat;
  try {
    stat = lstatSync(path);
  } catch (error) {
    throw fromSystemError(error, path, "remove");
  }
  if (stat.isSymbolicLink()) throw new SnapstackError("E_ACCESS", `${path}: cannot remove: a symbolic link; name the image it points to`, { path });
  if (!stat.isFile()) throw new SnapstackError("E_ACCESS", `${path}: cannot remove: not a regular file`, { path });
  if (options.wipe && stat.nlink > 1 && options.wipeAllNames !== true) {
    throw new SnapstackError("E_IN_USE", `${path}: cannot wipe: the file has ${stat.nlink} names (hard links), and the wipe would erase it under the others`, { path });
  }
  const users = await findFileUsers(path, [dirname(path), ...(options.searchDirectories ?? [])]);
  if (users.length > 0) {
    const others = users.length > 1 ? ` (and ${users.length - 1} more)` : "";
    throw new SnapstackError("E_IN_USE", `Image '${path}' is used as ${users[0].use} by '${users[0].user}'${others}`, { path, users: users.map((found) => found.user) });
  }
  // Refused while any other process has the file open (locked), and held until it is gone: none starts using it meanwhile.
  const lock = lockImageFile(path, lockBits("remove"));
  if (typeof lock === "string") throw new SnapstackError("E_IN_USE", `Could not remove '${path}': ${lock}: is another process using the image?`, { path });
  try {
    // Guest data in another file (a qcow2 external data file, a vmdk descriptor's extents) would be left behind.
    const dataFile = (await storedFileNames(path)).find(([use]) => use === "data file" || use === "extent file");
    if (dataFile !== undefined) {
      const what = dataFile[0] === "data file" ? "the external data file" : "the extent file";
      throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${path}: cannot remove: its guest data is in ${what} '${dataFile[1]}', which would be left behind`, { path });
    }
    return await runJob<RemoveResult>("remove", options, {
      async run(job) {
        let wipedBytes = 0;
        if (options.wipe) {
          const file = await openNodeFile(path, { readOnly: false });
          try {
            const sizeBytes = await file.sizeBytes();
            job.setTotal(sizeBytes, "wipe");
            const buffer = allocateIoBuffer(WIPE_CHUNK_BYTES);
            const zeroes = Buffer.alloc(WIPE_CHUNK_BYTES);
            for (let at = 0; at < sizeBytes; ) {
              job.checkpoint();
              const chunk = Math.min(WIPE_CHUNK_BYTES, sizeBytes - at);
              const slice = buffer.subarray(0, chunk);
              await file.read(at, slice);
              if (!zeroes.subarray(0, chunk).equals(slice)) {
                await file.write(at, zeroes.subarray(0, chunk));
                wipedBytes += chunk;
              }
              at += chunk;
              job.advance(chunk);
            }
            await file.flush();
          } finally {
            await file.close();
          }
        }
        return { wipedBytes };
      },
      async prepare() {
        try {
          unlinkSync(path);
        } catch (error) {
          throw fromSystemError(error, path, "remove");
        }
        await syncDirectory(dirname(path));
      },
    });
  } finally {
    lock.release();
  }
}
