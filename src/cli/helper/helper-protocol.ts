/**
 * The byte protocol between `snapstack-img` (native/img-client.c) and a
 * resident `snapstack helper` on its Unix socket. Pure codecs: no I/O.
 *
 * Design notes
 * - One request per connection, from the client: a 32-bit little-endian
 *   length, then that many bytes of NUL-terminated fields:
 *   HELPER_PROTOCOL, the umask (decimal), the working directory, the
 *   argument count (decimal) and the arguments (the first is always
 *   "img"), the environment count (decimal) and the `NAME=value` entries.
 *   NUL-terminated fields because the client is C and arguments and
 *   environment entries cannot hold a NUL; bytes are decoded as UTF-8, as
 *   Node decodes process.argv.
 * - Then frames from the helper, each a kind byte, a 32-bit little-endian
 *   length and the payload:
 *   - REFUSED (before STARTED only): the helper will not run this command
 *     (a reason follows); the client runs it itself, as if no helper were
 *     listening. Nothing of the command has run.
 *   - STARTED: the command is running (the payload: the helper's pid, for
 *     the log; the client takes the pid it signals from SO_PEERCRED); from
 *     here the client must not run it again (it may have changed images).
 *   - STDOUT / STDERR: bytes the command wrote, in order.
 *   - EXIT: the command's exit status (decimal); the last frame.
 *   A connection that ends after STARTED without EXIT is a command that
 *   did not finish (the helper was killed): the client reports E_ABORTED.
 *   The client keeps its side of the connection open until EXIT: closing
 *   it means it went away.
 * - Limits: a request is at most REQUEST_BYTES_MAX bytes (the length is
 *   checked before anything is buffered) and at most FIELDS_MAX
 *   arguments and environment entries together; a frame's payload at most
 *   FRAME_PAYLOAD_BYTES_MAX (longer output is cut into several frames).
 */
import { SnapstackError } from "../../base/errors.ts";

export const HELPER_PROTOCOL = "snapstack-helper/1";
/** Largest request: ARG_MAX on Linux is 2 MiB for arguments and environment together; a request beyond 4 MiB is not a command line. */
export const REQUEST_BYTES_MAX = 4 * 1024 * 1024;
/** Most arguments plus environment entries in one request. */
export const FIELDS_MAX = 65536;
/** Largest frame payload (the client reads frames in pieces; this bounds the helper's frames, not memory). */
export const FRAME_PAYLOAD_BYTES_MAX = 1024 * 1024;

export const FRAME_KIND = { refused: 0x52, started: 0x53, stdout: 0x4f, stderr: 0x45, exit: 0x58 } as const;
export type FrameKind = keyof typeof FRAME_KIND;
const KIND_NAMES = new Map<number, FrameKind>(Object.entries(FRAME_KIND).map(([name, byte]) => [byte, name as FrameKind]));

export const FRAME_HEADER_BYTES = 5;
const LENGTH_BYTES = 4;

export interface HelperRequest {
  umask: number;
  cwd: string;
  argv: string[];
  env: Record<string, string>;
}

function bad(message: string): SnapstackError {
  return new SnapstackError("E_USAGE", `helper request: ${message}`);
}

function decimalField(text: string, what: string, max: number): number {
  if (!/^[0-9]{1,10}$/.test(text)) throw bad(`${what} '${text.slice(0, 20)}' is not a decimal number`);
  const value = Number(text);
  if (value > max) throw bad(`${what} ${value} is above ${max}`);
  return value;
}

/** Encode a request (the client's side; tests and any client in JavaScript). */
export function encodeHelperRequest(request: HelperRequest): Buffer {
  const envEntries = Object.entries(request.env).map(([name, value]) => `${name}=${value}`);
  const fields = [HELPER_PROTOCOL, String(request.umask), request.cwd, String(request.argv.length), ...request.argv, String(envEntries.length), ...envEntries];
  for (const field of fields) if (field.includes("\0")) throw bad("a field holds a NUL byte");
  const body = Buffer.from(fields.map((field) => `${field}\0`).join(""), "utf8");
  if (body.length > REQUEST_BYTES_MAX) throw bad(`${body.length} bytes, more than ${REQUEST_BYTES_MAX}`);
  const length = Buffer.alloc(LENGTH_BYTES);
  length.writeUInt32LE(body.length);
  return Buffer.concat([length, body]);
}

