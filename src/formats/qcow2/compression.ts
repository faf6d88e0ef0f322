/**
 * Compressed cluster payloads (reference §11), pure functions over bytes.
 *
 * zlib (compression type 0): raw deflate, no header or checksum, written
 * with windowBits 12 and memLevel 9 as QEMU does; read with any window.
 * zstd (type 1): plain zstd frames without a length prefix. QEMU's reader
 * loops over frames until one cluster of output is produced and never looks
 * at the bytes after that (the sector padding), so we cut the input into
 * whole frames by walking frame and block headers before handing them to
 * node:zlib, which would refuse the trailing padding.
 *
 * Decompression must produce at least one full cluster (QEMU: EIO
 * otherwise); extra output or input is ignored. For zlib that is QEMU's
 * single inflate(Z_FINISH) into a cluster-sized buffer: zlib goes on once
 * the buffer is full until a symbol needs output (an end of block, the next
 * block's header and code tables are still decoded, and fail on damage),
 * and a stream that fills the buffer so is accepted whatever follows
 * (damage further on, or a stream that goes on). A stream node:zlib
 * refuses (its output passed maxOutputLength, or it broke) gets that
 * single call (firstCallFills: an output chunk of one cluster and a limit
 * one byte below it, so node:zlib stops right after the first call), and
 * if it fills the buffer the bytes come from the shortest prefix of the
 * input whose output reaches a cluster (inflatePrefix). Not QEMU's in one
 * case of damaged streams only: when the cluster fills inside a match and
 * the rest of that input byte holds an end of block and a broken block
 * header, node:zlib (which decodes whole bytes) fails where QEMU, stopped
 * at the match, read the cluster. Compression returns null
 * when the result does not fit in cluster_size - 1 bytes: the caller then
 * writes the cluster uncompressed.
 *
 * node:zlib is loaded on first use, not imported: it pulls in node's stream
 * modules (~5 ms of every process start), and most commands never meet a
 * compressed cluster.
 */
import type * as Zlib from "node:zlib";
import { SnapstackError } from "../../base/errors.ts";
import { COMPRESSION_TYPE_ZLIB, COMPRESSION_TYPE_ZSTD } from "./header.ts";

/** QEMU's deflate window for compressed clusters. */
export const ZLIB_WINDOW_BITS = 12;
export const ZLIB_MEM_LEVEL = 9;

let zlibLoaded: typeof Zlib | null = null;

/** node:zlib, loaded at the first (de)compression. */
function zlibModule(): typeof Zlib {
  zlibLoaded ??= process.getBuiltinModule("node:zlib");
  return zlibLoaded;
}

const ZSTD_MAGIC = 0xfd2fb528;
const ZSTD_SKIPPABLE_MAGIC_MASK = 0xfffffff0;
const ZSTD_SKIPPABLE_MAGIC = 0x184d2a50;

/**
 * Compress one cluster. Returns null when the output would not be smaller
 * than the cluster (fits in clusterSizeBytes - 1 bytes), as QEMU decides.
 */
export function compressCluster(data: Uint8Array, compressionType: number, clusterSizeBytes: number): Uint8Array | null {
  const zlib = zlibModule();
  let out: Uint8Array;
  if (compressionType === COMPRESSION_TYPE_ZLIB) {
    out = zlib.deflateRawSync(data, { windowBits: ZLIB_WINDOW_BITS, memLevel: ZLIB_MEM_LEVEL, level: zlib.constants.Z_DEFAULT_COMPRESSION });
  } else if (compressionType === COMPRESSION_TYPE_ZSTD) {
    out = zlib.zstdCompressSync(data, {
      params: { [zlib.constants.ZSTD_c_compressionLevel]: zlib.constants.ZSTD_CLEVEL_DEFAULT, [zlib.constants.ZSTD_c_checksumFlag]: 0 },
    });
  } else {
    throw new SnapstackError("E_UNSUPPORTED_FEATURE", `unknown compression type ${compressionType}`);
  }
  return out.length <= clusterSizeBytes - 1 ? new Uint8Array(out.buffer, out.byteOffset, out.length) : null;
}

