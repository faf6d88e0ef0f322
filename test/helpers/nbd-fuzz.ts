/**
 * A seeded fuzzer for the NBD server at the byte level: random and mutated
 * handshakes and option sequences, then random transmission requests (every
 * command number, any flags, offsets and lengths around the export's end and
 * 2^64, oversized payloads, bad magic, clients that vanish mid-request),
 * against a target with a qcow2, a raw and a read-only export: one
 * in-process server (test/unit/nbd-fuzz.test.ts) or three `snapstack nbd`
 * processes, whose raw exports run in data workers
 * (test/interop/nbd-fuzz-cli.test.ts).
 *
 * What must hold, case after case (issue 5, "Bad input"; doc/proto.md):
 * - the server never throws (an uncaught exception fails the test run) and
 *   never leaves a client waiting: every option and every request except
 *   DISC gets one complete, well-formed reply, or the connection closes;
 * - closing is allowed only where the rules allow it (bad magic, unknown
 *   client flags, EXPORT_NAME of an unknown export, ABORT, an option whose
 *   data exceeds the server's bound, the client's own disconnect);
 * - a request is accepted only when it is valid, and valid plain requests
 *   succeed; the errno of the clear-cut refusals is the rule's;
 * - data reads back as a model of every export says (writes, zeroes, trims
 *   that were acknowledged), within the case and from a fresh client after it;
 * - every connection is gone once its client is (in-process), no server or
 *   data worker process died (processes).
 *
 * SNAPSTACK_SEED replays a run; SNAPSTACK_FUZZ_CASES sets the number of cases
 * of each kind (default 60; soaks use thousands).
 */
import type { TestContext } from "node:test";
import assert from "node:assert/strict";
import { createRandom, testSeed } from "./random.ts";
import { IHAVEOPT, OPTION_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, infoData, metaData, negotiate } from "../unit/nbd-raw-client.ts";
import type { RawNbdClient } from "../unit/nbd-raw-client.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const CASES_DEFAULT = 60;
/** A reply or a close that takes longer than this is a hang (generous: CI machines are shared). */
const REPLY_WAIT_MS = 10_000;
/** What a server's handshake timeout should be for the fuzzer (a client that stalls is dropped after it). */
export const FUZZ_HANDSHAKE_TIMEOUT_MS = 3_000;

const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const;
const FLAG = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 } as const;
const ALLOWED_FLAGS: Record<number, number> = {
  [CMD.READ]: FLAG.FUA | FLAG.DF,
  [CMD.WRITE]: FLAG.FUA,
  [CMD.FLUSH]: FLAG.FUA,
  [CMD.TRIM]: FLAG.FUA,
  [CMD.CACHE]: FLAG.FUA,
  [CMD.WRITE_ZEROES]: FLAG.FUA | FLAG.NO_HOLE | FLAG.FAST_ZERO,
  [CMD.BLOCK_STATUS]: FLAG.FUA | FLAG.REQ_ONE,
};
const MUTATING = new Set<number>([CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES]);
const ERRNOS = new Set([1, 5, 12, 22, 28, 75, 95, 108]);
const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const PAYLOAD_BYTES_MAX = 32 * MiB;
const OPTION_DATA_BYTES_MAX = 64 * KiB;
const ERROR_MESSAGE_LIMIT = 1000;
const TWO_64 = 1n << 64n;

type Random = ReturnType<typeof createRandom>;

/** What each export must read back as; `known` is 0 where a trim left the bytes up to the server. */
export interface ExportModel {
  name: string;
  sizeBytes: number;
  readOnly: boolean;
  bytes: Uint8Array;
  known: Uint8Array;
}

function markKnown(model: ExportModel, offset: number, data: Uint8Array | null, lengthBytes: number): void {
  if (data === null) model.bytes.fill(0, offset, offset + lengthBytes);
  else model.bytes.set(data, offset);
  model.known.fill(1, offset, offset + lengthBytes);
}

/** First byte offset where `got` disagrees with the model's known bytes, or -1. */
function mismatchAt(model: ExportModel, offset: number, got: Uint8Array): number {
  for (let i = 0; i < got.length; i++) if (model.known[offset + i] === 1 && model.bytes[offset + i] !== got[i]) return offset + i;
  return -1;
}

/** A fresh model: `initial` is what the export holds before the first case. */
export function exportModel(name: string, initial: Uint8Array, readOnly: boolean): ExportModel {
  return { name, sizeBytes: initial.length, readOnly, bytes: initial, known: new Uint8Array(initial.length).fill(1) };
}

