/**
 * qcow2 header and header extensions: pure codecs, no I/O.
 *
 * Layout (docs/interop/qcow2.txt "Header"; reference §1-3): a fixed header
 * (72 bytes for v2, header_length >= 104 for v3; QEMU writes 112), then
 * header extensions `u32 magic, u32 len, data, pad to 8` ended by magic 0,
 * then (QEMU's layout) the backing file name. Everything lives in cluster 0.
 *
 * decodeQcow2Header validates what QEMU's qcow2_do_open validates about the
 * header itself (magic, version, cluster bits, header length, feature bits,
 * extension bounds, backing name bounds) and returns a Qcow2Header with
 * plain-number offsets. Checks that need the file size (tables pointing past
 * the end, L1 too small, ...) are done by the image opener.
 *
 * encodeQcow2Header lays out cluster 0 exactly as QEMU 7.2's
 * qcow2_update_header does: fixed header (112 bytes for v3 plus any unknown
 * header bytes that were read, 72 for v2), extensions in QEMU's order
 * (backing format, data file, crypto, feature table for v3 with clusters
 * larger than 4 KiB, bitmaps, unknown extensions), end marker, backing name.
 */
import { SnapstackError } from "../../base/errors.ts";

export const QCOW2_MAGIC = 0x514649fb;

/** Bytes of the fixed header QEMU reads for v2 and writes for v2. */
export const QCOW2_V2_HEADER_BYTES = 72;
/** Minimal header_length of a v3 header (without compression_type). */
export const QCOW2_V3_HEADER_MIN_BYTES = 104;
/** header_length QEMU writes for v3 (compression type + 7 bytes padding). */
export const QCOW2_V3_HEADER_BYTES = 112;

/** cluster_bits limits: 512 B .. 2 MiB (QEMU MIN_CLUSTER_BITS / MAX_CLUSTER_BITS). */
export const CLUSTER_BITS_MIN = 9;
export const CLUSTER_BITS_MAX = 21;
/** refcount_order <= 6: refcounts up to 64 bits. */
export const REFCOUNT_ORDER_MAX = 6;
/** Backing file names longer than this are refused (QEMU: 1023 + NUL). */
export const BACKING_FILE_NAME_BYTES_MAX = 1023;
/** The backing format extension must fit QEMU's char[16] with NUL. */
export const BACKING_FORMAT_BYTES_MAX = 15;

// Incompatible feature bits (offset 72).
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN_MASK = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
// Compatible feature bits (offset 80).
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const COMPAT_KNOWN_MASK = COMPAT_LAZY_REFCOUNTS;
// Autoclear feature bits (offset 88).
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
export const AUTOCLEAR_KNOWN_MASK = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

export const CRYPT_NONE = 0;
export const CRYPT_AES = 1;
export const CRYPT_LUKS = 2;

export const COMPRESSION_TYPE_ZLIB = 0;
export const COMPRESSION_TYPE_ZSTD = 1;

// Header extension magics.
export const EXT_MAGIC_END = 0x00000000;
export const EXT_MAGIC_BACKING_FORMAT = 0xe2792aca;
export const EXT_MAGIC_FEATURE_TABLE = 0x6803f857;
export const EXT_MAGIC_BITMAPS = 0x23852875;
export const EXT_MAGIC_CRYPTO = 0x0537be77;
export const EXT_MAGIC_DATA_FILE = 0x44415441;

/** One entry of the feature name table extension. */
export interface FeatureName {
  /** 0 incompatible, 1 compatible, 2 autoclear. */
  type: number;
  bit: number;
  name: string;
}

export const FEATURE_NAME_ENTRY_BYTES = 48;
const FEATURE_NAME_BYTES = 46;

/** The feature table QEMU 7.2 always writes (8 entries, 384 bytes). */
export const QEMU_FEATURE_TABLE: readonly FeatureName[] = [
  { type: 0, bit: 0, name: "dirty bit" },
  { type: 0, bit: 1, name: "corrupt bit" },
  { type: 0, bit: 2, name: "external data file" },
  { type: 0, bit: 3, name: "compression type" },
  { type: 0, bit: 4, name: "extended L2 entries" },
  { type: 1, bit: 0, name: "lazy refcounts" },
  { type: 2, bit: 0, name: "bitmaps" },
  { type: 2, bit: 1, name: "raw external data" },
];

