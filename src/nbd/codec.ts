/**
 * Pure encoders and decoders for NBD messages (no I/O). Decoders of client
 * data return a result or an error string: the bytes are network input and
 * their faults are the client's, answered with ERR_INVALID, never thrown.
 *
 * 64-bit fields are handled as two u32 halves: offsets and sizes are below
 * 2^53, and a request offset whose high half is too large to be a safe
 * integer is still decoded (as an approximate double far past any export's
 * end), so range checks reject it without BigInt on the hot path.
 */
import { assert } from "../base/errors.ts";
import {
  EXPORT_NAME_PADDING_BYTES,
  EXPORT_NAME_REPLY_BYTES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  GREETING_BYTES,
  IHAVEOPT_HI,
  IHAVEOPT_LO,
  INFO_BLOCK_SIZE,
  INFO_EXPORT,
  NAME_BYTES_MAX,
  NBDMAGIC_HI,
  NBDMAGIC_LO,
  OPTION_REPLY_HEADER_BYTES,
  OPTION_REPLY_MAGIC_HI,
  OPTION_REPLY_MAGIC_LO,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_ERROR,
  REPLY_TYPE_ERROR_OFFSET,
  SIMPLE_REPLY_HEADER_BYTES,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_MAGIC,
} from "./protocol.ts";

const TWO_POW_32 = 4294967296;

/** Write a non-negative safe integer as a big-endian u64. */
export function writeU64(buffer: Buffer, value: number, at: number): void {
  assert(Number.isSafeInteger(value) && value >= 0, `u64 field ${value} is a non-negative safe integer`);
  buffer.writeUInt32BE(Math.floor(value / TWO_POW_32), at);
  buffer.writeUInt32BE(value >>> 0, at + 4);
}

/** Read a big-endian u64 as a number (exact below 2^53, approximate above). */
export function readU64(buffer: Uint8Array, at: number): number {
  const view = Buffer.isBuffer(buffer) ? buffer : Buffer.from(buffer.buffer, buffer.byteOffset, buffer.byteLength);
  return view.readUInt32BE(at) * TWO_POW_32 + view.readUInt32BE(at + 4);
}

/** Bytes of a UTF-8 string cut to at most maxBytes without splitting a character. */
export function truncateUtf8(text: string, maxBytes: number): Buffer {
  const bytes = Buffer.from(text, "utf8");
  if (bytes.length <= maxBytes) return bytes;
  let end = maxBytes;
  while (end > 0 && (bytes[end] & 0xc0) === 0x80) end--;
  return bytes.subarray(0, end);
}

/** A name shortened for messages (qemu's nbd_sanitize_name; CVE-2020-10761 was an over-long message). */
export function sanitizeName(name: string, maxChars = 80): string {
  let printable = "";
  for (const char of name) printable += char < " " || char === "\u007f" ? "?" : char;
  return printable.length <= maxChars ? printable : `${printable.slice(0, maxChars)}...`;
}

// ---- Handshake ----

/** The fixed newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE | NO_ZEROES. */
export function encodeGreeting(): Buffer {
  const buffer = Buffer.alloc(GREETING_BYTES);
  buffer.writeUInt32BE(NBDMAGIC_HI, 0);
  buffer.writeUInt32BE(NBDMAGIC_LO, 4);
  buffer.writeUInt32BE(IHAVEOPT_HI, 8);
  buffer.writeUInt32BE(IHAVEOPT_LO, 12);
  buffer.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  return buffer;
}

export function encodeOptionReply(option: number, replyType: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const buffer = Buffer.allocUnsafe(OPTION_REPLY_HEADER_BYTES + data.length);
  buffer.writeUInt32BE(OPTION_REPLY_MAGIC_HI, 0);
  buffer.writeUInt32BE(OPTION_REPLY_MAGIC_LO, 4);
  buffer.writeUInt32BE(option >>> 0, 8);
  buffer.writeUInt32BE(replyType >>> 0, 12);
  buffer.writeUInt32BE(data.length, 16);
  buffer.set(data, OPTION_REPLY_HEADER_BYTES);
  return buffer;
}

/** Reply to NBD_OPT_EXPORT_NAME: size, transmission flags and (without NO_ZEROES) 124 zero bytes. */
export function encodeExportNameReply(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const buffer = Buffer.alloc(EXPORT_NAME_REPLY_BYTES + (noZeroes ? 0 : EXPORT_NAME_PADDING_BYTES));
  writeU64(buffer, sizeBytes, 0);
  buffer.writeUInt16BE(transmissionFlags, 8);
  return buffer;
}

