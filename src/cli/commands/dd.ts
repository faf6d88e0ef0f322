/**
 * `snapstack img dd [-f fmt] [-O output_fmt] [-U] [bs=block_size]
 * [count=blocks] [skip=blocks] if=input of=output`
 *
 * qemu-img 7.2's dd (chain/dd-image.ts): operands are key=value words, the
 * last of a key wins; sizes take qemu's suffixes.
 */
import { SnapstackError } from "../../base/errors.ts";
import { parseSizeBig, parseSizeInt64 } from "../../base/units.ts";
import { optionFlag, optionString, parseArgs } from "../args.ts";
import type { CliCommand } from "../context.ts";
import { DD_BLOCK_BYTES_MAX, ddImage } from "../engine.ts";

const OPERANDS = ["bs", "count", "skip", "if", "of"] as const;
type Operand = (typeof OPERANDS)[number];

export const ddCommand: CliCommand = {
  name: "dd",
  synopsis: "dd [-f fmt] [-O output_fmt] [-U] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output",
  summary: "Copy a byte range of an image into a new image, every byte written.",
  optionHelp: [
    "  if=input / of=output   the image read and the image created (over any file of that name)",
    "  bs=size                bytes per block (default 512)",
    "  count=blocks           copy up to count * bs bytes of the input (counted from its start)",
    "  skip=blocks            start at skip * bs bytes into the input",
    "  -f fmt / -O fmt        input format (probed when omitted) / output format (default raw)",
    "  -U                     read an input another process writes (force share)",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "format", short: "f", value: true },
      { name: "outputFormat", short: "O", value: true },
      { name: "forceShare", short: "U" },
    ]);
    // Operands are checked in order, the first bad one reported (img_dd's loop); the last of a key wins.
    let input: string | undefined;
    let output: string | undefined;
    let blockBytes: number | undefined;
    let countBlocks: bigint | undefined;
    let skipBlocks: bigint | undefined;
    for (const word of parsed.positionals) {
      const equals = word.indexOf("=");
      const key = word.slice(0, equals) as Operand;
      if (equals < 0 || !OPERANDS.includes(key)) throw new SnapstackError("E_USAGE", `unrecognized operand ${equals < 0 ? word : key}`);
      const value = word.slice(equals + 1);
      if (key === "if") input = value;
      else if (key === "of") output = value;
      else if (key === "count") countBlocks = parseSizeInt64(value, "count");
      else if (key === "skip") skipBlocks = parseSizeInt64(value, "skip");
      else {
        const bytes = parseSizeBig(value, "bs");
        if (bytes < 1n || bytes > BigInt(DD_BLOCK_BYTES_MAX)) throw new SnapstackError("E_INVALID_SIZE", `Invalid bs specified. Must be between 1 and ${DD_BLOCK_BYTES_MAX}.`);
        blockBytes = Number(bytes);
      }
    }
    if (input === undefined || output === undefined) throw new SnapstackError("E_USAGE", "Must specify both input and output files");
    // Block counts up to 2^63: a count past any image means no limit, a skip past it an empty output.
    const bs = BigInt(blockBytes ?? 512);
    const blocksCapped = (blocks: bigint | undefined): number | undefined =>
      blocks === undefined ? undefined : blocks * bs > BigInt(Number.MAX_SAFE_INTEGER) ? Math.floor(Number.MAX_SAFE_INTEGER / Number(bs)) : Number(blocks);
    const count = blocksCapped(countBlocks);
    const skip = blocksCapped(skipBlocks);
    const result = await ddImage(input, output, {
      format: optionString(parsed, "format"),
      outputFormat: optionString(parsed, "outputFormat"),
      blockBytes,
      count,
      skip,
      forceShare: optionFlag(parsed, "forceShare"),
    });
    // qemu-img 7.2 reports this and still exits 0, the output created empty.
    if (result.skippedPastEnd) context.err(`snapstack: warning: ${input}: cannot skip to specified offset\n`);
    return 0;
  },
};
