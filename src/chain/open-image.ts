/**
 * Opening an image with its backing chain.
 *
 * Design notes
 * - Two passes, no recursion, so chains thousands deep open in constant
 *   stack. Pass 1 walks down from the top: open the file (the top read-write
 *   unless readOnly, every backing file read-only, as QEMU does), pick the
 *   format (given, from the overlay's backing-format extension, or probed),
 *   read the qcow2 header for the next backing name, resolve it against the
 *   overlay's name (backing-path.ts). Pass 2 builds devices bottom-up, each
 *   qcow2 image taking ownership of the device below it, so closing the top
 *   closes the whole chain.
 * - Loops are detected by real path (E_BACKING_LOOP), depth is bounded by
 *   chainDepthMax (E_CHAIN_TOO_DEEP), a missing file below the top is
 *   E_BACKING_MISSING. Messages follow qemu-img's: each level adds
 *   "Could not open backing file: ".
 * - On any error, everything opened so far is closed: the highest built
 *   device (which closes those below it) and the files not yet built into a
 *   device.
 */
import { realpathSync } from "node:fs";
import { SnapstackError, fromSystemError, isSnapstackError } from "../base/errors.ts";
import type { BlockDevice } from "../device/block-device.ts";
import type { ImageFile } from "../io/file.ts";
import { NodeFile, openNodeFile, type NodeFileCacheMode, type NodeFileIoMode } from "../io/node-file.ts";
import { lockBits, lockImageFile, type LockBits, type LockContext, type LockedAccess } from "../io/qemu-locks.ts";
import { RawImage } from "../formats/raw/raw-image.ts";
import { openQcow2, readQcow2Header } from "../formats/qcow2/index.ts";
import { openVmdk } from "../formats/vmdk/vmdk-image.ts";
import { openVpc } from "../formats/vpc/vpc-image.ts";
import { openVdi } from "../formats/vdi/vdi-image.ts";
import { openVhdx } from "../formats/vhdx/vhdx-image.ts";
import { isImageFormat, isWritableFormat, opensAsQcow2, parseImageFormat, probeFormatName, supportedProbedFormat, type ImageFormat } from "./image-format.ts";
import { resolveBackingPath } from "./backing-path.ts";

/** How each read-only format opens a layer's file (a vmdk descriptor opens its extent files with `openFile`). */
const READ_ONLY_OPENERS: Record<
  Exclude<ImageFormat, "raw" | "qcow2">,
  (file: ImageFile, openFile: (path: string) => Promise<ImageFile>, settings: { check?: boolean }) => Promise<BlockDevice>
> = {
  vmdk: openVmdk,
  vpc: openVpc,
  vdi: openVdi,
  vhdx: (file, _openFile, settings) => openVhdx(file, settings),
};

/** Default bound on layers in a chain (top included); each layer costs one open file and its caches. */
export const CHAIN_DEPTH_MAX_DEFAULT = 1024;

export interface OpenImageOptions {
  /** Format of the top image ("raw" or "qcow2"; E_UNKNOWN_FORMAT otherwise); probed when absent. */
  format?: ImageFormat | string;
  /** Open the top read-only (backing files are always read-only). */
  readOnly?: boolean;
  /** Open the backing chain (default true); false leaves qcow2 unallocated ranges reading as zeroes, like qemu-img info. */
  openBacking?: boolean;
  /** Opened for `check` (QEMU's BDRV_O_CHECK): damage a format's open refuses, its check counts instead (vhdx's BAT). */
  check?: boolean;
  /** Most layers allowed, top included (default CHAIN_DEPTH_MAX_DEFAULT). */
  chainDepthMax?: number;
  /** Metadata cache bound per qcow2 layer. */
  cacheBytesMax?: number;
  ioMode?: NodeFileIoMode;
  /** How the top image's file writes, when it differs from ioMode (backing files are read-only). */
  writeIoMode?: NodeFileIoMode;
  /** Cache mode of the top image's file ("unsafe": flush does nothing, like qemu's -t unsafe). */
  cache?: NodeFileCacheMode;
  /** The top image's file allocates the range of each large write first (NodeFile's allocateLargeWrites): for a new file, written into holes. */
  allocateLargeWrites?: boolean;
  /** Opens each layer's file (default: a NodeFile with ioMode and cache); tests pass one that wraps files in a FaultFile. */
  openFile?: OpenImageFile;
  /**
   * Open a read-only top even while another process writes it, and let
   * others write it meanwhile (qemu-img -U). Without it, an image another
   * process's locks keep from this open is refused with E_IN_USE
   * (io/qemu-locks.ts); a read-write open is always checked.
   */
  forceShare?: boolean;
  /**
   * The image locks: what decides the top's besides its format and the
   * access (io/qemu-locks.ts LockContext: an NBD export's fixed size,
   * convert's stable source, resize's resizing); default {}. false takes
   * none, only where a parent process holds them for this one (an NBD
   * data worker).
   */
  locks?: false | TopLockContext;
  /** Open an encrypted qcow2 top, or one with an external data file, read-only for its metadata only (info; see OpenQcow2Options). */
  metadataOnly?: boolean;
}

