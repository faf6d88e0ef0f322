/**
 * One client connection: the state machine, the read pump with
 * back-pressure, request execution and reply writing.
 *
 * States
 *   clientFlags -> options -> transmission -> draining -> closed
 *   (options -> tls-handshake -> options after STARTTLS; any -> closed on
 *   EOF, error, bad magic, handshake timeout)
 * - clientFlags: greeting sent, waiting for the 4 client flag bytes; unknown
 *   bits close the connection.
 * - options: negotiation.ts decides each option; a handshake that takes
 *   longer than handshakeTimeoutMs or more than OPTIONS_PER_HANDSHAKE_MAX
 *   options is dropped (CVE-2024-7409: clients that never finish).
 * - transmission: requests run concurrently and reply in completion order.
 * - draining: no more requests are read (DISC, EOF, bad magic, server
 *   shutdown); the socket ends when the last in-flight request has replied
 *   and the client has taken the replies, or is destroyed drainTimeoutMs
 *   after the last reply was queued (a client that stops reading cannot
 *   hold it open; slow device requests do not count).
 *
 * Back-pressure: the pump pulls one message at a time from the parser and
 * stops (pausing the socket) while IN_FLIGHT_REQUESTS_MAX requests run, or
 * while write payloads held + read replies being built + the memory that
 * replies queued in the socket hold exceed inFlightBytesMax. A queued reply
 * is counted by the whole buffer it pins plus QUEUED_WRITE_OVERHEAD_BYTES,
 * not by its length: a tick's batch of one 16-byte reply pins a 64 KiB
 * buffer, and counting 16 bytes let a client that never reads its replies
 * queue 262,144 of them (16 GiB) per connection. 'drain', request
 * completion and queued writes completing restart it. So a connection
 * holds at most inFlightBytesMax plus one request.
 * A pass of the pump also stops after starting READ_BYTES_PER_PUMP_MAX of
 * reads and goes on from setImmediate: reads of a page-cached file finish
 * synchronously but their replies are sent from promise callbacks, which
 * run only after the pass, so a pass that started 16 reads of 256 KiB
 * (nbdcopy) left the socket idle while it read 4 MiB, and sent data that
 * had left the CPU cache. Now a reply goes out after at most 256 KiB of
 * reads (strace: pread, write, pread, write instead of 16 preads first).
 *
 * Replies: built as one buffer per reply where possible (header and data
 * together, the read goes straight into the reply buffer). Small replies
 * (up to BATCHED_REPLY_BYTES_MAX: write and flush acknowledgements, 4 KiB
 * reads) are copied into one batch buffer per tick (simple replies are
 * encoded straight into it) and leave together in one socket write at the
 * end of the tick: one stream write per batch instead of one per reply
 * (Node's Writable costs a few microseconds per write, as much as the copy
 * of a 4 KiB reply). A larger reply is written at once (after the batch),
 * while the data it carries is still in the CPU cache: with dozens of
 * reads in flight, copying them all into reply buffers before the first
 * goes out made the socket copy read cold memory.
 *
 * Raw-file WRITEs (devices with writeSync, through NbdExport.writeSync) are
 * written synchronously while the request is parsed and replied to at once:
 * no promise, no in-flight accounting, so at 50k 4 KiB writes a second the
 * event loop spends ~3 us less per request. The reply still follows the
 * pwrite, so a FLUSH covers every write replied before it. WRITEs with FUA
 * take the ordinary path (write, then flush). Large writes (from
 * LARGE_WRITE_BYTES) are synchronous only when env.syncLargeWrites() says
 * so (data-workers.ts), otherwise the device's thread pool overlaps them
 * with reading the socket; writes over WRITE_SYNC_BYTES_MAX never are (as
 * Qcow2Image.write: a 32 MiB pwrite would stall the other connections).
 *
 * Errors from the device become errno values (nbd-errno.ts) and never close
 * the connection; a client that vanishes mid-request costs nothing: replies
 * to a closed socket are dropped and in-flight requests simply finish.
 */
