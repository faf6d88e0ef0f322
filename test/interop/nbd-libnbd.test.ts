/**
 * `snapstack nbd` with libnbd's tools (nbdinfo, nbdcopy with multi-conn), fio's
 * nbd engine with crc32c verification, and several clients writing
 * disjoint ranges of one export at once.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { createRandom, testSeed } from "../helpers/random.ts";
import { requireTools, runOk, scratchDir } from "../helpers/tools.ts";
import { startNbd, waitExit } from "./nbd-helpers.ts";

async function patternedQcow2(dir: string, name: string): Promise<string> {
  const path = join(dir, name);
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", path, "64M"]);
  await runOk("qemu-io", ["-f", "qcow2", "-c", "write -q -P 0x41 0 3M", "-c", "write -q -P 0x42 17M 5M", "-c", "write -q -P 0x43 63M 1M", path]);
  return path;
}

test("nbdinfo: export details, --list with the description, --size and --can", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "nbdinfo")) return;
  const dir = scratchDir(t);
  const image = await patternedQcow2(dir, "a.qcow2");
  const server = await startNbd(t, "snapstack", dir, image, { args: ["-t", "-r", "-D", "the disk"], exportName: "disk" });
  const details = (await runOk("nbdinfo", [server.uri])).stdout;
  assert.match(details, /export="disk":/);
  assert.match(details, /export-size: 67108864/);
  assert.match(details, /is_read_only: true/);
  assert.match(details, /block_size_maximum: 33554432/);
  const listed = (await runOk("nbdinfo", ["--list", server.uri])).stdout;
  assert.match(listed, /export="disk":/);
  assert.match(listed, /description: the disk/);
  assert.equal((await runOk("nbdinfo", ["--size", server.uri])).stdout.trim(), "67108864");
  await runOk("nbdinfo", ["--can", "flush", server.uri]);
  await runOk("nbdinfo", ["--is", "read-only", server.uri]);
  await runOk("nbdinfo", ["--can", "multi-conn", server.uri], 2);
});

test("nbdcopy with multi-conn, export to file and file to export", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "nbdcopy")) return;
  const dir = scratchDir(t);
  const image = await patternedQcow2(dir, "source.qcow2");
  const source = await startNbd(t, "snapstack", dir, image, { args: ["-t", "-r", "-e", "0", "-v"] });
  const copy = join(dir, "copy.raw");
  await runOk("nbdcopy", ["--connections=4", source.uri, copy]);
  await runOk("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", image, copy]);
  const connections = (source.stderr().match(/client disconnected/g) ?? []).length;
  assert.ok(connections >= 2, `nbdcopy used ${connections} connection(s): CAN_MULTI_CONN must let it open several`);

  const target = join(dir, "target.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", target, "64M"]);
  const destination = await startNbd(t, "snapstack", dir, target, { args: ["-t", "-e", "0"] });
  await runOk("nbdcopy", ["--connections=4", "--flush", copy, destination.uri]);
  destination.process.kill("SIGTERM");
  assert.equal(await waitExit(destination.process), 0);
  await runOk("qemu-img", ["check", target]);
  await runOk("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", image, target]);
});

test("fio ioengine=nbd: random writes then reads verified with crc32c (qcow2 and raw)", async (t) => {
  if (!requireTools(t, "qemu-img", "fio")) return;
  const dir = scratchDir(t);
  for (const format of ["qcow2", "raw"]) {
    const image = join(dir, `fio.${format}`);
    await runOk("qemu-img", ["create", "-q", "-f", format, image, "64M"]);
    const server = await startNbd(t, "snapstack", dir, image, { args: ["-t", "-f", format] });
    const job = join(dir, `verify-${format}.fio`);
    writeFileSync(
      job,
      [
        "[global]",
        "ioengine=nbd",
        `uri=${server.uri}`,
        "iodepth=16",
        "size=48M",
        "verify=crc32c",
        "verify_fatal=1",
        "verify_state_save=0",
        "do_verify=1",
        "randrepeat=1",
        "",
        "[randwrite-4k]",
        "rw=randwrite",
        "bs=4k",
        "",
        "[randwrite-mixed]",
        "stonewall",
        "rw=randwrite",
        "bsrange=512-256k",
        "",
      ].join("\n"),
    );
    // verify_fatal: any crc32c mismatch makes fio exit non-zero.
    const result = await runOk("fio", ["--output-format=json", job]);
    const report = JSON.parse(result.stdout.slice(result.stdout.indexOf("{"))) as { jobs: Array<{ error: number; write: { io_bytes: number }; read: { io_bytes: number } }> };
    for (const job of report.jobs) {
      assert.equal(job.error, 0);
      assert.ok(job.write.io_bytes > 0 && job.read.io_bytes > 0, "fio wrote and read back");
    }
    server.process.kill("SIGTERM");
    assert.equal(await waitExit(server.process), 0);
    if (format === "qcow2") await runOk("qemu-img", ["check", image]);
  }
});

test("concurrency: several clients write disjoint ranges of one export at once", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  const dir = scratchDir(t);
  const image = join(dir, "shared.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", image, "64M"]);
  const server = await startNbd(t, "snapstack", dir, image, { args: ["-t", "-e", "0"] });
  const clients = 6;
  const rangeBytes = 8 * 1024 * 1024;
  const plans = Array.from({ length: clients }, (_, client) => {
    const commands: string[] = [];
    for (let i = 0; i < 24; i++) {
      const length = (1 + random.int(64)) * 4096;
      const offset = client * rangeBytes + random.int((rangeBytes - length) / 512) * 512;
      commands.push(`aio_write -P ${client + 1} ${offset} ${length}`);
    }
    commands.push("aio_flush");
    return commands;
  });
  await Promise.all(plans.map((commands) => runOk("qemu-io", ["-f", "raw", ...commands.flatMap((c) => ["-c", c]), server.uri])));
  // The same writes replayed one client after another on a plain copy must give the same disk.
  const expected = join(dir, "expected.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", expected, "64M"]);
  for (const commands of plans) await runOk("qemu-io", ["-f", "qcow2", ...commands.flatMap((c) => ["-c", c]), expected]);
  await runOk("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", server.uri, expected]);
  server.process.kill("SIGTERM");
  assert.equal(await waitExit(server.process), 0);
  await runOk("qemu-img", ["check", image]);
  await runOk("qemu-img", ["compare", image, expected]);
});
