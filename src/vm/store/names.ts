/**
 * Names users give machines and snapshots. They become directory names
 * (machines) and appear in URLs and on terminals, so they are validated at
 * the edge: 1..NAME_BYTES_MAX bytes of UTF-8, no path separators, no
 * control characters, not "." or "..", no leading dash (it would read as
 * an option) and no leading or trailing blank. A machine's name may not
 * start with "." (the store's own directories do: `.NAME.creating-PID`, and
 * listings skip them). A snapshot may not be named "current": `vm diff`
 * reads that word as the machine's live disk.
 */
import { SnapstackError } from "../../base/errors.ts";

/** Longest machine or snapshot name in UTF-8 bytes (fits a directory name with room for suffixes). */
export const NAME_BYTES_MAX = 64;

export type NameKind = "machine" | "snapshot";

/** The word `vm diff` takes for the live disk; no snapshot may carry it as its name. */
export const LIVE_DISK_NAME = "current";

/** Throw E_USAGE naming the rule `name` breaks; return it unchanged when valid. */
export function validateName(kind: NameKind, name: unknown): string {
  const invalid = (why: string): SnapstackError =>
    new SnapstackError("E_USAGE", `invalid ${kind} name ${JSON.stringify(name)}: ${why}`, { kind, name });
  if (typeof name !== "string" || name.length === 0) throw invalid("must be a non-empty string");
  if (Buffer.byteLength(name, "utf8") > NAME_BYTES_MAX) throw invalid(`longer than ${NAME_BYTES_MAX} bytes`);
  if (/[/\\]/.test(name)) throw invalid("contains a path separator");
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f-\u009f]/.test(name)) throw invalid("contains a control character");
  if (name === "." || name === "..") throw invalid("is a relative directory name");
  if (name.startsWith("-")) throw invalid("starts with '-'");
  if (name.trim() !== name) throw invalid("starts or ends with a blank");
  if (kind === "machine" && name.startsWith(".")) throw invalid("starts with '.'");
  if (kind === "snapshot" && name === LIVE_DISK_NAME) throw invalid(`is reserved ('${LIVE_DISK_NAME}' names the live disk in 'vm diff')`);
  return name;
}
