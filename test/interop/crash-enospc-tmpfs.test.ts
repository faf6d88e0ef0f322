/**
 * ENOSPC from a real file system: a 4 MiB tmpfs fills up under a qcow2
 * image being written. The failing write ends in E_NO_SPACE, the image
 * checks without corruption (ours and qemu-img), and everything flushed
 * before reads back. Needs root for mount (skipped otherwise; the fault
 * layer covers ENOSPC everywhere in test/unit/crash-io-errors.test.ts).
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { requireTools, run } from "../helpers/tools.ts";
import { openImage } from "../../src/chain/open-image.ts";
import { createImage } from "../../src/chain/create-image.ts";
import { resizeImage } from "../../src/chain/resize-image.ts";
import { checkQcow2 } from "../../src/formats/qcow2/check.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { isSnapstackError } from "../../src/base/errors.ts";
import type { Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { PossibleVersions, SECTOR_BYTES, assertNoCorruption, patternBytes, verifyGuest, type CrashScenario, type GuestOp } from "../helpers/crash-workload.ts";

const MiB = 1024 * 1024;
const SIZE_BYTES = 64 * MiB;
const CHUNK_BYTES = 256 * 1024;

function tryMount(dir: string): boolean {
  try {
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=4m", "tmpfs", dir], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

/** A fresh 4 MiB tmpfs for this test (unmounted after it), or null (skipped) where none can be mounted. */
function fullDisk(t: TestContext): string | null {
  const top = mkdtempSync(join(tmpdir(), "snapstack-enospc-"));
  const dir = join(top, "mnt");
  mkdirSync(dir);
  const mounted = tryMount(dir);
  t.after(() => {
    if (mounted) execFileSync("umount", [dir]);
    rmSync(top, { recursive: true, force: true });
  });
  if (mounted) return dir;
  t.skip("cannot mount a tmpfs here (not root?): ENOSPC is covered by the fault layer");
  return null;
}

test("a full tmpfs: E_NO_SPACE, a consistent image, flushed data intact", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = fullDisk(t);
  if (dir === null) return;
  const path = join(dir, "full.qcow2");
  await createImage(path, { format: "qcow2", sizeBytes: SIZE_BYTES });
  const scenario: CrashScenario = { clusterSizeBytes: 65536, refcountBits: 16, compat: "1.1", lazyRefcounts: false, extendedL2: false, sizeBytes: SIZE_BYTES, withBacking: false, cacheBytesMax: 32 * MiB };
  const model = new PossibleVersions(new Int32Array(SIZE_BYTES / SECTOR_BYTES), scenario);
  const image = (await openImage(path)) as Qcow2Image;
  let failures = 0;
  let id = 2;
  // Write until the file system is full, flushing every fourth chunk, and a few writes beyond.
  for (let i = 0; i < SIZE_BYTES / CHUNK_BYTES && failures < 4; i++) {
    const op: GuestOp = { kind: "write", guestOffset: i * CHUNK_BYTES, lengthBytes: CHUNK_BYTES, id: id++ };
    try {
      await image.write(op.guestOffset, patternBytes(op.guestOffset / SECTOR_BYTES, CHUNK_BYTES / SECTOR_BYTES, op.id));
      model.apply(op, true);
      if (i % 4 === 3) {
        await image.flush();
        model.apply({ kind: "flush" }, true);
      }
    } catch (error) {
      assert.ok(isSnapstackError(error) && error.code === "E_NO_SPACE", `a full disk is E_NO_SPACE: ${String(error)}`);
      model.apply(op, false);
      failures++;
    }
  }
  assert.ok(failures > 0, "the 4 MiB file system filled up");
  let closed = true;
  try {
    await image.close();
  } catch (error) {
    assert.ok(isSnapstackError(error) && error.code === "E_NO_SPACE", `close on a full disk: ${String(error)}`);
    closed = false;
  }
  const contents = new Uint8Array(readFileSync(path));
  assertNoCorruption(await checkQcow2(new MemoryFile({ contents, readOnly: true })), "our check of the image on the full disk");
  const qemu = await run("qemu-img", ["check", "-f", "qcow2", "--output=json", path]);
  const json = JSON.parse(qemu.stdout) as { corruptions?: number; "check-errors"?: number; leaks?: number };
  assert.equal((json.corruptions ?? 0) + (json["check-errors"] ?? 0), 0, `qemu-img check: ${qemu.stdout}${qemu.stderr}`);
  const reopened = (await openImage(path, { readOnly: true })) as Qcow2Image;
  await verifyGuest(reopened, closed ? model : model.crashed(), "after ENOSPC");
  await reopened.close();
  t.diagnostic(`tmpfs full after ${id - 2} writes of 256 KiB; ${failures} failed with E_NO_SPACE; close ${closed ? "succeeded" : "failed with E_NO_SPACE"}; leaks ${json.leaks ?? 0}; corruptions 0`);
});

test("resize --preallocation=full on a full tmpfs: E_NO_SPACE, and the image keeps its old size", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = fullDisk(t);
  if (dir === null) return;
  const path = join(dir, "grow.qcow2");
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", path, "1M"]);
  execFileSync("qemu-io", ["-c", "write -P 9 0 512k", path], { stdio: "ignore" });
  // 8 MiB of data preallocated on a 4 MiB file system: the preallocation fails part-way.
  await assert.rejects(resizeImage(path, { absoluteBytes: 8 * MiB }, { preallocation: "full" }), { code: "E_NO_SPACE" });
  const info = JSON.parse((await run("qemu-img", ["info", "--output=json", path])).stdout) as { "virtual-size": number };
  assert.equal(info["virtual-size"], 1 * MiB, "the failed resize left the old size (qemu-img sets the size only once preallocated)");
  const qemu = await run("qemu-img", ["check", "-f", "qcow2", "--output=json", path]);
  const json = JSON.parse(qemu.stdout) as { corruptions?: number; "check-errors"?: number };
  assert.equal((json.corruptions ?? 0) + (json["check-errors"] ?? 0), 0, `qemu-img check: ${qemu.stdout}${qemu.stderr}`);
  const image = await openImage(path, { readOnly: true });
  const data = new Uint8Array(512 * 1024);
  await image.read(0, data);
  await image.close();
  assert.ok(data.every((byte) => byte === 9), "the data below the old size is intact");
});
