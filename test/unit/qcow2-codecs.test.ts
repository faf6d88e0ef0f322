import { test } from "node:test";
import { LUKS_HEADER_BYTES, decodeLuksHeader } from "../../src/formats/qcow2/luks-header.ts";
import assert from "node:assert/strict";
import {
  decodeQcow2Header,
  encodeQcow2Header,
  newQcow2Header,
  INCOMPAT_COMPRESSION,
  INCOMPAT_EXTL2,
  COMPAT_LAZY_REFCOUNTS,
  QEMU_FEATURE_TABLE,
} from "../../src/formats/qcow2/header.ts";
import {
  decodeCompressedDescriptor,
  encodeCompressedDescriptor,
  encodeL2Entry,
  getL1Entry,
  getL2Entry,
  setL1Entry,
  setL2EntryWords,
  subclusterType,
  compressedReadBytes,
} from "../../src/formats/qcow2/entries.ts";
import { changeRefcountRun, getRefcount, refcountMax, refcountsPerBlock, setRefcount, decodeRefcountTable, encodeRefcountTable } from "../../src/formats/qcow2/refcount-block.ts";
import { decodeSnapshotTable, encodeSnapshotTable, snapshotTableBytes, type Qcow2Snapshot } from "../../src/formats/qcow2/snapshot-table.ts";
import { isSnapstackError } from "../../src/base/errors.ts";

function hex(s: string): Uint8Array {
  return Uint8Array.from(Buffer.from(s.replace(/\s+/g, ""), "hex"));
}

test("default v3 header encodes as qemu-img lays it out", () => {
  const header = newQcow2Header({
    version: 3,
    clusterBits: 16,
    sizeBytes: 1 << 30,
    l1Size: 2,
    l1TableOffset: 0x30000,
    refcountTableOffset: 0x10000,
    refcountTableClusters: 1,
  });
  const bytes = encodeQcow2Header(header);
  assert.equal(bytes.length, 65536);
  // Fixed header as in reference §3.
  assert.deepEqual(
    bytes.subarray(0, 112),
    hex(
      "514649fb 00000003 0000000000000000 00000000 00000010 0000000040000000 00000000 00000002 0000000000030000" +
        "0000000000010000 00000001 00000000 0000000000000000 0000000000000000 0000000000000000 0000000000000000 00000004 00000070" +
        "00 00000000000000",
    ),
  );
  // Feature table at 0x70, len 0x180, end marker at 0x1f8.
  assert.deepEqual(bytes.subarray(0x70, 0x78), hex("6803f857 00000180"));
  assert.deepEqual(bytes.subarray(0x1f8, 0x200), hex("0000000000000000"));
  const decoded = decodeQcow2Header(bytes);
  assert.equal(decoded.version, 3);
  assert.equal(decoded.sizeBytes, 1 << 30);
  assert.equal(decoded.l1TableOffset, 0x30000);
  assert.equal(decoded.headerLengthBytes, 112);
  assert.deepEqual(decoded.extensions.featureNames, QEMU_FEATURE_TABLE);
  assert.equal(decoded.backingFileName, null);
});

test("backing file name and format round trip in QEMU's order", () => {
  const header = newQcow2Header({ version: 3, clusterBits: 16, sizeBytes: 1 << 20, backingFileName: "base.qcow2", backingFormat: "qcow2" });
  const bytes = encodeQcow2Header(header);
  assert.deepEqual(bytes.subarray(0x70, 0x80), hex("e2792aca 00000005 7163 6f77 3200 0000"));
  const decoded = decodeQcow2Header(bytes);
  assert.equal(decoded.backingFileOffset, 0x210);
  assert.equal(decoded.backingFileSizeBytes, 10);
  assert.equal(decoded.backingFileName, "base.qcow2");
  assert.equal(decoded.backingFormat, "qcow2");
});

test("v2 header is 72 bytes, no feature table; small clusters have no feature table", () => {
  const v2 = decodeQcow2Header(encodeQcow2Header(newQcow2Header({ version: 2, clusterBits: 16, sizeBytes: 4096 })));
  assert.equal(v2.version, 2);
  assert.equal(v2.headerLengthBytes, 72);
  assert.equal(v2.extensions.featureNames, null);
  assert.equal(v2.refcountOrder, 4);
  const small = decodeQcow2Header(encodeQcow2Header(newQcow2Header({ version: 3, clusterBits: 12, sizeBytes: 4096 })));
  assert.equal(small.extensions.featureNames, null);
});

