/**
 * qemu-img bench: `count` reads or writes of `bufferBytes` each, `depth` in
 * flight, from `offset` on in steps of `stepBytes`, timed.
 *
 * Design notes
 * - The same request sequence as qemu-img 7.2's bench_cb: the first request
 *   at the given offset, each next one `stepBytes` further, wrapped. The
 *   wrap is qemu's later fix (commit ff2ab634): modulo the image size less
 *   one buffer (0 when the image is no larger than a buffer), so a wrapped
 *   request never runs past the end; 7.2 wraps modulo the whole size and
 *   then fails such a request with EIO.
 * - `depth` buffers are allocated once and reused in turn; writes send
 *   `patternByte` everywhere, reads are discarded.
 * - Flushes (writes only): after every `flushInterval` completed requests,
 *   a flush; by default new requests wait for the ones in flight to end
 *   first and for the flush (qemu's drain), with `drain: false` the flush
 *   runs beside them.
 * - The time covers the requests and flushes only, not the open or close
 *   (qemu takes it around its request loop too).
 */
import { SnapstackError } from "../base/errors.ts";
import type { BlockDevice } from "../device/block-device.ts";
import { allocateIoBuffer } from "../io/io-buffer.ts";

export interface BenchImageOptions {
  count: number;
  depth: number;
  bufferBytes: number;
  /** Distance between consecutive requests' offsets (0: bufferBytes, as qemu-img). */
  stepBytes: number;
  offset: number;
  write: boolean;
  /** The byte writes send. */
  patternByte: number;
  /** Flush after every this many requests (writes only; 0: never). */
  flushInterval: number;
  /** Whether requests wait for a flush (and the flush for the requests before it); default true. */
  drain?: boolean;
}

export interface BenchImageResult {
  seconds: number;
  /** The step used (stepBytes, or bufferBytes for 0). */
  stepBytes: number;
}

/** The offset after `offset` (bench_cb's wrap, as fixed after 7.2: see the design notes). */
export function nextBenchOffset(offset: number, stepBytes: number, imageBytes: number, bufferBytes: number): number {
  if (imageBytes <= bufferBytes) return 0;
  return (offset + stepBytes) % (imageBytes - bufferBytes);
}

/** Refuse what qemu-img bench refuses before it opens the image (its messages); also a depth of 0, on which 7.2 hangs. */
export function checkBenchOptions(options: BenchImageOptions): void {
  if (options.depth < 1) throw new SnapstackError("E_INVALID_OPTION", "Invalid queue depth specified");
  if (options.flushInterval > 0 && !options.write) throw new SnapstackError("E_USAGE", "--flush-interval is only available in write tests");
  // Also without drain, as qemu-img refuses it.
  if (options.flushInterval > 0 && options.flushInterval < options.depth) throw new SnapstackError("E_INVALID_OPTION", "Flush interval can't be smaller than depth");
}

/** Run the bench on an open device (read-only unless `write`). */
export async function benchImage(device: BlockDevice, options: BenchImageOptions): Promise<BenchImageResult> {
  checkBenchOptions(options);
  const { count, depth, bufferBytes, offset: firstOffset, write, flushInterval } = options;
  const stepBytes = options.stepBytes === 0 ? bufferBytes : options.stepBytes;
  const drain = options.drain ?? true;
  if (count > 0 && firstOffset + bufferBytes > device.sizeBytes) {
    throw new SnapstackError("E_OUT_OF_RANGE", `Failed request: offset ${firstOffset} + ${bufferBytes} bytes lies past the end of the image (${device.sizeBytes} bytes)`);
  }
  const buffers = Array.from({ length: Math.min(depth, Math.max(count, 1)) }, () => {
    const buffer = allocateIoBuffer(bufferBytes);
    if (write) buffer.fill(options.patternByte);
    return buffer;
  });
  let nextOffset = firstOffset;
  let submitted = 0;
  let completed = 0;
  let inFlight = 0;
  let failure: unknown = null;
  /** Flushes started beside requests (drain: false), awaited at the end. */
  const sideFlushes: Promise<void>[] = [];
  const started = performance.now();
  await new Promise<void>((resolve) => {
    /** A drained flush is due: no request starts until the ones in flight end and it is done. */
    let flushDue = false;
    const finish = (): void => {
      if (inFlight === 0 && (failure !== null || completed === count)) resolve();
    };
    const submit = (): void => {
      while (failure === null && inFlight < buffers.length && submitted < count) {
        // Two requests may share a buffer when they complete out of order: harmless, as every write buffer holds the pattern and reads are discarded.
        const buffer = buffers[submitted % buffers.length];
        const offset = nextOffset;
        nextOffset = nextBenchOffset(nextOffset, stepBytes, device.sizeBytes, bufferBytes);
        submitted++;
        inFlight++;
        const request = write ? device.write(offset, buffer) : device.read(offset, buffer).then(() => undefined);
        request.then(onDone, (error: unknown) => {
          failure ??= error;
          onDone();
        });
      }
      finish();
    };
    const onDone = (): void => {
      inFlight--;
      completed++;
      if (failure === null && flushInterval > 0 && completed % flushInterval === 0) {
        if (drain) {
          flushDue = true;
        } else {
          const flush = device.flush();
          flush.catch(() => undefined); // its failure is reported by the Promise.all below
          sideFlushes.push(flush);
        }
      }
      if (!flushDue) {
        submit();
        return;
      }
      if (inFlight > 0) return;
      flushDue = false;
      device.flush().then(submit, (error: unknown) => {
        failure ??= error;
        finish();
      });
    };
    submit();
  });
  await Promise.all(sideFlushes);
  if (failure !== null) throw failure;
  return { seconds: (performance.now() - started) / 1000, stepBytes };
}
