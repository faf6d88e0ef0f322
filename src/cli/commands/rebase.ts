/**
 * `snapstack img rebase [-f fmt] [-t cache] [-T src_cache] [-p] [-q] [-u] -b backing_file [-F backing_fmt] filename`
 *
 * qemu-img 7.2's rebase: safe mode copies into the overlay whatever reads
 * differently through the new backing file, then switches the header; -u
 * switches the header only. `-b ""` removes the backing file. Prints
 * nothing on success, as qemu-img.
 */
import { SnapstackError } from "../../base/errors.ts";
import { optionFlag, optionString, parseArgs } from "../args.ts";
import { checkCacheOptions, createProgress, expectPositionals } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { rebaseImage } from "../../chain/jobs/index.ts";

export const rebaseCommand: CliCommand = {
  name: "rebase",
  synopsis: "rebase [-f fmt] [-t cache] [-T src_cache] [-p] [-q] [-u] [-U] -b backing_file [-F backing_fmt] filename",
  summary: "Change the backing file of an overlay; safe mode keeps the guest-visible content.",
  optionHelp: [
    "  -b backing_file  the new backing file, stored as given and opened relative to the overlay (\"\" removes it)",
    "  -F backing_fmt   format of the new backing file (required with a non-empty -b)",
    "  -u               unsafe: rewrite the header only (the old backing file is not opened)",
    "  -f fmt           format of the overlay",
    "  -p               show progress",
    "  -q               quiet",
    "  -t, -T cache     accepted for compatibility",
    "  -U               open the backing files even while another process writes them (read-only)",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "format", short: "f", value: true },
      { name: "cache", short: "t", value: true },
      { name: "sourceCache", short: "T", value: true },
      { name: "backing", short: "b", value: true },
      { name: "backingFormat", short: "F", value: true },
      { name: "unsafe", short: "u" },
      { name: "progress", short: "p" },
      { name: "quiet", short: "q" },
      { name: "compress", short: "c" },
      { name: "forceShare", short: "U", long: "force-share" },
    ]);
    checkCacheOptions(parsed);
    expectPositionals(parsed.positionals, 1, 1, "Expecting one image file name");
    const unsafe = optionFlag(parsed, "unsafe");
    const backingFile = optionString(parsed, "backing");
    if (!unsafe && backingFile === undefined) throw new SnapstackError("E_USAGE", "Must specify backing file (-b) or use unsafe mode (-u)");
    if (optionFlag(parsed, "compress")) throw new SnapstackError("E_UNSUPPORTED_FEATURE", "rebase -c (compressed copy) is not supported");
    const quiet = optionFlag(parsed, "quiet");
    const progress = createProgress(context, optionFlag(parsed, "progress") && !quiet);
    try {
      await rebaseImage(parsed.positionals[0], {
        format: optionString(parsed, "format"),
        backingFile: backingFile ?? "",
        backingFormat: optionString(parsed, "backingFormat"),
        unsafe,
        forceShare: optionFlag(parsed, "forceShare"),
        onProgress: (job) => progress.update(job.fraction),
      });
      progress.update(1);
    } finally {
      progress.end();
    }
    return 0;
  },
};
