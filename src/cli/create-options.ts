/**
 * qemu-img's `-o` option lists for create, convert and measure: parsing
 * ("a=1,b=2", ",," escapes a comma), the per-format tables of option names,
 * types and defaults, the `-o help` listing and the "Formatting ..." banner.
 *
 * Design notes
 * - This is input validation at the edge, as QEMU's QemuOpts does before the
 *   driver runs: unknown names and values of the wrong type (bool, size,
 *   number) fail here with E_INVALID_OPTION. Whether a value makes sense for
 *   the format (cluster size a power of two, compat=0.10 with lazy refcounts)
 *   is the library's decision.
 * - The banner prints options in the order of QEMU 7.2's option list, with
 *   defaults filled in, exactly as `qemu-img create` does (observed with
 *   qemu-img 7.2: every option set at once gives the order below). Sizes and
 *   numbers print parsed (cluster_size=64k -> 65536), strings and booleans
 *   as typed.
 */
import { SnapstackError } from "../base/errors.ts";
import { parseSizeBig } from "../base/units.ts";
import { isImageFormat, parseOutputFormat } from "../chain/image-format.ts";

export type CreateOptionType = "string" | "bool" | "size" | "number";

export interface CreateOptionSpec {
  name: string;
  type: CreateOptionType;
  help: string;
  /** Printed in the banner when the option is not given. */
  defaultValue?: string;
}

/** Options of the file protocol under every format (qemu's file-posix), in banner order. */
const FILE_OPTIONS: CreateOptionSpec[] = [
  { name: "nocow", type: "bool", help: "Turn off copy-on-write (valid only on btrfs)" },
  { name: "preallocation", type: "string", help: "Preallocation mode (allowed values: off, falloc, full)" },
  { name: "extent_size_hint", type: "size", help: "Extent size hint for the image file, 0 to disable" },
];

/** Append protocol options the format does not define itself (qemu_opts_append keeps the first). */
function withFileOptions(formatOptions: CreateOptionSpec[]): CreateOptionSpec[] {
  return [...formatOptions, ...FILE_OPTIONS.filter((spec) => !formatOptions.some((own) => own.name === spec.name))];
}

/** Banner order for qcow2 (qemu-img 7.2), followed by the file protocol's options. */
const QCOW2_OPTIONS: CreateOptionSpec[] = [
  { name: "encryption", type: "bool", help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)" },
  { name: "encrypt.format", type: "string", help: "Encrypt the image, format choices: 'aes', 'luks'" },
  { name: "encrypt.key-secret", type: "string", help: "ID of secret providing qcow AES key or LUKS passphrase" },
  { name: "encrypt.cipher-alg", type: "string", help: "Name of encryption cipher algorithm" },
  { name: "encrypt.cipher-mode", type: "string", help: "Name of encryption cipher mode" },
  { name: "encrypt.ivgen-alg", type: "string", help: "Name of IV generator algorithm" },
  { name: "encrypt.ivgen-hash-alg", type: "string", help: "Name of IV generator hash algorithm" },
  { name: "encrypt.hash-alg", type: "string", help: "Name of encryption hash algorithm" },
  { name: "encrypt.iter-time", type: "number", help: "Time to spend in PBKDF in milliseconds" },
  { name: "cluster_size", type: "size", help: "qcow2 cluster size", defaultValue: "65536" },
  { name: "extended_l2", type: "bool", help: "Extended L2 tables", defaultValue: "off" },
  { name: "preallocation", type: "string", help: "Preallocation mode (allowed values: off, metadata, falloc, full)" },
  { name: "compression_type", type: "string", help: "Compression method used for image cluster compression", defaultValue: "zlib" },
  { name: "size", type: "size", help: "Virtual disk size" },
  { name: "compat", type: "string", help: "Compatibility level (v2 [0.10] or v3 [1.1])" },
  { name: "backing_file", type: "string", help: "File name of a base image" },
  { name: "backing_fmt", type: "string", help: "Image format of the base image" },
  { name: "data_file", type: "string", help: "File name of an external data file" },
  { name: "data_file_raw", type: "bool", help: "The external data file must stay valid as a raw image" },
  { name: "lazy_refcounts", type: "bool", help: "Postpone refcount updates", defaultValue: "off" },
  { name: "refcount_bits", type: "number", help: "Width of a reference count entry in bits", defaultValue: "16" },
];

