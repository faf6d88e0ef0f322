/**
 * The block-device interface that every format (raw, qcow2) and every filter
 * implements, and the only thing the NBD server and the jobs on chains see.
 *
 * All offsets here are guest offsets: bytes on the virtual disk. Requests may
 * be unaligned and of any length; implementations handle read-modify-write.
 * Callers validate ranges at the edge (CLI, NBD); devices also check and
 * throw E_OUT_OF_RANGE so a bad request never touches the file.
 */

import type { FileRun } from "../io/file.ts";

/** How one layer of a chain holds a guest range (qemu-img map, per layer). */
export type LayerStatusKind =
  /** Not in this layer: the read falls through to the backing device (zeroes if none). */
  | "unallocated"
  /** Holds data in this layer (possibly compressed, then hostOffset is absent). */
  | "data"
  /** Reads as zeroes from this layer; does not fall through. */
  | "zero";

export interface LayerExtent {
  guestOffset: number;
  lengthBytes: number;
  kind: LayerStatusKind;
  /** Offset in this layer's file where the data starts (data, zero with a preallocated host cluster, or an unallocated subcluster of an allocated cluster). */
  hostOffset?: number;
  /** The data is stored compressed (no meaningful host offset). */
  compressed?: boolean;
  /** The file the host offset is in, where it is not the layer's own file (a vmdk extent file). */
  hostFile?: string;
}

export interface WriteZeroesOptions {
  /** Release storage if the format allows (qemu-io write -z -u, NBD without NO_HOLE). */
  unmap?: boolean;
}

export interface BlockDevice {
  /** A human-readable name (usually the file path) for messages. */
  readonly name: string;
  /** Format name as qemu-img reports it: "raw" or "qcow2". */
  readonly format: string;
  /** Virtual disk size in bytes. */
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  /** The device reads fall through to, or null at the bottom of a chain. */
  readonly backing: BlockDevice | null;

  /** Fill `buffer` with the bytes at guestOffset .. guestOffset + buffer.length. */
  read(guestOffset: number, buffer: Uint8Array): Promise<void>;
  write(guestOffset: number, data: Uint8Array): Promise<void>;
  /**
   * Optional: `write` done synchronously (devices whose write is one pwrite,
   * such as a raw file on a local file system); throws what `write` would
   * reject with. Absent when the device cannot write without waiting.
   */
  writeSync?(guestOffset: number, data: Uint8Array): void;
  writeZeroes(guestOffset: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void>;
  /**
   * Optional: whether writeZeroes over the range only updates metadata
   * (NBD's FAST_ZERO may be honoured); absent: never.
   */
  zeroesAreFast?(guestOffset: number, lengthBytes: number): boolean;
  /** Drop the range: afterwards it reads as zeroes or falls through, as the format decides. */
  discard(guestOffset: number, lengthBytes: number): Promise<void>;
  flush(): Promise<void>;
  /**
   * Optional: start making the data written so far durable (an fdatasync
   * of the file, without writing metadata and without holding up other
   * requests), unless one is already running; returns at once, true if it
   * started one. A long copy calls it now and then so that the disk writes
   * back behind it and the flush at its end has little left to do
   * (chain/copy-pipeline.ts). It promises no order: `flush` is still what
   * makes an image durable. `flush` and `close` wait for it, and fail if it
   * failed (io/write-behind.ts).
   */
  writeBehind?(): boolean;
  /**
   * How this layer alone holds the range: contiguous extents covering exactly
   * [guestOffset, guestOffset + lengthBytes), adjacent extents merged when
   * kind, compression and host contiguity agree.
   */
  layerStatus(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]>;
  /**
   * Optional: layerStatus for splitting a read into data and holes (an NBD
   * READ's chunks), cheaper where the layer remembers what it found, and so
   * allowed to lag in one direction only: a range that became a hole through
   * another process may still show as data (its zeroes are read and sent),
   * never data as a hole. Not for map or block status, which must be exact.
   */
  readStatus?(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]>;
  /**
   * Optional: the hole runs in [hostOffset, hostOffset + lengthBytes) of
   * this layer's own file, under data the layer maps there, where QEMU's
   * block status asks the file about such data (BDRV_BLOCK_RECURSE): holes
   * there read as zeroes (map's `"zero": true, "data": true`). Null: QEMU
   * would not ask, or holes cannot be seen; the data is data.
   */
  hostHoles?(hostOffset: number, lengthBytes: number, hostFile?: string): Promise<FileRun[] | null>;
  /** Close this device and, if it owns it, its backing chain. Idempotent. */
  close(): Promise<void>;
}

/** One entry of `qemu-img map --output=json`. */
export interface MapExtent {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  /** The file `offset` is in, where it is not the layer's own (LayerExtent.hostFile); not printed in JSON. */
  file?: string;
}
