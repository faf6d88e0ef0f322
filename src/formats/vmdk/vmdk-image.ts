/**
 * VMDK images, read-only: VMware's sparse (monolithicSparse,
 * twoGbMaxExtentSparse), stream-optimized (OVA disks) and flat
 * (monolithicFlat, twoGbMaxExtentFlat, vmfs) layouts, as QEMU 7.2's
 * block/vmdk.c reads them: so `convert`, `compare`, `map`, `info` and `dd`
 * take VMware disks as they come.
 *
 * Design notes
 * - The disk is a list of extents, in guest order. A file starting with
 *   "KDMV" is one sparse extent (its embedded descriptor only gives CID and
 *   parentCID; QEMU does not read its createType either); any other file is
 *   a descriptor whose RW extent lines name the extent files, relative to
 *   the descriptor's directory. A sparse extent's size is its header's
 *   capacity (the descriptor line's count is not used, as in QEMU).
 * - Reads go grain by grain: grain directory (in memory) -> grain table
 *   (a small cache of recent tables) -> grain. Unallocated grains read as
 *   zeroes (no parent: images with parentFileNameHint are refused);
 *   compressed grains are inflated whole, and the last one is kept, so
 *   small sequential reads inflate it once.
 * - layerStatus reports what qemu-img map shows: unallocated grains
 *   unallocated, zeroed grains zero, allocated grains data at their host
 *   offset (compressed ones without one), flat extents data at their
 *   offset in their file (each extent's named as its hostFile, so map
 *   neither merges runs of two files nor names the wrong one). For a flat
 *   extent QEMU also asks the file for holes (BDRV_BLOCK_RECURSE):
 *   hostHoles, given that file.
 * - Not opened, with E_UNSUPPORTED_FEATURE: VMDK3 ("COWD") and seSparse
 *   extents, VMDK versions above 3, linked clones (parentFileNameHint),
 *   create types QEMU does not open. Nothing is ever written: the device
 *   is read-only, and the extent files are opened read-only and unlocked
 *   (the descriptor, or the single sparse file, is locked by openImage).
 */
import type * as Zlib from "node:zlib";
import { SnapstackError } from "../../base/errors.ts";
import type { BlockDevice, LayerExtent } from "../../device/block-device.ts";
import type { FileRun, ImageFile } from "../../io/file.ts";
import { checkDeviceRange } from "../raw/raw-image.ts";
import { ReadOnlyImage, type ReadOnlyCheck } from "../read-only-image.ts";
import {
  DESCRIPTOR_BYTES_MAX,
  DESCRIPTOR_CID_BYTES,
  DESCRIPTOR_CREATE_TYPES,
  FOOTER_BYTES,
  GD_ENTRIES_MAX,
  GRAIN_SECTORS_MAX,
  GTES_PER_GT_MAX,
  VMDK3_MAGIC,
  VMDK4_COMPRESSION_DEFLATE,
  VMDK4_FLAG_MARKER,
  VMDK4_FLAG_ZERO_GRAIN,
  VMDK4_MAGIC,
  VMDK_GTE_ZEROED,
  VMDK_SECTOR_BYTES,
  decodeFooter,
  decodeSparseHeader,
  descriptorText,
  grainMarkerPayload,
  parseDescriptor,
  type VmdkSparseHeader,
} from "./vmdk-format.ts";

/** Opens an extent file named in a descriptor (read-only). */
export type VmdkFileOpener = (path: string) => Promise<ImageFile>;

interface ExtentCommon {
  file: ImageFile;
  /** Guest sectors this extent holds, and the first of them. */
  sectors: number;
  startSector: number;
  /** The descriptor's extent type (SPARSE, FLAT, VMFS), null for a sparse file opened directly (QEMU: ""). */
  type: string | null;
}

interface FlatExtent extends ExtentCommon {
  kind: "flat";
  flatStartBytes: number;
}

interface SparseExtent extends ExtentCommon {
  kind: "sparse";
  grainBytes: number;
  gtesPerGt: number;
  /** Grain directory: sector offsets of the grain tables (0: none). */
  gd: Uint32Array;
  compressed: boolean;
  hasMarker: boolean;
  hasZeroGrain: boolean;
}

