/**
 * `snapstack img convert [-f fmt] [-O fmt] [-o opts] [-c] [-S size] [-p]
 *  [-B backing [-F fmt]] [-n] [-q] SOURCE TARGET`
 */
import { SnapstackError } from "../../base/errors.ts";
import { parseSize } from "../../base/units.ts";
import { QEMU_UNIMPLEMENTED, optionFlag, optionString, parseArgs, type ParseArgsOptions } from "../args.ts";
import { checkCacheOptions, createProgress, parseRateLimit } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { checkCreateOptions, formatOptionHelp, isHelpRequest, parseOptionList } from "../create-options.ts";
import { convertImage } from "../engine.ts";

/** qemu-img convert's long options snapstack lacks: the usual ones and --target-image-opts (`--target` stays ambiguous, as in qemu-img, instead of meaning --target-is-zero). */
const CONVERT_SETTINGS: ParseArgsOptions = { unimplementedLong: [...QEMU_UNIMPLEMENTED, { long: "target-image-opts", value: false }] };
import { openSource, parseSnapshotParam } from "../snapshot-source.ts";

/** qemu-img's MAX_BUF_SECTORS * 512: the largest -S. */
export const SPARSE_SIZE_MAX_BYTES = 32768 * 512;
const SECTOR_BYTES = 512;

function parseSparseSize(text: string): number {
  const invalid = new SnapstackError(
    "E_INVALID_SIZE",
    `Invalid buffer size for sparse output specified. Valid sizes are multiples of ${SECTOR_BYTES} up to ${SPARSE_SIZE_MAX_BYTES}. Select 0 to disable sparse detection (fully allocates output).`,
    { text },
  );
  let bytes: number;
  try {
    bytes = parseSize(text, { what: "buffer size for sparse output" });
  } catch {
    throw invalid;
  }
  if (bytes % SECTOR_BYTES !== 0 || bytes > SPARSE_SIZE_MAX_BYTES) throw invalid;
  return bytes;
}

/** qemu-img's MAX_COROUTINES: -m is checked as qemu-img checks it (the copy pipeline sets its own depth). */
const COROUTINES_MAX = 16;

function checkCoroutines(text: string | undefined): void {
  if (text === undefined) return;
  const count = /^\s*[+-]?\d+$/.test(text) ? Number(text) : Number.NaN;
  if (!(count >= 1 && count <= COROUTINES_MAX)) {
    throw new SnapstackError("E_USAGE", `Invalid number of coroutines. Allowed number of coroutines is between 1 and ${COROUTINES_MAX}`, { text });
  }
}

