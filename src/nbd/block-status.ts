/**
 * Answers for NBD_CMD_BLOCK_STATUS and the hole map of sparse reads, from a
 * chain's resolved status (walkChain: what qemu's bdrv_block_status_above
 * answers, so the replies match qemu-nbd's for the same chain).
 *
 * Design notes
 * - base:allocation: flags = (data ? 0 : STATE_HOLE) | (zero ? STATE_ZERO : 0),
 *   as qemu's blockstatus_to_extents; data in any layer is 0, zero clusters
 *   and ranges unallocated everywhere are 3, data past the end of a layer's
 *   host file is 2.
 * - qemu:allocation-depth: the layer that holds the range, 1 for the top, 2
 *   for its backing file, ..., 0 when no layer does (qemu's
 *   bdrv_is_allocated_above). A range that falls through to a backing file
 *   shorter than it counts as allocated in that short file (qemu synthesizes
 *   its zeroes "as if allocated at this layer"): walkChain reports it absent
 *   at the layer above, so its depth is that layer's + 2; only the bottom
 *   layer's unallocated ranges are 0.
 * - Adjacent extents with equal values merge, as qemu's
 *   nbd_extent_array_add does, so extent boundaries never depend on how the
 *   walk was windowed.
 * - The walk goes in windows that start at BLOCK_STATUS_WINDOW_FIRST_BYTES
 *   and double: a REQ_ONE query (qemu-img map, convert) stops as soon as the
 *   first extent of every context is known, a whole-disk query (nbdinfo
 *   --map) stops at BLOCK_STATUS_EXTENTS_MAX extents; the reply then covers
 *   a prefix of the request, which the spec allows and clients re-query.
 * - Bounded by the client's worst case (an image of 512-byte clusters,
 *   every other one allocated): a window is at most extentsMax sectors long,
 *   so one window's lookups hold at most that many extents; the walk stops
 *   inside a window once every list is settled; and between windows it lets
 *   the event loop turn, since a walk over cached tables never waits for I/O
 *   and would otherwise hold up every other client (a review measured 1 GiB
 *   windows: 111 MiB and seconds of stall per request).
 */
import type { BlockDevice, MapExtent } from "../device/block-device.ts";
import { walkChain } from "../chain/map-image.ts";
import { chainLayers } from "../chain/open-image.ts";
import { BLOCK_STATUS_EXTENTS_MAX, BLOCK_STATUS_WINDOW_FIRST_BYTES, BLOCK_STATUS_WINDOW_MAX_BYTES, STATE_DIRTY, STATE_HOLE, STATE_ZERO } from "./protocol.ts";
import type { DirtyBitmapBits } from "./nbd-export.ts";

/** The smallest extent any layer can report: a window of extentsMax sectors holds at most extentsMax extents. */
const SECTOR_BYTES = 512;

/** Extents of one metadata context: parallel arrays of lengths and values. */
export class ExtentList {
  readonly lengths: number[] = [];
  readonly values: number[] = [];
  readonly extentsMax: number;
  /** No more extents may be added (the list is full). */
  closed = false;

  constructor(extentsMax: number) {
    this.extentsMax = extentsMax;
  }

  get count(): number {
    return this.lengths.length;
  }

  add(lengthBytes: number, value: number): void {
    if (this.closed || lengthBytes === 0) return;
    const last = this.lengths.length - 1;
    if (last >= 0 && this.values[last] === value) {
      this.lengths[last] += lengthBytes;
      return;
    }
    if (this.lengths.length >= this.extentsMax) {
      this.closed = true;
      return;
    }
    this.lengths.push(lengthBytes);
    this.values.push(value);
  }

  /** Keep only the first extent (REQ_ONE). */
  keepFirst(): void {
    this.lengths.length = Math.min(this.lengths.length, 1);
    this.values.length = this.lengths.length;
  }
}

export function baseAllocationFlags(entry: MapExtent): number {
  return (entry.data ? 0 : STATE_HOLE) | (entry.zero ? STATE_ZERO : 0);
}

/** `bottomDepth`: index of the chain's last layer (0 for a single image). */
export function allocationDepthOf(entry: MapExtent, bottomDepth: number): number {
  if (entry.present) return entry.depth + 1;
  return entry.depth < bottomDepth ? entry.depth + 2 : 0;
}

export interface BlockStatusQuery {
  baseAllocation: boolean;
  allocationDepth: boolean;
  /** One extent per context (NBD_CMD_FLAG_REQ_ONE). */
  reqOne: boolean;
  extentsMax?: number;
}

export interface BlockStatusAnswer {
  baseAllocation: ExtentList | null;
  allocationDepth: ExtentList | null;
}

function settled(list: ExtentList | null, reqOne: boolean): boolean {
  if (list === null) return true;
  return list.closed || (reqOne && list.count >= 2);
}

