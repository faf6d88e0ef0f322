/**
 * Opening backing chains made by qemu-img/qemu-io: content read through the
 * chain equals `qemu-img convert -O raw`, and failures (loops, missing
 * files, wrong formats, depth) match qemu-img's messages and close every
 * file opened on the way.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { readFileSync, readdirSync, mkdirSync } from "node:fs";
import { openImage, chainLayers } from "../../src/chain/open-image.ts";
import { createImage } from "../../src/chain/create-image.ts";
import { requireTools, run, runOk, scratchDir } from "../helpers/tools.ts";
import { readImage } from "../helpers/read-image.ts";

function openFdCount(): number {
  return readdirSync("/proc/self/fd").length;
}

async function bash(script: string, cwd: string): Promise<void> {
  await runOk("bash", ["-euc", `cd '${cwd}'\n${script}`]);
}

/** Bytes of the whole chain as qemu sees them. */
async function qemuContent(dir: string, path: string): Promise<Uint8Array> {
  const out = join(dir, `oracle-${Math.random().toString(36).slice(2)}.raw`);
  await runOk("qemu-img", ["convert", "-O", "raw", path, out]);
  return new Uint8Array(readFileSync(out));
}


test("chains of depth 1, 2 and 50 with relative names read like qemu", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  mkdirSync(join(dir, "sub"));
  // base.raw <- sub/l1.qcow2 (backing "../base.raw") <- sub/l2.qcow2 ("l1.qcow2") <- ... l50
  await bash(
    `qemu-img create -q -f raw base.raw 4M
     qemu-io -f raw -c 'write -P 1 0 4M' base.raw >/dev/null
     qemu-img create -q -f qcow2 -b ../base.raw -F raw sub/l1.qcow2 6M
     qemu-io -c 'write -P 2 64k 64k' -c 'write -z 1M 128k' sub/l1.qcow2 >/dev/null
     for i in $(seq 2 50); do
       qemu-img create -q -f qcow2 -u -b l$((i-1)).qcow2 -F qcow2 sub/l$i.qcow2 6M
       qemu-io -c "write -P $((i+10)) $((i*64))k 4k" sub/l$i.qcow2 >/dev/null
     done`,
    dir,
  );
  for (const depth of [1, 2, 50]) {
    const top = join(dir, "sub", `l${depth}.qcow2`);
    assert.deepEqual(await readImage(top), await qemuContent(dir, top), `depth ${depth}`);
    const device = await openImage(top, { readOnly: true });
    const layers = chainLayers(device);
    assert.equal(layers.length, depth + 1);
    assert.equal(layers[layers.length - 1].format, "raw");
    assert.ok(layers.slice(1).every((layer) => layer.readOnly));
    await device.close();
  }
  // The top opens read-write, its backing files read-only.
  const device = await openImage(join(dir, "sub", "l2.qcow2"));
  assert.equal(device.readOnly, false);
  assert.equal(device.backing?.readOnly, true);
  await device.close();
});

test("a 1000-deep chain opens, reads and closes every file", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await bash(
    `qemu-img create -q -f raw l0 1M
     qemu-io -f raw -c 'write -P 7 0 64k' l0 >/dev/null
     qemu-img create -q -f qcow2 -b l0 -F raw l1 1M`,
    dir,
  );
  // 999 more overlays, created in-process (createImage writes the same bytes
  // as qemu-img create, which cli-create tests): 1000 qemu-img processes take
  // minutes on a loaded 2-core machine. qemu-io then writes through the chain.
  for (let i = 2; i <= 1000; i++) {
    await createImage(join(dir, `l${i}`), { format: "qcow2", sizeBytes: 1 << 20, backingFile: `l${i - 1}`, backingFormat: "qcow2", unsafe: true, options: {} });
  }
  await bash(
    `qemu-io -c 'write -P 9 4k 4k' l500 >/dev/null
     qemu-io -c 'write -P 3 512k 4k' l1000 >/dev/null`,
    dir,
  );
  const before = openFdCount();
  const device = await openImage(join(dir, "l1000"), { readOnly: true });
  assert.equal(chainLayers(device).length, 1001);
  assert.ok(openFdCount() >= before + 1001);
  const buffer = new Uint8Array(device.sizeBytes);
  await device.read(0, buffer);
  const expected = new Uint8Array(1 << 20);
  expected.fill(7, 0, 65536);
  expected.fill(9, 4096, 8192);
  expected.fill(3, 524288, 528384);
  assert.deepEqual(buffer, expected);
  await device.close();
  assert.equal(openFdCount(), before);
  // The depth limit refuses it and closes what was opened.
  await assert.rejects(openImage(join(dir, "l1000"), { readOnly: true, chainDepthMax: 1000 }), { code: "E_CHAIN_TOO_DEEP" });
  assert.equal(openFdCount(), before);
});

