/**
 * vmdk extent lines (src/formats/vmdk/vmdk-format.ts parseDescriptor) read
 * as QEMU's vmdk_parse_extents reads them with glibc's sscanf. The expected
 * extents were taken from that sscanf, run on the same bytes.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { descriptorText, parseDescriptor } from "../../src/formats/vmdk/vmdk-format.ts";

const head = '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n';

function extents(line: Uint8Array | string): string[] | "invalid" {
  const body = typeof line === "string" ? new TextEncoder().encode(line) : line;
  const bytes = new Uint8Array([...new TextEncoder().encode(head), ...body]);
  try {
    return parseDescriptor(descriptorText(bytes)).extents.map((e) => `${e.sectors} ${e.type} [${e.fileName}] ${e.flatOffsetSectors}`);
  } catch {
    return "invalid";
  }
}

test("sscanf's whitespace and fields: glued fields, any C whitespace between them, no backtracking into a field", () => {
  assert.deepEqual(extents('RW +100 FLAT "a.raw" +5\n'), ["100 FLAT [a.raw] 5"]);
  assert.deepEqual(extents('RW 100FLAT "a.raw" 0\n'), ["100 FLAT [a.raw] 0"]);
  // %10s takes the quote into the type (FLAT"a.raw), which is no type: skipped.
  assert.deepEqual(extents('RW 100 FLAT"a.raw"0\n'), []);
  assert.deepEqual(extents('RW\x0b100\x0cFLAT\x0b"a.raw"\x0c7\n'), ["100 FLAT [a.raw] 7"]);
  assert.deepEqual(extents('RW\n100\nFLAT\n"a.raw"\n7\n'), ["100 FLAT [a.raw] 7"]);
  assert.deepEqual(extents('RW100 FLAT "a.raw" 0\n'), []);
  assert.deepEqual(extents('RWRWRWRWRWRW 100 FLAT "a.raw" 0\n'), []);
  assert.deepEqual(extents('RW 100 SPARSEXXXX"a"\n'), []);
  assert.equal(extents('RW 100 SPARSE "a.raw" 5\n'), "invalid");
});

test("an unterminated name: SPARSE opens with what was read, FLAT is invalid; 511 characters at most", () => {
  assert.deepEqual(extents('RW 100 SPARSE "a.raw\n'), ["100 SPARSE [a.raw] -1"]);
  assert.equal(extents('RW 100 FLAT "a.raw\n'), "invalid");
  assert.deepEqual(extents(`RW 100 FLAT "${"a".repeat(511)}" 0\n`), [`100 FLAT [${"a".repeat(511)}] 0`]);
  assert.equal(extents(`RW 100 FLAT "${"a".repeat(512)}" 0\n`), "invalid");
  assert.deepEqual(extents(`RW 100 SPARSE "${"a".repeat(512)}"\n`), [`100 SPARSE [${"a".repeat(511)}] -1`]);
});

test("only C whitespace starts a line (no-break space and a byte-order mark do not), however long", () => {
  assert.deepEqual(extents('\u00a0RW 100 FLAT "a.raw" 0\n'), []);
  assert.deepEqual(extents(new Uint8Array([0xef, 0xbb, 0xbf, ...new TextEncoder().encode('RW 100 FLAT "a.raw" 0\n')])), []);
  assert.deepEqual(extents(`RW${" ".repeat(5000)}100 SPARSE "a.raw"\n`), ["100 SPARSE [a.raw] -1"]);
  // A blank line before an extent line reads it twice, as QEMU's loop does.
  assert.deepEqual(extents('\n\nRW 100 SPARSE "a.raw"\n'), ["100 SPARSE [a.raw] -1", "100 SPARSE [a.raw] -1", "100 SPARSE [a.raw] -1"]);
});