/** Servers under test: every export of `models`, reached by name. */
export interface FuzzTarget {
  models: ExportModel[];
  connect(exportName: string): Promise<RawNbdClient>;
  /** The exports a connection from connect(exportName) can ask for (a `snapstack nbd` process serves one). */
  servedWith(exportName: string): ExportModel[];
  /** Throws when something is left behind or died; called between cases. */
  checkHealthy(): Promise<void>;
}

/** `n` bytes, or "closed" when the server closed first; a wait past REPLY_WAIT_MS is a hang and throws. */
async function readOrClosed(client: RawNbdClient, n: number, what: string): Promise<Buffer | "closed"> {
  try {
    return await client.read(n, REPLY_WAIT_MS);
  } catch (error) {
    if (client.closed) return "closed";
    throw new Error(`server hung: no ${what} within ${REPLY_WAIT_MS} ms (${(error as Error).message})`, { cause: error });
  }
}

async function expectClosed(client: RawNbdClient, why: string): Promise<void> {
  // Whatever the server still sends before closing is read and dropped.
  const deadline = Date.now() + REPLY_WAIT_MS;
  while (!client.closed && Date.now() < deadline) {
    const got = await readOrClosed(client, Math.max(1, client.pending), why).catch(() => "closed" as const);
    if (got === "closed") break;
  }
  assert.ok(await client.waitClosed(Math.max(1, deadline - Date.now())), `the server did not close the connection: ${why}`);
}

// ---------------------------------------------------------------------------
// Negotiation

function pickName(random: Random, models: ExportModel[]): string {
  const roll = random.int(10);
  if (roll < 6) return models[random.int(models.length)].name;
  if (roll < 8) return Buffer.from(random.bytes(random.int(40))).toString("latin1");
  return "x".repeat(4090 + random.int(20)); // around NAME_BYTES_MAX
}

/** Option data, well formed for the option most of the time, else mutated. */
function optionData(random: Random, option: number, models: ExportModel[]): Buffer {
  let data: Buffer;
  const name = pickName(random, models);
  const infos = Array.from({ length: random.int(4) }, () => (random.int(4) === 0 ? random.int(65536) : random.int(4)));
  const queries = Array.from({ length: random.int(4) }, () => ["base:allocation", "qemu:allocation-depth", "qemu:", "base:", "qemu:dirty-bitmap:x", ""][random.int(6)]);
  if (option === 7 || option === 6) data = infoData(name, infos);
  else if (option === 9 || option === 10) data = metaData(name, queries);
  else if (option === 1) data = Buffer.from(name, "latin1");
  else data = Buffer.alloc(0);
  const roll = random.int(10);
  if (roll === 0 && data.length > 0) return data.subarray(0, random.int(data.length)); // truncated
  if (roll === 1) return Buffer.concat([data, Buffer.from(random.bytes(1 + random.int(16)))]); // trailing bytes
  if (roll === 2 && data.length > 0) {
    const mutated = Buffer.from(data);
    for (let i = 0, n = 1 + random.int(4); i < n; i++) mutated[random.int(mutated.length)] = random.int(256);
    return mutated;
  }
  if (roll === 3) return Buffer.from(random.bytes(random.int(64)));
  return data;
}

function optionHeader(option: number, lengthBytes: number): Buffer {
  const header = Buffer.alloc(16);
  header.writeBigUInt64BE(IHAVEOPT, 0);
  header.writeUInt32BE(option >>> 0, 8);
  header.writeUInt32BE(lengthBytes >>> 0, 12);
  return header;
}

