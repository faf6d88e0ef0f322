/**
 * `snapstack img remove [--wipe] [--search dir]... [-q] filename`
 *
 * Delete an image file unless another image (in its directory or a
 * --search directory) uses it as backing file; --wipe overwrites its data
 * with zeroes and flushes before unlinking.
 */
import { NOT_QEMU, optionFlag, optionList, parseArgs } from "../args.ts";
import { expectPositionals } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { removeImage } from "../../chain/jobs/index.ts";

export const removeCommand: CliCommand = {
  name: "remove",
  synopsis: "remove [--wipe] [--search dir] [-q] filename",
  summary: "Delete an image, refusing while another image uses it as backing file.",
  optionHelp: [
    "  --wipe        overwrite the image's data with zeroes and flush before deleting it",
    "  --search dir  also check images in dir (repeatable); the image's own directory is always checked",
    "  -q            quiet",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "wipe", long: "wipe" },
      { name: "search", long: "search", value: true, repeat: "list" },
      { name: "quiet", short: "q" },
    ], NOT_QEMU);
    expectPositionals(parsed.positionals, 1, 1, "Expecting one image file name");
    const wipe = optionFlag(parsed, "wipe");
    const result = await removeImage(parsed.positionals[0], { wipe, searchDirectories: optionList(parsed, "search") });
    if (wipe && !optionFlag(parsed, "quiet")) context.out(`Wiped ${result.wipedBytes} bytes.\n`);
    return 0;
  },
};
