/**
 * QmpParser: newline-delimited JSON cut at every possible offset, limits
 * checked before buffering, garbage refused with E_QEMU.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { QmpParser, decodeQmpLine, encodeQmpCommand } from "../../src/qmp/qmp-parser.ts";
import { createRandom, testSeed } from "../helpers/random.ts";

const STREAM = [
  '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}\r\n',
  '{"return": {}, "id": "snapstack-1"}\r\n',
  "\r\n",
  '{"timestamp": {"seconds": 1795683166, "microseconds": 108216}, "event": "STOP"}\n',
  '{"return": {"status": "paused", "running": false, "singlestep": false}, "id": "snapstack-2"}\n',
  '{"error": {"class": "GenericError", "desc": "Ünïcödé ✓ 𝄞 in a description"}, "id": "snapstack-3"}\n',
].join("");

const EXPECTED = STREAM.split("\n")
  .map((line) => line.trim())
  .filter((line) => line !== "")
  .map((line) => JSON.parse(line));

function feedAll(parser: QmpParser, chunks: Buffer[]): unknown[] {
  return chunks.flatMap((chunk) => parser.feed(chunk));
}

test("one chunk: every message, blank lines skipped, \\r\\n accepted", () => {
  assert.deepEqual(feedAll(new QmpParser(), [Buffer.from(STREAM)]), EXPECTED);
});

test("split at every byte offset (inside UTF-8 sequences too): the same messages", () => {
  const bytes = Buffer.from(STREAM, "utf8");
  for (let split = 0; split <= bytes.length; split++) {
    const parser = new QmpParser();
    const messages = feedAll(parser, [bytes.subarray(0, split), bytes.subarray(split)]);
    assert.deepEqual(messages, EXPECTED, `split at ${split}`);
    assert.equal(parser.pendingBytes, 0);
  }
});

test("byte by byte, and random chunkings: the same messages", () => {
  const bytes = Buffer.from(STREAM, "utf8");
  const parser = new QmpParser();
  const oneByOne: unknown[] = [];
  for (let index = 0; index < bytes.length; index++) oneByOne.push(...parser.feed(bytes.subarray(index, index + 1)));
  assert.deepEqual(oneByOne, EXPECTED);

  const seed = testSeed();
  const random = createRandom(seed);
  for (let round = 0; round < 200; round++) {
    const chunks: Buffer[] = [];
    let start = 0;
    while (start < bytes.length) {
      const length = 1 + random.int(64);
      chunks.push(bytes.subarray(start, start + length));
      start += length;
    }
    assert.deepEqual(feedAll(new QmpParser(), chunks), EXPECTED, `seed ${seed} round ${round}`);
  }
});

test("the caller may reuse its buffer: pending bytes are copied", () => {
  const parser = new QmpParser();
  const buffer = Buffer.from('{"return": 1, "id": "a');
  assert.deepEqual(parser.feed(buffer), []);
  buffer.fill(0x20);
  assert.deepEqual(parser.feed(Buffer.from('"}\n')), [{ return: 1, id: "a" }]);
});

test("a line longer than the limit fails before its newline arrives, and the parser starts over", () => {
  const parser = new QmpParser(64);
  assert.deepEqual(parser.feed(Buffer.from('{"return": "' + "x".repeat(40))), []);
  assert.throws(() => parser.feed(Buffer.from("y".repeat(30))), { code: "E_QEMU", message: /more than 64 bytes/ });
  assert.equal(parser.pendingBytes, 0);
  // Exactly at the limit is fine.
  const exact = '{"return": "' + "z".repeat(50) + '"}';
  assert.equal(Buffer.byteLength(exact), 64);
  assert.deepEqual(parser.feed(Buffer.from(exact + "\n")), [{ return: "z".repeat(50) }]);
});

test("garbage is E_QEMU: not JSON, or JSON that is not an object", () => {
  assert.throws(() => new QmpParser().feed(Buffer.from("Welcome to the HMP monitor\n")), { code: "E_QEMU", message: /not JSON/ });
  assert.throws(() => decodeQmpLine(Buffer.from("[1, 2]")), { code: "E_QEMU", message: /not a JSON object/ });
  assert.throws(() => decodeQmpLine(Buffer.from("null")), { code: "E_QEMU" });
  assert.equal(decodeQmpLine(Buffer.from("  \r")), null);
});

test("encodeQmpCommand: one line, arguments only when given, the id echoed back by QEMU", () => {
  const withArgs = encodeQmpCommand("migrate", { uri: "unix:/run/a b\nc" }, "snapstack-7").toString();
  assert.ok(withArgs.endsWith("\n"));
  assert.equal(withArgs.indexOf("\n"), withArgs.length - 1, "newlines inside values are escaped");
  assert.deepEqual(JSON.parse(withArgs), { execute: "migrate", arguments: { uri: "unix:/run/a b\nc" }, id: "snapstack-7" });
  assert.deepEqual(JSON.parse(encodeQmpCommand("stop", undefined, "x").toString()), { execute: "stop", id: "x" });
});
