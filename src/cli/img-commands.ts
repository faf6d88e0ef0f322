/** The `snapstack img` commands, in qemu-img's help order. */
import type { CliCommand } from "./context.ts";
import { checkCommand } from "./commands/check.ts";
import { commitCommand } from "./commands/commit.ts";
import { compareCommand } from "./commands/compare.ts";
import { convertCommand } from "./commands/convert.ts";
import { createCommand } from "./commands/create.ts";
import { infoCommand } from "./commands/info.ts";
import { mapCommand } from "./commands/map.ts";
import { measureCommand } from "./commands/measure.ts";
import { rebaseCommand } from "./commands/rebase.ts";
import { resizeCommand } from "./commands/resize.ts";
import { snapshotCommand } from "./commands/snapshot.ts";
import { diffCommand } from "./commands/diff.ts";
import { restoreCommand } from "./commands/restore.ts";
import { removeCommand } from "./commands/remove.ts";
import { streamCommand } from "./commands/stream.ts";

export const IMG_COMMANDS: CliCommand[] = [
  checkCommand,
  commitCommand,
  compareCommand,
  convertCommand,
  createCommand,
  infoCommand,
  mapCommand,
  measureCommand,
  snapshotCommand,
  rebaseCommand,
  resizeCommand,
  // snapstack additions (no qemu-img equivalent)
  diffCommand,
  restoreCommand,
  removeCommand,
  streamCommand,
];