/** Reads option replies through the final one; "closed" if the server closed instead. */
async function optionReplies(client: RawNbdClient, option: number, trace: string): Promise<Array<{ type: number; data: Buffer }> | "closed"> {
  const replies: Array<{ type: number; data: Buffer }> = [];
  for (;;) {
    const header = await readOrClosed(client, 20, `reply to option ${option} (${trace})`);
    if (header === "closed") return "closed";
    assert.equal(header.readBigUInt64BE(0), OPTION_REPLY_MAGIC, `option reply magic (${trace})`);
    assert.equal(header.readUInt32BE(8), option >>> 0, `option reply echoes option ${option} (${trace})`);
    const type = header.readUInt32BE(12);
    const length = header.readUInt32BE(16);
    assert.ok(length <= 64 * KiB, `option reply of ${length} bytes (${trace})`);
    const data = length > 0 ? await readOrClosed(client, length, `option reply data (${trace})`) : Buffer.alloc(0);
    if (data === "closed") assert.fail(`the server closed inside an option reply (${trace})`);
    replies.push({ type, data });
    if (type >= 0x80000000) {
      assert.ok(type <= 0x8000000a, `known option error type, got 0x${type.toString(16)} (${trace})`);
      assert.ok(length < ERROR_MESSAGE_LIMIT, `option error message of ${length} bytes (${trace})`);
      return replies;
    }
    assert.ok([1, 2, 3, 4].includes(type), `known option reply type, got ${type} (${trace})`);
    if (type === 1) return replies;
    assert.ok(replies.length < 10_000, `endless option replies (${trace})`);
  }
}

/** After GO / EXPORT_NAME: the export works (a read of its first bytes), then DISC. */
async function checkTransmission(client: RawNbdClient, model: ExportModel, structured: boolean, trace: string): Promise<void> {
  const length = Math.min(512, model.sizeBytes);
  client.write(requestHeader(CMD.READ, 0, 77n, 0n, length));
  const replies = await collectReplies(client, new Map([[77n, { type: CMD.READ, flags: 0, offset: 0n, length }]]), structured, trace);
  assert.notEqual(replies, "closed", `the server closed on a plain READ after the handshake (${trace})`);
  const reply = (replies as Map<bigint, ReplyResult>).get(77n)!;
  assert.equal(reply.errno, 0, `READ after the handshake failed (${trace})`);
  assert.equal(mismatchAt(model, 0, reply.data!), -1, `READ after the handshake returned other data (${trace})`);
  client.write(requestHeader(CMD.DISC, 0, 78n, 0n, 0));
  await expectClosed(client, `DISC (${trace})`);
}

async function negotiationCase(random: Random, target: FuzzTarget, models: ExportModel[], trace: string[]): Promise<void> {
  const served = models[random.int(models.length)];
  const client = await target.connect(served.name);
  models = target.servedWith(served.name);
  try {
    const greeting = await readOrClosed(client, 18, "greeting");
    assert.notEqual(greeting, "closed", "no greeting");
    const flagRoll = random.int(20);
    const clientFlags = flagRoll < 16 ? 3 : flagRoll === 16 ? 1 : flagRoll === 17 ? 0 : flagRoll === 18 ? 2 : random.int(2 ** 32);
    trace.push(`flags 0x${clientFlags.toString(16)}`);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(clientFlags >>> 0);
    client.write(flags);
    if (clientFlags & ~3) return await expectClosed(client, `unknown client flags 0x${clientFlags.toString(16)}`);
    const noZeroes = (clientFlags & 2) !== 0;
    // Without FIXED_NEWSTYLE a server may close on any option it does not like (doc/proto.md).
    const fixed = (clientFlags & 1) !== 0;
    let structured = false;
    for (let step = 0, steps = 1 + random.int(8); step < steps; step++) {
      const options = [1, 2, 3, 5, 6, 7, 8, 9, 10, 11, random.int(64), random.int(2 ** 32)];
      const option = options[random.int(options.length)] >>> 0;
      const roll = random.int(40);
      if (roll === 0) {
        // Declared data beyond the server's bound, none sent: the server may not wait for it.
        const declared = OPTION_DATA_BYTES_MAX + 1 + random.int(2 ** 31);
        trace.push(`option ${option} declaring ${declared} bytes`);
        client.write(optionHeader(option, declared));
        return await expectClosed(client, `option data of ${declared} bytes`);
      }
      if (roll === 1) {
        trace.push("bad option magic");
        const header = optionHeader(option, 0);
        header[random.int(8)] ^= 1 + random.int(255);
        client.write(header);
        return await expectClosed(client, "bad option magic");
      }
      const data = optionData(random, option, models);
      const text = `option ${option} with ${data.length} bytes ${data.subarray(0, 24).toString("hex")}`;
      trace.push(text);
      client.write(Buffer.concat([optionHeader(option, data.length), data]));
      if (option === 1) {
        // EXPORT_NAME: transmission starts, or the server closes (unknown export).
        const name = data.toString("utf8");
        const model = models.find((m) => Buffer.from(m.name, "utf8").equals(data));
        const info = await readOrClosed(client, noZeroes ? 10 : 134, `EXPORT_NAME reply (${text})`);
        if (info === "closed") {
          assert.equal(model, undefined, `EXPORT_NAME of export ${JSON.stringify(name)} closed the connection`);
          return;
        }
        assert.ok(model !== undefined, `EXPORT_NAME of an unknown export was accepted (${text})`);
        assert.equal(Number(info.readBigUInt64BE(0)), model.sizeBytes, "EXPORT_NAME size");
        return await checkTransmission(client, model, structured, text);
      }
      const replies = await optionReplies(client, option, text);
      if (replies === "closed") {
        // Only ABORT ends the handshake here; every other option gets a reply from a fixed-newstyle server.
        if (fixed) assert.equal(option, 2, `the server closed instead of replying to ${text}`);
        return;
      }
      const final = replies[replies.length - 1];
      if (option === 2) return await expectClosed(client, "ABORT");
      if (option === 5) assert.notEqual(final.type, 1, "STARTTLS acknowledged by a server without TLS");
      if (option === 8 && final.type === 1) structured = true;
      if (option === 11 && final.type === 1) return; // extended headers: this client does not speak them
      if (option === 7 && final.type === 1) {
        assert.ok(data.length >= 6, `GO with ${data.length} bytes of data acknowledged (${text})`);
        const model = models.find((m) => Buffer.from(m.name, "utf8").equals(data.subarray(4, 4 + data.readUInt32BE(0))));
        assert.ok(model !== undefined, `GO accepted for an unknown export (${text})`);
        const exportInfo = replies.find((r) => r.type === 3 && r.data.length >= 12 && r.data.readUInt16BE(0) === 0);
        assert.ok(exportInfo !== undefined, "GO without NBD_INFO_EXPORT");
        assert.equal(Number(exportInfo.data.readBigUInt64BE(2)), model.sizeBytes, "GO size");
        return await checkTransmission(client, model, structured, text);
      }
    }
    // The client goes away in the middle of the handshake: it must cost nothing (checked by the caller).
  } finally {
    client.close();
  }
}

