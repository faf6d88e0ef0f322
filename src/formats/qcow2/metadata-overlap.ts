/**
 * OverlapGuard: before a write lands, check it does not hit live metadata
 * (QEMU's qcow2_pre_write_overlap_check in its default "cached" mode).
 *
 * Design notes
 * - Structures guarded, as QEMU's cached mode: the header (cluster 0), the
 *   active L1 table, the active L2 tables, the refcount table, the refcount
 *   blocks, the snapshot table and the snapshots' (inactive) L1 tables.
 *   Inactive L2 tables are not (QEMU's "all" mode reads them from disk).
 * - Fixed ranges (header, active L1, refcount table, snapshot table) are
 *   compared directly with the header fields. One-cluster structures (L2
 *   tables, refcount blocks, inactive L1 clusters) live in a map from host
 *   cluster index to structure, built from the in-memory L1, refcount table
 *   and snapshot list.
 * - Keeping the map current: it is rebuilt when the L1 array, the refcount
 *   table array or the snapshot list is replaced; the allocator `note`s the
 *   L2 tables and refcount blocks it places, and code that rewrites the
 *   active L1 in place (snapshot apply) calls `invalidate`. Nothing is
 *   compared per write: a data write costs a few range tests and one map
 *   lookup per cluster, whatever the size of the L1.
 * - A hit is confirmed against a freshly rebuilt map before it counts, so a
 *   stale entry (a table freed and its cluster reused for data) can never
 *   mark a healthy image corrupt. A missed note only makes a check miss.
 * - Writes more than a cluster past the end of the file that no allocation
 *   accounts for (a pointer past EOF, which QEMU's check calls corruption)
 *   are refused too: a hostile entry must not grow the file to 2^50 bytes.
 */
import { SnapstackError } from "../../base/errors.ts";
import type { Qcow2Header } from "./header.ts";
import { L1_ENTRY_BYTES, getL1EntryOffset } from "./entries.ts";
import { snapshotTableBytes, type Qcow2Snapshot } from "./snapshot-table.ts";

/** The structures, named as QEMU's messages name them (metadata_ol_names). */
export type MetadataStructure =
  | "qcow2_header"
  | "active L1 table"
  | "active L2 table"
  | "refcount table"
  | "refcount block"
  | "snapshot table"
  | "inactive L1 table";

/** What the guard reads; Qcow2Metadata provides it. */
export interface OverlapSource {
  readonly header: Qcow2Header;
  readonly clusterSizeBytes: number;
  readonly l1: Uint8Array;
  readonly reftable: readonly number[];
}

export class OverlapGuard {
  readonly #source: OverlapSource;
  /** The snapshot list of the image (set by Qcow2Image). */
  snapshots: () => readonly Qcow2Snapshot[] = () => [];
  #clusters: Map<number, MetadataStructure> | null = null;
  #builtL1: Uint8Array | null = null;
  #builtReftable: readonly number[] | null = null;
  #builtReftableLength = 0;
  #builtSnapshots: readonly Qcow2Snapshot[] | null = null;
  #builtSnapshotCount = 0;
  #snapshotTableBytes = 0;
  /** End of the file as far as the image knows it (size at open, raised by every allocation). */
  #fileEndBytes = Number.MAX_SAFE_INTEGER;
  #fileEndKnown = false;

  constructor(source: OverlapSource) {
    this.#source = source;
  }

  /** Forget the map (it is rebuilt at the next check). */
  invalidate(): void {
    this.#clusters = null;
  }

