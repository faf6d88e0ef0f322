/**
 * qemu-io's commands over a BlockDevice: read, readv, write, writev,
 * aio_read, aio_write, aio_flush, discard, flush, truncate, length, info,
 * alloc, map, sleep.
 *
 * Output follows qemu-io 7.2 (qemu-io-cmds.c): "wrote 4096/4096 bytes at
 * offset 0", then the statistics line "4 KiB, 1 ops; 00.00 sec (... /sec and
 * ... ops/sec)" whose timings naturally differ; `read -v` prints qemu-io's
 * hexdump; `map` prints allocated/not allocated runs of the whole chain.
 * Offsets and lengths take qemu's size suffixes; errors use qemu-io's words.
 * A command that fails prints what qemu-io prints for it on stdout (its
 * command handlers report with printf: "read failed: Input/output error",
 * "Parsing error: ...") as well as the coded error line on stderr
 * (IoCommandError; io-command.ts prints both).
 */
import { SnapstackError, qemuErrnoText, type ErrorCode } from "../../base/errors.ts";
import { QEMU_SIZE_MAX, formatFixed, formatIoSize, parseSizeBig } from "../../base/units.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { optionFlag, optionString, parseArgs, type OptionSpec, type ParsedArgs } from "../args.ts";
import type { CliContext } from "../context.ts";
import { canWriteCompressed } from "../engine.ts";
import { toSnapstackError } from "../error-report.ts";
import { formatFormatSpecific } from "../render-info.ts";
import { formatSpecificInfo } from "../../chain/image-info.ts";
import { Qcow2Image } from "../../formats/qcow2/index.ts";
import { RAW_PREALLOCATION_MODES, RawImage, type RawPreallocation } from "../../formats/raw/raw-image.ts";

/** qemu's BDRV_REQUEST_MAX_BYTES: one request is at most INT_MAX rounded down to 512. */
export const IO_REQUEST_MAX_BYTES = 2147483136;
const SECTOR_BYTES = 512;
/** qemu-io's default byte for `write` without -P. */
const WRITE_DEFAULT_PATTERN = 0xcd;

/** What outlives one command of a session: the aio requests still running. */
export interface IoSession {
  /** Let a request run on; its failure is reported when it ends. */
  start(request: Promise<void>): void;
  /** Wait for every request started. */
  drain(): Promise<void>;
}

export interface IoSubcommand {
  name: string;
  aliases?: string[];
  synopsis: string;
  /**
   * qemu-io's usage line for the command (its help text: options snapstack
   * does not take included), printed on stdout for a bad option or argument
   * count as qemu-io's qemuio_command_usage prints it.
   */
  qemuUsage?: string;
  /** qemu-io's argmin and argmax (default no limit): words, options included, checked before anything else. */
  wordsMin?: number;
  wordsMax?: number;
  /** Changes the image (qemu-io's BLK_PERM_WRITE): refused on a read-only image before its arguments are read. */
  writes?: boolean;
  run(device: BlockDevice, args: string[], context: CliContext, session: IoSession): Promise<void>;
}

/** A failed io command, with the line qemu-io prints for the same failure on stdout. */
export class IoCommandError extends SnapstackError {
  readonly stdoutLine: string;

  constructor(code: ErrorCode, stdoutLine: string, message = stdoutLine, details: Record<string, unknown> = {}) {
    super(code, message, details);
    this.stdoutLine = stdoutLine;
  }
}

/** Run a request on the device; a failure becomes qemu-io's "<op> failed: <strerror>" (and keeps its own code and message). */
async function deviceRequest(op: string, request: () => Promise<void>): Promise<void> {
  try {
    await request();
  } catch (error) {
    const failure = toSnapstackError(error);
    throw new IoCommandError(failure.code, `${op} failed: ${qemuErrnoText(failure.code)}`, failure.message, failure.details);
  }
}

/** A bad option or argument count: qemu-io prints the command's usage line on stdout (IoSubcommand.qemuUsage). */
export class IoUsageError extends SnapstackError {
  constructor(message: string) {
    super("E_USAGE", message);
  }
}

function parseWords(name: string, args: string[], specs: OptionSpec[]): ParsedArgs {
  try {
    return parseArgs(args, specs, { style: "glibc", program: name });
  } catch (error) {
    if (error instanceof SnapstackError && error.code === "E_USAGE") throw new IoUsageError(error.message);
    throw error;
  }
}