const RAW_OPTIONS: CreateOptionSpec[] = [{ name: "size", type: "size", help: "Virtual disk size" }];

/** Each format's own options (banner order); the file protocol's follow them. */
const FORMAT_OPTION_SPECS: Record<string, CreateOptionSpec[]> = { qcow2: QCOW2_OPTIONS, raw: RAW_OPTIONS };

export const SUPPORTED_FORMATS = Object.keys(FORMAT_OPTION_SPECS);

function formatOptions(format: string): CreateOptionSpec[] {
  // A format snapstack only reads (vmdk) is refused as such, not as unknown.
  if (isImageFormat(format)) parseOutputFormat(format);
  const specs = FORMAT_OPTION_SPECS[format];
  if (specs === undefined) throw new SnapstackError("E_UNKNOWN_FORMAT", `Unknown file format '${format}'`, { format });
  return specs;
}

/** All create options of a format, protocol options included; E_UNKNOWN_FORMAT for other names. */
export function requireKnownFormat(format: string): CreateOptionSpec[] {
  return withFileOptions(formatOptions(format));
}

/** One `name=value` of an option list, in the order given. */
export interface OptionEntry {
  name: string;
  value: string;
}

/** Split qemu's "a=1,b=2" syntax (",," is a literal comma; a bare name means "on"). */
export function parseOptionList(text: string): OptionEntry[] {
  const entries: OptionEntry[] = [];
  let index = 0;
  const readUntil = (stops: string): string => {
    let out = "";
    while (index < text.length) {
      const char = text[index];
      if (char === "," && text[index + 1] === ",") {
        out += ",";
        index += 2;
        continue;
      }
      if (stops.includes(char)) break;
      out += char;
      index++;
    }
    return out;
  };
  while (index < text.length) {
    const name = readUntil("=,");
    let value = "on";
    if (text[index] === "=") {
      index++;
      value = readUntil(",");
    }
    if (text[index] === ",") index++;
    if (name === "") throw new SnapstackError("E_INVALID_OPTION", `Invalid option list: ${text}`, { text });
    entries.push({ name, value });
  }
  return entries;
}

/** `-o help` / `-o ?` anywhere in the list. */
export function isHelpRequest(entries: readonly OptionEntry[]): boolean {
  return entries.some((entry) => entry.name === "help" || entry.name === "?");
}

const BOOL_VALUES: Record<string, boolean> = { on: true, yes: true, true: true, y: true, off: false, no: false, false: false, n: false };

/** Checked, typed create options: what the library receives. */
export interface CreateOptionValues {
  /** Every option given, by name, as typed ("on", "65536", "zlib"). */
  given: Record<string, string>;
  /** Typed values: strings, booleans and numbers (sizes in bytes). */
  typed: Record<string, string | boolean | number>;
  /** Banner fields in QEMU's order, defaults included. */
  banner: Array<[string, string]>;
}

function typeValue(spec: CreateOptionSpec, value: string): string | boolean | number {
  switch (spec.type) {
    case "bool": {
      const parsed = BOOL_VALUES[value];
      if (parsed === undefined) {
        throw new SnapstackError("E_INVALID_OPTION", `Parameter '${spec.name}' expects 'on' or 'off'`, { option: spec.name, value });
      }
      return parsed;
    }
    case "size": {
      let bytes: bigint;
      try {
        bytes = parseSizeBig(value, spec.name);
      } catch {
        throw new SnapstackError(
          "E_INVALID_OPTION",
          `Parameter '${spec.name}' expects a non-negative number below 2^64 (optional suffix k, M, G, T, P or E)`,
          { option: spec.name, value },
        );
      }
      if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) {
        throw new SnapstackError("E_TOO_LARGE", `Parameter '${spec.name}' value ${bytes} exceeds ${Number.MAX_SAFE_INTEGER}`, {
          option: spec.name,
          value,
        });
      }
      return Number(bytes);
    }
    case "number": {
      // qemu_strtou64 with base 0, as C's strtoull: 0x.. is hex, a leading 0 octal (refcount_bits=010 is 8).
      const match = /^\s*\+?(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))$/.exec(value);
      const number = match === null ? Number.NaN : match[1] !== undefined ? Number.parseInt(match[1], 16) : match[2] !== undefined ? Number.parseInt(match[2], 8) : Number(match[3]);
      if (!Number.isSafeInteger(number)) {
        throw new SnapstackError("E_INVALID_OPTION", `Parameter '${spec.name}' expects a number`, { option: spec.name, value });
      }
      return number;
    }
    default:
      return value;
  }
}

