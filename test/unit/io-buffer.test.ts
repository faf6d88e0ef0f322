import { test } from "node:test";
import assert from "node:assert/strict";
import { allocateIoBuffer, isWholeIoBuffer, IO_BUFFER_SHIFT_BYTES, wholeIoBuffer } from "../../src/io/io-buffer.ts";

test("I/O buffers start a cache line past their ArrayBuffer's start, never at a page boundary", () => {
  const buffer = allocateIoBuffer(1 << 20);
  assert.equal(buffer.length, 1 << 20);
  assert.equal(buffer.byteOffset, IO_BUFFER_SHIFT_BYTES);
  assert.equal(buffer.byteOffset % 64, 0);
  assert.notEqual(buffer.byteOffset % 4096, 0);
  assert.ok(buffer.every((byte) => byte === 0));
});

test("wholeIoBuffer recovers the whole buffer from a view; isWholeIoBuffer accepts only that", () => {
  const buffer = allocateIoBuffer(8192);
  buffer[100] = 7;
  const view = buffer.subarray(0, 512);
  assert.equal(isWholeIoBuffer(view, 8192), false);
  const whole = wholeIoBuffer(view);
  assert.equal(isWholeIoBuffer(whole, 8192), true);
  assert.equal(whole.length, 8192);
  assert.equal(whole[100], 7);
  assert.equal(isWholeIoBuffer(whole, 4096), false);
  assert.equal(isWholeIoBuffer(new Uint8Array(8192), 8192), false);
});
