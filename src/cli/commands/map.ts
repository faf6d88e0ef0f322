/**
 * `snapstack img map [-f fmt] [--output=human|json] [--start-offset=N] [--max-length=N] FILE`
 *
 * Renders the library's MapExtent list as qemu-img 7.2 does (dump_map_entry):
 * JSON one entry per line; human lists data ranges with the file of the
 * layer holding them and fails on ranges without a host offset (compressed).
 */
import { SnapstackError } from "../../base/errors.ts";
import { parseSize } from "../../base/units.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { optionFlag, optionString, parseArgs } from "../args.ts";
import { expectPositionals, parseOutputFormat } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { formatMapJson, mapImage, openImage } from "../engine.ts";

function hex(value: number): string {
  // printf("%#x") prints 0 without the 0x prefix.
  return value === 0 ? "0" : `0x${value.toString(16)}`;
}

export const MAP_HUMAN_HEADER = `${"Offset".padEnd(16)}${"Length".padEnd(16)}${"Mapped to".padEnd(16)}File\n`;

/** The name of the image at `depth` in the chain below `top` (qemu prints the layer's file name). */
function layerName(top: BlockDevice, depth: number): string {
  let device: BlockDevice | null = top;
  for (let level = 0; level < depth && device !== null; level++) device = device.backing;
  return device?.name ?? "";
}

export const mapCommand: CliCommand = {
  name: "map",
  synopsis: "map [-f fmt] [--output=ofmt] [--start-offset=offset] [--max-length=len] [-U] filename",
  summary: "Show how the guest disk is stored: which layer and host offset holds each range.",
  optionHelp: [
    "  -f fmt                 image format; detected when omitted",
    "  --output=ofmt          human (default) or json",
    "  --start-offset=offset  first guest byte to map",
    "  --max-length=len       map at most this many bytes",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "format", short: "f", long: "format", value: true },
      { name: "output", long: "output", value: true },
      { name: "startOffset", short: "s", long: "start-offset", value: true },
      { name: "maxLength", short: "l", long: "max-length", value: true },
      { name: "forceShare", short: "U", long: "force-share" },
    ]);
    const output = parseOutputFormat(optionString(parsed, "output"));
    const startText = optionString(parsed, "startOffset");
    const lengthText = optionString(parsed, "maxLength");
    const startOffset = startText === undefined ? undefined : parseSize(startText, { what: "start offset" });
    const maxLengthBytes = lengthText === undefined ? undefined : parseSize(lengthText, { what: "max length" });
    expectPositionals(parsed.positionals, 1, 1, "Expecting one image file name");
    const device = await openImage(parsed.positionals[0], { format: optionString(parsed, "format"), readOnly: true, forceShare: optionFlag(parsed, "forceShare") });
    try {
      let extents = await mapImage(device, { startOffset, maxLengthBytes });
      if (extents.length === 0) {
        // qemu-img prints one empty entry for an empty range.
        extents = [{ start: startOffset ?? 0, length: 0, depth: 0, present: false, zero: false, data: false }];
      }
      if (output === "json") {
        context.out(formatMapJson(extents));
        return 0;
      }
      let out = MAP_HUMAN_HEADER;
      for (const extent of extents) {
        if (extent.data && extent.offset === undefined) {
          context.out(out);
          throw new SnapstackError("E_UNSUPPORTED_FEATURE", "File contains external, encrypted or compressed clusters.", {
            guestOffset: extent.start,
          });
        }
        if (extent.data && !extent.zero) {
          out += `${hex(extent.start).padEnd(16)}${hex(extent.length).padEnd(16)}${hex(extent.offset ?? 0).padEnd(16)}${layerName(device, extent.depth)}\n`;
        }
      }
      context.out(out);
      return 0;
    } finally {
      await device.close();
    }
  },
};
