/**
 * End to end with a real Linux guest under QEMU (the guest kit's kernel
 * and busybox initramfs), driven through the daemon's HTTP API, following
 * the story of issue 6:
 *   1. start the VM and wait for its RAM counter;
 *   2. write a marker to its disk and take a live snapshot (with VM state);
 *   3. "reinstall": overwrite the whole disk from inside the guest;
 *   4. revert: the counter continues from its value at the snapshot, and
 *      the disk reads the marker again;
 *   5. more snapshots, a branch, delete the snapshot in the middle;
 *   5b. while it runs, QEMU's tools are kept out of its layers (image locks)
 *   6. qemu-img check on every layer, and every remaining snapshot's disk
 *      compared with what the guest wrote.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { openImage } from "../../src/chain/open-image.ts";
import { startDaemon } from "../../src/api/daemon.ts";
import { ApiClient } from "../../src/api/api-client.ts";
import { stepPath } from "../../src/vm/store/layer-steps.ts";
import { buildGuest, GuestConsole } from "../helpers/guest-kit.ts";
import { requireTools, run, runOk, scratchDir } from "../helpers/tools.ts";

const DISK_BYTES = 16 * 1024 * 1024;
const MiB = 1024 * 1024;

function marker(text: string): Buffer {
  const sector = Buffer.alloc(512);
  sector.write(text, "ascii");
  return sector;
}

test("VM story: live snapshot, reinstall, revert to the same instant, branches, delete in the middle", { timeout: 240_000 }, async (t) => {
  if (!requireTools(t, "qemu-system-x86_64", "qemu-img")) return;
  const guest = await buildGuest();
  const home = scratchDir(t, "ss-e2e-");
  const daemon = await startDaemon({ home });
  t.after(() => daemon.close());
  const api = new ApiClient(daemon.socketPath);
  const manager = daemon.manager;

  await api.request("POST", "/machines", { name: "vm", memoryBytes: 256 * MiB, diskSizeBytes: DISK_BYTES, kernel: guest.kernelPath, initrd: guest.initrdPath, append: guest.append });
  const consoleFor = (): GuestConsole => new GuestConsole(manager.serialLogPath("vm"), manager.serialSocketPath("vm"));
  const writeMarker = async (console: GuestConsole, text: string, offsetMiB: number): Promise<void> => {
    const result = await console.runCommand(`printf '${text}' | dd of=/dev/vda bs=512 seek=${offsetMiB * 2048} count=1 conv=sync,fsync 2>&1 && sync`);
    assert.equal(result.exitCode, 0, result.output.join("\n"));
  };
  const readMarker = async (console: GuestConsole, offsetMiB: number): Promise<string> => {
    const result = await console.runCommand(`dd if=/dev/vda bs=512 skip=${offsetMiB * 2048} count=1 2>/dev/null | head -c 16 | tr -d '\\000' | tr -c 'A-Za-z0-9-' '.'`);
    return result.output.join("");
  };

  // 1. Start and wait for the counter.
  await api.request("POST", "/machines/vm/start");
  let console = consoleFor();
  t.after(() => console.close());
  await console.waitFor(/^READY vda/m, { timeoutMs: 60_000 });
  await console.nextCounter({ timeoutMs: 30_000 });

  // 2. Marker, live snapshot with state.
  await writeMarker(console, "MARKER-ONE", 0);
  const beforeSnapshot = console.mark();
  const counterBeforeRequest = await console.nextCounter({ since: beforeSnapshot });
  const snap = await api.request<{ snapshot: { hasState: boolean }; timings: { pausedMs: number } }>("POST", "/machines/vm/snapshots", { snapshot: "s1", description: "with marker" });
  assert.equal(snap.snapshot.hasState, true);
  // The snapshot's instant lies between the request and the reply (the guest
  // may run on before the reply: a live save, or a resume before replying).
  const counterAtSnapshot = console.lastCounter(beforeSnapshot)!;
  t.diagnostic(`snapshot s1 between counters ${counterBeforeRequest} and ${counterAtSnapshot}, paused ${snap.timings.pausedMs.toFixed(1)} ms`);

  // 3. Reinstall: overwrite the whole disk.
  const wipe = await console.runCommand(`dd if=/dev/urandom of=/dev/vda bs=1M count=${DISK_BYTES / MiB} conv=fsync 2>/dev/null; sync; echo done`, { timeoutMs: 60_000 });
  assert.deepEqual(wipe.output, ["done"]);
  assert.notEqual(await readMarker(console, 0), "MARKER-ONE");
  const laterCounter = await console.nextCounter({ since: console.mark() });
  assert.ok(laterCounter > counterAtSnapshot + 2, `counter moved on (${laterCounter})`);

  // 4. Revert: the counter continues from the snapshot's value, the marker is back.
  console.close();
  const sinceRevert = console.mark();
  const reverted = await api.request<{ state: string; totalMs: number }>("POST", "/machines/vm/snapshots/s1/revert", {});
  assert.equal(reverted.state, "running");
  t.diagnostic(`revert to running in ${reverted.totalMs.toFixed(0)} ms`);
  console = consoleFor();
  const firstAfterRevert = await console.nextCounter({ since: sinceRevert, timeoutMs: 30_000 });
  assert.ok(firstAfterRevert >= counterBeforeRequest && firstAfterRevert <= counterAtSnapshot + 3, `counter after revert ${firstAfterRevert} continues from ${counterBeforeRequest}..${counterAtSnapshot} (not ${laterCounter})`);
  assert.equal(await readMarker(console, 0), "MARKER-ONE");

  // 5. More snapshots, a branch, delete the middle one.
  await writeMarker(console, "MARKER-TWO", 1);
  await api.request("POST", "/machines/vm/snapshots", { snapshot: "s2", diskOnly: true });
  await writeMarker(console, "MARKER-THREE", 2);
  await api.request("POST", "/machines/vm/snapshots", { snapshot: "s3", diskOnly: true });
  console.close();
  const sinceBoot = console.mark();
  await api.request("POST", "/machines/vm/snapshots/s2/revert", {}); // disk-only: boots from its disk
  console = consoleFor();
  await console.waitFor(/^READY vda/m, { since: sinceBoot, timeoutMs: 60_000 });
  assert.equal(await readMarker(console, 1), "MARKER-TWO");
  assert.equal(await readMarker(console, 2), "");
  await writeMarker(console, "MARKER-FOUR", 3);
  await api.request("POST", "/machines/vm/snapshots", { snapshot: "s4", diskOnly: true });
  const deleted = await api.request<{ mergedBytes: number; freedBytes: number }>("DELETE", "/machines/vm/snapshots/s2");
  t.diagnostic(`deleted s2 while running: merged ${deleted.mergedBytes}, freed ${deleted.freedBytes}`);
  assert.equal(await readMarker(console, 3), "MARKER-FOUR");
  const tree = await api.request<{ snapshots: Array<{ name: string; parent: string | null }> }>("GET", "/machines/vm/snapshots");
  assert.deepEqual(tree.snapshots.map((s) => [s.name, s.parent]), [["s1", null], ["s3", "s1"], ["s4", "s1"]]);

  // 5b. The running chain's layers carry QEMU's image locks: qemu-io may write none of them, and qemu-img
  // may not even read the top one without -U (as beside a running QEMU).
  const running = manager.store.loadTree("vm");
  const chainFiles: string[] = [];
  for (let layer: string | null = running.current.layer; layer !== null; layer = running.layers[layer].parent) {
    chainFiles.push(stepPath(manager.store.machineDir("vm"), running.layers[layer].file));
  }
  assert.ok(chainFiles.length >= 2, `a chain of layers (${chainFiles.length})`);
  for (const file of chainFiles) {
    const write = await run("qemu-io", ["-f", "qcow2", "-c", "write 0 512", file]);
    assert.match(write.stderr + write.stdout, /Failed to get "write" lock/, file);
  }
  assert.match((await run("qemu-img", ["info", chainFiles[0]])).stderr, /Failed to get shared "write" lock/);
  await runOk("qemu-img", ["info", "-U", chainFiles[0]]);

  // 6. Stop, check every layer, compare every snapshot's disk with what the guest wrote.
  console.close();
  await api.request("POST", "/machines/vm/stop", {});
  const store = manager.store;
  const treeRecord = store.loadTree("vm");
  assert.ok(Object.keys(treeRecord.layers).length <= Object.keys(treeRecord.snapshots).length + 1);
  for (const layer of Object.values(treeRecord.layers)) await runOk("qemu-img", ["check", stepPath(store.machineDir("vm"), layer.file)]);
  const expected: Record<string, Array<[number, string]>> = {
    s1: [[0, "MARKER-ONE"]],
    s3: [[0, "MARKER-ONE"], [1, "MARKER-TWO"], [2, "MARKER-THREE"]],
    s4: [[0, "MARKER-ONE"], [1, "MARKER-TWO"], [3, "MARKER-FOUR"]],
  };
  for (const snapshot of Object.values(treeRecord.snapshots)) {
    const want = Buffer.alloc(DISK_BYTES);
    for (const [offsetMiB, text] of expected[snapshot.name]) marker(text).copy(want, offsetMiB * MiB);
    const device = await openImage(stepPath(store.machineDir("vm"), treeRecord.layers[snapshot.layer].file), { readOnly: true });
    const got = Buffer.alloc(DISK_BYTES);
    await device.read(0, got);
    await device.close();
    assert.ok(got.equals(want), `snapshot ${snapshot.name}: disk is what the guest wrote`);
  }
});