function compressionError(message: string): SnapstackError {
  return new SnapstackError("E_COMPRESSION", message);
}

/** Length of the zstd frame (or skippable frame) at the start of `input`, or -1 if truncated/invalid. */
function zstdFrameBytes(input: Uint8Array): number {
  if (input.length < 4) return -1;
  const view = new DataView(input.buffer, input.byteOffset, input.byteLength);
  const magic = view.getUint32(0, true);
  if ((magic & ZSTD_SKIPPABLE_MAGIC_MASK) >>> 0 === ZSTD_SKIPPABLE_MAGIC) {
    if (input.length < 8) return -1;
    return 8 + view.getUint32(4, true);
  }
  if (magic !== ZSTD_MAGIC || input.length < 5) return -1;
  const descriptor = input[4];
  const fcsFlag = descriptor >>> 6;
  const singleSegment = (descriptor >>> 5) & 1;
  const checksum = (descriptor >>> 2) & 1;
  const dictIdFlag = descriptor & 3;
  let at = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][dictIdFlag] + [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag];
  for (;;) {
    if (at + 3 > input.length) return -1;
    const blockHeader = input[at] | (input[at + 1] << 8) | (input[at + 2] << 16);
    const last = blockHeader & 1;
    const type = (blockHeader >>> 1) & 3;
    const size = blockHeader >>> 3;
    if (type === 3) return -1;
    at += 3 + (type === 1 ? 1 : size);
    if (last) break;
  }
  at += checksum ? 4 : 0;
  return at <= input.length ? at : -1;
}

/** What node:zlib said, without its buffer-size wording ("Cannot create a Buffer larger than ..."). */
function zlibReason(error: unknown): string {
  const code = (error as { code?: unknown }).code;
  // Refused for its length and not readable as QEMU reads it: the edge case in the design note.
  if (code === "ERR_BUFFER_TOO_LARGE") return "the stream breaks within the input byte that completes the cluster";
  return (error as Error).message;
}

/** Output allowance past one cluster for the inflate of a prefix: one input byte completes at most 8 codes of at most 258 bytes. */
const PREFIX_OUTPUT_SLACK_BYTES = 8 * 258;

/**
 * Whether QEMU's one inflate call into a cluster-sized buffer fills it
 * without an error. node:zlib's first call gets an output chunk of one
 * cluster; with maxOutputLength one byte below that, a full chunk stops it
 * with ERR_BUFFER_TOO_LARGE before a second call, and an error of the
 * first call is thrown as that error.
 */
function firstCallFills(zlib: typeof Zlib, input: Uint8Array, clusterSizeBytes: number): boolean {
  try {
    zlib.inflateRawSync(input, { windowBits: 15, finishFlush: zlib.constants.Z_SYNC_FLUSH, chunkSize: clusterSizeBytes, maxOutputLength: clusterSizeBytes - 1 });
    return false;
  } catch (error) {
    return (error as { code?: unknown }).code === "ERR_BUFFER_TOO_LARGE";
  }
}

/**
 * The bytes of QEMU's inflate for a raw deflate stream node:zlib refused
 * and whose first call fills a cluster (firstCallFills): the first
 * `clusterSizeBytes` bytes of output, and the input they took; null when
 * the stream breaks first. The output of a prefix of the input is
 * a prefix of the output (Z_SYNC_FLUSH: no error for input that just ends),
 * so the shortest prefix that reaches a cluster or fails is bisected; if
 * it reaches a cluster, QEMU's buffer would have filled there.
 */
