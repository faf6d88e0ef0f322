// Persistent dirty bitmaps (qemu-img bitmap) through snapstack's changes: kept valid by changes that
// leave guest data alone, marked in-use (QEMU's "inconsistent") by the first change that makes them
// wrong, refused where qemu-img refuses. qemu-img check stays clean throughout.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { ok, qemuImg, qemuIo, snapstack } from "./cli-helpers.ts";

/** An image with data, an enabled bitmap b0 and a disabled one b1, both consistent, as qemu-img leaves them. */
async function imageWithBitmaps(dir: string, name: string): Promise<string> {
  ok(await qemuImg(["create", "-q", "-f", "qcow2", name, "16M"], dir), "create");
  ok(await qemuIo(["-c", "write -P 1 0 1M", name], dir), "write");
  ok(await qemuImg(["bitmap", "--add", name, "b0"], dir), "bitmap --add b0");
  ok(await qemuImg(["bitmap", "--add", "--disable", name, "b1"], dir), "bitmap --add --disable b1");
  ok(await qemuIo(["-c", "write -P 2 8M 64k", name], dir), "write tracked by b0");
  return join(dir, name);
}

/** Bitmap name -> flags, as qemu-img info lists them; check must be clean (exit 0, no warning). */
async function bitmapFlags(dir: string, name: string): Promise<Record<string, string[]>> {
  const check = ok(await qemuImg(["check", name], dir), `check ${name}`);
  assert.doesNotMatch(check.stderr, /lacking bitmap support/);
  const info = JSON.parse(ok(await qemuImg(["info", "--output=json", name], dir), "info").stdout);
  const bitmaps: Array<{ name: string; flags: string[] }> = info["format-specific"].data.bitmaps ?? [];
  return Object.fromEntries(bitmaps.map((bitmap) => [bitmap.name, bitmap.flags]));
}

test("bitmaps: a session that only reads changes nothing; a write marks the enabled bitmap in-use and keeps the disabled one valid", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const path = await imageWithBitmaps(dir, "bm.qcow2");
  const before = readFileSync(path);
  ok(await snapstack(["io", "-c", "read -P 1 0 64k", "-c", "flush", "-c", "write 0 0", "-c", "discard 4k 1k", "bm.qcow2"], { cwd: dir }), "io read and no-op changes");
  assert.ok(readFileSync(path).equals(before), "a session that only read (or changed nothing) changed the file");
  // Refused compressed writes (part of a cluster, an allocated cluster) change nothing either; qemu-io refuses them too.
  for (const command of ["write -c 0 4k", "write -c 0 64k", "write -c 64k 100k"]) {
    const ours = await snapstack(["io", "-c", command, "bm.qcow2"], { cwd: dir });
    assert.equal(ours.code, 1, `${command}: ${ours.stderr}`);
    assert.ok(readFileSync(path).equals(before), `${command}: a refused compressed write changed the file`);
  }
  assert.deepEqual(await bitmapFlags(dir, "bm.qcow2"), { b0: ["auto"], b1: [] });
  ok(await snapstack(["io", "-c", "write -P 3 0 4k", "bm.qcow2"], { cwd: dir }), "io write");
  assert.deepEqual(await bitmapFlags(dir, "bm.qcow2"), { b0: ["in-use", "auto"], b1: [] });
  ok(await qemuIo(["-c", "read -P 3 0 4k", "-c", "read -P 1 4k 60k", "bm.qcow2"], dir), "data after the write");
  // QEMU still loads the image, and the in-use bitmap can be removed as after a crash.
  ok(await qemuImg(["bitmap", "--remove", "bm.qcow2", "b0"], dir), "remove the in-use bitmap");
  assert.deepEqual(await bitmapFlags(dir, "bm.qcow2"), { b1: [] });
});

test("bitmaps: snapshot create/delete and rebase -u keep them valid; resize marks all in-use; snapshot -a and a resize of an inconsistent bitmap are refused as by qemu-img", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await imageWithBitmaps(dir, "meta.qcow2");
  ok(await snapstack(["img", "snapshot", "-c", "s1", "meta.qcow2"], { cwd: dir }), "snapshot -c");
  ok(await snapstack(["img", "rebase", "-u", "-b", "", "meta.qcow2"], { cwd: dir }), "rebase -u");
  assert.deepEqual(await bitmapFlags(dir, "meta.qcow2"), { b0: ["auto"], b1: [] });

  // snapshot -a: refused while the image has bitmaps, before the snapshot is looked up; nothing changes.
  for (const name of ["s1", "nosuch"]) {
    const before = readFileSync(join(dir, "meta.qcow2"));
    const ours = await snapstack(["img", "snapshot", "-a", name, "meta.qcow2"], { cwd: dir });
    assert.ok(readFileSync(join(dir, "meta.qcow2")).equals(before), `snapshot -a ${name} changed the image`);
    // (qemu-img rewrites the bitmaps it loaded read-write, even when it refuses.)
    const theirs = await qemuImg(["snapshot", "-a", name, "meta.qcow2"], dir);
    assert.equal(ours.code, theirs.code, ours.stderr);
    assert.equal(ours.stderr, theirs.stderr.replace(/^qemu-img: /, "snapstack: error E_IN_USE: "));
  }
  ok(await snapstack(["img", "snapshot", "-d", "s1", "meta.qcow2"], { cwd: dir }), "snapshot -d");
  assert.deepEqual(await bitmapFlags(dir, "meta.qcow2"), { b0: ["auto"], b1: [] });

  // A resize to the same size changes nothing.
  ok(await snapstack(["img", "resize", "meta.qcow2", "16M"], { cwd: dir }), "resize to the same size");
  assert.deepEqual(await bitmapFlags(dir, "meta.qcow2"), { b0: ["auto"], b1: [] });
  // A resize makes every bitmap the wrong size: all in-use (QEMU would refuse to load a valid one of the wrong size).
  ok(await snapstack(["img", "resize", "meta.qcow2", "32M"], { cwd: dir }), "resize");
  assert.deepEqual(await bitmapFlags(dir, "meta.qcow2"), { b0: ["in-use", "auto"], b1: ["in-use"] });
  // Now inconsistent when the image is opened: qemu-img refuses a resize, and so does snapstack, changing nothing.
  const before = readFileSync(join(dir, "meta.qcow2"));
  const ours = await snapstack(["img", "resize", "meta.qcow2", "48M"], { cwd: dir });
  assert.ok(readFileSync(join(dir, "meta.qcow2")).equals(before), "the refused resize changed the image");
  const theirs = await qemuImg(["resize", "meta.qcow2", "48M"], dir);
  assert.equal(theirs.code, 1);
  assert.equal(ours.code, theirs.code);
  assert.match(ours.stderr, /^snapstack: error E_UNSUPPORTED_FEATURE: Bitmap 'b0' is inconsistent and cannot be used/);
});
