/**
 * qemu-img check on a path: the qcow2 check (formats/qcow2/check.ts) after
 * a format probe, or "unsupported" for formats without a check (raw: qemu's
 * exit code 63).
 */
import { SnapstackError } from "../base/errors.ts";
import { checkQcow2, type Qcow2CheckResult, type Qcow2RepairMode } from "../formats/qcow2/check.ts";
import { openNodeFile } from "../io/node-file.ts";
import { refuseQemuLocked } from "./open-image.ts";
import { opensAsQcow2, parseImageFormat, probeFormatName, supportedProbedFormat } from "./image-format.ts";

export interface CheckImageOptions {
  format?: string;
  repair?: Qcow2RepairMode;
  /** Check an image a QEMU is writing (qemu-img -U; see OpenImageOptions.forceShare). */
  forceShare?: boolean;
}

/**
 * qemu-img check: the qcow2 check (src/formats/qcow2/check.ts), or
 * "unsupported" for formats without a check (raw, as qemu's exit 63).
 */
export async function checkImage(path: string, options: CheckImageOptions = {}): Promise<Qcow2CheckResult | "unsupported"> {
  const format = options.format === undefined ? undefined : parseImageFormat(options.format);
  const readOnly = options.repair === undefined;
  refuseQemuLocked(path, 0, path, readOnly, options.forceShare ?? false);
  const file = await openNodeFile(path, { readOnly });
  try {
    if (format === "raw") return "unsupported";
    const probed = await probeFormatName(file);
    if (format === undefined && supportedProbedFormat(probed, path) === "raw") return "unsupported";
    if (!opensAsQcow2(probed)) throw new SnapstackError("E_WRONG_FORMAT", `Could not open '${path}': Image is not in qcow2 format`, { path });
    return await checkQcow2(file, { repair: options.repair });
  } finally {
    await file.close();
  }
}
