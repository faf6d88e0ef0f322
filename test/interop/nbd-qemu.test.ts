/**
 * `snapstack nbd` against QEMU's NBD client (qemu-img, qemu-io) and, for the
 * allocation answers, against qemu-nbd serving the same chain: `qemu-img
 * map --output=json` and `nbdinfo --map` for both metadata contexts must be
 * byte-identical through both servers, over Unix sockets and TCP.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { copyFileSync, readFileSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { requireTools, run, runOk, scratchDir } from "../helpers/tools.ts";
import { startNbd, waitExit } from "./nbd-helpers.ts";
import { SNAPSTACK_BIN } from "./cli-helpers.ts";

/**
 * base (48 MiB): data at 0 (1 MiB), 4 MiB (64 KiB), 20 MiB (2 MiB).
 * top (64 MiB, so 48..64 MiB is past the backing file's end): data at
 * 512 KiB (1 MiB), zeroes at 8 MiB (1 MiB), a discard at 20.5 MiB, data at
 * 50 MiB (past the backing end) and an unaligned write at 30 MiB + 1000.
 */
async function buildChain(dir: string): Promise<{ base: string; top: string }> {
  const base = join(dir, "base.qcow2");
  const top = join(dir, "top.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", base, "48M"]);
  await runOk("qemu-io", ["-f", "qcow2", "-c", "write -q -P 0x11 0 1M", "-c", "write -q -P 0x12 4M 64k", "-c", "write -q -P 0x13 20M 2M", base]);
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "64M"]);
  await runOk("qemu-io", [
    "-f",
    "qcow2",
    "-c",
    "write -q -P 0x22 512k 1M",
    "-c",
    "write -q -z 8M 1M",
    "-c",
    "discard -q 20992k 512k",
    "-c",
    "write -q -P 0x23 50M 256k",
    "-c",
    "write -q -P 0x24 31458280 5000",
    top,
  ]);
  return { base, top };
}

test("qemu-img map and nbdinfo --map (base:allocation, qemu:allocation-depth) match qemu-nbd on the same chain", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")) return;
  const dir = scratchDir(t);
  const { top } = await buildChain(dir);
  const ours = await startNbd(t, "snapstack", dir, top, { args: ["-r", "-A", "-t", "-e", "0"] });
  const ourTcp = await startNbd(t, "snapstack", dir, top, { args: ["-r", "-A", "-t", "-e", "0"], tcp: true, exportName: "chain" });
  const qemu = await startNbd(t, "qemu-nbd", dir, top, { args: ["-r", "-A", "-t", "-e", "0", "-f", "qcow2"] });
  const qemuMap = (await runOk("qemu-img", ["map", "--output=json", qemu.uri])).stdout;
  assert.ok(qemuMap.split("\n").length > 8, "the fixture has many extents");
  assert.equal((await runOk("qemu-img", ["map", "--output=json", ours.uri])).stdout, qemuMap);
  assert.equal((await runOk("qemu-img", ["map", "--output=json", ourTcp.uri])).stdout, qemuMap);
  for (const context of ["base:allocation", "qemu:allocation-depth"]) {
    const expected = (await runOk("nbdinfo", [`--map=${context}`, qemu.uri])).stdout;
    assert.equal((await runOk("nbdinfo", [`--map=${context}`, ours.uri])).stdout, expected, context);
    assert.equal((await runOk("nbdinfo", [`--map=${context}`, ourTcp.uri])).stdout, expected, `${context} over TCP`);
  }
  // Three layers, the middle one shorter than the top and the base shorter still.
  const layers = ["l0.qcow2", "l1.qcow2", "l2.qcow2"].map((name) => join(dir, name));
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", layers[0], "32M"]);
  await runOk("qemu-io", ["-f", "qcow2", "-c", "write -q -P 1 1M 1M", layers[0]]);
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-b", layers[0], "-F", "qcow2", layers[1], "48M"]);
  await runOk("qemu-io", ["-f", "qcow2", "-c", "write -q -P 2 40M 1M", "-c", "write -q -z 1536k 64k", layers[1]]);
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-b", layers[1], "-F", "qcow2", layers[2], "64M"]);
  await runOk("qemu-io", ["-f", "qcow2", "-c", "write -q -P 3 60M 1M", layers[2]]);
  const ours3 = await startNbd(t, "snapstack", dir, layers[2], { args: ["-r", "-A", "-t"] });
  const qemu3 = await startNbd(t, "qemu-nbd", dir, layers[2], { args: ["-r", "-A", "-t", "-f", "qcow2"] });
  for (const context of ["base:allocation", "qemu:allocation-depth"]) {
    assert.equal((await runOk("nbdinfo", [`--map=${context}`, ours3.uri])).stdout, (await runOk("nbdinfo", [`--map=${context}`, qemu3.uri])).stdout, `3 layers: ${context}`);
  }
  assert.equal((await runOk("qemu-img", ["map", "--output=json", ours3.uri])).stdout, (await runOk("qemu-img", ["map", "--output=json", qemu3.uri])).stdout);
  // Partial ranges, as qemu-img map asks with REQ_ONE from arbitrary offsets.
  const window = ["map", "--output=json", "--start-offset=1000000", "--max-length=30000000"];
  assert.equal((await runOk("qemu-img", [...window, ours.uri])).stdout, (await runOk("qemu-img", [...window, qemu.uri])).stdout);
});

