/**
 * snapstack's public library API: re-exports only.
 *
 *   import { openImage, createImage, mapImage } from "snapstack";
 *
 * The CLI (src/cli) is a thin layer over exactly these functions.
 */
export { SnapstackError, ERROR_CODES, isSnapstackError, type ErrorCode } from "./base/errors.ts";
export { parseSize, formatSize } from "./base/units.ts";
export type { ImageFile } from "./io/file.ts";
export { NodeFile, openNodeFile, createNodeFile, syncDirectory, type OpenNodeFileOptions, type CreateNodeFileOptions } from "./io/node-file.ts";
export { MemoryFile } from "./io/memory-file.ts";
export type { BlockDevice, LayerExtent, LayerStatusKind, MapExtent, WriteZeroesOptions } from "./device/block-device.ts";
export { RawImage, openRaw, createRaw } from "./formats/raw/raw-image.ts";
export {
  Qcow2Image,
  openQcow2,
  readQcow2Header,
  createQcow2,
  measureQcow2,
  type OpenQcow2Options,
  type Qcow2Info,
  type Qcow2SnapshotInfo,
  type Qcow2CreateOptions,
  type Qcow2Header,
} from "./formats/qcow2/index.ts";
export { checkQcow2, toQemuCheckJson, qemuCheckExitCode, type Qcow2CheckResult, type Qcow2RepairMode } from "./formats/qcow2/check.ts";
export {
  openImage,
  chainLayers,
  createImage,
  mapImage,
  compareImages,
  convertImage,
  resizeImage,
  imageInfo,
  measureImage,
  checkImage,
  CHAIN_DEPTH_MAX_DEFAULT,
  type OpenImageOptions,
  type CreateImageOptions,
  type MapImageOptions,
  type CompareImagesOptions,
  type CompareResult,
  type ConvertImageOptions,
  type ResizeImageOptions,
  type ImageInfoOptions,
  type ImageInfoJson,
  type MeasureOptions,
  type MeasureResult,
  type CheckImageOptions,
} from "./chain/index.ts";
export { NbdServer, NbdExport, type NbdServerOptions, type NbdListenAddress, type NbdExportOptions } from "./nbd/index.ts";
export {
  commitImage,
  rebaseImage,
  streamImage,
  diffImages,
  exportDelta,
  restoreImage,
  removeImage,
  type CommitImageOptions,
  type RebaseImageOptions,
  type StreamImageOptions,
  type DiffImagesOptions,
  type DiffRange,
  type RestoreImageOptions,
  type RemoveImageOptions,
  type JobProgress,
} from "./chain/jobs/index.ts";
