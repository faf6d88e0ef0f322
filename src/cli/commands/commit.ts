/**
 * `snapstack img commit [-f fmt] [-t cache] [-b base] [-d] [-p] [-q] [--wipe] [--search DIR] filename`
 *
 * qemu-img 7.2's commit, offline: merge the overlay's data (and that of
 * every image down to BASE) into BASE; without -d (and -b) the overlay is
 * emptied afterwards. "Image committed." as qemu-img; warnings on stderr
 * name images whose content the commit changed under them (qemu-img
 * has no such warning: it does not look).
 */
import { optionFlag, optionList, optionString, parseArgs } from "../args.ts";
import { checkCacheOptions, createProgress, expectPositionals, parseRateLimit } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { commitImage } from "../../chain/jobs/index.ts";

export const commitCommand: CliCommand = {
  name: "commit",
  synopsis: "commit [-f fmt] [-t cache] [-b base] [-r rate] [-d] [-p] [-q] [--wipe] [--search dir] filename",
  summary: "Copy the overlay's data into its backing file (or into BASE further down) and empty the overlay.",
  optionHelp: [
    "  -f fmt        format of the overlay; detected when omitted",
    "  -b base       commit into this image of the backing chain (implies -d)",
    "  -d            do not empty the overlay afterwards",
    "  --wipe        overwrite the clusters freed by emptying the overlay with zeroes",
    "  -p            show progress",
    "  -q            quiet",
    "  -t cache      accepted for compatibility (snapstack flushes at the end)",
    "  -r rate       read at most rate bytes of data per second (k, M, G suffixes; 0: no limit)",
    "  --search dir  also look in dir for other images using BASE as backing (warns about them)",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "format", short: "f", value: true },
      { name: "cache", short: "t", value: true },
      { name: "base", short: "b", value: true },
      { name: "drop", short: "d" },
      { name: "progress", short: "p" },
      { name: "quiet", short: "q" },
      { name: "rate", short: "r", value: true },
      { name: "search", long: "search", value: true, repeat: "list" },
      { name: "wipe", long: "wipe" },
    ]);
    checkCacheOptions(parsed);
    const rateLimitBytesPerSecond = parseRateLimit(optionString(parsed, "rate"));
    expectPositionals(parsed.positionals, 1, 1, "Expecting one image file name");
    const quiet = optionFlag(parsed, "quiet");
    const progress = createProgress(context, optionFlag(parsed, "progress") && !quiet);
    const base = optionString(parsed, "base");
    const search = optionList(parsed, "search");
    try {
      const result = await commitImage(parsed.positionals[0], {
        format: optionString(parsed, "format"),
        base,
        drop: optionFlag(parsed, "drop"),
        wipe: optionFlag(parsed, "wipe"),
        searchDirectories: search.length > 0 ? search : undefined,
        rateLimitBytesPerSecond,
        onProgress: (job) => progress.update(job.fraction),
      });
      progress.update(1);
      progress.end();
      for (const image of result.invalidated) {
        context.err(`Warning: '${image}' lies between the overlay and '${result.basePath}'; its content is no longer meaningful\n`);
      }
      for (const image of result.otherUsers) {
        context.err(`Warning: '${image}' also uses '${result.basePath}' as backing file; its content has changed\n`);
      }
    } catch (error) {
      progress.end();
      throw error;
    }
    if (!quiet) context.out("Image committed.\n");
    return 0;
  },
};