test("qemu-img info, compare, convert and qemu-io read an export over nbd+unix:// and nbd://", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const { top } = await buildChain(dir);
  const unix = await startNbd(t, "snapstack", dir, top, { args: ["-r", "-t", "-e", "0"] });
  const tcp = await startNbd(t, "snapstack", dir, top, { args: ["-r", "-t", "-e", "0"], tcp: true });
  for (const server of [unix, tcp]) {
    const info = JSON.parse((await runOk("qemu-img", ["info", "--output=json", server.uri])).stdout) as { "virtual-size": number; format: string };
    assert.equal(info["virtual-size"], 64 * 1024 * 1024);
    assert.equal(info.format, "raw");
    await runOk("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", top, server.uri]);
    const converted = join(dir, `converted-${server.port ?? "unix"}.qcow2`);
    await runOk("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", server.uri, converted]);
    await runOk("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", top, converted]);
    const io = await runOk("qemu-io", ["-r", "-f", "raw", "-c", "read -P 0x22 512k 1M", "-c", "read -P 0x11 0 512k", "-c", "read -P 0 8M 1M", "-c", "read -P 0x23 50M 256k", server.uri]);
    assert.doesNotMatch(io.stdout + io.stderr, /Pattern verification failed/);
  }
  const mismatch = await run("qemu-io", ["-r", "-f", "raw", "-c", "read -P 0x99 0 4k", unix.uri]);
  assert.match(mismatch.stdout + mismatch.stderr, /Pattern verification failed/, "the read check is real");
});

test("qemu-io writes and qemu-img convert into a writable export land in the qcow2 chain exactly as qemu-io on the file", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const { base, top } = await buildChain(dir);
  const served = join(dir, "served.qcow2");
  const direct = join(dir, "direct.qcow2");
  copyFileSync(top, served);
  copyFileSync(top, direct);
  for (const overlay of [served, direct]) await runOk("qemu-img", ["rebase", "-u", "-b", base, "-F", "qcow2", overlay]);
  const commands = [
    "write -P 0x31 0 4k",
    "write -P 0x32 1000 70000",
    "write -z 2M 3M",
    "write -z -u 40M 4M",
    "discard 4M 64k",
    "write -P 0x33 63M 1M",
    "aio_write -P 0x34 10M 128k",
    "aio_write -P 0x35 11M 128k",
    "aio_flush",
    "flush",
  ];
  // --discard=unmap: the NBD discard then does what qemu-io's discard on the file does.
  const server = await startNbd(t, "snapstack", dir, served, { args: ["-t", "--discard=unmap"] });
  await runOk("qemu-io", ["-f", "raw", ...commands.flatMap((c) => ["-c", c]), server.uri]);
  await runOk("qemu-io", ["-f", "qcow2", ...commands.flatMap((c) => ["-c", c]), direct]);
  await runOk("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", server.uri, direct]);
  server.process.kill("SIGTERM");
  assert.equal(await waitExit(server.process), 0);
  await runOk("qemu-img", ["check", served]);
  await runOk("qemu-img", ["compare", served, direct]);

  const target = join(dir, "target.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", target, "64M"]);
  const destination = await startNbd(t, "snapstack", dir, target, { args: ["-t"] });
  await runOk("qemu-img", ["convert", "-n", "-f", "qcow2", "-O", "raw", top, destination.uri]);
  destination.process.kill("SIGTERM");
  assert.equal(await waitExit(destination.process), 0);
  await runOk("qemu-img", ["check", target]);
  await runOk("qemu-img", ["compare", top, target]);
});

