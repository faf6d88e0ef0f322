/**
 * qemu-img amend for qcow2 (qcow2_amend_options), on an image opened
 * read-write: what it can change, in QEMU's order:
 * - compat=1.1 (or v3): a version 2 image becomes version 3;
 * - refcount_bits: every stored refcount rewritten at the new width
 *   (Qcow2Image.changeRefcountOrder); refused when one does not fit it,
 *   and for widths other than 16 on an image that ends at version 2;
 * - lazy_refcounts=on|off;
 * - size: a resize, shrinking included (amend needs no --shrink);
 * - compat=0.10 (or v2) on a version 3 image: zero clusters expanded, then
 *   version 2 (formats/qcow2/downgrade.ts).
 * Refused as in qemu-img 7.2: another backing file or format than the
 * image's ("Cannot amend the backing file"; rebase does that; the same
 * name and format is a no-op), creation-only options (cluster_size,
 * preallocation, extended_l2, compression_type, encryption, encrypt.*),
 * data_file and data_file_raw=on without an external data file
 * (data_file_raw=off is a no-op), a size (even the current one) for a v2
 * image with snapshots that compat=1.1 does not upgrade, lazy refcounts or
 * a refcount width other than 16 bits on an image that ends at version 2,
 * a downgrade that downgradeRefusal names, and other formats. Unlike
 * qemu-img, which checks some of these only after it has made the changes
 * before them, everything is checked before anything is written.
 */
import { SnapstackError } from "../base/errors.ts";
import { Qcow2Image, refcountBitsProblem } from "../formats/qcow2/index.ts";
import { parseImageFormat } from "./image-format.ts";
import { openImage } from "./open-image.ts";

/** Typed -o values (cli/create-options.ts checkCreateOptions). */
export type AmendOptions = Record<string, string | boolean | number>;

const CREATION_ONLY = ["cluster_size", "preallocation", "extended_l2", "compression_type", "encryption"];
/** qcow2's amend options for encrypted images (LUKS key slots), which snapstack does not open. */
const ENCRYPTION_AMEND_KEYS = ["encrypt.keyslot", "encrypt.new-secret", "encrypt.old-secret", "encrypt.state", "encrypt.iter-time"];

/** qemu-img parses the options against the format's amend options before it starts: creation-only ones are refused there. */
function refuseCreationOnly(path: string, options: AmendOptions): void {
  for (const key of Object.keys(options)) {
    if (CREATION_ONLY.includes(key) || (key.startsWith("encrypt.") && !ENCRYPTION_AMEND_KEYS.includes(key))) {
      throw invalid(`Invalid parameter '${key}': this option is only supported for image creation`, path);
    }
  }
}

function invalid(message: string, path: string): SnapstackError {
  return new SnapstackError("E_INVALID_OPTION", message, { path });
}

/** What the options ask for, checked against the image before any change. */
interface AmendPlan {
  version3: boolean;
  version2: boolean;
  lazyRefcounts?: boolean;
  refcountOrder?: number;
  sizeBytes?: number;
}

