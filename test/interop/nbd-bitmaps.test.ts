/**
 * `snapstack nbd -B NAME` against `qemu-nbd -B NAME` on copies of one qcow2
 * image with persistent dirty bitmaps made by qemu-img and qemu-io: the
 * qemu:dirty-bitmap contexts listed (names, order), nbdinfo --map of each
 * bitmap and `qemu-img map` through x-dirty-bitmap, on a read-only export
 * served by data workers and on a writable one whose enabled bitmap writes
 * keep up to date (seen live, and on disk after the server exits). Bad -B
 * arguments are refused with a coded one-line error, as qemu-nbd refuses them.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, run, runOk, scratchDir } from "../helpers/tools.ts";
import { startNbd, waitExit, type RunningServer } from "./nbd-helpers.ts";
import { SNAPSTACK_BIN } from "./cli-helpers.ts";

/**
 * A 16 MiB image with bitmaps b0 (enabled, 64 KiB granules) and b1 (128 KiB
 * granules, disabled after the first writes): 100 KiB at 1 MiB and 4 KiB at
 * 5 MiB dirty both, 64 KiB at 9 MiB only b0.
 */
async function imageWithBitmaps(dir: string): Promise<string> {
  const path = join(dir, "bitmaps.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", path, "16M"]);
  await runOk("qemu-img", ["bitmap", "--add", path, "b0"]);
  await runOk("qemu-img", ["bitmap", "--add", "-g", "128K", path, "b1"]);
  await runOk("qemu-io", ["-f", "qcow2", "-c", "write -q -P 1 1M 100k", "-c", "write -q -P 2 5M 4k", path]);
  await runOk("qemu-img", ["bitmap", "--disable", path, "b1"]);
  await runOk("qemu-io", ["-f", "qcow2", "-c", "write -q -P 3 9M 64k", path]);
  return path;
}

/** The contexts `nbdinfo --list --content` shows, nbdinfo --map of each bitmap, and qemu-img map through b0. */
async function bitmapViews(server: RunningServer): Promise<{ contexts: string; maps: string[]; qemuMap: string }> {
  const listing = (await runOk("nbdinfo", ["--list", "--content", server.uri])).stdout;
  const contexts = /contexts:\n((?:\t\t.*\n)+)/.exec(listing)?.[1] ?? "(none)";
  const maps: string[] = [];
  for (const name of ["b0", "b1"]) maps.push((await runOk("nbdinfo", [`--map=qemu:dirty-bitmap:${name}`, "--json", server.uri])).stdout);
  const socket = /socket=([^&]+)/.exec(server.uri)![1];
  const qemuMap = (await runOk("qemu-img", ["map", "--output=json", "--image-opts", `driver=nbd,server.type=unix,server.path=${socket},x-dirty-bitmap=qemu:dirty-bitmap:b0`])).stdout;
  return { contexts, maps, qemuMap };
}

test("-B: the qemu:dirty-bitmap contexts of a read-only export (data workers) list and map as qemu-nbd's", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")) return;
  const dir = scratchDir(t);
  const image = await imageWithBitmaps(dir);
  const copy = join(dir, "copy.qcow2");
  copyFileSync(image, copy);
  const ours = await startNbd(t, "snapstack", dir, image, { args: ["-t", "-r", "-e", "4", "-f", "qcow2", "-B", "b0", "-B", "b1"] });
  const theirs = await startNbd(t, "qemu-nbd", dir, copy, { args: ["-t", "-r", "-e", "4", "-f", "qcow2", "-B", "b0", "-B", "b1"] });
  const [mine, qemu] = [await bitmapViews(ours), await bitmapViews(theirs)];
  assert.deepEqual(mine, qemu);
  assert.equal(mine.contexts.trim().split(/\s+/).join(" "), "base:allocation qemu:dirty-bitmap:b1 qemu:dirty-bitmap:b0");
  const dirty = (json: string) => (JSON.parse(json) as Array<{ offset: number; length: number; type: number }>).filter((extent) => extent.type === 1).map((extent) => [extent.offset, extent.length]);
  assert.deepEqual(dirty(mine.maps[0]), [
    [1048576, 131072],
    [5242880, 65536],
    [9437184, 65536],
  ]);
  assert.deepEqual(dirty(mine.maps[1]), [
    [1048576, 131072],
    [5242880, 131072],
  ]);
});