// ---------------------------------------------------------------------------
// Transmission

interface SentRequest {
  type: number;
  flags: number;
  offset: bigint;
  length: number;
  data?: Uint8Array;
}

interface ReplyResult {
  errno: number;
  message?: string;
  /** READ: the bytes (holes filled with zeroes). */
  data?: Uint8Array;
}

function requestHeader(type: number, flags: number, cookie: bigint, offset: bigint, length: number, magic = REQUEST_MAGIC): Buffer {
  const header = Buffer.alloc(28);
  header.writeUInt32BE(magic >>> 0, 0);
  header.writeUInt16BE(flags, 4);
  header.writeUInt16BE(type, 6);
  header.writeBigUInt64BE(cookie, 8);
  header.writeBigUInt64BE(((offset % TWO_64) + TWO_64) % TWO_64, 16);
  header.writeUInt32BE(length >>> 0, 24);
  return header;
}

function pickOffset(random: Random, sizeBytes: number): bigint {
  const size = BigInt(sizeBytes);
  switch (random.int(10)) {
    case 0:
      return 0n;
    case 1:
      return size - BigInt(1 + random.int(4096));
    case 2:
      return size + BigInt(random.int(8192));
    case 3:
      return TWO_64 - BigInt(1 + random.int(8192));
    case 4:
      return (1n << 63n) + BigInt(random.int(4096));
    case 5:
      return BigInt(random.int(2 ** 31)) * 4096n;
    default:
      return BigInt(random.int(sizeBytes));
  }
}

function pickLength(random: Random): number {
  switch (random.int(12)) {
    case 0:
      return 0;
    case 1:
      return 1 + random.int(16);
    case 2:
      return PAYLOAD_BYTES_MAX;
    case 3:
      return PAYLOAD_BYTES_MAX + 1;
    case 4:
      return 2 ** 32 - 1 - random.int(4);
    case 5:
      return 64 * KiB * (1 + random.int(8));
    default:
      return 1 + random.int(64 * KiB);
  }
}

function pickFlags(random: Random, type: number): number {
  const allowed = ALLOWED_FLAGS[type] ?? 0;
  if (random.int(5) === 0) return random.int(65536);
  let flags = 0;
  for (let bit = 1; bit <= 16; bit <<= 1) if (allowed & bit && random.int(3) === 0) flags |= bit;
  return flags;
}

