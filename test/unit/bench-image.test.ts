/**
 * benchImage's request sequence and flushes on an in-memory device that
 * records them: offsets and wrap, requests in flight never above the depth,
 * a drained flush with nothing in flight, one flush per interval.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { benchImage, nextBenchOffset } from "../../src/chain/index.ts";
import type { BlockDevice } from "../../src/device/block-device.ts";
import { memoryDevice, MiB } from "./nbd-test-server.ts";

interface Recorded {
  offsets: number[];
  inFlightMax: number;
  flushes: number;
  /** Requests in flight when each flush started. */
  inFlightAtFlush: number[];
}

/** The device with its reads, writes and flushes recorded; each request settles a tick later, so several overlap. */
function recording(device: BlockDevice): { device: BlockDevice; recorded: Recorded } {
  const recorded: Recorded = { offsets: [], inFlightMax: 0, flushes: 0, inFlightAtFlush: [] };
  let inFlight = 0;
  const track = async <T>(offset: number, run: () => Promise<T>): Promise<T> => {
    recorded.offsets.push(offset);
    inFlight++;
    recorded.inFlightMax = Math.max(recorded.inFlightMax, inFlight);
    await new Promise((resolve) => setImmediate(resolve));
    try {
      return await run();
    } finally {
      inFlight--;
    }
  };
  // What benchImage uses of a device (a unit test of the layer above it).
  const wrapped = {
    sizeBytes: device.sizeBytes,
    read: (offset: number, buffer: Uint8Array) => track(offset, () => device.read(offset, buffer)),
    write: (offset: number, data: Uint8Array) => track(offset, () => device.write(offset, data)),
    flush: async () => {
      recorded.flushes++;
      recorded.inFlightAtFlush.push(inFlight);
      await device.flush();
    },
  };
  return { device: wrapped as unknown as BlockDevice, recorded };
}

test("nextBenchOffset: step, wrap modulo the image less one buffer, 0 when the image is no larger than a buffer", () => {
  assert.equal(nextBenchOffset(0, 4096, MiB, 4096), 4096);
  assert.equal(nextBenchOffset(MiB - 8192, 4096, MiB, 4096), 0);
  assert.equal(nextBenchOffset(MiB - 8192, 6144, MiB, 4096), 2048);
  assert.equal(nextBenchOffset(0, 4096, 4096, 4096), 0);
  assert.equal(nextBenchOffset(0, 4096, 0, 4096), 0);
});

test("benchImage: offsets from the first in steps, at most depth in flight, every request inside the image", async () => {
  const { device, recorded } = recording(memoryDevice(MiB));
  const result = await benchImage(device, { count: 1000, depth: 8, bufferBytes: 4096, stepBytes: 6144, offset: 2048, write: false, patternByte: 0, flushInterval: 0 });
  assert.equal(result.stepBytes, 6144);
  assert.equal(recorded.offsets.length, 1000);
  assert.equal(recorded.inFlightMax, 8);
  assert.deepEqual(recorded.offsets.slice(0, 3), [2048, 8192, 14336]);
  let expected = 2048;
  for (const offset of recorded.offsets) {
    assert.equal(offset, expected);
    assert.ok(offset + 4096 <= MiB);
    expected = nextBenchOffset(expected, 6144, MiB, 4096);
  }
});

test("benchImage: writes the pattern; a drained flush every interval runs with nothing in flight, --no-drain beside requests", async () => {
  const drained = recording(memoryDevice(MiB));
  await benchImage(drained.device, { count: 100, depth: 4, bufferBytes: 512, stepBytes: 0, offset: 0, write: true, patternByte: 0x5a, flushInterval: 10 });
  assert.equal(drained.recorded.flushes, 10);
  assert.deepEqual(drained.recorded.inFlightAtFlush, Array(10).fill(0));
  const bytes = new Uint8Array(51200);
  await drained.device.read(0, bytes);
  assert.ok(bytes.every((byte) => byte === 0x5a), "100 requests of 512 bytes from 0, step = size");
  const beside = recording(memoryDevice(MiB));
  await benchImage(beside.device, { count: 100, depth: 4, bufferBytes: 512, stepBytes: 0, offset: 0, write: true, patternByte: 1, flushInterval: 10, drain: false });
  assert.equal(beside.recorded.flushes, 10);
  assert.ok(beside.recorded.inFlightAtFlush.some((n) => n > 0), "some flush ran beside requests");
});

test("benchImage: refused before any request: a depth of 0, a flush interval on reads or below the depth, a first request past the end", async () => {
  const { device, recorded } = recording(memoryDevice(MiB));
  const base = { count: 10, depth: 4, bufferBytes: 4096, stepBytes: 0, offset: 0, write: true, patternByte: 0, flushInterval: 0 };
  for (const [options, code] of [
    [{ ...base, depth: 0 }, "E_INVALID_OPTION"],
    [{ ...base, write: false, flushInterval: 8 }, "E_USAGE"],
    [{ ...base, flushInterval: 2, drain: false }, "E_INVALID_OPTION"],
    [{ ...base, offset: MiB - 2048 }, "E_OUT_OF_RANGE"],
  ] as const) {
    await assert.rejects(benchImage(device, options), (error: { code?: string }) => error.code === code);
  }
  assert.equal(recorded.offsets.length, 0);
});
