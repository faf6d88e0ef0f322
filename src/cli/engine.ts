/**
 * The library calls the CLI makes, gathered in one place.
 *
 * The CLI stays thin: argument parsing and rendering only. Everything that
 * touches an image goes through the functions re-exported here, so the
 * commands depend on one small surface and the real modules can move
 * without touching every command.
 *
 * Besides re-exports, two adapters live here: `measureImage` (qemu-img
 * measure's source scan around measureQcow2) and `checkImage` (format probe
 * around checkQcow2, "unsupported" for raw).
 */
import { SnapstackError } from "../base/errors.ts";
import type { BlockDevice } from "../device/block-device.ts";
import { openImage as openChain, parseImageFormat, probeImageFormat } from "../chain/index.ts";
import { resolveQcow2CreateOptions } from "../formats/qcow2/create-qcow2.ts";
import { measureQcow2 } from "../formats/qcow2/measure.ts";
import { qcow2CreateOptionsFrom } from "./format-options.ts";
import { mapImage } from "../chain/index.ts";
import { checkQcow2, type Qcow2CheckResult, type Qcow2RepairMode } from "../formats/qcow2/check.ts";
import { openNodeFile } from "../io/node-file.ts";

export interface OpenImageOptions {
  /** A format name as the user typed it (validated here: E_UNKNOWN_FORMAT). */
  format?: string;
  readOnly?: boolean;
  /** Open the backing chain too (default true). */
  openBacking?: boolean;
}

/** Open an image and its backing chain (src/chain/open-image.ts). */
export async function openImage(path: string, options: OpenImageOptions = {}): Promise<BlockDevice> {
  const format = options.format === undefined ? undefined : parseImageFormat(options.format);
  return openChain(path, { format, readOnly: options.readOnly, openBacking: options.openBacking });
}

export {
  compareImages,
  convertImage,
  createImage,
  formatMapJson,
  imageInfo,
  mapImage,
  resizeImage,
  resolveBackingPath,
  type CompareResult,
  type SizeSpec,
} from "../chain/index.ts";

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
}

/**
 * qemu-img measure (block/qcow2.c qcow2_measure, block/raw-format.c
 * raw_measure): the qcow2 arithmetic is measureQcow2; here only the source's
 * allocated data is counted as QEMU does, from the chain's block status: zero
 * ranges skipped, data ranges extended to whole clusters.
 */
export async function measureImage(options: MeasureOptions): Promise<MeasureResult> {
  const format = parseImageFormat(options.format);
  const source = options.source;
  const virtualSizeBytes = source?.sizeBytes ?? options.sizeBytes ?? 0;
  if (format === "raw") {
    const required = source === undefined ? Math.ceil(virtualSizeBytes / 512) * 512 : virtualSizeBytes;
    return { required, "fully-allocated": required };
  }
  const resolved = resolveQcow2CreateOptions(qcow2CreateOptionsFrom(options.options, virtualSizeBytes));
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
  // qemu-img reports bitmaps when source and target formats both support them; snapstack copies none.
  if (source !== undefined && source.format === "qcow2") result.bitmaps = 0;
  return result;
}

export interface CheckImageOptions {
  format?: string;
  repair?: Qcow2RepairMode;
}

/**
 * qemu-img check: the qcow2 check (src/formats/qcow2/check.ts), or
 * "unsupported" for formats without a check (raw, as qemu's exit 63).
 */
export async function checkImage(path: string, options: CheckImageOptions = {}): Promise<Qcow2CheckResult | "unsupported"> {
  const format = options.format === undefined ? undefined : parseImageFormat(options.format);
  const file = await openNodeFile(path, { readOnly: options.repair === undefined });
  try {
    const isQcow2 = (await probeImageFormat(file)) === "qcow2";
    if (format === "raw" || (format === undefined && !isQcow2)) return "unsupported";
    if (!isQcow2) throw new SnapstackError("E_WRONG_FORMAT", `Could not open '${path}': Image is not in qcow2 format`, { path });
    return await checkQcow2(file, { repair: options.repair });
  } finally {
    await file.close();
  }
}

/** Devices that can store a compressed cluster (qemu-io write -c). */
export interface CompressedWriter {
  writeCompressed(guestOffset: number, data: Uint8Array): Promise<void>;
}

export function canWriteCompressed(device: BlockDevice): device is BlockDevice & CompressedWriter {
  return typeof (device as Partial<CompressedWriter>).writeCompressed === "function";
}
