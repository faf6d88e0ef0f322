/**
 * `snapstack img bitmap (--merge SOURCE | --add | --remove | --clear |
 * --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity]
 * [-f fmt] filename bitmap`
 *
 * qemu-img 7.2's bitmap: the actions run in the order given on the one
 * bitmap named last; `--add --disable` adds a disabled bitmap. A failed
 * action ends the command with its error (qemu-img's wording, "Operation
 * add on bitmap b0 failed: ..."); the actions before it stay done, as in
 * qemu-img. `--merge SOURCE` reads bitmap SOURCE of the image itself, or of
 * `-b source_file`.
 */
import { SnapstackError } from "../../base/errors.ts";
import { parseSize } from "../../base/units.ts";
import { optionString, parseArgs } from "../args.ts";
import type { CliCommand } from "../context.ts";
import { changeImageBitmaps } from "../engine.ts";
import type { BitmapStep } from "../../chain/index.ts";

const ACTIONS = ["add", "remove", "clear", "enable", "disable", "merge"] as const;

export const bitmapCommand: CliCommand = {
  name: "bitmap",
  synopsis: "bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [-f fmt] filename bitmap",
  summary: "Add, remove, clear, enable, disable or merge persistent dirty bitmaps of a qcow2 image.",
  optionHelp: [
    "  --add            add a bitmap (enabled; -g sets its granularity, default the cluster size within 4k..64k)",
    "  --remove         remove it (an in-use one too)",
    "  --clear          clear every bit",
    "  --enable         let writes set its bits",
    "  --disable        keep its bits as they are",
    "  --merge SOURCE   set the bits bitmap SOURCE has set (of this image, or of -b source_file)",
    "  -b source_file   where --merge reads SOURCE; -F its format",
    "  -g granularity   bytes per bit of an added bitmap: a power of 2 from 512",
    "  -f fmt           image format (qcow2); detected when omitted",
  ],
  async run(argv) {
    const parsed = parseArgs(argv, [
      ...ACTIONS.map((name) => ({ name, long: name, value: name === "merge", repeat: "list" as const })),
      { name: "source", short: "b", value: true },
      { name: "sourceFormat", short: "F", value: true },
      { name: "granularity", short: "g", value: true },
      { name: "format", short: "f", value: true },
    ]);
    const kinds: readonly string[] = ACTIONS;
    const sequence = parsed.sequence.filter((option) => kinds.includes(option.name));
    if (sequence.length === 0) throw new SnapstackError("E_USAGE", "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    const granularityText = optionString(parsed, "granularity");
    if (granularityText !== undefined && !sequence.some((option) => option.name === "add")) throw new SnapstackError("E_USAGE", "granularity only supported with --add");
    const sourceFile = optionString(parsed, "source");
    const sourceFormat = optionString(parsed, "sourceFormat");
    if (sourceFormat !== undefined && sourceFile === undefined) throw new SnapstackError("E_USAGE", "-F only supported with -b");
    if (sourceFile !== undefined && !sequence.some((option) => option.name === "merge")) throw new SnapstackError("E_USAGE", "Merge bitmap source file only supported with --merge");
    if (parsed.positionals.length !== 2) throw new SnapstackError("E_USAGE", "Expecting filename and bitmap name");
    const [path, name] = parsed.positionals;
    // -g 0: the default granularity, as in qemu-img.
    const granularityBytes = granularityText === undefined ? undefined : parseSize(granularityText, { what: "granularity" }) || undefined;
    const steps: BitmapStep[] = sequence.map((option): BitmapStep => {
      if (option.name === "merge") return { kind: "merge", name, sourceName: String(option.value) };
      if (option.name === "add") return { kind: "add", name, granularityBytes };
      return { kind: option.name as "remove" | "clear" | "enable" | "disable", name };
    });
    await changeImageBitmaps(path, steps, { format: optionString(parsed, "format"), sourceFile, sourceFormat });
    return 0;
  },
};
