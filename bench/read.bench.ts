/**
 * In-process reads through the library on page-cached data.
 *
 * Fixture: a 1 GiB qcow2 image written completely by qemu-io (64 KiB
 * clusters), read once before measuring so the page cache holds it.
 * Workloads: random 4 KiB reads (target >= 100,000/s) and sequential 1 MiB
 * reads (target >= 1 GB/s), with 1 and with several requests in flight.
 *
 * Peer: `qemu-img bench` on the same file, same request size and depth. It
 * has no random mode, so the random case uses a scattering step (-S, see
 * scatterStepBytes); its own timer excludes open/close, like ours. The peer
 * column is qemu-img's default AIO (threads); the io_uring figure and the
 * floor (fs.readSync of the same offsets straight from the file, no qcow2)
 * are in the notes. Ratio = snapstack / qemu-img (higher is better here).
 *
 * Each snapstack case gets an untimed warm-up pass (JIT), then RUNS timed
 * passes alternating with the floor so both see the same contention;
 * reported: the median, and CPU time per request in the notes (on a shared
 * machine wall time includes time spent descheduled).
 */
import { openSync, closeSync, readSync } from "node:fs";
import { join } from "node:path";
import { buildFilledImage, GiB, KiB, MiB, patternByteFor, withScratchDir } from "./fixtures/images.ts";
import { printRows, row, type BenchRow } from "./fixtures/rows.ts";
import { describeFailure, openSnapstackImage } from "./fixtures/snapstack.ts";
import { median, qemuImgBenchSeconds } from "./fixtures/tools.ts";
import { caseOffsets, caseRate, randomOffsets, scatterStepBytes, timeReads, type ReadAt, type ReadCase, type ReadTiming } from "./fixtures/workload.ts";

const IMAGE_BYTES = 1 * GiB;
/** The fixture writes its data in pieces of this size, each with its own byte. */
const PIECE_BYTES = 256 * MiB;
const RUNS = 5;
const PEER_RUNS = 3;
const VERIFY_READS = 1000;

const CASES: ReadCase[] = [
  { name: "random 4 KiB reads, 1 in flight", requestBytes: 4 * KiB, requestCount: 100_000, inFlight: 1, random: true },
  { name: "random 4 KiB reads, 32 in flight", requestBytes: 4 * KiB, requestCount: 100_000, inFlight: 32, random: true },
  { name: "sequential 1 MiB reads, 1 in flight", requestBytes: 1 * MiB, requestCount: 2048, inFlight: 1, random: false },
  { name: "sequential 1 MiB reads, 8 in flight", requestBytes: 1 * MiB, requestCount: 2048, inFlight: 8, random: false },
];

interface Measured {
  rate: number;
  cpuMicrosPerRequest: number;
}

/** Median rate and CPU per request of RUNS timed passes of each reader, alternating, after a warm-up pass each. */
async function measureAlternating(c: ReadCase, readers: readonly ReadAt[], offsets: Float64Array): Promise<Measured[]> {
  const timings: ReadTiming[][] = readers.map(() => []);
  for (const read of readers) await timeReads(read, offsets, c.requestBytes, c.inFlight);
  for (let i = 0; i < RUNS; i++) {
    for (const [index, read] of readers.entries()) timings[index].push(await timeReads(read, offsets, c.requestBytes, c.inFlight));
  }
  return timings.map((list) => ({
    rate: median(list.map((t) => caseRate(c, c.requestCount, t.seconds))),
    cpuMicrosPerRequest: median(list.map((t) => (t.cpuSeconds * 1e6) / c.requestCount)),
  }));
}

async function peerRate(path: string, c: ReadCase, aio: "threads" | "io_uring"): Promise<number> {
  const stepBytes = c.random ? scatterStepBytes(IMAGE_BYTES, c.requestBytes) : c.requestBytes;
  const rates: number[] = [];
  for (let i = 0; i < PEER_RUNS; i++) {
    const seconds = await qemuImgBenchSeconds(path, { format: "qcow2", requestCount: c.requestCount, requestBytes: c.requestBytes, stepBytes, inFlight: c.inFlight, aio });
    rates.push(caseRate(c, c.requestCount, seconds));
  }
  return median(rates);
}

/** Reads VERIFY_READS random 4 KiB blocks and checks every byte against the fixture's pattern. */
async function verify(read: ReadAt): Promise<string> {
  const offsets = randomOffsets(VERIFY_READS, IMAGE_BYTES, 4 * KiB, 7);
  const buffer = new Uint8Array(4 * KiB);
  for (const guestOffset of offsets) {
    await read(guestOffset, buffer);
    const expected = patternByteFor(Math.floor(guestOffset / PIECE_BYTES));
    if (buffer.some((byte) => byte !== expected)) return `WRONG DATA at guest offset ${guestOffset}`;
  }
  return `data verified (${VERIFY_READS} reads)`;
}

function warmPageCache(path: string): void {
  const fd = openSync(path, "r");
  const chunk = new Uint8Array(4 * MiB);
  for (let position = 0; readSync(fd, chunk, 0, chunk.length, position) > 0; position += chunk.length);
  closeSync(fd);
}

export default async function readBench(): Promise<BenchRow[]> {
  return withScratchDir("read", async (dir) => {
    const path = join(dir, "filled.qcow2");
    await buildFilledImage(path, IMAGE_BYTES);
    warmPageCache(path);

    const fd = openSync(path, "r");
    const preadFloor: ReadAt = async (offset, buffer) => readSync(fd, buffer, 0, buffer.length, offset);

    let device: Awaited<ReturnType<typeof openSnapstackImage>> | null = null;
    let failure = "";
    let verified = "";
    try {
      device = await openSnapstackImage(path);
      const opened = device;
      verified = await verify((offset, buffer) => opened.read(offset, buffer));
    } catch (error) {
      failure = describeFailure(error);
    }

    const rows: BenchRow[] = [];
    for (const c of CASES) {
      const offsets = caseOffsets(c, IMAGE_BYTES);
      const unit = c.random ? "ops/s" : "GB/s";
      const target = c.random ? "target >= 100,000 ops/s" : "target >= 1 GB/s";
      let snap: Measured | null = null;
      let floor: Measured;
      let caseFailure = failure;
      if (device !== null && caseFailure === "") {
        const opened = device;
        try {
          [snap, floor] = await measureAlternating(c, [(offset, buffer) => opened.read(offset, buffer), preadFloor], offsets);
        } catch (error) {
          caseFailure = describeFailure(error);
          [floor] = await measureAlternating(c, [preadFloor], offsets);
        }
      } else {
        [floor] = await measureAlternating(c, [preadFloor], offsets);
      }
      const peerThreads = await peerRate(path, c, "threads");
      const peerUring = await peerRate(path, c, "io_uring");
      const fmt = (value: number): string => (c.random ? Math.round(value).toLocaleString("en-US") : value.toFixed(2));
      const cpu = (m: Measured): string => `CPU ${m.cpuMicrosPerRequest.toFixed(2)} us/request`;
      const notes = [
        target,
        `peer = qemu-img bench -i threads; -i io_uring: ${fmt(peerUring)}`,
        `fs.readSync floor (no qcow2): ${fmt(floor.rate)}, ${cpu(floor)}`,
        `median of ${RUNS}${snap === null ? "" : `, ${cpu(snap)}`}`,
        caseFailure !== "" ? caseFailure : verified,
      ];
      rows.push(row(c.name, snap?.rate ?? null, peerThreads, unit, notes.join("; ")));
    }
    await device?.close();
    closeSync(fd);
    return rows;
  });
}

if (import.meta.main) printRows(import.meta.filename, await readBench());