test("--discard as qemu-nbd's: by default (ignore) TRIM changes nothing and zero writes stay allocated; with unmap both free clusters; the images match qemu-nbd's", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd")) return;
  const dir = scratchDir(t);
  const { top } = await buildChain(dir);
  // Over data of the top layer, data of the base and a past-the-backing-end range.
  const commands = ["discard 512k 64k", "discard 20M 128k", "write -z 1M 64k", "discard 50M 64k", "flush"];
  const ourImages: string[] = [];
  for (const mode of [[], ["--discard=ignore"], ["--discard=unmap"]]) {
    const images: string[] = [];
    for (const which of ["snapstack", "qemu-nbd"] as const) {
      const image = join(dir, `${which}-${mode.join("") || "default"}.qcow2`);
      copyFileSync(top, image);
      const server = await startNbd(t, which, dir, image, { args: ["-t", ...(which === "qemu-nbd" ? ["-f", "qcow2"] : []), ...mode] });
      await runOk("qemu-io", ["-f", "raw", ...commands.flatMap((c) => ["-c", c]), server.uri]);
      server.process.kill("SIGTERM");
      await waitExit(server.process);
      await runOk("qemu-img", ["check", image]);
      images.push(image);
    }
    const [ours, theirs] = images;
    const what = mode.join(" ") || "default";
    await runOk("qemu-img", ["compare", ours, theirs]);
    assert.equal((await runOk("qemu-img", ["map", "--output=json", ours])).stdout, (await runOk("qemu-img", ["map", "--output=json", theirs])).stdout, `${what}: map`);
    ourImages.push(ours);
  }
  // The mode matters: the discarded data of the top layer is still there by default, gone with unmap.
  await runOk("qemu-io", ["-f", "qcow2", "-c", "read -P 0x22 512k 64k", ourImages[0]]);
  await runOk("qemu-img", ["compare", ourImages[0], ourImages[1]]);
  assert.equal((await run("qemu-img", ["compare", ourImages[0], ourImages[2]])).code, 1, "unmap discarded nothing");
  const refused = await run(process.execPath, [SNAPSTACK_BIN, "nbd", "--discard=maybe", top]);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /E_USAGE: Invalid discard mode `maybe'/);
});

test("-s (qemu-nbd --snapshot): writes go to a temporary overlay that no file names, the chain and a raw image stay untouched, reads and map as qemu-nbd -s", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdsh")) return;
  const dir = scratchDir(t);
  const { top } = await buildChain(dir);
  const raw = join(dir, "disk.raw");
  await runOk("qemu-img", ["create", "-q", "-f", "raw", raw, "8M"]);
  await runOk("qemu-io", ["-f", "raw", "-c", "write -q -P 0x31 1M 1M", raw]);
  const digest = (path: string) => createHash("sha256").update(readFileSync(path)).digest("hex");
  const files = [top, join(dir, "base.qcow2"), raw];
  const before = files.map(digest);
  const script = "import hashlib\nh.pwrite(b'\\x07' * 65536, 1048576 - 4096)\nh.zero(131072, 2097152)\nh.flush()\nd = hashlib.sha256()\nfor at in range(0, h.get_size(), 4194304):\n    d.update(h.pread(min(4194304, h.get_size() - at), at))\nprint(d.hexdigest())";
  for (const [image, format] of [[top, "qcow2"], [raw, "raw"]]) {
    // qemu-nbd holds a shared lock on the image: it may serve it beside ours, as both only read it.
    const ours = await startNbd(t, "snapstack", dir, image, { args: ["-t", "-s", "-f", format] });
    const theirs = await startNbd(t, "qemu-nbd", dir, image, { args: ["-t", "-s", "-f", format] });
    const leftovers = () => readdirSync(tmpdir()).filter((name) => name.startsWith(`snapstack-nbd-${ours.process.pid}-`));
    assert.deepEqual(leftovers(), [], "the overlay has no name once open");
    const hashes = await Promise.all([ours, theirs].map(async (server) => (await runOk("nbdsh", ["-u", server.uri, "-c", script])).stdout));
    assert.equal(hashes[0], hashes[1], format);
    const maps = await Promise.all([ours, theirs].map(async (server) => (await runOk("qemu-img", ["map", "--output=json", server.uri])).stdout));
    assert.equal(maps[0], maps[1], format);
    for (const server of [ours, theirs]) {
      server.process.kill("SIGTERM");
      assert.equal(await waitExit(server.process), 0);
    }
    assert.deepEqual(leftovers(), []);
  }
  assert.deepEqual(files.map(digest), before, "the served images are only read");
  const refused = await run(process.execPath, [SNAPSTACK_BIN, "nbd", "-s", "-l", "s1", "-k", join(dir, "x.sock"), top]);
  assert.notEqual(refused.code, 0);
  assert.match(refused.stderr, /E_USAGE.*-s and -l/);
});
