/**
 * The library calls the CLI makes, gathered in one place.
 *
 * The CLI stays thin: argument parsing and rendering only. Everything that
 * touches an image goes through the functions re-exported here, so the
 * commands depend on one small surface and the real modules can move
 * without touching every command.
 */
import type { BlockDevice } from "../device/block-device.ts";
import type { NodeFileCacheMode, NodeFileIoMode } from "../io/node-file.ts";
import { openImage as openChain, parseImageFormat, type TopLockContext } from "../chain/index.ts";

export type { TopLockContext };

export interface OpenImageOptions {
  /** A format name as the user typed it (validated here: E_UNKNOWN_FORMAT). */
  format?: string;
  readOnly?: boolean;
  /** Open the backing chain too (default true). */
  openBacking?: boolean;
  /** How the image files do I/O (src/io/node-file.ts; default "auto"). */
  ioMode?: NodeFileIoMode;
  /** How the image's writes run, when it differs from ioMode. */
  writeIoMode?: NodeFileIoMode;
  /** -U: read an image another process is writing (src/chain/open-image.ts). */
  forceShare?: boolean;
  /** The image locks (src/chain/open-image.ts OpenImageOptions.locks). */
  locks?: false | TopLockContext;
  /** The top image's cache mode ("unsafe": flushes do nothing). */
  cache?: NodeFileCacheMode;
  /** Read-only, for its metadata only (src/chain/open-image.ts): what qemu opens without I/O. */
  metadataOnly?: boolean;
}

/** Open an image and its backing chain (src/chain/open-image.ts). */
export async function openImage(path: string, options: OpenImageOptions = {}): Promise<BlockDevice> {
  const format = options.format === undefined ? undefined : parseImageFormat(options.format);
  return openChain(path, { format, readOnly: options.readOnly, openBacking: options.openBacking, ioMode: options.ioMode, writeIoMode: options.writeIoMode, forceShare: options.forceShare, locks: options.locks, cache: options.cache, metadataOnly: options.metadataOnly });
}

export {
  amendImage,
  refuseUnamendableFormat,
  changeImageBitmaps,
  DD_BLOCK_BYTES_MAX,
  ddImage,
  benchImage,
  checkBenchOptions,
  compareImages,
  convertImage,
  createImage,
  forEachMapEntry,
  formatMapJson,
  formatMapJsonEntry,
  imageInfo,
  resizeImage,
  resolveBackingPath,
  measureImage,
  checkImage,
  type MeasureResult,
  type CompareResult,
  type SizeSpec,
} from "../chain/index.ts";

/** Devices that can store a compressed cluster (qemu-io write -c). */
export interface CompressedWriter {
  writeCompressed(guestOffset: number, data: Uint8Array): Promise<void>;
}

export function canWriteCompressed(device: BlockDevice): device is BlockDevice & CompressedWriter {
  return typeof (device as Partial<CompressedWriter>).writeCompressed === "function";
}