test("unknown extensions, features and header bytes are kept", () => {
  const header = newQcow2Header({
    version: 3,
    clusterBits: 16,
    sizeBytes: 4096,
    compatibleFeatures: COMPAT_LAZY_REFCOUNTS | (1n << 7n),
    incompatibleFeatures: INCOMPAT_COMPRESSION | INCOMPAT_EXTL2,
    compressionType: 1,
    unknownHeaderBytes: Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8),
  });
  header.extensions.unknown.push({ magic: 0x12345678, data: Uint8Array.of(9, 9, 9) });
  header.extensions.bitmaps = { bitmapCount: 2, directorySizeBytes: 64, directoryOffset: 0x50000 };
  const decoded = decodeQcow2Header(encodeQcow2Header(header));
  assert.equal(decoded.headerLengthBytes, 120);
  assert.deepEqual(decoded.unknownHeaderBytes, Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8));
  assert.deepEqual(decoded.extensions.unknown, [{ magic: 0x12345678, data: Uint8Array.of(9, 9, 9) }]);
  assert.deepEqual(decoded.extensions.bitmaps, header.extensions.bitmaps);
  assert.equal(decoded.compressionType, 1);
  assert.equal(decoded.compatibleFeatures, COMPAT_LAZY_REFCOUNTS | (1n << 7n));
});

test("header validation gives coded, QEMU-like errors", () => {
  const good = encodeQcow2Header(newQcow2Header({ version: 3, clusterBits: 16, sizeBytes: 4096 }));
  const expectCode = (bytes: Uint8Array, code: string, message: RegExp) =>
    assert.throws(() => decodeQcow2Header(bytes), (e: unknown) => isSnapstackError(e) && e.code === code && message.test(e.message));
  const badMagic = good.slice();
  badMagic[0] = 0;
  expectCode(badMagic, "E_WRONG_FORMAT", /not in qcow2 format/);
  const badVersion = good.slice();
  badVersion[7] = 4;
  expectCode(badVersion, "E_UNSUPPORTED_FEATURE", /Unsupported qcow2 version 4/);
  const unknownBit = good.slice();
  unknownBit[79] = 0x20;
  expectCode(unknownBit, "E_UNSUPPORTED_FEATURE", /Unknown incompatible feature: 20/);
  const badCluster = good.slice();
  badCluster[23] = 22;
  expectCode(badCluster, "E_BAD_HEADER", /Unsupported cluster size/);
  const compressionBit = good.slice();
  compressionBit[79] = 0x08;
  expectCode(compressionBit, "E_BAD_HEADER", /must not be set/);
  const shortHeader = good.slice();
  shortHeader[103] = 100;
  expectCode(shortHeader, "E_BAD_HEADER", /too short/);
  const extOverrun = good.slice();
  new DataView(extOverrun.buffer).setUint32(0x74, 0x10000);
  expectCode(extOverrun, "E_BAD_HEADER", /Header extension too large/);
});

test("L1 entries", () => {
  const table = new Uint8Array(16);
  setL1Entry(table, 1, { l2Offset: 0x50000, copied: true });
  assert.deepEqual(table.subarray(8), hex("8000000000050000"));
  assert.deepEqual(getL1Entry(table, 1), { l2Offset: 0x50000, copied: true, reservedBitsSet: false, offsetTooLarge: false });
  table[15] = 1;
  assert.equal(getL1Entry(table, 1).reservedBitsSet, true);
});

