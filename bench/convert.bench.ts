/**
 * `snapstack img convert` vs `qemu-img convert`, whole command, wall clock.
 *
 * Fixture: a qcow2 image with 1 GiB of data spread over a 4 GiB virtual disk
 * (1 MiB every 4 MiB, written by qemu-io), converted to qcow2 and to raw.
 * Each configuration runs RUNS times, alternating the two tools so drift in
 * the host's writeback hits both alike; the output is deleted and `sync` run
 * (untimed) before every run; the page cache holds the source (it was just
 * written). Reported: median seconds, ratio snapstack / qemu-img (target
 * <= 1.0). After the timed runs the last snapstack output is checked with
 * `qemu-img compare`, so a fast but wrong conversion cannot pass unnoticed.
 */
import { rmSync } from "node:fs";
import { join } from "node:path";
import { buildSpreadImage, GiB, MiB, withScratchDir } from "./fixtures/images.ts";
import { printRows, row, SNAPSTACK_BIN, snapstackCliPresent, type BenchRow } from "./fixtures/rows.ts";
import { median, runTool, timeCommandSeconds } from "./fixtures/tools.ts";

const RUNS = 5;
const VIRTUAL_SIZE_BYTES = 4 * GiB;
const CHUNK_BYTES = 1 * MiB;
const STRIDE_BYTES = 4 * MiB;

async function settle(outputPath: string): Promise<void> {
  rmSync(outputPath, { force: true });
  await runTool("sync", []);
}

async function convertCase(dir: string, sourcePath: string, outputFormat: "qcow2" | "raw"): Promise<BenchRow> {
  const name = `convert qcow2->${outputFormat} (1 GiB data / 4 GiB)`;
  const outputPath = join(dir, `out.${outputFormat}`);
  const convertArgs = ["convert", "-f", "qcow2", "-O", outputFormat, sourcePath, outputPath];
  const withCli = snapstackCliPresent();
  const qemuSeconds: number[] = [];
  const snapSeconds: number[] = [];
  let snapError = "";
  for (let run = 0; run < RUNS; run++) {
    await settle(outputPath);
    qemuSeconds.push(await timeCommandSeconds("qemu-img", convertArgs));
    if (withCli && snapError === "") {
      await settle(outputPath);
      try {
        snapSeconds.push(await timeCommandSeconds(process.execPath, [SNAPSTACK_BIN, "img", ...convertArgs]));
      } catch (error) {
        snapError = (error as Error).message.split("\n")[0].slice(0, 200);
      }
    }
  }
  const notes = [`median of ${RUNS}`, `qemu-img runs ${qemuSeconds.map((s) => s.toFixed(2)).join("/")}`];
  let snapMedian: number | null = null;
  if (!withCli) notes.push("snapstack CLI missing");
  else if (snapError !== "") notes.push(`snapstack failed: ${snapError}`);
  else {
    snapMedian = median(snapSeconds);
    notes.push(`snapstack runs ${snapSeconds.map((s) => s.toFixed(2)).join("/")}`);
    // The last snapstack output is still there: check it holds the same data.
    const compared = await timeCommandSeconds("qemu-img", ["compare", "-q", "-f", "qcow2", "-F", outputFormat, sourcePath, outputPath]).then(
      () => "output identical (qemu-img compare)",
      () => "OUTPUT DIFFERS from source (qemu-img compare)",
    );
    notes.push(compared);
  }
  rmSync(outputPath, { force: true });
  notes.push("target ratio <= 1.0");
  return row(name, snapMedian, median(qemuSeconds), "s", notes.join("; "));
}

export default async function convertBench(): Promise<BenchRow[]> {
  return withScratchDir("convert", async (dir) => {
    const sourcePath = join(dir, "source.qcow2");
    await buildSpreadImage(sourcePath, VIRTUAL_SIZE_BYTES, CHUNK_BYTES, STRIDE_BYTES);
    return [await convertCase(dir, sourcePath, "qcow2"), await convertCase(dir, sourcePath, "raw")];
  });
}

if (import.meta.main) printRows(import.meta.filename, await convertBench());
