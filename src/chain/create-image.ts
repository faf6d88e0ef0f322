/**
 * qemu-img create for raw and qcow2.
 *
 * Design notes
 * - `options` are the `-o` keys (already typed by the CLI, or strings from
 *   a library caller): values are converted here and unknown keys refused
 *   with qemu-img's "Invalid parameter 'x'". Keys QEMU knows but snapstack
 *   does not implement (encryption, data_file) are E_UNSUPPORTED_FEATURE;
 *   host-file hints (nocow, extent_size_hint) are accepted and ignored.
 * - qemu-img 7.2 rules: a backing file needs a backing format; without a
 *   size the backing image's size is used; unless `unsafe` (-u) the backing
 *   image is opened (resolved relative to the new image, alone, read-only)
 *   to check it and to learn its size. An existing file is overwritten.
 */
import { dirname } from "node:path";
import { SnapstackError, isSnapstackError } from "../base/errors.ts";
import { parseSize } from "../base/units.ts";
import { createNodeFile, syncDirectory } from "../io/node-file.ts";
import { lockBits, lockImageFile } from "../io/qemu-locks.ts";
import { createQcow2, resolveQcow2CreateOptions, type Qcow2CreateOptions, type Qcow2Preallocation } from "../formats/qcow2/index.ts";
import { RAW_PREALLOCATION_MODES, createRaw, type RawPreallocation } from "../formats/raw/raw-image.ts";
import { parseImageFormat, parseOutputFormat } from "./image-format.ts";
import { lockLayerFile, openImage, reasonAfterOpening, type OpenImageFile } from "./open-image.ts";
import { resolveBackingPath } from "./backing-path.ts";
import { sameFile } from "../io/file-identity.ts";

export type CreateOptionValue = string | boolean | number;

export interface CreateImageOptions {
  format: string;
  sizeBytes?: number;
  backingFile?: string;
  backingFormat?: string;
  /** -u: do not open the backing file (then the size must be given). */
  unsafe?: boolean;
  /** `-o` keys: cluster_size, refcount_bits, lazy_refcounts, extended_l2, compression_type, preallocation, compat, backing_file, backing_fmt, size. */
  options?: Record<string, CreateOptionValue>;
  /** Opens and creates the files (default: NodeFile); crash tests pass FaultFiles. */
  openFile?: OpenImageFile;
  /**
   * Called once the backing file is checked and the size known, before the
   * format's own checks: where qemu-img prints its "Formatting" line.
   */
  onChecked?: (sizeBytes: number) => void;
}

const QCOW2_KEYS = ["size", "cluster_size", "refcount_bits", "lazy_refcounts", "extended_l2", "compression_type", "preallocation", "compat", "backing_file", "backing_fmt"];
const RAW_KEYS = ["size", "preallocation"];
/** Host-file options snapstack accepts and ignores (btrfs nocow, XFS extent size hint). */
const IGNORED_KEYS = ["nocow", "extent_size_hint"];
/** Options QEMU has that snapstack does not implement. */
const UNSUPPORTED_PREFIXES = ["encrypt", "data_file"];
/** Boolean options among those that snapstack accepts when they are off. */
const OFF_ACCEPTED_KEYS = ["encryption", "data_file_raw"];

/** "path: " before a message, or nothing when there is no file (measure --size). */
function subject(path: string): string {
  return path === "" ? "" : `${path}: `;
}

function invalid(path: string, message: string, details: Record<string, unknown> = {}): SnapstackError {
  return new SnapstackError("E_INVALID_OPTION", `${subject(path)}${message}`, { path, ...details });
}

function optionBool(path: string, key: string, value: CreateOptionValue): boolean {
  if (typeof value === "boolean") return value;
  if (value === "on") return true;
  if (value === "off") return false;
  throw invalid(path, `Parameter '${key}' expects 'on' or 'off'`, { key });
}

function optionSize(path: string, key: string, value: CreateOptionValue): number {
  if (typeof value === "number") return value;
  if (typeof value === "boolean") throw invalid(path, `Parameter '${key}' expects a size`, { key });
  return parseSize(value, { what: `parameter '${key}'` });
}

function optionNumber(path: string, key: string, value: CreateOptionValue): number {
  const number = typeof value === "number" ? value : Number(value);
  if (typeof value === "boolean" || !Number.isSafeInteger(number)) throw invalid(path, `Parameter '${key}' expects a number`, { key });
  return number;
}

function optionString(value: CreateOptionValue): string {
  return typeof value === "string" ? value : String(value);
}