type Extent = FlatExtent | SparseExtent;

/** Where a guest grain lives: nowhere, zeroed, or at a host offset (compressed or not). */
type GrainLookup = { kind: "unallocated" } | { kind: "zero" } | { kind: "data"; hostOffset: number };

/** Grain tables kept per image (QEMU keeps 16 per extent). */
const GT_CACHE_ENTRIES = 64;

let zlibLoaded: typeof Zlib | null = null;
function zlibModule(): typeof Zlib {
  zlibLoaded ??= process.getBuiltinModule("node:zlib");
  return zlibLoaded;
}

function corrupt(message: string, path: string): SnapstackError {
  return new SnapstackError("E_CORRUPT_IMAGE", `${path}: ${message}`, { path });
}

function compressionError(message: string, path: string): SnapstackError {
  return new SnapstackError("E_COMPRESSION", `${path}: ${message}`, { path, errno: 22 });
}

function unsupported(message: string, path: string): SnapstackError {
  return new SnapstackError("E_UNSUPPORTED_FEATURE", `${path}: ${message}`, { path });
}

/** What info shows of a vmdk image (QAPI ImageInfoSpecificVmdk). */
export interface VmdkInfo {
  createType: string;
  cid: number;
  parentCid: number;
  extents: Array<{ fileName: string; format: string; virtualSizeBytes: number; compressed: boolean; clusterSizeBytes: number | null }>;
  /** cluster-size of the image: the grain size when every extent is sparse with the same grain and compression. */
  clusterSizeBytes: number | null;
  /** The extent files other than the image's own file, one per extent (their space counts in actual-size). */
  otherFiles: string[];
  /** vmdk_co_get_info succeeds (every extent of one kind): info then shows dirty-flag (and cluster-size). */
  infoAvailable: boolean;
}

export class VmdkImage extends ReadOnlyImage implements BlockDevice {
  readonly format = "vmdk";
  readonly sizeBytes: number;
  readonly #file: ImageFile;
  readonly #extents: Extent[];
  readonly #extentNames: string[];
  readonly #createType: string;
  readonly #cid: number;
  readonly #parentCid: number;
  readonly #gtCache = new Map<string, Uint32Array>();
  #inflated: { file: ImageFile; hostOffset: number; data: Uint8Array } | null = null;

  constructor(file: ImageFile, fields: { extents: Extent[]; extentNames: string[]; createType: string; cid: number; parentCid: number }) {
    super(file.name);
    this.#file = file;
    this.#extents = fields.extents;
    this.#extentNames = fields.extentNames;
    this.#createType = fields.createType;
    this.#cid = fields.cid;
    this.#parentCid = fields.parentCid;
    this.sizeBytes = fields.extents.reduce((sum, extent) => sum + extent.sectors, 0) * VMDK_SECTOR_BYTES;
  }

