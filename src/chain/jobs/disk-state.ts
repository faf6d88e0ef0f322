/**
 * Naming a disk state on the command line: an image file (with its chain)
 * or an internal snapshot of a qcow2 image, `FILE@SNAPSHOT` (ID or name,
 * as qemu-img snapshot -a matches them).
 *
 * A spec that names an existing file is that file even if it contains an
 * '@'; otherwise the text after the last '@' is the snapshot. States are
 * opened read-only. A snapshot view reads the image's own file, which is
 * recorded as its layer file so diffs see the clusters it shares with the
 * image's current state (and with other snapshots) as equal without
 * reading them.
 */
import { existsSync } from "node:fs";
import { SnapstackError } from "../../base/errors.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { parseImageFormat } from "../image-format.ts";
import { openImage } from "../open-image.ts";
import { Qcow2Image } from "../../formats/qcow2/index.ts";
import { openSnapshotView } from "../../formats/qcow2/snapshot-view.ts";
import { setLayerFile } from "../layer-file.ts";

export interface DiskState {
  /** The state as the user named it. */
  spec: string;
  /** The image file. */
  path: string;
  /** Internal snapshot ID or name, or null for the image's current state. */
  snapshot: string | null;
  /** Reads the state (with its backing chain). */
  device: BlockDevice;
  close(): Promise<void>;
}

export function parseStateSpec(spec: string): { path: string; snapshot: string | null } {
  const at = spec.lastIndexOf("@");
  if (at <= 0 || at === spec.length - 1 || existsSync(spec)) return { path: spec, snapshot: null };
  return { path: spec.slice(0, at), snapshot: spec.slice(at + 1) };
}

export async function openDiskState(spec: string, options: { format?: string } = {}): Promise<DiskState> {
  const { path, snapshot } = parseStateSpec(spec);
  const format = options.format === undefined ? undefined : parseImageFormat(options.format);
  const image = await openImage(path, { format, readOnly: true });
  if (snapshot === null) return { spec, path, snapshot, device: image, close: () => image.close() };
  try {
    if (!(image instanceof Qcow2Image)) {
      throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${spec}: a ${image.format} image has no internal snapshots`, { path, snapshot });
    }
    const view = await openSnapshotView(image, snapshot);
    setLayerFile(view, path);
    const close = async (): Promise<void> => {
      try {
        await view.close();
      } finally {
        await image.close();
      }
    };
    return { spec, path, snapshot, device: view, close };
  } catch (error) {
    await image.close();
    throw error;
  }
}
