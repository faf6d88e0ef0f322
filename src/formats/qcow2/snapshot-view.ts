/**
 * A read-only BlockDevice showing one internal snapshot of an open qcow2
 * image: what `FILE@SNAPSHOT` names in diffs and what `snapstack nbd -l`
 * exports.
 *
 * Design notes
 * - The view is a second Qcow2Image over the same file whose "active" L1 is
 *   the snapshot's L1 table and whose virtual size is the snapshot's
 *   disk_size, or the image's current size for qemu's `-l` (which swaps
 *   the L1 table only); unallocated ranges fall through to the image's
 *   backing chain (not owned: closing the view closes neither the file
 *   nor the backing).
 * - It has its own L2 cache, read from the file. That is safe while the
 *   snapshot exists: every table and data cluster it reaches has refcount
 *   >= 2 or belongs to it alone, so the live image never rewrites them in
 *   place (its writes copy first), and snapshot creation flushes all
 *   metadata before the snapshot is visible.
 * - Deleting the snapshot (or applying another and writing) while a view of
 *   it is open frees what the view reads: close views first.
 */
import type { ImageFile } from "../../io/file.ts";
import { L1_ENTRY_BYTES } from "./entries.ts";
import { selectSnapshot, validateSnapshotL1, type SnapshotSelector } from "./internal-snapshots.ts";
import { METADATA_CACHE_BYTES_DEFAULT, Qcow2Metadata, l1EntriesForSize } from "./metadata.ts";
import { Qcow2Image } from "./qcow2-image.ts";
import { SnapstackError } from "../../base/errors.ts";

export interface SnapshotViewOptions {
  /** Bound of the view's own L2 cache (default as for an image). */
  cacheBytesMax?: number;
  /**
   * The view's virtual size (default: the snapshot's disk size). qemu's
   * `-l` (bdrv_snapshot_load_tmp) swaps in the snapshot's L1 table only and
   * keeps the image's current size: past what the snapshot's L1 maps, the
   * view reads through to the backing chain (or zeroes).
   */
  sizeBytes?: number;
}

/** The image's file seen read-only, and not closed by the view. */
function borrowedFile(file: ImageFile, name: string): ImageFile {
  const refuse = (what: string): Promise<never> => Promise.reject(new SnapstackError("E_READ_ONLY", `${name}: cannot ${what}: snapshot views are read-only`));
  return {
    name,
    readOnly: true,
    read: (hostOffset, buffer) => file.read(hostOffset, buffer),
    write: () => refuse("write"),
    sizeBytes: () => file.sizeBytes(),
    truncate: () => refuse("truncate"),
    flush: () => Promise.resolve(),
    discard: () => refuse("discard"),
    close: () => Promise.resolve(),
  };
}

/** Open internal snapshot `ref` (ID first, then name, or a SnapshotSelector) of `image` as a read-only device. */
export async function openSnapshotView(image: Qcow2Image, ref: string | SnapshotSelector, options: SnapshotViewOptions = {}): Promise<Qcow2Image> {
  const snapshot = selectSnapshot(image, typeof ref === "string" ? { idOrName: ref } : ref);
  const meta = image.metadata;
  await validateSnapshotL1(meta, snapshot);
  const name = `${image.name}@${typeof ref === "string" ? ref : snapshot.id}`;
  const file = borrowedFile(meta.file, name);
  const sizeBytes = options.sizeBytes ?? snapshot.diskSizeBytes;
  // The L1 entries a view of sizeBytes indexes: past the snapshot's own, unallocated (zero in memory only).
  const l1Entries = Math.max(snapshot.l1Size, l1EntriesForSize(sizeBytes, meta.geometry));
  const l1 = new Uint8Array(l1Entries * L1_ENTRY_BYTES);
  if (snapshot.l1Size > 0) await file.read(snapshot.l1TableOffset, l1.subarray(0, snapshot.l1Size * L1_ENTRY_BYTES));
  const header = {
    ...meta.header,
    sizeBytes,
    l1Size: l1Entries,
    l1TableOffset: snapshot.l1TableOffset,
  };
  const viewMeta = new Qcow2Metadata(file, header, l1, [...meta.reftable], options.cacheBytesMax ?? METADATA_CACHE_BYTES_DEFAULT);
  return new Qcow2Image(file, viewMeta, [], { readOnly: true, backing: image.backing, closeBacking: false });
}
