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
import { SnapstackError } from "../base/errors.ts";
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

/**
 * Refuse (E_IN_USE) to write `outputPath`, the command's `output` ("target",
 * "delta"), when it is a layer of one of the chains the command reads:
 * writing it would destroy what is being read. `inputs` pairs each chain
 * with what the message calls it ("the source image").
 */
export function refuseWritingInput(outputPath: string, output: string, inputs: ReadonlyArray<readonly [role: string, device: BlockDevice]>): void {
  const key = fileKey(outputPath);
  for (const [role, device] of inputs) {
    const layer = layerOfFile(device, key);
    if (layer === undefined) continue;
    const what = layer === device ? role : `${role}'s backing file ${layer.name}`;
    throw new SnapstackError("E_IN_USE", `${outputPath}: cannot write the ${output}: it is ${what}`, { path: outputPath });
  }
}