/** Decode a request body (without its length prefix); throws E_USAGE naming what is wrong. */
export function decodeHelperRequest(body: Uint8Array): HelperRequest {
  if (body.length === 0 || body[body.length - 1] !== 0) throw bad("the last field is not NUL-terminated");
  const fields = Buffer.from(body.buffer, body.byteOffset, body.byteLength).toString("utf8", 0, body.length - 1).split("\0");
  let at = 0;
  const next = (what: string): string => {
    if (at >= fields.length) throw bad(`ends before ${what}`);
    return fields[at++];
  };
  const protocol = next("the protocol name");
  if (protocol !== HELPER_PROTOCOL) throw bad(`protocol '${protocol.slice(0, 40)}', expected '${HELPER_PROTOCOL}'`);
  const umask = decimalField(next("the umask"), "umask", 0o777);
  const cwd = next("the working directory");
  if (!cwd.startsWith("/")) throw bad(`working directory '${cwd.slice(0, 80)}' is not absolute`);
  const argc = decimalField(next("the argument count"), "argument count", FIELDS_MAX);
  const argv: string[] = [];
  for (let i = 0; i < argc; i++) argv.push(next(`argument ${i + 1} of ${argc}`));
  const envCount = decimalField(next("the environment count"), "environment count", FIELDS_MAX - argc);
  const env: Record<string, string> = {};
  for (let i = 0; i < envCount; i++) {
    const entry = next(`environment entry ${i + 1} of ${envCount}`);
    const equals = entry.indexOf("=");
    // Entries without '=' (possible in a C environ) are not variables: skipped, as Node's process.env skips them.
    if (equals > 0) env[entry.slice(0, equals)] = entry.slice(equals + 1);
  }
  if (at !== fields.length) throw bad(`${fields.length - at} fields after the environment`);
  return { umask, cwd, argv, env };
}

/**
 * Push parser for the request: feed() chunks as they arrive; returns the
 * request once it is complete, null while more is needed. Checks the length
 * before buffering.
 */
export class HelperRequestReader {
  #chunks: Buffer[] = [];
  #bufferedBytes = 0;
  #bodyBytes: number | null = null;

  /** Bytes the client sent after its request (none are expected). */
  extraBytes = 0;

  feed(chunk: Uint8Array): HelperRequest | null {
    this.#chunks.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
    this.#bufferedBytes += chunk.length;
    if (this.#bodyBytes === null) {
      if (this.#bufferedBytes < LENGTH_BYTES) return null;
      const joined = Buffer.concat(this.#chunks);
      this.#chunks = [joined];
      const bodyBytes = joined.readUInt32LE(0);
      if (bodyBytes > REQUEST_BYTES_MAX) throw bad(`${bodyBytes} bytes announced, more than ${REQUEST_BYTES_MAX}`);
      this.#bodyBytes = bodyBytes;
    }
    const total = LENGTH_BYTES + this.#bodyBytes;
    if (this.#bufferedBytes < total) return null;
    const joined = Buffer.concat(this.#chunks);
    this.extraBytes = joined.length - total;
    this.#chunks = [];
    return decodeHelperRequest(joined.subarray(LENGTH_BYTES, total));
  }
}

/** Encode frames of one kind; a payload above FRAME_PAYLOAD_BYTES_MAX becomes several frames. */
export function encodeFrames(kind: FrameKind, payload: string | Uint8Array): Buffer {
  const bytes = typeof payload === "string" ? Buffer.from(payload, "utf8") : Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
  const pieces: Buffer[] = [];
  let at = 0;
  do {
    const length = Math.min(FRAME_PAYLOAD_BYTES_MAX, bytes.length - at);
    const header = Buffer.alloc(FRAME_HEADER_BYTES);
    header[0] = FRAME_KIND[kind];
    header.writeUInt32LE(length, 1);
    pieces.push(header, bytes.subarray(at, at + length));
    at += length;
  } while (at < bytes.length);
  return Buffer.concat(pieces);
}

export interface HelperFrame {
  kind: FrameKind;
  payload: Buffer;
}

/** Push parser for frames (the client's side; tests). */
export class HelperFrameReader {
  #pending: Buffer = Buffer.alloc(0);

  feed(chunk: Uint8Array): HelperFrame[] {
    this.#pending = Buffer.concat([this.#pending, chunk]);
    const frames: HelperFrame[] = [];
    while (this.#pending.length >= FRAME_HEADER_BYTES) {
      const kind = KIND_NAMES.get(this.#pending[0]);
      if (kind === undefined) throw bad(`unknown frame kind 0x${this.#pending[0].toString(16)}`);
      const length = this.#pending.readUInt32LE(1);
      if (length > FRAME_PAYLOAD_BYTES_MAX) throw bad(`frame of ${length} bytes, more than ${FRAME_PAYLOAD_BYTES_MAX}`);
      if (this.#pending.length < FRAME_HEADER_BYTES + length) break;
      frames.push({ kind, payload: Buffer.from(this.#pending.subarray(FRAME_HEADER_BYTES, FRAME_HEADER_BYTES + length)) });
      this.#pending = this.#pending.subarray(FRAME_HEADER_BYTES + length);
    }
    return frames;
  }

  /** Bytes of an incomplete frame still buffered. */
  get pendingBytes(): number {
    return this.#pending.length;
  }
}