export interface BitmapsExtension {
  bitmapCount: number;
  directorySizeBytes: number;
  directoryOffset: number;
}

export interface CryptoExtension {
  hostOffset: number;
  lengthBytes: number;
}

export interface UnknownExtension {
  magic: number;
  data: Uint8Array;
}

export interface Qcow2HeaderExtensions {
  /** Feature name table as read (QEMU rewrites its own, see QEMU_FEATURE_TABLE). */
  featureNames: FeatureName[] | null;
  bitmaps: BitmapsExtension | null;
  crypto: CryptoExtension | null;
  /** External data file name ("DATA" extension). */
  dataFileName: string | null;
  /** Extensions this code does not know, kept and written back. */
  unknown: UnknownExtension[];
}

export interface Qcow2Header {
  version: 2 | 3;
  /** Host offset of the backing file name in cluster 0, 0 = none. */
  backingFileOffset: number;
  backingFileSizeBytes: number;
  clusterBits: number;
  /** Virtual size in bytes. */
  sizeBytes: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  snapshotCount: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLengthBytes: number;
  compressionType: number;
  /** Header bytes beyond the 112 known ones (v3 with header_length > 112), kept on rewrite. */
  unknownHeaderBytes: Uint8Array;
  extensions: Qcow2HeaderExtensions;
  backingFileName: string | null;
  backingFormat: string | null;
}

/** The guest size a header gives: its size field rounded down to whole 512-byte sectors, as QEMU reads it. */
export function guestSizeOf(header: Pick<Qcow2Header, "sizeBytes">): number {
  return Math.floor(header.sizeBytes / 512) * 512;
}

function badHeader(message: string, details: Record<string, unknown> = {}): SnapstackError {
  return new SnapstackError("E_BAD_HEADER", message, details);
}

/** A u64 field as a plain number; offsets beyond 2^53 are refused. */
function readU64Number(view: DataView, at: number, field: string): number {
  const value = view.getBigUint64(at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new SnapstackError("E_TOO_LARGE", `qcow2 header field ${field} = ${value} is too large`, { field });
  }
  return Number(value);
}

const textDecoder = new TextDecoder("utf-8");
const textEncoder = new TextEncoder();

function decodeString(bytes: Uint8Array): string {
  return textDecoder.decode(bytes);
}

function decodeNulPadded(bytes: Uint8Array): string {
  const end = bytes.indexOf(0);
  return decodeString(end < 0 ? bytes : bytes.subarray(0, end));
}

export function decodeFeatureNameTable(data: Uint8Array): FeatureName[] {
  const out: FeatureName[] = [];
  for (let at = 0; at + FEATURE_NAME_ENTRY_BYTES <= data.length; at += FEATURE_NAME_ENTRY_BYTES) {
    out.push({ type: data[at], bit: data[at + 1], name: decodeNulPadded(data.subarray(at + 2, at + FEATURE_NAME_ENTRY_BYTES)) });
  }
  return out;
}

export function encodeFeatureNameTable(features: readonly FeatureName[]): Uint8Array {
  const out = new Uint8Array(features.length * FEATURE_NAME_ENTRY_BYTES);
  features.forEach((feature, i) => {
    const at = i * FEATURE_NAME_ENTRY_BYTES;
    out[at] = feature.type;
    out[at + 1] = feature.bit;
    out.set(textEncoder.encode(feature.name).subarray(0, FEATURE_NAME_BYTES), at + 2);
  });
  return out;
}

/** Names of the set bits of `mask` using the image's feature table, as QEMU's report_unsupported_feature. */
function describeUnknownIncompatible(mask: bigint, table: FeatureName[] | null): string {
  const parts: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if (!(mask & (1n << BigInt(bit)))) continue;
    const named = table?.find((f) => f.type === 0 && f.bit === bit);
    parts.push(named ? named.name : `Unknown incompatible feature: ${(1n << BigInt(bit)).toString(16)}`);
  }
  return parts.join(", ");
}

