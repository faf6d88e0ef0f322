/** Jobs on chains: commit, rebase, stream, diff, restore, remove (each with progress and AbortSignal). */
export { Job, runJob, type JobOptions, type JobProgress, type JobState, type JobSteps } from "./job.ts";
export { resolveAbove, forEachAbove, findInChain, ALLOCATION_WINDOW_BYTES, type AboveExtent } from "./chain-layers.ts";
export { layerKey } from "../layer-file.ts";
export { fileKey } from "../../io/file-identity.ts";
export { StateComparer, diffStates, DIFF_CHUNK_BYTES, DIFF_GRANULARITY_DEFAULT_BYTES, type DiffRange, type DiffStats } from "./state-diff.ts";
export { findBackingUsers } from "./backing-users.ts";
export { commitImage, type CommitImageOptions, type CommitResult } from "./commit-image.ts";
export { rebaseImage, type RebaseImageOptions, type RebaseResult } from "./rebase-image.ts";
export { streamImage, type StreamImageOptions, type StreamResult } from "./stream-image.ts";
export { diffImages, exportDelta, clusterSpans, type DiffImagesOptions, type DiffResult, type ExportDeltaOptions } from "./diff-images.ts";
export { restoreImage, type RestoreImageOptions, type RestoreResult } from "./restore-image.ts";
export { removeImage, type RemoveImageOptions, type RemoveResult } from "./remove-image.ts";
export { openDiskState, parseStateSpec, type DiskState } from "./disk-state.ts";