export function encodeInfoExport(sizeBytes: number, transmissionFlags: number): Buffer {
  const buffer = Buffer.allocUnsafe(12);
  buffer.writeUInt16BE(INFO_EXPORT, 0);
  writeU64(buffer, sizeBytes, 2);
  buffer.writeUInt16BE(transmissionFlags, 10);
  return buffer;
}

export function encodeInfoText(infoType: number, text: string): Buffer {
  const bytes = truncateUtf8(text, NAME_BYTES_MAX);
  const buffer = Buffer.allocUnsafe(2 + bytes.length);
  buffer.writeUInt16BE(infoType, 0);
  buffer.set(bytes, 2);
  return buffer;
}

export function encodeInfoBlockSize(minimumBytes: number, preferredBytes: number, maximumBytes: number): Buffer {
  const buffer = Buffer.allocUnsafe(14);
  buffer.writeUInt16BE(INFO_BLOCK_SIZE, 0);
  buffer.writeUInt32BE(minimumBytes, 2);
  buffer.writeUInt32BE(preferredBytes, 6);
  buffer.writeUInt32BE(maximumBytes, 10);
  return buffer;
}

/** NBD_REP_SERVER payload: name length, name, description. */
export function encodeServerEntry(name: string, description: string): Buffer {
  const nameBytes = Buffer.from(name, "utf8");
  const descriptionBytes = truncateUtf8(description, NAME_BYTES_MAX);
  const buffer = Buffer.allocUnsafe(4 + nameBytes.length + descriptionBytes.length);
  buffer.writeUInt32BE(nameBytes.length, 0);
  buffer.set(nameBytes, 4);
  buffer.set(descriptionBytes, 4 + nameBytes.length);
  return buffer;
}

export function encodeMetaContextEntry(contextId: number, name: string): Buffer {
  const nameBytes = Buffer.from(name, "utf8");
  const buffer = Buffer.allocUnsafe(4 + nameBytes.length);
  buffer.writeUInt32BE(contextId, 0);
  buffer.set(nameBytes, 4);
  return buffer;
}

export type Decoded<T> = { ok: true; value: T } | { ok: false; error: string };

function decodeName(data: Buffer, optionName: string): Decoded<{ name: string; end: number }> {
  if (data.length < 4) return { ok: false, error: `Inconsistent lengths in option ${optionName}` };
  const nameBytes = data.readUInt32BE(0);
  if (nameBytes > NAME_BYTES_MAX) return { ok: false, error: `Invalid name length: ${nameBytes}` };
  if (nameBytes > data.length - 4) return { ok: false, error: `Inconsistent lengths in option ${optionName}` };
  const raw = data.subarray(4, 4 + nameBytes);
  const name = raw.toString("utf8");
  if (raw.includes(0) || !Buffer.from(name, "utf8").equals(raw)) return { ok: false, error: "Export name is not valid UTF-8 or contains NUL" };
  return { ok: true, value: { name, end: 4 + nameBytes } };
}

export interface InfoRequest {
  name: string;
  infoTypes: number[];
}

/** NBD_OPT_INFO / NBD_OPT_GO data: name length u32, name, count u16, count x info type u16. */
export function decodeInfoRequest(data: Buffer, optionName: string): Decoded<InfoRequest> {
  if (data.length < 6) return { ok: false, error: `Inconsistent lengths in option ${optionName}` };
  const decodedName = decodeName(data, optionName);
  if (!decodedName.ok) return decodedName;
  const { name, end } = decodedName.value;
  if (data.length - end < 2) return { ok: false, error: `Inconsistent lengths in option ${optionName}` };
  const count = data.readUInt16BE(end);
  if (data.length !== end + 2 + 2 * count) return { ok: false, error: `Inconsistent lengths in option ${optionName}` };
  const infoTypes: number[] = [];
  for (let i = 0; i < count; i++) infoTypes.push(data.readUInt16BE(end + 2 + 2 * i));
  return { ok: true, value: { name, infoTypes } };
}

export interface MetaContextRequest {
  name: string;
  queries: string[];
}

