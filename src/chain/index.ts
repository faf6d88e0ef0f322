/** Opening chains and the qemu-img operations on them. */
export { openImage, chainLayers, CHAIN_DEPTH_MAX_DEFAULT, type OpenImageOptions, type TopLockContext } from "./open-image.ts";
export { IMAGE_FORMATS, parseImageFormat, probeImageFormat, isImageFormat, type ImageFormat } from "./image-format.ts";
export { resolveBackingPath, hasProtocolPrefix } from "./backing-path.ts";
export { createImage, type CreateImageOptions, type CreateOptionValue } from "./create-image.ts";
export { mapImage, forEachMapEntry, formatMapJson, formatMapJsonEntry, walkChain, walkChainPrefix, mapEntriesMergeable, MAP_CHUNK_BYTES, type MapImageOptions } from "./map-image.ts";
export { ChainStatusCursor } from "./chain-status.ts";
export { compareImages, COMPARE_CHUNK_BYTES, type CompareImagesOptions, type CompareResult } from "./compare-images.ts";
export { convertImage, findZeroRuns, COPY_CHUNK_BYTES, COPY_READS_IN_FLIGHT, SPARSE_SIZE_DEFAULT_BYTES, type ConvertImageOptions } from "./convert-image.ts";
export { resizeImage, type ResizeImageOptions, type SizeSpec } from "./resize-image.ts";
export { amendImage, refuseUnamendableFormat, type AmendOptions } from "./amend-image.ts";
export { changeImageBitmaps, type BitmapStep, type ChangeBitmapsOptions } from "./bitmap-image.ts";
export { DD_BLOCK_BYTES_MAX, ddImage, type DdImageOptions, type DdImageResult } from "./dd-image.ts";
export { imageInfo, describeImage, type ImageInfoOptions, type ImageInfoJson } from "./image-info.ts";
export { measureImage, type MeasureOptions, type MeasureResult } from "./measure-image.ts";
export { checkImage, type CheckImageOptions } from "./check-image.ts";
export { benchImage, checkBenchOptions, nextBenchOffset, type BenchImageOptions, type BenchImageResult } from "./bench-image.ts";
