/**
 * `snapstack img create [-f fmt] [-b backing -F fmt] [-u] [-o options] [-q] FILE [SIZE]`
 *
 * Checks the arguments and the -o list (names, types), prints qemu-img's
 * "Formatting ..." banner, and hands the rest to the library's createImage,
 * which validates values against the format and writes the image.
 */
import { SnapstackError } from "../../base/errors.ts";
import { parseSize } from "../../base/units.ts";
import { optionFlag, optionString, parseArgs } from "../args.ts";
import { expectPositionals } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { checkCreateOptions, formatCreateBanner, formatOptionHelp, isHelpRequest, parseOptionList } from "../create-options.ts";
import { createImage } from "../engine.ts";

export const createCommand: CliCommand = {
  name: "create",
  synopsis: "create [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] [-q] filename [size]",
  summary: "Create a new image (format raw unless -f is given). Without size, the backing file's size is used.",
  optionHelp: [
    "  -f fmt           format of the new image: qcow2 or raw (default raw)",
    "  -b backing_file  backing file (qcow2 only); needs -F",
    "  -F backing_fmt   format of the backing file",
    "  -u               do not open the backing file (size must be given)",
    "  -o options       format options, comma separated; '-o help' lists them",
    "  -q               quiet: no banner",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "format", short: "f", value: true },
      { name: "backingFile", short: "b", value: true },
      { name: "backingFormat", short: "F", value: true },
      { name: "unsafe", short: "u" },
      { name: "options", short: "o", value: true, repeat: "comma" },
      { name: "quiet", short: "q" },
    ], { unimplementedLong: [{ long: "object", value: true }] });
    const format = optionString(parsed, "format") ?? "raw";
    const entries = parseOptionList(optionString(parsed, "options") ?? "");
    const filename = parsed.positionals[0];
    if (isHelpRequest(entries)) {
      context.out(formatOptionHelp(format, filename !== undefined));
      return 0;
    }
    expectPositionals(parsed.positionals, 1, 2, "Expecting image file name");
    const sizeText = parsed.positionals[1];
    let sizeBytes = sizeText === undefined ? undefined : parseSize(sizeText, { what: "image size" });

    // -b/-F and a positional size join the -o list, as qemu-img does.
    const backingFile = optionString(parsed, "backingFile");
    const backingFormatOption = optionString(parsed, "backingFormat");
    const extra = [
      ...(sizeBytes !== undefined ? [{ name: "size", value: String(sizeBytes) }] : []),
      ...(backingFile !== undefined ? [{ name: "backing_file", value: backingFile }] : []),
      ...(backingFormatOption !== undefined ? [{ name: "backing_fmt", value: backingFormatOption }] : []),
    ];
    if (sizeBytes !== undefined && entries.some((entry) => entry.name === "size")) {
      throw new SnapstackError("E_INVALID_OPTION", `${filename}: The image size must be specified only once`);
    }
    const checked = checkCreateOptions(format, [...entries, ...extra]);
    const backing = checked.given.backing_file;
    const backingFormat = checked.given.backing_fmt;
    const unsafe = optionFlag(parsed, "unsafe");
    if (typeof checked.typed.size === "number") sizeBytes = checked.typed.size;
    if (sizeBytes === undefined && (backing === undefined || unsafe)) throw new SnapstackError("E_USAGE", `${filename}: Image creation needs a size parameter`);
    const { size: _size, backing_file: _backingFile, backing_fmt: _backingFmt, ...formatOptions } = checked.typed;
    await createImage(filename, {
      format,
      sizeBytes,
      backingFile: backing,
      backingFormat,
      unsafe,
      options: formatOptions,
      // Once the backing file is checked (and the size known from it), as qemu-img prints the line.
      onChecked: (finalSizeBytes) => {
        if (optionFlag(parsed, "quiet")) return;
        const banner = sizeBytes === undefined ? checkCreateOptions(format, [...entries, ...extra, { name: "size", value: String(finalSizeBytes) }]).banner : checked.banner;
        context.out(formatCreateBanner(filename, format, banner));
      },
    });
    return 0;
  },
};
