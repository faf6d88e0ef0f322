/**
 * qemu-img check on a path: the qcow2 check (formats/qcow2/check.ts) after
 * a format probe, a read-only format's own (ReadOnlyImage.check), or
 * "unsupported" for formats without a check (raw and vpc: qemu's exit code
 * 63).
 */
import { SnapstackError, isSnapstackError } from "../base/errors.ts";
import { readQcow2Header } from "../formats/qcow2/index.ts";
import type { ImageFile } from "../io/file.ts";
import { resolveBackingPath } from "./backing-path.ts";
import { checkQcow2, type Qcow2CheckResult, type Qcow2RepairMode } from "../formats/qcow2/check.ts";
import { openNodeFile } from "../io/node-file.ts";
import { lockLayerFile, lockedAccess, openImage, reasonAfterOpening } from "./open-image.ts";
import { lockBits } from "../io/qemu-locks.ts";
import { opensAsQcow2, parseImageFormat, probeFormatName, supportedProbedFormat, type ImageFormat } from "./image-format.ts";
import { ReadOnlyImage } from "../formats/read-only-image.ts";

/** A check's result and the format checked (qemu-img check's JSON names it). */
export type ImageCheckResult = Qcow2CheckResult & { format: ImageFormat };

export interface CheckImageOptions {
  format?: string;
  repair?: Qcow2RepairMode;
  /** Check an image another process is writing (qemu-img -U; see OpenImageOptions.forceShare). */
  forceShare?: boolean;
}

/** Failures to open a backing chain that qemu-img check meets too: the file is missing, locked, unreadable, or loops. */
const BACKING_OPEN_FAILURES: ReadonlySet<string> = new Set(["E_NOT_FOUND", "E_BACKING_MISSING", "E_IN_USE", "E_ACCESS", "E_BACKING_LOOP"]);

/**
 * qemu-img check opens the image with its backing chain, so a backing file
 * that does not open fails the check as it fails qemu-img's (exit 1; it
 * once reported a clean image). A header that does not decode is left to
 * the check, which reports it.
 */
async function refuseMissingBacking(path: string, file: ImageFile, forceShare: boolean): Promise<void> {
  let header;
  try {
    header = await readQcow2Header(file);
  } catch {
    return;
  }
  if (header.backingFileName === null || header.backingFileName === "") return;
  const backingPath = resolveBackingPath(path, header.backingFileName);
  try {
    await (await openImage(backingPath, { readOnly: true, format: header.backingFormat ?? undefined, forceShare })).close();
  } catch (error) {
    if (!isSnapstackError(error)) throw error;
    // Only what would stop QEMU too: a backing file it opens (another format, json:, a
    // protocol) that snapstack does not read leaves the top image's check as it was.
    if (!BACKING_OPEN_FAILURES.has(error.code)) return;
    // openImage names the chain it opened first; here that chain is one level down.
    throw new SnapstackError(error.code === "E_NOT_FOUND" ? "E_BACKING_MISSING" : error.code, `Could not open '${path}': Could not open backing file: ${reasonAfterOpening(error.message, backingPath)}`, { ...error.details, path });
  }
}

/**
 * qemu-img check: the qcow2 check (src/formats/qcow2/check.ts), a read-only
 * format's own (ReadOnlyImage.check), or "unsupported" for formats without
 * one (raw, vpc: qemu's exit 63) and for -r on a read-only format (QEMU's
 * vmdk, vdi and vhdx checks repair nothing).
 */
export async function checkImage(path: string, options: CheckImageOptions = {}): Promise<ImageCheckResult | "unsupported"> {
  const format = options.format === undefined ? undefined : parseImageFormat(options.format);
  const readOnly = options.repair === undefined;
  const forceShare = options.forceShare ?? false;
  const file = await openNodeFile(path, { readOnly });
  let checked: ImageFormat;
  try {
    if (format === "raw") return "unsupported";
    const probed = await probeFormatName(file);
    checked = format ?? supportedProbedFormat(probed, path);
    if (checked === "qcow2") {
      if (!opensAsQcow2(probed)) throw new SnapstackError("E_WRONG_FORMAT", `Could not open '${path}': Image is not in qcow2 format`, { path });
      lockLayerFile(file, path, 0, path, lockBits(lockedAccess(readOnly, forceShare)));
      await refuseMissingBacking(path, file, forceShare);
      return { ...(await checkQcow2(file, { repair: options.repair })), format: "qcow2" };
    }
  } finally {
    await file.close();
  }
  if (checked === "raw" || options.repair !== undefined) return "unsupported";
  const device = await openImage(path, { format: checked, readOnly: true, forceShare, check: true });
  try {
    const found = device instanceof ReadOnlyImage ? await device.check() : null;
    if (found === null) return "unsupported";
    return {
      format: checked,
      checkErrors: 0,
      corruptions: found.corruptions,
      leaks: 0,
      corruptionsFixed: 0,
      leaksFixed: 0,
      imageEndOffset: 0,
      totalClusters: 0,
      allocatedClusters: 0,
      fragmentedClusters: 0,
      compressedClusters: 0,
      messages: found.messages,
      failure: found.failure,
    };
  } finally {
    await device.close();
  }
}