import type { Socket } from "node:net";
import { settleAll } from "../base/errors.ts";
import tls from "node:tls";
import { WRITE_SYNC_BYTES_MAX } from "../io/file.ts";
import { ASYNC_IO_THRESHOLD_BYTES } from "../io/node-file.ts";
import { isAllZero } from "../io/io-buffer.ts";
import { encodeBlockStatusChunk, encodeChunk, encodeErrorChunk, encodeGreeting, writeChunkHeader, writeSimpleReplyHeader, writeU64 } from "./codec.ts";
import { dirtyBitmapExtents, queryBlockStatus, readRuns } from "./block-status.ts";
import type { NbdExport } from "./nbd-export.ts";
import type { TlsCredentials } from "./tls-credentials.ts";
import type { BufferPool } from "./buffer-pool.ts";
import { adoptSocket } from "./direct-socket.ts";
import { errorMessageOf, nbdErrnoFor } from "./nbd-errno.ts";
import { NbdParser, type NbdMessage, type NbdRequest } from "./nbd-parser.ts";
import { initialNegotiationState, negotiateOption, type NegotiationEnv, type NegotiationState } from "./negotiation.ts";
import {
  CLIENT_FLAGS_KNOWN,
  CMD_BLOCK_STATUS,
  CMD_CACHE,
  CMD_DISC,
  CMD_FLAG_DF,
  CMD_FLAG_FAST_ZERO,
  CMD_FLAG_FUA,
  CMD_FLAG_NO_HOLE,
  CMD_FLAG_REQ_ONE,
  CMD_FLUSH,
  CMD_READ,
  CMD_TRIM,
  CMD_WRITE,
  CMD_WRITE_ZEROES,
  BATCHED_REPLY_BYTES_MAX,
  ERROR_MESSAGE_BYTES_MAX,
  META_ID_ALLOCATION_DEPTH,
  META_ID_BASE_ALLOCATION,
  META_ID_DIRTY_BITMAP,
  BLOCK_STATUS_EXTENTS_MAX,
  NBD_ENOTSUP,
  OPTION_DATA_BYTES_MAX,
  HANDSHAKE_TIMEOUT_MS,
  DRAIN_TIMEOUT_MS,
  IN_FLIGHT_BYTES_MAX,
  IN_FLIGHT_REQUESTS_MAX,
  OPTIONS_PER_HANDSHAKE_MAX,
  PAYLOAD_BYTES_MAX,
  READ_BYTES_PER_PUMP_MAX,
  REPLY_BATCH_BYTES,
  REPLY_FLAG_DONE,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  SIMPLE_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_HEADER_BYTES,
  SPARSE_READ_MIN_BYTES,
} from "./protocol.ts";
import { validateRequest, type RequestContext } from "./request-validation.ts";

export interface ConnectionLimits {
  handshakeTimeoutMs: number;
  drainTimeoutMs?: number;
  inFlightBytesMax: number;
  inFlightRequestsMax: number;
  optionsPerHandshakeMax?: number;
}

/** `overrides` with protocol.ts's defaults for every limit it leaves out. */
export function connectionLimits(overrides: Partial<ConnectionLimits> = {}): ConnectionLimits {
  return {
    handshakeTimeoutMs: overrides.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS,
    drainTimeoutMs: overrides.drainTimeoutMs ?? DRAIN_TIMEOUT_MS,
    inFlightBytesMax: overrides.inFlightBytesMax ?? IN_FLIGHT_BYTES_MAX,
    inFlightRequestsMax: overrides.inFlightRequestsMax ?? IN_FLIGHT_REQUESTS_MAX,
    optionsPerHandshakeMax: overrides.optionsPerHandshakeMax ?? OPTIONS_PER_HANDSHAKE_MAX,
  };
}

export interface ConnectionEnv extends NegotiationEnv {
  tls: TlsCredentials | null;
  limits: ConnectionLimits;
  /** Reply and payload buffers, shared by the server's connections. */
  pool: BufferPool;
  /** Called once, when the connection has closed. */
  onClosed(connection: NbdConnection): void;
  /** Called when negotiation ends and transmission begins. */
  onNegotiated?(connection: NbdConnection): void;
  /** Diagnostics (verbose mode). */
  log?(message: string): void;
  /**
   * Whether WRITEs of LARGE_WRITE_BYTES or more are also done synchronously
   * on this thread when the device can (NbdExport.writeSync), instead of on
   * the thread pool: worth it when every core already has a connection to
   * serve (see data-workers.ts). Default: no.
   */
  syncLargeWrites?(): boolean;
  /**
   * Negotiation chose `exp`: return a taker to move the connection to
   * another process, or null to serve it here. The taker gets the socket
   * with nothing unsent and nothing read beyond the option, and sends
   * `handoff.replies` itself (startTransmission); onClosed is not called.
   */
  handOff?(connection: NbdConnection, exp: NbdExport): ((socket: Socket, handoff: TransmissionHandoff) => void) | null;
}

/** A connection that finished negotiation, as another process needs it to serve the transmission phase. */
export interface TransmissionHandoff {
  exportName: string;
  structuredReplies: boolean;
  metaContextIds: number[];
  /** The replies that end negotiation (GO's INFO and ACK, or EXPORT_NAME's), not yet sent. */
  replies: Buffer[];
}

type ConnectionPhase = "clientFlags" | "options" | "tls-handshake" | "transmission" | "draining" | "closed";

/**
 * What one queued socket write costs besides its buffer (the stream's write
 * request, libuv's, the callback), counted against inFlightBytesMax: a
 * client that never reads cannot queue more than inFlightBytesMax / 1 KiB
 * writes even when each pins little.
 */
const QUEUED_WRITE_OVERHEAD_BYTES = 1024;

/** Bytes of the data chunk header in a structured READ reply: chunk header + offset. */
const DATA_CHUNK_PREFIX_BYTES = STRUCTURED_REPLY_HEADER_BYTES + 8;
const HOLE_CHUNK_BYTES = STRUCTURED_REPLY_HEADER_BYTES + 12;

