/**
 * qemu-img resize for raw and qcow2: an absolute size or a change
 * (+N / -N from the current virtual size). Shrinking needs `shrink`
 * (qemu-img: "Use the --shrink option to perform a shrink operation.").
 * Raw files are truncated to exactly the new size (the virtual size is that
 * rounded up to 512, as QEMU reports it); qcow2 sizes must be multiples of
 * 512. Preallocation of the new area: every mode; for qcow2, falloc and
 * full only from a size that is a multiple of the cluster size and not over
 * a longer backing file.
 */
import { SnapstackError } from "../base/errors.ts";
import { SIZE_MAX_BYTES } from "../base/units.ts";
import { QCOW2_PREALLOCATION_MODES, Qcow2Image } from "../formats/qcow2/index.ts";
import { RAW_PREALLOCATION_MODES, RawImage, type RawPreallocation } from "../formats/raw/raw-image.ts";
import { parseImageFormat } from "./image-format.ts";
import { openImage } from "./open-image.ts";

/** An absolute size or a change ("+1G" / "-512M"). */
export type SizeSpec = { absoluteBytes: number } | { deltaBytes: number };

export interface ResizeImageOptions {
  format?: string;
  shrink?: boolean;
  preallocation?: string;
}

export async function resizeImage(path: string, size: SizeSpec, options: ResizeImageOptions = {}): Promise<void> {
  const format = options.format === undefined ? undefined : parseImageFormat(options.format);
  const preallocation = options.preallocation ?? "off";
  // qemu-img's modes (qcow2 takes them all), known before anything is opened (a format may still not support one).
  if (!QCOW2_PREALLOCATION_MODES.includes(preallocation)) throw new SnapstackError("E_INVALID_OPTION", `Invalid preallocation mode '${preallocation}'`, { path });
  const device = await openImage(path, { format, readOnly: false, locks: { resize: true } });
  try {
    const newSizeBytes = "absoluteBytes" in size ? size.absoluteBytes : device.sizeBytes + size.deltaBytes;
    if (newSizeBytes > SIZE_MAX_BYTES) {
      // +SIZE past the limit: the same refusal as an absolute size there (parseSize).
      const exactBytes = "absoluteBytes" in size ? BigInt(size.absoluteBytes) : BigInt(device.sizeBytes) + BigInt(size.deltaBytes);
      throw new SnapstackError("E_TOO_LARGE", `image size ${exactBytes} exceeds snapstack's limit of ${SIZE_MAX_BYTES} bytes (8 PiB)`, { path });
    }
    if (!Number.isSafeInteger(newSizeBytes) || newSizeBytes <= 0) {
      throw new SnapstackError("E_INVALID_SIZE", "New image size must be positive", { path, newSizeBytes });
    }
    // qemu-img checks the preallocation first: a shrink with one says so, --shrink or not.
    if (newSizeBytes <= device.sizeBytes && preallocation !== "off") {
      throw new SnapstackError("E_INVALID_OPTION", "Preallocation can only be used for growing images", { path, newSizeBytes });
    }
    if (newSizeBytes < device.sizeBytes && !options.shrink) {
      throw new SnapstackError("E_INVALID_SIZE", "Use the --shrink option to perform a shrink operation.", { path, newSizeBytes });
    }
    if (device instanceof RawImage) {
      if (!(RAW_PREALLOCATION_MODES as readonly string[]).includes(preallocation)) {
        throw new SnapstackError("E_INVALID_OPTION", `Unsupported preallocation mode: ${preallocation}`, { path });
      }
      await device.resize(newSizeBytes, { preallocation: preallocation as RawPreallocation });
    } else if (device instanceof Qcow2Image) {
      const oldSizeBytes = device.sizeBytes;
      const growth = newSizeBytes - oldSizeBytes;
      const dataPreallocation = growth > 0 && (preallocation === "falloc" || preallocation === "full");
      // Not done: QEMU moves a partial last cluster to a new one, copying its head, and over a longer
      // backing file it marks the new subclusters allocated so that they read as zeroes.
      if (dataPreallocation && (oldSizeBytes % device.clusterSizeBytes !== 0 || (device.backing !== null && device.backing.sizeBytes > oldSizeBytes))) {
        throw new SnapstackError(
          "E_UNSUPPORTED_FEATURE",
          `${path}: resize with preallocation=${preallocation} is supported from a size that is a multiple of the cluster size, not over a longer backing file`,
          { path },
        );
      }
      await device.resize(newSizeBytes, { shrink: options.shrink ?? false });
      // qcow2_co_truncate: preallocate the new area. QEMU sets the new size only once that is
      // done; here the size is set first, so a preallocation that fails (a full disk) shrinks
      // the image back: the command fails with the old size (data clusters full/falloc had
      // allocated but not yet mapped stay leaked; docs/cli/resize.md).
      try {
        if (growth > 0 && preallocation === "metadata") await device.preallocateMetadata(oldSizeBytes, growth);
        if (dataPreallocation) await device.preallocateData(oldSizeBytes, growth, preallocation === "full");
      } catch (error) {
        await device.resize(oldSizeBytes, { shrink: true }).catch(() => {});
        throw error;
      }
    } else {
      throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${path}: cannot resize format ${device.format}`, { path });
    }
    await device.flush();
  } finally {
    await device.close();
  }
}
