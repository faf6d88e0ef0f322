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
import type { SnapshotSelector } from "../formats/qcow2/internal-snapshots.ts";
import { openImage, type TopLockContext } from "./engine.ts";

/**
 * `-l`'s value (qemu's snapshot_param): `ID_OR_NAME`, or the options
 * `snapshot.id=ID` and `snapshot.name=NAME` (either or both; ",," is a
 * comma inside a value, a later key wins, a key without "=" means "on").
 */
export function parseSnapshotParam(text: string): SnapshotSelector {
  if (!text.startsWith("snapshot.")) return { idOrName: text };
  const fields = new Map<string, string>();
  for (const pair of text.replace(/,,/g, "\0").split(",")) {
    const equals = pair.indexOf("=");
    const key = equals < 0 ? pair : pair.slice(0, equals);
    const value = (equals < 0 ? "on" : pair.slice(equals + 1)).replace(/\0/g, ",");
    if (key !== "snapshot.id" && key !== "snapshot.name") {
      throw new SnapstackError("E_USAGE", `Invalid parameter '${key.replace(/\0/g, ",")}': failed in parsing snapshot param '${text}'`, { text });
    }
    fields.set(key, value);
  }
  return { id: fields.get("snapshot.id"), name: fields.get("snapshot.name") };
}

export interface SourceOptions {
  format?: string;
  readOnly: boolean;
  forceShare?: boolean;
  /** The image locks (OpenImageOptions.locks). */
  locks?: false | TopLockContext;
  ioMode?: NodeFileIoMode;
  writeIoMode?: NodeFileIoMode;
  /** Internal snapshot to open instead of the current state (read-only, the image's current size, as qemu's -l). */
  snapshot?: SnapshotSelector;
}

/** The image at `path` with its chain, or (`snapshot`) a read-only view of its internal snapshot as `device` (`image`: the image itself either way); `close` closes both. */
export async function openSource(path: string, options: SourceOptions): Promise<{ device: BlockDevice; image: BlockDevice; close(): Promise<void> }> {
  const image = await openImage(path, {
    format: options.format,
    readOnly: options.readOnly || options.snapshot !== undefined,
    forceShare: options.forceShare,
    locks: options.locks,
    ioMode: options.ioMode,
    writeIoMode: options.writeIoMode,
  });
  if (options.snapshot === undefined) return { device: image, image, close: () => image.close() };
  try {
    if (!(image instanceof Qcow2Image)) {
      throw new SnapstackError("E_UNSUPPORTED_FEATURE", `-l: ${path} is ${image.format}; internal snapshots exist only in qcow2 images`);
    }
    const view = await openSnapshotView(image, options.snapshot, { sizeBytes: image.sizeBytes });
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