/** Bytes of the buffer every direct-reading connection reads into (Node's own read size). */
const SHARED_READ_BUFFER_BYTES = 64 * 1024;
let sharedRead: Buffer | null = null;
/**
 * A WRITE payload is read straight from the socket into its buffer only
 * when at least this much of it is missing; less goes through the shared
 * buffer (and is copied out), so one read brings several small requests
 * (fio's 4 KiB writes: 1.4 reads per request with direct reads, fewer
 * without, and ~1 us of CPU less per request).
 */
const DIRECT_PAYLOAD_BYTES_MIN = 64 * 1024;

/** One buffer for all connections: each read is parsed (leftovers copied out) before the next read happens. */
function sharedReadBuffer(): Buffer {
  sharedRead ??= Buffer.allocUnsafeSlow(SHARED_READ_BUFFER_BYTES);
  return sharedRead;
}

/**
 * WRITEs from this size on are "large": done synchronously only when
 * env.syncLargeWrites() says so, otherwise on the device's own path (a
 * raw file's NodeFile puts them on the thread pool from that size on).
 */
const LARGE_WRITE_BYTES = ASYNC_IO_THRESHOLD_BYTES;

export class NbdConnection {
  readonly env: ConnectionEnv;
  readonly remote: string;
  #socket: Socket;
  #phase: ConnectionPhase = "clientFlags";
  #parser: NbdParser;
  #pool: BufferPool;
  #negotiation: NegotiationState | null = null;
  #optionCount = 0;
  #export: NbdExport | null = null;
  #structuredReplies = false;
  #baseAllocation = false;
  #allocationDepth = false;
  /** Indexes into the export's dirtyBitmaps of the qemu:dirty-bitmap contexts selected, in id order. */
  #dirtyBitmaps: number[] = [];
  /** What validateRequest needs, kept from negotiation (sizeBytes refreshed per request). */
  #requestContext: RequestContext | null = null;
  #inFlightRequests = 0;
  #inFlightBytes = 0;
  /** Memory held by replies queued in the socket (see the design notes). */
  #queuedWriteBytes = 0;
  #pumping = false;
  #pumpScheduled = false;
  #socketPaused = false;
  /** The client half-closed its side: what it sent before is still served, then the connection drains. */
  #clientEnded = false;
  /** Small replies of this tick, sent by #flushBatch (see the design notes). */
  #batch: Buffer | null = null;
  #batchBytes = 0;
  #batchFlushScheduled = false;
  /** The handshake timeout, then (once draining) the drain timeout: the connection is cut off when it fires. */
  #deadlineTimer: NodeJS.Timeout | null = null;
  #negotiated = false;
  #closeReason = "";

