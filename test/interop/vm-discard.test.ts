/**
 * A guest's discards reach the machine's disk layers and free their space:
 * QEMU's nbd blockdev passes them on (discard=unmap), the machine's export
 * takes TRIM, and the qcow2 engine punches the clusters it frees (the
 * native addon) at the next FLUSH. The guest writes 8 MiB, blkdiscard's
 * half of it away and fsyncs a sector; the layers' files then occupy at
 * least 3 MiB less, and the discarded range reads as zeroes in the guest.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { startDaemon } from "../../src/api/daemon.ts";
import { ApiClient } from "../../src/api/api-client.ts";
import { buildGuest, GuestConsole } from "../helpers/guest-kit.ts";
import { requireNativeFileOps, requireTools, scratchDir } from "../helpers/tools.ts";

const MiB = 1024 * 1024;

/** Bytes the machine's qcow2 files occupy on the host (st_blocks), all layers together. */
function layerBlocksBytes(dir: string): number {
  let total = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile() && entry.name.endsWith(".qcow2")) total += statSync(join(entry.parentPath, entry.name)).blocks * 512;
  }
  return total;
}

test("guest blkdiscard frees the space in the machine's top layer", { timeout: 180_000 }, async (t) => {
  if (!requireTools(t, "qemu-system-x86_64", "qemu-img") || !requireNativeFileOps(t)) return;
  const guest = await buildGuest();
  const home = scratchDir(t, "ss-discard-");
  const daemon = await startDaemon({ home });
  t.after(() => daemon.close());
  const api = new ApiClient(daemon.socketPath);
  await api.request("POST", "/machines", { name: "vm", memoryBytes: 128 * MiB, diskSizeBytes: 32 * MiB, kernel: guest.kernelPath, initrd: guest.initrdPath, append: guest.append });
  await api.request("POST", "/machines/vm/start");
  const console = new GuestConsole(daemon.manager.serialLogPath("vm"), daemon.manager.serialSocketPath("vm"));
  t.after(() => console.close());
  await console.waitFor(/^READY vda/m, { timeoutMs: 60_000 });
  const written = await console.runCommand("dd if=/dev/urandom of=/dev/vda bs=1M count=8 conv=fsync 2>/dev/null; sync; echo done", { timeoutMs: 60_000 });
  assert.deepEqual(written.output, ["done"]);
  const machineDir = join(home, "machines", "vm");
  const before = layerBlocksBytes(machineDir);
  // A sector rewritten with fsync afterwards: the FLUSH that makes snapstack punch the freed clusters.
  const discarded = await console.runCommand("blkdiscard -o 0 -l 4194304 /dev/vda && dd if=/dev/vda of=/dev/vda bs=512 count=1 skip=16384 seek=16384 conv=fsync,notrunc 2>/dev/null && echo done", { timeoutMs: 60_000 });
  assert.deepEqual(discarded.output, ["done"], discarded.output.join("\n"));
  const zeroes = await console.runCommand("dd if=/dev/vda bs=1M count=4 2>/dev/null | tr -d '\\000' | wc -c", { timeoutMs: 60_000 });
  assert.deepEqual(zeroes.output, ["0"], "the discarded range reads as zeroes");
  const after = layerBlocksBytes(machineDir);
  t.diagnostic(`layers occupy ${(before / MiB).toFixed(1)} MiB before the discard, ${(after / MiB).toFixed(1)} MiB after`);
  assert.ok(after <= before - 3 * MiB, `${before} -> ${after} bytes`);
  await api.request("POST", "/machines/vm/stop", {});
});
