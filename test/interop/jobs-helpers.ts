/**
 * Shared pieces of the job interop tests: a raw reference model of a disk,
 * qemu-img/qemu-io wrappers, and running snapstack's CLI in-process.
 */
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { captureContext } from "../../src/cli/context.ts";
import { runCli } from "../../src/cli/main.ts";
import { run, runOk } from "../helpers/tools.ts";

/** The bytes a disk state should hold. */
export class DiskModel {
  bytes: Uint8Array;

  constructor(sizeBytes: number) {
    this.bytes = new Uint8Array(sizeBytes);
  }

  clone(): DiskModel {
    const copy = new DiskModel(0);
    copy.bytes = this.bytes.slice();
    return copy;
  }

  fill(offset: number, length: number, pattern: number): void {
    this.bytes.fill(pattern, offset, offset + length);
  }

  resize(sizeBytes: number): void {
    const next = new Uint8Array(sizeBytes);
    next.set(this.bytes.subarray(0, Math.min(sizeBytes, this.bytes.length)));
    this.bytes = next;
  }

  save(path: string): string {
    writeFileSync(path, this.bytes);
    return path;
  }
}

export async function qemuImg(...args: string[]): Promise<string> {
  return (await runOk("qemu-img", args)).stdout;
}

/** qemu-io -c for each command on `path` (qcow2). */
export async function qemuIo(path: string, ...commands: string[]): Promise<void> {
  const args = ["-f", "qcow2"];
  for (const command of commands) args.push("-c", command);
  await runOk("qemu-io", [...args, path]);
}

export async function createQcow2(path: string, sizeOrBacking: { sizeBytes: number } | { backing: string }, extra: string[] = []): Promise<string> {
  if ("sizeBytes" in sizeOrBacking) await qemuImg("create", "-f", "qcow2", ...extra, path, String(sizeOrBacking.sizeBytes));
  else await qemuImg("create", "-f", "qcow2", "-b", sizeOrBacking.backing, "-F", "qcow2", ...extra, path);
  return path;
}

/** qemu-img check must report a clean image. */
export async function assertClean(path: string): Promise<void> {
  const result = await run("qemu-img", ["check", path]);
  assert.equal(result.code, 0, `qemu-img check ${path}: ${result.stdout}${result.stderr}`);
}

/** qemu-img compare (exit 0) between an image (with its chain) and a raw model or another image. */
export async function assertSameContent(a: string, b: string): Promise<void> {
  const result = await run("qemu-img", ["compare", a, b]);
  assert.equal(result.code, 0, `qemu-img compare ${a} ${b}: ${result.stdout}${result.stderr}`);
}

export async function assertMatchesModel(image: string, model: DiskModel, dir: string, label = "model"): Promise<void> {
  const raw = model.save(join(dir, `${label}.raw`));
  const result = await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", image, raw]);
  assert.equal(result.code, 0, `${image} vs ${label}: ${result.stdout}${result.stderr}`);
}

export async function snapstack(...argv: string[]): Promise<{ status: number; stdout: string; stderr: string }> {
  const context = captureContext();
  const status = await runCli(argv, context);
  return { status, stdout: context.stdout, stderr: context.stderr };
}

export async function snapstackOk(...argv: string[]): Promise<{ stdout: string; stderr: string }> {
  const result = await snapstack(...argv);
  assert.equal(result.status, 0, `snapstack ${argv.join(" ")}: ${result.stderr}`);
  return result;
}

export async function backingOf(path: string): Promise<string | undefined> {
  const info = JSON.parse(await qemuImg("info", "--output=json", path)) as { "backing-filename"?: string };
  return info["backing-filename"];
}