  /**
   * The file reaches at least `endBytes` (its size at open, or the end of
   * clusters just allocated). Writes more than a cluster past the highest
   * such end target clusters nothing allocated: a reference past EOF.
   */
  noteFileEnd(endBytes: number): void {
    if (!this.#fileEndKnown) {
      this.#fileEndKnown = true;
      this.#fileEndBytes = endBytes;
    } else if (endBytes > this.#fileEndBytes) this.#fileEndBytes = endBytes;
  }

  /** A one-cluster structure was placed at hostOffset. */
  note(hostOffset: number, structure: MetadataStructure): void {
    this.#clusters?.set(Math.floor(hostOffset / this.#source.clusterSizeBytes), structure);
  }

  /**
   * Throw E_CORRUPT_IMAGE ("Preventing invalid write on metadata") when
   * [hostOffset, hostOffset + lengthBytes) overlaps live metadata other than
   * `writing` (the structure being written, which may overlap itself).
   */
  check(hostOffset: number, lengthBytes: number, writing: MetadataStructure | null): void {
    if (lengthBytes <= 0) return;
    const cs = this.#source.clusterSizeBytes;
    if (hostOffset + lengthBytes > this.#fileEndBytes + cs) {
      // QEMU's check calls a reference a cluster or more past EOF corruption; writing there
      // would also grow the file to wherever a hostile pointer says (2^50 bytes...).
      throw new SnapstackError(
        "E_CORRUPT_IMAGE",
        `Preventing invalid write beyond the end of the image file: host offset 0x${hostOffset.toString(16)}, ${lengthBytes} bytes, the file ends at 0x${this.#fileEndBytes.toString(16)}`,
        { hostOffset, lengthBytes, structure: writing ?? "guest data", fileEndBytes: this.#fileEndBytes },
      );
    }
    this.#refreshIfChanged();
    if (this.#find(hostOffset, lengthBytes, writing) === null) return;
    this.#rebuild();
    const hit = this.#find(hostOffset, lengthBytes, writing);
    if (hit === null) return;
    throw new SnapstackError(
      "E_CORRUPT_IMAGE",
      `Preventing invalid write on metadata (overlaps with ${hit.structure}): host offset 0x${hostOffset.toString(16)}, ${lengthBytes} bytes, ${hit.structure} at 0x${hit.hostOffset.toString(16)}`,
      { hostOffset, lengthBytes, structure: hit.structure, structureOffset: hit.hostOffset },
    );
  }

  #find(hostOffset: number, lengthBytes: number, writing: MetadataStructure | null): { structure: MetadataStructure; hostOffset: number } | null {
    const cs = this.#source.clusterSizeBytes;
    const header = this.#source.header;
    const end = hostOffset + lengthBytes;
    const ranges: [MetadataStructure, number, number][] = [
      ["qcow2_header", 0, cs],
      ["active L1 table", header.l1TableOffset, header.l1Size * L1_ENTRY_BYTES],
      ["refcount table", header.refcountTableOffset, header.refcountTableClusters * cs],
      ["snapshot table", header.snapshotsOffset, header.snapshotCount > 0 ? this.#snapshotTableBytes : 0],
    ];
    for (const [structure, start, length] of ranges) {
      if (structure === writing || length <= 0) continue;
      // Whole clusters, as QEMU compares.
      const first = Math.floor(start / cs) * cs;
      const last = Math.ceil((start + length) / cs) * cs;
      if (hostOffset < last && end > first) return { structure, hostOffset: start };
    }
    const clusters = this.#clusters;
    if (clusters === null || clusters.size === 0) return null;
    for (let c = Math.floor(hostOffset / cs); c < Math.ceil(end / cs); c++) {
      const structure = clusters.get(c);
      if (structure !== undefined && structure !== writing) return { structure, hostOffset: c * cs };
    }
    return null;
  }

  #refreshIfChanged(): void {
    const source = this.#source;
    const snapshots = this.snapshots();
    const stale =
      this.#clusters === null ||
      this.#builtReftable !== source.reftable ||
      this.#builtReftableLength !== source.reftable.length ||
      this.#builtSnapshots !== snapshots ||
      this.#builtSnapshotCount !== snapshots.length ||
      this.#builtL1 !== source.l1;
    if (stale) this.#rebuild();
  }

  #rebuild(): void {
    const source = this.#source;
    const cs = source.clusterSizeBytes;
    const clusters = new Map<number, MetadataStructure>();
    const l1View = new DataView(source.l1.buffer, source.l1.byteOffset, source.l1.byteLength);
    const l1Entries = Math.min(source.header.l1Size, Math.floor(source.l1.length / L1_ENTRY_BYTES));
    for (let i = 0; i < l1Entries; i++) {
      const l2Offset = getL1EntryOffset(l1View, i);
      if (l2Offset !== 0) clusters.set(Math.floor(l2Offset / cs), "active L2 table");
    }
    for (const blockOffset of source.reftable) {
      if (blockOffset !== 0) clusters.set(Math.floor(blockOffset / cs), "refcount block");
    }
    const snapshots = this.snapshots();
    for (const snapshot of snapshots) {
      const lengthBytes = snapshot.l1Size * L1_ENTRY_BYTES;
      for (let c = Math.floor(snapshot.l1TableOffset / cs); c < Math.ceil((snapshot.l1TableOffset + lengthBytes) / cs); c++) {
        clusters.set(c, "inactive L1 table");
      }
    }
    this.#snapshotTableBytes = snapshotTableBytes(snapshots);
    this.#clusters = clusters;
    this.#builtL1 = source.l1;
    this.#builtReftable = source.reftable;
    this.#builtReftableLength = source.reftable.length;
    this.#builtSnapshots = snapshots;
    this.#builtSnapshotCount = snapshots.length;
  }
}
