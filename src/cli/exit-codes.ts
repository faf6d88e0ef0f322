/**
 * The one table mapping error codes to process exit codes.
 *
 * Every error exits 1 as in qemu-img, except where a command documents other
 * codes (qemu-img 7.2 behaviour):
 * - compare: 0 identical, 1 different, 2 an image could not be opened, 3 a
 *   block status query failed during the walk (corrupt metadata), 4 a read
 *   failed during the walk (chain/compare-images.ts marks the stage in the
 *   error's details); usage errors 1.
 * - check: 0 clean, 2 corruptions, 3 only leaks, 63 format without checks;
 *   1 when the check could not complete (any error).
 * docs/errors.md shows this table; a unit test keeps the two in step.
 */
import { ERROR_CODES, type ErrorCode } from "../base/errors.ts";

/** Exit code for an error in any command unless overridden below. */
export const EXIT_CODES: Record<ErrorCode, number> = Object.fromEntries(
  Object.keys(ERROR_CODES).map((code) => [code, 1]),
) as Record<ErrorCode, number>;

/** Per-command overrides: `default` applies to every code not listed. */
export const COMMAND_EXIT_CODES: Record<string, { default?: number } & Partial<Record<ErrorCode, number>>> = {
  compare: { default: 2, E_USAGE: 1 },
};

/** Per-command exit codes by the stage an error carries (`details.stage`); they win over the code. */
export const COMMAND_STAGE_EXIT_CODES: Record<string, Record<string, number>> = {
  compare: { status: 3, read: 4 },
};

/** Exit statuses a command returns on success paths (not errors). */
export const RESULT_EXIT_CODES = {
  ok: 0,
  compareDifferent: 1,
  checkCorruptions: 2,
  checkLeaks: 3,
  checkNotSupported: 63,
  ioCommandFailed: 1,
} as const;

export function exitCodeFor(command: string, code: ErrorCode, stage?: unknown): number {
  const byStage = typeof stage === "string" ? COMMAND_STAGE_EXIT_CODES[command]?.[stage] : undefined;
  if (byStage !== undefined) return byStage;
  const overrides = COMMAND_EXIT_CODES[command];
  if (overrides !== undefined) {
    const specific = overrides[code];
    if (specific !== undefined) return specific;
    if (overrides.default !== undefined) return overrides.default;
  }
  return EXIT_CODES[code];
}