test("standard L2 entry types", () => {
  const table = new Uint8Array(64);
  const view = new DataView(table.buffer);
  const words: bigint[] = [
    0n,
    1n,
    encodeL2Entry({ type: "zero-alloc", hostOffset: 0x50000, copied: true }, 16),
    encodeL2Entry({ type: "normal", hostOffset: 0x123450000, copied: true }, 16),
    encodeL2Entry({ type: "compressed", hostOffset: 0x60123, compressedBytes: 1000 }, 16),
  ];
  words.forEach((w, i) => setL2EntryWords(view, i, false, w));
  assert.equal(words[2], 0x8000000000050001n);
  assert.equal(words[3], 0x8000000123450000n);
  const types = words.map((_, i) => getL2Entry(view, i, false, 16).type);
  assert.deepEqual(types, ["unallocated", "zero-plain", "zero-alloc", "normal", "compressed"]);
  const normal = getL2Entry(view, 3, false, 16);
  assert.equal(normal.hostOffset, 0x123450000);
  assert.equal(normal.copied, true);
  const compressed = getL2Entry(view, 4, false, 16);
  assert.equal(compressed.hostOffset, 0x60123);
  assert.equal(compressed.copied, false);
  // 0x60123 + 1000 - 1 = 0x6050a: sectors 0x300 .. 0x302 -> 3 sectors.
  assert.equal(compressed.compressedSectors, 3);
  assert.ok(compressedReadBytes(compressed.hostOffset, compressed.compressedSectors) >= 1000);
});

test("extended L2 entries and subcluster types", () => {
  const table = new Uint8Array(64);
  const view = new DataView(table.buffer);
  setL2EntryWords(view, 0, true, encodeL2Entry({ type: "normal", hostOffset: 0x70000, copied: true }, 16, true), 0xc, 0);
  setL2EntryWords(view, 1, true, 0n, 0, 0xffffffff);
  assert.deepEqual(table.subarray(0, 16), hex("8000000000070000 00000000 0000000c"));
  assert.deepEqual(table.subarray(16, 32), hex("0000000000000000 ffffffff 00000000"));
  const e0 = getL2Entry(view, 0, true, 16);
  assert.equal(subclusterType(e0, 2), "normal");
  assert.equal(subclusterType(e0, 0), "unallocated-alloc");
  const e1 = getL2Entry(view, 1, true, 16);
  assert.equal(subclusterType(e1, 31), "zero-plain");
  setL2EntryWords(view, 2, true, encodeL2Entry({ type: "normal", hostOffset: 0x80000, copied: true }, 16, true), 1, 1);
  assert.equal(subclusterType(getL2Entry(view, 2, true, 16), 5), "invalid");
  setL2EntryWords(view, 3, true, 0n, 1, 0);
  assert.equal(subclusterType(getL2Entry(view, 3, true, 16), 5), "invalid");
});

test("compressed descriptors round trip for cluster bits 9..21", () => {
  for (let clusterBits = 9; clusterBits <= 21; clusterBits++) {
    const clusterSizeBytes = 2 ** clusterBits;
    const shift = 62 - (clusterBits - 8);
    const offsets = [0, 511, 512, 0x12345, 2 ** 40 + 77, Math.min(2 ** shift, 2 ** 53) - clusterSizeBytes - 1];
    for (const hostOffset of offsets) {
      for (const length of [1, 100, 511, 512, 513, clusterSizeBytes - 1]) {
        const additional = Math.floor((hostOffset + length - 1) / 512) - Math.floor(hostOffset / 512);
        if (additional >= 2 ** (clusterBits - 8)) continue;
        const descriptor = encodeCompressedDescriptor(hostOffset, length, clusterBits);
        assert.equal(descriptor >> 62n, 1n);
        const decoded = decodeCompressedDescriptor(descriptor, clusterBits);
        assert.equal(decoded.hostOffset, hostOffset, `bits ${clusterBits} offset ${hostOffset}`);
        assert.equal(decoded.sectors, additional + 1);
        assert.ok(decoded.lengthBytes >= length);
        // Through the table path as well.
        const view = new DataView(new ArrayBuffer(8));
        view.setBigUint64(0, descriptor);
        const entry = getL2Entry(view, 0, false, clusterBits);
        assert.equal(entry.type, "compressed");
        assert.equal(entry.hostOffset, hostOffset);
        assert.equal(entry.compressedSectors, additional + 1);
      }
    }
  }
  // Test 214's sample: 2 MiB clusters, 0x4008000000a00000 = offset 0xa00000, 4+1 sectors.
  assert.deepEqual(decodeCompressedDescriptor(0x4008000000a00000n, 21), { hostOffset: 0xa00000, sectors: 5, lengthBytes: 2560 });
});

