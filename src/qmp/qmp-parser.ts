/**
 * A push parser for QMP's wire format: one JSON object per line.
 *
 * Design notes
 * - `feed(chunk)` accepts bytes cut anywhere (inside a UTF-8 sequence, inside
 *   a line, between "\r" and "\n") and returns every complete message; the
 *   rest waits in `#pending` for the next chunk. Bytes are decoded only once a
 *   whole line is in hand, so a split multi-byte character is never garbled.
 * - The limit is checked before buffering: a line that grows past
 *   QMP_LINE_BYTES_MAX is an error even before its newline arrives, so a
 *   peer that never sends "\n" cannot grow our memory without bound.
 * - Blank lines are skipped (QEMU sends "\r\n" on some chardevs). A line that
 *   is not a JSON object is an error: the stream is QEMU's, and garbage means
 *   it is not QMP (wrong socket) or it is broken; the client closes.
 */
import { SnapstackError } from "../base/errors.ts";

/**
 * Longest line accepted. The largest replies snapstack asks for
 * (query-block, query-migrate on a VM with many devices) are a few KiB; QMP
 * schema introspection is about 200 KiB. 16 MiB bounds memory per client.
 */
export const QMP_LINE_BYTES_MAX = 16 * 1024 * 1024;

export type QmpMessage = Record<string, unknown>;

export class QmpParser {
  readonly lineBytesMax: number;
  #pending: Buffer[] = [];
  #pendingBytes = 0;

  constructor(lineBytesMax = QMP_LINE_BYTES_MAX) {
    this.lineBytesMax = lineBytesMax;
  }

  /** Bytes held for an incomplete line. */
  get pendingBytes(): number {
    return this.#pendingBytes;
  }

  /** Feed bytes; returns the messages completed by them, in order. */
  feed(chunk: Buffer): QmpMessage[] {
    const messages: QmpMessage[] = [];
    let start = 0;
    for (;;) {
      const newline = chunk.indexOf(0x0a, start);
      if (newline < 0) break;
      const tail = chunk.subarray(start, newline);
      this.#checkLength(this.#pendingBytes + tail.length);
      const line = this.#pendingBytes === 0 ? tail : Buffer.concat([...this.#pending, tail]);
      this.#pending = [];
      this.#pendingBytes = 0;
      const message = decodeQmpLine(line);
      if (message !== null) messages.push(message);
      start = newline + 1;
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start);
      this.#checkLength(this.#pendingBytes + rest.length);
      // Copy: the caller may reuse its buffer.
      this.#pending.push(Buffer.from(rest));
      this.#pendingBytes += rest.length;
    }
    return messages;
  }

  #checkLength(lineBytes: number): void {
    if (lineBytes > this.lineBytesMax) {
      this.#pending = [];
      this.#pendingBytes = 0;
      throw new SnapstackError("E_QEMU", `QMP line of more than ${this.lineBytesMax} bytes`, { lineBytesMax: this.lineBytesMax });
    }
  }
}

/** One line (without its "\n") to a message; null for a blank line. */
export function decodeQmpLine(line: Buffer): QmpMessage | null {
  const text = line.toString("utf8").trim();
  if (text === "") return null;
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new SnapstackError("E_QEMU", `QMP sent a line that is not JSON: ${abbreviate(text)}`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new SnapstackError("E_QEMU", `QMP sent a line that is not a JSON object: ${abbreviate(text)}`);
  }
  return value as QmpMessage;
}

/** One command as QMP wants it on the wire. */
export function encodeQmpCommand(command: string, args: Record<string, unknown> | undefined, id: string): Buffer {
  const message: Record<string, unknown> = { execute: command };
  if (args !== undefined) message.arguments = args;
  message.id = id;
  return Buffer.from(JSON.stringify(message) + "\n", "utf8");
}

function abbreviate(text: string): string {
  return text.length > 200 ? `${text.slice(0, 200)}...` : text;
}
