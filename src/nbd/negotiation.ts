/**
 * The option phase of the fixed newstyle handshake, as a pure step function:
 * (state, option, data) -> replies and what happens next. The connection
 * does the I/O; everything a client can get wrong is decided here, so the
 * unit tests drive it without sockets.
 *
 * Design notes
 * - Every option's data has already been read whole (the parser bounds it),
 *   so an option rejected for any reason never desyncs the stream.
 * - TLS (FORCEDTLS, as qemu-nbd with --tls-creds): until STARTTLS succeeds,
 *   every option but STARTTLS and ABORT gets ERR_TLS_REQD and EXPORT_NAME
 *   closes the connection. STARTTLS resets the negotiated state (structured
 *   replies, meta contexts): nbdkit's CVE-2021-3716 kept plaintext state.
 * - The metadata context selection remembers the export it was made for; GO
 *   or EXPORT_NAME for another export starts with none selected, and a new
 *   SET_META_CONTEXT replaces the selection even when it fails.
 * - Error strings are bounded (names are shortened for messages), since
 *   qemu asserted on over-long ones (CVE-2020-10761).
 * - Context ids are qemu-nbd 7.2's: base:allocation 0, qemu:allocation-depth 1,
 *   the export's dirty bitmaps (qemu:dirty-bitmap:NAME) 2 on.
 */
import {
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoText,
  encodeMetaContextEntry,
  encodeOptionReply,
  encodeServerEntry,
  decodeInfoRequest,
  decodeMetaContextRequest,
  sanitizeName,
  truncateUtf8,
} from "./codec.ts";
import type { NbdExport } from "./nbd-export.ts";
import {
  INFO_DESCRIPTION,
  INFO_NAME,
  META_ALLOCATION_DEPTH,
  META_BASE_ALLOCATION,
  META_DIRTY_BITMAP_PREFIX,
  META_ID_ALLOCATION_DEPTH,
  META_ID_BASE_ALLOCATION,
  META_ID_DIRTY_BITMAP,
  MINIMUM_BLOCK_BYTES,
  NAME_BYTES_MAX,
  OPTION_ERROR_MESSAGE_BYTES_MAX,
  OPTION_NAMES,
  OPT_ABORT,
  OPT_EXPORT_NAME,
  OPT_GO,
  OPT_INFO,
  OPT_LIST,
  OPT_LIST_META_CONTEXT,
  OPT_SET_META_CONTEXT,
  OPT_STARTTLS,
  OPT_STRUCTURED_REPLY,
  PAYLOAD_BYTES_MAX,
  PREFERRED_BLOCK_BYTES,
  REP_ACK,
  REP_ERR_INVALID,
  REP_ERR_POLICY,
  REP_ERR_TLS_REQD,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_INFO,
  REP_META_CONTEXT,
  REP_SERVER,
  TFLAG_CAN_MULTI_CONN,
  TFLAG_HAS_FLAGS,
  TFLAG_READ_ONLY,
  TFLAG_SEND_CACHE,
  TFLAG_SEND_DF,
  TFLAG_SEND_FAST_ZERO,
  TFLAG_SEND_FLUSH,
  TFLAG_SEND_FUA,
  TFLAG_SEND_TRIM,
  TFLAG_SEND_WRITE_ZEROES,
} from "./protocol.ts";

export interface NegotiationState {
  /** The client set C_FIXED_NEWSTYLE. */
  fixedNewstyle: boolean;
  /** The client set C_NO_ZEROES. */
  noZeroes: boolean;
  tlsActive: boolean;
  structuredReplies: boolean;
  /** Export the current meta context selection was made for (null: none made). */
  metaExportName: string | null;
  metaContextIds: number[];
}

export function initialNegotiationState(clientFlags: number): NegotiationState {
  return {
    fixedNewstyle: (clientFlags & 1) !== 0,
    noZeroes: (clientFlags & 2) !== 0,
    tlsActive: false,
    structuredReplies: false,
    metaExportName: null,
    metaContextIds: [],
  };
}

/** What the server offers a connection in negotiation. */
export interface NegotiationEnv {
  findExport(name: string): NbdExport | undefined;
  listExports(): Iterable<NbdExport>;
  /** TLS credentials are configured: TLS is then required (FORCEDTLS). */
  tlsConfigured: boolean;
  /** Advertise CAN_MULTI_CONN (more than one client may connect). */
  multiConn: boolean;
}

