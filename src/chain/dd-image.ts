/**
 * qemu-img dd (img_dd in qemu-img.c, 7.2): copy a byte range of an image
 * into a new image, block by block, every byte written (the output is not
 * sparse: a qcow2 output has every cluster allocated).
 *
 * What qemu-img 7.2 does, and this does:
 * - the range ends at count * bs when that is less than the input's size
 *   (counted from the input's start, not from skip), and starts at
 *   skip * bs; the output is created (over any file of that name) with the
 *   range's length, rounded up to 512 bytes as create rounds it;
 * - a skip past that end creates an empty output and reports "cannot skip
 *   to specified offset", exiting 0 as qemu-img 7.2 does (a warning here);
 * - the copy goes in COPY_CHUNK_BYTES pieces whatever bs is (the bytes
 *   written are the same; qemu-img copies bs at a time).
 */
import { SnapstackError } from "../base/errors.ts";
import { COPY_CHUNK_BYTES } from "./copy-pipeline.ts";
import { createImage } from "./create-image.ts";
import { parseImageFormat, parseOutputFormat } from "./image-format.ts";
import { refuseWritingInput } from "./layer-file.ts";
import { openImage } from "./open-image.ts";

export interface DdImageOptions {
  /** Input format (probed when omitted). */
  format?: string;
  /** Output format (default raw). */
  outputFormat?: string;
  /** Bytes per block (bs=; default 512). */
  blockBytes?: number;
  /** Blocks (count=): the copy ends at count * bs at most. */
  count?: number;
  /** Blocks skipped at the input's start (skip=). */
  skip?: number;
  /** -U: read an input another process holds open for writing. */
  forceShare?: boolean;
}

export interface DdImageResult {
  /** Bytes copied into the output. */
  copiedBytes: number;
  /** The skip lay past the range's end: the output was created empty (qemu-img's "cannot skip to specified offset"). */
  skippedPastEnd: boolean;
}

/** bs= as qemu-img checks it. */
export const DD_BLOCK_BYTES_MAX = 2147483647;

export async function ddImage(inputPath: string, outputPath: string, options: DdImageOptions = {}): Promise<DdImageResult> {
  const blockBytes = options.blockBytes ?? 512;
  if (!Number.isSafeInteger(blockBytes) || blockBytes < 1 || blockBytes > DD_BLOCK_BYTES_MAX) {
    throw new SnapstackError("E_INVALID_SIZE", `Invalid bs specified. Must be between 1 and ${DD_BLOCK_BYTES_MAX}.`);
  }
  const input = await openImage(inputPath, { format: options.format === undefined ? undefined : parseImageFormat(options.format), readOnly: true, forceShare: options.forceShare });
  try {
    let endBytes = input.sizeBytes;
    if (options.count !== undefined && options.count * blockBytes < endBytes) endBytes = options.count * blockBytes;
    const startBytes = (options.skip ?? 0) * blockBytes;
    const skippedPastEnd = startBytes > endBytes;
    const lengthBytes = skippedPastEnd ? 0 : endBytes - startBytes;
    const outputFormat = parseOutputFormat(options.outputFormat ?? "raw");
    refuseWritingInput(outputPath, "output", [["the input image", input]]);
    await createImage(outputPath, { format: outputFormat, sizeBytes: lengthBytes, options: {} });
    if (skippedPastEnd || lengthBytes === 0) return { copiedBytes: 0, skippedPastEnd };
    const output = await openImage(outputPath, { format: outputFormat, readOnly: false });
    try {
      const buffer = new Uint8Array(Math.min(COPY_CHUNK_BYTES, lengthBytes));
      for (let done = 0; done < lengthBytes; ) {
        const piece = buffer.subarray(0, Math.min(buffer.length, lengthBytes - done));
        await input.read(startBytes + done, piece);
        await output.write(done, piece);
        done += piece.length;
      }
      await output.flush();
    } finally {
      await output.close();
    }
    return { copiedBytes: lengthBytes, skippedPastEnd };
  } finally {
    await input.close();
  }
}
