/**
 * Byte-level surgery on qcow2 images for corruption and hostile-input
 * tests: locate tables from the raw header and overwrite single entries,
 * without going through the engine (which would refuse to do harm).
 */
import { createQcow2, type Qcow2CreateOptions } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2 } from "../../src/formats/qcow2/qcow2-image.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";

export const COPIED = 1n << 63n;

/** Big-endian field offsets of the qcow2 header (reference §1). */
export const HEADER_FIELDS = {
  magic: { at: 0, bytes: 4 },
  version: { at: 4, bytes: 4 },
  backingFileOffset: { at: 8, bytes: 8 },
  backingFileSize: { at: 16, bytes: 4 },
  clusterBits: { at: 20, bytes: 4 },
  size: { at: 24, bytes: 8 },
  cryptMethod: { at: 32, bytes: 4 },
  l1Size: { at: 36, bytes: 4 },
  l1TableOffset: { at: 40, bytes: 8 },
  refcountTableOffset: { at: 48, bytes: 8 },
  refcountTableClusters: { at: 56, bytes: 4 },
  snapshotCount: { at: 60, bytes: 4 },
  snapshotsOffset: { at: 64, bytes: 8 },
  incompatibleFeatures: { at: 72, bytes: 8 },
  compatibleFeatures: { at: 80, bytes: 8 },
  autoclearFeatures: { at: 88, bytes: 8 },
  refcountOrder: { at: 96, bytes: 4 },
  headerLength: { at: 100, bytes: 4 },
  compressionType: { at: 104, bytes: 1 },
} as const;

export type HeaderField = keyof typeof HEADER_FIELDS;

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

export function getField(bytes: Uint8Array, field: HeaderField): bigint {
  const { at, bytes: width } = HEADER_FIELDS[field];
  const v = view(bytes);
  if (width === 8) return v.getBigUint64(at);
  if (width === 4) return BigInt(v.getUint32(at));
  return BigInt(v.getUint8(at));
}

/** Set a header field (the value is truncated to the field's width). */
export function setField(bytes: Uint8Array, field: HeaderField, value: bigint): void {
  const { at, bytes: width } = HEADER_FIELDS[field];
  const v = view(bytes);
  const masked = BigInt.asUintN(width * 8, value);
  if (width === 8) v.setBigUint64(at, masked);
  else if (width === 4) v.setUint32(at, Number(masked));
  else v.setUint8(at, Number(masked));
}

export function fieldMax(field: HeaderField): bigint {
  return (1n << BigInt(HEADER_FIELDS[field].bytes * 8)) - 1n;
}

export function getU64(bytes: Uint8Array, hostOffset: number): bigint {
  return view(bytes).getBigUint64(hostOffset);
}

export function setU64(bytes: Uint8Array, hostOffset: number, value: bigint): void {
  view(bytes).setBigUint64(hostOffset, BigInt.asUintN(64, value));
}

export interface ImageLayout {
  clusterSizeBytes: number;
  l1TableOffset: number;
  l1Size: number;
  refcountTableOffset: number;
  /** Offsets of the L2 tables the active L1 points to (by L1 index, 0 = none). */
  l2Offsets: number[];
  /** Offsets of the refcount blocks (by reftable index, 0 = none). */
  refblockOffsets: number[];
  snapshotsOffset: number;
  l2EntryBytes: number;
}

/** Where the tables of a (well-formed) image are. */
export function imageLayout(bytes: Uint8Array): ImageLayout {
  const clusterSizeBytes = 2 ** Number(getField(bytes, "clusterBits"));
  const l1TableOffset = Number(getField(bytes, "l1TableOffset"));
  const l1Size = Number(getField(bytes, "l1Size"));
  const refcountTableOffset = Number(getField(bytes, "refcountTableOffset"));
  const reftableClusters = Number(getField(bytes, "refcountTableClusters"));
  const offsetMask = 0x00fffffffffffe00n;
  const l2Offsets: number[] = [];
  for (let i = 0; i < l1Size; i++) l2Offsets.push(Number(getU64(bytes, l1TableOffset + i * 8) & offsetMask));
  const refblockOffsets: number[] = [];
  for (let i = 0; i < (reftableClusters * clusterSizeBytes) / 8; i++) refblockOffsets.push(Number(getU64(bytes, refcountTableOffset + i * 8)));
  const version = Number(getField(bytes, "version"));
  const extendedL2 = version === 3 && (getField(bytes, "incompatibleFeatures") & 16n) !== 0n;
  return {
    clusterSizeBytes,
    l1TableOffset,
    l1Size,
    refcountTableOffset,
    l2Offsets,
    refblockOffsets,
    snapshotsOffset: Number(getField(bytes, "snapshotsOffset")),
    l2EntryBytes: extendedL2 ? 16 : 8,
  };
}

/** Host offset of the L2 entry of a guest cluster (its L2 table must exist). */
export function l2EntryOffset(bytes: Uint8Array, guestCluster: number): number {
  const layout = imageLayout(bytes);
  const perTable = layout.clusterSizeBytes / layout.l2EntryBytes;
  const l2Offset = layout.l2Offsets[Math.floor(guestCluster / perTable)];
  if (!l2Offset) throw new Error(`guest cluster ${guestCluster} has no L2 table`);
  return l2Offset + (guestCluster % perTable) * layout.l2EntryBytes;
}

/** Create an image in memory, write `clusters` guest clusters (byte value = cluster index + 1), close; returns the bytes. */
export async function imageWithData(options: Partial<Qcow2CreateOptions> & { sizeBytes: number }, clusters: number[]): Promise<Uint8Array> {
  const file = new MemoryFile({ name: "surgery.qcow2" });
  await createQcow2(file, options);
  const image = await openQcow2(file, { readOnly: false, backing: null });
  const cs = options.clusterSizeBytes ?? 65536;
  for (const c of clusters) await image.write(c * cs, new Uint8Array(cs).fill((c + 1) & 0xff));
  await image.close();
  return file.contents();
}
