/** `snapstack img info [-f fmt] [--output=human|json] [--backing-chain] [-U] FILE` */
import { optionFlag, optionString, parseArgs } from "../args.ts";
import { expectPositionals, parseOutputFormat } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { imageInfo } from "../engine.ts";
import { formatQemuJson } from "../qemu-json.ts";
import { formatImageInfoListHuman } from "../render-info.ts";

export const infoCommand: CliCommand = {
  name: "info",
  synopsis: "info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename",
  summary: "Show an image's format, sizes, backing file, snapshots and format-specific details.",
  optionHelp: [
    "  -f fmt           image format; detected when omitted",
    "  --output=ofmt    human (default) or json",
    "  --backing-chain  show every image of the backing chain, top first",
    "  -U               accepted for qemu-img compatibility (no locking is done)",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "format", short: "f", long: "format", value: true },
      { name: "output", long: "output", value: true },
      { name: "backingChain", long: "backing-chain" },
      { name: "forceShare", short: "U", long: "force-share" },
    ]);
    const output = parseOutputFormat(optionString(parsed, "output"));
    expectPositionals(parsed.positionals, 1, 1, "Expecting one image file name");
    const backingChain = optionFlag(parsed, "backingChain");
    const infos = await imageInfo(parsed.positionals[0], { format: optionString(parsed, "format"), backingChain, forceShare: optionFlag(parsed, "forceShare") });
    if (output === "json") {
      context.out(`${formatQemuJson(backingChain ? infos : infos[0])}\n`);
    } else {
      context.out(formatImageInfoListHuman(infos));
    }
    return 0;
  },
};
