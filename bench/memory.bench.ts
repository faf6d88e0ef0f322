/**
 * Peak memory of reading a huge sparse image.
 *
 * Fixture (bench/fixtures/sparse-image.ts): a 1 TiB qcow2 image with 4 KiB
 * written in every GiB by qemu-io. Workload: 10,000 random 4 KiB reads over
 * the whole 1 TiB, then one read of each of the 1,024 written blocks
 * (checked against the written byte).
 *
 * snapstack runs in a child process (bench/fixtures/memory-child.ts) so the
 * harness's memory does not count; reported: its VmHWM (kernel's peak RSS),
 * with the peak of process.memoryUsage.rss() sampled after every read and
 * the VmHWM of the same child that imports the engine but opens nothing
 * (the floor: node itself and the loaded code) in the notes. Target
 * < 100 MiB. Two rows: run from the TypeScript sources (Node's type
 * stripping keeps its WebAssembly transpiler resident, ~40 MiB more: a
 * developer's configuration) and from the child bundled into one
 * JavaScript file with esbuild, as scripts/build-cli.ts bundles the CLI
 * (what users of the package and of a checkout after `npm install` run).
 * Peer: qemu-io doing the same reads (commands on stdin), peak RSS from GNU
 * time.
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { bundleEntry } from "./fixtures/compiled-build.ts";
import { MiB, withScratchDir } from "./fixtures/images.ts";
import type { MemoryChildReport } from "./fixtures/memory-child.ts";
import { printRows, row, type BenchRow } from "./fixtures/rows.ts";
import { buildSparseImage, SPARSE_REQUEST_BYTES, sparseRandomOffsets } from "./fixtures/sparse-image.ts";
import { runMeasured } from "./fixtures/tools.ts";

const CHILD_PATH = fileURLToPath(new URL("./fixtures/memory-child.ts", import.meta.url));

async function runChild(childPath: string, argument: string): Promise<MemoryChildReport> {
  const { stdout } = await runMeasured(process.execPath, [childPath, argument]);
  const lines = stdout.trim().split("\n");
  return JSON.parse(lines[lines.length - 1]) as MemoryChildReport;
}

/** qemu-io doing the same reads; returns its peak RSS and whether every pattern check passed. */
async function qemuIoPeak(path: string, writes: Awaited<ReturnType<typeof buildSparseImage>>): Promise<{ peakRssBytes: number; ok: boolean }> {
  const commands: string[] = [];
  for (const guestOffset of sparseRandomOffsets()) commands.push(`read -q ${guestOffset} ${SPARSE_REQUEST_BYTES}`);
  for (const w of writes) commands.push(`read -q -P ${w.patternByte} ${w.guestOffset} ${w.lengthBytes}`);
  const { peakRssBytes, stdout } = await runMeasured("qemu-io", ["-r", "-f", "qcow2", path], `${commands.join("\n")}\n`);
  return { peakRssBytes, ok: !stdout.includes("verification failed") };
}

const mib = (bytes: number): number => bytes / MiB;

interface Variant {
  label: string;
  childPath: string;
}

async function measureVariant(variant: Variant, path: string, peer: { peakRssBytes: number; ok: boolean }): Promise<BenchRow> {
  const name = `peak RSS: 1 TiB sparse image, 11,024 scattered 4 KiB reads (${variant.label})`;
  const peerNote = `peer = qemu-io (GNU time maxrss)${peer.ok ? "" : ", qemu-io PATTERN CHECK FAILED"}`;
  let snap: MemoryChildReport;
  let floor: MemoryChildReport;
  try {
    floor = await runChild(variant.childPath, "--baseline");
    snap = await runChild(variant.childPath, path);
  } catch (error) {
    const message = (error as Error).message.split("\n").find((line) => line.includes("Error")) ?? (error as Error).message;
    return row(name, null, mib(peer.peakRssBytes), "MiB", `target < 100 MiB; ${peerNote}; snapstack failed: ${message.slice(0, 200)}`);
  }
  const notes = [
    "target < 100 MiB (VmHWM of the child)",
    `floor (same child, engine loaded, no image) ${mib(floor.vmHwmBytes).toFixed(1)} MiB`,
    `max sampled rss ${mib(snap.rssMaxBytes).toFixed(1)} MiB`,
    `${snap.reads} reads in ${snap.seconds.toFixed(2)} s`,
    snap.wrongReads === 0 ? "data verified" : `${snap.wrongReads} WRONG READS`,
    peerNote,
  ];
  return row(name, mib(snap.vmHwmBytes), mib(peer.peakRssBytes), "MiB", notes.join("; "));
}

export default async function memoryBench(): Promise<BenchRow[]> {
  return withScratchDir("memory", async (dir) => {
    const path = join(dir, "sparse-1t.qcow2");
    const writes = await buildSparseImage(path);
    const peer = await qemuIoPeak(path, writes);
    const rows = [await measureVariant({ label: "TypeScript sources", childPath: CHILD_PATH }, path, peer)];
    const bundled = await bundleEntry(CHILD_PATH, join(dir, "js"), "memory-child");
    if (typeof bundled === "string") rows.push(await measureVariant({ label: "compiled JavaScript", childPath: bundled }, path, peer));
    else rows.push(row("peak RSS (compiled JavaScript)", null, mib(peer.peakRssBytes), "MiB", bundled.message.slice(0, 200)));
    return rows;
  });
}

if (import.meta.main) printRows(import.meta.filename, await memoryBench());
