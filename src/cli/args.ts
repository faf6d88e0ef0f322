/**
 * A GNU getopt_long-style parser, as qemu-img and qemu-io use.
 *
 * Design notes
 * - Options may come before or after positionals (GNU permutation); `--`
 *   ends options; a lone `-` is a positional.
 * - Short options cluster (`-qU`), and a short option's value may be glued
 *   (`-fqcow2`) or the next word (`-f qcow2`).
 * - Long options take `--opt=value` or `--opt value`; a unique prefix is
 *   accepted (`--outp=json`) as getopt_long does.
 * - Repeated options: the last value wins, except options declared
 *   `repeat: "list"` (all values kept, e.g. qemu-io's `-c`) or
 *   `repeat: "comma"` (values joined with commas, qemu-img's `-o`; each one
 *   checked as qemu-img's is_valid_option_list: "Invalid option list").
 * - Errors are E_USAGE with qemu-img's wording: "unrecognized option '-x'",
 *   "missing argument for option '-f'". qemu-io's inner commands use glibc's
 *   wording instead ("invalid option -- 'x'"), selected by `style: "glibc"`.
 */
import { SnapstackError } from "../base/errors.ts";

export interface OptionSpec {
  /** Key in the result. */
  name: string;
  /** Single character, without the dash. */
  short?: string;
  /** Without the leading dashes. */
  long?: string;
  /** The option takes a value. */
  value?: boolean;
  repeat?: "last" | "list" | "comma";
}

export interface ParsedArgs {
  /** Flags are `true`; valued options are strings (or string[] for repeat: "list"). */
  options: Record<string, string | boolean | string[] | undefined>;
  positionals: string[];
  /** Every option as given, in order (for commands whose options are steps, as qemu-img bitmap's). */
  sequence: Array<{ name: string; value: string | true }>;
}

export interface ParseArgsOptions {
  /** Message style for errors: qemu-img's (default) or glibc getopt's. */
  style?: "qemu-img" | "glibc";
  /** Prefix for glibc-style messages (the program or command name). */
  program?: string;
  /**
   * Long options the real command has and snapstack does not implement
   * (default for the qemu-img style: QEMU_UNIMPLEMENTED, what most qemu-img
   * subcommands and qemu-io have; none for the glibc style). They take part
   * in prefix matching, as getopt_long sees them, and their value is checked
   * as it would be; only then is naming one E_UNSUPPORTED_FEATURE.
   */
  unimplementedLong?: readonly UnimplementedOption[];
}

/** A long option of the qemu command that snapstack does not implement. */
export interface UnimplementedOption {
  long: string;
  value: boolean;
}

/**
 * The long options most qemu-img subcommands (and qemu-io) have that
 * snapstack does not implement. Without them an abbreviation getopt_long
 * refuses as ambiguous would resolve to one of ours (`info --o=json` to
 * --output). Commands with other sets pass their own: convert adds
 * --target-image-opts (else `convert --target -n` ran as --target-is-zero
 * and skipped writing zeroes), create has only --object; commands without
 * a qemu counterpart pass NOT_QEMU.
 */
export const QEMU_UNIMPLEMENTED: readonly UnimplementedOption[] = [
  { long: "object", value: true },
  { long: "image-opts", value: false },
];

/** Settings for commands that have no qemu counterpart (diff, restore, remove, stream, vm, serve, helper): no unimplemented options to know of. */
export const NOT_QEMU: ParseArgsOptions = { unimplementedLong: [] };

function usageError(message: string): SnapstackError {
  return new SnapstackError("E_USAGE", message);
}

/** The long option `name` names, exactly or as a unique prefix (getopt_long's rule): ours, or one snapstack does not implement. */
function findLong(specs: OptionSpec[], name: string, unimplemented: readonly UnimplementedOption[]): OptionSpec | UnimplementedOption | undefined {
  const exact = specs.find((spec) => spec.long === name) ?? unimplemented.find((option) => option.long === name);
  if (exact !== undefined) return exact;
  const prefixed = specs.filter((spec) => spec.long !== undefined && spec.long.startsWith(name));
  const others = unimplemented.filter((option) => option.long.startsWith(name) && !specs.some((spec) => spec.long === option.long));
  if (prefixed.length + others.length !== 1) return undefined;
  return prefixed[0] ?? others[0];
}