/**
 * Check an option list against a format's table. Later values of the same
 * option override earlier ones, as in qemu.
 */
export function checkCreateOptions(format: string, entries: readonly OptionEntry[]): CreateOptionValues {
  return checkOptionsAgainst(format, requireKnownFormat(format), entries);
}

/** `amend -o` options, typed: qcow2's own create options (not the file protocol's, such as nocow) and its amend-only ones (LUKS key slots), as qemu-img parses them. */
export function checkAmendOptions(entries: readonly OptionEntry[]): CreateOptionValues {
  return checkOptionsAgainst("qcow2", [...formatOptions("qcow2"), ...QCOW2_AMEND_ONLY], entries);
}

function checkOptionsAgainst(format: string, specs: CreateOptionSpec[], entries: readonly OptionEntry[]): CreateOptionValues {
  const given: Record<string, string> = {};
  const typed: Record<string, string | boolean | number> = {};
  for (const entry of entries) {
    const spec = specs.find((candidate) => candidate.name === entry.name);
    if (spec === undefined) {
      throw new SnapstackError("E_INVALID_OPTION", `Invalid parameter '${entry.name}'`, { option: entry.name, format });
    }
    typed[spec.name] = typeValue(spec, entry.value);
    given[spec.name] = entry.value;
  }
  return { given, typed, banner: bannerFields(specs, given, typed) };
}

function bannerFields(specs: CreateOptionSpec[], given: Record<string, string>, typed: Record<string, string | boolean | number>): Array<[string, string]> {
  const fields: Array<[string, string]> = [];
  for (const spec of specs) {
    const value = given[spec.name];
    if (value === undefined) {
      if (spec.defaultValue !== undefined) fields.push([spec.name, spec.defaultValue]);
      continue;
    }
    const shown = spec.type === "size" || spec.type === "number" ? String(typed[spec.name]) : value;
    fields.push([spec.name, shown]);
  }
  return fields;
}

/** "Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 ... refcount_bits=16\n" */
export function formatCreateBanner(filename: string, format: string, banner: ReadonlyArray<[string, string]>): string {
  const fields = banner.map(([name, value]) => `${name}=${value}`);
  return `Formatting '${filename}', fmt=${format}${fields.length > 0 ? " " : ""}${fields.join(" ")}\n`;
}

const TYPE_NAMES: Record<CreateOptionType, string> = { string: "str", bool: "bool (on/off)", size: "size", number: "num" };

/**
 * The `-o help` listing as qemu-img prints it: with a target file name, all
 * options; without one, only the format's own plus a note.
 */
/** The qcow2 options `amend` takes, as `qemu-img amend -o help` lists them (four exist for amend only). */
const QCOW2_AMEND_NAMES = ["backing_file", "backing_fmt", "compat", "data_file", "data_file_raw", "encrypt.iter-time", "lazy_refcounts", "refcount_bits", "size"];
const QCOW2_AMEND_ONLY: CreateOptionSpec[] = [
  { name: "encrypt.keyslot", type: "number", help: "Select a single keyslot to modify explicitly" },
  { name: "encrypt.new-secret", type: "string", help: "New secret to set in the matching keyslots. Empty string to erase" },
  { name: "encrypt.old-secret", type: "string", help: "Select all keyslots that match this password" },
  { name: "encrypt.state", type: "string", help: "Select new state of affected keyslots (active/inactive)" },
];

function optionHelpLines(specs: readonly CreateOptionSpec[]): string {
  const sorted = [...specs].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return sorted.map((spec) => `  ${`${spec.name}=<${TYPE_NAMES[spec.type]}>`.padEnd(22)} - ${spec.help}\n`).join("");
}

/** `qemu-img amend -o help` for qcow2. */
export function formatAmendHelp(): string {
  const specs = [...requireKnownFormat("qcow2").filter((spec) => QCOW2_AMEND_NAMES.includes(spec.name)), ...QCOW2_AMEND_ONLY];
  return `Amend options for 'qcow2':\n${optionHelpLines(specs)}`;
}

export function formatOptionHelp(format: string, withTarget: boolean): string {
  const lines = optionHelpLines(withTarget ? requireKnownFormat(format) : formatOptions(format));
  if (withTarget) return `Supported options:\n${lines}`;
  return `Supported ${format} options:\n${lines}\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n`;
}
