/**
 * Shared pieces of the qcow2 engine interop tests: open helpers, a random
 * workload applied to an image and to an in-memory reference buffer, and
 * the qemu-img oracles (check must be clean, content must match).
 */
import assert from "node:assert/strict";
import { writeFileSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { createNodeFile, openNodeFile } from "../../src/io/node-file.ts";
import { openQcow2, type Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { createQcow2, type Qcow2CreateOptions } from "../../src/formats/qcow2/create-qcow2.ts";
import type { BlockDevice } from "../../src/device/block-device.ts";
import { run } from "../helpers/tools.ts";
import { createRandom } from "../helpers/random.ts";

export async function openImage(path: string, readOnly: boolean, backing: BlockDevice | null = null, cacheBytesMax?: number): Promise<Qcow2Image> {
  return openQcow2(await openNodeFile(path, { readOnly }), { readOnly, backing, cacheBytesMax });
}

export async function createImage(path: string, options: Qcow2CreateOptions): Promise<void> {
  const file = await createNodeFile(path);
  try {
    await createQcow2(file, options);
  } finally {
    await file.close();
  }
}

/** Open a chain bottom-up: paths[0] is the base. The top is read-write when asked. */
export async function openChain(paths: string[], topWritable: boolean): Promise<Qcow2Image> {
  let backing: Qcow2Image | null = null;
  for (let i = 0; i < paths.length; i++) {
    const last = i === paths.length - 1;
    backing = await openImage(paths[i], !(last && topWritable), backing);
  }
  assert.ok(backing !== null);
  return backing;
}

/** qemu-img check --output=json: no corruptions, leaks or check errors. */
export async function assertCheckClean(path: string): Promise<void> {
  const result = await run("qemu-img", ["check", "--output=json", path]);
  let report: Record<string, unknown> = {};
  try {
    report = JSON.parse(result.stdout) as Record<string, unknown>;
  } catch {
    // reported below
  }
  assert.equal(result.code, 0, `qemu-img check ${path} exited ${result.code}: ${result.stdout} ${result.stderr}`);
  assert.equal(report["check-errors"], 0, `check-errors in ${path}`);
  assert.equal(report.corruptions ?? 0, 0, `corruptions in ${path}`);
  assert.equal(report.leaks ?? 0, 0, `leaks in ${path}`);
}

/** The guest content qemu-img sees (through its backing chain). */
export async function qemuRawContent(dir: string, path: string): Promise<Buffer> {
  const out = join(dir, `raw-${Math.random().toString(36).slice(2)}.raw`);
  const result = await run("qemu-img", ["convert", "-O", "raw", path, out]);
  assert.equal(result.code, 0, `qemu-img convert ${path}: ${result.stderr}`);
  return readFileSync(out);
}

/** qemu-img compare against a raw file holding `reference`. */
export async function assertQemuSees(dir: string, path: string, reference: Uint8Array): Promise<void> {
  const refPath = join(dir, `ref-${Math.random().toString(36).slice(2)}.raw`);
  writeFileSync(refPath, reference);
  const result = await run("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", refPath, path]);
  assert.equal(result.code, 0, `qemu-img compare ${path}: ${result.stdout} ${result.stderr}`);
}

export async function assertReadsAs(image: BlockDevice, reference: Uint8Array, what: string): Promise<void> {
  const buffer = new Uint8Array(image.sizeBytes);
  await image.read(0, buffer);
  const diff = firstDifference(buffer, reference);
  assert.equal(diff, -1, `${what}: first difference at byte ${diff}`);
}

export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

export interface WorkloadOptions {
  seed: number;
  operations: number;
  /** Largest request. */
  lengthMaxBytes: number;
  clusterSizeBytes: number;
  /** Issue this many requests at once (non-overlapping is not guaranteed). */
  concurrency?: number;
  compressed?: boolean;
}

/**
 * Random writes, zero writes (with and without unmap), discards and
 * compressed writes at unaligned offsets; `reference` follows along.
 * Discarded ranges have undefined content, so after a discard the
 * reference is refreshed from the image for that range (the image then
 * must keep returning the same bytes).
 */
export async function runWorkload(image: Qcow2Image, reference: Uint8Array, options: WorkloadOptions): Promise<void> {
  const random = createRandom(options.seed);
  const size = image.sizeBytes;
  const cs = options.clusterSizeBytes;
  const concurrency = options.concurrency ?? 1;
  let batch: Promise<void>[] = [];
  let pattern = 1;
  for (let i = 0; i < options.operations; i++) {
    const kind = random.int(100);
    const offset = random.int(size);
    const length = Math.min(size - offset, 1 + random.int(options.lengthMaxBytes));
    if (process.env.SNAPSTACK_TRACE) console.log(i, kind, offset, length);
    if (kind < 55) {
      const data = new Uint8Array(length).fill(pattern);
      for (let j = 0; j < length; j += 97) data[j] = (pattern * 7 + j) & 0xff;
      pattern = (pattern % 254) + 1;
      reference.set(data, offset);
      batch.push(image.write(offset, data));
    } else if (kind < 75) {
      const unmap = random.int(2) === 0;
      reference.fill(0, offset, offset + length);
      batch.push(image.writeZeroes(offset, length, { unmap }));
    } else if (kind < 85 && options.compressed) {
      // Compressed writes need an unallocated cluster: aim at the end of a fresh area.
      const cluster = random.int(Math.floor(size / cs));
      const data = new Uint8Array(Math.min(cs, size - cluster * cs)).fill(0x5a);
      data[0] = pattern;
      await Promise.all(batch);
      batch = [];
      const status = await image.layerStatus(cluster * cs, data.length);
      if (status.length === 1 && status[0].kind !== "data" && !(status[0].kind === "zero" && status[0].hostOffset !== undefined)) {
        reference.set(data, cluster * cs);
        await image.writeCompressed(cluster * cs, data);
      }
    } else {
      await Promise.all(batch);
      batch = [];
      await image.discard(offset, length);
      const after = new Uint8Array(length);
      await image.read(offset, after);
      reference.set(after, offset);
    }
    if (batch.length >= concurrency) {
      await Promise.all(batch);
      batch = [];
    }
  }
  await Promise.all(batch);
}
