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
 * Measured in process through the library, one request in flight:
 * - first pass: a freshly opened image read front to back in 1 MiB
 *   requests, once (what convert, commit or a backup pays: every cluster is
 *   resolved through the chain for the first time);
 * - warm: random 4 KiB and sequential 1 MiB reads after a warm-up pass
 *   (median of RUNS), with the chain and the flat image open together and
 *   their runs alternating, so drift in the shared machine's load hits
 *   both alike (the slowdown compares them).
 * Peer: `qemu-img bench` on the same two files (its timer excludes open).
 * Rows: absolute figures for chain and flat, then the slowdown (chain time /
 * flat time) for snapstack vs QEMU; target <= 1.2 for snapstack. CPU time
 * per request is in the notes (wall time on a shared machine includes time
 * spent descheduled). Every snapstack image is checked against the
 * fixture's layout before timing.
 */
import { join } from "node:path";
import type { BlockDevice } from "../src/device/block-device.ts";
import { buildChain, flattenWithQemu, KiB, MiB, patternByteFor, withScratchDir, type ChainFixture } from "./fixtures/images.ts";
import { printRows, row, type BenchRow } from "./fixtures/rows.ts";
import { describeFailure, openSnapstackImage } from "./fixtures/snapstack.ts";
import { median, qemuImgBenchSeconds } from "./fixtures/tools.ts";
import { caseOffsets, caseRate, randomOffsets, scatterStepBytes, sequentialOffsets, timeReads, type ReadAt, type ReadCase, type ReadTiming } from "./fixtures/workload.ts";

const CHAIN_DEPTH = 100;
const VIRTUAL_SIZE_BYTES = 256 * MiB;
const RUNS = 5;
/** qemu-img bench runs per warm case (each a separate process; its own figures need no alternation). */
const PEER_RUNS = 3;
const VERIFY_READS = 2000;

interface ChainCase extends ReadCase {
  /** qemu-img bench runs fewer requests: through 100 layers it does under 10,000/s. */
  peerRequestCount: number;
}

const WARM_CASES: ChainCase[] = [
  { name: "warm random 4 KiB reads", requestBytes: 4 * KiB, requestCount: 50_000, peerRequestCount: 10_000, inFlight: 1, random: true },
  { name: "warm sequential 1 MiB reads", requestBytes: 1 * MiB, requestCount: 512, peerRequestCount: 512, inFlight: 1, random: false },
];

const FIRST_PASS_REQUEST_BYTES = 1 * MiB;

async function verifyAgainstLayout(device: BlockDevice, fixture: ChainFixture): Promise<string> {
  const offsets = randomOffsets(VERIFY_READS, fixture.virtualSizeBytes, 4 * KiB, 11);
  const buffer = new Uint8Array(4 * KiB);
  for (const guestOffset of offsets) {
    await device.read(guestOffset, buffer);
    const layer = fixture.layerOfCluster[Math.floor(guestOffset / fixture.clusterSizeBytes)];
    const expected = layer < 0 ? 0 : patternByteFor(layer);
    if (buffer.some((byte) => byte !== expected)) return `WRONG DATA at guest offset ${guestOffset} (expected byte ${expected} from layer ${layer})`;
  }
  return `data verified (${VERIFY_READS} reads)`;
}

/** Everything measured on one image (the chain top or the flat image). */
interface ImageFigures {
  /** First pass over a freshly opened image: seconds, or null when snapstack failed. */
  firstPass: ReadTiming | null;
  openMs: number;
  /** Per warm case: median rate and CPU microseconds per request. */
  warm: { rate: number; cpuMicrosPerRequest: number }[] | null;
  note: string;
  qemuFirstPassSeconds: number;
  qemuWarm: number[];
}

async function withDevice<T>(path: string, fn: (device: BlockDevice, openMs: number) => Promise<T>): Promise<T> {
  const started = performance.now();
  const device = await openSnapstackImage(path);
  const openMs = performance.now() - started;
  try {
    return await fn(device, openMs);
  } finally {
    await device.close();
  }
}

