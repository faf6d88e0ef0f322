import { writeFileSync } from "node:fs";
/**
 * Seeded pseudo-random numbers for randomized tests. Every randomized test
 * prints its seed; set SNAPSTACK_SEED=<seed> to replay a failing run.
 */
export function testSeed(): number {
  const fromEnv = process.env.SNAPSTACK_SEED;
  if (fromEnv !== undefined && fromEnv !== "") return Number(fromEnv) >>> 0;
  return (Date.now() ^ (process.pid << 16)) >>> 0;
}

/** mulberry32: small, fast, good enough for test workloads. */
export function createRandom(seed: number): { next(): number; int(maxExclusive: number): number; bytes(length: number): Uint8Array } {
  let state = seed >>> 0;
  const next = (): number => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    next,
    int: (maxExclusive: number) => Math.floor(next() * maxExclusive),
    bytes: (length: number) => {
      const out = new Uint8Array(length);
      for (let i = 0; i < length; i++) out[i] = Math.floor(next() * 256);
      return out;
    },
  };
}

/**
 * A raw disk image of `sizeBytes` with seeded random data in `runs`
 * scattered runs of whole sectors (up to 400 each, aligned to nothing
 * larger) and zeroes between, written to `path`: the source the foreign
 * format tests convert from.
 */
export function writeScatteredDisk(path: string, sizeBytes: number, seed: number, runs = 16): Uint8Array {
  const random = createRandom(seed);
  const disk = new Uint8Array(sizeBytes);
  for (let run = 0; run < runs; run++) {
    const start = random.int(sizeBytes);
    const length = Math.min(sizeBytes - start, 512 * (1 + random.int(400)));
    disk.set(random.bytes(length), start);
  }
  writeFileSync(path, disk);
  return disk;
}
