/**
 * A push parser for the client side of an NBD connection.
 *
 * Design notes
 * - `push(chunk)` appends bytes as the socket delivers them; `next()` returns
 *   one complete message or null. Nothing assumes message boundaries line up
 *   with chunks; the unit tests split streams at every offset.
 * - The caller sets the phase (client flags, options, transmission) because
 *   only it knows when negotiation ends. The client must wait for the
 *   server's reply before it leaves the option phase, so there is never
 *   ambiguity about how to parse buffered bytes.
 * - Pull, not callbacks: the connection stops calling next() while too much
 *   is in flight, and the bytes already received simply wait here (bounded
 *   by what the socket delivered before it was paused).
 * - Length limits are checked on the header, before anything is buffered:
 *   an option longer than optionDataBytesMax is reported without reading it
 *   (the connection then closes); a WRITE payload longer than
 *   payloadBytesMax is consumed and dropped as it streams in, never held,
 *   and the request is then returned with `payloadDropped` so it gets an
 *   error reply and the stream stays in sync.
 * - A WRITE payload is copied into its own buffer as it arrives, so socket
 *   chunks are released at once and a 32 MiB write holds 32 MiB, not twice.
 * - Direct payload reads: while a payload is pending and nothing else is
 *   buffered, `payloadTarget()` is the unfilled rest of the payload buffer;
 *   the connection has the socket read into it and reports the bytes with
 *   `payloadReceived(n)`, so write data is copied once (kernel to payload),
 *   not twice. Bytes pushed from a buffer the caller reuses are copied out
 *   by `release(buffer)` before the caller overwrites it.
 */
import { assert } from "../base/errors.ts";
import { IHAVEOPT_HI, IHAVEOPT_LO, CMD_WRITE, OPTION_HEADER_BYTES, REQUEST_HEADER_BYTES, REQUEST_MAGIC, CLIENT_FLAGS_BYTES } from "./protocol.ts";

export interface NbdRequest {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  /** Exact below 2^53; larger values are approximate and always out of range. */
  offset: number;
  lengthBytes: number;
  /** WRITE data (null for other commands and for dropped payloads). */
  payload: Buffer | null;
  /** The WRITE payload was too long and was discarded. */
  payloadDropped: boolean;
}

export type NbdMessage =
  | { kind: "clientFlags"; flags: number }
  | { kind: "option"; option: number; data: Buffer }
  | { kind: "optionTooLong"; option: number; lengthBytes: number }
  | { kind: "badMagic"; phase: "options" | "transmission"; magicHex: string }
  | { kind: "request"; request: NbdRequest };

export type ParserPhase = "clientFlags" | "options" | "transmission";

export interface NbdParserLimits {
  payloadBytesMax: number;
  optionDataBytesMax: number;
  /** Where WRITE payload buffers come from (a BufferPool); Buffer.allocUnsafe by default. */
  allocatePayload?: (lengthBytes: number) => Buffer;
}

const TWO_POW_32 = 4294967296;
const EMPTY = Buffer.alloc(0);

export class NbdParser {
  phase: ParserPhase = "clientFlags";
  readonly limits: NbdParserLimits;
  #chunks: Buffer[] = [];
  #headIndex = 0;
  #headOffset = 0;
  #available = 0;
  /** Header bytes gathered across chunk boundaries. */
  #scratch = Buffer.alloc(REQUEST_HEADER_BYTES);
  /** A WRITE whose payload is still arriving (or being skipped). */
  #pending: NbdRequest | null = null;
  #payloadFilled = 0;
  #skipRemaining = 0;

  constructor(limits: NbdParserLimits) {
    this.limits = limits;
  }

  /** Bytes received and not yet returned in a message. */
  get bufferedBytes(): number {
    return this.#available;
  }

  /** A message is partly received (a WRITE payload still arriving). */
  get midMessage(): boolean {
    return this.#pending !== null;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#available += chunk.length;
  }

