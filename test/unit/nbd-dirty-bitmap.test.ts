/**
 * qemu:dirty-bitmap block status (dirtyBitmapExtents) against a model that
 * walks every granule, on random bitmaps and ranges (seeded: the seed is
 * printed; SNAPSTACK_SEED replays it), and the contexts an export with
 * bitmaps lists and selects (negotiation).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { dirtyBitmapExtents, NbdExport } from "../../src/nbd/index.ts";
import { matchMetaContexts } from "../../src/nbd/negotiation.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { memoryDevice, MiB } from "./nbd-test-server.ts";

/** Extents as the model sees them: one granule at a time, cut at the range, equal neighbours merged. */
function modelExtents(bits: Uint8Array, granularityBytes: number, offset: number, length: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  const end = offset + length;
  for (let at = offset; at < end; ) {
    const granule = Math.floor(at / granularityBytes);
    const dirty = granule < bits.length * 8 && (bits[granule >> 3] >> (granule & 7)) & 1 ? 1 : 0;
    const next = Math.min(end, (granule + 1) * granularityBytes);
    const last = out[out.length - 1];
    if (last !== undefined && last[1] === dirty) last[0] += next - at;
    else out.push([next - at, dirty]);
    at = next;
  }
  return out;
}

test("dirtyBitmapExtents equals a granule-by-granule model on random bitmaps and ranges (runs, single bits, bytes of 0x00 and 0xff, past the bitmap's end)", () => {
  const seed = testSeed();
  console.log(`seed ${seed} (replay: SNAPSTACK_SEED=${seed})`);
  const random = createRandom(seed);
  for (let round = 0; round < 300; round++) {
    const granularityBytes = 512 * 2 ** random.int(9);
    const bits = new Uint8Array(1 + random.int(40));
    // Long runs of whole bytes, and scattered single bits.
    for (let i = 0; i < bits.length; i++) bits[i] = random.int(3) === 0 ? random.int(256) : random.int(2) === 0 ? 0 : 0xff;
    const coveredBytes = bits.length * 8 * granularityBytes;
    const offset = random.int(coveredBytes + granularityBytes * 4);
    const length = 1 + random.int(coveredBytes + granularityBytes * 8 - offset);
    const list = dirtyBitmapExtents({ granularityBytes, bits }, offset, length, false);
    const got = list.lengths.map((lengthBytes, i): [number, number] => [lengthBytes, list.values[i]]);
    assert.deepEqual(got, modelExtents(bits, granularityBytes, offset, length), `round ${round}: granule ${granularityBytes}, range ${offset}+${length}`);
    const one = dirtyBitmapExtents({ granularityBytes, bits }, offset, length, true);
    assert.deepEqual([one.lengths, one.values], [[got[0][0]], [got[0][1]]], `round ${round}: REQ_ONE keeps the first extent`);
  }
});

test("dirtyBitmapExtents stops at extentsMax (the reply covers a prefix, as the spec allows)", () => {
  const bits = new Uint8Array(64).fill(0x55); // alternating granules
  const list = dirtyBitmapExtents({ granularityBytes: 65536, bits }, 0, 512 * 65536, false, 10);
  assert.equal(list.count, 10);
  assert.deepEqual(list.values, [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]);
  assert.ok(list.lengths.every((length) => length === 65536));
});

test("an export's bitmaps are listed after base:allocation with qemu-nbd's ids (2 on), by name or by the qemu: and qemu:dirty-bitmap: namespaces", () => {
  const bits = { granularityBytes: 65536, bits: new Uint8Array(1) };
  const exp = new NbdExport({ name: "", device: memoryDevice(4 * MiB), dirtyBitmaps: [{ name: "b1", read: () => bits }, { name: "b0", read: () => bits }] });
  const names = (listing: boolean, queries: string[]) => matchMetaContexts(exp, queries, listing).map((context) => [context.id, context.name]);
  const all = [
    [0, "base:allocation"],
    [2, "qemu:dirty-bitmap:b1"],
    [3, "qemu:dirty-bitmap:b0"],
  ];
  assert.deepEqual(names(true, []), all);
  assert.deepEqual(names(true, ["qemu:"]), all.slice(1));
  assert.deepEqual(names(true, ["qemu:dirty-bitmap:"]), all.slice(1));
  assert.deepEqual(names(false, ["qemu:dirty-bitmap:b0"]), [[3, "qemu:dirty-bitmap:b0"]]);
  assert.deepEqual(names(false, ["qemu:dirty-bitmap:"]), [], "SET takes exact names only");
  assert.deepEqual(names(false, ["qemu:dirty-bitmap:b2"]), []);
});
