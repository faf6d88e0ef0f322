/**
 * Malformed qcow2 images, generated from small valid seed images: truncated
 * files; every header field set to 0, its maximum and random values; L1,
 * L2 and refcount table entries pointing at the header, at each other, at
 * themselves and past the end; snapshot tables with overlong names, counts
 * and extra data; compressed descriptors with impossible sizes; backing
 * names past cluster 0 and 1023+ bytes long. Deterministic for a seed.
 */
import { createQcow2, type Qcow2CreateOptions } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2 } from "../../src/formats/qcow2/qcow2-image.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { createRandom } from "../helpers/random.ts";
import { COPIED, HEADER_FIELDS, fieldMax, getField, getU64, imageLayout, setField, setU64, type HeaderField } from "../helpers/crash-image-surgery.ts";

export interface HostileCase {
  name: string;
  bytes: Uint8Array;
}

export interface SeedImage {
  name: string;
  bytes: Uint8Array;
}

const MiB = 1024 * 1024;
const COMPRESSED = 1n << 62n;

/** Small valid images covering the features a hostile image can abuse. */
export async function seedImages(): Promise<SeedImage[]> {
  const make = async (name: string, options: Qcow2CreateOptions, fill: (cs: number) => Promise<void> | void = () => undefined, extra?: (image: Awaited<ReturnType<typeof openQcow2>>) => Promise<void>): Promise<SeedImage> => {
    const file = new MemoryFile({ name });
    await createQcow2(file, options);
    const image = await openQcow2(file, { readOnly: false, backing: null });
    const cs = options.clusterSizeBytes ?? 65536;
    await fill(cs);
    for (const c of [0, 1, 3, 7]) await image.write(c * cs + 512, new Uint8Array(Math.min(cs, 4096)).fill(c + 1));
    await image.writeCompressed(10 * cs, new Uint8Array(cs).fill(0x33));
    await image.writeZeroes(12 * cs, cs);
    if (extra !== undefined) await extra(image);
    await image.close();
    return { name, bytes: file.contents() };
  };
  return [
    await make("v3-64k-snapshot", { sizeBytes: 4 * MiB }, undefined, async (image) => {
      await image.createSnapshot("first");
      await image.write(0, new Uint8Array(4096).fill(9));
    }),
    await make("v3-512-refcount64", { sizeBytes: 4 * MiB, clusterSizeBytes: 512, refcountBits: 64 }),
    await make("v2-4k", { sizeBytes: 4 * MiB, clusterSizeBytes: 4096, compat: "0.10" }),
    await make("v3-32k-extended-l2-zstd", { sizeBytes: 4 * MiB, clusterSizeBytes: 32768, extendedL2: true, compressionType: "zstd" }),
    await make("v3-4k-backing-name", { sizeBytes: 4 * MiB, clusterSizeBytes: 4096, backingFile: "base.qcow2", backingFormat: "qcow2" }),
  ];
}

function variant(seed: SeedImage, what: string, change: (bytes: Uint8Array) => void): HostileCase {
  const bytes = seed.bytes.slice();
  change(bytes);
  return { name: `${seed.name}: ${what}`, bytes };
}