function pickType(random: Random): number {
  const weighted = [CMD.READ, CMD.READ, CMD.READ, CMD.WRITE, CMD.WRITE, CMD.WRITE, CMD.WRITE_ZEROES, CMD.TRIM, CMD.FLUSH, CMD.CACHE, CMD.BLOCK_STATUS, CMD.BLOCK_STATUS];
  const roll = random.int(weighted.length + 2);
  if (roll < weighted.length) return weighted[roll];
  return roll === weighted.length ? 8 + random.int(8) : random.int(65536);
}

/**
 * Reads replies until every cookie in `sent` has its complete reply; checks
 * each against the protocol. "closed" if the server closed first.
 */
async function collectReplies(client: RawNbdClient, sent: Map<bigint, SentRequest>, structured: boolean, trace: string): Promise<Map<bigint, ReplyResult> | "closed"> {
  const results = new Map<bigint, ReplyResult>();
  const partial = new Map<bigint, { result: ReplyResult; covered: number; contexts: Set<number> }>();
  while (results.size < sent.size) {
    const magicBytes = await readOrClosed(client, 4, `a reply (${results.size}/${sent.size} complete; ${trace})`);
    if (magicBytes === "closed") return "closed";
    const magic = magicBytes.readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const rest = await readOrClosed(client, 12, "a simple reply");
      if (rest === "closed") assert.fail(`closed inside a simple reply (${trace})`);
      const errno = rest.readUInt32BE(0);
      const cookie = rest.readBigUInt64BE(4);
      const request = sent.get(cookie);
      assert.ok(request !== undefined && !results.has(cookie) && !partial.has(cookie), `simple reply for cookie ${cookie} that is not outstanding (${trace})`);
      assert.ok(errno === 0 || ERRNOS.has(errno), `errno ${errno} is one of NBD's (${trace})`);
      if (structured) assert.ok(request.type !== CMD.READ && request.type !== CMD.BLOCK_STATUS, `simple reply to a ${request.type === CMD.READ ? "READ" : "BLOCK_STATUS"} with structured replies on (${trace})`);
      let data: Uint8Array | undefined;
      if (errno === 0 && request.type === CMD.READ) {
        const got = await readOrClosed(client, request.length, "READ data");
        if (got === "closed") assert.fail(`closed inside READ data (${trace})`);
        data = got;
      }
      results.set(cookie, { errno, data });
      continue;
    }
    assert.equal(magic, STRUCTURED_REPLY_MAGIC, `reply magic 0x${magic.toString(16)} (${trace})`);
    assert.ok(structured, `structured reply without structured replies negotiated (${trace})`);
    const head = await readOrClosed(client, 16, "a chunk header");
    if (head === "closed") assert.fail(`closed inside a chunk header (${trace})`);
    const chunkFlags = head.readUInt16BE(0);
    const type = head.readUInt16BE(2);
    const cookie = head.readBigUInt64BE(4);
    const length = head.readUInt32BE(12);
    const request = sent.get(cookie);
    assert.ok(request !== undefined && !results.has(cookie), `chunk for cookie ${cookie} that is not outstanding (${trace})`);
    assert.ok(length <= request.length + 64 * KiB + 4096, `chunk of ${length} bytes for a request of ${request.length} (${trace})`);
    const payload = length > 0 ? await readOrClosed(client, length, "a chunk payload") : Buffer.alloc(0);
    if (payload === "closed") assert.fail(`closed inside a chunk (${trace})`);
    let state = partial.get(cookie);
    if (state === undefined) {
      state = { result: { errno: 0, data: request.type === CMD.READ ? new Uint8Array(request.length) : undefined }, covered: 0, contexts: new Set() };
      partial.set(cookie, state);
    }
    const inRange = (offset: bigint, size: number): boolean => offset >= request.offset && offset + BigInt(size) <= request.offset + BigInt(request.length);
    switch (type) {
      case 0:
        assert.equal(length, 0, `NONE chunk with a payload (${trace})`);
        assert.ok(chunkFlags & 1, `NONE chunk without DONE (${trace})`);
        break;
      case 1: {
        assert.equal(request.type, CMD.READ, `OFFSET_DATA for a non-READ (${trace})`);
        assert.ok(length > 8, `OFFSET_DATA of ${length} bytes (${trace})`);
        const offset = payload.readBigUInt64BE(0);
        assert.ok(inRange(offset, length - 8), `OFFSET_DATA at ${offset} outside the request (${trace})`);
        state.result.data!.set(payload.subarray(8), Number(offset - request.offset));
        state.covered += length - 8;
        break;
      }
      case 2: {
        assert.equal(request.type, CMD.READ, `OFFSET_HOLE for a non-READ (${trace})`);
        assert.equal(length, 12, `OFFSET_HOLE of ${length} bytes (${trace})`);
        const offset = payload.readBigUInt64BE(0);
        const size = payload.readUInt32BE(8);
        assert.ok(size > 0 && inRange(offset, size), `OFFSET_HOLE at ${offset}+${size} outside the request (${trace})`);
        state.covered += size;
        break;
      }
      case 5: {
        assert.equal(request.type, CMD.BLOCK_STATUS, `BLOCK_STATUS chunk for another command (${trace})`);
        assert.ok(length >= 12 && (length - 4) % 8 === 0, `BLOCK_STATUS chunk of ${length} bytes (${trace})`);
        const context = payload.readUInt32BE(0);
        assert.ok(!state.contexts.has(context), `two BLOCK_STATUS chunks for context ${context} (${trace})`);
        state.contexts.add(context);
        const extents = (length - 4) / 8;
        if (request.flags & FLAG.REQ_ONE) assert.equal(extents, 1, `REQ_ONE answered with ${extents} extents (${trace})`);
        for (let i = 0; i < extents; i++) assert.ok(payload.readUInt32BE(4 + 8 * i) > 0, `BLOCK_STATUS extent of length 0 (${trace})`);
        break;
      }
      case 0x8001:
      case 0x8002: {
        assert.ok(length >= 6, `error chunk of ${length} bytes (${trace})`);
        const errno = payload.readUInt32BE(0);
        const messageBytes = payload.readUInt16BE(4);
        assert.ok(ERRNOS.has(errno), `error chunk errno ${errno} (${trace})`);
        assert.ok(messageBytes < ERROR_MESSAGE_LIMIT, `error message of ${messageBytes} bytes (${trace})`);
        assert.equal(length, 6 + messageBytes + (type === 0x8002 ? 8 : 0), `error chunk length (${trace})`);
        state.result.errno ||= errno;
        state.result.message = payload.subarray(6, 6 + messageBytes).toString();
        break;
      }
      default:
        assert.fail(`unknown chunk type ${type} (${trace})`);
    }
    if (chunkFlags & 1) {
      partial.delete(cookie);
      if (request.type === CMD.READ && state.result.errno === 0) assert.equal(state.covered, request.length, `READ chunks cover ${state.covered} of ${request.length} bytes (${trace})`);
      if (request.type !== CMD.READ) state.result.data = undefined;
      results.set(cookie, state.result);
    }
  }
  return results;
}

