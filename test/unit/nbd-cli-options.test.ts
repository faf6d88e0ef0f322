/**
 * `snapstack nbd` option parsing: --aio picks how the image files do I/O,
 * and engine.openImage hands the read and write modes to the files.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseNbdCommand } from "../../src/cli/commands/nbd.ts";
import { openImage } from "../../src/cli/engine.ts";
import type { BlockDevice } from "../../src/device/block-device.ts";
import type { NodeFile } from "../../src/io/node-file.ts";
import { scratchDir } from "../helpers/tools.ts";

test("nbd --aio: event loop I/O by default (large writes on the thread pool), the thread pool with threads, usage error otherwise", () => {
  assert.equal(parseNbdCommand(["disk.qcow2"]).ioMode, "sync");
  assert.equal(parseNbdCommand(["disk.qcow2"]).writeIoMode, "auto");
  assert.equal(parseNbdCommand(["--aio=threads", "disk.qcow2"]).ioMode, "async");
  assert.equal(parseNbdCommand(["--aio=threads", "disk.qcow2"]).writeIoMode, "async");
  assert.equal(parseNbdCommand(["--aio", "native", "disk.qcow2"]).ioMode, "sync");
  assert.equal(parseNbdCommand(["--aio", "native", "disk.qcow2"]).writeIoMode, "sync");
  assert.equal(parseNbdCommand(["--aio=io_uring", "disk.qcow2"]).ioMode, "sync");
  for (const bad of ["posix", "constructor", ""]) {
    assert.throws(() => parseNbdCommand([`--aio=${bad}`, "disk.qcow2"]), { code: "E_USAGE" });
  }
});

test("engine.openImage passes the I/O mode to the image file", async (t) => {
  const dir = scratchDir(t);
  const raw = join(dir, "disk.raw");
  writeFileSync(raw, Buffer.alloc(1 << 20));
  const fileOf = (device: BlockDevice): NodeFile => (device as unknown as { file: NodeFile }).file;
  for (const ioMode of ["sync", "async"] as const) {
    const device = await openImage(raw, { ioMode });
    try {
      assert.equal(fileOf(device).ioMode, ioMode);
      assert.equal(fileOf(device).writeIoMode, ioMode);
    } finally {
      await device.close();
    }
  }
  const device = await openImage(raw, { ioMode: "sync", writeIoMode: "auto" });
  try {
    assert.equal(fileOf(device).ioMode, "sync");
    assert.equal(fileOf(device).writeIoMode, "auto");
  } finally {
    await device.close();
  }
});

test("nbd -n and --cache: checked as qemu-nbd checks them (a known mode, one of them, once)", () => {
  for (const args of [["-n"], ["--nocache"], ...["none", "off", "writeback", "writethrough", "directsync", "unsafe"].map((mode) => [`--cache=${mode}`])]) {
    assert.equal(parseNbdCommand([...args, "disk.qcow2"]).path, "disk.qcow2", args.join(" "));
  }
  assert.throws(() => parseNbdCommand(["--cache=bogus", "disk.qcow2"]), { code: "E_USAGE", message: /Invalid cache mode `bogus'/ });
  assert.throws(() => parseNbdCommand(["-n", "--cache=none", "disk.qcow2"]), { code: "E_USAGE", message: /-n and --cache can only be specified once/ });
  assert.throws(() => parseNbdCommand(["--cache=unsafe", "--cache", "none", "disk.qcow2"]), { code: "E_USAGE", message: /-n and --cache can only be specified once/ });
});

test("nbd --discard: ignore (qemu-nbd's default) unless unmap/on; other modes are usage errors", () => {
  assert.equal(parseNbdCommand(["disk.qcow2"]).discard, false);
  for (const mode of ["ignore", "off"]) assert.equal(parseNbdCommand([`--discard=${mode}`, "disk.qcow2"]).discard, false);
  for (const mode of ["unmap", "on"]) assert.equal(parseNbdCommand(["--discard", mode, "disk.qcow2"]).discard, true);
  assert.throws(() => parseNbdCommand(["--discard=trim", "disk.qcow2"]), { code: "E_USAGE", message: /Invalid discard mode `trim'/ });
});
