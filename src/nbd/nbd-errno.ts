/**
 * The one table mapping snapstack error codes to NBD errno values (the wire
 * only knows EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP,
 * ESHUTDOWN). Codes not listed (added by other parts of snapstack later) and
 * errors that are not SnapstackErrors (bugs) are EIO, the answer that makes
 * every client report a failed request without misreading it.
 */
import { isSnapstackError, type ErrorCode } from "../base/errors.ts";
import { NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_ENOTSUP, NBD_EPERM } from "./protocol.ts";

export const NBD_ERRNO_FOR_CODE: Partial<Record<ErrorCode, number>> = {
  E_USAGE: NBD_EINVAL,
  E_INVALID_SIZE: NBD_EINVAL,
  E_INVALID_OPTION: NBD_EINVAL,
  E_OUT_OF_RANGE: NBD_EINVAL,
  E_NOT_FOUND: NBD_EIO,
  E_ACCESS: NBD_EPERM,
  E_EXISTS: NBD_EIO,
  E_IO: NBD_EIO,
  E_NO_SPACE: NBD_ENOSPC,
  E_UNKNOWN_FORMAT: NBD_EIO,
  E_WRONG_FORMAT: NBD_EIO,
  E_BAD_HEADER: NBD_EIO,
  E_UNSUPPORTED_FEATURE: NBD_ENOTSUP,
  E_CORRUPT_IMAGE: NBD_EIO,
  E_IMAGE_MARKED_CORRUPT: NBD_EIO,
  E_ENCRYPTED: NBD_EIO,
  E_TOO_LARGE: NBD_ENOSPC,
  E_READ_ONLY: NBD_EPERM,
  E_BACKING_MISSING: NBD_EIO,
  E_BACKING_LOOP: NBD_EIO,
  E_CHAIN_TOO_DEEP: NBD_EIO,
  E_BACKING_FORMAT: NBD_EIO,
  E_PATTERN_MISMATCH: NBD_EIO,
  E_COMPRESSION: NBD_EIO,
  E_ABORTED: NBD_EIO,
  E_INTERNAL: NBD_EIO,
};

export function nbdErrnoFor(error: unknown): number {
  if (isSnapstackError(error)) {
    const errno = NBD_ERRNO_FOR_CODE[error.code] ?? NBD_EIO;
    // ENOTSUP is only legal as the answer to FAST_ZERO; the caller decides that case.
    return errno === NBD_ENOTSUP ? NBD_EIO : errno;
  }
  return NBD_EIO;
}

export function errorMessageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