test("refcounts of every width", () => {
  for (let order = 0; order <= 6; order++) {
    const block = new Uint8Array(512);
    const count = refcountsPerBlock(9, order);
    assert.equal(count, 4096 / 2 ** order);
    const max = refcountMax(order);
    const expected: number[] = [];
    for (let i = 0; i < count; i++) {
      const value = (i * 2654435761) % (Math.min(max, 2 ** 40) + 1);
      expected.push(value);
      setRefcount(block, i, order, value);
    }
    for (let i = 0; i < count; i++) assert.equal(getRefcount(block, i, order), expected[i], `order ${order} index ${i}`);
    assert.throws(() => setRefcount(block, 0, order, max + 1));
  }
  // Sub-byte: bit 0 is the least significant bit.
  const block = new Uint8Array(2);
  setRefcount(block, 0, 0, 1);
  setRefcount(block, 3, 0, 1);
  assert.equal(block[0], 0b1001);
  const b2 = new Uint8Array(1);
  setRefcount(b2, 1, 1, 3);
  assert.equal(b2[0], 0b1100);
  const b16 = new Uint8Array(4);
  setRefcount(b16, 1, 4, 0x1234);
  assert.deepEqual(b16, Uint8Array.of(0, 0, 0x12, 0x34));
});

test("changeRefcountRun changes a run at every width and stops before the first refcount that would leave [1, max]", () => {
  for (let order = 0; order <= 6; order++) {
    const max = Math.min(refcountMax(order), 2 ** 40);
    const count = refcountsPerBlock(9, order);
    const block = new Uint8Array(512);
    const expected: number[] = [];
    for (let i = 0; i < count; i++) {
      expected.push(i === 40 ? max : i >= 10 && i < 40 ? 0 : (i * 7) % (max + 1));
      setRefcount(block, i, order, expected[i]);
    }
    const changes = (index: number, run: number, delta: number, changed: number, what: string): void => {
      assert.equal(changeRefcountRun(block, index, run, order, delta, max), changed, `order ${order}: ${what}`);
      for (let i = index; i < index + changed; i++) expected[i] += delta;
    };
    assert.equal(changeRefcountRun(block, 10, 30, order, 1, max, 1), 0, `order ${order}: minOld 1 stops at a free cluster`);
    changes(10, 30, 1, 30, "entries 10..39, all 0, raised by one");
    if (order !== 0) assert.equal(changeRefcountRun(block, 12, 1, order, 1, max, 1) + changeRefcountRun(block, 12, 1, order, -1, max, 1), 2, `order ${order}: minOld 1 lets a cluster in use through`);
    // A raise over entry 40 (at max) stops there; at width 1, 38 is at max already.
    changes(38, 5, 1, order === 0 ? 0 : 2, "raise stops at max");
    // A drop stops before the first refcount it would take to 0: 10..19 are at 1.
    changes(10, 10, -1, 0, "drop to zero refused");
    if (order !== 0) {
      setRefcount(block, 12, order, 3);
      expected[12] = 3;
      changes(12, 1, -1, 1, "3 -> 2");
      changes(38, 3, -1, 3, "38, 39 (at 2) and 40 (at max) lowered");
      changes(10, 12, -1, 0, "a run starting at 1 stops at once");
      changes(11, 3, -1, 0, "entry 11 at 1: nothing lowered");
      changes(12, 1, -1, 1, "2 -> 1");
    }
    for (let i = 0; i < count; i++) assert.equal(getRefcount(block, i, order), expected[i], `order ${order} index ${i}`);
  }
});

test("refcount table codec", () => {
  const bytes = encodeRefcountTable([0x20000, 0, 0x50000], 4);
  assert.equal(bytes.length, 32);
  const entries = decodeRefcountTable(bytes);
  assert.deepEqual(
    entries.map((e) => e.blockOffset),
    [0x20000, 0, 0x50000, 0],
  );
});

