/**
 * `snapstack img bench` against `qemu-img bench` 7.2: the same command line
 * on the same image, each tool's own timer (open and close excluded), so the
 * engines' request paths compare through the same workload generator.
 *
 * Fixture: a 256 MiB qcow2 image filled by qemu-io (page cached after the
 * first run). Workloads: 4 KiB reads, 64 in flight (qemu-img bench's
 * defaults), sequential and scattered (a 1 MiB + 4 KiB step); 64 KiB writes
 * over allocated clusters, 16 in flight. The peer runs with its default AIO
 * (threads), snapstack with its default I/O. RUNS runs per workload,
 * alternating which tool goes first; the median is reported.
 * Ratio = snapstack / qemu-img seconds (lower is better).
 */
import { join } from "node:path";
import { buildCompiledCli } from "./fixtures/compiled-build.ts";
import { buildFilledImage, KiB, MiB, withScratchDir } from "./fixtures/images.ts";
import { printRows, row, type BenchRow } from "./fixtures/rows.ts";
import { imgBenchSeconds, median, runOrder, type QemuImgBenchOptions } from "./fixtures/tools.ts";

const RUNS = 5;
const IMAGE_BYTES = 256 * MiB;

const WORKLOADS: Array<{ name: string; options: QemuImgBenchOptions & { write?: number } }> = [
  { name: "4 KiB reads, sequential, 64 in flight", options: { format: "qcow2", requestCount: 200_000, requestBytes: 4 * KiB, inFlight: 64 } },
  { name: "4 KiB reads, scattered (1 MiB + 4 KiB step), 64 in flight", options: { format: "qcow2", requestCount: 200_000, requestBytes: 4 * KiB, stepBytes: MiB + 4 * KiB, inFlight: 64 } },
  { name: "64 KiB writes over allocated clusters, 16 in flight", options: { format: "qcow2", requestCount: 20_000, requestBytes: 64 * KiB, inFlight: 16, write: 0x5a } },
];

export default async function imgBenchBench(): Promise<BenchRow[]> {
  return withScratchDir("img-bench", async (dir) => {
    const path = join(dir, "filled.qcow2");
    await buildFilledImage(path, IMAGE_BYTES);
    const cli = await buildCompiledCli(dir);
    const tools = [
      { name: "snapstack", command: cli.command, prefix: [...cli.prefix, "img"] },
      { name: "qemu-img", command: "qemu-img", prefix: [] as string[] },
    ];
    const rows: BenchRow[] = [];
    for (const workload of WORKLOADS) {
      const seconds = new Map(tools.map((tool) => [tool.name, [] as number[]]));
      if (cli.unavailable !== null) {
        rows.push(row(`img bench: ${workload.name}`, null, null, "s", cli.unavailable));
        continue;
      }
      for (let run = 0; run < RUNS; run++) {
        for (const tool of runOrder(run, tools)) seconds.get(tool.name)!.push(await imgBenchSeconds(tool.command, tool.prefix, path, workload.options));
      }
      const [ours, theirs] = tools.map((tool) => median(seconds.get(tool.name)!));
      const runs = tools.map((tool) => `${tool.name} ${seconds.get(tool.name)!.map((value) => value.toFixed(3)).join("/")}`).join(", ");
      const notes = `${workload.options.requestCount} requests, each tool's own timer, median of ${RUNS} alternating; ${runs}; lower is better`;
      rows.push(row(`img bench vs qemu-img bench: ${workload.name}`, ours, theirs, "s", notes));
    }
    return rows;
  });
}

if (import.meta.main) printRows(import.meta.filename, await imgBenchBench());
