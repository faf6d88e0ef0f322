/**
 * checkBatEntries (src/formats/vhdx/vhdx-format.ts): QEMU's
 * vhdx_check_bat_entries, quirks included, on hand-made BATs.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { checkBatEntries, PAYLOAD_BLOCK_FULLY_PRESENT, type VhdxBatContext } from "../../src/formats/vhdx/vhdx-format.ts";

const MiB = 1024 * 1024;
const present = (offsetMiB: number): bigint => (BigInt(offsetMiB) << 20n) | BigInt(PAYLOAD_BLOCK_FULLY_PRESENT);

const context: VhdxBatContext = {
  blockSizeBytes: MiB,
  chunkRatio: 2,
  virtualDiskBytes: 4 * MiB - 512,
  logicalSectorBytes: 512,
  fileSizeBytes: 10 * MiB,
  regions: [
    [MiB, 2 * MiB], // the log
    [3 * MiB, 4 * MiB], // the BAT
  ],
};

test("a block over a region, one starting past the end of the file and one ending past it: QEMU's three lines", () => {
  const bat = new BigUint64Array([present(3), present(10), 0n, present(9)]);
  const grown = { ...context, virtualDiskBytes: 8 * MiB };
  assert.deepEqual(checkBatEntries(bat, { ...grown, fileSizeBytes: 9.5 * MiB }, false), [
    `VHDX region ${3 * MiB}-${4 * MiB} overlaps with region ${3 * MiB}-${4 * MiB}`,
    `VHDX BAT entry 1 start offset ${10 * MiB} points after end of file (${9.5 * MiB}). Image has probably been truncated.`,
    `VHDX BAT entry 3 end offset ${10 * MiB - 1} points after end of file (${9.5 * MiB}). Image has probably been truncated.`,
  ]);
  assert.equal(checkBatEntries(bat, { ...grown, fileSizeBytes: 9.5 * MiB }, true).length, 1, "an open stops at the first");
});

test("the file size is rounded up to 512 bytes, and the disk's last block counts only its own length", () => {
  const bat = new BigUint64Array([0n, 0n, 0n, present(9)]);
  // Entry 3's block starts at 9 MiB; the disk ends 512 bytes short of 4 MiB, so the block is 1 MiB - 512 long.
  assert.deepEqual(checkBatEntries(bat, { ...context, fileSizeBytes: 10 * MiB - 512 - 100 }, false), []);
  assert.equal(checkBatEntries(bat, { ...context, fileSizeBytes: 10 * MiB - 1024 }, false).length, 1);
});

test("the region check runs for chunkRatio fully present entries, then skips one (QEMU counts only those)", () => {
  // All three point into the BAT region: the first two are checked, the third is not.
  const bat = new BigUint64Array([present(3), present(3), present(3)]);
  assert.equal(checkBatEntries(bat, { ...context, virtualDiskBytes: 8 * MiB }, false).length, 2);
});

test("4 KiB logical sectors (QEMU opens none): the disk's real size gives the last block's length; an offset near 2^64 overflows", () => {
  // 8 MiB disk, entry 3 (payload block 2, after the bitmap entry at index 2 with chunkRatio 2) is a whole block.
  const bat = new BigUint64Array([0n, 0n, 0n, present(9)]);
  const sectors4k = { ...context, virtualDiskBytes: 8 * MiB, logicalSectorBytes: 4096, fileSizeBytes: 9.5 * MiB, regions: [] };
  assert.deepEqual(checkBatEntries(bat, sectors4k, false), [
    `VHDX BAT entry 3 end offset ${10 * MiB - 1} points after end of file (${9.5 * MiB}). Image has probably been truncated.`,
  ]);
  const huge = new BigUint64Array([((2n ** 44n - 1n) << 20n) | BigInt(PAYLOAD_BLOCK_FULLY_PRESENT)]);
  const found = checkBatEntries(huge, { ...context, regions: [] }, false);
  assert.equal(found[0], "VHDX BAT entry 0 offset overflow.");
  assert.match(found[1], /^VHDX BAT entry 0 start offset \d+ points after end of file/);
  assert.equal(checkBatEntries(huge, { ...context, regions: [] }, true).length, 1, "an open stops at the overflow");
});

test("a block over two regions is reported against the one registered last, as QEMU's list orders them", () => {
  const bat = new BigUint64Array([present(1)]);
  const regions: Array<[number, number]> = [
    [MiB, 2 * MiB],
    [MiB + 4096, 3 * MiB],
  ];
  assert.deepEqual(checkBatEntries(bat, { ...context, regions }, false), [`VHDX region ${MiB}-${2 * MiB} overlaps with region ${MiB + 4096}-${3 * MiB}`]);
});

test("a disk size that is not a multiple of 512 counts in whole sectors, rounded down, as QEMU's total_sectors", () => {
  // 3 MiB - 1000 bytes in 1 MiB blocks: the last block (entry 2, at 10 MiB) holds 1 MiB - 1024 bytes as QEMU counts it.
  const bat = new BigUint64Array([0n, 0n, present(10)]);
  const odd = { ...context, chunkRatio: 4, virtualDiskBytes: 3 * MiB - 1000, regions: [] };
  assert.deepEqual(checkBatEntries(bat, { ...odd, fileSizeBytes: 11 * MiB - 1024 }, false), []);
  assert.deepEqual(checkBatEntries(bat, { ...odd, fileSizeBytes: 11 * MiB - 1536 }, false), [
    `VHDX BAT entry 2 end offset ${11 * MiB - 1025} points after end of file (${11 * MiB - 1536}). Image has probably been truncated.`,
  ]);
});
