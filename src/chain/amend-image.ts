/**
 * qemu-img amend for qcow2 (qcow2_amend_options), on an image opened
 * read-write: what it can change, in QEMU's order:
 * - compat=1.1 (or v3): a version 2 image becomes version 3;
 * - lazy_refcounts=on|off;
 * - refcount_bits: the current width only (QEMU rewrites every refcount
 *   structure for another; not done here: E_UNSUPPORTED_FEATURE);
 * - size: a resize, shrinking included (amend needs no --shrink);
 * - compat=0.10 on a version 3 image (a downgrade: QEMU writes out every
 *   zero cluster first): E_UNSUPPORTED_FEATURE.
 * Refused as in qemu-img 7.2: another backing file or format than the
 * image's ("Cannot amend the backing file"; rebase does that; the same
 * name and format is a no-op), creation-only options (cluster_size,
 * preallocation, extended_l2, compression_type, encryption, encrypt.*),
 * data_file and data_file_raw=on without an external data file
 * (data_file_raw=off is a no-op), a size (even the current one) for a v2
 * image with snapshots that compat=1.1 does not upgrade, and other
 * formats. Options are checked before anything is written.
 */
import { SnapstackError } from "../base/errors.ts";
import { Qcow2Image, refcountBitsProblem } from "../formats/qcow2/index.ts";
import { parseImageFormat } from "./image-format.ts";
import { openImage } from "./open-image.ts";

/** Typed -o values (cli/create-options.ts checkCreateOptions). */
export type AmendOptions = Record<string, string | boolean | number>;

const CREATION_ONLY = ["cluster_size", "preallocation", "extended_l2", "compression_type", "encryption"];

function invalid(message: string, path: string): SnapstackError {
  return new SnapstackError("E_INVALID_OPTION", message, { path });
}

/** What the options ask for, checked against the image before any change. */
function planAmend(image: Qcow2Image, path: string, options: AmendOptions): { version3: boolean; lazyRefcounts?: boolean; sizeBytes?: number } {
  const info = image.info();
  for (const key of Object.keys(options)) {
    if (CREATION_ONLY.includes(key) || key.startsWith("encrypt.")) throw invalid(`Invalid parameter '${key}': this option is only supported for image creation`, path);
    if (key === "data_file") throw invalid("data-file can only be set for images that use an external data file", path);
    if (key === "data_file_raw" && options.data_file_raw === true) throw invalid("data-file-raw cannot be set on existing images", path);
  }
  // qcow2_amend_options: both must be what the image has (a missing one is null), else refused.
  if (options.backing_file !== undefined || options.backing_fmt !== undefined) {
    const asked = (value: unknown): string | null => (value === undefined ? null : String(value));
    if (asked(options.backing_file) !== info.backingFileName || asked(options.backing_fmt) !== info.backingFormat) {
      throw new SnapstackError("E_UNSUPPORTED_FEATURE", "Cannot amend the backing file; you can use 'qemu-img rebase' (snapstack img rebase) instead", { path });
    }
  }
  let version3 = false;
  if (options.compat !== undefined) {
    const compat = String(options.compat);
    if (compat === "1.1" || compat === "v3") version3 = info.version === 2;
    else if (compat === "0.10" || compat === "v2") {
      if (info.version === 3) throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${path}: downgrading to compat=0.10 is not supported`, { path });
    } else throw invalid(`Unknown compatibility level ${compat}`, path);
  }
  if (options.refcount_bits !== undefined) {
    const bits = Number(options.refcount_bits);
    const problem = refcountBitsProblem(bits);
    if (problem !== null) throw invalid(problem, path);
    if (bits !== info.refcountBits) throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${path}: changing refcount_bits (${info.refcountBits} to ${bits}) is not supported`, { path });
  }
  // (lazy_refcounts=on on a version 2 image: Qcow2Image.amendHeader refuses it before writing.)
  const lazyRefcounts = options.lazy_refcounts === undefined ? undefined : options.lazy_refcounts === true;
  // size=0 changes nothing, as in QEMU.
  const sizeBytes = options.size === undefined || Number(options.size) === 0 ? undefined : Number(options.size);
  if (sizeBytes !== undefined && sizeBytes % 512 !== 0) throw new SnapstackError("E_INVALID_SIZE", "The new size must be a multiple of 512", { path });
  // QEMU truncates even to the current size, and refuses that too on a v2 image with snapshots.
  if (sizeBytes !== undefined && info.version === 2 && !version3 && image.snapshots.length > 0) {
    throw new SnapstackError("E_UNSUPPORTED_FEATURE", "Can't resize a v2 image which has snapshots", { path });
  }
  return { version3, lazyRefcounts, sizeBytes };
}

export async function amendImage(path: string, options: AmendOptions, settings: { format?: string } = {}): Promise<void> {
  const format = settings.format === undefined ? undefined : parseImageFormat(settings.format);
  const image = await openImage(path, { format, readOnly: false });
  try {
    if (!(image instanceof Qcow2Image)) throw new SnapstackError("E_UNSUPPORTED_FEATURE", `Format driver '${image.format}' does not support option amendment`, { path });
    const plan = planAmend(image, path, options);
    await image.amendHeader({ version3: plan.version3, lazyRefcounts: plan.lazyRefcounts });
    if (plan.sizeBytes !== undefined && plan.sizeBytes !== image.sizeBytes) await image.resize(plan.sizeBytes, { shrink: true });
    await image.flush();
  } finally {
    await image.close();
  }
}
