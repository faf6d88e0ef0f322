/**
 * VM snapshots (issue 6), with the test guest (256 MiB RAM, TCG or KVM as
 * probed) driven in-process through the MachineManager:
 * - disk-only snapshot of a running VM: how long the guest is paused
 *   (QMP stop .. cont, as measured by the manager), median of RUNS, with a
 *   4 GiB and a 64 GiB disk: the pause must not depend on the disk size;
 * - snapshot with VM state (256 MiB guest): command to done, and how long
 *   the guest was paused, by the accelerator's default path (KVM: live
 *   migration; TCG: paused save) and by the live save forced;
 * - revert to a running guest from that snapshot: command to guest running
 *   (4 GiB vs 64 GiB disk);
 * - deleting the snapshot the running VM sits on (its layer holds 64 MiB,
 *   streamed into the top while a temporary layer takes the guest's
 *   writes): how long the guest was paused in all;
 * - delete a middle snapshot of a stopped machine holding 64 MiB vs 256 MiB
 *   of its own data: the time follows the snapshot's own data.
 * No peer (nothing else does this over snapstack's NBD layers).
 */
import { join } from "node:path";
import { GiB, MiB, withScratchDir } from "./fixtures/images.ts";
import { printRows, row, type BenchRow } from "./fixtures/rows.ts";
import { openImage } from "../src/chain/open-image.ts";
import { MachineStore } from "../src/vm/store/machine-store.ts";
import { MachineManager } from "../src/vm/manager/machine-manager.ts";
import { stepPath } from "../src/vm/store/layer-steps.ts";
import { liveSaveSupported } from "../src/vm/runtime/qemu-process.ts";
import { buildGuest, GuestConsole } from "../test/helpers/guest-kit.ts";

const RUNS = 5;
const WRITE_CHUNK_BYTES = 4 * MiB;

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

async function runningCase(dir: string, diskBytes: number): Promise<BenchRow[]> {
  const guest = await buildGuest();
  const manager = new MachineManager(new MachineStore(join(dir, `home-${diskBytes / GiB}`)));
  const name = "bench";
  await manager.create({ name, memoryBytes: 256 * MiB, diskSizeBytes: diskBytes, kernel: guest.kernelPath, initrd: guest.initrdPath, append: guest.append });
  await manager.start(name);
  try {
    const console = new GuestConsole(manager.serialLogPath(name), manager.serialSocketPath(name));
    await console.waitFor(/^READY vda/m, { timeoutMs: 60_000 });
    await console.nextCounter({ timeoutMs: 30_000 });
    const pauses: number[] = [];
    for (let run = 0; run < RUNS; run++) pauses.push((await manager.snapshot(name, { snapshot: `disk-${run}`, diskOnly: true })).timings.pausedMs);
    const withState = [];
    for (let run = 0; run < RUNS; run++) withState.push((await manager.snapshot(name, { snapshot: `state-${run}` })).timings);
    const stateTotals = withState.map((timings) => timings.totalMs);
    const statePauses = withState.map((timings) => timings.pausedMs);
    // The live save (the path under KVM; under TCG only when forced, see liveSaveSupported). Never reverted to here.
    const liveSaved = process.env.SNAPSTACK_LIVE_SAVE;
    process.env.SNAPSTACK_LIVE_SAVE = "1";
    const live = [];
    try {
      for (let run = 0; run < RUNS; run++) live.push((await manager.snapshot(name, { snapshot: `live-${run}` })).timings);
    } finally {
      if (liveSaved === undefined) delete process.env.SNAPSTACK_LIVE_SAVE;
      else process.env.SNAPSTACK_LIVE_SAVE = liveSaved;
    }
    const livePauses = live.map((timings) => timings.pausedMs);
    const accelerator = manager.status(name).accelerator;
    const defaultPath = accelerator === "kvm" || accelerator === "tcg" ? (liveSaveSupported(accelerator) ? "live migration" : "paused save (live not trusted on TCG)") : "?";
    // The VM sits on a snapshot whose layer holds 64 MiB: deleting it streams that into the top.
    await console.runCommand(`dd if=/dev/urandom of=/dev/vda bs=1M count=64 conv=fsync 2>/dev/null`, { timeoutMs: 120_000 });
    await manager.snapshot(name, { snapshot: "sits-on", diskOnly: true });
    const deleted = await manager.deleteSnapshot(name, "sits-on");
    const reverts: number[] = [];
    for (let run = 0; run < RUNS; run++) reverts.push((await manager.revert(name, "state-0")).totalMs);
    const size = `${diskBytes / GiB} GiB disk`;
    const range = (values: number[]): string => `min ${Math.min(...values).toFixed(1)}, max ${Math.max(...values).toFixed(1)} ms`;
    return [
      row(`vm: disk-only snapshot, guest paused (${size})`, median(pauses), null, "ms", `median of ${RUNS}; ${range(pauses)}`),
      row(`vm: snapshot with state, 256 MiB guest (${size})`, median(stateTotals) / 1000, null, "s", `median of ${RUNS}; state file ${(withState[0].stateBytes / MiB).toFixed(1)} MiB`),
      row(`vm: snapshot with state, guest paused (${size})`, median(statePauses), null, "ms", `median of ${RUNS}; ${range(statePauses)}; ${accelerator}: ${defaultPath}`),
      row(`vm: snapshot with state, live save, guest paused (${size})`, median(livePauses), null, "ms", `median of ${RUNS}; ${range(livePauses)}; total ${(median(live.map((timings) => timings.totalMs)) / 1000).toFixed(2)} s; disks swapped at the switchover`),
      row(`vm: delete the snapshot the VM runs on, guest paused (${size})`, deleted.pausedMs, null, "ms", `64 MiB layer streamed into the top while the guest runs (${(deleted.mergedBytes / MiB).toFixed(0)} MiB merged); two short pauses`),
      row(`vm: revert to running 256 MiB guest (${size})`, median(reverts) / 1000, null, "s", `median of ${RUNS}: kill QEMU, new overlay, start with incoming state, resume`),
    ];
  } finally {
    await manager.shutdown();
  }
}