/**
 * The size of the fixed header and cluster size are needed to know how many
 * bytes decodeQcow2Header wants: read this many first, then the cluster.
 */
export const QCOW2_HEADER_PROBE_BYTES = QCOW2_V3_HEADER_MIN_BYTES;

/** cluster_bits from the first bytes of an image (after checking magic), to know how much of cluster 0 to read. */
export function decodeQcow2ClusterBits(bytes: Uint8Array): number {
  if (bytes.length < QCOW2_V2_HEADER_BYTES) throw badHeader("qcow2 header is truncated");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(0) !== QCOW2_MAGIC) throw new SnapstackError("E_WRONG_FORMAT", "Image is not in qcow2 format");
  // The version first, as qcow2_do_open checks it (a qcow version 1 file has no cluster_bits field there).
  const version = view.getUint32(4);
  if (version !== 2 && version !== 3) throw new SnapstackError("E_UNSUPPORTED_FEATURE", `Unsupported qcow2 version ${version}`, { version });
  const clusterBits = view.getUint32(20);
  if (clusterBits < CLUSTER_BITS_MIN || clusterBits > CLUSTER_BITS_MAX) {
    throw badHeader(`Unsupported cluster size: 2^${clusterBits}`, { clusterBits });
  }
  return clusterBits;
}

/**
 * Decode cluster 0 (or as much of it as the file has). `bytes` should hold
 * the whole first cluster; shorter input is treated as zero-padded.
 */
