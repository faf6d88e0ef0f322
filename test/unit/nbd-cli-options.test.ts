/**
 * `snapstack nbd` option parsing: --aio picks how the image files do I/O.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { parseNbdCommand } from "../../src/cli/commands/nbd.ts";

test("nbd --aio: event loop I/O by default, the thread pool with threads, usage error otherwise", () => {
  assert.equal(parseNbdCommand(["disk.qcow2"]).ioMode, "sync");
  assert.equal(parseNbdCommand(["--aio=threads", "disk.qcow2"]).ioMode, "async");
  assert.equal(parseNbdCommand(["--aio", "native", "disk.qcow2"]).ioMode, "sync");
  assert.equal(parseNbdCommand(["--aio=io_uring", "disk.qcow2"]).ioMode, "sync");
  for (const bad of ["posix", "constructor", ""]) {
    assert.throws(() => parseNbdCommand([`--aio=${bad}`, "disk.qcow2"]), { code: "E_USAGE" });
  }
});
