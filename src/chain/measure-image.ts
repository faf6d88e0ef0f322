/**
 * qemu-img measure for raw and qcow2 targets (block/qcow2.c qcow2_measure,
 * block/raw-format.c raw_measure). The qcow2 arithmetic is measureQcow2;
 * this file adds the source scan: how much of a source chain holds data.
 */
import type { BlockDevice } from "../device/block-device.ts";
import { resolveQcow2CreateOptions } from "../formats/qcow2/create-qcow2.ts";
import { measureQcow2 } from "../formats/qcow2/measure.ts";
import { Qcow2Image } from "../formats/qcow2/qcow2-image.ts";
import { bitmapDirectoryEntryBytes } from "../formats/qcow2/bitmap-directory.ts";
import { parseOutputFormat } from "./image-format.ts";
import { mapImage } from "./map-image.ts";
import { qcow2CreateOptionsFromKeys } from "./create-image.ts";

export interface MeasureResult {
  required: number;
  "fully-allocated": number;
  bitmaps?: number;
}

export interface MeasureOptions {
  /** Target format (-O). */
  format: string;
  /** Typed -o options of the target format. */
  options: Record<string, string | boolean | number>;
  /** --size: measure a new, empty image of this size. */
  sizeBytes?: number;
  /** Or measure the content of this image (and its chain). */
  source?: BlockDevice;
  /** Where the source's persistent bitmaps are, when `source` is a view of one of its snapshots (-l): the image. */
  bitmapsOf?: BlockDevice;
}

/**
 * qemu-img measure (block/qcow2.c qcow2_measure, block/raw-format.c
 * raw_measure): the qcow2 arithmetic is measureQcow2; here only the source's
 * allocated data is counted as QEMU does, from the chain's block status: zero
 * ranges skipped, data ranges extended to whole clusters.
 */
export async function measureImage(options: MeasureOptions): Promise<MeasureResult> {
  const format = parseOutputFormat(options.format);
  const source = options.source;
  const virtualSizeBytes = source?.sizeBytes ?? options.sizeBytes ?? 0;
  if (format === "raw") {
    const required = source === undefined ? Math.ceil(virtualSizeBytes / 512) * 512 : virtualSizeBytes;
    return { required, "fully-allocated": required };
  }
  // measure never opens the backing file, so it needs no format for it (qemu-img measure asks for none).
  const keys = options.options.backing_file !== undefined && options.options.backing_fmt === undefined ? { ...options.options, backing_fmt: "raw" } : options.options;
  const resolved = resolveQcow2CreateOptions(qcow2CreateOptionsFromKeys("", keys, virtualSizeBytes));
  const clusterSizeBytes = 2 ** resolved.clusterBits;
  let allocatedBytes: number | undefined;
  if (source !== undefined) {
    allocatedBytes = resolved.backingFile !== null ? Math.ceil(virtualSizeBytes / clusterSizeBytes) * clusterSizeBytes : 0;
    if (resolved.backingFile === null) {
      // qcow2_measure's loop: skip zeroes; a data range counts from its cluster start to the next cluster boundary.
      let nextOffset = 0;
      for (const extent of await mapImage(source)) {
        const extentEnd = extent.start + extent.length;
        if (extentEnd <= nextOffset) continue;
        const start = Math.max(extent.start, nextOffset);
        if (extent.zero || !extent.data || !extent.present) {
          nextOffset = extentEnd;
          continue;
        }
        const end = Math.ceil(extentEnd / clusterSizeBytes) * clusterSizeBytes;
        allocatedBytes += (start % clusterSizeBytes) + (end - start);
        nextOffset = end;
      }
    }
  }
  const measured = measureQcow2({
    sizeBytes: virtualSizeBytes,
    clusterSizeBytes,
    refcountBits: 2 ** resolved.refcountOrder,
    extendedL2: resolved.extendedL2,
    preallocation: resolved.preallocation,
    allocatedBytes,
  });
  const result: MeasureResult = { required: measured.requiredBytes, "fully-allocated": measured.fullyAllocatedBytes };
  // qemu-img reports bitmaps when the source and a v3 target both support them (a v2 qcow2 source does not):
  // what convert --bitmaps would need.
  const holder = options.bitmapsOf ?? source;
  if (holder instanceof Qcow2Image && holder.info().version >= 3 && resolved.version === 3) {
    result.bitmaps = persistentBitmapsBytes(holder, clusterSizeBytes);
  }
  return result;
}

/** BME_TABLE_ENTRY_SIZE. */
const BITMAP_TABLE_ENTRY_BYTES = 8;

/**
 * qcow2_get_persistent_dirty_bitmap_size: every bitmap fully allocated in
 * clusters of the target's size, its table, and the directory.
 */
function persistentBitmapsBytes(source: Qcow2Image, clusterSizeBytes: number): number {
  const roundUp = (bytes: number): number => Math.ceil(bytes / clusterSizeBytes) * clusterSizeBytes;
  let total = 0;
  let directoryBytes = 0;
  for (const bitmap of source.info().bitmaps) {
    const bitmapBytes = Math.ceil(Math.ceil(source.sizeBytes / bitmap.granularityBytes) / 8);
    const clusters = Math.ceil(bitmapBytes / clusterSizeBytes);
    total += clusters * clusterSizeBytes + roundUp(clusters * BITMAP_TABLE_ENTRY_BYTES);
    directoryBytes += bitmapDirectoryEntryBytes(new TextEncoder().encode(bitmap.name).length);
  }
  return total + roundUp(directoryBytes);
}