export function decodeQcow2Header(bytes: Uint8Array): Qcow2Header {
  const clusterBits = decodeQcow2ClusterBits(bytes);
  const clusterSizeBytes = 2 ** clusterBits;
  let cluster = bytes;
  if (cluster.length < clusterSizeBytes) {
    cluster = new Uint8Array(clusterSizeBytes);
    cluster.set(bytes);
  }
  const view = new DataView(cluster.buffer, cluster.byteOffset, clusterSizeBytes);
  const version = view.getUint32(4) as 2 | 3; // checked by decodeQcow2ClusterBits
  const header: Qcow2Header = {
    version,
    backingFileOffset: readU64Number(view, 8, "backing_file_offset"),
    backingFileSizeBytes: view.getUint32(16),
    clusterBits,
    sizeBytes: readU64Number(view, 24, "size"),
    cryptMethod: view.getUint32(32),
    l1Size: view.getUint32(36),
    l1TableOffset: readU64Number(view, 40, "l1_table_offset"),
    refcountTableOffset: readU64Number(view, 48, "refcount_table_offset"),
    refcountTableClusters: view.getUint32(56),
    snapshotCount: view.getUint32(60),
    snapshotsOffset: readU64Number(view, 64, "snapshots_offset"),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLengthBytes: QCOW2_V2_HEADER_BYTES,
    compressionType: COMPRESSION_TYPE_ZLIB,
    unknownHeaderBytes: new Uint8Array(0),
    extensions: { featureNames: null, bitmaps: null, crypto: null, dataFileName: null, unknown: [] },
    backingFileName: null,
    backingFormat: null,
  };
  if (version === 3) {
    if (bytes.length < QCOW2_V3_HEADER_MIN_BYTES) throw badHeader("qcow2 header is truncated");
    header.incompatibleFeatures = view.getBigUint64(72);
    header.compatibleFeatures = view.getBigUint64(80);
    header.autoclearFeatures = view.getBigUint64(88);
    header.refcountOrder = view.getUint32(96);
    header.headerLengthBytes = view.getUint32(100);
    if (header.headerLengthBytes < QCOW2_V3_HEADER_MIN_BYTES) throw badHeader("qcow2 header too short");
    if (header.headerLengthBytes > clusterSizeBytes) throw badHeader("qcow2 header exceeds cluster size");
    if (header.headerLengthBytes > QCOW2_V3_HEADER_MIN_BYTES) header.compressionType = cluster[104];
    if (header.headerLengthBytes > QCOW2_V3_HEADER_BYTES) {
      header.unknownHeaderBytes = cluster.slice(QCOW2_V3_HEADER_BYTES, header.headerLengthBytes);
    }
  }
  if (header.backingFileOffset > clusterSizeBytes) throw badHeader("Invalid backing file offset");

  decodeExtensions(cluster, header, clusterSizeBytes);

  // Feature checks, in QEMU's order (qcow2_do_open).
  const unknownIncompat = header.incompatibleFeatures & ~INCOMPAT_KNOWN_MASK;
  if (unknownIncompat) {
    throw new SnapstackError(
      "E_UNSUPPORTED_FEATURE",
      `Unsupported qcow2 feature(s): ${describeUnknownIncompatible(unknownIncompat, header.extensions.featureNames)}`,
      { incompatibleFeatures: `0x${unknownIncompat.toString(16)}` },
    );
  }
  if (header.refcountOrder > REFCOUNT_ORDER_MAX) {
    throw badHeader("Reference count entry width too large; may not exceed 64 bits", { refcountOrder: header.refcountOrder });
  }
  const compressionBit = (header.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n;
  if (header.compressionType !== COMPRESSION_TYPE_ZLIB && header.compressionType !== COMPRESSION_TYPE_ZSTD) {
    throw new SnapstackError("E_UNSUPPORTED_FEATURE", `qcow2: unknown compression type: ${header.compressionType}`);
  }
  if (header.compressionType === COMPRESSION_TYPE_ZLIB && compressionBit) {
    throw badHeader("Compression type incompatible feature bit must not be set");
  }
  if (header.compressionType !== COMPRESSION_TYPE_ZLIB && !compressionBit) {
    throw badHeader("Compression type incompatible feature bit must be set");
  }
  if (header.incompatibleFeatures & INCOMPAT_EXTL2 && clusterBits - 5 < CLUSTER_BITS_MIN) {
    throw badHeader(`The cluster size is too small for extended L2 entries (subcluster of ${2 ** (clusterBits - 5)} bytes)`);
  }
  if (header.cryptMethod > CRYPT_LUKS) {
    throw badHeader(`Unsupported encryption method: ${header.cryptMethod}`);
  }
  if (header.backingFileOffset !== 0) {
    if (header.backingFileSizeBytes > BACKING_FILE_NAME_BYTES_MAX || header.backingFileSizeBytes > clusterSizeBytes - header.backingFileOffset) {
      throw badHeader("Backing file name too long");
    }
    // Read as QEMU does, as a C string: a NUL ends the name, and an empty name is no backing file.
    const name = decodeNulPadded(cluster.subarray(header.backingFileOffset, header.backingFileOffset + header.backingFileSizeBytes));
    if (name !== "") header.backingFileName = name;
  }
  return header;
}

/**
 * The refusal of an image whose autoclear bit data-file-raw is set without an
 * external data file, or null. qcow2_do_open refuses such an image when it
 * opens it for I/O (Debian's 7.2 still shows it with `info`, an open
 * without I/O); snapstack would otherwise clear the bit at the first write,
 * as it clears autoclear bits it does not keep.
 */
export function dataFileRawRefusal(header: Qcow2Header, where: string): SnapstackError | null {
  if ((header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) === 0n || (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n) return null;
  return new SnapstackError("E_BAD_HEADER", `${where}: data-file-raw requires a data file`);
}

function decodeExtensions(cluster: Uint8Array, header: Qcow2Header, clusterSizeBytes: number): void {
  const view = new DataView(cluster.buffer, cluster.byteOffset, clusterSizeBytes);
  const endOffset = header.backingFileOffset !== 0 ? header.backingFileOffset : clusterSizeBytes;
  const seen = new Set<number>();
  let at = header.headerLengthBytes;
  while (at < endOffset) {
    if (at + 8 > endOffset) throw badHeader("Header extension too large");
    const magic = view.getUint32(at);
    const lengthBytes = view.getUint32(at + 4);
    at += 8;
    if (lengthBytes > endOffset - at) throw badHeader("Header extension too large", { magic: `0x${magic.toString(16)}` });
    if (magic === EXT_MAGIC_END) return;
    const data = cluster.subarray(at, at + lengthBytes);
    if (seen.has(magic) && magic !== EXT_MAGIC_END) {
      throw badHeader(`Header extension 0x${magic.toString(16)} appears twice`);
    }
    seen.add(magic);
    const dataView = new DataView(data.buffer, data.byteOffset, data.byteLength);
    switch (magic) {
      case EXT_MAGIC_BACKING_FORMAT:
        if (lengthBytes > BACKING_FORMAT_BYTES_MAX) {
          throw badHeader(`ERROR: ext_backing_format: len=${lengthBytes} too large (>=16)`);
        }
        header.backingFormat = decodeString(data);
        break;
      case EXT_MAGIC_FEATURE_TABLE:
        header.extensions.featureNames = decodeFeatureNameTable(data);
        break;
      case EXT_MAGIC_BITMAPS:
        if (lengthBytes !== 24) throw badHeader("bitmaps_ext: Invalid extension length");
        header.extensions.bitmaps = {
          bitmapCount: dataView.getUint32(0),
          directorySizeBytes: readU64Number(dataView, 8, "bitmap directory size"),
          directoryOffset: readU64Number(dataView, 16, "bitmap directory offset"),
        };
        break;
      case EXT_MAGIC_CRYPTO:
        if (lengthBytes !== 16) throw badHeader(`Unable to read CRYPTO header extension`);
        header.extensions.crypto = {
          hostOffset: readU64Number(dataView, 0, "crypto header offset"),
          lengthBytes: readU64Number(dataView, 8, "crypto header length"),
        };
        break;
      case EXT_MAGIC_DATA_FILE:
        header.extensions.dataFileName = decodeString(data);
        break;
      default:
        header.extensions.unknown.push({ magic, data: data.slice() });
        break;
    }
    at += (lengthBytes + 7) & ~7;
  }
}

function pushExtension(parts: Uint8Array[], magic: number, data: Uint8Array): void {
  const padded = new Uint8Array(8 + ((data.length + 7) & ~7));
  const view = new DataView(padded.buffer);
  view.setUint32(0, magic);
  view.setUint32(4, data.length);
  padded.set(data, 8);
  parts.push(padded);
}

/** Whether QEMU 7.2 writes the feature name table for this image. */
export function writesFeatureTable(version: number, clusterBits: number): boolean {
  return version >= 3 && clusterBits > 12;
}

/**
 * Encode cluster 0 as QEMU's qcow2_update_header writes it. Returns a buffer
 * of exactly one cluster; headerLengthBytes, backingFileOffset and
 * backingFileSizeBytes are computed (the values in `header` are ignored).
 */
/** `featureTable: false` leaves out the feature name table (optional, informational): a header that fits in fewer bytes. */
export function encodeQcow2Header(header: Qcow2Header, options: { featureTable?: boolean } = {}): Uint8Array {
  const clusterSizeBytes = 2 ** header.clusterBits;
  const out = new Uint8Array(clusterSizeBytes);
  const view = new DataView(out.buffer);
  const isV3 = header.version === 3;
  const headerLengthBytes = isV3 ? QCOW2_V3_HEADER_BYTES + header.unknownHeaderBytes.length : QCOW2_V2_HEADER_BYTES;

  const parts: Uint8Array[] = [];
  if (header.backingFormat !== null && header.backingFileName !== null) {
    pushExtension(parts, EXT_MAGIC_BACKING_FORMAT, textEncoder.encode(header.backingFormat));
  }
  if (header.extensions.dataFileName !== null) {
    pushExtension(parts, EXT_MAGIC_DATA_FILE, textEncoder.encode(header.extensions.dataFileName));
  }
  if (header.extensions.crypto !== null) {
    const data = new Uint8Array(16);
    const dv = new DataView(data.buffer);
    dv.setBigUint64(0, BigInt(header.extensions.crypto.hostOffset));
    dv.setBigUint64(8, BigInt(header.extensions.crypto.lengthBytes));
    pushExtension(parts, EXT_MAGIC_CRYPTO, data);
  }
  if (options.featureTable !== false && writesFeatureTable(header.version, header.clusterBits)) {
    pushExtension(parts, EXT_MAGIC_FEATURE_TABLE, encodeFeatureNameTable(QEMU_FEATURE_TABLE));
  }
  if (header.extensions.bitmaps !== null) {
    const data = new Uint8Array(24);
    const dv = new DataView(data.buffer);
    dv.setUint32(0, header.extensions.bitmaps.bitmapCount);
    dv.setBigUint64(8, BigInt(header.extensions.bitmaps.directorySizeBytes));
    dv.setBigUint64(16, BigInt(header.extensions.bitmaps.directoryOffset));
    pushExtension(parts, EXT_MAGIC_BITMAPS, data);
  }
  for (const ext of header.extensions.unknown) pushExtension(parts, ext.magic, ext.data);
  pushExtension(parts, EXT_MAGIC_END, new Uint8Array(0));

  let at = headerLengthBytes;
  for (const part of parts) {
    if (at + part.length > clusterSizeBytes) {
      throw new SnapstackError("E_TOO_LARGE", "qcow2 header extensions do not fit in the first cluster");
    }
    out.set(part, at);
    at += part.length;
  }
  let backingFileOffset = 0;
  let backingFileSizeBytes = 0;
  if (header.backingFileName !== null) {
    const name = textEncoder.encode(header.backingFileName);
    if (name.length > BACKING_FILE_NAME_BYTES_MAX || at + name.length > clusterSizeBytes) {
      throw new SnapstackError("E_TOO_LARGE", `backing file name '${header.backingFileName}' does not fit in the qcow2 header`);
    }
    out.set(name, at);
    backingFileOffset = at;
    backingFileSizeBytes = name.length;
  }

  view.setUint32(0, QCOW2_MAGIC);
  view.setUint32(4, header.version);
  view.setBigUint64(8, BigInt(backingFileOffset));
  view.setUint32(16, backingFileSizeBytes);
  view.setUint32(20, header.clusterBits);
  view.setBigUint64(24, BigInt(header.sizeBytes));
  view.setUint32(32, header.cryptMethod);
  view.setUint32(36, header.l1Size);
  view.setBigUint64(40, BigInt(header.l1TableOffset));
  view.setBigUint64(48, BigInt(header.refcountTableOffset));
  view.setUint32(56, header.refcountTableClusters);
  view.setUint32(60, header.snapshotCount);
  view.setBigUint64(64, BigInt(header.snapshotsOffset));
  if (isV3) {
    view.setBigUint64(72, header.incompatibleFeatures);
    view.setBigUint64(80, header.compatibleFeatures);
    view.setBigUint64(88, header.autoclearFeatures);
    view.setUint32(96, header.refcountOrder);
    view.setUint32(100, headerLengthBytes);
    out[104] = header.compressionType;
    out.set(header.unknownHeaderBytes, QCOW2_V3_HEADER_BYTES);
  }
  return out;
}

/** A fresh header with QEMU's defaults for the fields not given. */
export function newQcow2Header(fields: Partial<Qcow2Header> & Pick<Qcow2Header, "version" | "clusterBits" | "sizeBytes">): Qcow2Header {
  return {
    backingFileOffset: 0,
    backingFileSizeBytes: 0,
    cryptMethod: CRYPT_NONE,
    l1Size: 0,
    l1TableOffset: 0,
    refcountTableOffset: 0,
    refcountTableClusters: 0,
    snapshotCount: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLengthBytes: fields.version === 3 ? QCOW2_V3_HEADER_BYTES : QCOW2_V2_HEADER_BYTES,
    compressionType: COMPRESSION_TYPE_ZLIB,
    unknownHeaderBytes: new Uint8Array(0),
    extensions: { featureNames: null, bitmaps: null, crypto: null, dataFileName: null, unknown: [] },
    backingFileName: null,
    backingFormat: null,
    ...fields,
  };
}
