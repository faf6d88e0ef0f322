/** The `snapstack img` commands, in qemu-img's help order. */
import type { CliCommand } from "./context.ts";
import { checkCommand } from "./commands/check.ts";
import { compareCommand } from "./commands/compare.ts";
import { convertCommand } from "./commands/convert.ts";
import { createCommand } from "./commands/create.ts";
import { infoCommand } from "./commands/info.ts";
import { mapCommand } from "./commands/map.ts";
import { measureCommand } from "./commands/measure.ts";
import { resizeCommand } from "./commands/resize.ts";

export const IMG_COMMANDS: CliCommand[] = [
  checkCommand,
  compareCommand,
  convertCommand,
  createCommand,
  infoCommand,
  mapCommand,
  measureCommand,
  resizeCommand,
];