async function measureFirstPass(path: string, figures: ImageFigures): Promise<void> {
  // First pass on a fresh open (nothing resolved or cached yet).
  const firstPassOffsets = sequentialOffsets(VIRTUAL_SIZE_BYTES / FIRST_PASS_REQUEST_BYTES, VIRTUAL_SIZE_BYTES, FIRST_PASS_REQUEST_BYTES);
  await withDevice(path, async (device, openMs) => {
    figures.openMs = openMs;
    figures.firstPass = await timeReads((offset, buffer) => device.read(offset, buffer), firstPassOffsets, FIRST_PASS_REQUEST_BYTES, 1);
  });
}

/** Warm cases on the chain and the flat image, open together, runs alternating between them. */
async function measureWarm(chainPath: string, chain: ImageFigures, flatPath: string, flat: ImageFigures, fixture: ChainFixture): Promise<void> {
  await withDevice(chainPath, (chainDevice) =>
    withDevice(flatPath, async (flatDevice) => {
      const images = [
        { device: chainDevice, figures: chain },
        { device: flatDevice, figures: flat },
      ];
      for (const image of images) {
        image.figures.note = await verifyAgainstLayout(image.device, fixture);
        image.figures.warm = [];
      }
      for (const c of WARM_CASES) {
        const offsets = caseOffsets(c, VIRTUAL_SIZE_BYTES);
        const reads: ReadAt[] = images.map(({ device }) => (offset, buffer) => device.read(offset, buffer));
        for (const read of reads) await timeReads(read, offsets, c.requestBytes, 1); // warm-up
        const timings: ReadTiming[][] = images.map(() => []);
        for (let i = 0; i < RUNS; i++) {
          for (const [index, read] of reads.entries()) timings[index].push(await timeReads(read, offsets, c.requestBytes, 1));
        }
        images.forEach((image, index) =>
          image.figures.warm?.push({
            rate: median(timings[index].map((t) => caseRate(c, c.requestCount, t.seconds))),
            cpuMicrosPerRequest: median(timings[index].map((t) => (t.cpuSeconds * 1e6) / c.requestCount)),
          }),
        );
      }
    }),
  );
}

/** First pass through snapstack, then qemu-img bench's figures (the warm snapstack cases come from measureWarm). */
async function measureImage(path: string): Promise<ImageFigures> {
  const figures: ImageFigures = { firstPass: null, openMs: 0, warm: null, note: "", qemuFirstPassSeconds: 0, qemuWarm: [] };
  try {
    await measureFirstPass(path, figures);
  } catch (error) {
    figures.firstPass = null;
    figures.warm = null;
    figures.note = describeFailure(error);
  }
  figures.qemuFirstPassSeconds = await qemuImgBenchSeconds(path, {
    format: "qcow2",
    requestCount: VIRTUAL_SIZE_BYTES / FIRST_PASS_REQUEST_BYTES,
    requestBytes: FIRST_PASS_REQUEST_BYTES,
    inFlight: 1,
  });
  for (const c of WARM_CASES) {
    const stepBytes = c.random ? scatterStepBytes(VIRTUAL_SIZE_BYTES, c.requestBytes) : c.requestBytes;
    const rates: number[] = [];
    for (let i = 0; i < PEER_RUNS; i++) {
      const seconds = await qemuImgBenchSeconds(path, { format: "qcow2", requestCount: c.peerRequestCount, requestBytes: c.requestBytes, stepBytes, inFlight: 1 });
      rates.push(caseRate(c, c.peerRequestCount, seconds));
    }
    figures.qemuWarm.push(median(rates));
  }
  return figures;
}

function ratioOrNull(numerator: number | null | undefined, denominator: number | null | undefined): number | null {
  return numerator === null || numerator === undefined || denominator === null || denominator === undefined || denominator === 0 ? null : numerator / denominator;
}

