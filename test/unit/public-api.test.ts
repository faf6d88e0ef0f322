/**
 * The library is usable on its own: create an overlay chain, write through
 * it, read back, map it; every call from the public entry point.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { createImage, openImage, mapImage, SnapstackError, imageInfo } from "../../src/index.ts";
import { scratchDir } from "../helpers/tools.ts";

test("public API: create base and overlay, write through the overlay, read and map", async (t) => {
  const dir = scratchDir(t);
  const base = join(dir, "base.qcow2");
  const overlay = join(dir, "overlay.qcow2");
  await createImage(base, { format: "qcow2", sizeBytes: 4 << 20, options: {} });
  const baseDevice = await openImage(base);
  await baseDevice.write(0, new Uint8Array(65536).fill(0xaa));
  await baseDevice.close();
  await createImage(overlay, { format: "qcow2", backingFile: "base.qcow2", backingFormat: "qcow2", options: {} });

  const device = await openImage(overlay);
  t.after(() => device.close());
  assert.equal(device.format, "qcow2");
  assert.equal(device.sizeBytes, 4 << 20);
  assert.equal(device.backing?.format, "qcow2");
  await device.write(1000, new Uint8Array(10).fill(0xbb));
  const buffer = new Uint8Array(2000);
  await device.read(0, buffer);
  assert.equal(buffer[999], 0xaa, "byte before the write falls through to the base");
  assert.equal(buffer[1000], 0xbb);
  assert.equal(buffer[1009], 0xbb);
  assert.equal(buffer[1010], 0xaa, "copy on write kept the rest of the cluster");

  const extents = await mapImage(device);
  assert.deepEqual(
    extents.map(({ start, length, depth, data }) => ({ start, length, depth, data })),
    [
      { start: 0, length: 65536, depth: 0, data: true },
      { start: 65536, length: (4 << 20) - 65536, depth: 1, data: false },
    ],
  );
  const info = await imageInfo(overlay, {});
  assert.ok(JSON.stringify(info).includes("base.qcow2"));
});

test("public API: errors are SnapstackError with a stable code", async (t) => {
  const dir = scratchDir(t);
  await assert.rejects(openImage(join(dir, "missing.qcow2")), (error: unknown) => {
    assert.ok(error instanceof SnapstackError);
    assert.equal(error.code, "E_NOT_FOUND");
    return true;
  });
});
