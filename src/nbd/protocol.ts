/**
 * NBD protocol constants (NetworkBlockDevice/nbd doc/proto.md) and the
 * server's named limits. Values are taken from the spec, not from the nbd
 * repo's nbd.h (which gives BLOCK_STATUS the wrong reply type).
 *
 * Everything on the wire is big-endian. Names drop the NBD_ prefix.
 */

// Magic numbers. 64-bit ones are split in two u32 halves so no BigInt is needed.
export const NBDMAGIC_HI = 0x4e42444d; // "NBDM"
export const NBDMAGIC_LO = 0x41474943; // "AGIC"
export const IHAVEOPT_HI = 0x49484156; // "IHAV"
export const IHAVEOPT_LO = 0x454f5054; // "EOPT"
export const OPTION_REPLY_MAGIC_HI = 0x0003e889;
export const OPTION_REPLY_MAGIC_LO = 0x045565a9;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server, u16) and client flags (u32).
export const FLAG_FIXED_NEWSTYLE = 0x1;
export const FLAG_NO_ZEROES = 0x2;
export const CLIENT_FLAG_FIXED_NEWSTYLE = 0x1;
export const CLIENT_FLAG_NO_ZEROES = 0x2;
export const CLIENT_FLAGS_KNOWN = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;

// Options.
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;
export const OPT_EXTENDED_HEADERS = 11;

export const OPTION_NAMES: Readonly<Record<number, string>> = {
  [OPT_EXPORT_NAME]: "export name",
  [OPT_ABORT]: "abort",
  [OPT_LIST]: "list",
  [OPT_STARTTLS]: "starttls",
  [OPT_INFO]: "info",
  [OPT_GO]: "go",
  [OPT_STRUCTURED_REPLY]: "structured reply",
  [OPT_LIST_META_CONTEXT]: "list meta context",
  [OPT_SET_META_CONTEXT]: "set meta context",
  [OPT_EXTENDED_HEADERS]: "extended headers",
};

// Option reply types.
export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
const REP_ERROR_BIT = 0x80000000;
export const REP_ERR_UNSUP = REP_ERROR_BIT + 1;
export const REP_ERR_POLICY = REP_ERROR_BIT + 2;
export const REP_ERR_INVALID = REP_ERROR_BIT + 3;
export const REP_ERR_PLATFORM = REP_ERROR_BIT + 4;
export const REP_ERR_TLS_REQD = REP_ERROR_BIT + 5;
export const REP_ERR_UNKNOWN = REP_ERROR_BIT + 6;
export const REP_ERR_SHUTDOWN = REP_ERROR_BIT + 7;
export const REP_ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT + 8;
export const REP_ERR_TOO_BIG = REP_ERROR_BIT + 9;

export function isReplyError(replyType: number): boolean {
  return replyType >= REP_ERROR_BIT;
}

// Info types (NBD_OPT_INFO / NBD_OPT_GO).
export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

// Transmission flags (u16).
export const TFLAG_HAS_FLAGS = 0x0001;
export const TFLAG_READ_ONLY = 0x0002;
export const TFLAG_SEND_FLUSH = 0x0004;
export const TFLAG_SEND_FUA = 0x0008;
export const TFLAG_ROTATIONAL = 0x0010;
export const TFLAG_SEND_TRIM = 0x0020;
export const TFLAG_SEND_WRITE_ZEROES = 0x0040;
export const TFLAG_SEND_DF = 0x0080;
export const TFLAG_CAN_MULTI_CONN = 0x0100;
export const TFLAG_SEND_CACHE = 0x0400;
export const TFLAG_SEND_FAST_ZERO = 0x0800;

// Commands.
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;

export const COMMAND_NAMES: Readonly<Record<number, string>> = {
  [CMD_READ]: "read",
  [CMD_WRITE]: "write",
  [CMD_DISC]: "disconnect",
  [CMD_FLUSH]: "flush",
  [CMD_TRIM]: "trim",
  [CMD_CACHE]: "cache",
  [CMD_WRITE_ZEROES]: "write zeroes",
  [CMD_BLOCK_STATUS]: "block status",
};

// Command flags (u16).
export const CMD_FLAG_FUA = 0x01;
export const CMD_FLAG_NO_HOLE = 0x02;
export const CMD_FLAG_DF = 0x04;
export const CMD_FLAG_REQ_ONE = 0x08;
export const CMD_FLAG_FAST_ZERO = 0x10;

// Structured reply chunk types and flags.
export const REPLY_FLAG_DONE = 0x1;
export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
export const REPLY_TYPE_ERROR = 0x8001;
export const REPLY_TYPE_ERROR_OFFSET = 0x8002;

// Errno values on the wire.
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// base:allocation flags.
export const STATE_HOLE = 0x1;
export const STATE_ZERO = 0x2;
// qemu:dirty-bitmap:NAME flag.
export const STATE_DIRTY = 0x1;

export const META_BASE_ALLOCATION = "base:allocation";
export const META_ALLOCATION_DEPTH = "qemu:allocation-depth";
/** Prefix of a dirty bitmap's context name (qemu-nbd -B NAME). */
export const META_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:";
/** Context ids as qemu-nbd 7.2 numbers them; the export's bitmaps follow, from META_ID_DIRTY_BITMAP on. */
export const META_ID_BASE_ALLOCATION = 0;
export const META_ID_ALLOCATION_DEPTH = 1;
export const META_ID_DIRTY_BITMAP = 2;

