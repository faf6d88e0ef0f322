/**
 * Image formats snapstack opens, and format probing: a file starting with
 * the qcow2 magic "QFI\xfb" (version 2 or 3) is qcow2. A file that QEMU's
 * probe would take for another format (vmdk, vdi, vpc, vhdx, qed, ...) is
 * refused when no format is given, rather than opened as raw: as raw, a
 * write would land in that format's header and a read would show it as
 * guest data (qemu-img would open it as what it is). Anything else is raw.
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

/** Bytes probed at the start of a file (the signatures below all lie within them). */
const PROBE_BYTES = 512;

const ASCII = (text: string): Uint8Array => Uint8Array.from(text, (char) => char.charCodeAt(0));

/** Formats QEMU probes by a signature at a fixed offset (block/*.c *_probe), snapstack does not open. */
const FOREIGN_SIGNATURES: ReadonlyArray<{ format: string; offset: number; bytes: Uint8Array }> = [
  { format: "vmdk", offset: 0, bytes: ASCII("KDMV") },
  { format: "vmdk", offset: 0, bytes: ASCII("COWD") },
  { format: "vmdk", offset: 0, bytes: ASCII("# Disk DescriptorFile") },
  { format: "vdi", offset: 64, bytes: Uint8Array.of(0x7f, 0x10, 0xda, 0xbe) },
  { format: "vpc", offset: 0, bytes: ASCII("conectix") },
  { format: "vhdx", offset: 0, bytes: ASCII("vhdxfile") },
  { format: "qed", offset: 0, bytes: ASCII("QED\0") },
  { format: "parallels", offset: 0, bytes: ASCII("WithoutFreeSpace") },
  { format: "parallels", offset: 0, bytes: ASCII("WithouFreSpacExt") },
  { format: "bochs", offset: 0, bytes: ASCII("Bochs Virtual HD Image") },
  { format: "cloop", offset: 0, bytes: ASCII("#!/bin/sh\n#V2.0 Format\n") },
  { format: "luks", offset: 0, bytes: Uint8Array.of(0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe) },
];

/**
 * The format QEMU's probe picks for a file starting with `head`: "qcow2",
 * "raw", or the name of a format snapstack does not open ("qcow" for the
 * version 1 of the qcow magic).
 */
export function probedFormatName(head: Uint8Array): string {
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  if (head.length >= 8 && view.getUint32(0) === QCOW2_MAGIC) return view.getUint32(4) === 1 ? "qcow" : "qcow2";
  const at = (offset: number, bytes: Uint8Array): boolean => head.length >= offset + bytes.length && bytes.every((byte, i) => head[offset + i] === byte);
  return FOREIGN_SIGNATURES.find((signature) => at(signature.offset, signature.bytes))?.format ?? "raw";
}

/** probedFormatName of a file's first bytes. */
export async function probeFormatName(file: ImageFile): Promise<string> {
  const head = new Uint8Array(PROBE_BYTES);
  const got = await file.read(0, head);
  return probedFormatName(head.subarray(0, got));
}

/** A probed format name that snapstack opens, or the refusal naming it (`path` is the file probed). */
export function supportedProbedFormat(name: string, path: string): ImageFormat {
  if (isImageFormat(name)) return name;
  throw new SnapstackError(
    "E_UNKNOWN_FORMAT",
    `${path}: the file is a ${name} image, a format snapstack does not open (only qcow2 and raw; -f raw opens its bytes as a raw disk)`,
    { path, format: name },
  );
}

/** The format of a file when none is given: qcow2 or raw, refusing formats snapstack does not open. */
export async function probeImageFormat(file: ImageFile, path: string): Promise<ImageFormat> {
  return supportedProbedFormat(await probeFormatName(file), path);
}