/** NBD_OPT_LIST/SET_META_CONTEXT data: name length u32, name, count u32, count x (length u32, query). */
export function decodeMetaContextRequest(data: Buffer, optionName: string): Decoded<MetaContextRequest> {
  const decodedName = decodeName(data, optionName);
  if (!decodedName.ok) return decodedName;
  let at = decodedName.value.end;
  const inconsistent: Decoded<MetaContextRequest> = { ok: false, error: `Inconsistent lengths in option ${optionName}` };
  if (data.length - at < 4) return inconsistent;
  const count = data.readUInt32BE(at);
  at += 4;
  // Each query takes at least its 4-byte length: bound the count before looping.
  if (count > (data.length - at) / 4) return inconsistent;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (data.length - at < 4) return inconsistent;
    const queryBytes = data.readUInt32BE(at);
    at += 4;
    if (queryBytes > data.length - at) return inconsistent;
    if (queryBytes > NAME_BYTES_MAX) return { ok: false, error: `Invalid query length: ${queryBytes}` };
    queries.push(data.subarray(at, at + queryBytes).toString("utf8"));
    at += queryBytes;
  }
  if (at !== data.length) return inconsistent;
  return { ok: true, value: { name: decodedName.value.name, queries } };
}

// ---- Transmission ----

/** Write a simple reply header at `at`. */
export function writeSimpleReplyHeader(buffer: Buffer, at: number, errno: number, cookieHi: number, cookieLo: number): void {
  buffer.writeUInt32BE(SIMPLE_REPLY_MAGIC, at);
  buffer.writeUInt32BE(errno, at + 4);
  buffer.writeUInt32BE(cookieHi, at + 8);
  buffer.writeUInt32BE(cookieLo, at + 12);
}

export function encodeSimpleReply(errno: number, cookieHi: number, cookieLo: number): Buffer {
  const buffer = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_BYTES);
  writeSimpleReplyHeader(buffer, 0, errno, cookieHi, cookieLo);
  return buffer;
}

/** Write a structured reply chunk header at `at`. */
export function writeChunkHeader(buffer: Buffer, at: number, flags: number, chunkType: number, cookieHi: number, cookieLo: number, payloadBytes: number): void {
  buffer.writeUInt32BE(STRUCTURED_REPLY_MAGIC, at);
  buffer.writeUInt16BE(flags, at + 4);
  buffer.writeUInt16BE(chunkType, at + 6);
  buffer.writeUInt32BE(cookieHi, at + 8);
  buffer.writeUInt32BE(cookieLo, at + 12);
  buffer.writeUInt32BE(payloadBytes, at + 16);
}

export function encodeChunk(flags: number, chunkType: number, cookieHi: number, cookieLo: number, payload?: Uint8Array): Buffer {
  const payloadBytes = payload?.length ?? 0;
  const buffer = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + payloadBytes);
  writeChunkHeader(buffer, 0, flags, chunkType, cookieHi, cookieLo, payloadBytes);
  if (payload !== undefined) buffer.set(payload, STRUCTURED_REPLY_HEADER_BYTES);
  return buffer;
}

/** An ERROR chunk (or ERROR_OFFSET when errorOffset is given) with a bounded message. */
export function encodeErrorChunk(flags: number, cookieHi: number, cookieLo: number, errno: number, message: string, messageBytesMax: number, errorOffset?: number): Buffer {
  assert(errno !== 0, "an error chunk carries a non-zero errno");
  const text = truncateUtf8(message, messageBytesMax);
  const withOffset = errorOffset !== undefined;
  const payloadBytes = 6 + text.length + (withOffset ? 8 : 0);
  const buffer = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + payloadBytes);
  writeChunkHeader(buffer, 0, flags, withOffset ? REPLY_TYPE_ERROR_OFFSET : REPLY_TYPE_ERROR, cookieHi, cookieLo, payloadBytes);
  buffer.writeUInt32BE(errno, 20);
  buffer.writeUInt16BE(text.length, 24);
  buffer.set(text, 26);
  if (withOffset) writeU64(buffer, errorOffset, 26 + text.length);
  return buffer;
}

/** A BLOCK_STATUS chunk: context id, then (length, flags) pairs. */
export function encodeBlockStatusChunk(flags: number, cookieHi: number, cookieLo: number, contextId: number, lengths: readonly number[], values: readonly number[]): Buffer {
  assert(lengths.length === values.length && lengths.length > 0, "a block status chunk has at least one extent");
  const payloadBytes = 4 + 8 * lengths.length;
  const buffer = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + payloadBytes);
  writeChunkHeader(buffer, 0, flags, REPLY_TYPE_BLOCK_STATUS, cookieHi, cookieLo, payloadBytes);
  buffer.writeUInt32BE(contextId, 20);
  for (let i = 0; i < lengths.length; i++) {
    buffer.writeUInt32BE(lengths[i], 24 + 8 * i);
    buffer.writeUInt32BE(values[i] >>> 0, 28 + 8 * i);
  }
  return buffer;
}
