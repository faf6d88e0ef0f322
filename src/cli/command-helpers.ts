/**
 * Small pieces shared by the img commands: output format, positional
 * argument counts, -o lists, progress lines. Messages are qemu-img's.
 */
import { SnapstackError } from "../base/errors.ts";
import { formatFixed, parseSize } from "../base/units.ts";
import { optionFlag, optionString, type ParsedArgs } from "./args.ts";
import type { CliContext } from "./context.ts";
import { checkCreateOptions, parseOptionList, type CreateOptionValues } from "./create-options.ts";

export type OutputFormat = "human" | "json";

export function parseOutputFormat(value: string | undefined): OutputFormat {
  if (value === undefined || value === "human") return "human";
  if (value === "json") return "json";
  throw new SnapstackError("E_USAGE", "--output must be used with human or json as argument.", { value });
}

/** Exactly `names.length` positionals, or qemu-img's usage errors. */
export function expectPositionals(positionals: readonly string[], min: number, max: number, missingMessage: string): void {
  if (positionals.length < min) throw new SnapstackError("E_USAGE", missingMessage);
  if (positionals.length > max) throw new SnapstackError("E_USAGE", `Unexpected argument: ${positionals[max]}`);
}

/**
 * QEMU's cache modes (-t, -T; block.c bdrv_parse_cache_mode, where "off"
 * is "none"). snapstack accepts them all and flushes at the end of a command.
 */
const CACHE_MODES: readonly string[] = ["none", "off", "writeback", "writethrough", "directsync", "unsafe"];

/** Whether QEMU knows `mode` as a cache mode. */
export function isCacheMode(mode: string): boolean {
  return CACHE_MODES.includes(mode);
}

/** Refuse a -t (option "cache") or -T (option "sourceCache") value qemu-img does not know, with its message. */
export function checkCacheOptions(parsed: ParsedArgs): void {
  for (const [name, what] of [
    ["cache", "cache option"],
    ["sourceCache", "source cache option"],
  ] as const) {
    const value = optionString(parsed, name);
    if (value !== undefined && !isCacheMode(value)) throw new SnapstackError("E_INVALID_OPTION", `Invalid ${what}: ${value}`, { value });
  }
}

/** -U on a command that will write the image: qemu-img refuses it. */
export function refuseForceShareForWriting(parsed: ParsedArgs, writes: boolean): void {
  if (writes && optionFlag(parsed, "forceShare")) throw new SnapstackError("E_USAGE", "force-share=on can only be used with read-only images");
}

/**
 * -r of convert and commit: bytes per second with qemu-img's size suffixes;
 * 0 or absent means no limit (undefined). Refused as qemu-img refuses it.
 */
export function parseRateLimit(text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  let bytesPerSecond: number;
  try {
    bytesPerSecond = parseSize(text, { what: "rate limit" });
  } catch {
    throw new SnapstackError(
      "E_INVALID_OPTION",
      "Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
      { text },
    );
  }
  return bytesPerSecond === 0 ? undefined : bytesPerSecond;
}

/** Check a joined -o list for a format (empty list when none given). */
export function createOptionsFor(format: string, optionText: string | undefined): CreateOptionValues {
  return checkCreateOptions(format, optionText === undefined ? [] : parseOptionList(optionText));
}

/**
 * qemu-img's -p progress: "    (12.34/100%)\r" on stdout, reprinted when it
 * moves by at least `stepPercent`, and a final newline from `end()` (which,
 * as qemu_progress_end, does not print 100% itself).
 */
export function createProgress(context: CliContext, enabled: boolean, stepPercent = 1): { update(fraction: number): void; end(): void } {
  let last = 0;
  const print = (percent: number): void => context.out(`    (${formatFixed(percent, 2)}/100%)\r`);
  if (enabled) print(0);
  return {
    update(fraction: number) {
      if (!enabled) return;
      const percent = Math.min(100, Math.max(0, fraction * 100));
      if (percent - last >= stepPercent || (percent === 100 && last !== 100)) {
        last = percent;
        print(percent);
      }
    },
    end() {
      if (enabled) context.out("\n");
    },
  };
}