/** qemu-io's cvtnum with its error messages. */
export function parseIoNumber(text: string): number {
  let value: bigint;
  try {
    value = parseSizeBig(text);
  } catch {
    throw new IoCommandError("E_INVALID_SIZE", `Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${text}`, undefined, { text });
  }
  // qemu's limit is INT64_MAX. Past 2^53 the number is not exact, but it is then far beyond
  // any request or image limit, which refuses it as qemu-io does ("length cannot exceed", EIO).
  if (value > QEMU_SIZE_MAX) {
    throw new IoCommandError("E_INVALID_SIZE", `Parsing error: argument too large -- ${text}`, undefined, { text });
  }
  return Number(value);
}

function parsePattern(text: string): number {
  // strtol(arg, &end, 0): decimal, 0x hex or 0 octal.
  const match = /^\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)$/.exec(text);
  let value = Number.NaN;
  if (match !== null) {
    const digits = match[2];
    value = /^0[xX]/.test(digits) ? parseInt(digits.slice(2), 16) : digits.length > 1 && digits[0] === "0" ? parseInt(digits, 8) : Number(digits);
    if (match[1] === "-") value = -value;
  }
  if (!(value >= 0 && value <= 255)) throw new IoCommandError("E_USAGE", `${text} is not a valid pattern byte`, undefined, { text });
  return value;
}

/**
 * OFFSET LENGTH of read, write and discard. `write` names its -n, which
 * lifts the limit (a zero write without fallback: qemu-io's write_f).
 */
function offsetAndLength(name: string, positionals: string[], write: { noFallback: boolean } | null = null): { guestOffset: number; lengthBytes: number } {
  if (positionals.length !== 2) {
    throw new IoUsageError(`${name}: expected OFFSET LENGTH, got ${positionals.length} argument(s)`);
  }
  const guestOffset = parseIoNumber(positionals[0]);
  const lengthBytes = parseIoNumber(positionals[1]);
  if (lengthBytes > IO_REQUEST_MAX_BYTES && write?.noFallback !== true) {
    throw new IoCommandError("E_INVALID_SIZE", `length cannot exceed ${IO_REQUEST_MAX_BYTES}${write === null ? "" : " without -n"}, given ${positionals[1]}`);
  }
  return { guestOffset, lengthBytes };
}

/** Refuse requests outside the disk before touching it (qemu-io reports EIO). */
function checkRange(device: BlockDevice, op: string, guestOffset: number, lengthBytes: number): void {
  if (guestOffset + lengthBytes > device.sizeBytes) {
    throw new IoCommandError(
      "E_OUT_OF_RANGE",
      `${op} failed: Input/output error`,
      `${op} failed: guest offset ${guestOffset} + length ${lengthBytes} exceeds virtual size ${device.sizeBytes} of ${device.name}`,
      { guestOffset, lengthBytes, sizeBytes: device.sizeBytes },
    );
  }
}

function requireSectorAligned(value: number, what: string): void {
  if (value % SECTOR_BYTES !== 0) {
    throw new IoCommandError("E_USAGE", `${value} is not a sector-aligned value for '${what}'`, undefined, { value });
  }
}

/** qemu-io's dump_buffer: 16 bytes a row, isalnum() characters shown. */
export function formatHexdump(data: Uint8Array, guestOffset: number): string {
  let out = "";
  for (let row = 0; row < data.length; row += 16) {
    const bytes = data.subarray(row, Math.min(row + 16, data.length));
    const hex = Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0") + " ").join("");
    const text = Array.from(bytes, (byte) => (/^[A-Za-z0-9]$/.test(String.fromCharCode(byte)) ? String.fromCharCode(byte) : ".")).join("");
    out += `${(guestOffset + row).toString(16).padStart(8, "0")}:  ${hex} ${text}\n`;
  }
  return out;
}

