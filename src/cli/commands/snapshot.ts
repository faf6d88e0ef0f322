/**
 * `snapstack img snapshot [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] [-q] [-U] [--wipe] FILE`
 *
 * qemu-img 7.2's snapshot subcommand: -l lists the internal snapshots
 * (nothing when there are none), -c creates one (disk only), -a applies one
 * (matched by ID first, then by name), -d deletes one (matched by name
 * only, first match). Messages are qemu-img's, after the error code:
 * "Could not create snapshot 'x': -22 (Invalid argument)",
 * "Could not apply snapshot 'x': Failed to load snapshot: No such file or directory"
 * (or "Could not apply snapshot 'x': Device has active dirty bitmaps"),
 * "Could not delete snapshot 'x': snapshot not found".
 * `--wipe` (snapstack only, with -c, -a and -d) overwrites every host
 * cluster the operation frees with zeroes before reporting success.
 */
import { SnapstackError, isSnapstackError, type ErrorCode } from "../../base/errors.ts";
import { describeImage } from "../../chain/image-info.ts";
import { Qcow2Image } from "../../formats/qcow2/qcow2-image.ts";
import { SNAPSHOT_ERRNO } from "../../formats/qcow2/internal-snapshots.ts";
import { optionFlag, parseArgs, type ParsedArgs } from "../args.ts";
import { expectPositionals, refuseForceShareForWriting } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { openImage } from "../engine.ts";
import { SNAPSHOT_TABLE_HEADER, formatSnapshotRow } from "../render-info.ts";

type Action = { kind: "list" } | { kind: "create" | "apply" | "delete"; name: string } | { kind: "none" };

/** strerror() of the errno values snapshot operations report. */
const STRERROR: Record<number, string> = {
  2: "No such file or directory",
  5: "Input/output error",
  13: "Permission denied",
  17: "File exists",
  22: "Invalid argument",
  27: "File too large",
  28: "No space left on device",
  30: "Read-only file system",
  95: "Operation not supported",
};

/** The errno QEMU would have returned for a failure with this code. */
const ERRNO_BY_CODE: Partial<Record<ErrorCode, number>> = {
  E_SNAPSHOT_NOT_FOUND: SNAPSHOT_ERRNO.ENOENT,
  E_SNAPSHOT_EXISTS: SNAPSHOT_ERRNO.EEXIST,
  E_TOO_LARGE: SNAPSHOT_ERRNO.EFBIG,
  E_UNSUPPORTED_FEATURE: SNAPSHOT_ERRNO.ENOTSUP,
  E_NO_SPACE: 28,
  E_ACCESS: 13,
  E_READ_ONLY: 30,
};

function errnoOf(error: SnapstackError): number {
  const fromDetails = error.details.errno;
  if (typeof fromDetails === "number") return fromDetails;
  return ERRNO_BY_CODE[error.code] ?? SNAPSHOT_ERRNO.EIO;
}

function strerror(errno: number): string {
  return STRERROR[errno] ?? `Unknown error ${errno}`;
}

/** Re-word a failure with qemu-img's line for the action, keeping its code. */
function actionFailure(action: Exclude<Action, { kind: "list" | "none" }>, error: unknown): unknown {
  if (!isSnapstackError(error)) return error;
  const errno = errnoOf(error);
  const subject = `'${action.name}'`;
  let message: string;
  switch (action.kind) {
    case "create":
      message = `Could not create snapshot ${subject}: -${errno} (${strerror(errno)})`;
      break;
    case "apply":
      // A refusal before the load (bdrv_snapshot_goto's own message) or a failed load.
      message = typeof error.details.reason === "string" ? `Could not apply snapshot ${subject}: ${error.details.reason}` : `Could not apply snapshot ${subject}: Failed to load snapshot: ${strerror(errno)}`;
      break;
    case "delete":
      message = error.code === "E_SNAPSHOT_NOT_FOUND" ? `Could not delete snapshot ${subject}: snapshot not found` : `Could not delete snapshot ${subject}: ${error.message}`;
      break;
  }
  return new SnapstackError(error.code, message, { ...error.details, cause: error });
}

