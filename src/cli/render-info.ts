/**
 * qemu-img info's human output (QEMU 7.2 block/qapi.c bdrv_image_info_dump,
 * bdrv_snapshot_dump, dump_qobject), rendered from the same QAPI ImageInfo
 * objects that --output=json prints.
 */
import { formatSize } from "../base/units.ts";
import { orderLikeQdict } from "./qemu-json.ts";

type Json = Record<string, unknown>;

function pad2(value: number): string {
  return String(value).padStart(2, "0");
}

/** strftime("%Y-%m-%d %H:%M:%S") in local time, as qemu does. */
function formatLocalDate(dateSec: number): string {
  const date = new Date(dateSec * 1000);
  return `${date.getFullYear()}-${pad2(date.getMonth() + 1)}-${pad2(date.getDate())} ${pad2(date.getHours())}:${pad2(date.getMinutes())}:${pad2(date.getSeconds())}`;
}

/** "HH:MM:SS.mmm" of the guest clock. */
function formatVmClock(clockNs: number): string {
  const seconds = Math.floor(clockNs / 1e9);
  const millis = Math.floor(clockNs / 1e6) % 1000;
  return `${pad2(Math.floor(seconds / 3600))}:${pad2(Math.floor(seconds / 60) % 60)}:${pad2(seconds % 60)}.${String(millis).padStart(3, "0")}`;
}

export const SNAPSHOT_TABLE_HEADER = `${"ID".padEnd(10)}${"TAG".padEnd(17)}${"VM SIZE".padStart(8)}${"DATE".padStart(20)}${"VM CLOCK".padStart(13)}${"ICOUNT".padStart(11)}`;

/** printf("%-Ns"): pads to N bytes of UTF-8, not N characters (a name "ü..." gets one space less per two-byte character). */
function padEndBytes(text: string, widthBytes: number): string {
  return text + " ".repeat(Math.max(0, widthBytes - Buffer.byteLength(text)));
}

/** One row of the snapshot table (SnapshotInfo object from the JSON). */
export function formatSnapshotRow(snapshot: Json): string {
  const clockNs = Number(snapshot["vm-clock-sec"] ?? 0) * 1e9 + Number(snapshot["vm-clock-nsec"] ?? 0);
  const icount = snapshot.icount === undefined ? "" : String(snapshot.icount);
  return (
    `${padEndBytes(String(snapshot.id), 9)} ${padEndBytes(String(snapshot.name), 16)} ` +
    `${formatSize(Number(snapshot["vm-state-size"] ?? 0)).padStart(8)}` +
    `${formatLocalDate(Number(snapshot["date-sec"] ?? 0)).padStart(20)}` +
    `${formatVmClock(clockNs).padStart(13)}${icount.padStart(11)}`
  );
}

/** dump_qobject: dicts in QEMU's hash order, dashes in keys shown as spaces, lists as [i]. */
function dumpValue(value: unknown, indentation: number): string {
  if (Array.isArray(value)) {
    return value
      .map((item, index) => {
        const composite = typeof item === "object" && item !== null;
        return `${" ".repeat(indentation * 4)}[${index}]:${composite ? "\n" : " "}${dumpValue(item, indentation + 1)}`;
      })
      .join("");
  }
  if (typeof value === "object" && value !== null) {
    const record = value as Json;
    return orderLikeQdict(Object.keys(record).filter((key) => record[key] !== undefined))
      .map((key) => {
        const item = record[key];
        const composite = typeof item === "object" && item !== null;
        return `${" ".repeat(indentation * 4)}${key.replaceAll("-", " ")}:${composite ? "\n" : " "}${dumpValue(item, indentation + 1)}`;
      })
      .join("");
  }
  return `${String(value)}\n`;
}

/** bdrv_image_info_dump for one image. */
export function formatImageInfoHuman(info: Json): string {
  const virtualSize = Number(info["virtual-size"]);
  const actualSize = info["actual-size"];
  let out =
    `image: ${String(info.filename)}\n` +
    `file format: ${String(info.format)}\n` +
    `virtual size: ${formatSize(virtualSize)} (${virtualSize} bytes)\n` +
    `disk size: ${actualSize === undefined ? "unavailable" : formatSize(Number(actualSize))}\n`;
  if (info.encrypted === true) out += "encrypted: yes\n";
  if (info["cluster-size"] !== undefined) out += `cluster_size: ${String(info["cluster-size"])}\n`;
  if (info["dirty-flag"] === true) out += "cleanly shut down: no\n";
  if (info["backing-filename"] !== undefined) {
    const backing = String(info["backing-filename"]);
    const full = info["full-backing-filename"];
    out += `backing file: ${backing}`;
    if (full === undefined) out += " (cannot determine actual path)";
    else if (String(full) !== backing) out += ` (actual path: ${String(full)})`;
    out += "\n";
    if (info["backing-filename-format"] !== undefined) out += `backing file format: ${String(info["backing-filename-format"])}\n`;
  }
  const snapshots = info.snapshots;
  if (Array.isArray(snapshots)) {
    out += `Snapshot list:\n${SNAPSHOT_TABLE_HEADER}\n`;
    for (const snapshot of snapshots) out += `${formatSnapshotRow(snapshot as Json)}\n`;
  }
  const specific = info["format-specific"] as Json | undefined;
  if (specific !== undefined) out += formatFormatSpecific(specific.data);
  return out;
}

/** bdrv_image_info_specific_dump under its heading (qemu-img info, qemu-io info). */
export function formatFormatSpecific(data: unknown): string {
  return `Format specific information:\n${dumpValue(data, 1)}`;
}

/** Several images (--backing-chain): separated by a blank line. */
export function formatImageInfoListHuman(infos: Json[]): string {
  return infos.map(formatImageInfoHuman).join("\n");
}
