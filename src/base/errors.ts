/**
 * Errors are data: every failure that reaches a user carries a stable `code`
 * (matched on by scripts and tests), a one-line message naming the subject and
 * the violated constraint, and optional structured details.
 *
 * The table `ERROR_CODES` is the single list of codes. The CLI maps them to
 * exit codes, the NBD server to errno values; docs/errors.md is kept in step
 * with this table by a test.
 */

export const ERROR_CODES = {
  // Input given by the user (arguments, options, sizes).
  E_USAGE: "invalid command line (unknown option, missing or extra argument)",
  E_INVALID_SIZE: "a size or offset does not parse or is out of range",
  E_INVALID_OPTION: "an -o option is unknown, malformed, or conflicts with another",
  E_OUT_OF_RANGE: "I/O request outside the virtual disk",
  // Files.
  E_NOT_FOUND: "a file, or a named persistent dirty bitmap, does not exist",
  E_ACCESS: "a file cannot be opened with the required permissions",
  E_EXISTS: "a file exists where a new one was to be created, or a bitmap of that name",
  E_IO: "the operating system reported an I/O error",
  E_NO_SPACE: "no space left on the device",
  // Formats.
  E_UNKNOWN_FORMAT: "the format name is not one snapstack supports",
  E_WRONG_FORMAT: "the file is not in the format that was asked for",
  E_BAD_HEADER: "the image header is truncated, garbled or has invalid fields",
  E_UNSUPPORTED_FEATURE: "the image uses a feature snapstack does not implement",
  E_CORRUPT_IMAGE: "the image metadata is inconsistent (points outside the file, overlaps other metadata)",
  E_IMAGE_MARKED_CORRUPT: "the image carries the corrupt bit and cannot be opened read-write",
  E_ENCRYPTED: "the image is encrypted and encryption is not implemented",
  E_TOO_LARGE: "a size exceeds a format or implementation limit",
  E_READ_ONLY: "a write was attempted on a read-only image or device",
  // Chains.
  E_BACKING_MISSING: "a backing file of the chain cannot be found",
  E_BACKING_LOOP: "the backing chain refers back to an image already in it",
  E_CHAIN_TOO_DEEP: "the backing chain is deeper than the limit",
  E_BACKING_FORMAT: "the backing format is missing or wrong",
  E_NOT_IN_CHAIN: "an image named as base is not in the overlay's backing chain (or there is no backing)",
  E_IN_USE: "an image is in use: as backing file by another image, by another process (QEMU's image locks, which snapstack takes too), or as the input of the command that would write it",
  // Internal snapshots.
  E_SNAPSHOT_NOT_FOUND: "no internal snapshot has the given ID or name",
  E_SNAPSHOT_EXISTS: "an internal snapshot with the new ID already exists",
  // Data.
  E_PATTERN_MISMATCH: "data read back differs from the expected pattern",
  E_COMPRESSION: "a compressed cluster could not be decompressed",
  E_ABORTED: "the operation was cancelled",
  // Virtual machines (QEMU processes and their QMP connection).
  E_QEMU: "QEMU failed to start, exited unexpectedly or closed its QMP connection",
  E_QMP: "QEMU refused a QMP command (its error class and description are in the message)",
  E_STATE_DAMAGED: "a snapshot's saved VM state file is not the size it was saved with (truncated or replaced)",
  E_TIMEOUT: "an operation did not finish within its time limit",
  E_INTERNAL: "an internal error (a bug): please report it",
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

export class SnapstackError extends Error {
  readonly code: ErrorCode;
  readonly details: Readonly<Record<string, unknown>>;

  constructor(code: ErrorCode, message: string, details: Record<string, unknown> = {}) {
    super(message);
    this.name = "SnapstackError";
    this.code = code;
    this.details = details;
  }
}

export function isSnapstackError(value: unknown): value is SnapstackError {
  return value instanceof SnapstackError;
}

/**
 * strerror() of the errno QEMU's block layer returns for a failure of this
 * kind: the text qemu-io and qemu-img print after "read failed: " or
 * "error while reading offset N: ".
 */
export function qemuErrnoText(code: ErrorCode): string {
  switch (code) {
    case "E_USAGE":
    case "E_INVALID_SIZE":
      return "Invalid argument";
    case "E_NO_SPACE":
    case "E_TOO_LARGE":
      return "No space left on device";
    case "E_READ_ONLY":
    case "E_ACCESS":
      return "Operation not permitted";
    case "E_UNSUPPORTED_FEATURE":
      return "Operation not supported";
    default:
      return "Input/output error";
  }
}

const ALSO_FAILED = "; also failed: ";

/**
 * `first`, naming `second` as well when that is another failure: two parts
 * of one operation that failed each for its own reason (restore's compare
 * and its copy, a copy's loop and its writer) are both reported. The code
 * and details are `first`'s, the message says both, and details.alsoFailed
 * gives `second`'s code and message. `second` that already reports `first`
 * (made by this function from it) is returned; `first` that is not a
 * SnapstackError (a bug: its own stack matters more) is returned as it is.
 */
export function withSecondFailure(first: unknown, second: unknown): unknown {
  if (second === undefined || second === null || second === first || !(first instanceof SnapstackError)) return first;
  if (second instanceof SnapstackError && second.code === first.code && second.message.startsWith(first.message + ALSO_FAILED)) return second;
  const code = second instanceof SnapstackError ? second.code : undefined;
  const message = second instanceof Error ? second.message : String(second);
  return new SnapstackError(first.code, `${first.message}${ALSO_FAILED}${code === undefined ? "" : `${code}: `}${message}`, { ...first.details, alsoFailed: { code, message } });
}

/** Turn an OS error from node:fs into a coded error naming the path. */
export function fromSystemError(error: unknown, path: string, action: string): SnapstackError {
  if (error instanceof SnapstackError) return error;
  const sys = error as NodeJS.ErrnoException;
  const why = sys && typeof sys.message === "string" ? sys.code ?? sys.message : String(error);
  switch (sys?.code) {
    case "ENOENT":
      return new SnapstackError("E_NOT_FOUND", `${path}: cannot ${action}: no such file or directory`, { path });
    case "EACCES":
    case "EPERM":
    case "EROFS":
      return new SnapstackError("E_ACCESS", `${path}: cannot ${action}: permission denied`, { path });
    case "EEXIST":
      return new SnapstackError("E_EXISTS", `${path}: cannot ${action}: file exists`, { path });
    case "ENOSPC":
      return new SnapstackError("E_NO_SPACE", `${path}: cannot ${action}: no space left on device`, { path });
    case "EISDIR":
      return new SnapstackError("E_ACCESS", `${path}: cannot ${action}: is a directory`, { path });
    default:
      return new SnapstackError("E_IO", `${path}: cannot ${action}: ${why}`, { path, errno: sys?.code });
  }
}

/**
 * Assertions are for invariants of our own code, never for bytes read from a
 * disk or the network (those are input and get coded errors).
 */
export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new SnapstackError("E_INTERNAL", `assertion failed: ${message}`);
}

/**
 * Like Promise.all for work that fills or reads one buffer: waits until
 * every promise settled, then rejects with the first failure. With
 * Promise.all the caller would get the error while the other reads still
 * write into (or writes still read from) a buffer it then reuses.
 */
export async function settleAll(promises: readonly Promise<unknown>[]): Promise<void> {
  if (promises.length === 1) {
    await promises[0];
    return;
  }
  const failure = (await Promise.allSettled(promises)).find((result) => result.status === "rejected");
  if (failure !== undefined) throw failure.reason;
}
