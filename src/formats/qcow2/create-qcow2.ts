/**
 * createQcow2: a new qcow2 image, laid out byte for byte as QEMU 7.2's
 * qcow2_co_create does it.
 *
 * QEMU's steps, replayed with the same allocator (metadata.ts):
 * 1. write a bare header in cluster 0 and, in clusters 1-2, a refcount table
 *    whose entry 0 points to an empty refcount block in cluster 2;
 * 2. allocate 3 clusters (they come out at offset 0: header, table, block);
 * 3. rewrite the full header (extensions, feature table);
 * 4. "truncate" to the size: allocate an L1 of exactly the needed entries
 *    (cluster 3 for a fresh image; the file ends right after its entries),
 *    then preallocate (metadata: L2 tables and data clusters through the
 *    allocator; falloc/full: qcow2_refcount_area for the new space, data
 *    clusters right after it, L2 tables first fit) and set the size field;
 * 5. record the backing file and format (header rewrite).
 */
import { SnapstackError } from "../../base/errors.ts";
import type { ImageFile } from "../../io/file.ts";
import {
  BACKING_FILE_NAME_BYTES_MAX,
  BACKING_FORMAT_BYTES_MAX,
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_TYPE_ZLIB,
  COMPRESSION_TYPE_ZSTD,
  INCOMPAT_COMPRESSION,
  INCOMPAT_EXTL2,
  newQcow2Header,
} from "./header.ts";
import { REFTABLE_ENTRY_BYTES, encodeRefcountTable } from "./refcount-block.ts";
import { L1_BYTES_MAX, Qcow2Metadata, l1EntriesForSize } from "./metadata.ts";
import { L1_ENTRY_BYTES } from "./entries.ts";
import { Qcow2Image } from "./qcow2-image.ts";
import { preallocateData } from "./preallocate-data.ts";

export type Qcow2Preallocation = "off" | "metadata" | "falloc" | "full";
/** qemu-img's preallocation modes, all of which qcow2 takes. */
export const QCOW2_PREALLOCATION_MODES: readonly string[] = ["off", "metadata", "falloc", "full"] satisfies Qcow2Preallocation[];

export interface Qcow2CreateOptions {
  sizeBytes: number;
  clusterSizeBytes?: number;
  refcountBits?: number;
  compat?: "0.10" | "1.1";
  lazyRefcounts?: boolean;
  extendedL2?: boolean;
  compressionType?: "zlib" | "zstd";
  preallocation?: Qcow2Preallocation;
  backingFile?: string;
  backingFormat?: string;
}

export const DEFAULT_CLUSTER_SIZE_BYTES = 65536;
export const DEFAULT_REFCOUNT_BITS = 16;
const CLUSTER_SIZE_MIN_BYTES = 512;
const CLUSTER_SIZE_MAX_BYTES = 2 * 1024 * 1024;
/** Extended L2 needs subclusters of at least 512 bytes. */
const EXTENDED_L2_CLUSTER_MIN_BYTES = 16 * 1024;
const SECTOR_BYTES = 512;

/** Why a refcount width is not one qcow2 takes (QEMU's words), or null; create and amend check it. */
export function refcountBitsProblem(refcountBits: number): string | null {
  return isPowerOfTwo(refcountBits) && refcountBits <= 64 ? null : "Refcount width must be a power of two and may not exceed 64 bits";
}

function invalid(message: string): SnapstackError {
  return new SnapstackError("E_INVALID_OPTION", message);
}

function isPowerOfTwo(value: number): boolean {
  return Number.isInteger(value) && value > 0 && (value & (value - 1)) === 0;
}

/** The checked, defaulted options (what qcow2_co_create validates). */
export interface ResolvedQcow2CreateOptions {
  sizeBytes: number;
  clusterBits: number;
  refcountOrder: number;
  version: 2 | 3;
  lazyRefcounts: boolean;
  extendedL2: boolean;
  compressionType: number;
  preallocation: Qcow2Preallocation;
  backingFile: string | null;
  backingFormat: string | null;
}

