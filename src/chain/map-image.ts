/**
 * qemu-img map --output=json: how each guest range of a chain is resolved.
 *
 * Design notes (qemu-img.c get_block_status, block/io.c bdrv_co_block_status)
 * - For a range, ask the top layer; a range it holds (data or zero) is
 *   reported at that depth with present=true. An unallocated range falls to
 *   the next layer, except: with no backing it is zero at this depth with
 *   present=false; at or past the end of a shorter backing it is zero at
 *   this depth with present=false, and the part below the backing's end is
 *   looked up in the backing.
 * - offset is the host offset in the resolving layer's file; absent for
 *   compressed data and for anything not stored (unallocated, plain zero).
 * - Data stored past the end of a qcow2 layer's host file (QEMU leaves the
 *   last cluster short) is reported `zero: true, data: true`, as QEMU's
 *   protocol layer does; so is data over a hole in the host file where QEMU
 *   asks the file (BlockDevice.hostHoles: a qcow2 image QEMU's heuristic
 *   takes for metadata-preallocated; a vmdk image's flat extent; a fixed
 *   vpc disk). A raw
 *   layer's holes are zero (RawImage.layerStatus).
 * - Adjacent entries merge when depth, present, zero, data and the host
 *   file agree and either both lack an offset or the offsets are
 *   contiguous (entry_mergeable).
 * - Iterative: a stack of (layer, range) lookups replaces recursion, so
 *   chains thousands deep need constant stack. The top is walked in chunks
 *   of MAP_CHUNK_BYTES (qemu-img probes 1 GiB at a time too) so the extent
 *   lists held at once stay bounded.
 * - Errors where QEMU meets them (walkChainPrefix): QEMU asks about one run
 *   at a time, so a corrupt L2 entry at 200 MiB fails only after everything
 *   before it was reported (map prints those entries; compare first finds
 *   a difference before it). A window that fails is halved until it
 *   succeeds or is one sector long, whose error is then the one thrown.
 *   forEachMapEntry hands out merged entries as they are final, so map
 *   streams its output.
 */
import { statSync } from "node:fs";
import { SnapstackError } from "../base/errors.ts";
import type { BlockDevice, LayerExtent, MapExtent } from "../device/block-device.ts";
import { chainLayers } from "./open-image.ts";

/** Guest bytes looked up per top-level step (bounds the extent lists in memory). */
export const MAP_CHUNK_BYTES = 1 << 30;

export interface MapImageOptions {
  startOffset?: number;
  maxLengthBytes?: number;
}


type Task = { kind: "lookup"; depth: number; start: number; end: number } | { kind: "emit"; entry: MapExtent };

function entryFor(extent: LayerExtent, depth: number): MapExtent {
  const entry: MapExtent = {
    start: extent.guestOffset,
    length: extent.lengthBytes,
    depth,
    present: true,
    zero: extent.kind === "zero",
    data: extent.kind === "data",
  };
  if (extent.hostOffset !== undefined && !extent.compressed) entry.offset = extent.hostOffset;
  if (extent.hostFile !== undefined) entry.file = extent.hostFile;
  return entry;
}

function absentZero(start: number, end: number, depth: number): MapExtent {
  return { start, length: end - start, depth, present: false, zero: true, data: false };
}

export function mapEntriesMergeable(current: MapExtent, next: MapExtent): boolean {
  if (current.length === 0) return false;
  if (current.zero !== next.zero || current.data !== next.data || current.depth !== next.depth || current.present !== next.present) return false;
  if ((current.offset === undefined) !== (next.offset === undefined) || current.file !== next.file) return false;
  return current.offset === undefined || current.offset + current.length === next.offset;
}

/**
 * Size of a layer's host file, to flag data past its end as zero (QEMU asks
 * the protocol driver, which reports the range past EOF as zero). Layers are
 * named by their path (openImage); a name that is not a file gives null.
 */
function hostFileSizeBytes(layer: BlockDevice): number | null {
  try {
    return statSync(layer.name).size;
  } catch {
    return null;
  }
}

