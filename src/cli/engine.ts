/**
 * The library calls the CLI makes, gathered in one place.
 *
 * The CLI stays thin: argument parsing and rendering only. Everything that
 * touches an image goes through the functions re-exported here, so the
 * commands depend on one small surface and the real modules can move
 * without touching every command.
 */
import type { BlockDevice } from "../device/block-device.ts";
import { openNodeFile, type NodeFileIoMode } from "../io/node-file.ts";
import type { ImageFile } from "../io/file.ts";
import { openImage as openChain, parseImageFormat, probeImageFormat, type ImageFormat } from "../chain/index.ts";

export interface OpenImageOptions {
  /** A format name as the user typed it (validated here: E_UNKNOWN_FORMAT). */
  format?: string;
  readOnly?: boolean;
  /** Open the backing chain too (default true). */
  openBacking?: boolean;
  /** How the image files do I/O (src/io/node-file.ts; default "auto"). */
  ioMode?: NodeFileIoMode;
  /** How writes to a writable raw image run, when they differ from ioMode (snapstack nbd). */
  rawWriteIoMode?: NodeFileIoMode;
}

/** Open an image and its backing chain (src/chain/open-image.ts). */
export async function openImage(path: string, options: OpenImageOptions = {}): Promise<BlockDevice> {
  const format = options.format === undefined ? undefined : parseImageFormat(options.format);
  const { ioMode, rawWriteIoMode } = options;
  const openFile = rawWriteIoMode === undefined || rawWriteIoMode === ioMode ? undefined : (layerPath: string, request: { readOnly: boolean }) => openRawWritesIn(layerPath, request.readOnly, format, ioMode, rawWriteIoMode);
  return openChain(path, { format, readOnly: options.readOnly, openBacking: options.openBacking, ioMode, openFile });
}

/** A layer's file; the writable one (the top), when raw, writes in `rawWriteIoMode`. */
async function openRawWritesIn(path: string, readOnly: boolean, format: ImageFormat | undefined, ioMode: NodeFileIoMode | undefined, rawWriteIoMode: NodeFileIoMode): Promise<ImageFile> {
  const file = await openNodeFile(path, { readOnly, ioMode });
  if (readOnly || (format ?? (await probeImageFormat(file))) !== "raw") return file;
  await file.close();
  return openNodeFile(path, { readOnly, ioMode, writeIoMode: rawWriteIoMode });
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
