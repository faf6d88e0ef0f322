/**
 * `snapstack img stream [-f fmt] [--base base] [-p] [-q] filename`
 *
 * QEMU's block-stream, offline: pull the data of the backing chain above
 * BASE into the overlay, then make BASE its backing file (no BASE: the
 * whole chain, and the backing file is removed). Prints nothing on
 * success, like rebase.
 */
import { NOT_QEMU, optionFlag, optionString, parseArgs } from "../args.ts";
import { createProgress, expectPositionals } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { streamImage } from "../../chain/jobs/index.ts";

export const streamCommand: CliCommand = {
  name: "stream",
  synopsis: "stream [-f fmt] [--base base] [-p] [-q] filename",
  summary: "Copy the backing chain's data (down to BASE) into the overlay and make BASE its backing file.",
  optionHelp: [
    "  --base base  keep this image (in the overlay's chain) as the backing file; default: none (flatten)",
    "  -f fmt       format of the overlay",
    "  -p           show progress",
    "  -q           quiet",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "format", short: "f", value: true },
      { name: "base", short: "b", long: "base", value: true },
      { name: "progress", short: "p" },
      { name: "quiet", short: "q" },
    ], NOT_QEMU);
    expectPositionals(parsed.positionals, 1, 1, "Expecting one image file name");
    const quiet = optionFlag(parsed, "quiet");
    const progress = createProgress(context, optionFlag(parsed, "progress") && !quiet);
    try {
      await streamImage(parsed.positionals[0], {
        format: optionString(parsed, "format"),
        base: optionString(parsed, "base"),
        onProgress: (job) => progress.update(job.fraction),
      });
      progress.update(1);
    } finally {
      progress.end();
    }
    return 0;
  },
};