/** How the chain code opens (or, with create, creates empty) the file at a path. */
export interface FileOpenRequest {
  readOnly: boolean;
  /** Create the file, or truncate it to zero bytes (read-write). */
  create?: boolean;
}

/**
 * The one injection point for files under the chain code and the jobs:
 * every image they open or create by path goes through it.
 */
export type OpenImageFile = (path: string, request: FileOpenRequest) => Promise<ImageFile>;

/** One layer found in pass 1. */
interface PendingLayer {
  path: string;
  file: ImageFile;
  format: ImageFormat;
}

/**
 * An open failure's message without the "Could not open 'PATH': " that
 * openImage puts first, for callers that open PATH as a backing file and
 * name it their own way (qemu-img names such a file once).
 */
export function reasonAfterOpening(message: string, path: string): string {
  const opening = `Could not open '${path}': `;
  return message.startsWith(opening) ? message.slice(opening.length) : message;
}

function backingPrefix(depth: number): string {
  return "Could not open backing file: ".repeat(depth);
}

function openFailure(topPath: string, depth: number, path: string, error: unknown): SnapstackError {
  const mapped = fromSystemError(error, path, "open");
  const sys = (error as NodeJS.ErrnoException)?.code;
  const reason = sys === "ENOENT" ? "No such file or directory" : sys === "EACCES" || sys === "EPERM" ? "Permission denied" : mapped.message;
  const message = `Could not open '${topPath}': ${backingPrefix(depth)}Could not open '${path}': ${reason}`;
  if (depth > 0 && mapped.code === "E_NOT_FOUND") {
    return new SnapstackError("E_BACKING_MISSING", message, { path: topPath, backingFile: path });
  }
  return new SnapstackError(mapped.code, message, { ...mapped.details, path });
}

/** What decides an image's locks besides its format (OpenImageOptions.locks). */
export type TopLockContext = Omit<LockContext, "raw">;

/** The access an open asks locks for: `forceShare` (-U) shares writing with others on a read-only open. */
export function lockedAccess(readOnly: boolean, forceShare: boolean): LockedAccess {
  return !readOnly ? "write" : forceShare ? "read-shared" : "read";
}

/**
 * Take QEMU's image locks for `bits` (io/qemu-locks.ts lockBits) on
 * `file`, the file of `layerPath` (the image `path` itself at depth 0,
 * else one of its backing files), held until it closes; E_IN_USE where
 * another process's locks forbid the open. A file of another kind than
 * NodeFile (a test's FaultFile) is only checked.
 */
export function lockLayerFile(file: ImageFile, path: string, depth: number, layerPath: string, bits: LockBits): void {
  let refusal: string | null;
  if (file instanceof NodeFile) {
    refusal = file.lockImage(bits);
  } else {
    const lock = lockImageFile(layerPath, bits);
    if (typeof lock === "string") {
      refusal = lock;
    } else {
      lock.release();
      refusal = null;
    }
  }
  if (refusal === null) return;
  throw new SnapstackError("E_IN_USE", `Could not open '${path}': ${backingPrefix(depth)}${refusal}: is another process using the image [${layerPath}]?`, {
    path,
    image: layerPath,
  });
}

/** Re-word an error from inside a layer with qemu-img's "Could not open 'top': ..." prefix. */
function layerFailure(topPath: string, depth: number, path: string, error: unknown): unknown {
  if (!isSnapstackError(error)) return error;
  let reason = error.message;
  if (reason.startsWith(`${path}: `)) reason = reason.slice(path.length + 2);
  return new SnapstackError(error.code, `Could not open '${topPath}': ${backingPrefix(depth)}${reason}`, { ...error.details, path });
}

