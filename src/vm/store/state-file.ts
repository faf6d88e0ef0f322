/**
 * A snapshot's saved VM state (QEMU's migration stream in `state.bin`) and
 * the record of its size (`state.json`), written when the snapshot is taken.
 *
 * A revert discards the machine's current disk layer before QEMU reads the
 * state file, and QEMU notices a damaged stream only while loading it. So the
 * state file is checked first, against the size recorded when it was saved:
 * a missing, empty or truncated file is refused while nothing has changed.
 * Snapshots taken before the record existed are checked for presence only.
 */
import { existsSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { SnapstackError } from "../../base/errors.ts";
import { writeJsonAtomic } from "./atomic-file.ts";

export const STATE_FILE_NAME = "state.bin";
const STATE_RECORD_NAME = "state.json";

interface StateRecord {
  sizeBytes: number;
}

/** Path of the state file in a snapshot's directory. */
export function stateFilePath(snapshotDir: string): string {
  return join(snapshotDir, STATE_FILE_NAME);
}

/** Record the size of a just-saved state file (durably; before the snapshot is committed). */
export function recordStateSize(snapshotDir: string, sizeBytes: number): void {
  writeJsonAtomic(join(snapshotDir, STATE_RECORD_NAME), { sizeBytes } satisfies StateRecord);
}

/** Refuse a state file that is missing, empty, or not the size it was saved with. */
export function checkStateFile(snapshotDir: string, what: { machine: string; snapshot: string }): string {
  const path = stateFilePath(snapshotDir);
  const label = `snapshot '${what.snapshot}' of machine '${what.machine}'`;
  const actualBytes = existsSync(path) ? statSync(path).size : 0;
  if (actualBytes === 0) {
    throw new SnapstackError("E_NOT_FOUND", `${label}: its VM state file ${path} is missing or empty`, { ...what, path });
  }
  const recordPath = join(snapshotDir, STATE_RECORD_NAME);
  if (!existsSync(recordPath)) return path;
  let record: Partial<StateRecord>;
  try {
    record = JSON.parse(readFileSync(recordPath, "utf8")) as Partial<StateRecord>;
  } catch {
    throw new SnapstackError("E_STATE_DAMAGED", `${label}: the record of its VM state ${recordPath} does not parse`, { ...what, path: recordPath });
  }
  if (record.sizeBytes !== actualBytes) {
    throw new SnapstackError("E_STATE_DAMAGED", `${label}: its VM state file ${path} holds ${actualBytes} bytes, ${record.sizeBytes} were saved (truncated or replaced)`, { ...what, path });
  }
  return path;
}