interface Verdict {
  /** Only a valid request may succeed. */
  valid: boolean;
  /** A plain valid request that must succeed. */
  mustSucceed: boolean;
  /** The errno a clear-cut refusal must carry, if any. */
  errno?: number;
}

function judge(request: SentRequest, model: ExportModel, structured: boolean, hasContext: boolean): Verdict {
  const allowed = ALLOWED_FLAGS[request.type];
  const end = request.offset + BigInt(request.length);
  const inRange = request.offset <= BigInt(model.sizeBytes) && end <= BigInt(model.sizeBytes);
  if (allowed === undefined) return { valid: false, mustSucceed: false, errno: EINVAL };
  const flagsOk = (request.flags & ~allowed) === 0 && !(request.flags & FLAG.DF && !structured);
  const lengthOk = !((request.type === CMD.READ || request.type === CMD.WRITE) && request.length > PAYLOAD_BYTES_MAX);
  const writable = !MUTATING.has(request.type) || !model.readOnly;
  const statusOk = request.type !== CMD.BLOCK_STATUS || (structured && hasContext && request.length > 0);
  const valid = flagsOk && lengthOk && writable && statusOk && (request.type === CMD.FLUSH || inRange);
  const plain = (request.flags & ~FLAG.FUA) === 0 && request.length <= MiB;
  const zeroRange = request.offset === 0n && request.length === 0;
  const mustSucceed = valid && plain && ([CMD.READ, CMD.WRITE, CMD.WRITE_ZEROES, CMD.TRIM].includes(request.type as 0) || (request.type === CMD.FLUSH && zeroRange));
  let errno: number | undefined;
  if (flagsOk && lengthOk && (request.flags & ~FLAG.FUA) === 0) {
    if (!writable && inRange) errno = EPERM;
    else if (writable && !inRange && request.type === CMD.READ) errno = EINVAL;
    else if (writable && !inRange && (request.type === CMD.WRITE || request.type === CMD.WRITE_ZEROES)) errno = ENOSPC;
  }
  return { valid, mustSucceed, errno };
}

