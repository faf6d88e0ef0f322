/**
 * The internal snapshot table: pure codecs, no I/O (reference §6).
 *
 * The table is `nb_snapshots` variable-length entries, each starting 8-byte
 * aligned relative to the table start: a 40-byte fixed part, extra data
 * (QEMU 7.2 writes 24 bytes: vm_state_size_large, disk_size, icount; unknown
 * bytes beyond are kept), the id string and the name (no NULs). The table
 * size is the end of the last entry's name, not rounded (QEMU's
 * qcow2_write_snapshots).
 */
import { SnapstackError } from "../../base/errors.ts";

/** QCOW_MAX_SNAPSHOTS. */
export const SNAPSHOT_COUNT_MAX = 65536;
/** QCOW_MAX_SNAPSHOTS_SIZE: the whole table. */
export const SNAPSHOT_TABLE_BYTES_MAX = 1024 * SNAPSHOT_COUNT_MAX;
/** QCOW_MAX_SNAPSHOT_EXTRA_DATA per entry. */
export const SNAPSHOT_EXTRA_DATA_BYTES_MAX = 1024;
/** Fixed part of an entry. */
export const SNAPSHOT_HEADER_BYTES = 40;
/** The extra data QEMU 7.2 knows and writes. */
export const SNAPSHOT_KNOWN_EXTRA_BYTES = 24;
/** v3 entries need at least vm_state_size_large and disk_size. */
export const SNAPSHOT_V3_EXTRA_BYTES_MIN = 16;
/** qemu-img truncates names (QEMUSnapshotInfo name[256]) and ids (id_str[128]). */
export const SNAPSHOT_NAME_BYTES_MAX = 255;
export const SNAPSHOT_ID_BYTES_MAX = 127;

export interface Qcow2Snapshot {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSeconds: number;
  dateNanoseconds: number;
  vmClockNanoseconds: number;
  vmStateSizeBytes: number;
  /** Virtual disk size when the snapshot was taken. */
  diskSizeBytes: number;
  /** Instruction count, null when absent (-1 on disk, or extra data shorter than 24). */
  icount: number | null;
  /** extra_data_size as read (0 for new entries). */
  extraDataSizeBytes: number;
  /** Extra data past the 24 known bytes, kept and written back. */
  unknownExtraData: Uint8Array;
}

function roundUp8(value: number): number {
  return (value + 7) & ~7;
}

const textDecoder = new TextDecoder("utf-8");
const textEncoder = new TextEncoder();

function u64Number(view: DataView, at: number): number {
  const value = view.getBigUint64(at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new SnapstackError("E_CORRUPT_IMAGE", `snapshot table field value ${value} is too large`);
  }
  return Number(value);
}

/**
 * Decode `count` entries from `bytes` (the table, starting at snapshots_offset).
 * `imageSizeBytes` is used as disk size for entries without that field, as QEMU does.
 */
export function decodeSnapshotTable(bytes: Uint8Array, count: number, imageSizeBytes: number): { snapshots: Qcow2Snapshot[]; tableBytes: number } {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const snapshots: Qcow2Snapshot[] = [];
  let at = 0;
  const truncated = (): SnapstackError => new SnapstackError("E_CORRUPT_IMAGE", `snapshot table entry ${snapshots.length} is truncated`);
  for (let i = 0; i < count; i++) {
    at = roundUp8(at);
    if (at + SNAPSHOT_HEADER_BYTES > bytes.length) throw truncated();
    const idBytes = view.getUint16(at + 12);
    const nameBytes = view.getUint16(at + 14);
    const vmStateSize32 = view.getUint32(at + 32);
    const extraDataSizeBytes = view.getUint32(at + 36);
    const snapshot: Qcow2Snapshot = {
      l1TableOffset: u64Number(view, at),
      l1Size: view.getUint32(at + 8),
      id: "",
      name: "",
      dateSeconds: view.getUint32(at + 16),
      dateNanoseconds: view.getUint32(at + 20),
      vmClockNanoseconds: u64Number(view, at + 24),
      vmStateSizeBytes: vmStateSize32,
      diskSizeBytes: imageSizeBytes,
      icount: null,
      extraDataSizeBytes,
      unknownExtraData: new Uint8Array(0),
    };
    at += SNAPSHOT_HEADER_BYTES;
    if (at + extraDataSizeBytes + idBytes + nameBytes > bytes.length) throw truncated();
    if (extraDataSizeBytes >= 8) snapshot.vmStateSizeBytes = u64Number(view, at);
    if (extraDataSizeBytes >= 16) snapshot.diskSizeBytes = u64Number(view, at + 8);
    if (extraDataSizeBytes >= 24) {
      const icount = view.getBigInt64(at + 16);
      snapshot.icount = icount < 0n ? null : Number(icount);
    }
    if (extraDataSizeBytes > SNAPSHOT_KNOWN_EXTRA_BYTES) {
      snapshot.unknownExtraData = bytes.slice(at + SNAPSHOT_KNOWN_EXTRA_BYTES, at + extraDataSizeBytes);
    }
    at += extraDataSizeBytes;
    snapshot.id = textDecoder.decode(bytes.subarray(at, at + idBytes));
    at += idBytes;
    snapshot.name = textDecoder.decode(bytes.subarray(at, at + nameBytes));
    at += nameBytes;
    snapshots.push(snapshot);
  }
  return { snapshots, tableBytes: at };
}

