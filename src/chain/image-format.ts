/**
 * Image formats snapstack opens, and format probing: a file starting with
 * the qcow2 magic "QFI\xfb" is qcow2, anything else is raw (QEMU's probe
 * also tries other formats; snapstack knows only these two).
 */
import { SnapstackError } from "../base/errors.ts";
import type { ImageFile } from "../io/file.ts";
import { QCOW2_MAGIC } from "../formats/qcow2/index.ts";

export type ImageFormat = "raw" | "qcow2";
export const IMAGE_FORMATS: readonly ImageFormat[] = ["raw", "qcow2"];

export function isImageFormat(name: string): name is ImageFormat {
  return (IMAGE_FORMATS as readonly string[]).includes(name);
}

/** Validate a user-given format name (qemu-img: "Unknown file format 'x'"). */
export function parseImageFormat(name: string): ImageFormat {
  if (!isImageFormat(name)) throw new SnapstackError("E_UNKNOWN_FORMAT", `Unknown file format '${name}'`, { format: name });
  return name;
}

export async function probeImageFormat(file: ImageFile): Promise<ImageFormat> {
  const magic = new Uint8Array(4);
  const got = await file.read(0, magic);
  if (got === 4 && new DataView(magic.buffer).getUint32(0) === QCOW2_MAGIC) return "qcow2";
  return "raw";
}
