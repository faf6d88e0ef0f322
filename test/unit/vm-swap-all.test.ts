/**
 * swapAll moves every disk of a running machine onto its new device, or
 * none: a swap that fails (the old device's flush) moves the disks already
 * moved back, so a live snapshot never freezes only some of the disks.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { NbdExport } from "../../src/nbd/nbd-export.ts";
import { openRawImage } from "../../src/formats/raw/raw-image.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { swapAll, type ServedDisk } from "../../src/vm/manager/machine-manager.ts";
import type { BlockDevice } from "../../src/device/block-device.ts";

const SIZE = 65536;

async function device(name: string): Promise<BlockDevice> {
  return openRawImage(new MemoryFile({ name, contents: new Uint8Array(SIZE) }));
}

test("swapAll: all disks move, or none does when one disk's flush fails", async () => {
  for (const failing of [-1, 0, 1, 2]) {
    const olds = await Promise.all([0, 1, 2].map((disk) => device(`old${disk}`)));
    const news = await Promise.all([0, 1, 2].map((disk) => device(`new${disk}`)));
    if (failing >= 0) {
      olds[failing].flush = async () => {
        throw Object.assign(new Error("flush failed"), { code: "E_IO" });
      };
    }
    const disks: ServedDisk[] = olds.map((old, disk) => ({ export: new NbdExport({ name: `disk${disk}`, device: old }), held: [] }));
    if (failing < 0) {
      await swapAll({ disks }, news);
      assert.deepEqual(disks.map((served) => served.export.device), news);
      assert.deepEqual(disks.map((served) => served.held), olds.map((old) => [old]));
    } else {
      await assert.rejects(swapAll({ disks }, news), /flush failed/);
      assert.deepEqual(disks.map((served) => served.export.device), olds, `flush of disk ${failing} failed: every disk back on its old device`);
      assert.deepEqual(disks.map((served) => served.held), [[], [], []]);
    }
  }
});