/** Check keys against the format's list, in the order given. */
function checkKeys(path: string, format: string, options: Record<string, CreateOptionValue>): void {
  const known = format === "qcow2" ? QCOW2_KEYS : RAW_KEYS;
  for (const key of Object.keys(options)) {
    if (known.includes(key) || IGNORED_KEYS.includes(key)) continue;
    // Switched off, they ask for nothing snapstack lacks (scripts pass encryption=off explicitly).
    if (format === "qcow2" && OFF_ACCEPTED_KEYS.includes(key) && !optionBool(path, key, options[key])) continue;
    if (format === "qcow2" && UNSUPPORTED_PREFIXES.some((prefix) => key.startsWith(prefix))) {
      throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${subject(path)}option '${key}' is not supported by snapstack`, { path, key });
    }
    if (format === "raw" && (key === "backing_file" || key === "backing_fmt")) {
      throw invalid(path, "Backing file not supported for file format 'raw'");
    }
    throw invalid(path, `Invalid parameter '${key}'`, { key });
  }
}

function parseCompat(path: string, value: string): "0.10" | "1.1" {
  if (value === "0.10" || value === "v2") return "0.10";
  if (value === "1.1" || value === "v3") return "1.1";
  throw invalid(path, `Parameter 'version' does not accept value '${value}'`);
}

function parseCompressionType(path: string, value: string): "zlib" | "zstd" {
  if (value === "zlib" || value === "zstd") return value;
  throw invalid(path, `Parameter 'compression-type' does not accept value '${value}'`);
}

function parseQcow2Preallocation(path: string, value: string): Qcow2Preallocation {
  if (value === "off" || value === "metadata" || value === "falloc" || value === "full") return value;
  throw invalid(path, `Parameter 'preallocation' does not accept value '${value}'`);
}

function parseRawPreallocation(path: string, value: string): RawPreallocation {
  if ((RAW_PREALLOCATION_MODES as readonly string[]).includes(value)) return value as RawPreallocation;
  throw new SnapstackError("E_INVALID_OPTION", `${path}: Unsupported preallocation mode: ${value}`, { path });
}

/**
 * Open the backing image and its own chain, the backing for its metadata
 * only (qemu-img opens it without I/O), to check it and learn its size and
 * format; shared with a writer, as qemu-img create opens it (an overlay over
 * an image in use is a live snapshot's first step).
 */
async function openBackingForSize(path: string, backingFile: string, backingFormat: string | undefined, openFile: OpenImageFile | undefined): Promise<{ sizeBytes: number; format: string }> {
  const backingPath = resolveBackingPath(path, backingFile);
  let device;
  try {
    const format = backingFormat === undefined ? undefined : parseImageFormat(backingFormat);
    device = await openImage(backingPath, { format, readOnly: true, forceShare: true, openFile, metadataOnly: true });
  } catch (error) {
    if (!isSnapstackError(error)) throw error;
    const code = error.code === "E_NOT_FOUND" ? "E_BACKING_MISSING" : error.code;
    throw new SnapstackError(code, `${path}: ${reasonAfterOpening(error.message, backingPath)}\nCould not open backing image.`, { ...error.details, path, backingFile: backingPath });
  }
  try {
    return { sizeBytes: device.sizeBytes, format: device.format };
  } finally {
    await device.close();
  }
}

/**
 * What qemu-img create checks of a backing file before it prints its
 * "Formatting" line: a name, not the new image itself, a format, and
 * (without `unsafe`) that it opens. Resolves to the backing image's size
 * (undefined when `unsafe`).
 */
async function checkBackingForCreate(
  path: string,
  backingFile: string,
  backingFormat: string | undefined,
  settings: { unsafe?: boolean; openFile?: OpenImageFile } = {},
): Promise<number | undefined> {
  if (backingFile === "") throw invalid(path, "Expected backing file name, got empty string");
  // qemu-img compares the two names; the files are compared here, as the backing name resolves.
  if (sameFile(path, resolveBackingPath(path, backingFile))) {
    throw new SnapstackError("E_BACKING_LOOP", `${path}: Trying to create an image with the same filename as the backing file`, { path, backingFile });
  }
  const withoutFormat = (detected: string | null): SnapstackError =>
    new SnapstackError("E_BACKING_FORMAT", `${path}: Backing file specified without backing format${detected === null ? "" : `\nDetected format of ${detected}.`}`, { path, backingFile });
  if (settings.unsafe) {
    if (backingFormat === undefined) throw withoutFormat(null);
    return undefined;
  }
  // As bdrv_img_create: the backing chain is opened first, its format checked after.
  const backing = await openBackingForSize(path, backingFile, backingFormat, settings.openFile);
  if (backingFormat === undefined) throw withoutFormat(backing.format);
  return backing.sizeBytes;
}

export async function createImage(path: string, request: CreateImageOptions): Promise<void> {
  const format = parseOutputFormat(request.format);
  const options = request.options ?? {};
  const backingFile = request.backingFile ?? (options.backing_file !== undefined ? optionString(options.backing_file) : undefined);
  const backingFormat = request.backingFormat ?? (options.backing_fmt !== undefined ? optionString(options.backing_fmt) : undefined);
  if (format === "raw" && backingFile !== undefined) throw invalid(path, "Backing file not supported for file format 'raw'");
  let sizeBytes = request.sizeBytes ?? (options.size !== undefined ? optionSize(path, "size", options.size) : undefined);
  if (backingFile !== undefined) {
    const fromBacking = await checkBackingForCreate(path, backingFile, backingFormat, { unsafe: request.unsafe, openFile: request.openFile });
    sizeBytes ??= fromBacking;
  }
  if (sizeBytes === undefined) throw new SnapstackError("E_INVALID_SIZE", `${path}: Image creation needs a size parameter`, { path });
  request.onChecked?.(sizeBytes);
  checkKeys(path, format, options);
  if (backingFile === undefined && backingFormat !== undefined) {
    throw new SnapstackError("E_BACKING_FORMAT", `${path}: Backing format cannot be used without backing file`, { path });
  }
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0) throw new SnapstackError("E_INVALID_SIZE", `${path}: invalid image size ${sizeBytes}`, { path });

  // raw_co_create: an existing file is not truncated where another process's locks forbid it (as qemu-img decides); the locks are held until the image is made.
  const lock = lockImageFile(path, lockBits("create", { raw: format === "raw" }));
  if (typeof lock === "string") throw new SnapstackError("E_IN_USE", `${path}: ${lock}: is another process using the image [${path}]?`, { path });
  try {
    if (format === "raw") {
      const preallocation = options.preallocation === undefined ? "off" : parseRawPreallocation(path, optionString(options.preallocation));
      await createRaw(path, sizeBytes, { preallocation });
      return;
    }
    const qcow2 = qcow2CreateOptionsFromKeys(path, options, sizeBytes);
    if (backingFile !== undefined) qcow2.backingFile = backingFile;
    if (backingFormat !== undefined) qcow2.backingFormat = backingFormat;
    try {
      resolveQcow2CreateOptions(qcow2); // validate before touching the file
    } catch (error) {
      if (isSnapstackError(error)) throw new SnapstackError(error.code, `${path}: ${error.message}`, { ...error.details, path });
      throw error;
    }
    const file = request.openFile === undefined ? await createNodeFile(path) : await request.openFile(path, { readOnly: false, create: true });
    try {
      // A file that did not exist had no lock above: it has one while it is formatted.
      lockLayerFile(file, path, 0, path, lockBits("write"));
      await createQcow2(file, qcow2);
    } finally {
      await file.close();
    }
    await syncDirectory(dirname(path));
  } finally {
    lock.release();
  }
}

/**
 * The qcow2 `-o` keys (typed or strings) as the engine's create options;
 * shared by create and measure. `path` names the subject in messages.
 */
export function qcow2CreateOptionsFromKeys(path: string, options: Record<string, CreateOptionValue>, sizeBytes: number): Qcow2CreateOptions {
  checkKeys(path, "qcow2", options);
  const qcow2: Qcow2CreateOptions = { sizeBytes };
  if (options.cluster_size !== undefined) qcow2.clusterSizeBytes = optionSize(path, "cluster_size", options.cluster_size);
  if (options.refcount_bits !== undefined) qcow2.refcountBits = optionNumber(path, "refcount_bits", options.refcount_bits);
  if (options.lazy_refcounts !== undefined) qcow2.lazyRefcounts = optionBool(path, "lazy_refcounts", options.lazy_refcounts);
  if (options.extended_l2 !== undefined) qcow2.extendedL2 = optionBool(path, "extended_l2", options.extended_l2);
  if (options.compression_type !== undefined) qcow2.compressionType = parseCompressionType(path, optionString(options.compression_type));
  if (options.preallocation !== undefined) qcow2.preallocation = parseQcow2Preallocation(path, optionString(options.preallocation));
  if (options.compat !== undefined) qcow2.compat = parseCompat(path, optionString(options.compat));
  if (options.backing_file !== undefined) qcow2.backingFile = optionString(options.backing_file);
  if (options.backing_fmt !== undefined) qcow2.backingFormat = optionString(options.backing_fmt);
  return qcow2;
}
