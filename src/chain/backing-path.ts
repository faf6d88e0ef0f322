/**
 * Backing file names as QEMU resolves them (block.c
 * bdrv_get_full_backing_filename_from_filename, util/cutils.c path_combine):
 * an absolute name stays as it is; a relative one is appended to the
 * overlay's name up to and including its last '/', without normalising
 * ("sub/top.qcow2" + "../base.qcow2" = "sub/../base.qcow2"). Names with a
 * protocol prefix ("json:{...}", "nbd:...") are not files: snapstack refuses
 * them, except "file:" which is stripped.
 */
import { SnapstackError } from "../base/errors.ts";

/** True when `name` has a "protocol:" prefix (a ':' before any '/'), like QEMU's path_has_protocol. */
export function hasProtocolPrefix(name: string): boolean {
  const colon = name.indexOf(":");
  if (colon <= 0) return false;
  const slash = name.indexOf("/");
  return slash === -1 || colon < slash;
}

/** The path to open for the backing name stored in an overlay named `overlayPath`. */
export function resolveBackingPath(overlayPath: string, backingName: string): string {
  let name = backingName;
  if (name.startsWith("file:")) name = name.slice("file:".length);
  else if (hasProtocolPrefix(name)) {
    throw new SnapstackError(
      "E_UNSUPPORTED_FEATURE",
      `${overlayPath}: backing file '${backingName}' uses a protocol (${name.slice(0, name.indexOf(":") + 1)}) snapstack does not support; only plain file names are`,
      { path: overlayPath, backingFile: backingName },
    );
  }
  if (name.startsWith("/")) return name;
  const slash = overlayPath.lastIndexOf("/");
  return slash === -1 ? name : overlayPath.slice(0, slash + 1) + name;
}