export function resolveQcow2CreateOptions(options: Qcow2CreateOptions): ResolvedQcow2CreateOptions {
  const clusterSizeBytes = options.clusterSizeBytes ?? DEFAULT_CLUSTER_SIZE_BYTES;
  const refcountBits = options.refcountBits ?? DEFAULT_REFCOUNT_BITS;
  const version = (options.compat ?? "1.1") === "0.10" ? 2 : 3;
  if (options.compat !== undefined && options.compat !== "0.10" && options.compat !== "1.1") {
    throw invalid(`Invalid parameter '${String(options.compat)}'`);
  }
  const extendedL2 = options.extendedL2 ?? false;
  const lazyRefcounts = options.lazyRefcounts ?? false;
  const compressionType = (options.compressionType ?? "zlib") === "zstd" ? COMPRESSION_TYPE_ZSTD : COMPRESSION_TYPE_ZLIB;
  const preallocation = options.preallocation ?? "off";
  if (!Number.isSafeInteger(options.sizeBytes) || options.sizeBytes < 0) {
    throw new SnapstackError("E_INVALID_SIZE", `invalid image size ${options.sizeBytes}`);
  }
  if (!isPowerOfTwo(clusterSizeBytes) || clusterSizeBytes < CLUSTER_SIZE_MIN_BYTES || clusterSizeBytes > CLUSTER_SIZE_MAX_BYTES) {
    throw invalid("Cluster size must be a power of two between 512 and 2048k");
  }
  const refcountProblem = refcountBitsProblem(refcountBits);
  if (refcountProblem !== null) throw invalid(refcountProblem);
  if (version === 2 && refcountBits !== 16) {
    throw invalid("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)");
  }
  if (version === 2 && lazyRefcounts) {
    throw invalid("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
  }
  if (version === 2 && extendedL2) {
    throw invalid("Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
  }
  if (version === 2 && compressionType !== COMPRESSION_TYPE_ZLIB) {
    throw invalid("Non-zlib compression type is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
  }
  if (extendedL2 && clusterSizeBytes < EXTENDED_L2_CLUSTER_MIN_BYTES) {
    throw invalid(`Extended L2 entries are only supported with cluster sizes of at least ${EXTENDED_L2_CLUSTER_MIN_BYTES} bytes`);
  }
  if (!QCOW2_PREALLOCATION_MODES.includes(preallocation)) {
    throw invalid(`Invalid parameter '${preallocation}'`);
  }
  const backingFile = options.backingFile ?? null;
  const backingFormat = options.backingFormat ?? null;
  if (backingFormat !== null && backingFile === null) throw invalid("Backing format cannot be used without backing file");
  if (backingFile !== null) {
    if (backingFormat === null) throw invalid("Backing file specified without backing format");
    if (new TextEncoder().encode(backingFile).length > BACKING_FILE_NAME_BYTES_MAX) throw invalid("Backing file name too long");
    if (new TextEncoder().encode(backingFormat).length > BACKING_FORMAT_BYTES_MAX) throw invalid(`Backing format name '${backingFormat}' too long`);
    if (preallocation !== "off" && !extendedL2) {
      throw invalid("Backing file and preallocation can only be used at the same time if extended_l2 is on");
    }
  }
  const sizeBytes = Math.ceil(options.sizeBytes / SECTOR_BYTES) * SECTOR_BYTES;
  const clusterBits = Math.log2(clusterSizeBytes);
  const l2Entries = clusterSizeBytes / (extendedL2 ? 16 : 8);
  const l1Entries = Math.ceil(sizeBytes / (l2Entries * clusterSizeBytes));
  if (l1Entries * L1_ENTRY_BYTES > L1_BYTES_MAX || !Number.isSafeInteger(sizeBytes)) {
    throw new SnapstackError("E_TOO_LARGE", "The image size is too large for file format 'qcow2' (try using a larger cluster size)");
  }
  return {
    sizeBytes,
    clusterBits,
    refcountOrder: Math.log2(refcountBits),
    version,
    lazyRefcounts,
    extendedL2,
    compressionType,
    preallocation,
    backingFile,
    backingFormat,
  };
}

/** Create a qcow2 image on an empty (or to-be-emptied) file. */
export async function createQcow2(file: ImageFile, options: Qcow2CreateOptions): Promise<void> {
  const o = resolveQcow2CreateOptions(options);
  const cs = 2 ** o.clusterBits;
  let incompatibleFeatures = 0n;
  if (o.compressionType !== COMPRESSION_TYPE_ZLIB) incompatibleFeatures |= INCOMPAT_COMPRESSION;
  if (o.extendedL2) incompatibleFeatures |= INCOMPAT_EXTL2;
  const header = newQcow2Header({
    version: o.version,
    clusterBits: o.clusterBits,
    sizeBytes: 0,
    refcountTableOffset: cs,
    refcountTableClusters: 1,
    refcountOrder: o.refcountOrder,
    compressionType: o.compressionType,
    incompatibleFeatures,
    compatibleFeatures: o.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
  });

  // 1. Bare header, refcount table (entry 0 -> cluster 2) and an empty refcount block.
  await file.truncate(0);
  const reftableEntries = cs / REFTABLE_ENTRY_BYTES;
  const tableAndBlock = new Uint8Array(2 * cs);
  tableAndBlock.set(encodeRefcountTable([2 * cs], reftableEntries));
  const meta = new Qcow2Metadata(file, header, new Uint8Array(0), [2 * cs, ...new Array<number>(reftableEntries - 1).fill(0)], 4 * 1024 * 1024);
  await meta.writeHeader();
  await file.write(cs, tableAndBlock);

  // 2. Header, table and block get their refcounts.
  const first = await meta.allocClusters(3 * cs);
  if (first !== 0) throw new SnapstackError("E_INTERNAL", "first cluster in an empty image is already in use");
  // 3. The full header.
  await meta.writeHeader();

  // 4. Size: L1, preallocation, size field.
  await meta.growL1(l1EntriesForSize(o.sizeBytes, meta.geometry), true);
  if (o.preallocation === "metadata") {
    const image = new Qcow2Image(file, meta, [], { readOnly: false, backing: null, closeBacking: false });
    await image.preallocateMetadata(0, o.sizeBytes);
  } else if (o.preallocation === "falloc" || o.preallocation === "full") {
    await preallocateData(file, meta, 0, o.sizeBytes, o.preallocation === "full");
  }
  if (o.preallocation !== "off") await meta.writeCaches();
  const sizeField = new Uint8Array(8);
  new DataView(sizeField.buffer).setBigUint64(0, BigInt(o.sizeBytes));
  await meta.writeHeaderBytes(24, sizeField);
  header.sizeBytes = o.sizeBytes;

  // 5. Backing file.
  if (o.backingFile !== null) {
    header.backingFileName = o.backingFile;
    header.backingFormat = o.backingFormat;
    await meta.writeHeader();
  }
  await meta.writeCaches();
  await file.flush();
}
