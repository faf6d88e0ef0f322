/**
 * Sizes as people type them and as qemu-img / qemu-io print them.
 *
 * Design notes
 * - `parseSize` follows QEMU 7.2's `qemu_strtosz` (util/cutils.c) exactly,
 *   because scripts written for qemu-img must parse the same way:
 *   decimal integer (leading zeros are decimal, not octal), optional
 *   fraction (only together with a multiplier suffix, no exponent), or a hex
 *   integer `0x...` (no fraction); one optional suffix b/B (bytes), k/K, m/M,
 *   g/G, t/T, p/P, e/E (powers of 1024, case-insensitive); nothing after it.
 *   The fraction is turned into 64.64 fixed point and the product rounded
 *   half up, as QEMU does, so "1.5k" is 1536 and "0.0009765625k" is 1.
 *   Arithmetic is exact (BigInt) up to the qemu limit of INT64_MAX; results
 *   above 2^53 (8 PiB) are refused with E_TOO_LARGE because snapstack keeps
 *   offsets in plain numbers (docs/limits.md).
 * - `formatSize` is QEMU's `size_to_str` ("1 GiB", "192 KiB", "4.5 MiB"):
 *   printf("%0.3g %sB") after picking the binary prefix so that the number
 *   stays below 1000.
 * - `formatIoSize` is qemu-io's `cvtstr` ("64 KiB", "1.500 KiB", "40 bytes").
 */
import { SnapstackError } from "./errors.ts";

/** qemu-img's own limit for any size: INT64_MAX. */
export const QEMU_SIZE_MAX = (1n << 63n) - 1n;
/** snapstack's limit: offsets are plain numbers, exact below 2^53 bytes (8 PiB). */
export const SIZE_MAX_BYTES = Number.MAX_SAFE_INTEGER;

const SUFFIX_SHIFTS: Record<string, bigint> = { B: 0n, K: 10n, M: 20n, G: 30n, T: 40n, P: 50n, E: 60n };
const UINT64_MAX = (1n << 64n) - 1n;

export interface ParseSizeOptions {
  /** What is being parsed, for messages: "image size", "offset", "length"... */
  what?: string;
  /** Smallest accepted value (default 0). */
  minBytes?: number;
}

function invalidSize(what: string, text: string): SnapstackError {
  return new SnapstackError(
    "E_INVALID_SIZE",
    `Invalid ${what} specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`,
    { text, what },
  );
}

function outOfRange(what: string, text: string, minBytes: number): SnapstackError {
  return new SnapstackError("E_INVALID_SIZE", `Invalid ${what} specified. Must be between ${minBytes} and ${QEMU_SIZE_MAX}.`, {
    text,
    what,
  });
}

/** Leading whitespace and an optional '+' as strtoull accepts them; returns the index of the first digit. */
function skipStrtoullPrefix(text: string): number {
  let index = 0;
  while (index < text.length && " \t\n\v\f\r".includes(text[index])) index++;
  if (text[index] === "+") index++;
  return index;
}

function isDigit(char: string | undefined, hex: boolean): boolean {
  if (char === undefined) return false;
  return hex ? /^[0-9a-fA-F]$/.test(char) : char >= "0" && char <= "9";
}

/**
 * The value of `text` in bytes as a bigint (the qemu_strtosz part), or throws
 * E_INVALID_SIZE. No range check beyond the 64-bit overflow qemu reports.
 */