/** qemu-io's timestr for the statistics line: seconds as "SS.hh sec". */
function formatElapsed(seconds: number): string {
  // The style follows the whole seconds; the seconds are printed with %05.2f, so 0.996 s is
  // "01.00 sec" and 59.996 s "0:00:60.00", as in qemu-io's timestr.
  const whole = Math.floor(seconds);
  const secondsPart = formatFixed((whole % 60) + (seconds - whole), 2).padStart(5, "0");
  if (whole === 0) return `${secondsPart} sec`;
  return `${Math.floor(whole / 3600)}:${String(Math.floor(whole / 60) % 60).padStart(2, "0")}:${secondsPart}`;
}

/** qemu-io's print_report: the "op N/M bytes at offset X" line and the statistics line. */
export function formatReport(op: string, guestOffset: number, lengthBytes: number, elapsedSeconds: number): string {
  const seconds = Math.max(elapsedSeconds, 1e-9);
  const rate = formatIoSize(lengthBytes / seconds);
  const opsRate = (1 / seconds).toFixed(4);
  return (
    `${op} ${lengthBytes}/${lengthBytes} bytes at offset ${guestOffset}\n` +
    `${formatIoSize(lengthBytes)}, 1 ops; ${formatElapsed(elapsedSeconds)} (${rate}/sec and ${opsRate} ops/sec)\n`
  );
}

function elapsedSince(startNs: bigint): number {
  return Number(process.hrtime.bigint() - startNs) / 1e9;
}

/** Run one request, then print qemu-io's report for it unless quiet. */
async function runReported(context: CliContext, quiet: boolean, op: string, guestOffset: number, lengthBytes: number, request: () => Promise<void>): Promise<void> {
  const start = process.hrtime.bigint();
  await request();
  const elapsed = elapsedSince(start);
  if (!quiet) context.out(formatReport(op, guestOffset, lengthBytes, elapsed));
}

/** How a read is checked and reported (read, readv, aio_read). */
interface ReadOptions {
  pattern: number | undefined;
  patternOffset: number;
  patternLength: number;
  verbose: boolean;
  quiet: boolean;
}

/** Read, verify and report one request: qemu-io's read_f / readv_f / aio_read_done. */
async function readReported(device: BlockDevice, guestOffset: number, lengthBytes: number, options: ReadOptions, context: CliContext, op = "read"): Promise<void> {
  checkRange(device, op, guestOffset, lengthBytes);
  const buffer = new Uint8Array(lengthBytes);
  const start = process.hrtime.bigint();
  await deviceRequest(op, () => device.read(guestOffset, buffer));
  const elapsed = elapsedSince(start);
  let mismatch: SnapstackError | null = null;
  if (options.pattern !== undefined) {
    const region = buffer.subarray(options.patternOffset, options.patternOffset + options.patternLength);
    if (region.some((byte) => byte !== options.pattern)) {
      const message = `Pattern verification failed at offset ${guestOffset + options.patternOffset}, ${options.patternLength} bytes`;
      context.out(`${message}\n`);
      mismatch = new SnapstackError("E_PATTERN_MISMATCH", message, { guestOffset: guestOffset + options.patternOffset, lengthBytes: options.patternLength, pattern: options.pattern });
    }
  }
  if (!options.quiet) {
    if (options.verbose) context.out(formatHexdump(buffer, guestOffset));
    context.out(formatReport("read", guestOffset, lengthBytes, elapsed));
  }
  if (mismatch !== null) throw mismatch;
}

/** What a write writes and how it is reported (write, writev, aio_write). */
interface WriteOptions {
  zero: boolean;
  unmap: boolean;
  compressed: boolean;
  pattern: number;
  fua: boolean;
  quiet: boolean;
}

