/**
 * From checked -o values (create-options.ts) to the library's typed create
 * options. Only renaming and QEMU's aliases; the library validates values.
 * Options snapstack does not implement (encryption, external data files)
 * are refused here with E_UNSUPPORTED_FEATURE rather than silently dropped.
 */
import { SnapstackError } from "../base/errors.ts";
import type { Qcow2CreateOptions, Qcow2Preallocation } from "../formats/qcow2/create-qcow2.ts";

type TypedOptions = Record<string, string | boolean | number>;

const UNSUPPORTED_QCOW2_OPTIONS = ["encryption", "encrypt.format", "data_file", "data_file_raw"];
/** QEMU accepts these spellings of compat (qcow2_co_create_opts). */
const COMPAT_ALIASES: Record<string, "0.10" | "1.1"> = { "0.10": "0.10", v2: "0.10", "1.1": "1.1", v3: "1.1" };

function stringOption(typed: TypedOptions, name: string): string | undefined {
  const value = typed[name];
  return value === undefined ? undefined : String(value);
}

export function qcow2CreateOptionsFrom(typed: TypedOptions, sizeBytes: number): Qcow2CreateOptions {
  for (const name of UNSUPPORTED_QCOW2_OPTIONS) {
    if (typed[name] !== undefined && typed[name] !== false) {
      throw new SnapstackError("E_UNSUPPORTED_FEATURE", `qcow2 option '${name}' is not supported by snapstack`, { option: name });
    }
  }
  const compatText = stringOption(typed, "compat");
  const compat = compatText === undefined ? undefined : COMPAT_ALIASES[compatText];
  if (compatText !== undefined && compat === undefined) {
    throw new SnapstackError("E_INVALID_OPTION", `Invalid compatibility level: '${compatText}'`, { option: "compat", value: compatText });
  }
  const compression = stringOption(typed, "compression_type");
  if (compression !== undefined && compression !== "zlib" && compression !== "zstd") {
    throw new SnapstackError("E_INVALID_OPTION", `Invalid parameter '${compression}'`, { option: "compression_type", value: compression });
  }
  return {
    sizeBytes,
    clusterSizeBytes: typed.cluster_size as number | undefined,
    refcountBits: typed.refcount_bits as number | undefined,
    compat,
    lazyRefcounts: typed.lazy_refcounts as boolean | undefined,
    extendedL2: typed.extended_l2 as boolean | undefined,
    compressionType: compression,
    preallocation: stringOption(typed, "preallocation") as Qcow2Preallocation | undefined,
    backingFile: stringOption(typed, "backing_file"),
    backingFormat: stringOption(typed, "backing_fmt"),
  };
}