export function parseSizeBig(text: string, what = "size"): bigint {
  if (text.includes("-")) throw invalidSize(what, text);
  let index = skipStrtoullPrefix(text);
  const digitsStart = index;
  while (isDigit(text[index], false)) index++;
  if (index === digitsStart) throw invalidSize(what, text);
  let value = BigInt(text.slice(digitsStart, index));
  let fraction = 0;
  if (value === 0n && (text[index] === "x" || text[index] === "X")) {
    // Hex: strtoull(base 16) takes the 0x prefix only as "0x" exactly ("00x1"
    // stops at the x, so it is invalid); no fraction allowed.
    if (index !== digitsStart + 1) throw invalidSize(what, text);
    index++;
    const hexStart = index;
    while (isDigit(text[index], true)) index++;
    if (index === hexStart) throw invalidSize(what, text);
    value = BigInt("0x" + text.slice(hexStart, index));
    if (text[index] === ".") throw invalidSize(what, text);
  } else if (text[index] === ".") {
    // strtod on ".ddd"; an exponent makes the whole input invalid; "1." and "1.k" are fine.
    const match = /^\.(\d+)([eE][+-]?\d+)?/.exec(text.slice(index));
    if (match === null) {
      index++;
    } else {
      if (match[2] !== undefined) throw invalidSize(what, text);
      fraction = Number(match[0]);
      index += match[0].length;
    }
  }
  if (value > UINT64_MAX) throw outOfRange(what, text, 0);
  const suffix = text[index]?.toUpperCase();
  let shift = 0n;
  if (suffix !== undefined && suffix in SUFFIX_SHIFTS) {
    shift = SUFFIX_SHIFTS[suffix];
    index++;
  }
  if (index !== text.length) throw invalidSize(what, text);
  if (shift === 0n) {
    if (fraction !== 0) throw invalidSize(what, text);
    return value;
  }
  // 64.64 fixed point, exactly as qemu: fraction * 2^64 truncated, product rounded half up.
  const fractionFixed = BigInt(Math.trunc(fraction * 2 ** 64));
  const fractionProduct = fractionFixed << shift;
  const result = (value << shift) + (fractionProduct >> 64n) + ((fractionProduct >> 63n) & 1n);
  if (result > UINT64_MAX) throw outOfRange(what, text, 0);
  return result;
}

/**
 * qemu's cvtnum: a size as parseSizeBig reads it, refused outside
 * [minBytes, INT64_MAX] with qemu's message. Exact past 2^53 (a BigInt),
 * for options whose large values mean "past any image".
 */
export function parseSizeInt64(text: string, what = "size", minBytes = 0): bigint {
  const value = parseSizeBig(text, what);
  if (value > QEMU_SIZE_MAX || value < BigInt(minBytes)) throw outOfRange(what, text, minBytes);
  return value;
}

/**
 * Parse a size as qemu-img does ("1G", "512", "1.5M", "0x1000"), in bytes.
 * Throws E_INVALID_SIZE for bad syntax or a value outside [minBytes,
 * INT64_MAX] (qemu's messages), E_TOO_LARGE above 2^53.
 */
export function parseSize(text: string, options: ParseSizeOptions = {}): number {
  const what = options.what ?? "size";
  const minBytes = options.minBytes ?? 0;
  const value = parseSizeInt64(text, what, minBytes);
  if (value > BigInt(SIZE_MAX_BYTES)) {
    throw new SnapstackError(
      "E_TOO_LARGE",
      `${what} ${value} exceeds snapstack's limit of ${SIZE_MAX_BYTES} bytes (8 PiB)`,
      { text, what },
    );
  }
  return Number(value);
}

/** Whether digits kept ending in `lastKept` round up when `rest` (the decimal digits cut off) follows: above half, or exactly half and odd. */
function roundsUpHalfEven(lastKept: string, rest: string): boolean {
  const first = rest[0] ?? "0";
  return first > "5" || (first === "5" && (/[1-9]/.test(rest.slice(1)) || Number(lastKept) % 2 === 1));
}

/**
 * C printf("%0.3g") for a finite non-negative number: rounded to three
 * significant digits with exact ties to even (192.5 -> "192", 1.125 ->
 * "1.12"), where Number.prototype.toPrecision rounds them up; %e style
 * when the rounded exponent is below -4 or above 2.
 */
