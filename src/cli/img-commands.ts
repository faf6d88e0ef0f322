/**
 * The `snapstack img` commands, in qemu-img's help order.
 *
 * Each command module is loaded only when that command runs (or for the
 * top-level help): `img snapshot` does not pay for parsing convert, commit,
 * diff and their job modules at start-up. The names here are the dispatch
 * table; everything else about a command lives in its module.
 */
import type { CliCommand } from "./context.ts";

export interface ImgCommandEntry {
  name: string;
  load(): Promise<CliCommand>;
}

export const IMG_COMMANDS: readonly ImgCommandEntry[] = [
  { name: "amend", load: async () => (await import("./commands/amend.ts")).amendCommand },
  { name: "bench", load: async () => (await import("./commands/bench.ts")).benchCommand },
  { name: "bitmap", load: async () => (await import("./commands/bitmap.ts")).bitmapCommand },
  { name: "check", load: async () => (await import("./commands/check.ts")).checkCommand },
  { name: "commit", load: async () => (await import("./commands/commit.ts")).commitCommand },
  { name: "compare", load: async () => (await import("./commands/compare.ts")).compareCommand },
  { name: "convert", load: async () => (await import("./commands/convert.ts")).convertCommand },
  { name: "create", load: async () => (await import("./commands/create.ts")).createCommand },
  { name: "dd", load: async () => (await import("./commands/dd.ts")).ddCommand },
  { name: "info", load: async () => (await import("./commands/info.ts")).infoCommand },
  { name: "map", load: async () => (await import("./commands/map.ts")).mapCommand },
  { name: "measure", load: async () => (await import("./commands/measure.ts")).measureCommand },
  { name: "snapshot", load: async () => (await import("./commands/snapshot.ts")).snapshotCommand },
  { name: "rebase", load: async () => (await import("./commands/rebase.ts")).rebaseCommand },
  { name: "resize", load: async () => (await import("./commands/resize.ts")).resizeCommand },
  // snapstack additions (no qemu-img equivalent)
  { name: "diff", load: async () => (await import("./commands/diff.ts")).diffCommand },
  { name: "restore", load: async () => (await import("./commands/restore.ts")).restoreCommand },
  { name: "remove", load: async () => (await import("./commands/remove.ts")).removeCommand },
  { name: "stream", load: async () => (await import("./commands/stream.ts")).streamCommand },
];

/** Every img command, loaded (for the top-level help). */
export function loadAllImgCommands(): Promise<CliCommand[]> {
  return Promise.all(IMG_COMMANDS.map((entry) => entry.load()));
}
