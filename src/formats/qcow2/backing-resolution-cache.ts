/**
 * BackingResolutionCache: where each guest cluster that an image does not
 * hold itself lives further down its (stable, read-only) backing chain.
 *
 * Design notes
 * - The read path of a deep chain asks this once per request, after the
 *   top layer's own L2 lookup said "unallocated": the answer is one host
 *   range of some layer's file, zeroes, or "mixed" (several ranges; the
 *   caller resolves it piece by piece). So a read through 100 layers costs
 *   what a read of a flat image costs plus this lookup.
 * - Layout: chunks of CHUNK_CLUSTERS clusters, each two typed arrays (a
 *   code per cluster and a host offset per cluster), found through a Map by
 *   chunk index with the last chunk used kept aside. No object per cluster:
 *   12 bytes each, nothing for the garbage collector to trace, and a lookup
 *   touches two array slots (the read path is otherwise memory-bound on the
 *   page cache copy).
 * - Codes: UNKNOWN (0, not resolved yet), ZERO, MIXED, or FILE_BASE + the
 *   index of the layer file in `files` (one entry per distinct file met).
 * - Bound: CHUNKS_MAX chunks (memory CHUNKS_MAX * CHUNK_CLUSTERS * 12
 *   bytes); when full, everything is forgotten and refilled on demand (a
 *   resolution is cheap to redo; a bounded cache must never grow with the
 *   number of reads).
 */
import type { ImageFile } from "../../io/file.ts";

/** Clusters per chunk (with 64 KiB clusters a chunk covers 256 MiB of guest). */
const CHUNK_CLUSTERS = 4096;
/** Chunks kept at most: 256 * 4096 * 12 bytes = 12 MiB. */
const CHUNKS_MAX = 256;

export const BELOW_UNKNOWN = 0;
export const BELOW_ZERO = 1;
export const BELOW_MIXED = 2;
const FILE_BASE = 3;

interface Chunk {
  codes: Int32Array;
  hostOffsets: Float64Array;
}

/** What a backing cluster resolved to. */
export type BelowResolution = { file: ImageFile; hostOffset: number } | "zero" | "mixed";

export class BackingResolutionCache {
  readonly #chunks = new Map<number, Chunk>();
  readonly #files: ImageFile[] = [];
  readonly #fileIndex = new Map<ImageFile, number>();
  #lastChunkIndex = -1;
  #lastChunk: Chunk | null = null;
  /** After lookup() returned a file code: the file and the host offset of the cluster's first byte. */
  file: ImageFile | null = null;
  hostOffset = 0;

  /** BELOW_UNKNOWN, BELOW_ZERO, BELOW_MIXED, or a file code (then `file` and `hostOffset` are set). */
  lookup(clusterIndex: number): number {
    const chunkIndex = Math.floor(clusterIndex / CHUNK_CLUSTERS);
    let chunk = this.#lastChunk;
    if (chunkIndex !== this.#lastChunkIndex) {
      chunk = this.#chunks.get(chunkIndex) ?? null;
      if (chunk === null) return BELOW_UNKNOWN;
      this.#lastChunkIndex = chunkIndex;
      this.#lastChunk = chunk;
    }
    const slot = clusterIndex - chunkIndex * CHUNK_CLUSTERS;
    const code = (chunk as Chunk).codes[slot];
    if (code >= FILE_BASE) {
      this.file = this.#files[code - FILE_BASE];
      this.hostOffset = (chunk as Chunk).hostOffsets[slot];
    }
    return code;
  }

  set(clusterIndex: number, resolution: BelowResolution): void {
    const chunkIndex = Math.floor(clusterIndex / CHUNK_CLUSTERS);
    let chunk = this.#chunks.get(chunkIndex);
    if (chunk === undefined) {
      if (this.#chunks.size >= CHUNKS_MAX) this.clear();
      chunk = { codes: new Int32Array(CHUNK_CLUSTERS), hostOffsets: new Float64Array(CHUNK_CLUSTERS) };
      this.#chunks.set(chunkIndex, chunk);
    }
    const slot = clusterIndex - chunkIndex * CHUNK_CLUSTERS;
    if (resolution === "zero") chunk.codes[slot] = BELOW_ZERO;
    else if (resolution === "mixed") chunk.codes[slot] = BELOW_MIXED;
    else {
      let fileIndex = this.#fileIndex.get(resolution.file);
      if (fileIndex === undefined) {
        fileIndex = this.#files.push(resolution.file) - 1;
        this.#fileIndex.set(resolution.file, fileIndex);
      }
      chunk.codes[slot] = FILE_BASE + fileIndex;
      chunk.hostOffsets[slot] = resolution.hostOffset;
    }
  }

  clear(): void {
    this.#chunks.clear();
    this.#lastChunkIndex = -1;
    this.#lastChunk = null;
  }
}
