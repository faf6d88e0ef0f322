/**
 * How a failure reaches the terminal: exactly one line on stderr,
 *
 *   snapstack: error E_NOT_FOUND: missing.qcow2: cannot open: no such file or directory
 *
 * i.e. `<program>: error <CODE>: <message>`. Newlines inside a message are
 * folded into "; " so the line count never changes. Errors that are not
 * SnapstackErrors are bugs: they print as E_INTERNAL with their message, and
 * the stack only when SNAPSTACK_DEBUG=1.
 */
import { SnapstackError, isSnapstackError } from "../base/errors.ts";

export const PROGRAM_NAME = "snapstack";

export function toSnapstackError(error: unknown): SnapstackError {
  if (isSnapstackError(error)) return error;
  const message = error instanceof Error ? error.message : String(error);
  return new SnapstackError("E_INTERNAL", `internal error: ${message}`, { cause: error });
}

function oneLine(text: string): string {
  return text
    .split(/\r?\n/)
    .map((part) => part.trim())
    .filter((part) => part !== "")
    .join("; ");
}

/** The single line (with trailing newline) printed for an error. */
export function formatErrorLine(error: SnapstackError): string {
  return `${PROGRAM_NAME}: error ${error.code}: ${oneLine(error.message)}\n`;
}

/** Extra lines for SNAPSTACK_DEBUG=1: the stack of the original error. */
export function formatDebugDetails(error: unknown, env: NodeJS.ProcessEnv): string {
  if (env.SNAPSTACK_DEBUG !== "1") return "";
  const original = isSnapstackError(error) && error.details.cause !== undefined ? error.details.cause : error;
  return original instanceof Error && original.stack !== undefined ? `${original.stack}\n` : "";
}

/** A warning line, qemu-img style: "snapstack: warning: ...". */
export function formatWarningLine(message: string): string {
  return `${PROGRAM_NAME}: warning: ${oneLine(message)}\n`;
}
