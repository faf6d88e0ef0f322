/**
 * Where two disk states differ: the engine under diff, restore and safe
 * rebase.
 *
 * Design notes
 * - A state is a BlockDevice with its chain (an image, a layer of a chain,
 *   a snapshot view) or null (all zeroes, e.g. "no backing"). Beyond a
 *   state's virtual size it reads as zeroes, so states of different sizes
 *   compare as qemu-img rebase does.
 * - Each side is walked with a ChainStatusCursor (the resolved block
 *   status: depth, zero, data, host offset). A range is equal without
 *   reading anything when both sides read as zeroes, or when both resolve
 *   to data at the same host offset of the same file (a layer both chains
 *   share: FROM and its overlay TO, two overlays of one base, a snapshot and
 *   the active state sharing a cluster). Everything else is read (at most
 *   DIFF_CHUNK_BYTES at a time; a side known to be zero is not read) and
 *   compared in granules of `granularityBytes` (512 by default, qemu-img
 *   compare's sector) aligned to guest offsets.
 * - Output: differing ranges in guest order, adjacent ones merged when the
 *   second state's map fields agree, each carrying those fields (depth,
 *   present, zero, data, offset: qemu-img map's MapEntry for the second
 *   state at that range).
 * - `compare(start, end)` may be called repeatedly with increasing ranges
 *   (safe rebase compares only the ranges its overlay does not allocate);
 *   the cursors only move forward. Stats say how many bytes were decided
 *   from metadata and how many were read.
 */
import { assert } from "../../base/errors.ts";
import type { BlockDevice, MapExtent } from "../../device/block-device.ts";
import { ChainStatusCursor } from "../chain-status.ts";
import { chainLayers } from "../open-image.ts";
import type { Job } from "./job.ts";
import { layerKey } from "../layer-file.ts";
import { allocateIoBuffer } from "../../io/io-buffer.ts";

/** Bytes read per side per comparison step (memory: 2 buffers of this size). */
export const DIFF_CHUNK_BYTES = 2 * 1024 * 1024;
/** Default comparison granule: qemu-img compare's 512-byte sector. */
export const DIFF_GRANULARITY_DEFAULT_BYTES = 512;

/** A range where the states differ, with the second state's map fields there. */
export type DiffRange = MapExtent;

export interface DiffStats {
  /** Bytes in differing ranges. */
  differingBytes: number;
  /** Differing ranges reported (after merging). */
  ranges: number;
  /** Bytes found equal from metadata alone (no data read). */
  metadataEqualBytes: number;
  /** Guest bytes whose data was read and compared. */
  comparedBytes: number;
}

export interface StateComparerOptions {
  granularityBytes?: number;
  /** Progress (advance per byte decided) and cancellation checkpoints. */
  job?: Job;
}

const ZEROES = Buffer.alloc(DIFF_CHUNK_BYTES);
const FAR_BYTES = Number.MAX_SAFE_INTEGER;

/** Block status of one state, zero past its end (or everywhere for null). */
class StateCursor {
  readonly device: BlockDevice | null;
  readonly #cursor: ChainStatusCursor | null;
  readonly #layers: BlockDevice[];

  constructor(device: BlockDevice | null) {
    this.device = device;
    this.#cursor = device === null ? null : new ChainStatusCursor(device);
    this.#layers = device === null ? [] : chainLayers(device);
  }

  async at(guestOffset: number): Promise<MapExtent> {
    if (this.device === null || this.#cursor === null || guestOffset >= this.device.sizeBytes) {
      return { start: guestOffset, length: FAR_BYTES - guestOffset, depth: 0, present: false, zero: true, data: false };
    }
    return this.#cursor.at(guestOffset);
  }

  /** The file of the layer an entry resolves to. */
  keyOf(entry: MapExtent): string | null {
    const layer = this.#layers[entry.depth];
    return layer === undefined ? null : layerKey(layer);
  }

  async read(guestOffset: number, buffer: Uint8Array): Promise<void> {
    assert(this.device !== null, "reads only from a device");
    const inside = Math.max(0, Math.min(buffer.length, this.device.sizeBytes - guestOffset));
    if (inside > 0) await this.device.read(guestOffset, buffer.subarray(0, inside));
    buffer.fill(0, inside);
  }
}

function clip(entry: MapExtent, start: number, length: number): MapExtent {
  const clipped: MapExtent = { start, length, depth: entry.depth, present: entry.present, zero: entry.zero, data: entry.data };
  if (entry.offset !== undefined) clipped.offset = entry.offset + (start - entry.start);
  return clipped;
}

function mergeable(a: MapExtent, b: MapExtent): boolean {
  if (a.start + a.length !== b.start) return false;
  if (a.depth !== b.depth || a.present !== b.present || a.zero !== b.zero || a.data !== b.data) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  return a.offset === undefined || a.offset + a.length === b.offset;
}

