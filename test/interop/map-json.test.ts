/**
 * mapImage + formatMapJson against `qemu-img map --output=json`, byte for
 * byte (offsets included), on chains built with qemu-img and qemu-io.
 * Holes in raw layers are `zero: true, data: false` in both, and data
 * clusters qemu wrote only partly (the rest left as a hole in the host
 * file) are `zero: true, data: true` in both where qemu's heuristic takes the
 * image for metadata-preallocated: snapstack sees holes through the native
 * addon (SEEK_DATA). Without it (a laptop without a compiler) those
 * layouts compare with `holes: "ignore"`: zero set to false on qemu's data
 * entries (and re-merged); every other field, offsets included, must match
 * exactly.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { openImage } from "../../src/chain/open-image.ts";
import { formatMapJson, mapEntriesMergeable, mapImage } from "../../src/chain/map-image.ts";
import type { MapExtent } from "../../src/device/block-device.ts";
import { requireNativeFileOps, requireTools, runOk, scratchDir } from "../helpers/tools.ts";
import { nativeFileOpsLoaded } from "../../src/io/native-file-ops.ts";
import { createRandom, testSeed } from "../helpers/random.ts";

async function bash(script: string, cwd: string): Promise<void> {
  await runOk("bash", ["-euc", `cd '${cwd}'\n${script}`]);
}

/** qemu's map with host-file holes under data made invisible, as snapstack sees it. */
function withoutHoles(qemuJson: string): string {
  const merged: MapExtent[] = [];
  for (const entry of JSON.parse(qemuJson) as MapExtent[]) {
    if (entry.data) entry.zero = false;
    const last = merged[merged.length - 1];
    if (last !== undefined && mapEntriesMergeable(last, entry)) last.length += entry.length;
    else merged.push(entry);
  }
  return formatMapJson(merged);
}

async function assertSameMap(path: string, extra: { startOffset?: number; maxLengthBytes?: number; holes?: "ignore" } = {}): Promise<void> {
  const args = ["map", "--output=json"];
  if (extra.startOffset !== undefined) args.push("--start-offset", String(extra.startOffset));
  if (extra.maxLengthBytes !== undefined) args.push("--max-length", String(extra.maxLengthBytes));
  const qemu = await runOk("qemu-img", [...args, path]);
  const device = await openImage(path, { readOnly: true });
  try {
    const ours = formatMapJson(await mapImage(device, extra));
    assert.equal(ours, extra.holes === "ignore" ? withoutHoles(qemu.stdout) : qemu.stdout, `map of ${path} ${JSON.stringify(extra)}`);
  } finally {
    await device.close();
  }
}

const LAYOUTS: Record<string, string> = {
  empty: `qemu-img create -q -f qcow2 img 10M`,
  "data, zero, compressed, discarded": `qemu-img create -q -f qcow2 img 10M
    qemu-io -c 'write -P 1 0 192k' -c 'write -z 256k 64k' -c 'write -c -P 2 1M 64k' -c 'write -c -P 3 1088k 64k' \\
      -c 'write -P 4 2M 4k' -c 'write -P 5 5M 1M' -c 'discard 5M 64k' -c 'write -z -u 3M 128k' img >/dev/null`,
  "3-layer chain with a shorter base": `qemu-img create -q -f raw base 3M
    qemu-io -f raw -c 'write -P 9 0 3M' base >/dev/null
    qemu-img create -q -f qcow2 -b base -F raw mid 6M
    qemu-io -c 'write -P 3 512k 1M' -c 'write -z 2M 128k' -c 'write -c -P 5 4M 64k' mid >/dev/null
    qemu-img create -q -f qcow2 -b mid -F qcow2 img 8M
    qemu-io -c 'write -P 7 64k 64k' -c 'write -z -u 4M 64k' -c 'write -z 7M 64k' img >/dev/null`,
  "sparse raw base under an overlay": `qemu-img create -q -f raw base 4M
    qemu-io -f raw -c 'write -P 9 1M 512k' -c 'write -P 8 3M 64k' base >/dev/null
    qemu-img create -q -f qcow2 -b base -F raw img 6M
    qemu-io -c 'write -P 3 1280k 64k' -c 'write -z 2M 64k' img >/dev/null`,
  "512-byte clusters": `qemu-img create -q -f qcow2 -o cluster_size=512 img 1M
    qemu-io -c 'write -P 1 0 1536' -c 'write -P 2 4k 512' -c 'write -z 8k 2k' img >/dev/null`,
  "2 MiB clusters": `qemu-img create -q -f qcow2 -o cluster_size=2M img 20M
    qemu-io -c 'write -P 1 0 4k' -c 'write -P 2 6M 3M' -c 'write -z 12M 2M' img >/dev/null`,
  "extended L2 subclusters over a backing": `qemu-img create -q -f qcow2 base 4M
    qemu-io -c 'write -P 1 0 4M' base >/dev/null
    qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k -b base -F qcow2 img
    qemu-io -c 'write -P 2 4k 4k' -c 'write -z 64k 8k' -c 'write -P 3 130k 2k' img >/dev/null`,
  "extended L2 subclusters without a backing (unallocated subclusters of allocated clusters keep their offset)": `qemu-img create -q -f qcow2 -o extended_l2=on img 1M
    qemu-io -c 'write -P 1 4k 4k' -c 'write -z 64k 8k' -c 'write -P 2 130k 1k' img >/dev/null`,
  "extended L2 subclusters past the end of a shorter backing keep their offset": `qemu-img create -q -f qcow2 base 64k
    qemu-img create -q -f qcow2 -o extended_l2=on -b base -F qcow2 img 1M
    qemu-io -c 'write -P 1 128k 4k' -c 'write -P 2 60k 8k' img >/dev/null`,
  "v2 image": `qemu-img create -q -f qcow2 -o compat=0.10 img 4M
    qemu-io -c 'write -P 1 0 64k' -c 'write -z 128k 64k' -c 'write -c -P 2 1M 64k' img >/dev/null`,
  "with an internal snapshot": `qemu-img create -q -f qcow2 img 4M
    qemu-io -c 'write -P 1 0 256k' img >/dev/null
    qemu-img snapshot -c s1 img
    qemu-io -c 'write -P 2 64k 64k' -c 'write -z 128k 64k' img >/dev/null`,
  "preallocated metadata zeroes": `qemu-img create -q -f qcow2 -o preallocation=metadata img 1M
    qemu-io -c 'write -P 1 0 64k' -c 'write -z 128k 64k' img >/dev/null`,
};