/** Parse `argv` (without the program and command names) against `specs`. */
export function parseArgs(argv: readonly string[], specs: OptionSpec[], settings: ParseArgsOptions = {}): ParsedArgs {
  const glibc = settings.style === "glibc";
  const program = settings.program ?? "snapstack";
  const unimplemented = settings.unimplementedLong ?? (glibc ? [] : QEMU_UNIMPLEMENTED);
  const unrecognized = (word: string, char?: string): SnapstackError =>
    glibc
      ? usageError(char !== undefined ? `${program}: invalid option -- '${char}'` : `${program}: unrecognized option '${word}'`)
      : usageError(`unrecognized option '${word}'`);
  const missing = (word: string, char?: string): SnapstackError =>
    glibc
      ? usageError(
          char !== undefined
            ? `${program}: option requires an argument -- '${char}'`
            : `${program}: option '${word}' requires an argument`,
        )
      : usageError(`missing argument for option '${word}'`);

  const options: ParsedArgs["options"] = {};
  const positionals: string[] = [];
  const sequence: ParsedArgs["sequence"] = [];
  const store = (spec: OptionSpec, value: string | true): void => {
    sequence.push({ name: spec.name, value });
    if (value === true) {
      options[spec.name] = true;
      return;
    }
    const previous = options[spec.name];
    if (spec.repeat === "list") {
      options[spec.name] = Array.isArray(previous) ? [...previous, value] : [value];
    } else if (spec.repeat === "comma") {
      // qemu-img's is_valid_option_list, for each -o given: not empty, no leading comma, no unescaped trailing one.
      const trailingCommas = value.length - value.replace(/,+$/, "").length;
      if (value === "" || value.startsWith(",") || trailingCommas % 2 === 1) {
        throw new SnapstackError("E_INVALID_OPTION", `Invalid option list: ${value}`, { text: value });
      }
      options[spec.name] = typeof previous === "string" ? `${previous},${value}` : value;
    } else {
      options[spec.name] = value;
    }
  };

  let index = 0;
  while (index < argv.length) {
    const word = argv[index++];
    if (word === "--") {
      positionals.push(...argv.slice(index));
      break;
    }
    if (word.startsWith("--")) {
      const equals = word.indexOf("=");
      const name = equals >= 0 ? word.slice(2, equals) : word.slice(2);
      const spec = findLong(specs, name, unimplemented);
      if (spec === undefined) throw unrecognized(word);
      let value: string | true;
      if (!spec.value) {
        if (equals >= 0) {
          throw usageError(glibc ? `${program}: option '--${spec.long}' doesn't allow an argument` : `unrecognized option '${word}'`);
        }
        value = true;
      } else if (equals >= 0) {
        value = word.slice(equals + 1);
      } else {
        if (index >= argv.length) throw missing(word);
        value = argv[index++];
      }
      // A usage error above is what qemu reports too; an option it would run is one snapstack cannot.
      if (!("name" in spec)) throw new SnapstackError("E_UNSUPPORTED_FEATURE", `option '--${spec.long}' is not supported by snapstack`);
      store(spec, value);
      continue;
    }
    if (word.startsWith("-") && word.length > 1) {
      for (let charIndex = 1; charIndex < word.length; charIndex++) {
        const char = word[charIndex];
        const spec = specs.find((candidate) => candidate.short === char);
        if (spec === undefined) throw unrecognized(glibc ? word : `-${char}`, char);
        if (!spec.value) {
          store(spec, true);
          continue;
        }
        if (charIndex + 1 < word.length) {
          store(spec, word.slice(charIndex + 1));
        } else {
          if (index >= argv.length) throw missing(`-${char}`, char);
          store(spec, argv[index++]);
        }
        break;
      }
      continue;
    }
    positionals.push(word);
  }
  return { options, positionals, sequence };
}

/** The string value of an option, or undefined. */
export function optionString(parsed: ParsedArgs, name: string): string | undefined {
  const value = parsed.options[name];
  if (typeof value === "string") return value;
  if (Array.isArray(value)) return value[value.length - 1];
  return undefined;
}

export function optionFlag(parsed: ParsedArgs, name: string): boolean {
  return parsed.options[name] === true;
}

export function optionList(parsed: ParsedArgs, name: string): string[] {
  const value = parsed.options[name];
  if (Array.isArray(value)) return value;
  if (typeof value === "string") return [value];
  return [];
}
