/**
 * `snapstack img diff [-f fmt] [-F fmt] [--output=human|json] [--export delta] [-p] [-q] FROM TO`
 *
 * The byte ranges in which two disk states differ. FROM and TO are images
 * (usually of one chain) or internal snapshots `FILE@SNAPSHOT`. JSON: one
 * array of qemu-img map entries (start, length, depth, present, zero,
 * data, offset) describing TO in each differing range. Human: the ranges
 * in hex, then a summary line. `--export` writes a qcow2 overlay of FROM
 * holding the differing clusters with TO's content.
 */
import { SnapstackError } from "../../base/errors.ts";
import { NOT_QEMU, optionFlag, optionString, parseArgs } from "../args.ts";
import { createProgress, expectPositionals, parseOutputFormat } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { formatMapJson } from "../../chain/map-image.ts";
import { diffImages, exportDelta, openDiskState, type DiffResult, type DiskState } from "../../chain/jobs/index.ts";

function hex(value: number): string {
  return value === 0 ? "0" : `0x${value.toString(16)}`;
}

export function formatDiffHuman(result: DiffResult): string {
  let out = `${"Offset".padEnd(16)}${"Length".padEnd(16)}Content\n`;
  for (const range of result.ranges) {
    out += `${hex(range.start).padEnd(16)}${hex(range.length).padEnd(16)}${range.zero ? "zero" : "data"}\n`;
  }
  const { stats } = result;
  out += `${stats.ranges} range${stats.ranges === 1 ? "" : "s"}, ${stats.differingBytes} bytes differ; ${stats.comparedBytes} bytes compared by data, ${stats.metadataEqualBytes} bytes equal by metadata\n`;
  if (result.fromSizeBytes !== result.toSizeBytes) out += `Virtual size: ${result.fromSizeBytes} -> ${result.toSizeBytes} bytes\n`;
  return out;
}

export const diffCommand: CliCommand = {
  name: "diff",
  synopsis: "diff [-f fmt] [-F fmt] [--output=ofmt] [--export delta] [-p] [-q] from to",
  summary: "List the byte ranges where two disk states (images or FILE@SNAPSHOT) differ; optionally export them as an overlay of FROM.",
  optionHelp: [
    "  -f fmt          format of FROM",
    "  -F fmt          format of TO",
    "  --output=ofmt   human (default) or json (qemu-img map entries describing TO)",
    "  --export delta  write a qcow2 overlay backed by FROM that holds exactly the differing clusters",
    "  -p              show progress (on stderr, so the listing stays clean)",
    "  -q              quiet: no listing (with --export)",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "fromFormat", short: "f", value: true },
      { name: "toFormat", short: "F", value: true },
      { name: "output", long: "output", value: true },
      { name: "export", long: "export", value: true },
      { name: "progress", short: "p" },
      { name: "quiet", short: "q" },
    ], NOT_QEMU);
    const output = parseOutputFormat(optionString(parsed, "output"));
    expectPositionals(parsed.positionals, 2, 2, "Expecting two disk states (FROM and TO)");
    const quiet = optionFlag(parsed, "quiet");
    const progress = createProgress({ ...context, out: context.err }, optionFlag(parsed, "progress") && !quiet);
    const deltaPath = optionString(parsed, "export");
    const states: DiskState[] = [];
    try {
      const from = await openDiskState(parsed.positionals[0], { format: optionString(parsed, "fromFormat") });
      states.push(from);
      const to = await openDiskState(parsed.positionals[1], { format: optionString(parsed, "toFormat") });
      states.push(to);
      if (deltaPath !== undefined && from.snapshot !== null) {
        throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${from.spec}: an internal snapshot cannot be the backing file of the exported delta`);
      }
      const result = await diffImages(from.device, to.device, { onProgress: (job) => progress.update(job.fraction) });
      if (deltaPath !== undefined) {
        await exportDelta(from.path, to.device, result.ranges, deltaPath, { from: from.device, onProgress: (job) => progress.update(job.fraction) });
      }
      progress.update(1);
      progress.end();
      if (!quiet) context.out(output === "json" ? formatMapJson(result.ranges) : formatDiffHuman(result));
      return 0;
    } finally {
      for (const state of states) await state.close();
    }
  },
};
