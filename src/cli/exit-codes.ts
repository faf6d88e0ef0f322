/**
 * The one table mapping error codes to process exit codes.
 *
 * Every error exits 1 as in qemu-img, except where a command documents other
 * codes (qemu-img 7.2 behaviour):
 * - compare: 0 identical, 1 different, 2 error opening or reading an image
 *   (qemu's 2/3/4 are merged: a read error says E_IO and exits 4), usage
 *   errors 1.
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
  compare: { default: 2, E_USAGE: 1, E_IO: 4, E_COMPRESSION: 4 },
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

export function exitCodeFor(command: string, code: ErrorCode): number {
  const overrides = COMMAND_EXIT_CODES[command];
  if (overrides !== undefined) {
    const specific = overrides[code];
    if (specific !== undefined) return specific;
    if (overrides.default !== undefined) return overrides.default;
  }
  return EXIT_CODES[code];
}