/** The batch's requests are abandoned unanswered: whatever they would change is up to the server. */
function forgetMutations(model: ExportModel, sent: Map<bigint, SentRequest>): void {
  for (const request of sent.values()) {
    if (!MUTATING.has(request.type) || request.offset >= BigInt(model.sizeBytes)) continue;
    const offset = Number(request.offset);
    model.known.fill(0, offset, Math.min(model.sizeBytes, offset + request.length));
  }
}

function overlaps(a: SentRequest, b: SentRequest): boolean {
  return a.offset < b.offset + BigInt(Math.max(1, b.length)) && b.offset < a.offset + BigInt(Math.max(1, a.length));
}

async function transmissionCase(random: Random, target: FuzzTarget, models: ExportModel[], trace: string[]): Promise<void> {
  const model = models[random.int(models.length)];
  const structured = random.int(10) < 7;
  const contexts = structured ? ["base:allocation", "qemu:allocation-depth"].filter(() => random.int(2) === 0) : undefined;
  trace.push(`export ${JSON.stringify(model.name)} structured ${structured} contexts ${contexts?.join(",") ?? "-"}`);
  const client = await target.connect(model.name);
  try {
    const negotiated = await negotiate(client, { name: model.name, structured, contexts });
    assert.equal(negotiated.sizeBytes, model.sizeBytes);
    const hasContext = negotiated.contextIds.size > 0;
    let cookie = 1n;
    for (let batch = 0, batches = 1 + random.int(6); batch < batches; batch++) {
      const sent = new Map<bigint, SentRequest>();
      const wire: Buffer[] = [];
      for (let i = 0, n = 1 + random.int(6); i < n; i++) {
        const type = pickType(random);
        const request: SentRequest = { type, flags: pickFlags(random, type), offset: pickOffset(random, model.sizeBytes), length: pickLength(random) };
        if (type === CMD.FLUSH && random.int(4) !== 0) [request.offset, request.length] = [0n, 0];
        const text = `#${cookie} type ${type} flags 0x${request.flags.toString(16)} offset ${request.offset} length ${request.length}`;
        if (random.int(60) === 0) {
          forgetMutations(model, sent);
          trace.push(`${text} with bad magic`);
          client.write(Buffer.concat([...wire, requestHeader(type, request.flags, cookie, request.offset, request.length, REQUEST_MAGIC ^ (1 << random.int(32)))]));
          return await expectClosed(client, "bad request magic");
        }
        if (type === CMD.WRITE && request.length > PAYLOAD_BYTES_MAX + 1) {
          // A payload of up to 4 GiB announced and never sent: the client vanishes mid-request.
          forgetMutations(model, sent);
          trace.push(`${text}, payload never sent, client gone`);
          client.write(Buffer.concat([...wire, requestHeader(type, request.flags, cookie, request.offset, request.length)]));
          return;
        }
        trace.push(text);
        let payload: Buffer | null = null;
        if (type === CMD.WRITE) {
          payload = request.length > MiB ? Buffer.alloc(request.length, 0x5a) : Buffer.from(random.bytes(request.length));
          request.data = payload;
        }
        wire.push(requestHeader(type, request.flags, cookie, request.offset, request.length));
        if (payload !== null) wire.push(payload);
        sent.set(cookie, request);
        cookie++;
      }
      client.write(Buffer.concat(wire));
      const results = await collectReplies(client, sent, structured, trace.slice(-8).join("; "));
      assert.notEqual(results, "closed", `the server closed the connection on valid framing (${trace.slice(-8).join("; ")})`);
      const replies = results as Map<bigint, ReplyResult>;
      const requests = [...sent.entries()];
      for (const [id, request] of requests) {
        const reply = replies.get(id)!;
        const verdict = judge(request, model, structured, hasContext);
        const what = `#${id} type ${request.type} flags 0x${request.flags.toString(16)} offset ${request.offset} length ${request.length} on ${JSON.stringify(model.name)}: errno ${reply.errno} ${reply.message ?? ""}`;
        if (reply.errno === 0) assert.ok(verdict.valid, `an invalid request succeeded: ${what}`);
        if (verdict.mustSucceed) assert.equal(reply.errno, 0, `a valid request failed: ${what}`);
        if (verdict.errno !== undefined && !verdict.valid) assert.equal(reply.errno, verdict.errno, `errno of ${what}`);
      }
      // The model: acknowledged mutations in request order; where two requests of the batch overlap
      // and one of them mutates, the server may have run them in either order.
      const conflicted = new Set<bigint>();
      for (const [a, ra] of requests) for (const [b, rb] of requests) if (a < b && (MUTATING.has(ra.type) || MUTATING.has(rb.type)) && overlaps(ra, rb)) conflicted.add(a).add(b);
      for (const [id, request] of requests) {
        const reply = replies.get(id)!;
        if (request.type === CMD.READ && reply.errno === 0 && !conflicted.has(id)) {
          const at = mismatchAt(model, Number(request.offset), reply.data!);
          assert.equal(at, -1, `READ #${id} at ${request.offset}+${request.length} of ${JSON.stringify(model.name)} differs from the model at ${at}`);
        }
        if (reply.errno !== 0 || !MUTATING.has(request.type) || request.length === 0) continue;
        const offset = Number(request.offset);
        if (conflicted.has(id) || request.type === CMD.TRIM) model.known.fill(0, offset, offset + request.length);
        else markKnown(model, offset, request.type === CMD.WRITE ? request.data! : null, request.length);
      }
    }
    if (random.int(2) === 0) {
      trace.push("DISC");
      client.write(requestHeader(CMD.DISC, 0, cookie, 0n, 0));
      await expectClosed(client, "DISC");
    }
  } finally {
    client.close();
  }
}

