/**
 * The overlay `snapstack img commit` leaves, against `qemu-img commit`'s on
 * a copy of the same chain (built by qemu-img): same size on disk and in
 * qemu-img info, the same bytes but for the backing name, clean for
 * qemu-img check, nothing allocated, content falling through to the base.
 * Where QEMU keeps the slow path (internal snapshots), so do we.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { cpSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { assertClean, assertSameContent, createQcow2, qemuImg, qemuIo, snapstackOk } from "./jobs-helpers.ts";

const MiB = 1024 * 1024;

interface Pair {
  ours: { base: string; top: string };
  qemu: { base: string; top: string };
}

/** base (64 MiB) <- top (data, zero clusters, a discard; optionally an internal snapshot), copied for qemu-img. */
async function twoChains(t: TestContext, topOptions: string[], snapshot: boolean): Promise<Pair> {
  const dir = scratchDir(t, "snapstack-commit-empty-");
  const base = await createQcow2(join(dir, "base.qcow2"), { sizeBytes: 64 * MiB });
  await qemuIo(base, "write -P 0x11 0 8M");
  const top = await createQcow2(join(dir, "top.qcow2"), { backing: "base.qcow2" }, topOptions);
  await qemuIo(top, "write -P 0x22 1M 5M", "write -P 0x33 40M 3M", "write -z 50M 1M", "discard 41M 64k");
  if (snapshot) await qemuImg("snapshot", "-c", "kept", top);
  const qemuBase = join(dir, "qemu-base.qcow2");
  const qemuTop = join(dir, "qemu-top.qcow2");
  cpSync(base, qemuBase);
  cpSync(top, qemuTop);
  await qemuImg("rebase", "-u", "-f", "qcow2", "-b", "qemu-base.qcow2", "-F", "qcow2", qemuTop);
  return { ours: { base, top }, qemu: { base: qemuBase, top: qemuTop } };
}

interface Info {
  "virtual-size": number;
  "actual-size": number;
  "backing-filename"?: string;
  "format-specific": { data: Record<string, unknown> };
}

async function info(path: string): Promise<Info> {
  return JSON.parse(await qemuImg("info", "--output=json", path)) as Info;
}

async function assertNothingAllocated(path: string): Promise<void> {
  const map = JSON.parse(await qemuImg("map", "--output=json", path)) as { depth: number; present: boolean }[];
  assert.ok(map.every((entry) => entry.depth > 0 || !entry.present), JSON.stringify(map));
}

/** Header fields and cluster bytes equal, once the backing names (same length apart from the prefix) are set aside. */
function assertSameBytesButBackingName(ours: string, qemu: string): void {
  const a = readFileSync(ours);
  const b = readFileSync(qemu);
  assert.equal(a.length, b.length, "file sizes");
  const view = (bytes: Buffer): DataView => new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const nameAt = Number(view(a).getBigUint64(8));
  const clusterSizeBytes = 2 ** view(a).getUint32(20);
  // Bytes 16-19: backing_file_size; the name itself at nameAt. Everything else must match.
  for (let at = 0; at < a.length; at++) {
    if ((at >= 16 && at < 20) || (at >= nameAt && at < clusterSizeBytes)) continue;
    if (a[at] !== b[at]) assert.fail(`byte ${at}: ours ${a[at]}, qemu-img's ${b[at]}`);
  }
}

test("commit empties a v3 overlay as qemu-img commit does (make_completely_empty): same size, same bytes, clean", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  for (const topOptions of [[], ["-o", "cluster_size=4096,refcount_bits=8"], ["-o", "extended_l2=on"]]) {
    const { ours, qemu } = await twoChains(t, topOptions, false);
    await snapstackOk("img", "commit", ours.top);
    await qemuImg("commit", qemu.top);
    const label = topOptions.join(" ") || "defaults";
    await assertClean(ours.top);
    await assertClean(ours.base);
    await assertSameContent(ours.base, qemu.base);
    await assertSameContent(ours.top, qemu.top);
    await assertNothingAllocated(ours.top);
    assert.equal(statSync(ours.top).size, statSync(qemu.top).size, `${label}: file size`);
    // Blocks on disk (ls -s): the same data blocks; either file may count a block or two of
    // file-system metadata more (ext4 counts an extent-tree block of a fragmented file).
    const [oursBlocks, qemuBlocks] = [statSync(ours.top).blocks, statSync(qemu.top).blocks];
    assert.ok(Math.abs(oursBlocks - qemuBlocks) <= 16, `${label}: blocks on disk (ls -s): ours ${oursBlocks}, qemu-img's ${qemuBlocks}`);
    const [a, b] = [await info(ours.top), await info(qemu.top)];
    assert.equal(a["virtual-size"], b["virtual-size"]);
    assert.equal(a["backing-filename"], "base.qcow2");
    assert.deepEqual(a["format-specific"], b["format-specific"], `${label}: format-specific info`);
    assertSameBytesButBackingName(ours.top, qemu.top);
    // The emptied overlay takes writes, read back through qemu-io.
    await qemuIo(ours.top, "write -P 0x44 2M 64k", "read -P 0x44 2M 64k", "read -P 0x11 0 1M");
    await assertClean(ours.top);
  }
});

test("commit of a v2 overlay or one with internal snapshots empties it cluster by cluster (snapshot kept), clean", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  for (const [topOptions, snapshot] of [[["-o", "compat=0.10"], false], [[], true]] as const) {
    const { ours, qemu } = await twoChains(t, [...topOptions], snapshot);
    await snapstackOk("img", "commit", ours.top);
    await qemuImg("commit", qemu.top);
    await assertClean(ours.top);
    await assertSameContent(ours.top, qemu.top);
    await assertSameContent(ours.base, qemu.base);
    if (snapshot) {
      const list = await qemuImg("snapshot", "-l", ours.top);
      assert.match(list, /kept/);
      // The snapshot still holds the overlay's data: applied, the overlay reads it again.
      await qemuImg("snapshot", "-a", "kept", ours.top);
      await qemuIo(ours.top, "read -P 0x22 1M 5M", "read -P 0x33 40M 64k");
      await assertClean(ours.top);
    } else {
      await assertNothingAllocated(ours.top);
    }
  }
});
