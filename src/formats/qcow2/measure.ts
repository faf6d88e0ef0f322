/**
 * qemu-img measure for qcow2 targets: QEMU 7.2's qcow2_measure and
 * qcow2_calc_prealloc_size arithmetic.
 *
 * fully-allocated = header cluster + L2 tables + L1 (rounded to whole
 * clusters of entries) + refcount structures for all of it + the data,
 * with the virtual size rounded up to a cluster. required = the same minus
 * the data that need not be stored (only `allocatedBytes` is), i.e. the
 * metadata of a fully allocated image is always counted.
 */
import { SnapstackError } from "../../base/errors.ts";
import { L1_ENTRY_BYTES, l2EntryBytes } from "./entries.ts";
import { L1_BYTES_MAX, refcountMetadataSize } from "./metadata.ts";
import { DEFAULT_CLUSTER_SIZE_BYTES, DEFAULT_REFCOUNT_BITS, type Qcow2Preallocation } from "./create-qcow2.ts";

export interface Qcow2MeasureOptions {
  /** Virtual size of the image to create. */
  sizeBytes: number;
  clusterSizeBytes?: number;
  refcountBits?: number;
  extendedL2?: boolean;
  preallocation?: Qcow2Preallocation;
  /**
   * Guest bytes that hold data, already extended to cluster boundaries as
   * qcow2_measure does from the source's block status. Absent: an empty
   * image (--size mode). With a backing file, pass the whole virtual size.
   */
  allocatedBytes?: number;
}

export interface Qcow2MeasureResult {
  requiredBytes: number;
  fullyAllocatedBytes: number;
}

function roundUp(value: number, multiple: number): number {
  return Math.ceil(value / multiple) * multiple;
}

/** qcow2_calc_prealloc_size: file size of a fully preallocated image. */
export function qcow2PreallocSize(sizeBytes: number, clusterSizeBytes: number, refcountOrder: number, extendedL2: boolean): number {
  const entryBytes = l2EntryBytes(extendedL2);
  const alignedSize = roundUp(sizeBytes, clusterSizeBytes);
  let metaBytes = clusterSizeBytes;
  const l2Entries = roundUp(alignedSize / clusterSizeBytes, clusterSizeBytes / entryBytes);
  metaBytes += l2Entries * entryBytes;
  const l1Entries = roundUp((l2Entries * entryBytes) / clusterSizeBytes, clusterSizeBytes / L1_ENTRY_BYTES);
  metaBytes += l1Entries * L1_ENTRY_BYTES;
  metaBytes += refcountMetadataSize((metaBytes + alignedSize) / clusterSizeBytes, clusterSizeBytes, refcountOrder, false).bytes;
  return metaBytes + alignedSize;
}

export function measureQcow2(options: Qcow2MeasureOptions): Qcow2MeasureResult {
  const clusterSizeBytes = options.clusterSizeBytes ?? DEFAULT_CLUSTER_SIZE_BYTES;
  const refcountBits = options.refcountBits ?? DEFAULT_REFCOUNT_BITS;
  if (!Number.isSafeInteger(options.sizeBytes) || options.sizeBytes < 0) {
    throw new SnapstackError("E_INVALID_SIZE", `invalid size ${options.sizeBytes}`);
  }
  const virtualSize = roundUp(options.sizeBytes, clusterSizeBytes);
  const l2Tables = Math.ceil(virtualSize / clusterSizeBytes / (clusterSizeBytes / l2EntryBytes(options.extendedL2 ?? false)));
  if (l2Tables * L1_ENTRY_BYTES > L1_BYTES_MAX) {
    throw new SnapstackError("E_TOO_LARGE", "The image size is too large (try using a larger cluster size)");
  }
  let required = options.allocatedBytes ?? 0;
  if (options.preallocation === "full" || options.preallocation === "falloc") required = virtualSize;
  const fullyAllocatedBytes = qcow2PreallocSize(virtualSize, clusterSizeBytes, Math.log2(refcountBits), options.extendedL2 ?? false);
  return { requiredBytes: fullyAllocatedBytes - virtualSize + required, fullyAllocatedBytes };
}
