/**
 * `snapstack img compare [-f fmt] [-F fmt] [-s] [-p] [-q] [-U] A B`
 *
 * Exit 0 identical, 1 different, 2 an image could not be opened, 3 a block
 * status query failed, 4 a read failed (exit-codes.ts); messages as
 * qemu-img 7.2.
 */
import { isSnapstackError } from "../../base/errors.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { optionFlag, optionString, parseArgs } from "../args.ts";
import { checkCacheOptions, createProgress, expectPositionals } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { compareImages, openImage } from "../engine.ts";
import { RESULT_EXIT_CODES } from "../exit-codes.ts";

export const compareCommand: CliCommand = {
  name: "compare",
  synopsis: "compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2",
  summary: "Compare the guest-visible content of two images (exit 0 identical, 1 different, 2 cannot open, 3 metadata error, 4 read error).",
  optionHelp: [
    "  -f fmt  format of the first image",
    "  -F fmt  format of the second image",
    "  -s      strict: a size or allocation difference is a difference",
    "  -p      show progress",
    "  -q      quiet",
    "  -T src_cache  accepted for compatibility (checked as qemu-img checks it)",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "format1", short: "f", value: true },
      { name: "format2", short: "F", value: true },
      { name: "strict", short: "s" },
      { name: "progress", short: "p" },
      { name: "quiet", short: "q" },
      { name: "forceShare", short: "U", long: "force-share" },
      { name: "sourceCache", short: "T", value: true },
    ]);
    checkCacheOptions(parsed);
    expectPositionals(parsed.positionals, 2, 2, "Expecting two image file names");
    const quiet = optionFlag(parsed, "quiet");
    const say = (text: string): void => {
      if (!quiet) context.out(text);
    };
    const devices: BlockDevice[] = [];
    try {
      const forceShare = optionFlag(parsed, "forceShare");
      devices.push(await openImage(parsed.positionals[0], { format: optionString(parsed, "format1"), readOnly: true, forceShare }));
      devices.push(await openImage(parsed.positionals[1], { format: optionString(parsed, "format2"), readOnly: true, forceShare }));
      const progress = createProgress(context, optionFlag(parsed, "progress") && !quiet);
      const result = await compareImages(devices[0], devices[1], {
        strict: optionFlag(parsed, "strict"),
        onProgress: (fraction) => progress.update(fraction),
      }).catch((error: unknown) => {
        // qemu-img warns about the sizes before it walks the longer image's tail.
        if (isSnapstackError(error) && error.details.sizeMismatch === true) say("Warning: Image size mismatch!\n");
        throw error;
      });
      if (result.identical) progress.update(1);
      say(`${result.message}\n`);
      progress.end();
      return result.identical ? RESULT_EXIT_CODES.ok : RESULT_EXIT_CODES.compareDifferent;
    } finally {
      for (const device of devices) await device.close();
    }
  },
};