/**
 * Split a data entry where its bytes read as zeroes from the host file: past
 * the file's end, and in the holes its layer reports (BlockDevice.hostHoles,
 * QEMU's BDRV_BLOCK_RECURSE). Those parts stay data, with `zero: true`.
 */
async function emitData(entry: MapExtent, layer: BlockDevice, fileSizeBytes: number | null, sink: (entry: MapExtent) => void): Promise<void> {
  const offset = entry.offset;
  if (fileSizeBytes === null || offset === undefined || !entry.data) {
    sink(entry);
    return;
  }
  let inside = Math.min(entry.length, Math.max(0, fileSizeBytes - offset));
  if (inside > 0) {
    const runs = (await layer.hostHoles?.(offset, inside, entry.file)) ?? null;
    if (runs === null) sink({ ...entry, length: inside });
    else {
      for (const run of runs) sink({ ...entry, start: entry.start + (run.hostOffset - offset), length: run.lengthBytes, offset: run.hostOffset, zero: run.hole });
      // Runs end at the file's end as it is now: if it shrank since its size was read, the rest is past it.
      inside = runs.reduce((sum, run) => sum + run.lengthBytes, 0);
    }
  }
  if (inside < entry.length) sink({ ...entry, start: entry.start + inside, length: entry.length - inside, offset: offset + inside, zero: true });
}

/**
 * Resolve [start, end) through the chain, calling `sink` with unmerged
 * entries in guest order. `splitAtEof: false` skips the host file size
 * lookup (a stat per layer and call): data past a file's end then stays
 * data, which reads as zeroes all the same (NBD READ's data/hole runs).
 */
export async function walkChain(
  device: BlockDevice,
  start: number,
  end: number,
  sink: (entry: MapExtent) => void,
  options: { splitAtEof?: boolean; stop?: () => boolean } = {},
): Promise<void> {
  const layers = chainLayers(device);
  const splitAtEof = options.splitAtEof ?? true;
  const fileSizes = new Map<number, number | null>();
  const fileSize = (depth: number): number | null => {
    if (!fileSizes.has(depth)) {
      // Past the end of its file only for qcow2; another layer that reports holes (a vmdk flat extent, a
      // fixed vpc, a static vdi) keeps its data in other files or before a footer: no end-of-file split.
      const layer = layers[depth];
      const holesOnly = layer.hostHoles !== undefined;
      fileSizes.set(depth, !splitAtEof ? null : layer.format === "qcow2" ? hostFileSizeBytes(layer) : holesOnly ? Number.POSITIVE_INFINITY : null);
    }
    return fileSizes.get(depth)!;
  };
  for (let chunkStart = start; chunkStart < end; chunkStart += MAP_CHUNK_BYTES) {
    const stack: Task[] = [{ kind: "lookup", depth: 0, start: chunkStart, end: Math.min(end, chunkStart + MAP_CHUNK_BYTES) }];
    while (stack.length > 0) {
      // The caller has what it needs (NBD BLOCK_STATUS with full extent lists): the rest is not looked up.
      if (options.stop?.() === true) return;
      const task = stack.pop()!;
      if (task.kind === "emit") {
        if (task.entry.data && task.entry.offset !== undefined) await emitData(task.entry, layers[task.entry.depth], fileSize(task.entry.depth), sink);
        else sink(task.entry);
        continue;
      }
      const layer = layers[task.depth];
      const below = layers[task.depth + 1];
      const extents = await layer.layerStatus(task.start, task.end - task.start);
      const next: Task[] = [];
      for (const extent of extents) {
        const extentEnd = extent.guestOffset + extent.lengthBytes;
        if (extent.kind !== "unallocated") {
          next.push({ kind: "emit", entry: entryFor(extent, task.depth) });
        } else if (below === undefined) {
          const entry = absentZero(extent.guestOffset, extentEnd, task.depth);
          // qemu-img map shows the host offset of unallocated subclusters in an allocated cluster.
          if (extent.hostOffset !== undefined) entry.offset = extent.hostOffset;
          next.push({ kind: "emit", entry });
        } else {
          const split = Math.min(extentEnd, Math.max(extent.guestOffset, below.sizeBytes));
          if (split > extent.guestOffset) next.push({ kind: "lookup", depth: task.depth + 1, start: extent.guestOffset, end: split });
          if (extentEnd > split) {
            const entry = absentZero(split, extentEnd, task.depth);
            // Past the backing's end as without a backing: the host offset of unallocated subclusters shows.
            if (extent.hostOffset !== undefined) entry.offset = extent.hostOffset + (split - extent.guestOffset);
            next.push({ kind: "emit", entry });
          }
        }
      }
      for (let i = next.length - 1; i >= 0; i--) stack.push(next[i]);
    }
  }
}