/** A fresh, well-behaved client reads random ranges of every export and finds the model's bytes. */
async function canary(random: Random, target: FuzzTarget, models: ExportModel[]): Promise<void> {
  for (const model of models) {
    const client = await target.connect(model.name);
    try {
      await negotiate(client, { name: model.name, structured: true });
      const sent = new Map<bigint, SentRequest>();
      const wire: Buffer[] = [];
      for (let i = 0; i < 4; i++) {
        const length = 1 + random.int(128 * KiB);
        const offset = random.int(model.sizeBytes - length);
        sent.set(BigInt(i + 1), { type: CMD.READ, flags: 0, offset: BigInt(offset), length });
        wire.push(requestHeader(CMD.READ, 0, BigInt(i + 1), BigInt(offset), length));
      }
      client.write(Buffer.concat(wire));
      const results = await collectReplies(client, sent, true, "canary");
      assert.notEqual(results, "closed", "the canary client was disconnected");
      for (const [id, request] of sent) {
        const reply = (results as Map<bigint, ReplyResult>).get(id)!;
        assert.equal(reply.errno, 0, `canary READ failed: ${reply.message}`);
        const at = mismatchAt(model, Number(request.offset), reply.data!);
        assert.equal(at, -1, `canary READ of ${JSON.stringify(model.name)} at ${request.offset}+${request.length} differs from the model at ${at}`);
      }
      client.write(requestHeader(CMD.DISC, 0, 99n, 0n, 0));
      await expectClosed(client, "canary DISC");
    } finally {
      client.close();
    }
  }
}

/**
 * The fuzz run: `CASES_DEFAULT` cases (SNAPSTACK_FUZZ_CASES) of `kind`, a
 * canary read of every export every 10 cases, the target's health checked
 * with it.
 */
export async function runNbdFuzz(t: TestContext, kind: "negotiation" | "transmission", target: FuzzTarget): Promise<void> {
  const cases = Number(process.env.SNAPSTACK_FUZZ_CASES ?? CASES_DEFAULT);
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (replay: SNAPSTACK_SEED=${seed}), ${cases} cases`);
  const random = createRandom(seed);
  const models = target.models;
  for (let index = 0; index < cases; index++) {
    const trace: string[] = [];
    try {
      if (kind === "negotiation") await negotiationCase(random, target, models, trace);
      else await transmissionCase(random, target, models, trace);
      if (index % 10 === 9 || index === cases - 1) {
        await target.checkHealthy();
        await canary(random, target, models);
      }
    } catch (error) {
      throw new Error(`seed ${seed}, case ${index}: ${(error as Error).message}\n  case: ${trace.join("\n        ")}`, { cause: error });
    }
  }
  await target.checkHealthy();
}
