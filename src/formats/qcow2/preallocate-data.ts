/**
 * qcow2_co_truncate with preallocation falloc/full: data clusters for a
 * guest range, allocated and entered in the L2 tables at once (qemu-img
 * create -o preallocation=falloc|full, resize --preallocation=falloc|full).
 * Refcount structures for the new space come first (qcow2_refcount_area),
 * the data clusters right after them, then the L2 entries (L2 tables
 * allocated first fit). `full` writes the zeroes; `falloc` allocates the
 * file's new part without writing it (ImageFile.preallocate; sparse where
 * the file system cannot), so its bytes are the same. The caller writes the
 * caches back.
 */
import { SnapstackError, assert } from "../../base/errors.ts";
import type { ImageFile } from "../../io/file.ts";
import { type Qcow2Metadata, qcow2Geometry } from "./metadata.ts";
import { encodeL2Entry, setL2EntryWords } from "./entries.ts";
import { markDirty } from "./table-cache.ts";

/** Zero-filling chunk for preallocation=full. */
const ZERO_FILL_CHUNK_BYTES = 1024 * 1024;

/**
 * Preallocate the data clusters of [fromGuestOffset, toGuestOffset):
 * `fromGuestOffset` is a cluster boundary (QEMU would also copy the head of
 * a partial first cluster to a new one), the range's clusters unallocated.
 */
export async function preallocateData(file: ImageFile, meta: Qcow2Metadata, fromGuestOffset: number, toGuestOffset: number, writeZeroes: boolean): Promise<void> {
  const geometry = qcow2Geometry(meta.header);
  const cs = geometry.clusterSizeBytes;
  assert(fromGuestOffset % cs === 0, "data preallocation starts on a cluster boundary");
  // No data cluster (create of size 0) still makes a new refcount area, as QEMU's does.
  let dataClusters = Math.max(0, Math.ceil(toGuestOffset / cs) - fromGuestOffset / cs);
  const fileSize = await file.sizeBytes();
  const lastCluster = await meta.lastUsedCluster(fileSize);
  const oldFileSize = lastCluster >= 0 ? (lastCluster + 1) * cs : Math.ceil(fileSize / cs) * cs;
  const l2Tables = Math.ceil(dataClusters / geometry.l2Entries) + 1;
  const allocationStart = await meta.refcountArea(oldFileSize, dataClusters + l2Tables, true, 0, 0);
  const allocated = await meta.allocClustersAt(allocationStart, dataClusters);
  if (allocated !== dataClusters) throw new SnapstackError("E_INTERNAL", "preallocated data clusters are not contiguous");
  const newFileSize = allocationStart + dataClusters * cs;
  if (writeZeroes) {
    const zeros = new Uint8Array(Math.min(ZERO_FILL_CHUNK_BYTES, newFileSize - allocationStart));
    for (let at = allocationStart; at < newFileSize; at += zeros.length) {
      await file.write(at, zeros.subarray(0, Math.min(zeros.length, newFileSize - at)));
    }
  } else {
    // falloc: the file grows allocated (posix_fallocate, as qemu's file driver does), or sparse where that is unsupported.
    const currentSize = await file.sizeBytes();
    if (currentSize < newFileSize && (await file.preallocate?.(currentSize, newFileSize - currentSize)) !== true) await file.truncate(newFileSize);
  }
  let hostOffset = allocationStart;
  let guestCluster = fromGuestOffset / cs;
  while (dataClusters > 0) {
    const l1Index = Math.floor(guestCluster / geometry.l2Entries);
    const firstIndex = guestCluster % geometry.l2Entries;
    const count = Math.min(dataClusters, geometry.l2Entries - firstIndex);
    const table = await meta.getL2ForWrite(l1Index);
    for (let i = 0; i < count; i++) {
      const word = encodeL2Entry({ type: "normal", hostOffset: hostOffset + i * cs, copied: true }, geometry.clusterBits, geometry.extendedL2);
      // With extended L2 the subcluster bitmap stays empty (QCowL2Meta.prealloc: QEMU marks the
      // subclusters allocated only when a zeroing truncate needs them to read as zeroes).
      setL2EntryWords(table.view, firstIndex + i, geometry.extendedL2, word, 0, 0);
    }
    markDirty(table, firstIndex * geometry.l2EntryBytes, count * geometry.l2EntryBytes);
    guestCluster += count;
    hostOffset += count * cs;
    dataClusters -= count;
  }
}
