/**
 * What the jobs ask of a chain's metadata: where a range is allocated
 * above some depth, which file a layer is, which layer a user-given name
 * denotes.
 *
 * Design notes
 * - `resolveAbove` answers bdrv_is_allocated_above(top, layer at
 *   stopDepth) with the depth that holds each range: layers are asked one
 *   after another for the ranges still unallocated, so only layers above
 *   stopDepth are read (committing into a base never walks the base's own
 *   tables). A range past the end of a shorter backing counts as
 *   allocated zeroes, as QEMU's block status does (reported with the
 *   short layer's depth, so depth 0 always means "the top holds it").
 *   No recursion; the caller windows the guest range (ALLOCATION_WINDOW_BYTES)
 *   so the extent lists stay bounded.
 * - A layer's identity is its file (device and inode): two chains opened
 *   separately share a layer when both reach the same file, which is what
 *   lets diff decide "identical" from metadata alone.
 * - `findInChain` follows bdrv_find_backing_image: a name is resolved
 *   relative to each overlay in turn and compared by real path with that
 *   overlay's backing file; as a convenience a name relative to the
 *   current directory is accepted too.
 */
import { realpathSync } from "node:fs";
import { SnapstackError } from "../../base/errors.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { hasProtocolPrefix, resolveBackingPath } from "../backing-path.ts";

/** Guest bytes whose allocation is resolved at once (bounds the extents held). */
export const ALLOCATION_WINDOW_BYTES = 1024 * 1024 * 1024;

export type AboveKind = "data" | "zero" | "below";

/** A guest range and the depth of the layer above stopDepth that holds it ("below": none does). */
export interface AboveExtent {
  start: number;
  length: number;
  depth: number;
  kind: AboveKind;
}

interface Interval {
  start: number;
  end: number;
}

/** Resolve [start, end) through layers[0 .. stopDepth-1]; extents in guest order. */
export async function resolveAbove(layers: readonly BlockDevice[], stopDepth: number, start: number, end: number): Promise<AboveExtent[]> {
  const out: AboveExtent[] = [];
  let pending: Interval[] = end > start ? [{ start, end }] : [];
  for (let depth = 0; depth < stopDepth && pending.length > 0; depth++) {
    const layer = layers[depth];
    const next: Interval[] = [];
    for (const interval of pending) {
      const inLayer = Math.min(interval.end, Math.max(interval.start, layer.sizeBytes));
      if (inLayer < interval.end) {
        // Past the end of a shorter backing: zeroes (reported at the short layer's depth: the top does not hold them).
        out.push({ start: inLayer, length: interval.end - inLayer, depth, kind: "zero" });
      }
      if (inLayer <= interval.start) continue;
      for (const extent of await layer.layerStatus(interval.start, inLayer - interval.start)) {
        if (extent.kind === "unallocated") next.push({ start: extent.guestOffset, end: extent.guestOffset + extent.lengthBytes });
        else out.push({ start: extent.guestOffset, length: extent.lengthBytes, depth, kind: extent.kind });
      }
    }
    pending = next;
  }
  for (const interval of pending) out.push({ start: interval.start, length: interval.end - interval.start, depth: stopDepth, kind: "below" });
  out.sort((a, b) => a.start - b.start);
  return out;
}

/** resolveAbove over the whole of [start, end), a window at a time, calling `visit` per extent in guest order. */
export async function forEachAbove(
  layers: readonly BlockDevice[],
  stopDepth: number,
  start: number,
  end: number,
  visit: (extent: AboveExtent) => void | Promise<void>,
): Promise<void> {
  for (let windowStart = start; windowStart < end; windowStart += ALLOCATION_WINDOW_BYTES) {
    const windowEnd = Math.min(end, windowStart + ALLOCATION_WINDOW_BYTES);
    for (const extent of await resolveAbove(layers, stopDepth, windowStart, windowEnd)) await visit(extent);
  }
}

function realPathOrNull(path: string): string | null {
  try {
    return realpathSync.native(path);
  } catch {
    return null;
  }
}

/**
 * Depth (>= 1) of the image `name` in the chain below layers[0], or throw
 * E_NOT_IN_CHAIN with qemu-img's message.
 */
export function findInChain(layers: readonly BlockDevice[], name: string, topName: string): number {
  const notFound = (): SnapstackError => new SnapstackError("E_NOT_IN_CHAIN", `Did not find '${name}' in the backing chain of '${topName}'`, { path: topName, base: name });
  // bdrv_find_backing_image: a name with a protocol prefix ("file:base.qcow2") is compared as a plain string.
  if (hasProtocolPrefix(name)) {
    const depth = layers.findIndex((layer, index) => index >= 1 && layer.name === name);
    if (depth >= 1) return depth;
    throw notFound();
  }
  const targets = layers.map((layer) => realPathOrNull(layer.name));
  for (let depth = 1; depth < layers.length; depth++) {
    let candidate: string | null;
    try {
      candidate = realPathOrNull(resolveBackingPath(layers[depth - 1].name, name));
    } catch {
      candidate = null; // a name no file of this chain can have
    }
    if (candidate !== null && candidate === targets[depth]) return depth;
  }
  const fromCwd = realPathOrNull(name);
  if (fromCwd !== null) {
    const depth = targets.indexOf(fromCwd, 1);
    if (depth >= 1) return depth;
  }
  throw notFound();
}