function entryBytes(snapshot: Qcow2Snapshot): number {
  const extra = SNAPSHOT_KNOWN_EXTRA_BYTES + snapshot.unknownExtraData.length;
  return SNAPSHOT_HEADER_BYTES + extra + textEncoder.encode(snapshot.id).length + textEncoder.encode(snapshot.name).length;
}

/** Size in bytes of the encoded table (what QEMU allocates for it). */
export function snapshotTableBytes(snapshots: readonly Qcow2Snapshot[]): number {
  let at = 0;
  for (const snapshot of snapshots) at = roundUp8(at) + entryBytes(snapshot);
  return at;
}

/** The fields of an entry from byte 32 on, as QEMU 7.2 writes them. */
export interface SnapshotEntryTail {
  vmStateSize: bigint;
  diskSize: bigint;
  /** -1 when the snapshot has none. */
  icount: bigint;
  unknownExtraData: Uint8Array;
  id: Uint8Array;
  name: Uint8Array;
}

/**
 * Write an entry from byte 32 on (32-bit VM state size, extra data size, the
 * 24 bytes of known extra data, unknown extra data, id, name) at `entryAt`;
 * returns the offset just after the entry.
 */
export function encodeSnapshotEntryTail(out: Uint8Array, entryAt: number, tail: SnapshotEntryTail): number {
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  const extraBytes = SNAPSHOT_KNOWN_EXTRA_BYTES + tail.unknownExtraData.length;
  view.setUint32(entryAt + 32, tail.vmStateSize <= 0xffffffffn ? Number(tail.vmStateSize) : 0);
  view.setUint32(entryAt + 36, extraBytes);
  let at = entryAt + SNAPSHOT_HEADER_BYTES;
  view.setBigUint64(at, tail.vmStateSize);
  view.setBigUint64(at + 8, tail.diskSize);
  view.setBigInt64(at + 16, tail.icount);
  out.set(tail.unknownExtraData, at + SNAPSHOT_KNOWN_EXTRA_BYTES);
  at += extraBytes;
  out.set(tail.id, at);
  at += tail.id.length;
  out.set(tail.name, at);
  return at + tail.name.length;
}

/** Encode as QEMU 7.2 writes it: 24 bytes of known extra data plus any unknown extra data. */
export function encodeSnapshotTable(snapshots: readonly Qcow2Snapshot[]): Uint8Array {
  if (snapshots.length > SNAPSHOT_COUNT_MAX) {
    throw new SnapstackError("E_TOO_LARGE", `too many snapshots (${snapshots.length}, at most ${SNAPSHOT_COUNT_MAX})`);
  }
  const totalBytes = snapshotTableBytes(snapshots);
  if (totalBytes > SNAPSHOT_TABLE_BYTES_MAX) {
    throw new SnapstackError("E_TOO_LARGE", `snapshot table of ${totalBytes} bytes exceeds ${SNAPSHOT_TABLE_BYTES_MAX}`);
  }
  const out = new Uint8Array(totalBytes);
  const view = new DataView(out.buffer);
  let at = 0;
  for (const snapshot of snapshots) {
    at = roundUp8(at);
    const id = textEncoder.encode(snapshot.id);
    const name = textEncoder.encode(snapshot.name);
    if (id.length > 0xffff || name.length > 0xffff) throw new SnapstackError("E_TOO_LARGE", "snapshot id or name too long");
    view.setBigUint64(at, BigInt(snapshot.l1TableOffset));
    view.setUint32(at + 8, snapshot.l1Size);
    view.setUint16(at + 12, id.length);
    view.setUint16(at + 14, name.length);
    view.setUint32(at + 16, snapshot.dateSeconds);
    view.setUint32(at + 20, snapshot.dateNanoseconds);
    view.setBigUint64(at + 24, BigInt(snapshot.vmClockNanoseconds));
    at = encodeSnapshotEntryTail(out, at, {
      vmStateSize: BigInt(snapshot.vmStateSizeBytes),
      diskSize: BigInt(snapshot.diskSizeBytes),
      icount: snapshot.icount === null ? -1n : BigInt(snapshot.icount),
      unknownExtraData: snapshot.unknownExtraData,
      id,
      name,
    });
  }
  return out;
}