/** Write and report one request: qemu-io's write_f / writev_f / aio_write_done. */
async function writeReported(device: BlockDevice, guestOffset: number, lengthBytes: number, options: WriteOptions, context: CliContext, op = "write"): Promise<void> {
  checkRange(device, op, guestOffset, lengthBytes);
  await runReported(context, options.quiet, "wrote", guestOffset, lengthBytes, () =>
    deviceRequest(op, async () => {
      if (options.zero) {
        await device.writeZeroes(guestOffset, lengthBytes, { unmap: options.unmap });
      } else {
        const data = new Uint8Array(lengthBytes).fill(options.pattern);
        if (!options.compressed) {
          await device.write(guestOffset, data);
        } else if (canWriteCompressed(device)) {
          await device.writeCompressed(guestOffset, data);
        } else {
          throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${device.name}: format ${device.format} cannot store compressed data`);
        }
      }
      if (options.fua) await device.flush();
    }),
  );
}

/** The offset and the sum of the lengths of readv/writev/aio_* (qemu-io's create_iovec). */
function offsetAndLengths(name: string, positionals: string[]): { guestOffset: number; lengthBytes: number } {
  if (positionals.length < 2) throw new SnapstackError("E_USAGE", `bad argument count ${positionals.length} to ${name}, expected at least 2 arguments`);
  const guestOffset = parseIoNumber(positionals[0]);
  let lengthBytes = 0;
  for (const text of positionals.slice(1)) {
    const length = parseIoNumber(text);
    if (length > IO_REQUEST_MAX_BYTES) throw new IoCommandError("E_INVALID_SIZE", `Argument '${text}' exceeds maximum size ${IO_REQUEST_MAX_BYTES}`);
    if (lengthBytes > IO_REQUEST_MAX_BYTES - length) throw new IoCommandError("E_INVALID_SIZE", `The total number of bytes exceed the maximum size ${IO_REQUEST_MAX_BYTES}`);
    lengthBytes += length;
  }
  return { guestOffset, lengthBytes };
}

/** qemu-io's argument count check (`max` Infinity: no limit), with its message naming the command as typed. */
export function expectArgumentCount(name: string, args: readonly string[], min: number, max: number): void {
  if (args.length >= min && args.length <= max) return;
  const expected = max === 0 ? "0 arguments" : min === max ? `${min} arguments` : max === Infinity ? `at least ${min} arguments` : `between ${min} and ${max} arguments`;
  throw new SnapstackError("E_USAGE", `bad argument count ${args.length} to ${name}, expected ${expected}`);
}

const readCommand: IoSubcommand = {
  name: "read",
  aliases: ["r"],
  synopsis: "read [-qv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset",
  qemuUsage: "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset",
  wordsMin: 2,
  async run(device, args, context) {
    const parsed = parseWords("read", args, [
      { name: "pattern", short: "P", value: true },
      { name: "patternOffset", short: "s", value: true },
      { name: "patternLength", short: "l", value: true },
      { name: "quiet", short: "q" },
      { name: "verbose", short: "v" },
    ]);
    const { guestOffset, lengthBytes } = offsetAndLength("read", parsed.positionals);
    const patternText = optionString(parsed, "pattern");
    const pattern = patternText === undefined ? undefined : parsePattern(patternText);
    const patternOffset = parsed.options.patternOffset === undefined ? 0 : parseIoNumber(optionString(parsed, "patternOffset") ?? "");
    const patternLength =
      parsed.options.patternLength === undefined ? lengthBytes - patternOffset : parseIoNumber(optionString(parsed, "patternLength") ?? "");
    if (pattern === undefined && (parsed.options.patternOffset !== undefined || parsed.options.patternLength !== undefined)) {
      // qemu-io prints the command's usage line.
      throw new IoCommandError("E_USAGE", `read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset`, "read: -s and -l need -P");
    }
    if (patternLength < 0 || patternOffset + patternLength > lengthBytes) {
      throw new IoCommandError("E_USAGE", "pattern verification range exceeds end of read data");
    }
    await readReported(device, guestOffset, lengthBytes, { pattern, patternOffset, patternLength, verbose: optionFlag(parsed, "verbose"), quiet: optionFlag(parsed, "quiet") }, context);
  },
};

/** Options of readv and aio_read, and what they read. */
function parseVectorRead(name: string, args: string[]): { guestOffset: number; lengthBytes: number; options: ReadOptions } {
  const parsed = parseWords(name, args, [
    { name: "pattern", short: "P", value: true },
    { name: "quiet", short: "q" },
    { name: "verbose", short: "v" },
    { name: "parsable", short: "C" },
  ]);
  const patternText = optionString(parsed, "pattern");
  const pattern = patternText === undefined ? undefined : parsePattern(patternText);
  const { guestOffset, lengthBytes } = offsetAndLengths(name, parsed.positionals);
  return { guestOffset, lengthBytes, options: { pattern, patternOffset: 0, patternLength: lengthBytes, verbose: optionFlag(parsed, "verbose"), quiet: optionFlag(parsed, "quiet") } };
}

const readvCommand: IoSubcommand = {
  name: "readv",
  synopsis: "readv [-qv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset into several buffers",
  qemuUsage: "readv [-Cqv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset",
  wordsMin: 2,
  async run(device, args, context) {
    const { guestOffset, lengthBytes, options } = parseVectorRead("readv", args);
    await readReported(device, guestOffset, lengthBytes, options, context, "readv");
  },
};

function parseWriteFlags(name: string, args: string[]): { parsed: ParsedArgs; options: WriteOptions } {
  const parsed = parseWords(name, args, [
    { name: "pattern", short: "P", value: true },
    { name: "zero", short: "z" },
    { name: "unmap", short: "u" },
    { name: "compressed", short: "c" },
    { name: "quiet", short: "q" },
    { name: "fua", short: "f" },
    { name: "noFallback", short: "n" },
    { name: "parsable", short: "C" },
  ]);
  const zero = optionFlag(parsed, "zero");
  const patternText = optionString(parsed, "pattern");
  if (zero && patternText !== undefined) throw new IoCommandError("E_USAGE", "Only one of -z, -P, and -s can be specified at the same time");
  if (optionFlag(parsed, "unmap") && !zero) throw new IoCommandError("E_USAGE", "-u requires -z to be specified");
  if (optionFlag(parsed, "noFallback") && !zero) throw new IoCommandError("E_USAGE", "-n requires -z to be specified");
  const pattern = patternText === undefined ? WRITE_DEFAULT_PATTERN : parsePattern(patternText);
  return {
    parsed,
    options: { zero, unmap: optionFlag(parsed, "unmap"), compressed: optionFlag(parsed, "compressed"), pattern, fua: optionFlag(parsed, "fua"), quiet: optionFlag(parsed, "quiet") },
  };
}

const writeCommand: IoSubcommand = {
  name: "write",
  writes: true,
  aliases: ["w"],
  synopsis: "write [-cqu] [-P pattern | -z] off len -- writes a number of bytes at a specified offset",
  qemuUsage: "write [-bcCfnquz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset",
  wordsMin: 2,
  async run(device, args, context) {
    const { parsed, options } = parseWriteFlags("write", args);
    const { guestOffset, lengthBytes } = offsetAndLength("write", parsed.positionals, { noFallback: optionFlag(parsed, "noFallback") });
    if (options.compressed) {
      requireSectorAligned(guestOffset, "offset");
      requireSectorAligned(lengthBytes, "count");
    }
    await writeReported(device, guestOffset, lengthBytes, options, context);
  },
};

const writevCommand: IoSubcommand = {
  name: "writev",
  writes: true,
  synopsis: "writev [-q] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset from several buffers",
  qemuUsage: "writev [-Cfq] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset",
  wordsMin: 2,
  async run(device, args, context) {
    const { parsed, options } = parseWriteFlags("writev", args);
    if (options.zero || options.compressed) throw new IoUsageError(`writev: invalid option -- '${options.zero ? "z" : "c"}'`);
    const { guestOffset, lengthBytes } = offsetAndLengths("writev", parsed.positionals);
    await writeReported(device, guestOffset, lengthBytes, options, context, "writev");
  },
};

/**
 * aio_read / aio_write start a request and return; it reports when it
 * completes, and aio_flush (or the end of the command list) waits for
 * every one, as in qemu-io. A failure prints "aio_<op> failed: <strerror>"
 * on stdout and leaves the exit status as it is, as in qemu-io.
 */
const aioReadCommand: IoSubcommand = {
  name: "aio_read",
  synopsis: "aio_read [-qv] [-P pattern] off len [len..] -- asynchronously reads a number of bytes",
  qemuUsage: "aio_read [-Ciqv] [-P pattern] off len [len..] -- asynchronously reads a number of bytes",
  wordsMin: 2,
  async run(device, args, context, session) {
    const { guestOffset, lengthBytes, options } = parseVectorRead("aio_read", args);
    // qemu-io's aio_read_done reports a failure as "readv failed".
    session.start(readReported(device, guestOffset, lengthBytes, options, context, "readv"));
  },
};

const aioWriteCommand: IoSubcommand = {
  name: "aio_write",
  writes: true,
  synopsis: "aio_write [-fquz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes",
  qemuUsage: "aio_write [-Cfiquz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes",
  wordsMin: 2,
  async run(device, args, context, session) {
    const { parsed, options } = parseWriteFlags("aio_write", args);
    if (options.compressed) throw new IoUsageError("aio_write: invalid option -- 'c'");
    if (options.zero && parsed.positionals.length !== 2) throw new IoCommandError("E_USAGE", "-z supports only a single length parameter");
    // A zero write takes its one length as it is (no buffer to build: qemu-io's aio_write_f).
    const { guestOffset, lengthBytes } = options.zero
      ? { guestOffset: parseIoNumber(parsed.positionals[0]), lengthBytes: parseIoNumber(parsed.positionals[1]) }
      : offsetAndLengths("aio_write", parsed.positionals);
    session.start(writeReported(device, guestOffset, lengthBytes, options, context, "aio_write"));
  },
};

const aioFlushCommand: IoSubcommand = {
  name: "aio_flush",
  synopsis: "aio_flush -- completes all outstanding aio requests",
  async run(_device, args, _context, session) {
    expectArgumentCount("aio_flush", args, 0, 0);
    await session.drain();
  },
};

const lengthCommand: IoSubcommand = {
  name: "length",
  aliases: ["l"],
  synopsis: "length -- gets the length of the current file",
  async run(device, args, context) {
    expectArgumentCount("length", args, 0, 0);
    context.out(`${formatIoSize(device.sizeBytes)}\n`);
  },
};

const infoCommand: IoSubcommand = {
  name: "info",
  aliases: ["i"],
  synopsis: "info -- prints information about the current file",
  async run(device, args, context) {
    expectArgumentCount("info", args, 0, 0);
    const qcow2 = device instanceof Qcow2Image ? device.info() : null;
    const clusterBytes = qcow2?.clusterSizeBytes ?? 0;
    // qcow2_vm_state_offset: where the VM state would start, past the range the L1 table can map.
    const mappedPerL1Entry = qcow2 === null ? 0 : clusterBytes * (clusterBytes / (qcow2.extendedL2 ? 16 : 8));
    const vmStateOffset = qcow2 === null ? 0 : Math.ceil(qcow2.sizeBytes / mappedPerL1Entry) * mappedPerL1Entry;
    let out = `format name: ${device.format}\ncluster size: ${formatIoSize(clusterBytes)}\nvm state offset: ${formatIoSize(vmStateOffset)}\n`;
    const specific = formatSpecificInfo(device);
    if (specific !== null) out += formatFormatSpecific(specific);
    context.out(out);
  },
};

const allocCommand: IoSubcommand = {
  name: "alloc",
  aliases: ["a"],
  synopsis: "alloc offset [count] -- checks if offset is allocated in the file",
  async run(device, args, context) {
    expectArgumentCount("alloc", args, 1, 2);
    // qemu-io 7.2 checks neither the offset's nor the count's alignment.
    const guestOffset = parseIoNumber(args[0]);
    let count = SECTOR_BYTES;
    // No upper bound on the count in qemu-io 7.2's alloc_f: it ends at the disk's end.
    if (args.length === 2) count = parseIoNumber(args[1]);
    // bdrv_is_allocated of this layer alone; the count stops at the end of the disk.
    count = Math.max(0, Math.min(count, device.sizeBytes - guestOffset));
    let allocated = 0;
    if (count > 0) {
      for (const extent of await device.layerStatus(guestOffset, count)) if (extent.kind !== "unallocated") allocated += extent.lengthBytes;
    }
    context.out(`${allocated}/${count} bytes allocated at offset ${formatIoSize(guestOffset)}\n`);
  },
};

const truncateCommand: IoSubcommand = {
  name: "truncate",
  writes: true,
  aliases: ["t"],
  synopsis: "truncate [-m prealloc_mode] off -- truncates the current file at the given offset",
  qemuUsage: "truncate [-m prealloc_mode] off -- truncates the current file at the given offset",
  wordsMin: 1,
  wordsMax: 3,
  async run(device, args) {
    const parsed = parseWords("truncate", args, [{ name: "mode", short: "m", value: true }]);
    // qemu-io's truncate_f takes the first word left after the options and ignores any after it.
    expectArgumentCount("truncate", parsed.positionals, 1, Infinity);
    const mode = optionString(parsed, "mode") ?? "off";
    if (!(RAW_PREALLOCATION_MODES as readonly string[]).includes(mode)) throw new SnapstackError("E_INVALID_OPTION", `Invalid preallocation mode '${mode}'`);
    const sizeBytes = parseIoNumber(parsed.positionals[0]);
    if (device instanceof RawImage) {
      await device.resize(sizeBytes, { preallocation: mode as RawPreallocation });
    } else if (device instanceof Qcow2Image) {
      if (mode !== "off") throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${device.name}: truncate -m ${mode} is not supported for qcow2 (only off)`);
      await device.resize(sizeBytes, { shrink: true });
    } else {
      throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${device.name}: cannot resize format ${device.format}`);
    }
  },
};

const sleepCommand: IoSubcommand = {
  name: "sleep",
  synopsis: "sleep milliseconds -- waits for the given value in milliseconds",
  async run(_device, args) {
    expectArgumentCount("sleep", args, 1, 1);
    // strtol(arg, &end, 0): decimal, 0x hex or 0 octal, nothing after it.
    const match = /^\s*(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)$/.exec(args[0]);
    if (match === null) throw new IoCommandError("E_USAGE", `${args[0]} is not a valid number`);
    const digits = match[1];
    const ms = /^0[xX]/.test(digits) ? parseInt(digits.slice(2), 16) : digits.length > 1 ? parseInt(digits, 8) : Number(digits);
    await new Promise((resolve) => setTimeout(resolve, ms));
  },
};

const discardCommand: IoSubcommand = {
  name: "discard",
  writes: true,
  aliases: ["d"],
  synopsis: "discard [-q] off len -- discards a number of bytes at a specified offset",
  qemuUsage: "discard [-Cq] off len -- discards a number of bytes at a specified offset",
  wordsMin: 2,
  async run(device, args, context) {
    const parsed = parseWords("discard", args, [
      { name: "quiet", short: "q" },
      { name: "parsable", short: "C" },
    ]);
    const { guestOffset, lengthBytes } = offsetAndLength("discard", parsed.positionals);
    checkRange(device, "discard", guestOffset, lengthBytes);
    await runReported(context, optionFlag(parsed, "quiet"), "discard", guestOffset, lengthBytes, () => deviceRequest("discard", () => device.discard(guestOffset, lengthBytes)));
  },
};

const flushCommand: IoSubcommand = {
  name: "flush",
  aliases: ["f"],
  synopsis: "flush -- flush all in-core file state to disk",
  async run(device, args) {
    if (args.length > 0) throw new SnapstackError("E_USAGE", `flush: unexpected argument '${args[0]}'`);
    await device.flush();
  },
};

const mapCommand: IoSubcommand = {
  name: "map",
  synopsis: "map -- prints the allocation state of the top image (like qemu-io, backing layers not counted)",
  async run(device, args, context) {
    if (args.length > 0) throw new SnapstackError("E_USAGE", `map: unexpected argument '${args[0]}'`);
    // qemu-io's map is bdrv_is_allocated: this layer alone (data or zero clusters), not the backing chain.
    const extents = await device.layerStatus(0, device.sizeBytes);
    let out = "";
    let index = 0;
    while (index < extents.length) {
      const first = extents[index];
      const allocated = first.kind !== "unallocated";
      let lengthBytes = first.lengthBytes;
      index++;
      while (index < extents.length && (extents[index].kind !== "unallocated") === allocated) lengthBytes += extents[index++].lengthBytes;
      out += `${formatIoSize(lengthBytes)} (0x${lengthBytes.toString(16)}) bytes ${allocated ? "    allocated" : "not allocated"} at offset ${formatIoSize(first.guestOffset)} (0x${first.guestOffset.toString(16)})\n`;
    }
    context.out(out);
  },
};

export const IO_SUBCOMMANDS: IoSubcommand[] = [
  readCommand,
  readvCommand,
  writeCommand,
  writevCommand,
  aioReadCommand,
  aioWriteCommand,
  aioFlushCommand,
  discardCommand,
  flushCommand,
  truncateCommand,
  lengthCommand,
  infoCommand,
  allocCommand,
  mapCommand,
  sleepCommand,
];
