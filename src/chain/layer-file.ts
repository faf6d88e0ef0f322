/**
 * Which file each layer of a chain reads from, and which layer of a chain
 * is a given file: how convert, rebase and restore refuse to write a file
 * that they also read (qemu-img learns it from its image locks).
 *
 * A layer's file is the one its name opens, except for a view whose name
 * is no file (an internal snapshot, FILE@SNAPSHOT): its opener records the
 * file with setLayerFile. Files are compared by device and inode
 * (io/file-identity.ts fileKey).
 */
import type { BlockDevice } from "../device/block-device.ts";
import { fileKey } from "../io/file-identity.ts";
import { chainLayers } from "./open-image.ts";

const layerKeys = new WeakMap<BlockDevice, string | null>();

/** Record that `layer` reads from the file at `path` (a snapshot view is named FILE@SNAPSHOT, which is no file). */
export function setLayerFile(layer: BlockDevice, path: string): void {
  layerKeys.set(layer, fileKey(path));
}

/** The file a layer reads from (fileKey), or null if it is not a file snapstack can name. */
export function layerKey(layer: BlockDevice): string | null {
  let key = layerKeys.get(layer);
  if (key === undefined) {
    key = fileKey(layer.name);
    layerKeys.set(layer, key);
  }
  return key;
}

/** The layer of `device`'s chain (`device` included) that reads from the file `key` names, if any. */
export function layerOfFile(device: BlockDevice, key: string | null): BlockDevice | undefined {
  if (key === null) return undefined;
  return chainLayers(device).find((layer) => layerKey(layer) === key);
}