test("snapshot table round trip and QEMU layout", () => {
  const base: Qcow2Snapshot = {
    l1TableOffset: 0x50000,
    l1Size: 1,
    id: "1",
    name: "snap",
    dateSeconds: 1700000000,
    dateNanoseconds: 123000,
    vmClockNanoseconds: 0,
    vmStateSizeBytes: 0,
    diskSizeBytes: 4 * 1024 * 1024,
    icount: 0,
    extraDataSizeBytes: 24,
    unknownExtraData: new Uint8Array(0),
  };
  const second: Qcow2Snapshot = { ...base, id: "2", name: "second", icount: null, unknownExtraData: Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8) };
  const bytes = encodeSnapshotTable([base, second]);
  // 40 + 24 + 1 + 4 = 69 -> next entry at 72; 40 + 32 + 1 + 6 = 79.
  assert.equal(bytes.length, 72 + 79);
  assert.equal(snapshotTableBytes([base, second]), bytes.length);
  const { snapshots, tableBytes } = decodeSnapshotTable(bytes, 2, 0);
  assert.equal(tableBytes, bytes.length);
  assert.deepEqual(snapshots[0], base);
  assert.deepEqual(snapshots[1], { ...second, extraDataSizeBytes: 32 });
  // Extra data of 16 bytes (older writers): icount absent.
  const old = bytes.slice(0, 72);
  new DataView(old.buffer).setUint32(36, 16);
  const decodedOld = decodeSnapshotTable(Uint8Array.of(...old.subarray(0, 56), ...old.subarray(64, 69)), 1, 99).snapshots[0];
  assert.equal(decodedOld.icount, null);
  assert.equal(decodedOld.diskSizeBytes, 4 * 1024 * 1024);
  assert.equal(decodedOld.id, "1");
  assert.equal(decodedOld.name, "snap");
});

test("LUKS header: decoded as QEMU names its parameters; anything that is not a LUKS1 header is refused", () => {
  const bytes = new Uint8Array(LUKS_HEADER_BYTES);
  const view = new DataView(bytes.buffer);
  const put = (offset: number, text: string): void => bytes.set(Uint8Array.from(text, (char) => char.charCodeAt(0)), offset);
  bytes.set([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe], 0);
  view.setUint16(6, 1);
  put(8, "serpent");
  put(40, "cbc-essiv:sha256");
  put(72, "sha512");
  view.setUint32(104, 4040);
  view.setUint32(108, 32);
  view.setUint32(164, 1234);
  put(168, "6f2c68f9-2a72-429e-8f30-7cb842afa176");
  for (let slot = 0; slot < 8; slot++) {
    const at = 208 + slot * 48;
    view.setUint32(at, slot === 1 ? 0x00ac71f3 : 0x0000dead);
    view.setUint32(at + 4, 5000 + slot);
    view.setUint32(at + 40, 8 + slot * 504);
    view.setUint32(at + 44, 4000);
  }
  const info = decodeLuksHeader(bytes);
  assert.equal(info.cipherAlg, "serpent-256");
  assert.deepEqual([info.cipherMode, info.ivgenAlg, info.ivgenHashAlg, info.hashAlg], ["cbc", "essiv", "sha256", "sha512"]);
  assert.deepEqual([info.payloadOffsetBytes, info.masterKeyIterations, info.uuid], [4040 * 512, 1234, "6f2c68f9-2a72-429e-8f30-7cb842afa176"]);
  assert.deepEqual(info.slots[0], { active: false, keyOffsetBytes: 8 * 512 });
  assert.deepEqual(info.slots[1], { active: true, iterations: 5001, stripes: 4000, keyOffsetBytes: 512 * 512 });
  // XTS holds two keys: 64 key bytes are aes-256.
  put(8, "aes\0\0\0\0");
  put(40, "xts-plain64\0\0\0\0\0");
  view.setUint32(108, 64);
  const xts = decodeLuksHeader(bytes);
  assert.deepEqual([xts.cipherAlg, xts.cipherMode, xts.ivgenAlg, xts.ivgenHashAlg], ["aes-256", "xts", "plain64", undefined]);
  assert.throws(() => decodeLuksHeader(bytes.subarray(0, 100)), { code: "E_BAD_HEADER" });
  const garbage = bytes.slice();
  garbage[0] = 0;
  assert.throws(() => decodeLuksHeader(garbage), { code: "E_BAD_HEADER" });
  view.setUint16(6, 2);
  assert.throws(() => decodeLuksHeader(bytes), { code: "E_UNSUPPORTED_FEATURE" });
});
