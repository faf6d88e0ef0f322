/**
 * `snapstack nbd` option parsing: --aio picks how the image files do I/O;
 * engine.openImage applies the raw write mode to the file it belongs to.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseNbdCommand } from "../../src/cli/commands/nbd.ts";
import { createImage, openImage } from "../../src/cli/engine.ts";
import type { BlockDevice } from "../../src/device/block-device.ts";
import type { NodeFile } from "../../src/io/node-file.ts";
import { scratchDir } from "../helpers/tools.ts";

test("nbd --aio: event loop I/O by default (small raw writes on the pool), the thread pool with threads, usage error otherwise", () => {
  assert.equal(parseNbdCommand(["disk.qcow2"]).ioMode, "sync");
  assert.equal(parseNbdCommand(["disk.raw"]).rawWriteIoMode, "sync");
  assert.equal(parseNbdCommand(["--aio=threads", "disk.qcow2"]).ioMode, "async");
  assert.equal(parseNbdCommand(["--aio=threads", "disk.raw"]).rawWriteIoMode, "async");
  assert.equal(parseNbdCommand(["--aio", "native", "disk.qcow2"]).ioMode, "sync");
  assert.equal(parseNbdCommand(["--aio=io_uring", "disk.qcow2"]).ioMode, "sync");
  for (const bad of ["posix", "constructor", ""]) {
    assert.throws(() => parseNbdCommand([`--aio=${bad}`, "disk.qcow2"]), { code: "E_USAGE" });
  }
});

test("engine.openImage: rawWriteIoMode applies to a writable raw image only", async (t) => {
  const dir = scratchDir(t);
  const raw = join(dir, "disk.raw");
  writeFileSync(raw, Buffer.alloc(1 << 20));
  const qcow2 = join(dir, "disk.qcow2");
  await createImage(qcow2, { format: "qcow2", sizeBytes: 1 << 20 });
  const fileOf = (device: BlockDevice): NodeFile => (device as unknown as { file: NodeFile }).file;
  for (const [path, format, readOnly, expected] of [
    [raw, undefined, false, "small-async"],
    [raw, "raw", false, "small-async"],
    [raw, undefined, true, "sync"],
  ] as const) {
    const device = await openImage(path, { format, readOnly, ioMode: "sync", rawWriteIoMode: "small-async" });
    try {
      assert.equal(fileOf(device).writeIoMode, expected, `${path} ${format ?? "probed"} readOnly=${readOnly}`);
      assert.equal(fileOf(device).ioMode, "sync");
    } finally {
      await device.close();
    }
  }
  // A qcow2 top (its file is private) opens through the same hook, with its writes left on the event loop.
  const image = await openImage(qcow2, { ioMode: "sync", rawWriteIoMode: "small-async" });
  assert.equal(image.format, "qcow2");
  await image.write(0, Buffer.alloc(4096, 1));
  await image.close();
});
