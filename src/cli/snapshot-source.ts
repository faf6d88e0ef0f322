/**
 * `-l SNAPSHOT` of qemu-nbd and qemu-img measure: open an image, or a
 * read-only view of one of its internal snapshots, as one device with one
 * close.
 */
import { SnapstackError } from "../base/errors.ts";
import type { BlockDevice } from "../device/block-device.ts";
import type { NodeFileIoMode } from "../io/node-file.ts";
import { Qcow2Image } from "../formats/qcow2/qcow2-image.ts";
import { openSnapshotView } from "../formats/qcow2/snapshot-view.ts";
import { openImage } from "./engine.ts";

/** `-l`'s value: `ID_OR_NAME`, or `snapshot.id=ID` / `snapshot.name=NAME` (qemu's snapshot_param). */
export function parseSnapshotParam(text: string): string {
  if (!text.startsWith("snapshot.")) return text;
  const fields = new Map(text.split(",").map((pair) => [pair.slice(0, pair.indexOf("=")), pair.slice(pair.indexOf("=") + 1)]));
  const ref = fields.get("snapshot.id") ?? fields.get("snapshot.name");
  if (ref === undefined || ref === "") throw new SnapstackError("E_USAGE", `-l ${text}: expected snapshot.id=ID or snapshot.name=NAME`);
  return ref;
}

export interface SourceOptions {
  format?: string;
  readOnly: boolean;
  forceShare?: boolean;
  ioMode?: NodeFileIoMode;
  writeIoMode?: NodeFileIoMode;
  /** Internal snapshot (ID or name) to open instead of the current state: always read-only. */
  snapshot?: string;
}

/** The image at `path` with its chain, or (`snapshot`) a read-only view of its internal snapshot as `device` (`image`: the image itself either way); `close` closes both. */
export async function openSource(path: string, options: SourceOptions): Promise<{ device: BlockDevice; image: BlockDevice; close(): Promise<void> }> {
  const image = await openImage(path, {
    format: options.format,
    readOnly: options.readOnly || options.snapshot !== undefined,
    forceShare: options.forceShare,
    ioMode: options.ioMode,
    writeIoMode: options.writeIoMode,
  });
  if (options.snapshot === undefined) return { device: image, image, close: () => image.close() };
  try {
    if (!(image instanceof Qcow2Image)) {
      throw new SnapstackError("E_UNSUPPORTED_FEATURE", `-l: ${path} is ${image.format}; internal snapshots exist only in qcow2 images`);
    }
    const view = await openSnapshotView(image, options.snapshot);
    return {
      device: view,
      image,
      close: async () => {
        await view.close();
        await image.close();
      },
    };
  } catch (error) {
    await image.close();
    throw error;
  }
}