/** Write `bytes` in 4 MiB chunks spread over the disk, starting at `shiftBytes`. */
async function fillTop(manager: MachineManager, name: string, bytes: number, pattern: number, shiftBytes = 0): Promise<void> {
  const tree = manager.store.loadTree(name);
  const device = await openImage(stepPath(manager.store.machineDir(name), tree.layers[tree.current.layer].file));
  try {
    const chunk = new Uint8Array(WRITE_CHUNK_BYTES).fill(pattern);
    const strideBytes = Math.floor(device.sizeBytes / (bytes / WRITE_CHUNK_BYTES));
    for (let offset = shiftBytes; offset + WRITE_CHUNK_BYTES <= device.sizeBytes && bytes > 0; offset += strideBytes, bytes -= WRITE_CHUNK_BYTES) await device.write(offset, chunk);
  } finally {
    await device.close();
  }
}

async function deleteCase(dir: string, ownBytes: number): Promise<BenchRow> {
  const manager = new MachineManager(new MachineStore(join(dir, `home-delete-${ownBytes / MiB}`)));
  const name = "del";
  await manager.create({ name, diskSizeBytes: 4 * GiB });
  await fillTop(manager, name, 64 * MiB, 1);
  await manager.snapshot(name, { snapshot: "a" });
  await fillTop(manager, name, ownBytes, 2);
  await manager.snapshot(name, { snapshot: "b" });
  // The child holds more than b at other offsets, so b is streamed into it (cost: b's own data).
  await fillTop(manager, name, 2 * ownBytes, 3, WRITE_CHUNK_BYTES);
  await manager.snapshot(name, { snapshot: "c" });
  const started = performance.now();
  const result = await manager.deleteSnapshot(name, "b");
  const seconds = (performance.now() - started) / 1000;
  return row(`vm: delete middle snapshot with ${ownBytes / MiB} MiB own data (child ${(2 * ownBytes) / MiB} MiB)`, seconds, null, "s", `4 GiB disk, stopped; merged ${(result.mergedBytes / MiB).toFixed(0)} MiB, freed ${(result.freedBytes / MiB).toFixed(0)} MiB`);
}

export default async function vmBench(): Promise<BenchRow[]> {
  return withScratchDir("vm", async (dir) => {
    const rows: BenchRow[] = [];
    rows.push(...(await runningCase(dir, 4 * GiB)));
    rows.push(...(await runningCase(dir, 64 * GiB)));
    rows.push(await deleteCase(dir, 64 * MiB));
    rows.push(await deleteCase(dir, 256 * MiB));
    return rows;
  });
}

if (import.meta.main) printRows("bench/vm.bench.ts", await vmBench());