export function formatG3(value: number): string {
  if (value === 0) return "0";
  // 100 significant digits: the exact decimal value of every double this is given.
  const exact = value.toExponential(99);
  const expIndex = exact.indexOf("e");
  const digits = exact.slice(0, expIndex).replace(".", "");
  let exponent = Number(exact.slice(expIndex + 1));
  let kept = Number(digits.slice(0, 3));
  if (roundsUpHalfEven(digits.slice(2, 3), digits.slice(3))) kept++;
  if (kept === 1000) {
    kept = 100;
    exponent++;
  }
  const significant = String(kept);
  const stripZeros = (text: string): string => (text.includes(".") ? text.replace(/\.?0+$/, "") : text);
  if (exponent < -4 || exponent >= 3) {
    const sign = exponent < 0 ? "-" : "+";
    return `${stripZeros(`${significant[0]}.${significant.slice(1)}`)}e${sign}${String(Math.abs(exponent)).padStart(2, "0")}`;
  }
  // %f style with 2 - exponent decimals: the three digits placed around the point.
  const padded = exponent < 0 ? "0".repeat(-exponent) + significant : significant;
  const point = exponent < 0 ? 1 : exponent + 1;
  const fraction = padded.slice(point);
  return fraction === "" ? padded.slice(0, point) : stripZeros(`${padded.slice(0, point)}.${fraction}`);
}

const BINARY_PREFIXES = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];

/** qemu-img's size_to_str: "1 GiB", "328 KiB", "4.5 MiB", "0 B". */
export function formatSize(sizeBytes: number): string {
  // frexp(val / (1000/1024)) exponent minus one, in steps of 10 bits.
  const scaled = sizeBytes / (1000 / 1024);
  const exponent = scaled === 0 ? 0 : Math.floor(Math.log2(scaled)) + 1;
  let prefixIndex = Math.max(0, Math.floor((exponent - 1) / 10));
  prefixIndex = Math.min(prefixIndex, BINARY_PREFIXES.length - 1);
  const divisor = 2 ** (prefixIndex * 10);
  return `${formatG3(sizeBytes / divisor)} ${BINARY_PREFIXES[prefixIndex]}B`;
}

/**
 * C printf("%.Nf") for a finite non-negative number: exact ties round to
 * even (1.0625 -> "1.062"), where Number.prototype.toFixed rounds them up.
 */
export function formatFixed(value: number, digits: number): string {
  // toFixed(100) is the exact decimal expansion for our values (binary fractions of at most 100 digits).
  const exact = value.toFixed(100);
  const point = exact.indexOf(".");
  const kept = exact.slice(0, point + 1 + digits);
  const rest = exact.slice(point + 1 + digits);
  const truncated = digits === 0 ? kept.slice(0, -1) : kept;
  if (!roundsUpHalfEven(truncated[truncated.length - 1], rest)) return truncated;
  const scaled = BigInt(truncated.replace(".", "")) + 1n;
  const text = scaled.toString().padStart(digits + 1, "0");
  return digits === 0 ? text : `${text.slice(0, text.length - digits)}.${text.slice(text.length - digits)}`;
}

const IO_UNITS: Array<[number, string]> = [
  [2 ** 60, "EiB"],
  [2 ** 50, "PiB"],
  [2 ** 40, "TiB"],
  [2 ** 30, "GiB"],
  [2 ** 20, "MiB"],
  [2 ** 10, "KiB"],
];

/** qemu-io's cvtstr: "64 KiB", "1.500 KiB", "1021.938 MiB", "40 bytes". */
export function formatIoSize(value: number): string {
  let text: string;
  let suffix = " bytes";
  const unit = IO_UNITS.find(([unitBytes]) => value >= unitBytes);
  if (unit !== undefined) {
    text = formatFixed(value / unit[0], 3);
    suffix = ` ${unit[1]}`;
  } else {
    text = formatFixed(value, 6);
  }
  const trim = text.indexOf(".000");
  return trim >= 0 ? text.slice(0, trim) + suffix : text + suffix;
}