export type OptionOutcome =
  | { next: "continue"; replies: Buffer[] }
  | { next: "close"; replies: Buffer[]; reason: string }
  | { next: "starttls"; replies: Buffer[] }
  | { next: "transmission"; replies: Buffer[]; export: NbdExport; metaContextIds: number[] };

export function transmissionFlags(exp: NbdExport, structuredReplies: boolean, multiConn: boolean): number {
  let flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
  if (exp.readOnly) flags |= TFLAG_READ_ONLY;
  else flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
  if (structuredReplies) flags |= TFLAG_SEND_DF;
  if (multiConn) flags |= TFLAG_CAN_MULTI_CONN;
  return flags;
}

function optionName(option: number): string {
  return OPTION_NAMES[option] ?? "<unknown>";
}

function errorReply(option: number, replyType: number, message: string): Buffer {
  return encodeOptionReply(option, replyType, truncateUtf8(message, OPTION_ERROR_MESSAGE_BYTES_MAX));
}

function fail(option: number, replyType: number, message: string): OptionOutcome {
  return { next: "continue", replies: [errorReply(option, replyType, message)] };
}

export interface MetaContext {
  id: number;
  name: string;
}

/** The contexts an export offers. */
function offeredContexts(exp: NbdExport): MetaContext[] {
  const contexts: MetaContext[] = [{ id: META_ID_BASE_ALLOCATION, name: META_BASE_ALLOCATION }];
  if (exp.allocationDepth) contexts.push({ id: META_ID_ALLOCATION_DEPTH, name: META_ALLOCATION_DEPTH });
  exp.dirtyBitmaps.forEach((bitmap, index) => contexts.push({ id: META_ID_DIRTY_BITMAP + index, name: META_DIRTY_BITMAP_PREFIX + bitmap.name }));
  return contexts;
}

/**
 * Contexts matching the queries. LIST: no queries lists all, a namespace
 * ("base:", "qemu:") lists its contexts. SET: only exact names select.
 * Unknown names are ignored, not errors.
 */
export function matchMetaContexts(exp: NbdExport, queries: readonly string[], listing: boolean): MetaContext[] {
  const offered = offeredContexts(exp);
  if (listing && queries.length === 0) return offered;
  const matched: MetaContext[] = [];
  for (const query of queries) {
    for (const context of offered) {
      const namespaceMatch = listing && query.endsWith(":") && context.name.startsWith(query);
      if ((context.name === query || namespaceMatch) && !matched.includes(context)) matched.push(context);
    }
  }
  return matched;
}

function unknownExport(option: number, name: string): OptionOutcome {
  return fail(option, REP_ERR_UNKNOWN, `export '${sanitizeName(name)}' not present`);
}

function expectEmpty(option: number, data: Buffer): OptionOutcome | null {
  if (data.length === 0) return null;
  return fail(option, REP_ERR_INVALID, `option '${optionName(option)}' has unexpected length`);
}

function infoOrGo(state: NegotiationState, env: NegotiationEnv, option: number, data: Buffer): OptionOutcome {
  const decoded = decodeInfoRequest(data, optionName(option));
  if (!decoded.ok) return fail(option, REP_ERR_INVALID, decoded.error);
  const { name, infoTypes } = decoded.value;
  const exp = env.findExport(name);
  if (exp === undefined) return unknownExport(option, name);
  const flags = transmissionFlags(exp, state.structuredReplies, env.multiConn);
  // qemu-nbd's order: NAME (if requested), DESCRIPTION, BLOCK_SIZE, EXPORT, ACK.
  const replies: Buffer[] = [];
  if (infoTypes.includes(INFO_NAME)) replies.push(encodeOptionReply(option, REP_INFO, encodeInfoText(INFO_NAME, exp.name)));
  if (exp.description !== "") replies.push(encodeOptionReply(option, REP_INFO, encodeInfoText(INFO_DESCRIPTION, exp.description)));
  replies.push(encodeOptionReply(option, REP_INFO, encodeInfoBlockSize(MINIMUM_BLOCK_BYTES, PREFERRED_BLOCK_BYTES, PAYLOAD_BYTES_MAX)));
  replies.push(encodeOptionReply(option, REP_INFO, encodeInfoExport(exp.sizeBytes, flags)));
  replies.push(encodeOptionReply(option, REP_ACK));
  if (option === OPT_INFO) return { next: "continue", replies };
  return { next: "transmission", replies, export: exp, metaContextIds: selectedFor(state, exp) };
}

function selectedFor(state: NegotiationState, exp: NbdExport): number[] {
  return state.metaExportName === exp.name ? [...state.metaContextIds] : [];
}

