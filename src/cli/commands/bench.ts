/**
 * `snapstack img bench [-c count] [-d depth] [-f fmt] [--flush-interval=N]
 * [-i aio] [--no-drain] [-o offset] [--pattern=N] [-q] [-s buffer_size]
 * [-S step_size] [-t cache] [-w] [-U] filename`
 *
 * qemu-img 7.2's bench (chain/bench-image.ts): the same options, defaults
 * (75000 requests of 4 KiB, 64 in flight) and lines printed, so the two can
 * be timed on the same image with the same command line. qemu-img prints
 * its lines even with -q, and so does this. Differences: no O_DIRECT (-n,
 * -t none or directsync are refused rather than measured through the page
 * cache), a wrapped request never runs past the end (see bench-image.ts), a
 * first request past the end and -d 0 are refused before the run (qemu-img
 * 7.2 fails the first with EIO and hangs on the second).
 */
import { SnapstackError } from "../../base/errors.ts";
import { parseSizeInt64 } from "../../base/units.ts";
import type { NodeFileCacheMode, NodeFileIoMode } from "../../io/node-file.ts";
import { optionFlag, optionString, parseArgs } from "../args.ts";
import { checkCacheOptions, expectPositionals, refuseForceShareForWriting } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { benchImage, checkBenchOptions, openImage } from "../engine.ts";

const INT_MAX = 2 ** 31 - 1;
const AIO_MODES: Readonly<Record<string, NodeFileIoMode>> = { threads: "async", native: "auto", io_uring: "auto" };

/** qemu_strtoui for an option, refused with qemu-img's message. */
function unsignedOption(text: string | undefined, fallback: number, message: string, max = INT_MAX): number {
  if (text === undefined) return fallback;
  const value = /^(0x[0-9a-f]+|\d+)$/i.test(text) ? Number(text) : Number.NaN;
  if (!Number.isSafeInteger(value) || value > max) throw new SnapstackError("E_INVALID_OPTION", message, { text });
  return value;
}

/** qemu's cvtnum_full(what, text, 0, INT_MAX). */
function sizeOption(text: string | undefined, fallback: number, what: string): number {
  if (text === undefined) return fallback;
  const value = parseSizeInt64(text, what);
  if (value > BigInt(INT_MAX)) throw new SnapstackError("E_INVALID_SIZE", `Invalid ${what} specified. Must be between 0 and ${INT_MAX}.`, { text });
  return Number(value);
}

export const benchCommand: CliCommand = {
  name: "bench",
  synopsis: "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename",
  summary: "Time a run of reads or writes on an image, as qemu-img bench.",
  optionHelp: [
    "  -c count            requests (default 75000)",
    "  -d depth            requests in flight (default 64)",
    "  -s size / -S step   bytes per request (default 4096) / between offsets (default: the size)",
    "  -o offset           first offset; later ones wrap before the end",
    "  -w                  write (the --pattern byte, default 0) instead of read",
    "  --flush-interval=N  flush every N requests (writes; --no-drain: beside the requests)",
    "  -i aio              threads (every request on the thread pool), native or io_uring (the default I/O)",
    "  -t cache            writeback (default) or unsafe; none, directsync and -n (O_DIRECT) are refused",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "count", short: "c", value: true },
      { name: "depth", short: "d", value: true },
      { name: "format", short: "f", value: true },
      { name: "flushInterval", long: "flush-interval", value: true },
      { name: "aio", short: "i", value: true },
      { name: "nocache", short: "n" },
      { name: "noDrain", long: "no-drain" },
      { name: "offset", short: "o", value: true },
      { name: "pattern", long: "pattern", value: true },
      { name: "quiet", short: "q" },
      { name: "bufferSize", short: "s", value: true },
      { name: "stepSize", short: "S", value: true },
      { name: "cache", short: "t", value: true },
      { name: "write", short: "w" },
      { name: "forceShare", short: "U", long: "force-share" },
    ]);
    checkCacheOptions(parsed);
    expectPositionals(parsed.positionals, 1, 1, "Expecting one image file name");
    const write = optionFlag(parsed, "write");
    refuseForceShareForWriting(parsed, write);
    const cacheText = optionString(parsed, "cache") ?? "writeback";
    if (optionFlag(parsed, "nocache") || cacheText === "none" || cacheText === "off" || cacheText === "directsync" || cacheText === "writethrough") {
      throw new SnapstackError("E_UNSUPPORTED_FEATURE", `cache mode ${optionFlag(parsed, "nocache") ? "none (-n)" : cacheText} is not supported (snapstack does buffered I/O; use writeback or unsafe)`);
    }
    const aioText = optionString(parsed, "aio");
    if (aioText !== undefined && !Object.hasOwn(AIO_MODES, aioText)) throw new SnapstackError("E_INVALID_OPTION", `Invalid aio option: ${aioText}`);
    const count = unsignedOption(optionString(parsed, "count"), 75000, "Invalid request count specified");
    const depth = unsignedOption(optionString(parsed, "depth"), 64, "Invalid queue depth specified");
    const flushInterval = unsignedOption(optionString(parsed, "flushInterval"), 0, "Invalid flush interval specified");
    const patternByte = unsignedOption(optionString(parsed, "pattern"), 0, "Invalid pattern byte specified", 0xff);
    const bufferBytes = sizeOption(optionString(parsed, "bufferSize"), 4096, "buffer size");
    const stepBytes = sizeOption(optionString(parsed, "stepSize"), 0, "step_size");
    const offsetText = optionString(parsed, "offset");
    const offset = offsetText === undefined ? 0 : Number(parseSizeInt64(offsetText, "offset"));
    const options = { count, depth, bufferBytes, stepBytes, offset, write, patternByte, flushInterval, drain: !optionFlag(parsed, "noDrain") };
    checkBenchOptions(options);
    const ioMode = aioText === undefined ? "auto" : AIO_MODES[aioText];
    const device = await openImage(parsed.positionals[0], {
      format: optionString(parsed, "format"),
      readOnly: !write,
      forceShare: optionFlag(parsed, "forceShare"),
      ioMode,
      cache: cacheText as NodeFileCacheMode,
    });
    try {
      context.out(
        `Sending ${count} ${write ? "write" : "read"} requests, ${bufferBytes} bytes each, ${depth} in parallel (starting at offset ${offset}, step size ${stepBytes === 0 ? bufferBytes : stepBytes})\n`,
      );
      if (flushInterval > 0) context.out(`Sending flush every ${flushInterval} requests\n`);
      const result = await benchImage(device, options);
      context.out(`Run completed in ${result.seconds.toFixed(3)} seconds.\n`);
    } finally {
      await device.close();
    }
    return 0;
  },
};
