/**
 * The NBD fuzzer (test/helpers/nbd-fuzz.ts) against one in-process server
 * with a qcow2 export on an in-memory image, a raw one and a read-only one;
 * between cases, no connection may be left behind.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { createQcow2 } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2 } from "../../src/formats/qcow2/qcow2-image.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { exportModel, FUZZ_HANDSHAKE_TIMEOUT_MS, runNbdFuzz, type FuzzTarget } from "../helpers/nbd-fuzz.ts";
import { memoryDevice, patternAt, startServer } from "./nbd-test-server.ts";

const MiB = 1024 * 1024;

async function inProcessTarget(t: TestContext): Promise<FuzzTarget> {
  const qcow2File = new MemoryFile({ name: "fuzz.qcow2" });
  await createQcow2(qcow2File, { sizeBytes: 4 * MiB, clusterSizeBytes: 64 * 1024 });
  const qcow2 = await openQcow2(qcow2File, { readOnly: false, backing: null });
  const rawBytes = 2 * MiB + 512;
  const server = await startServer(
    t,
    [
      { name: "", device: qcow2, allocationDepth: true },
      { name: "raw", device: memoryDevice(rawBytes) },
      { name: "ro", device: memoryDevice(MiB, { readOnly: true }) },
    ],
    { handshakeTimeoutMs: FUZZ_HANDSHAKE_TIMEOUT_MS },
  );
  const models = [exportModel("", new Uint8Array(4 * MiB), false), exportModel("raw", new Uint8Array(patternAt(0, rawBytes)), false), exportModel("ro", new Uint8Array(patternAt(0, MiB)), true)];
  return {
    models,
    connect: () => server.connect(),
    servedWith: () => models,
    async checkHealthy() {
      const deadline = Date.now() + 10_000;
      while (server.server.connectionCount > 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
      assert.equal(server.server.connectionCount, 0, "connections left behind after every client went away");
    },
  };
}

for (const kind of ["negotiation", "transmission"] as const) {
  test(`nbd fuzz, in process: random ${kind} never crashes, hangs or wedges the server; data matches a model (seeded)`, async (t) => {
    await runNbdFuzz(t, kind, await inProcessTarget(t));
  });
}