/** Extents for [guestOffset, guestOffset + lengthBytes) of the chain under `device` (range already validated). */
export async function queryBlockStatus(device: BlockDevice, guestOffset: number, lengthBytes: number, query: BlockStatusQuery): Promise<BlockStatusAnswer> {
  const extentsMax = query.extentsMax ?? BLOCK_STATUS_EXTENTS_MAX;
  const base = query.baseAllocation ? new ExtentList(extentsMax) : null;
  const depth = query.allocationDepth ? new ExtentList(extentsMax) : null;
  const end = guestOffset + lengthBytes;
  const bottomDepth = chainLayers(device).length - 1;
  const windowMax = Math.min(BLOCK_STATUS_WINDOW_MAX_BYTES, extentsMax * SECTOR_BYTES);
  const done = (): boolean => settled(base, query.reqOne) && settled(depth, query.reqOne);
  let windowBytes = Math.min(BLOCK_STATUS_WINDOW_FIRST_BYTES, windowMax);
  for (let start = guestOffset; start < end; ) {
    const windowEnd = Math.min(end, start + windowBytes);
    await walkChain(
      device,
      start,
      windowEnd,
      (entry) => {
        base?.add(entry.length, baseAllocationFlags(entry));
        depth?.add(entry.length, allocationDepthOf(entry, bottomDepth));
      },
      { stop: done },
    );
    start = windowEnd;
    windowBytes = Math.min(windowBytes * 2, windowMax);
    if (done()) break;
    if (start < end) await new Promise<void>((resolve) => setImmediate(resolve));
  }
  if (query.reqOne) {
    base?.keepFirst();
    depth?.keepFirst();
  }
  return { baseAllocation: base, allocationDepth: depth };
}

/**
 * qemu:dirty-bitmap extents for [guestOffset, guestOffset + lengthBytes)
 * (qemu's bitmap_to_extents): STATE_DIRTY where the granule's bit is set,
 * 0 elsewhere, the first and last extents cut at the request's bounds;
 * granules past the bitmap's end are clean. REQ_ONE keeps the first extent.
 */
export function dirtyBitmapExtents(bitmap: DirtyBitmapBits, guestOffset: number, lengthBytes: number, reqOne: boolean, extentsMax = BLOCK_STATUS_EXTENTS_MAX): ExtentList {
  const list = new ExtentList(extentsMax);
  const { granularityBytes, bits } = bitmap;
  const granulesKnown = bits.length * 8;
  const isDirty = (granule: number): boolean => granule < granulesKnown && (bits[granule >>> 3] & (1 << (granule & 7))) !== 0;
  const end = guestOffset + lengthBytes;
  const endGranule = Math.ceil(end / granularityBytes);
  for (let at = guestOffset; at < end && !list.closed; ) {
    let granule = Math.floor(at / granularityBytes);
    const dirty = isDirty(granule);
    granule++;
    // Whole bytes of the same bit skip eight granules at a time.
    const same = dirty ? 0xff : 0;
    while (granule < endGranule) {
      if ((granule & 7) === 0 && granule + 8 <= endGranule && (granule < granulesKnown ? bits[granule >>> 3] === same : !dirty)) {
        granule += 8;
        continue;
      }
      if (isDirty(granule) !== dirty) break;
      granule++;
    }
    const runEnd = Math.min(end, granule * granularityBytes);
    list.add(runEnd - at, dirty ? STATE_DIRTY : 0);
    at = runEnd;
    if (reqOne) break;
  }
  return list;
}

/** One run of a sparse read: data to send, or a hole that reads as zeroes. */
export interface ReadRun {
  guestOffset: number;
  lengthBytes: number;
  hole: boolean;
}

/**
 * Split a read into data runs and hole runs (ranges that read as zeroes:
 * qemu-nbd's nbd_co_send_sparse_read sends BDRV_BLOCK_ZERO ranges as holes,
 * a raw file's holes among them). A device without a backing file that
 * offers readStatus answers alone (a raw file: SEEK_DATA / SEEK_HOLE, which
 * NodeFile answers without a system call inside the last data run it
 * found, so a fully allocated file costs one lookup, not an fstat and two
 * lseeks per READ).
 */
export async function readRuns(device: BlockDevice, guestOffset: number, lengthBytes: number): Promise<ReadRun[]> {
  const runs: ReadRun[] = [];
  const add = (start: number, length: number, hole: boolean): void => {
    const last = runs[runs.length - 1];
    if (last !== undefined && last.hole === hole) last.lengthBytes += length;
    else runs.push({ guestOffset: start, lengthBytes: length, hole });
  };
  if (device.backing === null && device.readStatus !== undefined) {
    for (const extent of await device.readStatus(guestOffset, lengthBytes)) add(extent.guestOffset, extent.lengthBytes, extent.kind === "zero");
    return runs;
  }
  // Data past a host file's end reads as zeroes: no stat per READ to send it as a hole instead.
  await walkChain(
    device,
    guestOffset,
    guestOffset + lengthBytes,
    (entry) => add(entry.start, entry.length, entry.zero),
    { splitAtEof: false },
  );
  return runs;
}