/** Whether snapstack sees holes in files (the native addon): then every layout compares exactly. */
const seesHoles = nativeFileOpsLoaded();

/** Layouts with partial writes into fresh clusters (host-file holes under data). */
const PARTIAL_CLUSTER_LAYOUTS = new Set([
  "data, zero, compressed, discarded",
  "512-byte clusters",
  "extended L2 subclusters over a backing",
  "extended L2 subclusters without a backing (unallocated subclusters of allocated clusters keep their offset)",
  "2 MiB clusters",
  "extended L2 subclusters past the end of a shorter backing keep their offset",
]);

for (const [name, script] of Object.entries(LAYOUTS)) {
  test(`map JSON equals qemu-img's: ${name}`, async (t) => {
    if (!requireTools(t, "qemu-img", "qemu-io")) return;
    if (name.includes("raw") && !requireNativeFileOps(t)) return;
    const dir = scratchDir(t);
    await bash(script, dir);
    const path = join(dir, "img");
    if (name === "preallocated metadata zeroes" && !seesHoles) {
      // qemu-img reports host-file holes under allocated clusters as zero; without the
      // addon snapstack cannot see holes, so only the written and zeroed clusters are compared.
      await assertSameMap(path, { startOffset: 0, maxLengthBytes: 65536 });
      await assertSameMap(path, { startOffset: 131072, maxLengthBytes: 65536 });
      return;
    }
    // Layouts whose writes fill whole clusters compare exactly; the others leave holes.
    const holes = PARTIAL_CLUSTER_LAYOUTS.has(name) && !seesHoles ? "ignore" : undefined;
    await assertSameMap(path, { holes });
    await assertSameMap(path, { startOffset: 65536 + 512, maxLengthBytes: 3 * 1024 * 1024, holes });
    await assertSameMap(path, { startOffset: 4096, holes });
  });
}

test("map JSON equals qemu-img's on random writes across a 3-layer chain", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  const random = createRandom(seed);
  const dir = scratchDir(t);
  const ops = (): string => {
    // Compressed writes first, on distinct clusters: qcow2 cannot compress over an allocated cluster.
    const commands: string[] = [];
    const compressedClusters = new Set<number>();
    for (let i = 0; i < 4; i++) compressedClusters.add(random.int(32));
    for (const cluster of compressedClusters) commands.push(`-c 'write -c -P ${1 + random.int(200)} ${cluster * 65536} 65536'`);
    for (let i = 0; i < 25; i++) {
      const offset = random.int(64) * 32768 + (random.next() < 0.2 ? 512 * random.int(64) : 0);
      const length = (1 + random.int(8)) * 16384;
      const kind = random.int(4);
      if (offset + length > 2 * 1024 * 1024) continue;
      if (kind === 0) commands.push(`-c 'write -z ${offset} ${length}'`);
      else if (kind === 1) commands.push(`-c 'discard ${offset} ${length}'`);
      else commands.push(`-c 'write -P ${1 + random.int(200)} ${offset} ${length}'`);
    }
    return commands.join(" ");
  };
  await bash(
    `qemu-img create -q -f qcow2 base 2M
     qemu-io ${ops()} base >/dev/null
     qemu-img create -q -f qcow2 -b base -F qcow2 mid
     qemu-io ${ops()} mid >/dev/null
     qemu-img create -q -f qcow2 -b mid -F qcow2 img
     qemu-io ${ops()} img >/dev/null`,
    dir,
  );
  await assertSameMap(join(dir, "img"), { holes: seesHoles ? undefined : "ignore" });
  await assertSameMap(join(dir, "mid"), { holes: seesHoles ? undefined : "ignore" });
});