export class StateComparer {
  readonly stats: DiffStats = { differingBytes: 0, ranges: 0, metadataEqualBytes: 0, comparedBytes: 0 };
  readonly #a: StateCursor;
  readonly #b: StateCursor;
  readonly #granularityBytes: number;
  readonly #job: Job | undefined;
  readonly #bufferA = allocateIoBuffer(DIFF_CHUNK_BYTES);
  readonly #bufferB = allocateIoBuffer(DIFF_CHUNK_BYTES);
  #pending: DiffRange | null = null;
  #position = 0;

  constructor(a: BlockDevice | null, b: BlockDevice | null, options: StateComparerOptions = {}) {
    this.#a = new StateCursor(a);
    this.#b = new StateCursor(b);
    this.#granularityBytes = options.granularityBytes ?? DIFF_GRANULARITY_DEFAULT_BYTES;
    assert(Number.isSafeInteger(this.#granularityBytes) && this.#granularityBytes > 0 && DIFF_CHUNK_BYTES % this.#granularityBytes === 0, "granule divides the chunk");
    this.#job = options.job;
  }

  /** Compare [start, end) (start not before the end of the previous call); differing ranges go to `sink`. */
  async compare(start: number, end: number, sink: (range: DiffRange) => void | Promise<void>): Promise<void> {
    assert(start >= this.#position, `comparer moves forward (${start} < ${this.#position})`);
    let offset = start;
    while (offset < end) {
      this.#job?.checkpoint();
      const statusA = await this.#a.at(offset);
      const statusB = await this.#b.at(offset);
      let chunk = Math.min(statusA.start + statusA.length, statusB.start + statusB.length, end) - offset;
      if (statusA.zero && statusB.zero) {
        this.stats.metadataEqualBytes += chunk;
      } else if (this.#sameHostData(statusA, statusB)) {
        this.stats.metadataEqualBytes += chunk;
      } else {
        chunk = Math.min(chunk, DIFF_CHUNK_BYTES);
        await this.#compareData(offset, chunk, statusA, statusB, sink);
      }
      offset += chunk;
      this.#job?.advance(chunk);
    }
    this.#position = end;
  }

  /** Emit the last pending range. Call once after the last compare. */
  async finish(sink: (range: DiffRange) => void | Promise<void>): Promise<void> {
    const pending = this.#pending;
    this.#pending = null;
    if (pending !== null) await sink(pending);
  }

  #sameHostData(a: MapExtent, b: MapExtent): boolean {
    if (!a.data || !b.data || a.offset === undefined || b.offset === undefined || a.offset !== b.offset) return false;
    const key = this.#a.keyOf(a);
    return key !== null && key === this.#b.keyOf(b);
  }

  async #compareData(offset: number, length: number, statusA: MapExtent, statusB: MapExtent, sink: (range: DiffRange) => void | Promise<void>): Promise<void> {
    const bufferA = statusA.zero ? ZEROES.subarray(0, length) : Buffer.from(this.#bufferA.buffer, 0, length);
    const bufferB = statusB.zero ? ZEROES.subarray(0, length) : Buffer.from(this.#bufferB.buffer, 0, length);
    const reads: Promise<void>[] = [];
    if (!statusA.zero) reads.push(this.#a.read(offset, bufferA));
    if (!statusB.zero) reads.push(this.#b.read(offset, bufferB));
    await Promise.all(reads);
    this.stats.comparedBytes += length;
    if (bufferA.equals(bufferB)) return;
    const granule = this.#granularityBytes;
    let runStart = -1;
    let at = 0;
    while (at < length) {
      const next = Math.min(length, (Math.floor((offset + at) / granule) + 1) * granule - offset);
      // The first bytes decide most differing granules without a call into C++ (4096 per chunk of 512-byte granules).
      const differs = bufferA[at] !== bufferB[at] || bufferA.compare(bufferB, at, next, at, next) !== 0;
      if (differs && runStart < 0) runStart = at;
      if (!differs && runStart >= 0) {
        await this.#emit(clip(statusB, offset + runStart, at - runStart), sink);
        runStart = -1;
      }
      at = next;
    }
    if (runStart >= 0) await this.#emit(clip(statusB, offset + runStart, length - runStart), sink);
  }

  async #emit(range: DiffRange, sink: (range: DiffRange) => void | Promise<void>): Promise<void> {
    this.stats.differingBytes += range.length;
    const pending = this.#pending;
    if (pending !== null && mergeable(pending, range)) {
      pending.length += range.length;
      return;
    }
    this.#pending = range;
    this.stats.ranges++;
    if (pending !== null) await sink(pending);
  }
}

/** Every range where `a` and `b` differ over [0, max size), merged, in guest order. */
export async function diffStates(
  a: BlockDevice | null,
  b: BlockDevice | null,
  sink: (range: DiffRange) => void | Promise<void>,
  options: StateComparerOptions = {},
): Promise<DiffStats> {
  const comparer = new StateComparer(a, b, options);
  const end = Math.max(a?.sizeBytes ?? 0, b?.sizeBytes ?? 0);
  options.job?.setTotal(end, "compare");
  await comparer.compare(0, end, sink);
  await comparer.finish(sink);
  return comparer.stats;
}