  info(): VmdkInfo {
    const first = this.#extents[0];
    const alike = (extent: Extent): boolean =>
      first !== undefined &&
      extent.kind === first.kind &&
      (extent.kind === "flat" || (first.kind === "sparse" && extent.compressed === first.compressed && extent.grainBytes === first.grainBytes));
    return {
      createType: this.#createType,
      cid: this.#cid,
      parentCid: this.#parentCid,
      extents: this.#extents.map((extent, i) => ({
        fileName: this.#extentNames[i],
        format: extent.type ?? "",
        virtualSizeBytes: extent.sectors * VMDK_SECTOR_BYTES,
        compressed: extent.kind === "sparse" && extent.compressed,
        clusterSizeBytes: extent.kind === "sparse" ? extent.grainBytes : null,
      })),
      clusterSizeBytes: first?.kind === "sparse" && this.#extents.every(alike) ? first.grainBytes : null,
      // One per extent, as QEMU adds each extent's file (a file two extents share counts twice).
      otherFiles: this.#extents.filter((extent) => extent.file !== this.#file).map((extent) => extent.file.name),
      infoAvailable: this.#extents.every(alike),
    };
  }

  // ------------------------------------------------------------------ reads

  async read(guestOffset: number, buffer: Uint8Array): Promise<void> {
    checkDeviceRange(this, guestOffset, buffer.length);
    this.checkOpen();
    let done = 0;
    while (done < buffer.length) {
      const at = guestOffset + done;
      const extent = this.#extentAt(at);
      const inExtent = at - extent.startSector * VMDK_SECTOR_BYTES;
      if (extent.kind === "flat") {
        const length = Math.min(buffer.length - done, extent.sectors * VMDK_SECTOR_BYTES - inExtent);
        await extent.file.read(extent.flatStartBytes + inExtent, buffer.subarray(done, done + length));
        done += length;
        continue;
      }
      const inGrain = inExtent % extent.grainBytes;
      const length = Math.min(buffer.length - done, extent.grainBytes - inGrain);
      const target = buffer.subarray(done, done + length);
      const grain = await this.#lookup(extent, inExtent);
      if (grain.kind !== "data") target.fill(0);
      else if (!extent.compressed) await extent.file.read(grain.hostOffset + inGrain, target);
      else {
        // The last grain of a disk may be stored short; QEMU refuses a read past what it inflates to (EINVAL).
        const data = await this.#inflate(extent, grain.hostOffset);
        if (inGrain + length > data.length) {
          throw compressionError(`the compressed grain at host offset ${grain.hostOffset} inflates to ${data.length} bytes, too few for guest offset ${at}`, extent.file.name);
        }
        target.set(data.subarray(inGrain, inGrain + length));
      }
      done += length;
    }
  }

  async layerStatus(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]> {
    checkDeviceRange(this, guestOffset, lengthBytes);
    this.checkOpen();
    const out: LayerExtent[] = [];
    const push = (next: LayerExtent): void => {
      const last = out[out.length - 1];
      const contiguous = last !== undefined && last.kind === next.kind && last.compressed === next.compressed && last.hostFile === next.hostFile;
      const hostFollows = last?.hostOffset === undefined ? next.hostOffset === undefined : next.hostOffset === last.hostOffset + last.lengthBytes;
      if (contiguous && hostFollows) last.lengthBytes += next.lengthBytes;
      else out.push(next);
    };
    const end = guestOffset + lengthBytes;
    for (let at = guestOffset; at < end; ) {
      const extent = this.#extentAt(at);
      const inExtent = at - extent.startSector * VMDK_SECTOR_BYTES;
      const hostFile = this.#extentNames[this.#extents.indexOf(extent)];
      if (extent.kind === "flat") {
        const length = Math.min(end - at, extent.sectors * VMDK_SECTOR_BYTES - inExtent);
        push({ guestOffset: at, lengthBytes: length, kind: "data", hostOffset: extent.flatStartBytes + inExtent, hostFile });
        at += length;
        continue;
      }
      const inGrain = inExtent % extent.grainBytes;
      const length = Math.min(end - at, extent.grainBytes - inGrain);
      const grain = await this.#lookup(extent, inExtent);
      if (grain.kind !== "data") push({ guestOffset: at, lengthBytes: length, kind: grain.kind });
      else if (extent.compressed) push({ guestOffset: at, lengthBytes: length, kind: "data", compressed: true, hostFile });
      else push({ guestOffset: at, lengthBytes: length, kind: "data", hostOffset: grain.hostOffset + inGrain, hostFile });
      at += length;
    }
    return out;
  }

  /** The holes of a flat extent's file (QEMU's BDRV_BLOCK_RECURSE), named by layerStatus's hostFile; null for a sparse extent. */
  async hostHoles(hostOffset: number, lengthBytes: number, hostFile?: string): Promise<FileRun[] | null> {
    const extent = this.#extents[this.#extentNames.indexOf(hostFile ?? "")];
    if (extent?.kind !== "flat") return null;
    return (await extent.file.holes?.(hostOffset, lengthBytes)) ?? null;
  }

  /**
   * vmdk_co_check: every allocated grain (and each flat extent's start)
   * must lie before the end of its file. Stops at the first that does not,
   * as QEMU does: its line, and the failure ("Invalid argument").
   */
  override async check(): Promise<ReadOnlyCheck> {
    this.checkOpen();
    for (const extent of this.#extents) {
      const fileSizeBytes = await extent.file.sizeBytes();
      const step = extent.kind === "flat" ? extent.sectors * VMDK_SECTOR_BYTES : extent.grainBytes;
      for (let inExtent = 0; inExtent < extent.sectors * VMDK_SECTOR_BYTES; inExtent += step) {
        const hostOffset = extent.kind === "flat" ? extent.flatStartBytes : await this.#lookupForCheck(extent, inExtent);
        if (hostOffset !== null && hostOffset >= fileSizeBytes) {
          const sector = extent.startSector + inExtent / VMDK_SECTOR_BYTES;
          return { corruptions: 1, messages: [`ERROR: cluster offset for sector ${sector} points after EOF`], failure: "Invalid argument" };
        }
      }
    }
    return { corruptions: 0, messages: [], failure: null };
  }

  /** A grain's host offset, or null when it has none; a grain beyond the directory fails the check as QEMU's does. */
  async #lookupForCheck(extent: SparseExtent, inExtentBytes: number): Promise<number | null> {
    const grain = await this.#lookup(extent, inExtentBytes);
    return grain.kind === "data" ? grain.hostOffset : null;
  }

  #extentAt(guestOffset: number): Extent {
    const sector = Math.floor(guestOffset / VMDK_SECTOR_BYTES);
    const extent = this.#extents.find((candidate) => sector < candidate.startSector + candidate.sectors);
    if (extent === undefined) throw new SnapstackError("E_IO", `${this.name}: no extent holds guest offset ${guestOffset}`, { path: this.name, errno: 5 });
    return extent;
  }

  /** get_cluster_offset without allocation. */
  async #lookup(extent: SparseExtent, inExtentBytes: number): Promise<GrainLookup> {
    const grainIndex = Math.floor(inExtentBytes / extent.grainBytes);
    const gdIndex = Math.floor(grainIndex / extent.gtesPerGt);
    if (gdIndex >= extent.gd.length) throw new SnapstackError("E_IO", `${extent.file.name}: grain ${grainIndex} lies beyond the grain directory`, { path: extent.file.name, errno: 5 });
    const gtSector = extent.gd[gdIndex];
    if (gtSector === 0) return { kind: "unallocated" };
    const key = `${extent.startSector}:${gtSector}`;
    let gt = this.#gtCache.get(key);
    if (gt === undefined) {
      const bytes = new Uint8Array(extent.gtesPerGt * 4);
      await extent.file.read(gtSector * VMDK_SECTOR_BYTES, bytes);
      gt = new Uint32Array(extent.gtesPerGt);
      const view = new DataView(bytes.buffer);
      for (let i = 0; i < gt.length; i++) gt[i] = view.getUint32(i * 4, true);
      if (this.#gtCache.size >= GT_CACHE_ENTRIES) this.#gtCache.delete(this.#gtCache.keys().next().value as string);
      this.#gtCache.set(key, gt);
    }
    const gte = gt[grainIndex % extent.gtesPerGt];
    if (gte === 0) return { kind: "unallocated" };
    if (extent.hasZeroGrain && gte === VMDK_GTE_ZEROED) return { kind: "zero" };
    return { kind: "data", hostOffset: gte * VMDK_SECTOR_BYTES };
  }

  /** vmdk_read_extent for a compressed grain: the whole grain, inflated (the last one is kept). */
  async #inflate(extent: SparseExtent, hostOffset: number): Promise<Uint8Array> {
    if (this.#inflated?.file === extent.file && this.#inflated.hostOffset === hostOffset) return this.#inflated.data;
    const raw = new Uint8Array(extent.grainBytes * 2);
    await extent.file.read(hostOffset, raw);
    const payload = extent.hasMarker ? grainMarkerPayload(raw) : raw.subarray(0, extent.grainBytes);
    let data: Uint8Array;
    try {
      data = zlibModule().inflateSync(payload, { maxOutputLength: extent.grainBytes });
    } catch (error) {
      throw compressionError(`the compressed grain at host offset ${hostOffset} does not inflate: ${(error as Error).message}`, extent.file.name);
    }
    this.#inflated = { file: extent.file, hostOffset, data };
    return data;
  }

  protected async closeFiles(): Promise<void> {
    const files = new Set<ImageFile>([this.#file, ...this.#extents.map((extent) => extent.file)]);
    for (const file of files) await file.close().catch(() => {});
  }
}

// ------------------------------------------------------------------- open

/** vmdk_open_vmdk4: one sparse extent from the header at the start of `file` (`head`: its first bytes). */
async function openSparseExtent(file: ImageFile, head: Uint8Array, startSector: number, type: string | null): Promise<SparseExtent> {
  const path = file.name;
  let header: VmdkSparseHeader = decodeSparseHeader(head);
  const fileSizeBytes = await file.sizeBytes();
  // QEMU counts a file's sectors rounded up (a partial last sector is one).
  const fileSectors = Math.ceil(fileSizeBytes / VMDK_SECTOR_BYTES);
  if (header.gdOffsetSectors === null) {
    if (fileSectors * VMDK_SECTOR_BYTES < FOOTER_BYTES) throw corrupt("vmdk: Invalid footer", path);
    const footer = new Uint8Array(FOOTER_BYTES);
    await file.read(fileSectors * VMDK_SECTOR_BYTES - FOOTER_BYTES, footer);
    header = decodeFooter(footer);
  }
  for (const [what, sectors] of [["capacity", header.capacitySectors], ["grain directory offset", header.gdOffsetSectors ?? 0], ["grain offset", header.grainOffsetSectors]] as const) {
    if (!Number.isSafeInteger(sectors * VMDK_SECTOR_BYTES)) throw corrupt(`vmdk: the ${what} (${sectors} sectors) is beyond what snapstack addresses`, path);
  }
  const compressed = header.compressAlgorithm === VMDK4_COMPRESSION_DEFLATE;
  if (header.version > 3) throw unsupported(`Unsupported VMDK version ${header.version}`, path);
  if (header.gtesPerGt > GTES_PER_GT_MAX) throw corrupt("L2 table size too big", path);
  const gdEntrySectors = header.gtesPerGt * header.grainSectors;
  if (gdEntrySectors === 0) throw corrupt("L1 entry size is invalid", path);
  const gdEntries = Math.ceil(header.capacitySectors / gdEntrySectors);
  if (fileSectors < header.grainOffsetSectors) {
    throw corrupt(`File truncated, expecting at least ${header.grainOffsetSectors * VMDK_SECTOR_BYTES} bytes`, path);
  }
  if (header.grainSectors > GRAIN_SECTORS_MAX) throw corrupt("Invalid granularity, image may be corrupt", path);
  if (gdEntries > GD_ENTRIES_MAX) throw corrupt("L1 size too big", path);
  const gdBytes = new Uint8Array(gdEntries * 4);
  await file.read((header.gdOffsetSectors ?? 0) * VMDK_SECTOR_BYTES, gdBytes);
  const gdView = new DataView(gdBytes.buffer);
  const gd = new Uint32Array(gdEntries);
  for (let i = 0; i < gdEntries; i++) gd[i] = gdView.getUint32(i * 4, true);
  return {
    kind: "sparse",
    file,
    sectors: header.capacitySectors,
    startSector,
    type,
    grainBytes: header.grainSectors * VMDK_SECTOR_BYTES,
    gtesPerGt: header.gtesPerGt,
    gd,
    compressed,
    hasMarker: (header.flags & VMDK4_FLAG_MARKER) !== 0,
    hasZeroGrain: (header.flags & VMDK4_FLAG_ZERO_GRAIN) !== 0,
  };
}

/** The first bytes of a file, up to what QEMU reads of a descriptor. */
async function readHead(file: ImageFile): Promise<Uint8Array> {
  const size = await file.sizeBytes();
  if (size < 4) throw corrupt("File is too small, not a valid image", file.name);
  const head = new Uint8Array(Math.min(size, DESCRIPTOR_BYTES_MAX));
  await file.read(0, head);
  return head;
}

function magicOf(head: Uint8Array): number {
  return new DataView(head.buffer, head.byteOffset, 4).getUint32(0);
}

/**
 * Open a vmdk image on `file` (which the caller has locked; the device
 * closes it, and on failure the caller does). Extent files named by a
 * descriptor are opened with `openExtentFile`.
 */
export async function openVmdk(file: ImageFile, openExtentFile: VmdkFileOpener): Promise<VmdkImage> {
  const path = file.name;
  const opened: ImageFile[] = [];
  try {
    const head = await readHead(file);
    const magic = magicOf(head);
    let extents: Extent[];
    let extentNames: string[];
    let createType: string;
    let descriptor: string;
    if (magic === VMDK3_MAGIC) throw unsupported("VMDK3 (COWD) sparse extents are not supported", path);
    if (magic === VMDK4_MAGIC) {
      const header = decodeSparseHeader(head);
      if (header.capacitySectors === 0 && header.descriptorOffsetSectors !== 0) {
        throw unsupported("a sparse extent that only holds a descriptor is not supported", path);
      }
      const extent = await openSparseExtent(file, head, 0, null);
      extents = [extent];
      extentNames = [path];
      createType = extent.compressed ? "streamOptimized" : "monolithicSparse";
      descriptor = descriptorText(head.subarray(VMDK_SECTOR_BYTES, VMDK_SECTOR_BYTES + DESCRIPTOR_CID_BYTES));
    } else {
      descriptor = descriptorText(head);
      const parsed = parseDescriptor(descriptor);
      if (parsed.createType === null) throw corrupt("invalid VMDK image descriptor", path);
      if (!DESCRIPTOR_CREATE_TYPES.includes(parsed.createType)) throw unsupported(`Unsupported image type '${parsed.createType}'`, path);
      createType = parsed.createType;
      extents = [];
      extentNames = [];
      const directory = path.lastIndexOf("/") < 0 ? "" : path.slice(0, path.lastIndexOf("/") + 1);
      let startSector = 0;
      for (const line of parsed.extents) {
        if (line.type === "SESPARSE" || line.type === "VMFSSPARSE") throw unsupported(`${line.type} extents are not supported`, path);
        const extentPath = line.fileName.startsWith("/") ? line.fileName : directory + line.fileName;
        const extentFile = await openExtentFile(extentPath);
        opened.push(extentFile);
        let extent: Extent;
        if (line.type === "FLAT" || line.type === "VMFS") {
          extent = { kind: "flat", file: extentFile, sectors: line.sectors, startSector, type: line.type, flatStartBytes: line.flatOffsetSectors * VMDK_SECTOR_BYTES };
        } else {
          const extentHead = await readHead(extentFile);
          const extentMagic = magicOf(extentHead);
          if (extentMagic === VMDK3_MAGIC) throw unsupported("VMDK3 (COWD) sparse extents are not supported", extentPath);
          if (extentMagic !== VMDK4_MAGIC) throw corrupt("Image not in VMDK format", extentPath);
          extent = await openSparseExtent(extentFile, extentHead, startSector, line.type);
        }
        extents.push(extent);
        extentNames.push(extentPath);
        startSector += extent.sectors;
      }
    }
    const fields = parseDescriptor(descriptor);
    if (fields.parentFileNameHint !== null) throw unsupported(`linked clones (parentFileNameHint="${fields.parentFileNameHint}") are not supported`, path);
    if (fields.cid === null || fields.parentCid === null) throw corrupt("the descriptor has no CID or parentCID", path);
    if (!Number.isSafeInteger(extents.reduce((sum, extent) => sum + extent.sectors, 0) * VMDK_SECTOR_BYTES)) {
      throw corrupt("vmdk: the disk is larger than snapstack addresses (2^53 bytes)", path);
    }
    return new VmdkImage(file, { extents, extentNames, createType, cid: fields.cid, parentCid: fields.parentCid });
  } catch (error) {
    // `file` stays the caller's to close, as when openQcow2 fails.
    for (const extentFile of opened) await extentFile.close().catch(() => {});
    throw error;
  }
}
