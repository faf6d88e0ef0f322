/**
 * Wipe after delete, through the CLI: a unique byte pattern that only an
 * internal snapshot (or a discarded active state) still holds must be gone
 * from every byte of the file after `snapshot -d/-a --wipe`; also without
 * --wipe where holes are punched in freed clusters (the native addon), and
 * still be there without either (so the scan can fail). qemu-img check
 * stays clean.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { requireNativeFileOps, requireTools, scratchDir } from "../helpers/tools.ts";
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

/**
 * --wipe; no wipe, where the freed clusters get holes punched (the native
 * addon, as qemu-img's discards) and so the data is gone too; and no wipe
 * without the addon (SNAPSTACK_NATIVE=0), where it remains: the control
 * that shows the scan can fail.
 */
const MODES = [
  { label: "--wipe", flags: ["--wipe"], env: {}, gone: true },
  { label: "without --wipe, holes punched", flags: [], env: {}, gone: true, native: true },
  { label: "without --wipe or the native addon (the scan can fail)", flags: [], env: { SNAPSTACK_NATIVE: "0" }, gone: false },
];

for (const [index, mode] of MODES.entries()) {
  const env = { ...process.env, ...mode.env };
  test(`snapshot -d ${mode.label}: the deleted snapshot's data is ${mode.gone ? "gone" : "still there"}`, async (t) => {
    if (!requireTools(t, "qemu-img", "qemu-io") || (mode.native === true && !requireNativeFileOps(t))) return;
    const dir = scratchDir(t);
    const path = join(dir, "d.qcow2");
    ok(await qemuImg(["create", "-f", "qcow2", path, "16M"]), "create");
    const secret = createRandom(1 + index).bytes(256 * KiB);
    await writeSecret(path, secret);
    ok(await snapstack(["img", "snapshot", "-c", "holds-secret", path]), "-c");
    ok(await qemuIo(["-c", "write -P 0x5a 0 256k", path]), "overwrite the active layer");
    assert.ok(fileHolds(path, secret), "before the delete, the snapshot holds the secret");
    ok(await snapstack(["img", "snapshot", "-d", "holds-secret", ...mode.flags, path], { env }), "-d");
    assert.equal(fileHolds(path, secret), !mode.gone);
    await assertCheckClean(path);
  });

  test(`snapshot -a ${mode.label}: the discarded active data is ${mode.gone ? "gone" : "still there"}`, async (t) => {
    if (!requireTools(t, "qemu-img") || (mode.native === true && !requireNativeFileOps(t))) return;
    const dir = scratchDir(t);
    const path = join(dir, "a.qcow2");
    ok(await qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=4k", path, "16M"]), "create");
    ok(await snapstack(["img", "snapshot", "-c", "empty", path]), "-c");
    const secret = createRandom(11 + index).bytes(256 * KiB);
    await writeSecret(path, secret);
    assert.ok(fileHolds(path, secret));
    ok(await snapstack(["img", "snapshot", "-a", "empty", ...mode.flags, path], { env }), "-a");
    assert.equal(fileHolds(path, secret), !mode.gone);
    await assertCheckClean(path);
  });
}

// zstd keeps random bytes literal, so the marker can be scanned for; zlib's Huffman coding does not
// (there the test shows that the wipe stops at the stream's end: the neighbour packed after it still reads).
for (const compression of ["zlib", "zstd"] as const) {
  for (const wipe of compression === "zstd" ? [true, false] : [true]) {
    const scanned = compression === "zstd";
    test(`snapshot -d ${wipe ? "--wipe" : "without --wipe"}, ${compression}: a deleted compressed cluster packed into a host cluster beside a live one is ${wipe ? "zeroed, its neighbour intact" : "left (the scan can fail)"}`, async (t) => {
      if (!requireTools(t, "qemu-img", "qemu-io")) return;
      const dir = scratchDir(t);
      const path = join(dir, "c.qcow2");
      // Random bytes stay literal in both formats' output, around a marker; each cluster half zero so it compresses.
      const random = createRandom(wipe ? 5 : 6);
      const marker = Buffer.from("snapstack-compressed-secret-9d2e");
      const secret = Buffer.concat([Buffer.from(random.bytes(10_000)), marker, Buffer.from(random.bytes(10_000)), Buffer.alloc(64 * KiB - 20_000 - marker.length)]);
      const neighbour = Buffer.concat([Buffer.from(random.bytes(30_000)), Buffer.alloc(64 * KiB - 30_000)]);
      writeFileSync(join(dir, "secret"), secret);
      writeFileSync(join(dir, "neighbour"), neighbour);
      ok(await qemuImg(["create", "-f", "qcow2", "-o", `compression_type=${compression}`, path, "4M"]), "create");
      // qemu-io packs the second compressed cluster right after the first, in the same host cluster.
      ok(await qemuIo(["-c", `write -c -s ${join(dir, "secret")} 0 64k`, "-c", `write -c -s ${join(dir, "neighbour")} 64k 64k`, path]), "compressed writes");
      ok(await snapstack(["img", "snapshot", "-c", "holds-secret", path]), "-c");
      ok(await qemuIo(["-c", "write -P 0x5a 0 64k", path]), "overwrite the secret in the active layer");
      if (scanned) assert.ok(readFileSync(path).includes(marker), "before the delete, the snapshot's compressed cluster holds the marker");
      ok(await snapstack(["img", "snapshot", "-d", "holds-secret", ...(wipe ? ["--wipe"] : []), path]), "-d");
      if (scanned) assert.equal(readFileSync(path).includes(marker), !wipe);
      ok(await qemuIo(["-c", "read -P 0x5a 0 64k", "-c", `read -v 64k 1`, path]), "the active data reads");
      const neighbourNow = join(dir, "neighbour-now.raw");
      ok(await qemuImg(["dd", "-f", "qcow2", "-O", "raw", "bs=64k", "skip=1", "count=2", `if=${path}`, `of=${neighbourNow}`]), "read the neighbour");
      assert.ok(readFileSync(neighbourNow).equals(neighbour), "the compressed neighbour still decompresses to its data");
      await assertCheckClean(path);
    });
  }
}
