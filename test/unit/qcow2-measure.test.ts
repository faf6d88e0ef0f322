import { test } from "node:test";
import assert from "node:assert/strict";
import { measureQcow2 } from "../../src/formats/qcow2/measure.ts";
import { isSnapstackError } from "../../src/base/errors.ts";

const G = 2 ** 30;

// Expected values printed by `qemu-img measure --output=json -O qcow2 [-o …] --size …` (QEMU 7.2).
const CASES: [string, Parameters<typeof measureQcow2>[0], number, number][] = [
  ["1G", { sizeBytes: G }, 393216, 1074135040],
  ["1", { sizeBytes: 1 }, 327680, 393216],
  ["0", { sizeBytes: 0 }, 196608, 196608],
  ["100G", { sizeBytes: 100 * G }, 16646144, 107390828544],
  ["100G 512B clusters", { sizeBytes: 100 * G, clusterSizeBytes: 512 }, 2138404352, 109512586752],
  ["10G 2M clusters refcount_bits=1", { sizeBytes: 10 * G, clusterSizeBytes: 2 << 20, refcountBits: 1 }, 10485760, 10747904000],
  ["5G extended_l2", { sizeBytes: 5 * G, extendedL2: true }, 1703936, 5370413056],
  ["3G 4K clusters refcount_bits=64", { sizeBytes: 3 * G, refcountBits: 64, clusterSizeBytes: 4096 }, 12644352, 3233869824],
  ["1G preallocation=full", { sizeBytes: G, preallocation: "full" }, 1074135040, 1074135040],
  ["123456789 16K clusters", { sizeBytes: 123456789, clusterSizeBytes: 16384 }, 131072, 123600896],
];

test("measureQcow2 matches qemu-img measure", () => {
  for (const [name, options, required, fully] of CASES) {
    assert.deepEqual(measureQcow2(options), { requiredBytes: required, fullyAllocatedBytes: fully }, name);
  }
});

test("measureQcow2 counts allocated data and refuses sizes the L1 cannot hold", () => {
  const empty = measureQcow2({ sizeBytes: G });
  assert.equal(measureQcow2({ sizeBytes: G, allocatedBytes: 3 * 65536 }).requiredBytes, empty.requiredBytes + 3 * 65536);
  assert.throws(
    () => measureQcow2({ sizeBytes: 2 ** 40, clusterSizeBytes: 512 }),
    (e: unknown) => isSnapstackError(e) && e.code === "E_TOO_LARGE" && /too large/.test(e.message),
  );
});
