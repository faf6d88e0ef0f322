/** The qcow2 engine's public pieces. */
export * from "./header.ts";
export * from "./entries.ts";
export * from "./refcount-block.ts";
export * from "./snapshot-table.ts";
export { compressCluster, decompressCluster, ZLIB_WINDOW_BITS, ZLIB_MEM_LEVEL } from "./compression.ts";
export { Qcow2Image, openQcow2, readQcow2Header, type OpenQcow2Options, type Qcow2Info, type Qcow2SnapshotInfo } from "./qcow2-image.ts";
export { type BitmapAction, type BitmapData, type BitmapSource } from "./dirty-bitmaps.ts";
export { Qcow2Metadata, qcow2Geometry, l1EntriesForSize, refcountMetadataSize, L1_BYTES_MAX, METADATA_CACHE_BYTES_DEFAULT, type Qcow2Geometry } from "./metadata.ts";
export {
  createQcow2,
  resolveQcow2CreateOptions,
  DEFAULT_CLUSTER_SIZE_BYTES,
  DEFAULT_REFCOUNT_BITS,
  QCOW2_PREALLOCATION_MODES,
  refcountBitsProblem,
  type Qcow2CreateOptions,
  type Qcow2Preallocation,
  type ResolvedQcow2CreateOptions,
} from "./create-qcow2.ts";
export { measureQcow2, qcow2PreallocSize, type Qcow2MeasureOptions, type Qcow2MeasureResult } from "./measure.ts";
