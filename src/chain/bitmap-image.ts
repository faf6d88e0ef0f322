/**
 * qemu-img bitmap: change the persistent dirty bitmaps of a qcow2 image
 * (Qcow2Image.changeBitmaps; formats/qcow2/dirty-bitmaps.ts holds the
 * rules). A merge reads its source bitmap from the image itself, or from
 * another image (`-b`, opened read-only once the image is open, as
 * qemu-img opens it).
 */
import { SnapstackError } from "../base/errors.ts";
import { Qcow2Image, type BitmapAction, type BitmapData } from "../formats/qcow2/index.ts";
import { parseImageFormat } from "./image-format.ts";
import { openImage } from "./open-image.ts";

/** A step as the CLI gives it: a merge names its source bitmap. */
export type BitmapStep = { kind: "add"; name: string; granularityBytes?: number } | { kind: "remove" | "clear" | "enable" | "disable"; name: string } | { kind: "merge"; name: string; sourceName: string };

export interface ChangeBitmapsOptions {
  format?: string;
  /** The image merge sources are read from (default: the image itself). */
  sourceFile?: string;
  sourceFormat?: string;
}

/** Bitmaps of another image that merges read, by name (opened read-only after the target, as qemu-img opens them). */
async function readSourceBitmaps(path: string, format: string | undefined, names: readonly string[]): Promise<Map<string, BitmapData | SnapstackError>> {
  const image = await openImage(path, { format: format === undefined ? undefined : parseImageFormat(format), readOnly: true });
  try {
    const found = new Map<string, BitmapData | SnapstackError>();
    for (const name of names) {
      if (!(image instanceof Qcow2Image)) {
        found.set(name, new SnapstackError("E_NOT_FOUND", `Dirty bitmap '${name}' not found`, { path }));
        continue;
      }
      try {
        found.set(name, await image.readBitmap(name));
      } catch (error) {
        if (!(error instanceof SnapstackError)) throw error;
        found.set(name, error);
      }
    }
    return found;
  } finally {
    await image.close();
  }
}

export async function changeImageBitmaps(path: string, steps: readonly BitmapStep[], options: ChangeBitmapsOptions = {}): Promise<void> {
  // The backing file is not opened: bitmaps are the image's own (qemu-img bitmap opens no backing either).
  const image = await openImage(path, { format: options.format === undefined ? undefined : parseImageFormat(options.format), readOnly: false, openBacking: false });
  try {
    if (!(image instanceof Qcow2Image)) {
      // No bitmaps in other formats: the first step fails as in qemu-img.
      const first = steps[0];
      if (first.kind === "add") throw new SnapstackError("E_UNSUPPORTED_FEATURE", `Operation add on bitmap ${first.name} failed: Can't store persistent bitmaps to '${path}': Operation not supported`, { path });
      throw new SnapstackError("E_NOT_FOUND", `Operation ${first.kind} on bitmap ${first.name} failed: Dirty bitmap '${first.name}' not found`, { path });
    }
    const merges = steps.flatMap((step) => (step.kind === "merge" ? [step.sourceName] : []));
    const sources = options.sourceFile === undefined ? null : await readSourceBitmaps(options.sourceFile, options.sourceFormat, merges);
    const actions: BitmapAction[] = [];
    for (const step of steps) {
      if (step.kind !== "merge") {
        actions.push(step);
        continue;
      }
      // A source bitmap -b could not read fails its step, as in qemu-img: the steps before it stay done.
      const source = sources?.get(step.sourceName);
      actions.push({ kind: "merge", name: step.name, source: source === undefined ? { name: step.sourceName } : source instanceof SnapstackError ? { unreadable: source } : { data: source } });
    }
    await image.changeBitmaps(actions);
  } finally {
    await image.close();
  }
}
