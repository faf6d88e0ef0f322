/**
 * `snapstack img check [-f fmt] [--output=human|json] [-r leaks|all] [-q] FILE`
 *
 * Exit status as qemu-img 7.2: 0 consistent, 1 check not completed, 2
 * corruptions, 3 only leaks, 63 the format has no check.
 */
import { SnapstackError } from "../../base/errors.ts";
import { formatFixed } from "../../base/units.ts";
import { optionFlag, optionString, parseArgs } from "../args.ts";
import { expectPositionals, parseOutputFormat } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { checkImage, type CheckResult } from "../engine.ts";
import { RESULT_EXIT_CODES } from "../exit-codes.ts";
import { formatErrorLine } from "../error-report.ts";
import { formatQemuJson } from "../qemu-json.ts";

/** QAPI ImageCheck: optional members are present only when non-zero (collect_image_check). */
const OPTIONAL_CHECK_FIELDS = [
  "image-end-offset",
  "corruptions",
  "leaks",
  "corruptions-fixed",
  "leaks-fixed",
  "total-clusters",
  "allocated-clusters",
  "fragmented-clusters",
  "compressed-clusters",
] as const;

export function checkResultJson(result: CheckResult): Record<string, unknown> {
  const json: Record<string, unknown> = { filename: result.filename, format: result.format, "check-errors": result["check-errors"] };
  for (const field of OPTIONAL_CHECK_FIELDS) {
    const value = result[field];
    if (value !== undefined && value !== 0) json[field] = value;
  }
  return json;
}

/** dump_human_image_check. */
export function formatCheckHuman(result: CheckResult): string {
  const corruptions = result.corruptions ?? 0;
  const leaks = result.leaks ?? 0;
  const checkErrors = result["check-errors"];
  let out = "";
  if (corruptions === 0 && leaks === 0 && checkErrors === 0) {
    out += "No errors were found on the image.\n";
  } else {
    if (corruptions !== 0) {
      out += `\n${corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    }
    if (leaks !== 0) {
      out += `\n${leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    }
    if (checkErrors !== 0) out += `\n${checkErrors} internal errors have occurred during the check.\n`;
  }
  const total = result["total-clusters"] ?? 0;
  const allocated = result["allocated-clusters"] ?? 0;
  if (total !== 0 && allocated !== 0) {
    const percent = (part: number, whole: number): string => formatFixed((part * 100) / whole, 2);
    out += `${allocated}/${total} = ${percent(allocated, total)}% allocated, ${percent(result["fragmented-clusters"] ?? 0, allocated)}% fragmented, ${percent(result["compressed-clusters"] ?? 0, allocated)}% compressed clusters\n`;
  }
  const endOffset = result["image-end-offset"] ?? 0;
  if (endOffset !== 0) out += `Image end offset: ${endOffset}\n`;
  return out;
}

export const checkCommand: CliCommand = {
  name: "check",
  synopsis: "check [-f fmt] [--output=ofmt] [-r [leaks | all]] [-q] [-U] filename",
  summary: "Check an image for consistency (exit 0 clean, 2 corruptions, 3 leaks only, 63 no check for the format, 1 check failed).",
  optionHelp: [
    "  -f fmt          image format; detected when omitted",
    "  --output=ofmt   human (default) or json",
    "  -r leaks|all    repair leaked clusters, or everything (riskier)",
    "  -q              quiet",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "format", short: "f", long: "format", value: true },
      { name: "output", long: "output", value: true },
      { name: "repair", short: "r", long: "repair", value: true },
      { name: "quiet", short: "q", long: "quiet" },
      { name: "forceShare", short: "U", long: "force-share" },
    ]);
    const output = parseOutputFormat(optionString(parsed, "output"));
    const repairText = optionString(parsed, "repair");
    if (repairText !== undefined && repairText !== "leaks" && repairText !== "all") {
      throw new SnapstackError("E_USAGE", `Unknown option value for -r (expecting 'leaks' or 'all'): ${repairText}`);
    }
    expectPositionals(parsed.positionals, 1, 1, "Expecting one image file name");
    const quiet = optionFlag(parsed, "quiet");
    const outcome = await checkImage(parsed.positionals[0], {
      format: optionString(parsed, "format"),
      repair: repairText,
      onMessage: (line) => context.err(`${line}\n`),
    });
    if (outcome === "unsupported") {
      context.err(formatErrorLine(new SnapstackError("E_UNSUPPORTED_FEATURE", "This image format does not support checks")));
      return RESULT_EXIT_CODES.checkNotSupported;
    }
    const leaksFixed = outcome["leaks-fixed"] ?? 0;
    const corruptionsFixed = outcome["corruptions-fixed"] ?? 0;
    if (!quiet) {
      if (output === "human" && (leaksFixed !== 0 || corruptionsFixed !== 0)) {
        context.out(
          `The following inconsistencies were found and repaired:\n\n    ${leaksFixed} leaked clusters\n    ${corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`,
        );
      }
      context.out(output === "json" ? `${formatQemuJson(checkResultJson(outcome))}\n` : formatCheckHuman(outcome));
    }
    if (outcome["check-errors"] !== 0) throw new SnapstackError("E_IO", "Check failed", { checkErrors: outcome["check-errors"] });
    if ((outcome.corruptions ?? 0) !== 0) return RESULT_EXIT_CODES.checkCorruptions;
    if ((outcome.leaks ?? 0) !== 0) return RESULT_EXIT_CODES.checkLeaks;
    return RESULT_EXIT_CODES.ok;
  },
};