function inflatePrefix(zlib: typeof Zlib, input: Uint8Array, clusterSizeBytes: number): { out: Uint8Array; consumedBytes: number } | null {
  /** "short": fewer bytes than a cluster; "full": at least a cluster (output when it fit the allowance); "broken". */
  const attempt = (length: number, allowance: number): { state: "short" | "full" | "broken"; out?: Buffer } => {
    try {
      const out = zlib.inflateRawSync(input.subarray(0, length), { windowBits: 15, finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: allowance });
      return out.length >= clusterSizeBytes ? { state: "full", out } : { state: "short" };
    } catch (error) {
      return (error as { code?: unknown }).code === "ERR_BUFFER_TOO_LARGE" ? { state: "full" } : { state: "broken" };
    }
  };
  let low = 0; // short
  let high = input.length; // not short (node:zlib refused the whole input)
  while (high - low > 1) {
    const middle = Math.floor((low + high) / 2);
    if (attempt(middle, clusterSizeBytes).state === "short") low = middle;
    else high = middle;
  }
  const found = attempt(high, clusterSizeBytes + PREFIX_OUTPUT_SLACK_BYTES);
  if (found.state !== "full" || found.out === undefined) return null;
  return { out: found.out.subarray(0, clusterSizeBytes), consumedBytes: high };
}

/** Decompress one cluster from `input`: the output, and how many input bytes its stream took. */
function inflateCluster(input: Uint8Array, compressionType: number, clusterSizeBytes: number): { out: Uint8Array; consumedBytes: number } {
  const zlib = zlibModule();
  let out: Uint8Array;
  let consumedBytes: number;
  if (compressionType === COMPRESSION_TYPE_ZLIB) {
    try {
      const result = zlib.inflateRawSync(input, { windowBits: 15, finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: clusterSizeBytes, info: true }) as unknown as {
        buffer: Buffer;
        engine: { bytesWritten: number };
      };
      out = result.buffer;
      consumedBytes = result.engine.bytesWritten;
    } catch (error) {
      const prefix = firstCallFills(zlib, input, clusterSizeBytes) ? inflatePrefix(zlib, input, clusterSizeBytes) : null;
      if (prefix === null) throw compressionError(`compressed cluster does not inflate to ${clusterSizeBytes} bytes: ${zlibReason(error)}`);
      out = prefix.out;
      consumedBytes = prefix.consumedBytes;
    }
  } else if (compressionType === COMPRESSION_TYPE_ZSTD) {
    const parts: Uint8Array[] = [];
    let produced = 0;
    let rest = input;
    while (produced < clusterSizeBytes) {
      const frameBytes = zstdFrameBytes(rest);
      if (frameBytes < 0) throw compressionError("zstd compressed cluster is truncated or not a zstd frame");
      try {
        const part = zlib.zstdDecompressSync(rest.subarray(0, frameBytes), { maxOutputLength: clusterSizeBytes });
        parts.push(part);
        produced += part.length;
      } catch (error) {
        throw compressionError(`cannot decompress zstd cluster: ${(error as Error).message}`);
      }
      rest = rest.subarray(frameBytes);
    }
    out = parts.length === 1 ? parts[0] : Buffer.concat(parts);
    consumedBytes = input.length - rest.length;
  } else {
    throw new SnapstackError("E_UNSUPPORTED_FEATURE", `unknown compression type ${compressionType}`);
  }
  if (out.length < clusterSizeBytes) {
    throw compressionError(`compressed cluster decompresses to ${out.length} bytes, expected ${clusterSizeBytes}`);
  }
  return { out: out.length === clusterSizeBytes ? out : out.subarray(0, clusterSizeBytes), consumedBytes };
}

/**
 * Decompress one cluster from `input` (the bytes from the compressed
 * offset to the end of its last sector). Returns exactly clusterSizeBytes.
 */
export function decompressCluster(input: Uint8Array, compressionType: number, clusterSizeBytes: number): Uint8Array {
  return inflateCluster(input, compressionType, clusterSizeBytes).out;
}

/**
 * How many bytes of `input` (as for decompressCluster) the compressed
 * stream takes: its sectors' last bytes may begin the next compressed
 * cluster (QEMU packs them at byte granularity), so a wipe of this one
 * must stop there.
 */
export function compressedStreamBytes(input: Uint8Array, compressionType: number, clusterSizeBytes: number): number {
  return inflateCluster(input, compressionType, clusterSizeBytes).consumedBytes;
}
