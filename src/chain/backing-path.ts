/**
 * Backing file names as QEMU resolves them (block.c
 * bdrv_get_full_backing_filename_from_filename, util/cutils.c path_combine):
 * an absolute name stays as it is; a relative one is appended to the
 * overlay's name up to and including its last '/', without normalising
 * ("sub/top.qcow2" + "../base.qcow2" = "sub/../base.qcow2"). Names with a
 * protocol prefix ("json:{...}", "nbd:...") are not files: snapstack refuses
 * them, except "file:" which is stripped.
 */
import { realpathSync } from "node:fs";
import { dirname, relative, resolve } from "node:path";
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

/** The path with every symbolic link and ".." resolved as the kernel does, or only made absolute where it does not exist. */
function kernelPath(path: string): string {
  try {
    return realpathSync.native(path);
  } catch {
    return resolve(path);
  }
}

/**
 * The relative backing name that leads from an overlay at `overlayPath`
 * (which need not exist yet; its directory should) to `backingPath`, as
 * resolveBackingPath and QEMU will follow it: relative between real paths,
 * since the kernel resolves the overlay's directory through its symbolic
 * links before it meets the name's "..", where path.relative on the paths
 * as given would cancel ".." against a link's name ("out/delta.qcow2" in a
 * linked "out" must not name "../base.qcow2" for "base.qcow2").
 */
export function relativeBackingName(overlayPath: string, backingPath: string): string {
  return relative(kernelPath(dirname(resolve(overlayPath))), kernelPath(backingPath));
}