/** All structured hostile cases for one seed image. */
export function hostileCases(seed: SeedImage, randomSeed: number): HostileCase[] {
  const random = createRandom(randomSeed);
  const cases: HostileCase[] = [];
  const layout = imageLayout(seed.bytes);
  const cs = layout.clusterSizeBytes;
  const fileSize = seed.bytes.length;
  const add = (what: string, change: (bytes: Uint8Array) => void): void => {
    cases.push(variant(seed, what, change));
  };

  // Truncated files.
  const cuts = new Set([0, 1, 3, 4, 8, 71, 72, 103, 104, 111, 112, cs - 1, cs, cs + 1, layout.l1TableOffset + 4, layout.refcountTableOffset + 8, Math.floor(fileSize / 2), fileSize - 1]);
  for (const cut of cuts) if (cut < fileSize) cases.push({ name: `${seed.name}: truncated to ${cut} bytes`, bytes: seed.bytes.slice(0, cut) });

  // Every header field at 0, its maximum and random values.
  for (const field of Object.keys(HEADER_FIELDS) as HeaderField[]) {
    const max = fieldMax(field);
    const values = [0n, max, max >> 1n, 1n, BigInt(random.int(2 ** 31)) * BigInt(random.int(2 ** 31)), BigInt(random.int(256))];
    for (const value of values) add(`${field} = 0x${(value & max).toString(16)}`, (b) => setField(b, field, value));
  }
  // A header claiming a 2^60-byte disk and L1 (must be refused by limit checks, not by memory).
  add("size 2^60 with a matching L1 size", (b) => {
    setField(b, "size", 1n << 60n);
    setField(b, "l1Size", (1n << 60n) / BigInt(cs * (cs / 8)));
  });
  add("refcount table of 2^32-1 clusters", (b) => setField(b, "refcountTableClusters", 0xffffffffn));
  add("unknown incompatible feature bit", (b) => setField(b, "incompatibleFeatures", getField(b, "incompatibleFeatures") | (1n << 40n)));
  add("header extension of absurd length", (b) => {
    const at = Number(getField(b, "headerLength")) || 72;
    new DataView(b.buffer, b.byteOffset).setUint32(at + 4, 0xfffffff0);
  });

  // Pointers into the header, at each other, at themselves, past the end.
  const targets: [string, bigint][] = [
    ["the header (offset 0)", 0n],
    ["inside the header (512)", 512n],
    ["the L1 table", BigInt(layout.l1TableOffset)],
    ["the refcount table", BigInt(layout.refcountTableOffset)],
    ["a refcount block", BigInt(layout.refblockOffsets.find((o) => o !== 0) ?? cs)],
    ["an L2 table", BigInt(layout.l2Offsets.find((o) => o !== 0) ?? cs)],
    ["one cluster past the end", BigInt(Math.ceil(fileSize / cs) * cs + cs)],
    ["far past the end (2^50)", 1n << 50n],
    ["an unaligned offset", BigInt(layout.l1TableOffset + 8)],
    ["the maximum offset field", 0x00fffffffffffe00n],
  ];
  const firstL2 = layout.l2Offsets.find((o) => o !== 0) ?? 0;
  for (const [what, target] of targets) {
    for (const copied of [0n, COPIED]) {
      const flag = copied !== 0n ? "|COPIED" : "";
      add(`L1 entry 0 -> ${what}${flag}`, (b) => setU64(b, layout.l1TableOffset, target | copied));
      if (firstL2 !== 0) add(`L2 entry 1 -> ${what}${flag}`, (b) => setU64(b, firstL2 + layout.l2EntryBytes, target | copied));
    }
    add(`refcount table entry 0 -> ${what}`, (b) => setU64(b, layout.refcountTableOffset, target));
  }
  if (firstL2 !== 0) {
    add("L2 table pointing at itself", (b) => setU64(b, firstL2, BigInt(firstL2) | COPIED));
    add("L2 entries with every reserved bit", (b) => setU64(b, firstL2 + layout.l2EntryBytes, getU64(b, firstL2 + layout.l2EntryBytes) | 0x3f000000000001fen));
    // Compressed descriptors with impossible sizes and places.
    const x = 62 - (Math.log2(cs) - 8);
    const sectorsMax = (1n << BigInt(62 - x)) - 1n;
    const descriptors: [string, bigint][] = [
      ["all sector bits", COMPRESSED | (sectorsMax << BigInt(x)) | 4096n],
      ["offset 0", COMPRESSED | (1n << BigInt(x))],
      ["offset past the end", COMPRESSED | (1n << BigInt(x)) | BigInt(fileSize + 10 * cs)],
      ["offset at the L1 table", COMPRESSED | (2n << BigInt(x)) | BigInt(layout.l1TableOffset)],
      ["max offset, max sectors", COMPRESSED | ((1n << 62n) - 1n)],
      ["zero flag and compressed", COMPRESSED | 1n],
    ];
    for (const [what, word] of descriptors) add(`compressed descriptor: ${what}`, (b) => setU64(b, firstL2 + 2 * layout.l2EntryBytes, word));
  }
  const firstRefblock = layout.refblockOffsets.find((o) => o !== 0) ?? 0;
  if (firstRefblock !== 0) {
    add("refcount block all ones", (b) => b.fill(0xff, firstRefblock, firstRefblock + cs));
    add("refcount block all zero", (b) => b.fill(0, firstRefblock, firstRefblock + cs));
  }
  add("L1 table all ones", (b) => b.fill(0xff, layout.l1TableOffset, layout.l1TableOffset + layout.l1Size * 8));

  // Snapshot tables.
  const snapshotsAt = Number(getField(seed.bytes, "snapshotsOffset"));
  if (Number(getField(seed.bytes, "snapshotCount")) > 0) {
    const entry = (b: Uint8Array): DataView => new DataView(b.buffer, b.byteOffset + snapshotsAt);
    add("snapshot count 65536", (b) => setField(b, "snapshotCount", 65536n));
    add("snapshot count 65537", (b) => setField(b, "snapshotCount", 65537n));
    add("snapshot id and name 65535 bytes", (b) => {
      entry(b).setUint16(12, 0xffff);
      entry(b).setUint16(14, 0xffff);
    });
    add("snapshot extra data 2^32-1 bytes", (b) => entry(b).setUint32(36, 0xffffffff));
    add("snapshot extra data 1025 bytes", (b) => entry(b).setUint32(36, 1025));
    add("snapshot L1 size 2^32-1", (b) => entry(b).setUint32(8, 0xffffffff));
    add("snapshot L1 past the end", (b) => entry(b).setBigUint64(0, BigInt(fileSize + 4 * cs)));
    add("snapshot L1 unaligned", (b) => entry(b).setBigUint64(0, BigInt(layout.l1TableOffset + 8)));
    add("snapshot L1 = the active L1", (b) => entry(b).setBigUint64(0, BigInt(layout.l1TableOffset)));
    add("snapshot L1 = the refcount table", (b) => entry(b).setBigUint64(0, BigInt(layout.refcountTableOffset)));
    add("snapshot table past the end", (b) => setField(b, "snapshotsOffset", BigInt(fileSize + cs)));
  } else {
    add("snapshot count 1000 with the table at the header", (b) => {
      setField(b, "snapshotCount", 1000n);
      setField(b, "snapshotsOffset", 0n);
    });
  }

  // Backing names: past cluster 0, 1023 and more bytes, offset + size overflowing.
  const backingAt = Number(getField(seed.bytes, "backingFileOffset"));
  if (backingAt !== 0) {
    add("backing name 1023 bytes", (b) => {
      b.fill(0x61, backingAt, Math.min(cs, backingAt + 1023));
      setField(b, "backingFileSize", 1023n);
    });
    add("backing name 1024 bytes", (b) => setField(b, "backingFileSize", 1024n));
    add("backing name crossing cluster 0", (b) => setField(b, "backingFileOffset", BigInt(cs - 4)));
    add("backing name at offset 2^63", (b) => setField(b, "backingFileOffset", 1n << 63n));
  }
  return cases;
}

