/**
 * `snapstack img amend [-f fmt] [-q] [-p] [--force] -o options FILE`
 *
 * qemu-img 7.2's amend for qcow2 images: compat (upgrade to 1.1, or
 * downgrade to 0.10), lazy_refcounts, refcount_bits, size; what is not
 * amendable is refused before anything is written (chain/amend-image.ts). `-o help` lists the options qemu-img lists.
 */
import { SnapstackError } from "../../base/errors.ts";
import { optionFlag, optionString, parseArgs } from "../args.ts";
import { createProgress, expectPositionals } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { checkAmendOptions, formatAmendHelp, isHelpRequest, parseOptionList } from "../create-options.ts";
import { amendImage, refuseUnamendableFormat } from "../engine.ts";

export const amendCommand: CliCommand = {
  name: "amend",
  synopsis: "amend [-f fmt] [-q] [-p] [--force] -o options filename",
  summary: "Change qcow2 image options: compat, lazy_refcounts, refcount_bits, size.",
  optionHelp: [
    "  -f fmt        image format (qcow2); detected when omitted",
    "  -o options    what to change: compat (1.1 or 0.10), lazy_refcounts, refcount_bits, size",
    "  -p, -q        progress (nothing to show) / quiet",
    "  --force       accepted, as in qemu-img",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "format", short: "f", value: true },
      { name: "options", short: "o", value: true, repeat: "comma" },
      { name: "quiet", short: "q" },
      { name: "progress", short: "p" },
      { name: "force", long: "force" },
      { name: "cache", short: "t", value: true },
    ]);
    const optionText = optionString(parsed, "options");
    if (optionText === undefined) throw new SnapstackError("E_USAGE", "Must specify options (-o)");
    // -p, as qemu-img: once the options are there, every ending prints a newline; 0% once the image
    // is open and amendable, 100% when the amend ends, failed or not (no steps in between).
    const showProgress = optionFlag(parsed, "progress") && !optionFlag(parsed, "quiet");
    let progress: ReturnType<typeof createProgress> | null = null;
    try {
      const entries = parseOptionList(optionText);
      if (isHelpRequest(entries)) {
        // As qemu-img: with -f, that format's options; without, the image's (which must be named).
        const format = optionString(parsed, "format");
        if (format === undefined) expectPositionals(parsed.positionals, 1, 1, "Expecting one image file name");
        await refuseUnamendableFormat(parsed.positionals[0] ?? "", format);
        context.out(formatAmendHelp());
        return 0;
      }
      expectPositionals(parsed.positionals, 1, 1, "Expecting one image file name");
      // Typed with qcow2's tables (the only format with amendable options); amendImage refuses the others.
      const checked = checkAmendOptions(entries);
      await amendImage(parsed.positionals[0], checked.typed, {
        format: optionString(parsed, "format"),
        onStart: () => (progress = createProgress(context, showProgress)),
      });
    } finally {
      const started = progress as ReturnType<typeof createProgress> | null;
      if (started !== null) {
        started.update(1);
        started.end();
      } else if (showProgress) context.out("\n");
    }
    return 0;
  },
};
