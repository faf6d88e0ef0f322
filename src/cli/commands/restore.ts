/**
 * `snapstack img restore [-f src_fmt] [-F target_fmt] [--from known] [-p] [-q] SOURCE TARGET`
 *
 * Make TARGET (raw file, block device or qcow2 image) hold SOURCE's
 * content, writing only what differs: between KNOWN (the state TARGET
 * holds now) and SOURCE when --from is given, else between TARGET's data
 * and SOURCE's. Reports the bytes written.
 */
import { NOT_QEMU, optionFlag, optionString, parseArgs } from "../args.ts";
import { createProgress, expectPositionals } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { restoreImage } from "../../chain/jobs/index.ts";

export const restoreCommand: CliCommand = {
  name: "restore",
  synopsis: "restore [-f src_fmt] [-F target_fmt] [--from known] [-p] [-q] source target",
  summary: "Rewrite TARGET to hold SOURCE's content, writing only the ranges that differ.",
  optionHelp: [
    "  --from known  the state TARGET holds now (image or FILE@SNAPSHOT): only KNOWN->SOURCE changes are written, TARGET is not read",
    "  -f src_fmt    format of SOURCE",
    "  -F target_fmt format of TARGET",
    "  -p            show progress",
    "  -q            quiet",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "sourceFormat", short: "f", value: true },
      { name: "targetFormat", short: "F", value: true },
      { name: "from", long: "from", value: true },
      { name: "progress", short: "p" },
      { name: "quiet", short: "q" },
    ], NOT_QEMU);
    expectPositionals(parsed.positionals, 2, 2, "Expecting source and target");
    const quiet = optionFlag(parsed, "quiet");
    const progress = createProgress(context, optionFlag(parsed, "progress") && !quiet);
    let result;
    try {
      result = await restoreImage(parsed.positionals[0], parsed.positionals[1], {
        from: optionString(parsed, "from"),
        sourceFormat: optionString(parsed, "sourceFormat"),
        targetFormat: optionString(parsed, "targetFormat"),
        onProgress: (job) => progress.update(job.fraction),
      });
      progress.update(1);
    } finally {
      progress.end();
    }
    if (!quiet) context.out(`Restored: wrote ${result.writtenBytes} bytes in ${result.ranges} range${result.ranges === 1 ? "" : "s"}.\n`);
    return 0;
  },
};
