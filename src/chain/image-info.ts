/**
 * qemu-img info --output=json: QAPI ImageInfo objects (block/qapi.c
 * bdrv_query_image_info, qcow2_get_specific_info).
 *
 * Design notes
 * - Objects are built with keys in QAPI schema (insertion) order. QEMU
 *   prints a dict in hash-bucket order, not insertion order; the CLI's
 *   formatQemuJson (src/cli/qemu-json.ts) reorders keys exactly as QEMU
 *   does, so render with it to get qemu-img's bytes.
 * - Like qemu-img info, each image is opened alone (without its backing),
 *   read-only. With backingChain, the next image is the overlay's
 *   full-backing-filename, opened with the backing-filename-format (probed
 *   when absent); loops and depth are checked as in openImage.
 * - actual-size is the host file's allocated bytes (stat blocks * 512),
 *   which is what QEMU reports; it changes with the file system's
 *   allocation and differs between two byte-identical files written
 *   differently (holes), so tests compare it with a tolerance.
 * - Encrypted images and images with an external data file are opened for
 *   their metadata only (their data cannot be read): info shows them as
 *   qemu-img does, the LUKS header's parameters included (QAPI
 *   QCryptoBlockInfoLUKS; no key material is read or used).
 */
import { realpathSync, statSync } from "node:fs";
import { SnapstackError, fromSystemError } from "../base/errors.ts";
import type { BlockDevice } from "../device/block-device.ts";
import { Qcow2Image, type Qcow2Info } from "../formats/qcow2/index.ts";
import { VmdkImage, type VmdkInfo } from "../formats/vmdk/vmdk-image.ts";
import { ReadOnlyImage } from "../formats/read-only-image.ts";
import { parseImageFormat, type ImageFormat } from "./image-format.ts";
import { CHAIN_DEPTH_MAX_DEFAULT, openImage } from "./open-image.ts";
import { resolveBackingPath } from "./backing-path.ts";

export type ImageInfoJson = Record<string, unknown>;

export interface ImageInfoOptions {
  format?: string;
  backingChain?: boolean;
  chainDepthMax?: number;
  /** Read images another process is writing (qemu-img -U; see OpenImageOptions.forceShare). */
  forceShare?: boolean;
}

function allocatedBytes(path: string): number {
  try {
    return statSync(path).blocks * 512;
  } catch (error) {
    throw fromSystemError(error, path, "stat");
  }
}

/** QAPI QCryptoBlockInfo of an encrypted image ("encrypt" in the format-specific data). */
function encryptInfo(encryption: NonNullable<Qcow2Info["encryption"]>): ImageInfoJson {
  if (encryption.format === "aes" || encryption.luks === null) return { format: encryption.format };
  const luks = encryption.luks;
  return {
    format: "luks",
    "cipher-alg": luks.cipherAlg,
    "cipher-mode": luks.cipherMode,
    "ivgen-alg": luks.ivgenAlg,
    ...(luks.ivgenHashAlg === undefined ? {} : { "ivgen-hash-alg": luks.ivgenHashAlg }),
    "hash-alg": luks.hashAlg,
    "payload-offset": luks.payloadOffsetBytes,
    "master-key-iters": luks.masterKeyIterations,
    uuid: luks.uuid,
    slots: luks.slots.map((slot) => ({
      active: slot.active,
      ...(slot.iterations === undefined ? {} : { iters: slot.iterations }),
      ...(slot.stripes === undefined ? {} : { stripes: slot.stripes }),
      "key-offset": slot.keyOffsetBytes,
    })),
  };
}

function qcow2SpecificInfo(image: Qcow2Image): ImageInfoJson {
  const info = image.info();
  const encrypt = info.encryption === null ? {} : { encrypt: encryptInfo(info.encryption) };
  if (info.version === 2) {
    return { compat: info.compat, "refcount-bits": info.refcountBits, "compression-type": info.compressionType, ...encrypt };
  }
  return {
    compat: info.compat,
    ...(info.dataFile === null ? {} : { ...(info.dataFile.name === null ? {} : { "data-file": info.dataFile.name }), "data-file-raw": info.dataFile.raw }),
    "extended-l2": info.extendedL2,
    "lazy-refcounts": info.lazyRefcounts,
    ...(info.bitmaps.length > 0
      ? {
          bitmaps: info.bitmaps.map((bitmap) => ({
            flags: [...(bitmap.inUse ? ["in-use"] : []), ...(bitmap.auto ? ["auto"] : [])],
            name: bitmap.name,
            granularity: bitmap.granularityBytes,
          })),
        }
      : {}),
    corrupt: info.corrupt,
    "refcount-bits": info.refcountBits,
    "compression-type": info.compressionType,
    ...encrypt,
  };
}

/** QAPI ImageInfoSpecificVmdk (vmdk_get_specific_info). */
function vmdkSpecificInfo(info: VmdkInfo): ImageInfoJson {
  return {
    "create-type": info.createType,
    cid: info.cid,
    "parent-cid": info.parentCid,
    extents: info.extents.map((extent) => ({
      filename: extent.fileName,
      format: extent.format,
      "virtual-size": extent.virtualSizeBytes,
      ...(extent.clusterSizeBytes === null ? {} : { "cluster-size": extent.clusterSizeBytes }),
      ...(extent.compressed ? { compressed: true } : {}),
    })),
  };
}