/** What qemu-img says for a format without internal snapshots (raw). */
function noSnapshots(action: Exclude<Action, { kind: "list" | "none" }>): SnapstackError {
  const subject = `'${action.name}'`;
  switch (action.kind) {
    case "create":
      return new SnapstackError("E_UNSUPPORTED_FEATURE", `Could not create snapshot ${subject}: -${SNAPSHOT_ERRNO.ENOTSUP} (${strerror(SNAPSHOT_ERRNO.ENOTSUP)})`);
    case "apply":
      return new SnapstackError("E_UNSUPPORTED_FEATURE", `Could not apply snapshot ${subject}: Block driver does not support snapshots`);
    case "delete":
      return new SnapstackError("E_SNAPSHOT_NOT_FOUND", `Could not delete snapshot ${subject}: snapshot not found`);
  }
}

function parseAction(parsed: ParsedArgs): Action {
  const given: Action[] = [];
  // Each -l counts, as in qemu-img: `-l -l` is a mix too.
  for (const { name } of parsed.sequence) if (name === "list") given.push({ kind: "list" });
  for (const [option, kind] of [
    ["create", "create"],
    ["apply", "apply"],
    ["delete", "delete"],
  ] as const) {
    const values = parsed.options[option];
    if (Array.isArray(values)) for (const name of values) given.push({ kind, name });
  }
  if (given.length > 1) throw new SnapstackError("E_USAGE", "Cannot mix '-l', '-a', '-c', '-d'");
  return given[0] ?? { kind: "none" };
}

export const snapshotCommand: CliCommand = {
  name: "snapshot",
  synopsis: "snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] [--wipe] filename",
  summary: "List, create, apply or delete internal snapshots of a qcow2 image.",
  optionHelp: [
    "  -l            list the snapshots",
    "  -c snapshot   create a snapshot (disk only) named 'snapshot'",
    "  -a snapshot   apply a snapshot (revert the disk to it): ID first, then name",
    "  -d snapshot   delete the first snapshot named 'snapshot'",
    "  --wipe        with -c, -a or -d: overwrite every cluster the operation frees with zeroes before reporting success",
    "  -U            force share (read-only use, with -l)",
    "  -q            quiet",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "list", short: "l" },
      { name: "create", short: "c", value: true, repeat: "list" },
      { name: "apply", short: "a", value: true, repeat: "list" },
      { name: "delete", short: "d", value: true, repeat: "list" },
      { name: "quiet", short: "q" },
      { name: "forceShare", short: "U", long: "force-share" },
      { name: "wipe", long: "wipe" },
    ]);
    const action = parseAction(parsed);
    expectPositionals(parsed.positionals, 1, 1, "Expecting one image file name");
    const wipe = optionFlag(parsed, "wipe");
    if (wipe && (action.kind === "list" || action.kind === "none")) throw new SnapstackError("E_USAGE", "--wipe applies to -c, -a and -d only");
    const path = parsed.positionals[0];
    refuseForceShareForWriting(parsed, action.kind !== "list" && action.kind !== "none");
    const device = await openImage(path, { readOnly: action.kind === "list", forceShare: optionFlag(parsed, "forceShare") });
    try {
      const image = device instanceof Qcow2Image ? device : null;
      switch (action.kind) {
        case "none":
          return 0;
        case "list": {
          const snapshots = image === null ? undefined : describeImage(image, path).snapshots;
          if (!Array.isArray(snapshots) || snapshots.length === 0) return 0;
          let out = `Snapshot list:\n${SNAPSHOT_TABLE_HEADER}\n`;
          for (const snapshot of snapshots) out += `${formatSnapshotRow(snapshot as Record<string, unknown>)}\n`;
          context.out(out);
          return 0;
        }
        case "create":
        case "apply":
        case "delete":
          if (image === null) throw noSnapshots(action);
          try {
            if (action.kind === "create") await image.createSnapshot(action.name, { wipe });
            else if (action.kind === "apply") await image.applySnapshot(action.name, { wipe });
            else await image.deleteSnapshot(action.name, { wipe });
          } catch (error) {
            throw actionFailure(action, error);
          }
          return 0;
      }
    } finally {
      await device.close();
    }
  },
};