  constructor(socket: Socket, env: ConnectionEnv) {
    this.#socket = socket;
    this.env = env;
    this.#pool = env.pool;
    this.#parser = new NbdParser({
      payloadBytesMax: PAYLOAD_BYTES_MAX,
      optionDataBytesMax: OPTION_DATA_BYTES_MAX,
      allocatePayload: (lengthBytes) => this.#pool.take(lengthBytes),
    });
    this.remote = socket.remoteAddress !== undefined ? `${socket.remoteAddress}:${socket.remotePort}` : "unix";
  }

  get phase(): ConnectionPhase {
    return this.#phase;
  }

  /** The connection finished negotiation (qemu-nbd's "negotiated" client). */
  get negotiated(): boolean {
    return this.#negotiated;
  }

  get exportName(): string | null {
    return this.#export?.name ?? null;
  }

  get inFlightRequests(): number {
    return this.#inFlightRequests;
  }

  get closeReason(): string {
    return this.#closeReason;
  }

  start(): void {
    this.#open();
    this.#deadlineTimer = setTimeout(() => this.#abort("handshake timeout"), this.env.limits.handshakeTimeoutMs);
    this.#deadlineTimer.unref();
    this.#send(encodeGreeting());
  }

  /** Serve a connection another process negotiated (env.handOff): send its last replies, then transmission. */
  startTransmission(exp: NbdExport, handoff: TransmissionHandoff): void {
    this.#open();
    for (const reply of handoff.replies) this.#send(reply);
    this.#enterTransmission(exp, handoff.metaContextIds, handoff.structuredReplies);
  }

  #open(): void {
    // Without TLS, reads go straight into WRITE payloads (direct-socket.ts); TLS needs 'data' events.
    const adopted = this.env.tls === null ? adoptSocket(this.#socket, { nextBuffer: () => this.#nextReadBuffer(), received: (n, buffer) => this.#received(n, buffer) }) : null;
    if (adopted !== null) this.#socket = adopted;
    const socket = this.#socket;
    socket.setNoDelay?.(true);
    this.#attach(socket);
    // Listeners are created with pauseOnConnect (see direct-socket.ts).
    if (adopted === null) socket.resume();
    socket.on("close", () => this.#finalize());
  }

  #attach(socket: Socket): void {
    socket.on("data", (chunk: Buffer) => {
      // Once draining, nothing more is read: the bytes are dropped, not held.
      if (!this.#reading()) return;
      this.#parser.push(chunk);
      this.#pump();
    });
    // Requests already received (a pass may have stopped at READ_BYTES_PER_PUMP_MAX, or at the
    // in-flight limit) are still served and replied to; libnbd's shutdown sends DISC and
    // half-closes at once, with requests in flight.
    socket.on("end", () => {
      this.#clientEnded = true;
      this.#pump();
    });
    socket.on("error", (error) => this.#abort(`socket error: ${error.message}`));
    socket.on("drain", () => this.#pump());
  }

  #nextReadBuffer(): Buffer {
    return this.#parser.payloadTarget(DIRECT_PAYLOAD_BYTES_MIN) ?? sharedReadBuffer();
  }

  /** Bytes read into the buffer #nextReadBuffer chose (direct-socket.ts). */
  #received(lengthBytes: number, buffer: Buffer): void {
    if (!this.#reading()) return;
    if (buffer === sharedReadBuffer()) {
      this.#parser.push(buffer.subarray(0, lengthBytes));
      this.#pump();
      this.#parser.release(buffer);
    } else {
      this.#parser.payloadReceived(lengthBytes);
      this.#pump();
    }
  }

  /** Stop reading, let in-flight requests reply, then end the connection. */
  shutdown(reason = "server shutting down"): void {
    this.#drain(reason);
  }

  // ---- reading ----

  #reading(): boolean {
    return this.#phase === "clientFlags" || this.#phase === "options" || this.#phase === "transmission";
  }

  #overLimit(): boolean {
    const limits = this.env.limits;
    return this.#inFlightRequests >= limits.inFlightRequestsMax || this.#inFlightBytes + this.#queuedWriteBytes >= limits.inFlightBytesMax;
  }

  #pump(): void {
    if (this.#pumping) return;
    this.#pumping = true;
    let blocked = false;
    let exhausted = false;
    let readBytesStarted = 0;
    try {
      while (this.#reading()) {
        if (this.#phase === "transmission" && this.#overLimit()) {
          blocked = true;
          break;
        }
        if (readBytesStarted >= READ_BYTES_PER_PUMP_MAX) {
          // Let the replies of the reads just done go out before reading more (see the design notes).
          if (!this.#pumpScheduled) {
            this.#pumpScheduled = true;
            setImmediate(this.#scheduledPump);
          }
          break;
        }
        const message = this.#parser.next();
        if (message === null) {
          exhausted = true;
          break;
        }
        if (message.kind === "request" && message.request.type === CMD_READ) readBytesStarted += message.request.lengthBytes;
        this.#handleMessage(message);
      }
    } finally {
      this.#pumping = false;
    }
    // Everything the client sent before closing its side has been taken (a partial message is dropped).
    if (exhausted && this.#clientEnded) {
      this.#drain("client closed its side");
      return;
    }
    if (blocked && !this.#socketPaused) {
      this.#socketPaused = true;
      this.#socket.pause();
    } else if (!blocked && this.#socketPaused && this.#reading()) {
      this.#socketPaused = false;
      this.#socket.resume();
    }
  }

  #scheduledPump = (): void => {
    this.#pumpScheduled = false;
    this.#pump();
  };

  #handleMessage(message: NbdMessage): void {
    switch (message.kind) {
      case "clientFlags":
        if ((message.flags & ~CLIENT_FLAGS_KNOWN) !== 0) {
          this.#abort(`unknown client flags 0x${message.flags.toString(16)}`);
          return;
        }
        this.#negotiation = initialNegotiationState(message.flags);
        this.#phase = "options";
        this.#parser.phase = "options";
        return;
      case "option":
        this.#handleOption(message.option, message.data);
        return;
      case "optionTooLong":
        this.#abort(`option ${message.option} length ${message.lengthBytes} exceeds ${OPTION_DATA_BYTES_MAX}`);
        return;
      case "badMagic":
        if (message.phase === "options") this.#abort(`bad option magic ${message.magicHex}`);
        else this.#drain(`invalid request magic (got ${message.magicHex})`);
        return;
      case "request":
        this.#handleRequest(message.request);
        return;
    }
  }

  // ---- negotiation ----

  #handleOption(option: number, data: Buffer): void {
    const state = this.#negotiation!;
    const optionsMax = this.env.limits.optionsPerHandshakeMax ?? OPTIONS_PER_HANDSHAKE_MAX;
    if (++this.#optionCount > optionsMax) {
      this.#abort(`more than ${optionsMax} options without finishing negotiation`);
      return;
    }
    const outcome = negotiateOption(state, this.env, option, data);
    if (outcome.next === "transmission" && this.#handOff(outcome.export, { exportName: outcome.export.name, structuredReplies: state.structuredReplies, metaContextIds: outcome.metaContextIds, replies: outcome.replies })) return;
    for (const reply of outcome.replies) this.#send(reply);
    switch (outcome.next) {
      case "continue":
        return;
      case "close":
        this.env.log?.(`${this.remote}: closing: ${outcome.reason}`);
        this.#drain(outcome.reason);
        return;
      case "starttls":
        this.#startTls();
        return;
      case "transmission":
        this.#enterTransmission(outcome.export, outcome.metaContextIds, state.structuredReplies);
        return;
    }
  }

  #enterTransmission(exp: NbdExport, metaContextIds: number[], structuredReplies: boolean): void {
    if (this.#deadlineTimer !== null) clearTimeout(this.#deadlineTimer);
    this.#deadlineTimer = null;
    this.#export = exp;
    this.#structuredReplies = structuredReplies;
    this.#baseAllocation = metaContextIds.includes(META_ID_BASE_ALLOCATION);
    this.#allocationDepth = metaContextIds.includes(META_ID_ALLOCATION_DEPTH);
    this.#dirtyBitmaps = exp.dirtyBitmaps.map((_bitmap, index) => index).filter((index) => metaContextIds.includes(META_ID_DIRTY_BITMAP + index));
    this.#requestContext = {
      sizeBytes: exp.sizeBytes,
      readOnly: exp.readOnly,
      structuredReplies,
      hasMetaContext: this.#baseAllocation || this.#allocationDepth || this.#dirtyBitmaps.length > 0,
    };
    this.#phase = "transmission";
    this.#parser.phase = "transmission";
    this.#negotiated = true;
    this.env.onNegotiated?.(this);
  }

  /** Give the socket to env.handOff's taker once earlier replies have left; false: serve here. */
  #handOff(exp: NbdExport, handoff: TransmissionHandoff): boolean {
    // Bytes after the option (a client that did not wait for the reply) stay with this process.
    if (this.env.handOff === undefined || this.#parser.bufferedBytes > 0) return false;
    const take = this.env.handOff(this, exp);
    if (take === null) return false;
    if (this.#deadlineTimer !== null) clearTimeout(this.#deadlineTimer);
    this.#deadlineTimer = null;
    // Earlier replies still batched go first (#flushBatch writes nothing once closed).
    this.#flushBatch();
    this.#closeReason = "handed off";
    this.#phase = "closed";
    const socket = this.#socket;
    (socket as unknown as { _handle?: { readStop?(): number } | null })._handle?.readStop?.();
    socket.pause();
    for (const event of ["data", "end", "error", "drain", "close"]) socket.removeAllListeners(event);
    socket.on("error", () => {});
    if (socket.writableLength === 0) take(socket, handoff);
    else socket.write(Buffer.alloc(0), () => take(socket, handoff));
    return true;
  }

  #startTls(): void {
    const credentials = this.env.tls;
    if (credentials === null || this.#parser.bufferedBytes > 0) {
      // The client must wait for the ACK before starting TLS.
      this.#abort("data after STARTTLS before the TLS handshake");
      return;
    }
    this.#flushBatch();
    const raw = this.#socket;
    raw.removeAllListeners("data");
    raw.removeAllListeners("end");
    raw.removeAllListeners("drain");
    this.#phase = "tls-handshake";
    const secure = new tls.TLSSocket(raw, {
      isServer: true,
      secureContext: credentials.secureContext,
      requestCert: credentials.verifyPeer,
      rejectUnauthorized: credentials.verifyPeer,
    });
    this.#socket = secure;
    secure.on("close", () => this.#finalize());
    secure.once("secure", () => {
      if (this.#phase !== "tls-handshake") return;
      this.#negotiation!.tlsActive = true;
      this.#phase = "options";
      this.#pump();
    });
    this.#attach(secure);
  }

  // ---- transmission ----

  #handleRequest(request: NbdRequest): void {
    if (request.type === CMD_DISC) {
      this.#drain("client sent NBD_CMD_DISC");
      return;
    }
    const exp = this.#export!;
    const context = this.#requestContext!;
    context.sizeBytes = exp.sizeBytes;
    const rejection = validateRequest(request, context);
    if (rejection !== null) {
      if (request.payload !== null) this.#pool.give(request.payload);
      this.#replyError(request, rejection.errno, rejection.message);
      return;
    }
    // --detect-zeroes: a WRITE of all-zero data becomes a zero write (#execute), looked at once here.
    const zeroData = request.type === CMD_WRITE && exp.detectZeroes !== "off" && request.payload !== null && isAllZero(request.payload);
    // A WRITE without FUA: written synchronously where the export can, else on #write's short path.
    const plainWritePayload = request.type === CMD_WRITE && (request.flags & CMD_FLAG_FUA) === 0 && !zeroData ? request.payload : null;
    if (plainWritePayload !== null && this.#writeNow(request, plainWritePayload, exp)) return;
    const costBytes = this.#costBytes(request);
    this.#inFlightRequests++;
    this.#inFlightBytes += costBytes;
    let running: Promise<void>;
    if (plainWritePayload !== null) running = this.#write(request, plainWritePayload, exp);
    else if (request.type === CMD_READ && this.#readsWhole(request)) running = this.#readWhole(request, exp);
    else running = this.#execute(request, exp, zeroData);
    running.then(() => {
      this.#inFlightRequests--;
      this.#inFlightBytes -= costBytes;
      if (this.#phase === "draining") this.#endIfIdle();
      else if (this.#socketPaused) this.#pump();
    });
  }

  /**
   * The memory a request holds while it runs, counted against
   * inFlightBytesMax: a READ's or WRITE's data, or the extent lists a
   * BLOCK_STATUS builds (up to BLOCK_STATUS_EXTENTS_MAX per context, two JS
   * numbers each; its reply is half that). Other requests hold nothing.
   */
  #costBytes(request: NbdRequest): number {
    if (request.type === CMD_READ || request.type === CMD_WRITE) return request.lengthBytes;
    if (request.type !== CMD_BLOCK_STATUS) return 0;
    const contexts = (this.#baseAllocation ? 1 : 0) + (this.#allocationDepth ? 1 : 0) + this.#dirtyBitmaps.length;
    const extents = request.flags & CMD_FLAG_REQ_ONE ? 2 : Math.min(BLOCK_STATUS_EXTENTS_MAX, Math.ceil(request.lengthBytes / 512));
    return contexts * extents * 16;
  }

  /**
   * A WRITE without FUA done synchronously (NbdExport.writeSync) and replied
   * to at once: no promise, no in-flight accounting. False (nothing done)
   * when the export cannot, or should not, write synchronously.
   */
  #writeNow(request: NbdRequest, payload: Buffer, exp: NbdExport): boolean {
    if (payload.length > WRITE_SYNC_BYTES_MAX || (payload.length >= LARGE_WRITE_BYTES && this.env.syncLargeWrites?.() !== true)) return false;
    let written: boolean;
    try {
      written = exp.writeSync(request.offset, payload);
    } catch (error) {
      this.#writeSettled(request, payload, { error });
      return true;
    }
    if (written) this.#writeSettled(request, payload, null);
    return written;
  }

  /**
   * A WRITE without FUA, the hot path of write workloads: a promise chain
   * without #execute's async frame (two microtask hops fewer per request).
   * Never rejects.
   */
  #write(request: NbdRequest, payload: Buffer, exp: NbdExport): Promise<void> {
    return exp.run((device) => device.write(request.offset, payload)).then(
      () => this.#writeSettled(request, payload, null),
      (error: unknown) => this.#writeSettled(request, payload, { error }),
    );
  }

  /** A WRITE without FUA is done (`failure` null) or failed: its payload back to the pool, its reply sent (#writeNow, #write). */
  #writeSettled(request: NbdRequest, payload: Buffer, failure: { error: unknown } | null): void {
    this.#pool.give(payload);
    if (failure === null) this.#sendSimpleReply(0, request.cookieHi, request.cookieLo);
    else this.#replyError(request, nbdErrnoFor(failure.error), errorMessageOf(failure.error));
  }

  /** Runs one validated request and sends its reply; never rejects. `zeroData`: a WRITE whose data --detect-zeroes found all zero. */
  async #execute(request: NbdRequest, exp: NbdExport, zeroData = false): Promise<void> {
    try {
      switch (request.type) {
        case CMD_READ:
          await this.#read(request, exp);
          return;
        case CMD_WRITE: {
          const payload = request.payload;
          if (payload !== null) {
            try {
              if (zeroData) {
                // qemu's detect-zeroes (bdrv_aligned_pwritev): all-zero data becomes a zero write.
                const unmap = exp.detectZeroes === "unmap";
                await exp.run((device) => device.writeZeroes(request.offset, payload.length, { unmap }));
              } else {
                await exp.run((device) => device.write(request.offset, payload));
              }
            } finally {
              this.#pool.give(payload);
            }
          }
          if (request.flags & CMD_FLAG_FUA) await exp.flush();
          break;
        }
        case CMD_FLUSH:
          await exp.flush();
          break;
        case CMD_TRIM:
          // Without discard (qemu-nbd's default) a TRIM is a hint not taken, as in QEMU without BDRV_O_UNMAP.
          if (request.lengthBytes > 0 && exp.discard) await exp.run((device) => device.discard(request.offset, request.lengthBytes));
          if (request.flags & CMD_FLAG_FUA) await exp.flush();
          break;
        case CMD_WRITE_ZEROES: {
          if (request.flags & CMD_FLAG_FAST_ZERO && exp.device.zeroesAreFast?.(request.offset, request.lengthBytes) !== true) {
            this.#replyError(request, NBD_ENOTSUP, "fast zeroing is not possible for this range");
            return;
          }
          const unmap = (request.flags & CMD_FLAG_NO_HOLE) === 0 && exp.discard;
          if (request.lengthBytes > 0) await exp.run((device) => device.writeZeroes(request.offset, request.lengthBytes, { unmap }));
          if (request.flags & CMD_FLAG_FUA) await exp.flush();
          break;
        }
        case CMD_CACHE:
          // A read-ahead hint; the page cache and the metadata caches do this already.
          break;
        case CMD_BLOCK_STATUS:
          await this.#blockStatus(request, exp);
          return;
      }
      this.#sendSimpleReply(0, request.cookieHi, request.cookieLo);
    } catch (error) {
      this.#replyError(request, nbdErrnoFor(error), errorMessageOf(error));
    }
  }

  /** The READ is answered with all its data in one reply (a simple reply, or one data chunk). */
  #readsWhole(request: NbdRequest): boolean {
    if (!this.#structuredReplies) return true;
    return request.lengthBytes > 0 && (request.lengthBytes < SPARSE_READ_MIN_BYTES || (request.flags & CMD_FLAG_DF) !== 0);
  }

  /**
   * A READ answered in one reply: the data is read straight into the reply
   * buffer after its header. A promise chain without an async frame, as
   * #write. Never rejects.
   */
  #readWhole(request: NbdRequest, exp: NbdExport): Promise<void> {
    const { offset, lengthBytes, cookieHi, cookieLo } = request;
    const headerBytes = this.#structuredReplies ? DATA_CHUNK_PREFIX_BYTES : SIMPLE_REPLY_HEADER_BYTES;
    const reply = this.#pool.take(headerBytes + lengthBytes);
    if (this.#structuredReplies) {
      writeChunkHeader(reply, 0, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookieHi, cookieLo, 8 + lengthBytes);
      writeU64(reply, offset, STRUCTURED_REPLY_HEADER_BYTES);
    } else {
      writeSimpleReplyHeader(reply, 0, 0, cookieHi, cookieLo);
    }
    return exp.run((device) => device.read(offset, reply.subarray(headerBytes))).then(
      () => this.#send(reply, true),
      (error: unknown) => {
        this.#pool.give(reply);
        this.#replyError(request, nbdErrnoFor(error), errorMessageOf(error));
      },
    );
  }

  /** A structured READ that #readsWhole does not take: empty, or split into data and hole chunks. */
  async #read(request: NbdRequest, exp: NbdExport): Promise<void> {
    const { offset, lengthBytes, cookieHi, cookieLo } = request;
    if (lengthBytes === 0) {
      this.#send(encodeChunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookieHi, cookieLo));
      return;
    }
    await exp.run(async (device) => {
      const runs = await readRuns(device, offset, lengthBytes);
      let replyBytes = 0;
      for (const run of runs) replyBytes += run.hole ? HOLE_CHUNK_BYTES : DATA_CHUNK_PREFIX_BYTES + run.lengthBytes;
      const reply = this.#pool.take(replyBytes);
      const reads: Promise<void>[] = [];
      let at = 0;
      runs.forEach((run, index) => {
        const flags = index === runs.length - 1 ? REPLY_FLAG_DONE : 0;
        if (run.hole) {
          writeChunkHeader(reply, at, flags, REPLY_TYPE_OFFSET_HOLE, cookieHi, cookieLo, 12);
          writeU64(reply, run.guestOffset, at + STRUCTURED_REPLY_HEADER_BYTES);
          reply.writeUInt32BE(run.lengthBytes, at + STRUCTURED_REPLY_HEADER_BYTES + 8);
          at += HOLE_CHUNK_BYTES;
          return;
        }
        writeChunkHeader(reply, at, flags, REPLY_TYPE_OFFSET_DATA, cookieHi, cookieLo, 8 + run.lengthBytes);
        writeU64(reply, run.guestOffset, at + STRUCTURED_REPLY_HEADER_BYTES);
        const dataAt = at + DATA_CHUNK_PREFIX_BYTES;
        reads.push(device.read(run.guestOffset, reply.subarray(dataAt, dataAt + run.lengthBytes)));
        at += DATA_CHUNK_PREFIX_BYTES + run.lengthBytes;
      });
      // Every read settles before the buffer can go back to the pool (and before run() counts the
      // request done): after one failure the others may still be filling it.
      try {
        await settleAll(reads);
      } catch (error) {
        this.#pool.give(reply);
        throw error;
      }
      this.#send(reply, true);
    });
  }

  async #blockStatus(request: NbdRequest, exp: NbdExport): Promise<void> {
    const reqOne = (request.flags & CMD_FLAG_REQ_ONE) !== 0;
    const answer = await exp.run((device) =>
      queryBlockStatus(device, request.offset, request.lengthBytes, {
        baseAllocation: this.#baseAllocation,
        allocationDepth: this.#allocationDepth,
        reqOne,
      }),
    );
    const chunks: Array<[number, { lengths: number[]; values: number[] }]> = [];
    if (answer.baseAllocation !== null) chunks.push([META_ID_BASE_ALLOCATION, answer.baseAllocation]);
    if (answer.allocationDepth !== null) chunks.push([META_ID_ALLOCATION_DEPTH, answer.allocationDepth]);
    for (const index of this.#dirtyBitmaps) {
      chunks.push([META_ID_DIRTY_BITMAP + index, dirtyBitmapExtents(exp.dirtyBitmaps[index].read(), request.offset, request.lengthBytes, reqOne)]);
    }
    chunks.forEach(([contextId, list], index) => {
      const flags = index === chunks.length - 1 ? REPLY_FLAG_DONE : 0;
      this.#send(encodeBlockStatusChunk(flags, request.cookieHi, request.cookieLo, contextId, list.lengths, list.values));
    });
  }

  #replyError(request: NbdRequest, errno: number, message: string): void {
    this.env.log?.(`${this.remote}: request type ${request.type} failed: errno ${errno}: ${message}`);
    if (this.#structuredReplies) {
      this.#send(encodeErrorChunk(REPLY_FLAG_DONE, request.cookieHi, request.cookieLo, errno, message, ERROR_MESSAGE_BYTES_MAX));
    } else {
      this.#sendSimpleReply(errno, request.cookieHi, request.cookieLo);
    }
  }

  // ---- writing and closing ----

  #writable(): boolean {
    const socket = this.#socket;
    return this.#phase !== "closed" && !socket.destroyed && !socket.writableEnded;
  }

  /** Queue a reply; a `pooled` buffer goes back to the pool once the socket (or the batch copy) is done with it. */
  #send(buffer: Buffer, pooled = false): void {
    if (!this.#writable()) {
      if (pooled) this.#pool.give(buffer);
      return;
    }
    if (buffer.length <= BATCHED_REPLY_BYTES_MAX) {
      const at = this.#reserve(buffer.length);
      buffer.copy(this.#batch!, at);
      if (pooled) this.#pool.give(buffer);
      return;
    }
    // Send big replies at once, while the data just read is still in the CPU cache.
    this.#flushBatch();
    this.#queueWrite(buffer, buffer, pooled);
  }

  /**
   * Write `data` (a view of `owner`) to the socket, counting the memory it
   * holds until the write is done; a `pooled` owner then goes back to the
   * pool. A pump paused by that memory starts again as it is released.
   */
  #queueWrite(data: Buffer, owner: Buffer, pooled: boolean): void {
    const heldBytes = owner.buffer.byteLength + QUEUED_WRITE_OVERHEAD_BYTES;
    this.#queuedWriteBytes += heldBytes;
    this.#socket.write(data, () => {
      this.#queuedWriteBytes -= heldBytes;
      if (pooled) this.#pool.give(owner);
      if (this.#socketPaused && this.#phase === "transmission") this.#pump();
    });
  }

  /** A simple reply, encoded straight into the batch. */
  #sendSimpleReply(errno: number, cookieHi: number, cookieLo: number): void {
    if (!this.#writable()) return;
    const at = this.#reserve(SIMPLE_REPLY_HEADER_BYTES);
    writeSimpleReplyHeader(this.#batch!, at, errno, cookieHi, cookieLo);
  }

  /** Room for `lengthBytes` (at most BATCHED_REPLY_BYTES_MAX) in the batch: its offset there. */
  #reserve(lengthBytes: number): number {
    if (this.#batch !== null && this.#batchBytes + lengthBytes > this.#batch.length) this.#flushBatch();
    this.#batch ??= this.#pool.take(REPLY_BATCH_BYTES);
    if (!this.#batchFlushScheduled) {
      this.#batchFlushScheduled = true;
      process.nextTick(this.#flushBatchBound);
    }
    const at = this.#batchBytes;
    this.#batchBytes += lengthBytes;
    return at;
  }

  #flushBatchBound = (): void => {
    this.#batchFlushScheduled = false;
    this.#flushBatch();
  };

  /** Write the batched replies (before any later write, and before ending or handing off the socket). */
  #flushBatch(): void {
    const batch = this.#batch;
    if (batch === null) return;
    const lengthBytes = this.#batchBytes;
    this.#batch = null;
    this.#batchBytes = 0;
    if (lengthBytes === 0 || !this.#writable()) {
      this.#pool.give(batch);
      return;
    }
    this.#queueWrite(batch.subarray(0, lengthBytes), batch, true);
  }

  /** Stop reading; end the socket once in-flight requests have replied. */
  #drain(reason: string): void {
    if (this.#phase === "closed" || this.#phase === "draining") return;
    this.#closeReason ||= reason;
    this.#phase = "draining";
    if (this.#deadlineTimer !== null) clearTimeout(this.#deadlineTimer);
    this.#deadlineTimer = null;
    this.#socketPaused = true;
    this.#socket.pause();
    this.#endIfIdle();
  }

  #endIfIdle(): void {
    if (this.#inFlightRequests > 0) return;
    const socket = this.#socket;
    this.#flushBatch();
    if (socket.destroyed) return;
    socket.end(() => socket.destroy());
    // Every reply is queued: from now on only the client can hold the connection open, and one that
    // stops reading is cut off (the device's own slow requests never count against it).
    if (this.#deadlineTimer === null) {
      this.#deadlineTimer = setTimeout(() => this.#abort("drain timeout: the client did not take its last replies"), this.env.limits.drainTimeoutMs ?? DRAIN_TIMEOUT_MS);
      this.#deadlineTimer.unref();
    }
  }

  /** Close at once (protocol violation, timeout, socket error). */
  #abort(reason: string): void {
    if (this.#phase === "closed") return;
    this.#closeReason ||= reason;
    this.env.log?.(`${this.remote}: closing: ${reason}`);
    this.#flushBatch();
    this.#socket.destroy();
    this.#finalize();
  }

  #finalize(): void {
    if (this.#phase === "closed") return;
    this.#phase = "closed";
    if (this.#deadlineTimer !== null) clearTimeout(this.#deadlineTimer);
    this.#deadlineTimer = null;
    if (!this.#socket.destroyed) this.#socket.destroy();
    this.env.onClosed(this);
  }
}
