// Format probing: what QEMU's probes take for a format snapstack does not open is refused; what they take for raw stays raw.
import { test } from "node:test";
import assert from "node:assert/strict";
import { probedFormatName } from "../../src/chain/image-format.ts";

const bytes = (text: string, size = 512): Uint8Array => {
  const head = new Uint8Array(size);
  head.set(Uint8Array.from(text, (char) => char.charCodeAt(0)));
  return head;
};

test("probe: the checks of QEMU's probes, not their magic strings alone", () => {
  assert.equal(probedFormatName(bytes("# Disk DescriptorFile\nversion=1\nCID=1\n")), "vmdk");
  assert.equal(probedFormatName(bytes("# Disk DescriptorFile\n   \nversion=3\r\n")), "vmdk");
  // A comment line, then anything but a version line: raw, as qemu-img opens it.
  assert.equal(probedFormatName(bytes("# Disk DescriptorFile\nhello\n")), "raw");
  assert.equal(probedFormatName(bytes("KDMV")), "vmdk");
  const bochs = bytes("Bochs Virtual HD Image");
  assert.equal(probedFormatName(bochs), "raw");
  bochs.set(bytes("Redolog", 16), 32);
  bochs.set(bytes("Growing", 16), 48);
  bochs.set([0, 0, 2, 0], 64);
  assert.equal(probedFormatName(bochs), "bochs");
  const parallels = bytes("WithoutFreeSpace");
  assert.equal(probedFormatName(parallels), "raw");
  parallels[16] = 2;
  assert.equal(probedFormatName(parallels), "parallels");
  assert.equal(probedFormatName(Uint8Array.of(0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe, 0, 2)), "raw");
  assert.equal(probedFormatName(Uint8Array.of(0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe, 0, 1)), "luks");
  assert.equal(probedFormatName(Uint8Array.of(0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3)), "qcow2");
  assert.equal(probedFormatName(Uint8Array.of(0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 1)), "qcow");
  assert.equal(probedFormatName(new Uint8Array(0)), "raw");
});