function metaContext(state: NegotiationState, env: NegotiationEnv, option: number, data: Buffer): OptionOutcome {
  const setting = option === OPT_SET_META_CONTEXT;
  if (setting) {
    // The selection is replaced even when this request fails.
    state.metaExportName = null;
    state.metaContextIds = [];
  }
  if (!state.structuredReplies) {
    return fail(option, REP_ERR_INVALID, `request option '${optionName(option)}' when structured reply is not negotiated`);
  }
  const decoded = decodeMetaContextRequest(data, optionName(option));
  if (!decoded.ok) return fail(option, REP_ERR_INVALID, decoded.error);
  const { name, queries } = decoded.value;
  const exp = env.findExport(name);
  if (exp === undefined) return unknownExport(option, name);
  const matched = matchMetaContexts(exp, queries, !setting);
  if (setting) {
    state.metaExportName = exp.name;
    state.metaContextIds = matched.map((context) => context.id);
  }
  const replies = matched.map((context) => encodeOptionReply(option, REP_META_CONTEXT, encodeMetaContextEntry(setting ? context.id : 0, context.name)));
  replies.push(encodeOptionReply(option, REP_ACK));
  return { next: "continue", replies };
}

/** Handle one option in the fixed newstyle option phase. Mutates `state`. */
export function negotiateOption(state: NegotiationState, env: NegotiationEnv, option: number, data: Buffer): OptionOutcome {
  const tlsRequired = env.tlsConfigured && !state.tlsActive;
  if (!state.fixedNewstyle && option !== OPT_EXPORT_NAME) {
    // A non-fixed client cannot parse option replies.
    return { next: "close", replies: [], reason: `option ${option} from a client without fixed newstyle` };
  }
  if (tlsRequired && option !== OPT_STARTTLS && option !== OPT_ABORT) {
    if (option === OPT_EXPORT_NAME) return { next: "close", replies: [], reason: "EXPORT_NAME before TLS" };
    return fail(option, REP_ERR_TLS_REQD, "Option not permitted before TLS");
  }
  switch (option) {
    case OPT_EXPORT_NAME: {
      const name = data.toString("utf8");
      const exp = data.length <= NAME_BYTES_MAX ? env.findExport(name) : undefined;
      if (exp === undefined) return { next: "close", replies: [], reason: `export '${sanitizeName(name)}' not present` };
      const flags = transmissionFlags(exp, state.structuredReplies, env.multiConn);
      return { next: "transmission", replies: [encodeExportNameReply(exp.sizeBytes, flags, state.noZeroes)], export: exp, metaContextIds: selectedFor(state, exp) };
    }
    case OPT_ABORT:
      return { next: "close", replies: [encodeOptionReply(option, REP_ACK)], reason: "client aborted" };
    case OPT_LIST: {
      const invalid = expectEmpty(option, data);
      if (invalid !== null) return invalid;
      const replies: Buffer[] = [];
      for (const exp of env.listExports()) replies.push(encodeOptionReply(option, REP_SERVER, encodeServerEntry(exp.name, exp.description)));
      replies.push(encodeOptionReply(option, REP_ACK));
      return { next: "continue", replies };
    }
    case OPT_STARTTLS: {
      const invalid = expectEmpty(option, data);
      if (invalid !== null) return invalid;
      if (!env.tlsConfigured) return fail(option, REP_ERR_POLICY, "TLS not configured");
      if (state.tlsActive) return fail(option, REP_ERR_INVALID, "TLS already enabled");
      state.structuredReplies = false;
      state.metaExportName = null;
      state.metaContextIds = [];
      return { next: "starttls", replies: [encodeOptionReply(option, REP_ACK)] };
    }
    case OPT_INFO:
    case OPT_GO:
      return infoOrGo(state, env, option, data);
    case OPT_STRUCTURED_REPLY: {
      const invalid = expectEmpty(option, data);
      if (invalid !== null) return invalid;
      if (state.structuredReplies) return fail(option, REP_ERR_INVALID, "structured reply already negotiated");
      state.structuredReplies = true;
      return { next: "continue", replies: [encodeOptionReply(option, REP_ACK)] };
    }
    case OPT_LIST_META_CONTEXT:
    case OPT_SET_META_CONTEXT:
      return metaContext(state, env, option, data);
    default:
      // EXTENDED_HEADERS lands here too: newer clients then fall back to structured replies.
      return fail(option, REP_ERR_UNSUP, `Unsupported option ${option} (${optionName(option)})`);
  }
}