test("loops, missing backing files, wrong formats and protocols fail like qemu-img, closing all files", async (t) => {
  if (!requireTools(t, "qemu-img")) return;
  const dir = scratchDir(t);
  await bash(
    `qemu-img create -q -f qcow2 a.qcow2 1M
     qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 b.qcow2
     qemu-img rebase -u -b b.qcow2 -F qcow2 a.qcow2
     qemu-img create -q -f qcow2 -u -b missing.qcow2 -F qcow2 c1.qcow2 1M
     qemu-img create -q -f qcow2 -u -b c1.qcow2 -F qcow2 c2.qcow2 1M
     qemu-img create -q -f qcow2 -u -b c2.qcow2 -F qcow2 c3.qcow2 1M
     qemu-img create -q -f raw plain.raw 1M
     qemu-img create -q -f qcow2 -u -b plain.raw -F qcow2 wrongfmt.qcow2 1M
     qemu-img create -q -f qcow2 -u -b 'json:{"driver":"raw","file":{"driver":"file","filename":"plain.raw"}}' -F raw json.qcow2 1M
     qemu-img create -q -f qcow2 -u -b c2.qcow2 -F vmdk vmdk.qcow2 1M`,
    dir,
  );
  const before = openFdCount();
  const cwd = process.cwd();
  process.chdir(dir); // relative names, as a user types them
  try {
    await assert.rejects(openImage("b.qcow2"), { code: "E_BACKING_LOOP", message: /creates an infinite loop/ });
    const qemuLoop = await run("qemu-img", ["info", "--backing-chain", "b.qcow2"]);
    assert.match(qemuLoop.stderr, /creates an infinite loop/);

    for (const name of ["c1.qcow2", "c3.qcow2", "nonexistent.qcow2"]) {
      const qemu = await run("qemu-img", ["map", name]);
      assert.equal(qemu.code, 1);
      await assert.rejects(openImage(name), (error: Error & { code: string }) => {
        assert.equal(error.message, qemu.stderr.trim().replace(/^qemu-img: /, ""));
        assert.equal(error.code, name === "nonexistent.qcow2" ? "E_NOT_FOUND" : "E_BACKING_MISSING");
        return true;
      });
    }
    const wrong = await run("qemu-img", ["map", "wrongfmt.qcow2"]);
    await assert.rejects(openImage("wrongfmt.qcow2"), (error: Error & { code: string }) => {
      assert.equal(error.code, "E_WRONG_FORMAT");
      assert.equal(error.message, wrong.stderr.trim().replace(/^qemu-img: /, ""));
      return true;
    });
    const direct = await run("qemu-img", ["map", "-f", "qcow2", "plain.raw"]);
    await assert.rejects(openImage("plain.raw", { format: "qcow2" }), (error: Error & { code: string }) => {
      assert.equal(error.code, "E_WRONG_FORMAT");
      assert.equal(error.message, direct.stderr.trim().replace(/^qemu-img: /, ""));
      return true;
    });
    await assert.rejects(openImage("json.qcow2"), { code: "E_UNSUPPORTED_FEATURE" });
    // A qcow2 file declared vmdk: opened as a vmdk descriptor, which it is not (qemu-img's message).
    const notVmdk = await run("qemu-img", ["map", "vmdk.qcow2"]);
    await assert.rejects(openImage("vmdk.qcow2"), (error: Error & { code: string }) => {
      assert.equal(error.code, "E_CORRUPT_IMAGE");
      assert.equal(error.message, notVmdk.stderr.trim().replace(/^qemu-img: /, ""));
      return true;
    });
    // Without the backing chain these all open (qemu-img info does the same).
    for (const name of ["b.qcow2", "c3.qcow2", "wrongfmt.qcow2", "json.qcow2"]) {
      const device = await openImage(name, { readOnly: true, openBacking: false });
      assert.equal(device.backing, null);
      await device.close();
    }
  } finally {
    process.chdir(cwd);
  }
  assert.equal(openFdCount(), before);
});
