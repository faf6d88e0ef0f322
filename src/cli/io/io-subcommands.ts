/**
 * qemu-io's commands over a BlockDevice: read, write, discard, flush, map.
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
import { SnapstackError, type ErrorCode } from "../../base/errors.ts";
import { formatIoSize, parseSizeBig } from "../../base/units.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { optionFlag, optionString, parseArgs, type OptionSpec, type ParsedArgs } from "../args.ts";
import type { CliContext } from "../context.ts";
import { canWriteCompressed } from "../engine.ts";
import { toSnapstackError } from "../error-report.ts";

/** qemu's BDRV_REQUEST_MAX_BYTES: one request is at most INT_MAX rounded down to 512. */
export const IO_REQUEST_MAX_BYTES = 2147483136;
const SECTOR_BYTES = 512;
/** qemu-io's default byte for `write` without -P. */
const WRITE_DEFAULT_PATTERN = 0xcd;

export interface IoSubcommand {
  name: string;
  aliases?: string[];
  synopsis: string;
  run(device: BlockDevice, args: string[], context: CliContext): Promise<void>;
}

/** A failed io command, with the line qemu-io prints for the same failure on stdout. */
export class IoCommandError extends SnapstackError {
  readonly stdoutLine: string;

  constructor(code: ErrorCode, stdoutLine: string, message = stdoutLine, details: Record<string, unknown> = {}) {
    super(code, message, details);
    this.stdoutLine = stdoutLine;
  }
}

/** strerror() of the errno qemu's block layer returns for a failure of this kind. */
function qemuErrnoText(code: ErrorCode): string {
  switch (code) {
    case "E_USAGE":
    case "E_INVALID_SIZE":
      return "Invalid argument";
    case "E_NO_SPACE":
    case "E_TOO_LARGE":
      return "No space left on device";
    case "E_READ_ONLY":
    case "E_ACCESS":
      return "Operation not permitted";
    case "E_UNSUPPORTED_FEATURE":
      return "Operation not supported";
    default:
      return "Input/output error";
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

function parseWords(name: string, args: string[], specs: OptionSpec[]): ParsedArgs {
  return parseArgs(args, specs, { style: "glibc", program: name });
}

/** qemu-io's cvtnum with its error messages. */
export function parseIoNumber(text: string): number {
  let value: bigint;
  try {
    value = parseSizeBig(text);
  } catch {
    throw new IoCommandError("E_INVALID_SIZE", `Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${text}`, undefined, { text });
  }
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
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

function offsetAndLength(name: string, positionals: string[]): { guestOffset: number; lengthBytes: number } {
  if (positionals.length !== 2) {
    throw new SnapstackError("E_USAGE", `${name}: expected OFFSET LENGTH, got ${positionals.length} argument(s)`);
  }
  const guestOffset = parseIoNumber(positionals[0]);
  const lengthBytes = parseIoNumber(positionals[1]);
  if (lengthBytes > IO_REQUEST_MAX_BYTES) {
    throw new IoCommandError("E_INVALID_SIZE", `length cannot exceed ${IO_REQUEST_MAX_BYTES}, given ${positionals[1]}`);
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
  const whole = Math.floor(seconds);
  const hundredths = Math.floor((seconds - whole) * 100);
  return `${String(whole).padStart(2, "0")}.${String(hundredths).padStart(2, "0")} sec`;
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

const readCommand: IoSubcommand = {
  name: "read",
  aliases: ["r"],
  synopsis: "read [-qv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset",
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
    checkRange(device, "read", guestOffset, lengthBytes);
    const buffer = new Uint8Array(lengthBytes);
    const start = process.hrtime.bigint();
    await deviceRequest("read", () => device.read(guestOffset, buffer));
    const elapsed = elapsedSince(start);
    let mismatch: SnapstackError | null = null;
    if (pattern !== undefined) {
      const region = buffer.subarray(patternOffset, patternOffset + patternLength);
      if (region.some((byte) => byte !== pattern)) {
        const message = `Pattern verification failed at offset ${guestOffset + patternOffset}, ${patternLength} bytes`;
        context.out(`${message}\n`);
        mismatch = new SnapstackError("E_PATTERN_MISMATCH", message, { guestOffset: guestOffset + patternOffset, lengthBytes: patternLength, pattern });
      }
    }
    if (!optionFlag(parsed, "quiet")) {
      if (optionFlag(parsed, "verbose")) context.out(formatHexdump(buffer, guestOffset));
      context.out(formatReport("read", guestOffset, lengthBytes, elapsed));
    }
    if (mismatch !== null) throw mismatch;
  },
};

const writeCommand: IoSubcommand = {
  name: "write",
  aliases: ["w"],
  synopsis: "write [-cqu] [-P pattern | -z] off len -- writes a number of bytes at a specified offset",
  async run(device, args, context) {
    const parsed = parseWords("write", args, [
      { name: "pattern", short: "P", value: true },
      { name: "zero", short: "z" },
      { name: "unmap", short: "u" },
      { name: "compressed", short: "c" },
      { name: "quiet", short: "q" },
      { name: "fua", short: "f" },
      { name: "noFallback", short: "n" },
    ]);
    const zero = optionFlag(parsed, "zero");
    const compressed = optionFlag(parsed, "compressed");
    const patternText = optionString(parsed, "pattern");
    if (zero && patternText !== undefined) throw new IoCommandError("E_USAGE", "Only one of -z, -P, and -s can be specified at the same time");
    if (optionFlag(parsed, "unmap") && !zero) throw new IoCommandError("E_USAGE", "-u requires -z to be specified");
    if (optionFlag(parsed, "noFallback") && !zero) throw new IoCommandError("E_USAGE", "-n requires -z to be specified");
    const pattern = patternText === undefined ? WRITE_DEFAULT_PATTERN : parsePattern(patternText);
    const { guestOffset, lengthBytes } = offsetAndLength("write", parsed.positionals);
    if (compressed) {
      requireSectorAligned(guestOffset, "offset");
      requireSectorAligned(lengthBytes, "count");
    }
    checkRange(device, "write", guestOffset, lengthBytes);
    await runReported(context, optionFlag(parsed, "quiet"), "wrote", guestOffset, lengthBytes, () => deviceRequest("write", async () => {
      if (zero) {
        await device.writeZeroes(guestOffset, lengthBytes, { unmap: optionFlag(parsed, "unmap") });
      } else {
        const data = new Uint8Array(lengthBytes).fill(pattern);
        if (!compressed) {
          await device.write(guestOffset, data);
        } else if (canWriteCompressed(device)) {
          await device.writeCompressed(guestOffset, data);
        } else {
          throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${device.name}: format ${device.format} cannot store compressed data`);
        }
      }
      if (optionFlag(parsed, "fua")) await device.flush();
    }));
  },
};

const discardCommand: IoSubcommand = {
  name: "discard",
  aliases: ["d"],
  synopsis: "discard [-q] off len -- discards a number of bytes at a specified offset",
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

export const IO_SUBCOMMANDS: IoSubcommand[] = [readCommand, writeCommand, discardCommand, flushCommand, mapCommand];