export const convertCommand: CliCommand = {
  name: "convert",
  synopsis: "convert [-c] [-f fmt] [-O output_fmt] [-o options] [-l snapshot_param] [-S sparse_size] [-B backing_file [-F backing_fmt]] [-n] [--target-is-zero] [--bitmaps [--skip-broken-bitmaps]] [-r rate] [-m num] [-W] [-C] [--salvage] [-p] [-q] [-U] filename output_filename",
  summary: "Copy an image's guest content into a new image, optionally in another format or compressed.",
  optionHelp: [
    "  -f fmt           source format; detected when omitted",
    "  -O output_fmt    target format (default raw)",
    "  -o options       target format options; '-o help' lists them",
    "  -c               compress the target (qcow2)",
    "  -l snapshot      convert this internal snapshot (ID, name, snapshot.id=ID or snapshot.name=NAME)",
    "  -S sparse_size   zero runs of this size stay unallocated (default 4k; 0 allocates all)",
    "  -B backing_file  give the target this backing file (needs -F); only the top layer is copied",
    "  -F backing_fmt   format of the -B backing file",
    "  -n               the target exists already: do not create it",
    "  --target-is-zero with -n: the target reads as zeroes already; zero ranges are not written",
    "  --bitmaps        copy the source's persistent dirty bitmaps (qcow2 target); --skip-broken-bitmaps leaves out in-use ones",
    "  -r rate          read at most rate bytes of data per second (k, M, G suffixes)",
    "  -m n, -W, -C     accepted as qemu-img accepts them (the copy's depth and order are snapstack's own)",
    "  --salvage        copy sectors that cannot be read (I/O errors, damaged clusters) as zeroes, with a warning each",
    "  -p               show progress",
    "  -q               quiet",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "format", short: "f", value: true },
      { name: "snapshotParam", short: "l", value: true },
      { name: "outputFormat", short: "O", value: true },
      { name: "options", short: "o", value: true, repeat: "comma" },
      { name: "compress", short: "c" },
      { name: "sparse", short: "S", value: true },
      { name: "backingFile", short: "B", value: true },
      { name: "backingFormat", short: "F", value: true },
      { name: "noCreate", short: "n" },
      { name: "progress", short: "p" },
      { name: "quiet", short: "q" },
      { name: "forceShare", short: "U", long: "force-share" },
      { name: "cache", short: "t", value: true },
      { name: "sourceCache", short: "T", value: true },
      { name: "parallel", short: "m", value: true },
      { name: "outOfOrder", short: "W" },
      { name: "rate", short: "r", value: true },
      { name: "copyOffload", short: "C" },
      { name: "targetIsZero", long: "target-is-zero" },
      { name: "bitmaps", long: "bitmaps" },
      { name: "skipBrokenBitmaps", long: "skip-broken-bitmaps" },
      { name: "salvage", long: "salvage" },
    ], CONVERT_SETTINGS);
    checkCacheOptions(parsed);
    checkCoroutines(optionString(parsed, "parallel"));
    const rateLimitBytesPerSecond = parseRateLimit(optionString(parsed, "rate"));
    const targetIsZero = optionFlag(parsed, "targetIsZero");
    if (targetIsZero && !optionFlag(parsed, "noCreate")) throw new SnapstackError("E_USAGE", "--target-is-zero requires use of -n flag");
    const skipBrokenBitmaps = optionFlag(parsed, "skipBrokenBitmaps");
    if (skipBrokenBitmaps && !optionFlag(parsed, "bitmaps")) throw new SnapstackError("E_USAGE", "Use of --skip-broken-bitmaps requires --bitmaps");
    if (optionFlag(parsed, "copyOffload")) {
      // -C asks qemu-img for copy_file_range; snapstack copies through memory either way (measured faster
      // here: docs/benchmarks.md), so -C only keeps qemu-img's refusals.
      if (optionFlag(parsed, "compress")) throw new SnapstackError("E_USAGE", "Cannot enable copy offloading when -c is used");
      if (optionString(parsed, "sparse") !== undefined) throw new SnapstackError("E_USAGE", "Cannot enable copy offloading when -S is used");
    }
    const salvage = optionFlag(parsed, "salvage");
    if (salvage && optionFlag(parsed, "copyOffload")) throw new SnapstackError("E_USAGE", "Cannot use copy offloading in salvaging mode");
    const outputFormat = optionString(parsed, "outputFormat") ?? "raw";
    const entries = parseOptionList(optionString(parsed, "options") ?? "");
    if (isHelpRequest(entries)) {
      context.out(formatOptionHelp(outputFormat, parsed.positionals.length >= 2));
      return 0;
    }
    if (optionFlag(parsed, "noCreate") && entries.length > 0) throw new SnapstackError("E_USAGE", "-o has no effect when skipping image creation");
    const sparseText = optionString(parsed, "sparse");
    const sparseSizeBytes = sparseText === undefined ? undefined : parseSparseSize(sparseText);
    if (parsed.positionals.length < 2) throw new SnapstackError("E_USAGE", "Must specify image file name");
    if (parsed.positionals.length > 2) throw new SnapstackError("E_USAGE", "only one source image is supported");
    const [sourcePath, targetPath] = parsed.positionals;
    const checked = checkCreateOptions(outputFormat, entries);
    // -o backing_file / backing_fmt mean what -B / -F mean (only the top layer is copied); -B and -F win (qemu-img.c).
    const { backing_file: _backingFile, backing_fmt: _backingFormat, ...formatOptions } = checked.typed;
    const backingFile = optionString(parsed, "backingFile") ?? checked.given.backing_file;
    const backingFormat = optionString(parsed, "backingFormat") ?? checked.given.backing_fmt;
    if (backingFile !== undefined && backingFormat === undefined) {
      throw new SnapstackError("E_BACKING_FORMAT", "Use of backing file requires explicit backing format", { backingFile });
    }
    if (backingFile === undefined && backingFormat !== undefined) {
      throw new SnapstackError("E_BACKING_FORMAT", `${targetPath}: Backing format cannot be used without backing file`, { backingFormat });
    }
    const compress = optionFlag(parsed, "compress");
    if (compress && outputFormat !== "qcow2") {
      throw new SnapstackError("E_UNSUPPORTED_FEATURE", "Compression not supported for this file format", { format: outputFormat });
    }
    const quiet = optionFlag(parsed, "quiet");
    const snapshotParam = optionString(parsed, "snapshotParam");
    const snapshot = snapshotParam === undefined ? undefined : parseSnapshotParam(snapshotParam);
    const opened = await openSource(sourcePath, { format: optionString(parsed, "format"), readOnly: true, forceShare: optionFlag(parsed, "forceShare"), snapshot, locks: { stableSource: true } });
    const source = opened.device;
    try {
      const showProgress = optionFlag(parsed, "progress") && !quiet;
      const progress = createProgress(context, showProgress);
      await convertImage(source, targetPath, {
        format: outputFormat,
        options: formatOptions,
        compress,
        sparseSizeBytes,
        backingFile,
        backingFormat,
        targetExists: optionFlag(parsed, "noCreate"),
        targetIsZero,
        rateLimitBytesPerSecond,
        bitmaps: optionFlag(parsed, "bitmaps") ? (skipBrokenBitmaps ? "skip-broken" : "copy") : undefined,
        bitmapSource: opened.image,
        onWarning: (message) => context.err(`snapstack: warning: ${message}\n`),
        salvage,
        // qemu-img: unless -q, each sector that cannot be read is a warning.
        onSalvaged: quiet ? undefined : (warning) => context.err(`snapstack: warning: ${warning}\n`),
        // Without -p, no metadata pass to count the bytes first.
        onProgress: showProgress ? (fraction) => progress.update(fraction) : undefined,
      });
      progress.update(1);
      progress.end();
    } finally {
      await opened.close();
    }
    return 0;
  },
};
