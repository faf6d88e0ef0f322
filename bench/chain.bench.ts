/**
 * Reads through a backing chain 100 images deep vs the same reads from the
 * chain flattened into one image.
 *
 * Fixture (bench/fixtures/images.ts buildChain): 100 qcow2 images over a
 * 256 MiB virtual disk; cluster k is written in layer k mod 125 when that is
 * below 100, so data sits evenly at every depth (down to the base, 99
 * backing hops below the top) and one cluster in five is a hole in every
 * layer. The flat image is `qemu-img convert` of the top.
 *
 * Measured in process through the library (random 4 KiB reads and
 * sequential 1 MiB reads, one in flight) and with `qemu-img bench` on the
 * same two files. Rows: absolute rates for chain and flat, then the slowdown
 * (chain time / flat time) for snapstack vs QEMU, target <= 1.2 for
 * snapstack. Every snapstack read path is checked against the fixture's
 * layout before timing.
 */
import { join } from "node:path";
import { buildChain, flattenWithQemu, KiB, MiB, patternByteFor, withScratchDir, type ChainFixture } from "./fixtures/images.ts";
import { printRows, row, type BenchRow } from "./fixtures/rows.ts";
import { describeFailure, openSnapstackImage } from "./fixtures/snapstack.ts";
import { median, qemuImgBenchSeconds } from "./fixtures/tools.ts";
import { randomOffsets, scatterStepBytes, sequentialOffsets, timeReads, type ReadAt } from "./fixtures/workload.ts";

const CHAIN_DEPTH = 100;
const VIRTUAL_SIZE_BYTES = 256 * MiB;
const RUNS = 3;
const VERIFY_READS = 2000;

interface ChainCase {
  name: string;
  requestBytes: number;
  requestCount: number;
  /** qemu-img bench runs fewer requests: through 100 layers it does under 10,000/s. */
  peerRequestCount: number;
  random: boolean;
}

const CASES: ChainCase[] = [
  { name: "random 4 KiB reads", requestBytes: 4 * KiB, requestCount: 50_000, peerRequestCount: 10_000, random: true },
  { name: "sequential 1 MiB reads", requestBytes: 1 * MiB, requestCount: 512, peerRequestCount: 512, random: false },
];

function rate(c: ChainCase, requestCount: number, seconds: number): number {
  return c.random ? requestCount / seconds : (requestCount * c.requestBytes) / seconds / 1e9;
}

async function verifyAgainstLayout(read: ReadAt, fixture: ChainFixture): Promise<string> {
  const offsets = randomOffsets(VERIFY_READS, fixture.virtualSizeBytes, 4 * KiB, 11);
  const buffer = new Uint8Array(4 * KiB);
  for (const guestOffset of offsets) {
    await read(guestOffset, buffer);
    const layer = fixture.layerOfCluster[Math.floor(guestOffset / fixture.clusterSizeBytes)];
    const expected = layer < 0 ? 0 : patternByteFor(layer);
    if (buffer.some((byte) => byte !== expected)) return `WRONG DATA at guest offset ${guestOffset} (expected byte ${expected} from layer ${layer})`;
  }
  return `data verified (${VERIFY_READS} reads)`;
}

interface Measured {
  snapstack: number | null;
  qemuThreads: number;
  qemuUring: number;
  note: string;
}

async function measureImage(path: string, c: ChainCase, offsets: Float64Array, fixture: ChainFixture): Promise<Measured> {
  let snapstack: number | null = null;
  let note: string;
  try {
    const openStarted = performance.now();
    const device = await openSnapstackImage(path);
    const openMs = performance.now() - openStarted;
    try {
      const read: ReadAt = (offset, buffer) => device.read(offset, buffer);
      note = `${await verifyAgainstLayout(read, fixture)}, open ${openMs.toFixed(0)} ms`;
      const rates: number[] = [];
      for (let i = 0; i < RUNS; i++) rates.push(rate(c, c.requestCount, await timeReads(read, offsets, c.requestBytes, 1)));
      snapstack = median(rates);
    } finally {
      await device.close();
    }
  } catch (error) {
    note = describeFailure(error);
  }
  const stepBytes = c.random ? scatterStepBytes(fixture.virtualSizeBytes, c.requestBytes) : c.requestBytes;
  const peer = async (aio: "threads" | "io_uring"): Promise<number> => {
    const rates: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      rates.push(rate(c, c.peerRequestCount, await qemuImgBenchSeconds(path, { format: "qcow2", requestCount: c.peerRequestCount, requestBytes: c.requestBytes, stepBytes, inFlight: 1, aio })));
    }
    return median(rates);
  };
  return { snapstack, qemuThreads: await peer("threads"), qemuUring: await peer("io_uring"), note };
}

export default async function chainBench(): Promise<BenchRow[]> {
  return withScratchDir("chain", async (dir) => {
    const fixture = await buildChain(dir, CHAIN_DEPTH, VIRTUAL_SIZE_BYTES);
    const flatPath = join(dir, "flat.qcow2");
    await flattenWithQemu(fixture.topPath, flatPath);

    const rows: BenchRow[] = [];
    for (const c of CASES) {
      const unit = c.random ? "ops/s" : "GB/s";
      const fmt = (value: number): string => (c.random ? Math.round(value).toLocaleString("en-US") : value.toFixed(2));
      const offsets = c.random ? randomOffsets(c.requestCount, VIRTUAL_SIZE_BYTES, c.requestBytes) : sequentialOffsets(c.requestCount, VIRTUAL_SIZE_BYTES, c.requestBytes);
      const chain = await measureImage(fixture.topPath, c, offsets, fixture);
      const flat = await measureImage(flatPath, c, offsets, fixture);
      const peerNote = (m: Measured): string => `peer = qemu-img bench -i threads; -i io_uring: ${fmt(m.qemuUring)}; ${m.note}`;
      rows.push(row(`${c.name}, chain of ${CHAIN_DEPTH}`, chain.snapstack, chain.qemuThreads, unit, peerNote(chain)));
      rows.push(row(`${c.name}, flattened`, flat.snapstack, flat.qemuThreads, unit, peerNote(flat)));
      // Slowdown = chain time / flat time = flat rate / chain rate.
      const snapSlowdown = chain.snapstack !== null && flat.snapstack !== null ? flat.snapstack / chain.snapstack : null;
      const qemuSlowdown = flat.qemuThreads / chain.qemuThreads;
      const qemuUringSlowdown = flat.qemuUring / chain.qemuUring;
      rows.push(
        row(
          `${c.name}: chain-${CHAIN_DEPTH} slowdown vs flat`,
          snapSlowdown,
          qemuSlowdown,
          "x",
          `chain time / flat time; target <= 1.2 for snapstack; qemu-img -i io_uring slowdown ${qemuUringSlowdown.toFixed(2)}x`,
        ),
      );
    }
    return rows;
  });
}

if (import.meta.main) printRows(import.meta.filename, await chainBench());