export default async function chainBench(): Promise<BenchRow[]> {
  return withScratchDir("chain", async (dir) => {
    const fixture = await buildChain(dir, CHAIN_DEPTH, VIRTUAL_SIZE_BYTES);
    const flatPath = join(dir, "flat.qcow2");
    await flattenWithQemu(fixture.topPath, flatPath);
    const chain = await measureImage(fixture.topPath);
    const flat = await measureImage(flatPath);
    if (chain.firstPass !== null && flat.firstPass !== null) {
      try {
        await measureWarm(fixture.topPath, chain, flatPath, flat, fixture);
      } catch (error) {
        for (const figures of [chain, flat]) {
          figures.warm = null;
          figures.note = describeFailure(error);
        }
      }
    }
    const peerNote = "peer = qemu-img bench (-i threads, open excluded)";
    const rows: BenchRow[] = [];

    const cpuNote = (t: ReadTiming | null): string => (t === null ? "" : `; CPU ${t.cpuSeconds.toFixed(3)} s`);
    for (const [label, figures] of [[`chain of ${CHAIN_DEPTH}`, chain], ["flattened", flat]] as const) {
      rows.push(
        row(
          `first pass after open, 1 MiB reads, ${label}`,
          figures.firstPass?.seconds ?? null,
          figures.qemuFirstPassSeconds,
          "s",
          `${peerNote}; open ${figures.openMs.toFixed(0)} ms (not timed)${cpuNote(figures.firstPass)}; ${figures.note}`,
        ),
      );
    }
    rows.push(
      row(
        `first pass: chain-${CHAIN_DEPTH} slowdown vs flat`,
        ratioOrNull(chain.firstPass?.seconds, flat.firstPass?.seconds),
        chain.qemuFirstPassSeconds / flat.qemuFirstPassSeconds,
        "x",
        `chain time / flat time (lower is better); CPU-time slowdown ${ratioOrNull(chain.firstPass?.cpuSeconds, flat.firstPass?.cpuSeconds)?.toFixed(2) ?? "-"}x`,
      ),
    );

    WARM_CASES.forEach((c, index) => {
      const unit = c.random ? "ops/s" : "GB/s";
      const chainWarm = chain.warm?.[index] ?? null;
      const flatWarm = flat.warm?.[index] ?? null;
      const cpu = (w: { cpuMicrosPerRequest: number } | null): string => (w === null ? "" : `; CPU ${w.cpuMicrosPerRequest.toFixed(2)} us/request`);
      rows.push(row(`${c.name}, chain of ${CHAIN_DEPTH}`, chainWarm?.rate ?? null, chain.qemuWarm[index], unit, `${peerNote}; median of ${RUNS} alternating with the flat image (peer: ${PEER_RUNS})${cpu(chainWarm)}; ${chain.note}`));
      rows.push(row(`${c.name}, flattened`, flatWarm?.rate ?? null, flat.qemuWarm[index], unit, `${peerNote}; median of ${RUNS} alternating with the chain (peer: ${PEER_RUNS})${cpu(flatWarm)}; ${flat.note}`));
      // Slowdown = chain time / flat time = flat rate / chain rate.
      const cpuSlowdown = ratioOrNull(chainWarm?.cpuMicrosPerRequest, flatWarm?.cpuMicrosPerRequest);
      rows.push(
        row(
          `${c.name}: chain-${CHAIN_DEPTH} slowdown vs flat`,
          ratioOrNull(flatWarm?.rate, chainWarm?.rate),
          flat.qemuWarm[index] / chain.qemuWarm[index],
          "x",
          `chain time / flat time (lower is better); target <= 1.2 for snapstack; CPU-time slowdown ${cpuSlowdown?.toFixed(2) ?? "-"}x`,
        ),
      );
    });
    return rows;
  });
}

if (import.meta.main) printRows(import.meta.filename, await chainBench());
