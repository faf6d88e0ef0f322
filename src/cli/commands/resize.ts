/**
 * `snapstack img resize [-f fmt] [--shrink] [--preallocation=mode] [-q] FILE [+|-]SIZE`
 *
 * As in qemu-img, the size is taken off the end of the arguments before
 * option parsing, so "-1G" needs no "--".
 */
import { SnapstackError } from "../../base/errors.ts";
import { parseSize } from "../../base/units.ts";
import { optionFlag, optionString, parseArgs } from "../args.ts";
import { expectPositionals } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { resizeImage, type SizeSpec } from "../engine.ts";

export function parseSizeSpec(text: string): SizeSpec {
  const sign = text[0] === "+" ? 1 : text[0] === "-" ? -1 : 0;
  const bytes = parseSize(sign === 0 ? text : text.slice(1), { what: "image size" });
  return sign === 0 ? { absoluteBytes: bytes } : { deltaBytes: sign * bytes };
}

export const resizeCommand: CliCommand = {
  name: "resize",
  synopsis: "resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size",
  summary: "Change the virtual size of an image; shrinking needs --shrink.",
  optionHelp: [
    "  -f fmt                     image format; detected when omitted",
    "  --shrink                   allow making the image smaller (data past the new end is lost)",
    "  --preallocation=prealloc   preallocation of the new area (off, metadata, falloc, full)",
    "  -q                         quiet",
  ],
  async run(argv, context) {
    if (argv.length < 2) throw new SnapstackError("E_USAGE", "Not enough arguments");
    const sizeText = argv[argv.length - 1];
    const parsed = parseArgs(argv.slice(0, -1), [
      { name: "format", short: "f", value: true },
      { name: "quiet", short: "q" },
      { name: "shrink", long: "shrink" },
      { name: "preallocation", long: "preallocation", value: true },
    ]);
    expectPositionals(parsed.positionals, 1, 1, "Expecting image file name and size");
    const size = parseSizeSpec(sizeText);
    await resizeImage(parsed.positionals[0], size, {
      format: optionString(parsed, "format"),
      shrink: optionFlag(parsed, "shrink"),
      preallocation: optionString(parsed, "preallocation"),
    });
    if (!optionFlag(parsed, "quiet")) context.out("Image resized.\n");
    return 0;
  },
};
