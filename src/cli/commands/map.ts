/**
 * `snapstack img map [-f fmt] [--output=human|json] [--start-offset=N] [--max-length=N] FILE`
 *
 * Renders the library's MapExtent list as qemu-img 7.2 does (dump_map_entry):
 * JSON one entry per line; human lists data ranges with the file of the
 * layer holding them and fails on ranges without a host offset (compressed).
 * Streams: each entry is printed once the next one is known (as qemu-img
 * does), in pieces of OUTPUT_PIECE_CHARS, so a huge fragmented image needs
 * no list of its entries in memory (stdout writes are synchronous on Linux),
 * and a failure part way leaves qemu-img's partial output.
 */
import { SnapstackError } from "../../base/errors.ts";
import { parseSizeInt64 } from "../../base/units.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { optionFlag, optionString, parseArgs } from "../args.ts";
import { expectPositionals, parseOutputFormat } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { forEachMapEntry, formatMapJsonEntry, openImage } from "../engine.ts";
import type { MapExtent } from "../../device/block-device.ts";

function hex(value: number): string {
  // printf("%#x") prints 0 without the 0x prefix.
  return value === 0 ? "0" : `0x${value.toString(16)}`;
}

/** Characters of output gathered before one write to stdout. */
const OUTPUT_PIECE_CHARS = 64 * 1024;

export const MAP_HUMAN_HEADER = `${"Offset".padEnd(16)}${"Length".padEnd(16)}${"Mapped to".padEnd(16)}File\n`;

/** The file an entry's data is in: a vmdk extent's, else the layer's at its depth below `top` (qemu prints that name). */
function hostFileName(top: BlockDevice, entry: MapExtent): string {
  if (entry.file !== undefined) return entry.file;
  let device: BlockDevice | null = top;
  for (let level = 0; level < entry.depth && device !== null; level++) device = device.backing;
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
    // qemu-img takes both up to INT64_MAX; past snapstack's 2^53 limit they reach beyond any image anyway.
    const startBig = startText === undefined ? undefined : parseSizeInt64(startText, "start offset");
    const lengthBig = lengthText === undefined ? undefined : parseSizeInt64(lengthText, "max length");
    const pastAnyImage = startBig !== undefined && startBig > BigInt(Number.MAX_SAFE_INTEGER);
    const startOffset = startBig === undefined ? undefined : pastAnyImage ? Number.MAX_SAFE_INTEGER : Number(startBig);
    const maxLengthBytes = lengthBig === undefined ? undefined : Number(lengthBig > BigInt(Number.MAX_SAFE_INTEGER) ? BigInt(Number.MAX_SAFE_INTEGER) : lengthBig);
    expectPositionals(parsed.positionals, 1, 1, "Expecting one image file name");
    const device = await openImage(parsed.positionals[0], { format: optionString(parsed, "format"), readOnly: true, forceShare: optionFlag(parsed, "forceShare") });
    let piece = "";
    const write = (text: string): void => {
      piece += text;
      if (piece.length >= OUTPUT_PIECE_CHARS) {
        context.out(piece);
        piece = "";
      }
    };
    let printed = 0;
    const json = (entry: MapExtent, last: boolean): void => {
      printed++;
      write(`${formatMapJsonEntry(entry)}${last ? "]\n" : ",\n"}`);
    };
    const human = (entry: MapExtent): void => {
      if (entry.data && entry.offset === undefined) {
        throw new SnapstackError("E_UNSUPPORTED_FEATURE", "File contains external, encrypted or compressed clusters.", { guestOffset: entry.start });
      }
      if (entry.data && !entry.zero) {
        write(`${hex(entry.start).padEnd(16)}${hex(entry.length).padEnd(16)}${hex(entry.offset ?? 0).padEnd(16)}${hostFileName(device, entry)}\n`);
      }
    };
    try {
      write(output === "json" ? "[" : MAP_HUMAN_HEADER);
      if (!pastAnyImage) await forEachMapEntry(device, { startOffset, maxLengthBytes }, output === "json" ? json : human);
      // qemu-img prints one empty entry for an empty range (its start as given, even past 2^53).
      if (output === "json" && printed === 0) {
        write(`${formatMapJsonEntry({ start: startBig ?? 0, length: 0, depth: 0, present: false, zero: false, data: false })}]\n`);
      }
      return 0;
    } finally {
      context.out(piece);
      await device.close();
    }
  },
};