export async function openImage(path: string, options: OpenImageOptions = {}): Promise<BlockDevice> {
  const chainDepthMax = options.chainDepthMax ?? CHAIN_DEPTH_MAX_DEFAULT;
  if (!Number.isSafeInteger(chainDepthMax) || chainDepthMax < 1) {
    throw new SnapstackError("E_INVALID_OPTION", `chain depth limit ${chainDepthMax} must be a positive integer`);
  }
  const openBacking = options.openBacking ?? true;
  const topFormat = options.format === undefined ? null : parseImageFormat(options.format);
  const pending: PendingLayer[] = [];
  const seenRealPaths = new Set<string>();
  let built: BlockDevice | null = null;
  let builtCount = 0;
  try {
    // Pass 1: walk down the chain.
    let layerPath: string | null = path;
    let requestedFormat: string | null = topFormat;
    while (layerPath !== null) {
      const depth = pending.length;
      if (depth >= chainDepthMax) {
        throw new SnapstackError("E_CHAIN_TOO_DEEP", `Could not open '${path}': backing chain is deeper than ${chainDepthMax} images (at '${layerPath}')`, {
          path,
          chainDepthMax,
        });
      }
      let realPath: string;
      try {
        realPath = realpathSync.native(layerPath);
      } catch (error) {
        throw openFailure(path, depth, layerPath, error);
      }
      if (seenRealPaths.has(realPath)) {
        throw new SnapstackError("E_BACKING_LOOP", `Backing file '${layerPath}' creates an infinite loop.`, { path, backingFile: layerPath });
      }
      seenRealPaths.add(realPath);
      const readOnly = depth > 0 || (options.readOnly ?? false);
      let file: ImageFile;
      try {
        file =
          options.openFile === undefined
            ? await openNodeFile(layerPath, {
                readOnly,
                ioMode: options.ioMode,
                writeIoMode: options.writeIoMode,
                cache: depth === 0 ? options.cache : undefined,
                allocateLargeWrites: depth === 0 && options.allocateLargeWrites === true,
              })
            : await options.openFile(layerPath, { readOnly });
      } catch (error) {
        throw openFailure(path, depth, layerPath, error);
      }
      const layer: PendingLayer = { path: layerPath, file, format: "raw" };
      pending.push(layer);
      const probed = await probeFormatName(file);
      if (requestedFormat !== null && !isImageFormat(requestedFormat)) {
        throw new SnapstackError("E_BACKING_FORMAT", `Could not open '${path}': ${backingPrefix(depth)}Unknown driver '${requestedFormat}'`, {
          path,
          backingFile: layerPath,
          format: requestedFormat,
        });
      }
      layer.format = (requestedFormat as ImageFormat | null) ?? supportedProbedFormat(probed, layerPath);
      if (layer.format === "qcow2" && !opensAsQcow2(probed)) {
        throw new SnapstackError("E_WRONG_FORMAT", `Could not open '${path}': ${backingPrefix(depth)}Image is not in qcow2 format`, { path: layerPath });
      }
      if (!isWritableFormat(layer.format) && !readOnly) {
        throw new SnapstackError("E_READ_ONLY", `Could not open '${path}': snapstack opens ${layer.format} images read-only (convert it to qcow2 to write)`, { path: layerPath });
      }
      // Locked once the format is known (its locks depend on it), before anything is written.
      if (options.locks !== false) {
        const context = { ...(depth === 0 ? options.locks : undefined), raw: layer.format === "raw" };
        lockLayerFile(file, path, depth, layerPath, lockBits(lockedAccess(readOnly, options.forceShare ?? false), context));
      }
      layerPath = null;
      if (layer.format === "qcow2" && openBacking) {
        let header;
        try {
          header = await readQcow2Header(file);
        } catch (error) {
          throw layerFailure(path, depth, layer.path, error);
        }
        if (header.backingFileName !== null && header.backingFileName !== "") {
          layerPath = resolveBackingPath(layer.path, header.backingFileName);
          requestedFormat = header.backingFormat;
        }
      }
    }
    // Pass 2: build devices bottom-up.
    for (let i = pending.length - 1; i >= 0; i--) {
      const layer = pending[i];
      try {
        if (layer.format === "raw") {
          built = new RawImage(layer.file, await layer.file.sizeBytes());
        } else if (layer.format !== "qcow2") {
          built = await READ_ONLY_OPENERS[layer.format](
            layer.file,
            (extentPath) => (options.openFile === undefined ? openNodeFile(extentPath, { readOnly: true }) : options.openFile(extentPath, { readOnly: true })),
            { check: options.check === true && i === 0 },
          );
        } else {
          const readOnly = i > 0 || (options.readOnly ?? false);
          built = await openQcow2(layer.file, { readOnly, backing: built, cacheBytesMax: options.cacheBytesMax, closeBacking: true, metadataOnly: options.metadataOnly === true && i === 0 });
        }
      } catch (error) {
        throw layerFailure(path, i, layer.path, error);
      }
      builtCount++;
    }
    return built!;
  } catch (error) {
    // Files of layers above the highest built device are still ours to close.
    for (let i = 0; i < pending.length - builtCount; i++) await pending[i].file.close().catch(() => {});
    if (built !== null) await built.close().catch(() => {});
    throw error;
  }
}

/** The layers of a chain, top first. */
export function chainLayers(device: BlockDevice): BlockDevice[] {
  const layers: BlockDevice[] = [];
  for (let layer: BlockDevice | null = device; layer !== null; layer = layer.backing) layers.push(layer);
  return layers;
}