test("-B on a writable export: writes set the enabled bitmap's bits, seen live and stored at exit, as with qemu-nbd", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdsh")) return;
  const dir = scratchDir(t);
  const image = await imageWithBitmaps(dir);
  const copy = join(dir, "copy.qcow2");
  copyFileSync(image, copy);
  const ours = await startNbd(t, "snapstack", dir, image, { args: ["-t", "-e", "2", "-f", "qcow2", "-B", "b0", "-B", "b1"] });
  const theirs = await startNbd(t, "qemu-nbd", dir, copy, { args: ["-t", "-e", "2", "-f", "qcow2", "-B", "b0", "-B", "b1"] });
  const before = await bitmapViews(ours);
  const script = "h.pwrite(b'\\x05' * 4096, 3 * 1048576 + 1000)\nh.zero(65536, 12 * 1048576)\nh.trim(65536, 14 * 1048576)\nh.flush()";
  for (const server of [ours, theirs]) await runOk("nbdsh", ["-u", server.uri, "-c", script]);
  const [mine, qemu] = [await bitmapViews(ours), await bitmapViews(theirs)];
  assert.deepEqual(mine, qemu);
  assert.notEqual(mine.maps[0], before.maps[0], "the writes show in b0 at once");
  assert.equal(mine.maps[1], before.maps[1], "the disabled b1 stays as it was");
  for (const server of [ours, theirs]) {
    server.process.kill("SIGTERM");
    assert.equal(await waitExit(server.process), 0);
  }
  await runOk("qemu-img", ["check", image]);
  await runOk("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", image, copy]);
  // The stored bitmaps, served again read-only by qemu-nbd, equal those qemu-nbd stored.
  const reread = await Promise.all([image, copy].map(async (path) => bitmapViews(await startNbd(t, "qemu-nbd", dir, path, { args: ["-t", "-r", "-f", "qcow2", "-B", "b0", "-B", "b1"] }))));
  assert.deepEqual(reread[0], reread[1]);
  assert.equal(reread[0].maps[0], mine.maps[0]);
});

test("-B finds a bitmap down the backing chain, as qemu-nbd does (an overlay over the image that has it), and -s serves it too", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")) return;
  const dir = scratchDir(t);
  const image = await imageWithBitmaps(dir);
  const overlay = join(dir, "overlay.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-b", image, "-F", "qcow2", overlay]);
  const views: Array<Awaited<ReturnType<typeof bitmapViews>>> = [];
  for (const [path, extra] of [
    [overlay, []],
    [image, ["-s"]],
  ] as const) {
    for (const which of ["snapstack", "qemu-nbd"] as const) {
      const server = await startNbd(t, which, dir, path, { args: ["-t", "-r", "-f", "qcow2", ...extra, "-B", "b0", "-B", "b1"] });
      views.push(await bitmapViews(server));
      server.process.kill("SIGTERM");
      assert.equal(await waitExit(server.process), 0);
    }
  }
  assert.deepEqual(views[0], views[1]);
  assert.deepEqual(views[2], views[3]);
  assert.deepEqual(views[0].maps, views[2].maps);
});

test("-B refused as qemu-nbd refuses it: a bitmap the image lacks, a raw image, with -l; one line, a code, nothing served", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const image = await imageWithBitmaps(dir);
  const raw = join(dir, "disk.raw");
  await runOk("qemu-img", ["create", "-q", "-f", "raw", raw, "1M"]);
  await runOk("qemu-img", ["snapshot", "-c", "s1", image]);
  const cases: Array<[string[], RegExp]> = [
    [["-B", "nope", image], /E_NOT_FOUND.*'nope'/],
    [["-f", "raw", "-B", "b0", raw], /E_NOT_FOUND.*'b0'/],
    [["-l", "s1", "-B", "b0", image], /E_UNSUPPORTED_FEATURE.*-B/],
  ];
  for (const [args, expected] of cases) {
    const result = await run(process.execPath, [SNAPSTACK_BIN, "nbd", "-k", join(dir, "refused.sock"), ...args]);
    assert.notEqual(result.code, 0, args.join(" "));
    assert.match(result.stderr, expected);
    assert.equal(result.stderr.trim().split("\n").length, 1, result.stderr);
  }
});
