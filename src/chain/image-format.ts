/**
 * Image formats snapstack opens, and format probing: a file starting with
 * the qcow2 magic "QFI\xfb" (version 2 or 3) is qcow2; one QEMU's vmdk, vpc,
 * vdi or vhdx probe takes is that format (read only: parseOutputFormat
 * refuses them as targets). A file that QEMU's probe would take for another
 * format (qed, parallels, ...) is
 * refused when no format is given, rather than opened as raw: as raw, a
 * write would land in that format's header and a read would show it as
 * guest data (qemu-img would open it as what it is). Anything else is raw.
 */
import { SnapstackError } from "../base/errors.ts";
import type { ImageFile } from "../io/file.ts";
import { QCOW2_MAGIC } from "../formats/qcow2/index.ts";
import { hasVdiSignature } from "../formats/vdi/vdi-format.ts";
import { hasVhdxSignature } from "../formats/vhdx/vhdx-format.ts";
import { hasFooterCookie } from "../formats/vpc/vpc-format.ts";

export type ImageFormat = "raw" | "qcow2" | "vmdk" | "vpc" | "vdi" | "vhdx";
export const IMAGE_FORMATS: readonly ImageFormat[] = ["raw", "qcow2", "vmdk", "vpc", "vdi", "vhdx"];
/** The formats snapstack writes; the others it reads only (formats/vmdk, vpc, vdi, vhdx). */
export type WritableFormat = "raw" | "qcow2";
export const WRITABLE_FORMATS: readonly WritableFormat[] = ["raw", "qcow2"];

export function isImageFormat(name: string): name is ImageFormat {
  return (IMAGE_FORMATS as readonly string[]).includes(name);
}

/** Validate a user-given format name (qemu-img: "Unknown file format 'x'"). */
export function parseImageFormat(name: string): ImageFormat {
  if (!isImageFormat(name)) throw new SnapstackError("E_UNKNOWN_FORMAT", `Unknown file format '${name}'`, { format: name });
  return name;
}

/** Whether snapstack writes images of `format` (raw, qcow2). */
export function isWritableFormat(format: string): format is WritableFormat {
  return (WRITABLE_FORMATS as readonly string[]).includes(format);
}

/**
 * A format to write (create, convert -O, dd -O, measure -O, a restore
 * target): a read-only one is refused with E_UNSUPPORTED_FEATURE.
 */
export function parseOutputFormat(name: string): WritableFormat {
  const format = parseImageFormat(name);
  if (!isWritableFormat(format)) {
    throw new SnapstackError("E_UNSUPPORTED_FEATURE", `snapstack reads ${format} images but does not write them (write qcow2 or raw)`, { format });
  }
  return format as WritableFormat;
}

/** Bytes probed at the start of a file (the signatures below all lie within them). */
const PROBE_BYTES = 512;

const ASCII = (text: string): Uint8Array => Uint8Array.from(text, (char) => char.charCodeAt(0));

/** `bytes` at `offset` of `head`. */
function has(head: Uint8Array, offset: number, bytes: Uint8Array): boolean {
  return head.length >= offset + bytes.length && bytes.every((byte, i) => head[offset + i] === byte);
}

function u32le(head: Uint8Array, offset: number): number | null {
  return head.length >= offset + 4 ? new DataView(head.buffer, head.byteOffset + offset, 4).getUint32(0, true) : null;
}

/** A C string field of `length` bytes at `offset` equals `text` (NUL-terminated within it). */
function cStringIs(head: Uint8Array, offset: number, length: number, text: string): boolean {
  return head.length >= offset + length && has(head, offset, ASCII(`${text}\0`));
}

/**
 * vmdk_probe for a text descriptor: comment lines and blank lines, then a
 * "version=1", "version=2" or "version=3" line.
 */
export function isVmdkDescriptor(head: Uint8Array): boolean {
  const text = String.fromCharCode(...head);
  for (let at = 0; at < text.length; ) {
    if (text[at] === "#") {
      const end = text.indexOf("\n", at);
      if (end < 0) return false;
      at = end + 1;
    } else if (text[at] === " ") {
      while (at < text.length && text[at] === " ") at++;
      if (text[at] === "\r") at++;
      if (at >= text.length || text[at] !== "\n") return false;
      at++;
    } else {
      return /^version=[123]\r?\n/.test(text.slice(at, at + 11));
    }
  }
  return false;
}

/** vmdk_probe: a sparse extent ("KDMV", or VMDK3's "COWD", which the vmdk open refuses) or a text descriptor. */
function isVmdk(head: Uint8Array): boolean {
  return has(head, 0, ASCII("KDMV")) || has(head, 0, ASCII("COWD")) || isVmdkDescriptor(head);
}

/** Formats QEMU's probes recognise (block/*.c *_probe: the same checks) and snapstack does not open. */
const FOREIGN_PROBES: ReadonlyArray<{ format: string; probe: (head: Uint8Array) => boolean }> = [
  { format: "qed", probe: (head) => u32le(head, 0) === 0x00444551 },
  {
    format: "parallels",
    probe: (head) => head.length >= 64 && (has(head, 0, ASCII("WithoutFreeSpace")) || has(head, 0, ASCII("WithouFreSpacExt"))) && u32le(head, 16) === 2,
  },
  {
    // Magic, type "Redolog", subtype "Growing", version 1 or 2.
    format: "bochs",
    probe: (head) =>
      cStringIs(head, 0, 32, "Bochs Virtual HD Image") &&
      cStringIs(head, 32, 16, "Redolog") &&
      cStringIs(head, 48, 16, "Growing") &&
      (u32le(head, 64) === 0x00020000 || u32le(head, 64) === 0x00010000),
  },
  { format: "cloop", probe: (head) => has(head, 0, ASCII("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")) },
  { format: "luks", probe: (head) => has(head, 0, Uint8Array.of(0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe, 0x00, 0x01)) },
];

/**
 * The format QEMU's probe picks for a file starting with `head`: "qcow2",
 * "raw", or the name of a format snapstack does not open ("qcow" for the
 * version 1 of the qcow magic).
 */
export function probedFormatName(head: Uint8Array): string {
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  if (head.length >= 8 && view.getUint32(0) === QCOW2_MAGIC) return view.getUint32(4) === 1 ? "qcow" : "qcow2";
  if (isVmdk(head)) return "vmdk";
  // vpc_probe: a dynamic VHD's footer copy (a fixed VHD has its footer at the end only: raw, as QEMU probes it).
  if (hasFooterCookie(head)) return "vpc";
  // vdi_probe: the signature after the text line (and a whole header).
  if (head.length >= 512 && hasVdiSignature(head)) return "vdi";
  if (hasVhdxSignature(head)) return "vhdx";
  return FOREIGN_PROBES.find((candidate) => candidate.probe(head))?.format ?? "raw";
}

/**
 * Whether -f qcow2 may go on with a file probed as `name`: qcow2, or the
 * qcow magic of version 1, whose refusal the qcow2 open words (it names
 * the version).
 */
export function opensAsQcow2(name: string): boolean {
  return name === "qcow2" || name === "qcow";
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
    `${path}: the file is a ${name} image, a format snapstack does not open (only qcow2, raw and, read-only, vmdk, vpc, vdi and vhdx; -f raw opens its bytes as a raw disk)`,
    { path, format: name },
  );
}

/** The format of a file when none is given: qcow2, vmdk, vpc, vdi, vhdx or raw, refusing formats snapstack does not open. */
export async function probeImageFormat(file: ImageFile, path: string): Promise<ImageFormat> {
  return supportedProbedFormat(await probeFormatName(file), path);
}
