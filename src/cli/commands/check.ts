/**
 * `snapstack img check [-f fmt] [--output=human|json] [-r leaks|all] [-q] FILE`
 *
 * Exit status as qemu-img 7.2: 0 consistent, 1 check not completed, 2
 * corruptions, 3 only leaks, 63 the format has no check.
 */
import { SnapstackError } from "../../base/errors.ts";
import { formatFixed } from "../../base/units.ts";
import { optionFlag, optionString, parseArgs } from "../args.ts";
import { checkCacheOptions, expectPositionals, parseOutputFormat, refuseForceShareForWriting } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { checkImage } from "../engine.ts";
import { qemuCheckExitCode, toQemuCheckJson, type Qcow2CheckResult } from "../../formats/qcow2/check.ts";
import { RESULT_EXIT_CODES } from "../exit-codes.ts";
import { PROGRAM_NAME, formatErrorLine } from "../error-report.ts";
import { formatQemuJson } from "../qemu-json.ts";

/** dump_human_image_check. */
export function formatCheckHuman(result: Qcow2CheckResult): string {
  const { corruptions, leaks, checkErrors } = result;
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
  const total = result.totalClusters;
  const allocated = result.allocatedClusters;
  if (total !== 0 && allocated !== 0) {
    const percent = (part: number, whole: number): string => formatFixed((part * 100) / whole, 2);
    out += `${allocated}/${total} = ${percent(allocated, total)}% allocated, ${percent(result.fragmentedClusters, allocated)}% fragmented, ${percent(result.compressedClusters, allocated)}% compressed clusters\n`;
  }
  if (result.imageEndOffset !== 0) out += `Image end offset: ${result.imageEndOffset}\n`;
  return out;
}

export const checkCommand: CliCommand = {
  name: "check",
  synopsis: "check [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-q] [-U] filename",
  summary: "Check an image for consistency (exit 0 clean, 2 corruptions, 3 leaks only, 63 no check for the format, 1 check failed).",
  optionHelp: [
    "  -f fmt          image format; detected when omitted",
    "  --output=ofmt   human (default) or json",
    "  -r leaks|all    repair leaked clusters, or everything (riskier)",
    "  -T src_cache    cache mode (accepted and checked, as qemu-img's)",
    "  -q              quiet",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "format", short: "f", long: "format", value: true },
      { name: "output", long: "output", value: true },
      { name: "repair", short: "r", long: "repair", value: true },
      { name: "quiet", short: "q", long: "quiet" },
      { name: "forceShare", short: "U", long: "force-share" },
      { name: "sourceCache", short: "T", value: true },
    ]);
    // -T: the cache mode qemu-img opens the image with; checked, no other effect here.
    checkCacheOptions(parsed);
    const output = parseOutputFormat(optionString(parsed, "output"));
    const repairText = optionString(parsed, "repair");
    if (repairText !== undefined && repairText !== "leaks" && repairText !== "all") {
      throw new SnapstackError("E_USAGE", `Unknown option value for -r (expecting 'leaks' or 'all'): ${repairText}`);
    }
    expectPositionals(parsed.positionals, 1, 1, "Expecting one image file name");
    refuseForceShareForWriting(parsed, repairText !== undefined);
    const quiet = optionFlag(parsed, "quiet");
    const filename = parsed.positionals[0];
    const outcome = await checkImage(filename, { format: optionString(parsed, "format"), repair: repairText, forceShare: optionFlag(parsed, "forceShare") });
    if (outcome === "unsupported") {
      context.err(formatErrorLine(new SnapstackError("E_UNSUPPORTED_FEATURE", "This image format does not support checks")));
      return RESULT_EXIT_CODES.checkNotSupported;
    }
    // Per-finding lines go to stderr as qemu-img prints them, with our program name.
    for (const line of outcome.messages) context.err(`${line.replace(/^qemu-img: /, `${PROGRAM_NAME}: `)}\n`);
    if (outcome.failure !== null) {
      throw new SnapstackError("E_IO", `Check failed: ${outcome.failure}`, { path: filename });
    }
    if (!quiet) {
      if (output === "human" && (outcome.leaksFixed !== 0 || outcome.corruptionsFixed !== 0)) {
        context.out(
          `The following inconsistencies were found and repaired:\n\n    ${outcome.leaksFixed} leaked clusters\n    ${outcome.corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`,
        );
      }
      context.out(output === "json" ? `${formatQemuJson(toQemuCheckJson(outcome, filename, outcome.format))}\n` : formatCheckHuman(outcome));
    }
    if (outcome.checkErrors !== 0) throw new SnapstackError("E_IO", "Check failed", { path: filename, checkErrors: outcome.checkErrors });
    return qemuCheckExitCode(outcome);
  },
};