// Wire sizes.
export const GREETING_BYTES = 18;
export const CLIENT_FLAGS_BYTES = 4;
export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_HEADER_BYTES = 20;
export const REQUEST_HEADER_BYTES = 28;
export const SIMPLE_REPLY_HEADER_BYTES = 16;
export const STRUCTURED_REPLY_HEADER_BYTES = 20;
/** EXPORT_NAME reply: size u64 + flags u16, then 124 zero bytes unless NO_ZEROES. */
export const EXPORT_NAME_REPLY_BYTES = 10;
export const EXPORT_NAME_PADDING_BYTES = 124;

// ---- Limits (each bounds memory or work a client can cause) ----

/**
 * Largest payload of READ and WRITE, advertised as the BLOCK_SIZE maximum
 * (as qemu-nbd 7.2). A connection buffers at most IN_FLIGHT_BYTES_MAX plus
 * one request of this size.
 */
export const PAYLOAD_BYTES_MAX = 32 * 1024 * 1024;
/** Advertised preferred block size. */
export const PREFERRED_BLOCK_BYTES = 4096;
/** Advertised minimum block size (byte-granular requests are served). */
export const MINIMUM_BLOCK_BYTES = 1;
/**
 * Largest option payload accepted in negotiation; a longer option closes the
 * connection (qemu closes above 32 MiB, nbdkit above 64 MiB; real clients
 * send under 5 KiB). Bounds handshake memory per connection.
 */
export const OPTION_DATA_BYTES_MAX = 64 * 1024;
/** Longest export name or metadata query (the spec's MUST limit). */
export const NAME_BYTES_MAX = 4096;
/** Options per handshake before the server gives up on the client (nbdkit: 32). */
export const OPTIONS_PER_HANDSHAKE_MAX = 256;
/** Time a client has to finish negotiating (qemu 9.1's fix for CVE-2024-7409). */
export const HANDSHAKE_TIMEOUT_MS = 10_000;
/**
 * Time a draining connection (DISC, server shutdown, a refused EXPORT_NAME)
 * has to take its last replies: a client that stops reading would otherwise
 * hold the connection, and a server's shutdown, forever.
 */
export const DRAIN_TIMEOUT_MS = 10_000;
/**
 * Request payload bytes a connection holds at once (write payloads received
 * and read replies not yet handed to the kernel). Past it the server stops
 * reading the socket until replies drain: back-pressure, not buffering.
 * Small on purpose: 4 MiB keeps 16 requests of 256 KiB (nbdcopy) or 4 of
 * 1 MiB in flight, enough to keep a Unix socket or a LAN link full, and the
 * reply buffers stay in the CPU cache between the file read and the socket
 * write. With 64 MiB, nbdcopy reads cost 0.83 s of CPU per GiB instead of
 * 0.57 s (bench/nbd.bench.ts) and the server's peak RSS grew by ~110 MiB.
 */
export const IN_FLIGHT_BYTES_MAX = 4 * 1024 * 1024;
/**
 * Replies up to this size are copied into the connection's reply batch and
 * leave together at the end of the tick in one write; larger ones (read
 * data) are written as soon as they are built. Copying 16 KiB costs about
 * what a socket write of its own costs in Node's stream code.
 */
export const BATCHED_REPLY_BYTES_MAX = 16 * 1024;
/** Size of one reply batch buffer (a full batch is written and a new one started). */
export const REPLY_BATCH_BYTES = 64 * 1024;
/**
 * READ bytes one pass of a connection's pump starts before it lets the
 * event loop turn (reads of page-cached files complete synchronously, and
 * their replies are sent from microtasks that run only after the pass).
 */
export const READ_BYTES_PER_PUMP_MAX = 256 * 1024;
/** Requests a connection processes at once; more wait in the socket. */
export const IN_FLIGHT_REQUESTS_MAX = 128;
/** Structured error messages stay under qemu's 1000-byte payload limit. */
export const ERROR_MESSAGE_BYTES_MAX = 512;
/** Option error strings (qemu's client accepts up to 4096). */
export const OPTION_ERROR_MESSAGE_BYTES_MAX = 512;
/** Extents per BLOCK_STATUS chunk (qemu sends at most 2^17; the spec says SHOULD be <= 2^20). */
export const BLOCK_STATUS_EXTENTS_MAX = 1 << 16;
/** First window of a BLOCK_STATUS walk; it doubles up to the window maximum. */
export const BLOCK_STATUS_WINDOW_FIRST_BYTES = 4 * 1024 * 1024;
export const BLOCK_STATUS_WINDOW_MAX_BYTES = 1024 * 1024 * 1024;
/** Reads at least this long are split into data and hole chunks; shorter ones are sent as data. */
export const SPARSE_READ_MIN_BYTES = 64 * 1024;
/** Default cap on connections per server, whatever -e says (qemu 9.1 defaults to 100). */
export const CONNECTIONS_HARD_MAX = 1024;
/** Connections waiting for a free slot (qemu-nbd -e N leaves them in the listen backlog). */
export const PENDING_CONNECTIONS_MAX = 128;