// --------------------------------------------------------------- mutations

export interface MutationContext {
  /** Host ranges holding metadata in the seed (where mutations matter). */
  metadataRanges: [number, number][];
  interestingWords: bigint[];
  clusterSizeBytes: number;
}

export function mutationContext(seed: SeedImage): MutationContext {
  const layout = imageLayout(seed.bytes);
  const cs = layout.clusterSizeBytes;
  const ranges: [number, number][] = [[0, Math.min(cs, seed.bytes.length)]];
  ranges.push([layout.l1TableOffset, layout.l1Size * 8]);
  ranges.push([layout.refcountTableOffset, cs]);
  for (const offset of layout.l2Offsets) if (offset !== 0) ranges.push([offset, cs]);
  for (const offset of layout.refblockOffsets) if (offset !== 0) ranges.push([offset, cs]);
  const snapshotsAt = Number(getField(seed.bytes, "snapshotsOffset"));
  if (snapshotsAt !== 0) ranges.push([snapshotsAt, 512]);
  const size = BigInt(seed.bytes.length);
  const interestingWords = [0n, 1n, 0xffffffffffffffffn, 1n << 63n, 1n << 62n, size, size + BigInt(cs), BigInt(cs), BigInt(layout.l1TableOffset), BigInt(layout.refcountTableOffset), 1n << 55n, 0x7fffffffffffffffn];
  for (const offset of layout.l2Offsets.slice(0, 4)) interestingWords.push(BigInt(offset), BigInt(offset) | COPIED);
  return { metadataRanges: ranges.filter(([start, length]) => length > 0 && start + length <= seed.bytes.length), interestingWords, clusterSizeBytes: cs };
}

/** One to four random mutations of a seed image, mostly in its metadata. */
export function mutate(seed: SeedImage, context: MutationContext, random: ReturnType<typeof createRandom>): { bytes: Uint8Array; what: string[] } {
  let bytes = seed.bytes.slice();
  const what: string[] = [];
  const count = 1 + random.int(4);
  const metadataOffset = (): number => {
    const [start, length] = context.metadataRanges[random.int(context.metadataRanges.length)];
    return start + random.int(length);
  };
  for (let i = 0; i < count && bytes.length > 0; i++) {
    const roll = random.next();
    if (roll < 0.3) {
      const at = metadataOffset();
      if (at >= bytes.length) continue;
      const bit = random.int(8);
      bytes[at] ^= 1 << bit;
      what.push(`flip bit ${bit} at ${at}`);
    } else if (roll < 0.6) {
      const at = metadataOffset() & ~7;
      if (at + 8 > bytes.length) continue;
      const word = context.interestingWords[random.int(context.interestingWords.length)] | (random.next() < 0.2 ? COPIED : 0n);
      setU64(bytes, at, word);
      what.push(`word at ${at} = 0x${word.toString(16)}`);
    } else if (roll < 0.7) {
      const at = random.int(Math.min(bytes.length, 112)) & ~3;
      if (at + 4 > bytes.length) continue;
      const value = [0, 1, 0xffffffff, 0x80000000, random.int(2 ** 32), 64, 65536][random.int(7)];
      new DataView(bytes.buffer).setUint32(at, value >>> 0);
      what.push(`header u32 at ${at} = ${value}`);
    } else if (roll < 0.78) {
      const cut = random.int(bytes.length);
      bytes = bytes.slice(0, cut);
      what.push(`truncate to ${cut}`);
    } else if (roll < 0.88) {
      const cs = context.clusterSizeBytes;
      const clusters = Math.floor(bytes.length / cs);
      if (clusters < 2) continue;
      const from = random.int(clusters);
      const to = random.int(clusters);
      bytes.copyWithin(to * cs, from * cs, from * cs + cs);
      what.push(`copy cluster ${from} over ${to}`);
    } else {
      const at = random.int(bytes.length);
      bytes[at] = random.int(256);
      what.push(`byte at ${at} random`);
    }
  }
  return { bytes, what };
}