/** The smallest window walkChainPrefix tries after a failure (one sector). */
const PREFIX_WINDOW_BYTES_MIN = 512;

/**
 * walkChain's entries for [start, end), or for the longest prefix
 * [start, end') found by halving the window while the walk fails (see the
 * design notes). Throws the error of a one-sector window at `start`.
 */
export async function walkChainPrefix(device: BlockDevice, start: number, end: number): Promise<{ entries: MapExtent[]; end: number }> {
  for (;;) {
    const entries: MapExtent[] = [];
    try {
      await walkChain(device, start, end, (entry) => entries.push(entry));
      return { entries, end };
    } catch (error) {
      if (end - start <= PREFIX_WINDOW_BYTES_MIN) throw error;
      end = start + Math.max(PREFIX_WINDOW_BYTES_MIN, Math.floor((end - start) / 2));
    }
  }
}

/**
 * Call `emit` with each entry of `qemu-img map --output=json` for a chain,
 * in guest order, as soon as it can no longer merge with the next one
 * (`last` for the final one). A failure is thrown after the entries before
 * it were emitted.
 */
export async function forEachMapEntry(device: BlockDevice, options: MapImageOptions, emit: (entry: MapExtent, last: boolean) => void): Promise<void> {
  const startOffset = options.startOffset ?? 0;
  if (!Number.isSafeInteger(startOffset) || startOffset < 0) {
    throw new SnapstackError("E_INVALID_SIZE", `start offset ${startOffset} must be a non-negative integer`);
  }
  let end = device.sizeBytes;
  if (options.maxLengthBytes !== undefined) {
    if (!Number.isSafeInteger(options.maxLengthBytes) || options.maxLengthBytes < 0) {
      throw new SnapstackError("E_INVALID_SIZE", `max length ${options.maxLengthBytes} must be a non-negative integer`);
    }
    end = Math.min(end, startOffset + options.maxLengthBytes);
  }
  let pending: MapExtent | null = null;
  for (let at = startOffset; at < end; ) {
    const walked = await walkChainPrefix(device, at, Math.min(end, at + MAP_CHUNK_BYTES));
    for (const entry of walked.entries) {
      if (pending !== null && mapEntriesMergeable(pending, entry)) {
        pending.length += entry.length;
        continue;
      }
      if (pending !== null) emit(pending, false);
      pending = { ...entry };
    }
    at = walked.end;
  }
  if (pending !== null) emit(pending, true);
}

/** The entries of `qemu-img map --output=json` for a chain. */
export async function mapImage(device: BlockDevice, options: MapImageOptions = {}): Promise<MapExtent[]> {
  const entries: MapExtent[] = [];
  await forEachMapEntry(device, options, (entry) => entries.push(entry));
  return entries;
}

/** One entry as `qemu-img map --output=json` prints it (no separator). */
export function formatMapJsonEntry(e: Omit<MapExtent, "start"> & { start: number | bigint }): string {
  const offset = e.offset !== undefined ? `, "offset": ${e.offset}` : "";
  return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${offset}}`;
}

/** Render entries exactly as `qemu-img map --output=json` prints them. */
export function formatMapJson(entries: readonly MapExtent[]): string {
  return `[${entries.map(formatMapJsonEntry).join(",\n")}]\n`;
}
