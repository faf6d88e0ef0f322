/**
 * Wipe after delete, through the CLI: a unique byte pattern that only an
 * internal snapshot (or a discarded active state) still holds must be gone
 * from every byte of the file after `snapshot -d/-a --wipe`, and still be
 * there without --wipe (so the scan can fail). qemu-img check stays clean.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { createRandom } from "../helpers/random.ts";
import { assertCheckClean, openImage } from "./qcow2-engine-helpers.ts";
import { ok, qemuImg, qemuIo, snapstack } from "./cli-helpers.ts";

const KiB = 1024;

/** Write `secret` at guest offset 0 with snapstack's engine. */
async function writeSecret(path: string, secret: Uint8Array): Promise<void> {
  const image = await openImage(path, false);
  await image.write(0, secret);
  await image.close();
}

/** Does any part of the file hold a 4 KiB piece of the secret? */
function fileHolds(path: string, secret: Uint8Array): boolean {
  const file = readFileSync(path);
  for (let at = 0; at + 4 * KiB <= secret.length; at += 4 * KiB) {
    if (file.indexOf(Buffer.from(secret.subarray(at, at + 4 * KiB))) >= 0) return true;
  }
  return false;
}

for (const wipe of [true, false]) {
  const flags = wipe ? ["--wipe"] : [];
  test(`snapshot -d ${wipe ? "--wipe: no byte of the deleted snapshot's data remains" : "without --wipe: the data remains (the scan can fail)"}`, async (t) => {
    if (!requireTools(t, "qemu-img", "qemu-io")) return;
    const dir = scratchDir(t);
    const path = join(dir, "d.qcow2");
    ok(await qemuImg(["create", "-f", "qcow2", path, "16M"]), "create");
    const secret = createRandom(wipe ? 1 : 2).bytes(256 * KiB);
    await writeSecret(path, secret);
    ok(await snapstack(["img", "snapshot", "-c", "holds-secret", path]), "-c");
    ok(await qemuIo(["-c", "write -P 0x5a 0 256k", path]), "overwrite the active layer");
    assert.ok(fileHolds(path, secret), "before the delete, the snapshot holds the secret");
    ok(await snapstack(["img", "snapshot", "-d", "holds-secret", ...flags, path]), "-d");
    assert.equal(fileHolds(path, secret), !wipe);
    await assertCheckClean(path);
  });

  test(`snapshot -a ${wipe ? "--wipe: the discarded active data is gone" : "without --wipe: the discarded active data remains"}`, async (t) => {
    if (!requireTools(t, "qemu-img")) return;
    const dir = scratchDir(t);
    const path = join(dir, "a.qcow2");
    ok(await qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=4k", path, "16M"]), "create");
    ok(await snapstack(["img", "snapshot", "-c", "empty", path]), "-c");
    const secret = createRandom(wipe ? 3 : 4).bytes(256 * KiB);
    await writeSecret(path, secret);
    assert.ok(fileHolds(path, secret));
    ok(await snapstack(["img", "snapshot", "-a", "empty", ...flags, path]), "-a");
    assert.equal(fileHolds(path, secret), !wipe);
    await assertCheckClean(path);
  });
}