async function planAmend(image: Qcow2Image, path: string, options: AmendOptions): Promise<AmendPlan> {
  const info = image.info();
  for (const key of Object.keys(options)) {
    if (ENCRYPTION_AMEND_KEYS.includes(key)) throw invalid("Can't amend encryption options - encryption not present", path);
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
  let finalVersion = info.version;
  if (options.compat !== undefined) {
    const compat = String(options.compat);
    if (compat === "1.1" || compat === "v3") finalVersion = 3;
    else if (compat === "0.10" || compat === "v2") finalVersion = 2;
    else throw invalid(`Unknown compatibility level ${compat}`, path);
  }
  let refcountBits = info.refcountBits;
  if (options.refcount_bits !== undefined) {
    refcountBits = Number(options.refcount_bits);
    const problem = refcountBitsProblem(refcountBits);
    if (problem !== null) throw invalid(problem, path);
    if (refcountBits !== info.refcountBits && finalVersion < 3 && refcountBits !== 16) {
      throw invalid("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)", path);
    }
  }
  const lazyRefcounts = options.lazy_refcounts === undefined ? undefined : options.lazy_refcounts === true;
  // Checked only when it changes, as QEMU does. (On a version 2 image that stays one:
  // Qcow2Image.amendHeader refuses it before writing.)
  if (lazyRefcounts === true && !info.lazyRefcounts && finalVersion < 3 && info.version === 3) {
    throw invalid("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)", path);
  }
  // size=0 changes nothing, as in QEMU.
  const sizeBytes = options.size === undefined || Number(options.size) === 0 ? undefined : Number(options.size);
  if (sizeBytes !== undefined && sizeBytes % 512 !== 0) throw new SnapstackError("E_INVALID_SIZE", "The new size must be a multiple of 512", { path });
  // QEMU truncates even to the current size, and refuses that too on a v2 image with snapshots.
  if (sizeBytes !== undefined && info.version === 2 && finalVersion === 2 && image.snapshots.length > 0) {
    throw new SnapstackError("E_UNSUPPORTED_FEATURE", "Can't resize a v2 image which has snapshots", { path });
  }
  const refcountOrder = refcountBits === info.refcountBits ? undefined : Math.log2(refcountBits);
  if (refcountOrder !== undefined) {
    const refusal = await image.refcountOrderRefusal(refcountOrder);
    if (refusal !== null) throw invalid(refusal, path);
  }
  const version2 = finalVersion === 2 && info.version === 3;
  if (version2) {
    const refusal = await image.downgradeRefusal({ refcountBits, sizeBytes: sizeBytes ?? image.sizeBytes });
    if (refusal !== null) throw new SnapstackError("E_UNSUPPORTED_FEATURE", refusal, { path });
  }
  return {
    version3: finalVersion === 3 && info.version === 2,
    version2,
    lazyRefcounts,
    refcountOrder,
    sizeBytes,
  };
}

/**
 * What `amend -o help` checks before listing qcow2's options, as qemu-img:
 * a format given is checked by name alone; without one, the image at
 * `path` is opened (read-only here) and its format taken. Only qcow2 has
 * amendable options.
 */
export async function refuseUnamendableFormat(path: string, format: string | undefined): Promise<void> {
  let name: string;
  if (format !== undefined) name = parseImageFormat(format);
  else {
    const image = await openImage(path, { readOnly: true });
    name = image.format;
    await image.close();
  }
  if (name !== "qcow2") throw new SnapstackError("E_UNSUPPORTED_FEATURE", `Format driver '${name}' does not support option amendment`, { path });
}

/**
 * Amend the image at `path`. `onStart` is called once it is open and known
 * to be amendable, before any option is checked against it (where qemu-img
 * prints its first progress step).
 */
export async function amendImage(path: string, options: AmendOptions, settings: { format?: string; onStart?: () => void } = {}): Promise<void> {
  const format = settings.format === undefined ? undefined : parseImageFormat(settings.format);
  const image = await openImage(path, { format, readOnly: false });
  try {
    if (!(image instanceof Qcow2Image)) throw new SnapstackError("E_UNSUPPORTED_FEATURE", `Format driver '${image.format}' does not support option amendment`, { path });
    refuseCreationOnly(path, options);
    settings.onStart?.();
    const plan = await planAmend(image, path, options);
    // QEMU's order: upgrade, refcount width, lazy refcounts, size, downgrade.
    await image.amendHeader({ version3: plan.version3 });
    if (plan.refcountOrder !== undefined) await image.changeRefcountOrder(plan.refcountOrder);
    await image.amendHeader({ lazyRefcounts: plan.lazyRefcounts });
    if (plan.sizeBytes !== undefined && plan.sizeBytes !== image.sizeBytes) await image.resize(plan.sizeBytes, { shrink: true });
    // Last, as QEMU: the changes before may need version 3.
    if (plan.version2) await image.downgradeToVersion2();
    await image.flush();
  } finally {
    await image.close();
  }
}
