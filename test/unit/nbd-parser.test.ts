/**
 * The NBD push parser: a stream of client flags, options and requests
 * (writes with payloads, an oversize write that is drained, a bad magic)
 * parses to the same messages however it is split into chunks: at every
 * single offset, into two and three pieces, and byte by byte.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { NbdParser, type NbdMessage, type ParserPhase } from "../../src/nbd/nbd-parser.ts";
import { createRandom, testSeed } from "../helpers/random.ts";

const LIMITS = { payloadBytesMax: 64, optionDataBytesMax: 100 };

function option(code: number, data: Buffer): Buffer {
  const header = Buffer.alloc(16);
  header.write("IHAVEOPT", 0, "latin1");
  header.writeUInt32BE(code, 8);
  header.writeUInt32BE(data.length, 12);
  return Buffer.concat([header, data]);
}

function request(type: number, cookie: number, offset: bigint, length: number, payload?: Buffer, flags = 0): Buffer {
  const header = Buffer.alloc(28);
  header.writeUInt32BE(0x25609513, 0);
  header.writeUInt16BE(flags, 4);
  header.writeUInt16BE(type, 6);
  header.writeBigUInt64BE(BigInt(cookie), 8);
  header.writeBigUInt64BE(offset, 16);
  header.writeUInt32BE(length, 24);
  return payload === undefined ? header : Buffer.concat([header, payload]);
}

const flags = Buffer.from([0, 0, 0, 3]);
const options = Buffer.concat([option(8, Buffer.alloc(0)), option(7, Buffer.from("0000000000", "hex")), option(0x7654321, Buffer.from("abcd"))]);
const payloadA = Buffer.alloc(40, 0xaa);
const dropped = Buffer.alloc(200, 0xdd); // over payloadBytesMax: drained, not held
const payloadB = Buffer.alloc(64, 0xbb);
const requests = Buffer.concat([
  request(0, 1, 0n, 4096),
  request(1, 2, 512n, payloadA.length, payloadA, 1),
  request(1, 3, 0n, dropped.length, dropped),
  request(1, 4, 0n, 0),
  request(1, 5, 0xfffffffffffffe00n, payloadB.length, payloadB),
  request(7, 6, 0n, 0xffffffff, undefined, 8),
  request(2, 7, 0n, 0),
]);
const badMagic = Buffer.from("deadbeef" + "00".repeat(24), "hex");

/** Takes the messages `parser` has ready; the phase advances as the connection would. */
function collector(parser: NbdParser): { messages: NbdMessage[]; drain(): void; stopped(): boolean } {
  const messages: NbdMessage[] = [];
  let stopped = false;
  const drain = (): void => {
    // Bad magic is terminal: the connection closes and parses nothing more.
    for (let message = parser.next(); message !== null; message = parser.next()) {
      messages.push(message);
      if (message.kind === "clientFlags") parser.phase = "options";
      // The third option ends negotiation in this script.
      if (message.kind === "option" && messages.filter((m) => m.kind === "option").length === 3) parser.phase = "transmission";
      if (message.kind === "badMagic") {
        stopped = true;
        return;
      }
    }
  };
  return { messages, drain, stopped: () => stopped };
}

/** Parse a stream split into the given chunks. */
function parseChunks(chunks: Buffer[]): NbdMessage[] {
  const parser = new NbdParser(LIMITS);
  const { messages, drain, stopped } = collector(parser);
  for (const chunk of chunks) {
    if (stopped()) break;
    parser.push(chunk);
    drain();
  }
  return messages;
}

function normalize(messages: NbdMessage[]): unknown[] {
  return messages.map((message) =>
    message.kind === "request" ? { ...message, request: { ...message.request, payload: message.request.payload?.toString("hex") ?? null } } : message.kind === "option" ? { ...message, data: message.data.toString("hex") } : message,
  );
}

const stream = Buffer.concat([flags, options, requests, badMagic]);

test("parser: the whole stream in one chunk", () => {
  const messages = parseChunks([stream]);
  assert.equal(messages.length, 1 + 3 + 7 + 1);
  assert.deepEqual(messages[0], { kind: "clientFlags", flags: 3 });
  const reqs = messages.filter((m) => m.kind === "request").map((m) => m.request);
  assert.deepEqual(
    reqs.map((r) => [r.type, r.cookieLo, r.lengthBytes, r.payloadDropped, r.payload?.length ?? null]),
    [
      [0, 1, 4096, false, null],
      [1, 2, 40, false, 40],
      [1, 3, 200, true, null],
      [1, 4, 0, false, null],
      [1, 5, 64, false, 64],
      [7, 6, 0xffffffff, false, null],
      [2, 7, 0, false, null],
    ],
  );
  assert.equal(reqs[1].flags, 1);
  assert.ok(reqs[1].payload!.equals(payloadA));
  assert.ok(reqs[4].offset > Number.MAX_SAFE_INTEGER, "a wrapping offset decodes far past any export");
  assert.deepEqual(messages[messages.length - 1], { kind: "badMagic", phase: "transmission", magicHex: "0xdeadbeef" });
});

