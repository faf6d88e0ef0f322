/**
 * The probe every hostile or fuzzed image goes through: everything a user
 * could do with it, each step ending in data or a clean coded error.
 *
 * Steps: open read-only, info, reads (start, end, spread offsets), layer
 * status, snapshot views; check; open read-write on a copy, write, zero,
 * discard, flush, snapshot, close; check -r all on a copy, then check.
 * A step fails the probe when it throws anything but a SnapstackError, an
 * E_INTERNAL (an assertion of ours), or when the engine writes to a file
 * opened read-only or grows a file far beyond what the request needs.
 * Hangs and memory are bounded by the caller (a worker per run with a
 * per-case timeout and a heap limit).
 */
import { SnapstackError, isSnapstackError } from "../../src/base/errors.ts";
import type { ImageFile } from "../../src/io/file.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { openQcow2, type Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { checkQcow2 } from "../../src/formats/qcow2/check.ts";
import { openSnapshotView } from "../../src/formats/qcow2/snapshot-view.ts";
import { FILE_CLUSTERS_MAX } from "../../src/formats/qcow2/metadata.ts";

/** Reads are bounded so a header claiming a 2^60-byte disk costs no more than a small one. */
const READ_SPAN_BYTES = 256 * 1024;
const STATUS_SPAN_BYTES = 16 * 1024 * 1024;
/**
 * Growth the probe's memory file grants (beyond: E_NO_SPACE, a clean error).
 * Allocation can legitimately land far out (refcount blocks claiming every
 * cluster used push the allocator on, as in QEMU; check -r all extends the
 * file to a refcount block past EOF, as QEMU), so only writes past what the
 * allocator may ever reach count as a stray write.
 */
const GROWTH_ALLOWED_BYTES = 64 * 1024 * 1024;
/** Past what the allocator may reach (FILE_CLUSTERS_MAX clusters of the largest size). */
const WRITE_VIOLATION_BYTES = FILE_CLUSTERS_MAX * 2 * 1024 * 1024;

export interface ProbeResult {
  /** Step name -> "ok" or the error code it ended with. */
  steps: Record<string, string>;
  /** Problems: unhandled exceptions, E_INTERNAL, writes where none may happen. */
  problems: string[];
}

/** An ImageFile over bytes that records writes it must not see. */
class GuardFile extends MemoryFile {
  readonly #limitBytes: number;
  violations: string[] = [];

  constructor(contents: Uint8Array, readOnly: boolean) {
    super({ name: "hostile.qcow2", contents, readOnly });
    this.#limitBytes = contents.length + GROWTH_ALLOWED_BYTES;
  }

  override async write(hostOffset: number, data: Uint8Array): Promise<void> {
    if (this.readOnly) this.violations.push(`write of ${data.length} bytes at ${hostOffset} to a read-only file`);
    if (hostOffset + data.length > this.#limitBytes) {
      if (hostOffset + data.length > WRITE_VIOLATION_BYTES) this.violations.push(`write of ${data.length} bytes at ${hostOffset}, far past the end`);
      throw new SnapstackError("E_NO_SPACE", "probe: file growth limit");
    }
    return super.write(hostOffset, data);
  }

  override async truncate(sizeBytes: number): Promise<void> {
    if (this.readOnly) this.violations.push(`truncate of a read-only file`);
    if (sizeBytes > this.#limitBytes) {
      if (sizeBytes > WRITE_VIOLATION_BYTES) this.violations.push(`truncate to ${sizeBytes}, far past the end`);
      throw new SnapstackError("E_NO_SPACE", "probe: file growth limit");
    }
    return super.truncate(sizeBytes);
  }
}

function spreadOffsets(sizeBytes: number, count: number): number[] {
  const offsets = [0, Math.max(0, sizeBytes - READ_SPAN_BYTES)];
  for (let i = 1; i < count; i++) offsets.push(Math.floor((sizeBytes / count) * i / 512) * 512);
  return offsets;
}

async function readSpread(image: Qcow2Image): Promise<void> {
  for (const guestOffset of spreadOffsets(image.sizeBytes, 6)) {
    const length = Math.min(READ_SPAN_BYTES, image.sizeBytes - guestOffset);
    if (length > 0) await image.read(guestOffset, new Uint8Array(length));
  }
}

export async function probeImage(bytes: Uint8Array): Promise<ProbeResult> {
  const result: ProbeResult = { steps: {}, problems: [] };
  const step = async (name: string, fn: () => Promise<void>): Promise<boolean> => {
    try {
      await fn();
      result.steps[name] = "ok";
      return true;
    } catch (error) {
      if (isSnapstackError(error) && error.code !== "E_INTERNAL") {
        result.steps[name] = error.code;
      } else {
        result.steps[name] = "UNHANDLED";
        result.problems.push(`${name}: ${error instanceof Error ? `${error.name}: ${error.message}\n${error.stack ?? ""}` : String(error)}`);
      }
      return false;
    }
  };
  const files: GuardFile[] = [];
  const guard = (contents: Uint8Array, readOnly: boolean): ImageFile => {
    const file = new GuardFile(contents, readOnly);
    files.push(file);
    return file;
  };

  let image: Qcow2Image | null = null;
  await step("open read-only", async () => {
    image = await openQcow2(guard(bytes, true), { readOnly: true, backing: null });
  });
  const opened = image as Qcow2Image | null;
  if (opened !== null) {
    await step("info", async () => {
      opened.info();
    });
    await step("read", () => readSpread(opened));
    await step("layer status", async () => {
      await opened.layerStatus(0, Math.min(opened.sizeBytes, STATUS_SPAN_BYTES));
    });
    for (const snapshot of opened.snapshots.slice(0, 4)) {
      await step(`snapshot ${snapshot.id}`, async () => {
        const view = await openSnapshotView(opened, snapshot.id);
        try {
          await readSpread(view);
        } finally {
          await view.close();
        }
      });
    }
    await step("close read-only", () => opened.close());
  }
  await step("check", async () => {
    await checkQcow2(guard(bytes, true));
  });

  let writable: Qcow2Image | null = null;
  await step("open read-write", async () => {
    writable = await openQcow2(guard(bytes.slice(), false), { readOnly: false, backing: null });
  });
  const rw = writable as Qcow2Image | null;
  if (rw !== null) {
    const mid = Math.floor(rw.sizeBytes / 2 / 512) * 512;
    await step("write", async () => {
      await rw.write(0, new Uint8Array(Math.min(4096, rw.sizeBytes)).fill(0xa5));
      if (mid + 70000 <= rw.sizeBytes) await rw.write(mid + 100, new Uint8Array(70000).fill(0x5a));
    });
    await step("zero and discard", async () => {
      if (mid + 131072 <= rw.sizeBytes) {
        await rw.writeZeroes(mid, 65536, { unmap: true });
        await rw.discard(mid + 65536, 65536);
      }
    });
    await step("flush", () => rw.flush());
    await step("snapshot", async () => {
      await rw.createSnapshot("probe");
      await rw.deleteSnapshot("probe");
    });
    await step("close read-write", () => rw.close());
  }
  await step("repair", async () => {
    const copy = guard(bytes.slice(), false);
    await checkQcow2(copy, { repair: "all" });
    await checkQcow2(copy);
  });
  for (const file of files) result.problems.push(...file.violations);
  return result;
}
