/** `snapstack img measure [--output=human|json] [-O fmt] [-o opts] (--size SIZE | [-f fmt] FILE)` */
import { SnapstackError } from "../../base/errors.ts";
import { parseSize } from "../../base/units.ts";
import { optionFlag, optionString, parseArgs } from "../args.ts";
import { parseOutputFormat } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { checkCreateOptions, parseOptionList } from "../create-options.ts";
import { measureImage, type MeasureResult } from "../engine.ts";
import { openSource, parseSnapshotParam } from "../snapshot-source.ts";
import { formatQemuJson } from "../qemu-json.ts";

export function formatMeasureHuman(result: MeasureResult): string {
  let out = `required size: ${result.required}\nfully allocated size: ${result["fully-allocated"]}\n`;
  if (result.bitmaps !== undefined) out += `bitmaps size: ${result.bitmaps}\n`;
  return out;
}

export const measureCommand: CliCommand = {
  name: "measure",
  synopsis: "measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [-f fmt] [-U] [-l snapshot_param] filename]",
  summary: "Compute the file size an image of the output format needs (required) and at most needs (fully allocated).",
  optionHelp: [
    "  --output=ofmt   human (default) or json",
    "  -O output_fmt   format to measure for (default raw)",
    "  -o options      its creation options",
    "  --size N        measure a new, empty image of N bytes",
    "  -f fmt          format of the image to measure",
    "  -l snapshot     measure this internal snapshot (ID, name, snapshot.id=ID or snapshot.name=NAME)",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "output", long: "output", value: true },
      { name: "outputFormat", short: "O", value: true },
      { name: "options", short: "o", value: true, repeat: "comma" },
      { name: "size", long: "size", value: true },
      { name: "format", short: "f", value: true },
      { name: "forceShare", short: "U", long: "force-share" },
      { name: "snapshot", short: "l", value: true },
    ]);
    const output = parseOutputFormat(optionString(parsed, "output"));
    const sizeText = optionString(parsed, "size");
    const sizeBytes = sizeText === undefined ? undefined : parseSize(sizeText, { what: "image size" });
    // img_measure's checks, in its order.
    if (parsed.positionals.length > 1) throw new SnapstackError("E_USAGE", "At most one filename argument is allowed.");
    const filename = parsed.positionals[0];
    if (filename === undefined && (optionString(parsed, "format") !== undefined || optionString(parsed, "snapshot") !== undefined)) {
      throw new SnapstackError("E_USAGE", "--image-opts, -f, and -l require a filename argument.");
    }
    if (sizeBytes !== undefined && filename !== undefined) {
      throw new SnapstackError("E_USAGE", "--size N cannot be used together with a filename.");
    }
    if (sizeBytes === undefined && filename === undefined) {
      throw new SnapstackError("E_USAGE", "Either --size N or one filename must be specified.");
    }
    const format = optionString(parsed, "outputFormat") ?? "raw";
    const checked = checkCreateOptions(format, parseOptionList(optionString(parsed, "options") ?? ""));
    let result: MeasureResult;
    if (sizeBytes !== undefined) {
      result = await measureImage({ format, options: checked.typed, sizeBytes });
    } else {
      const snapshotText = optionString(parsed, "snapshot");
      const source = await openSource(filename!, {
        format: optionString(parsed, "format"),
        readOnly: true,
        forceShare: optionFlag(parsed, "forceShare"),
        snapshot: snapshotText === undefined ? undefined : parseSnapshotParam(snapshotText),
      });
      try {
        result = await measureImage({ format, options: checked.typed, source: source.device, bitmapsOf: source.image });
      } finally {
        await source.close();
      }
    }
    const json: Record<string, number> = { required: result.required, "fully-allocated": result["fully-allocated"] };
    if (result.bitmaps !== undefined) json.bitmaps = result.bitmaps;
    context.out(output === "json" ? `${formatQemuJson(json)}\n` : formatMeasureHuman(result));
    return 0;
  },
};