test("parser: same messages when split at every offset, and byte by byte", () => {
  const expected = normalize(parseChunks([stream]));
  for (let at = 0; at <= stream.length; at++) {
    assert.deepEqual(normalize(parseChunks([stream.subarray(0, at), stream.subarray(at)])), expected, `split at ${at}`);
  }
  const bytes = [...stream].map((byte) => Buffer.from([byte]));
  assert.deepEqual(normalize(parseChunks(bytes)), expected);
});

test("parser: random three-way splits (seeded)", (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  const expected = normalize(parseChunks([stream]));
  for (let i = 0; i < 300; i++) {
    const a = random.int(stream.length + 1);
    const b = a + random.int(stream.length + 1 - a);
    assert.deepEqual(normalize(parseChunks([stream.subarray(0, a), stream.subarray(a, b), stream.subarray(b)])), expected, `splits ${a}, ${b}`);
  }
});

test("parser: an oversize option is reported from its header, before its data arrives", () => {
  const parser = new NbdParser(LIMITS);
  parser.phase = "options" satisfies ParserPhase;
  const header = option(9, Buffer.alloc(0));
  header.writeUInt32BE(0x7ffffff0, 12);
  parser.push(header);
  assert.deepEqual(parser.next(), { kind: "optionTooLong", option: 9, lengthBytes: 0x7ffffff0 });
});

test("parser: bad option magic", () => {
  const parser = new NbdParser(LIMITS);
  parser.phase = "options";
  parser.push(Buffer.from("0102030405060708" + "00".repeat(8), "hex"));
  const message = parser.next();
  assert.equal(message?.kind, "badMagic");
});

test("parser: a dropped payload is never buffered", () => {
  const parser = new NbdParser(LIMITS);
  parser.phase = "transmission";
  parser.push(request(1, 9, 0n, 10_000));
  assert.equal(parser.next(), null);
  for (let i = 0; i < 100; i++) {
    parser.push(Buffer.alloc(100));
    const message = parser.next();
    assert.equal(parser.bufferedBytes, 0, "skipped bytes are released as they arrive");
    if (i < 99) assert.equal(message, null);
    else assert.equal(message?.kind === "request" && message.request.payloadDropped, true);
  }
});

test("parser: nothing is returned until a whole header is there", () => {
  const parser = new NbdParser(LIMITS);
  parser.phase = "transmission";
  const bytes = request(0, 1, 0n, 512);
  parser.push(bytes.subarray(0, 27));
  assert.equal(parser.next(), null);
  assert.equal(parser.bufferedBytes, 27);
  parser.push(bytes.subarray(27));
  assert.equal(parser.next()?.kind, "request");
  assert.equal(parser.bufferedBytes, 0);
});

test("parser: reads into one reused buffer and straight into payloads give the same messages (seeded)", (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  const expected = normalize(parseChunks([stream]));
  for (let round = 0; round < 200; round++) {
    // As direct-socket.ts: each read goes into payloadTarget() or the shared buffer.
    const parser = new NbdParser(LIMITS);
    const { messages, drain, stopped } = collector(parser);
    const shared = Buffer.alloc(1 + random.int(48));
    let direct = 0;
    for (let at = 0; at < stream.length && !stopped(); ) {
      const target = parser.payloadTarget() ?? shared;
      const length = Math.min(1 + random.int(target.length), stream.length - at);
      stream.copy(target, 0, at, at + length);
      at += length;
      if (target === shared) parser.push(shared.subarray(0, length));
      else {
        parser.payloadReceived(length);
        direct += length;
      }
      // A paused pump leaves bytes in the parser; they must survive the buffer's reuse.
      if (random.int(4) !== 0) drain();
      parser.release(shared);
      shared.fill(0xee);
    }
    if (!stopped()) drain();
    assert.deepEqual(normalize(messages), expected, `round ${round}`);
    if (round === 0) t.diagnostic(`payload bytes read directly in round 0: ${direct}`);
  }
  // A payload read directly is filled exactly, never past its end.
  const parser = new NbdParser(LIMITS);
  parser.phase = "transmission";
  parser.push(request(1, 1, 0n, 8));
  assert.equal(parser.next(), null);
  const target = parser.payloadTarget();
  assert.equal(target?.length, 8);
  target!.fill(0x5a, 0, 3);
  parser.payloadReceived(3);
  assert.equal(parser.payloadTarget()?.length, 5);
  assert.throws(() => parser.payloadReceived(6), /payloadReceived/);
  parser.payloadTarget()!.fill(0x5b);
  parser.payloadReceived(5);
  const message = parser.next();
  assert.equal(message?.kind === "request" && message.request.payload?.toString("hex"), "5a5a5a5b5b5b5b5b");
  assert.equal(parser.payloadTarget(), null);
});