/** ImageInfoSpecific's data of a device (qcow2's, vmdk's), or null when its format has none (raw). */
export function formatSpecificInfo(device: BlockDevice): ImageInfoJson | null {
  if (device instanceof Qcow2Image) return qcow2SpecificInfo(device);
  return device instanceof VmdkImage ? vmdkSpecificInfo(device.info()) : null;
}

/** The ImageInfo object of a vmdk image: its extent files' space counts in actual-size (vmdk_co_get_allocated_file_size). */
function describeVmdk(device: VmdkImage, path: string): ImageInfoJson {
  const info = device.info();
  const ordered: ImageInfoJson = {
    filename: path,
    format: device.format,
    // Left out where QEMU's get_info fails (extents of different kinds), as qemu-img leaves it out.
    ...(info.infoAvailable ? { "dirty-flag": false } : {}),
    "actual-size": info.otherFiles.reduce((sum, file) => sum + allocatedBytes(file), allocatedBytes(path)),
    "virtual-size": device.sizeBytes,
  };
  if (info.clusterSizeBytes !== null) ordered["cluster-size"] = info.clusterSizeBytes;
  ordered["format-specific"] = { type: "vmdk", data: vmdkSpecificInfo(info) };
  return ordered;
}

/** The ImageInfo object for one opened image (its backing not needed). */
export function describeImage(device: BlockDevice, path: string): ImageInfoJson {
  if (device instanceof VmdkImage) return describeVmdk(device, path);
  if (device instanceof ReadOnlyImage) {
    const ordered: ImageInfoJson = { filename: path, format: device.format, "dirty-flag": false, "actual-size": allocatedBytes(path), "virtual-size": device.sizeBytes };
    if (device.clusterSizeBytes !== null) ordered["cluster-size"] = device.clusterSizeBytes;
    return ordered;
  }
  const qcow2 = device instanceof Qcow2Image ? device : null;
  const info = qcow2?.info() ?? null;
  const ordered: ImageInfoJson = {
    filename: path,
    format: device.format,
    "dirty-flag": info?.dirty ?? false,
    "actual-size": allocatedBytes(path),
    "virtual-size": device.sizeBytes,
  };
  if (qcow2 === null || info === null) return ordered;
  ordered["cluster-size"] = info.clusterSizeBytes;
  if (info.backingFileName !== null && info.backingFileName !== "") {
    ordered["backing-filename"] = info.backingFileName;
    try {
      ordered["full-backing-filename"] = resolveBackingPath(path, info.backingFileName);
    } catch {
      // A protocol name QEMU could resolve but we cannot: leave it out.
    }
    if (info.backingFormat !== null && info.backingFormat !== "") ordered["backing-filename-format"] = info.backingFormat;
  }
  if (info.snapshots.length > 0) {
    ordered.snapshots = info.snapshots.map((s) => {
      const snapshot: ImageInfoJson = {
        id: s.id,
        name: s.name,
        "vm-state-size": s.vmStateSizeBytes,
        "date-sec": s.dateSeconds,
        "date-nsec": s.dateNanoseconds,
        "vm-clock-sec": Math.floor(s.vmClockNanoseconds / 1e9),
        "vm-clock-nsec": s.vmClockNanoseconds % 1e9,
      };
      if (s.icount !== undefined) snapshot.icount = s.icount;
      return snapshot;
    });
  }
  ordered["format-specific"] = { type: "qcow2", data: formatSpecificInfo(qcow2) };
  if (info.encryption !== null) ordered.encrypted = true;
  return ordered;
}

/** qemu-img info: one object, or the whole chain top first with backingChain. */
export async function imageInfo(path: string, options: ImageInfoOptions = {}): Promise<ImageInfoJson[]> {
  const chainDepthMax = options.chainDepthMax ?? CHAIN_DEPTH_MAX_DEFAULT;
  const infos: ImageInfoJson[] = [];
  const seen = new Set<string>();
  let layerPath: string | null = path;
  let format: ImageFormat | undefined = options.format === undefined ? undefined : parseImageFormat(options.format);
  while (layerPath !== null) {
    if (infos.length >= chainDepthMax) {
      throw new SnapstackError("E_CHAIN_TOO_DEEP", `Could not open '${path}': backing chain is deeper than ${chainDepthMax} images`, { path, chainDepthMax });
    }
    try {
      const real = realpathSync.native(layerPath);
      if (seen.has(real)) throw new SnapstackError("E_BACKING_LOOP", `Backing file '${layerPath}' creates an infinite loop.`, { path, backingFile: layerPath });
      seen.add(real);
    } catch (error) {
      if (error instanceof SnapstackError) throw error;
      // Missing files are reported by openImage with qemu-img's wording.
    }
    const device = await openImage(layerPath, { format, readOnly: true, openBacking: false, forceShare: options.forceShare, metadataOnly: true });
    let info: ImageInfoJson;
    try {
      info = describeImage(device, layerPath);
    } finally {
      await device.close();
    }
    infos.push(info);
    layerPath = null;
    if (options.backingChain && typeof info["full-backing-filename"] === "string") {
      layerPath = info["full-backing-filename"];
      const backingFormat = info["backing-filename-format"];
      format = typeof backingFormat === "string" ? parseImageFormat(backingFormat) : undefined;
    }
  }
  return infos;
}