  /**
   * The caller is about to reuse `buffer`: bytes still held from it (pushed
   * and not yet consumed) are copied into a buffer of their own.
   */
  release(buffer: Buffer): void {
    for (let index = this.#headIndex; index < this.#chunks.length; index++) {
      const chunk = this.#chunks[index];
      if (chunk.buffer !== buffer.buffer) continue;
      const start = index === this.#headIndex ? this.#headOffset : 0;
      this.#chunks[index] = Buffer.from(chunk.subarray(start));
      if (index === this.#headIndex) this.#headOffset = 0;
    }
  }

  /**
   * Where the next bytes from the socket can go directly: the unfilled rest
   * of a pending WRITE payload, when no other bytes are buffered ahead of it
   * and at least `minBytes` of it are missing.
   */
  payloadTarget(minBytes = 1): Buffer | null {
    const pending = this.#pending;
    if (pending === null || pending.payload === null || this.#skipRemaining > 0 || this.#available > 0) return null;
    // A complete payload waits for next(); an empty target would read as end of stream.
    if (pending.payload.length - this.#payloadFilled < Math.max(1, minBytes)) return null;
    return pending.payload.subarray(this.#payloadFilled);
  }

  /** `lengthBytes` bytes were written into the last payloadTarget(). */
  payloadReceived(lengthBytes: number): void {
    const payload = this.#pending?.payload;
    if (payload == null || this.#payloadFilled + lengthBytes > payload.length) assert(false, `payloadReceived(${lengthBytes}) matches a payload target`);
    this.#payloadFilled += lengthBytes;
  }

  next(): NbdMessage | null {
    switch (this.phase) {
      case "clientFlags":
        if (this.#available < CLIENT_FLAGS_BYTES) return null;
        return { kind: "clientFlags", flags: this.#readHeader(CLIENT_FLAGS_BYTES).readUInt32BE(0) };
      case "options":
        return this.#nextOption();
      case "transmission":
        return this.#nextRequest();
    }
  }

  #nextOption(): NbdMessage | null {
    if (this.#available < OPTION_HEADER_BYTES) return null;
    const header = this.#peek(OPTION_HEADER_BYTES);
    const magicHi = header.readUInt32BE(0);
    const magicLo = header.readUInt32BE(4);
    if (magicHi !== IHAVEOPT_HI || magicLo !== IHAVEOPT_LO) {
      return { kind: "badMagic", phase: "options", magicHex: `0x${magicHi.toString(16).padStart(8, "0")}${magicLo.toString(16).padStart(8, "0")}` };
    }
    const option = header.readUInt32BE(8);
    const lengthBytes = header.readUInt32BE(12);
    if (lengthBytes > this.limits.optionDataBytesMax) return { kind: "optionTooLong", option, lengthBytes };
    if (this.#available < OPTION_HEADER_BYTES + lengthBytes) return null;
    this.#consume(OPTION_HEADER_BYTES);
    const data = lengthBytes === 0 ? EMPTY : Buffer.allocUnsafe(lengthBytes);
    this.#copyOut(data, 0, lengthBytes);
    return { kind: "option", option, data };
  }

  #nextRequest(): NbdMessage | null {
    const pending = this.#pending;
    if (pending !== null) {
      if (this.#skipRemaining > 0) {
        const skip = Math.min(this.#skipRemaining, this.#available);
        this.#consume(skip);
        this.#skipRemaining -= skip;
        if (this.#skipRemaining > 0) return null;
      } else {
        const payload = pending.payload!;
        const copy = Math.min(payload.length - this.#payloadFilled, this.#available);
        this.#copyOut(payload, this.#payloadFilled, copy);
        this.#payloadFilled += copy;
        if (this.#payloadFilled < payload.length) return null;
      }
      this.#pending = null;
      return { kind: "request", request: pending };
    }
    if (this.#available < REQUEST_HEADER_BYTES) return null;
    const header = this.#peek(REQUEST_HEADER_BYTES);
    const magic = header.readUInt32BE(0);
    if (magic !== REQUEST_MAGIC) return { kind: "badMagic", phase: "transmission", magicHex: `0x${magic.toString(16)}` };
    const request: NbdRequest = {
      flags: header.readUInt16BE(4),
      type: header.readUInt16BE(6),
      cookieHi: header.readUInt32BE(8),
      cookieLo: header.readUInt32BE(12),
      offset: header.readUInt32BE(16) * TWO_POW_32 + header.readUInt32BE(20),
      lengthBytes: header.readUInt32BE(24),
      payload: null,
      payloadDropped: false,
    };
    this.#consume(REQUEST_HEADER_BYTES);
    if (request.type !== CMD_WRITE || request.lengthBytes === 0) return { kind: "request", request };
    if (request.lengthBytes > this.limits.payloadBytesMax) {
      request.payloadDropped = true;
      this.#skipRemaining = request.lengthBytes;
    } else {
      request.payload = this.limits.allocatePayload?.(request.lengthBytes) ?? Buffer.allocUnsafe(request.lengthBytes);
      this.#payloadFilled = 0;
    }
    this.#pending = request;
    return this.#nextRequest();
  }

  /**
   * `length` contiguous bytes from the front without consuming them: a view
   * of the head chunk when it holds them all, else a copy in the scratch.
   */
  #peek(length: number): Buffer {
    const head = this.#chunks[this.#headIndex];
    if (head.length - this.#headOffset >= length) return head.subarray(this.#headOffset, this.#headOffset + length);
    let filled = 0;
    for (let index = this.#headIndex, offset = this.#headOffset; filled < length; index++, offset = 0) {
      const chunk = this.#chunks[index];
      const take = Math.min(chunk.length - offset, length - filled);
      chunk.copy(this.#scratch, filled, offset, offset + take);
      filled += take;
    }
    return this.#scratch.subarray(0, length);
  }

  #readHeader(length: number): Buffer {
    const view = Buffer.from(this.#peek(length));
    this.#consume(length);
    return view;
  }

  #copyOut(target: Buffer, targetAt: number, length: number): void {
    let copied = 0;
    while (copied < length) {
      const head = this.#chunks[this.#headIndex];
      const take = Math.min(head.length - this.#headOffset, length - copied);
      head.copy(target, targetAt + copied, this.#headOffset, this.#headOffset + take);
      copied += take;
      this.#consume(take);
    }
  }

  #consume(length: number): void {
    this.#available -= length;
    let left = length;
    while (left > 0) {
      const head = this.#chunks[this.#headIndex];
      const inHead = head.length - this.#headOffset;
      if (left < inHead) {
        this.#headOffset += left;
        return;
      }
      left -= inHead;
      this.#chunks[this.#headIndex] = EMPTY;
      this.#headIndex++;
      this.#headOffset = 0;
    }
    if (this.#headIndex === this.#chunks.length) {
      this.#chunks.length = 0;
      this.#headIndex = 0;
    } else if (this.#headIndex > 64) {
      this.#chunks = this.#chunks.slice(this.#headIndex);
      this.#headIndex = 0;
    }
  }
}
