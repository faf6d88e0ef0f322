/**
 * Validation of transmission-phase requests at the edge (nbdkit's
 * validate_request): every rule a client can break, decided before the
 * device is touched. Pure: the connection replies with the errno and message.
 *
 * Rules (doc/proto.md, and the reference servers' behaviour where it is silent):
 * - unknown command, unknown flag, or a flag not valid for the command or
 *   not advertised: EINVAL (FUA is accepted on every command, as both
 *   reference servers do);
 * - a write-type command on a read-only export: EPERM;
 * - READ, WRITE or CACHE longer than PAYLOAD_BYTES_MAX: EINVAL (the WRITE
 *   payload was drained by the parser without being held; qemu-nbd limits
 *   CACHE as it limits READ);
 * - out of range, including offsets that wrap 2^64: EINVAL for READ, TRIM,
 *   CACHE, BLOCK_STATUS and ENOSPC for WRITE and WRITE_ZEROES;
 * - BLOCK_STATUS without structured replies, without a selected context, or
 *   of length 0: EINVAL.
 * Zero-length READ/WRITE/TRIM/WRITE_ZEROES/CACHE succeed (qemu-nbd does).
 */
import {
  CMD_BLOCK_STATUS,
  CMD_CACHE,
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
  COMMAND_NAMES,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_EPERM,
  PAYLOAD_BYTES_MAX,
} from "./protocol.ts";
import type { NbdRequest } from "./nbd-parser.ts";

export interface RequestContext {
  sizeBytes: number;
  readOnly: boolean;
  structuredReplies: boolean;
  /** At least one metadata context is selected. */
  hasMetaContext: boolean;
}

export interface RequestRejection {
  errno: number;
  message: string;
}

/** Flags each command accepts (DF only with structured replies, checked below). */
const ALLOWED_FLAGS: Readonly<Record<number, number>> = {
  [CMD_READ]: CMD_FLAG_FUA | CMD_FLAG_DF,
  [CMD_WRITE]: CMD_FLAG_FUA,
  [CMD_FLUSH]: CMD_FLAG_FUA,
  [CMD_TRIM]: CMD_FLAG_FUA,
  [CMD_CACHE]: CMD_FLAG_FUA,
  [CMD_WRITE_ZEROES]: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
  [CMD_BLOCK_STATUS]: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
};

function reject(errno: number, message: string): RequestRejection {
  return { errno, message };
}

function describeOffset(offset: number): string {
  return Number.isSafeInteger(offset) ? String(offset) : `about ${offset.toExponential(3)}`;
}

/** Null when the request may run; else the error to reply with. */
export function validateRequest(request: NbdRequest, context: RequestContext): RequestRejection | null {
  const { type, flags, offset, lengthBytes } = request;
  const name = COMMAND_NAMES[type];
  const allowed = ALLOWED_FLAGS[type];
  if (name === undefined || allowed === undefined) return reject(NBD_EINVAL, `invalid request type (${type}) received`);
  if ((flags & ~allowed) !== 0 || (flags & CMD_FLAG_DF && !context.structuredReplies)) {
    return reject(NBD_EINVAL, `unsupported flags for command ${name} (got 0x${flags.toString(16)})`);
  }
  const writes = type === CMD_WRITE || type === CMD_WRITE_ZEROES || type === CMD_TRIM;
  if (writes && context.readOnly) return reject(NBD_EPERM, `export is read-only: ${name} refused`);
  if ((type === CMD_READ || type === CMD_WRITE || type === CMD_CACHE) && lengthBytes > PAYLOAD_BYTES_MAX) {
    return reject(NBD_EINVAL, `len (${lengthBytes}) is larger than max len (${PAYLOAD_BYTES_MAX})`);
  }
  if (type === CMD_BLOCK_STATUS) {
    if (!context.structuredReplies) return reject(NBD_EINVAL, "CMD_BLOCK_STATUS needs structured replies");
    if (!context.hasMetaContext) return reject(NBD_EINVAL, "CMD_BLOCK_STATUS not negotiated");
    if (lengthBytes === 0) return reject(NBD_EINVAL, "need non-zero length");
  }
  if (type === CMD_FLUSH) return null;
  if (offset > context.sizeBytes || lengthBytes > context.sizeBytes - offset) {
    const errno = type === CMD_WRITE || type === CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
    return reject(errno, `operation past EOF; From: ${describeOffset(offset)}, Len: ${lengthBytes}, Size: ${context.sizeBytes}`);
  }
  return null;
}
