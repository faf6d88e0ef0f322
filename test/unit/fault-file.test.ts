// FaultFile's writeSync (what the engine uses on NodeFile) injects the same
// faults, crash and log as its asynchronous write.
import { test } from "node:test";
import assert from "node:assert/strict";
import { CrashReplay, FaultFile } from "../../src/io/fault-file.ts";
import { isSnapstackError } from "../../src/base/errors.ts";

function errorCode(fn: () => void): string | null {
  try {
    fn();
    return null;
  } catch (error) {
    return isSnapstackError(error) ? error.code : "not a SnapstackError";
  }
}

test("FaultFile.writeSync: planned faults fail without effect, a crash lands then kills the file, every write is logged", async () => {
  const file = await FaultFile.fromBytes(new Uint8Array(4096), { recordLog: true, faults: [{ op: "write", index: 2, code: "E_NO_SPACE" }], crashAtWrite: 4 });
  assert.ok(file.writeSync !== undefined, "offered over a MemoryFile");
  file.writeSync(0, new Uint8Array([1, 1]));
  assert.equal(errorCode(() => file.writeSync?.(2, new Uint8Array([2, 2]))), "E_NO_SPACE");
  await file.write(4, new Uint8Array([3, 3]));
  assert.equal(errorCode(() => file.writeSync?.(6, new Uint8Array([4, 4]))), "E_IO", "the crash write throws");
  assert.equal(errorCode(() => file.writeSync?.(8, new Uint8Array([5]))), "E_IO", "the file is dead");
  assert.equal(file.writeCount, 4, "calls up to the crash (a dead file counts no more)");
  assert.deepEqual(
    (file.log ?? []).map((op) => (op.kind === "write" ? [op.hostOffset, ...op.data] : [op.kind])),
    [[0, 1, 1], [4, 3, 3], [6, 4, 4]],
    "the failed write is not logged; the crash write is (it may have landed)",
  );
  // Nothing was flushed: a crash after every logged write keeps a subset of them, never the faulted one.
  const replay = new CrashReplay(new Uint8Array(4096), file.log ?? []);
  const crashed = replay.crashAt(3, Math.random);
  assert.deepEqual([...crashed.subarray(2, 4)], [0, 0]);
});

test("FaultFile writeSync: false hides it (the engine's asynchronous-only path)", async () => {
  const file = await FaultFile.fromBytes(new Uint8Array(16), { writeSync: false });
  assert.equal(file.writeSync, undefined);
  await file.write(0, new Uint8Array([7]));
  const back = new Uint8Array(1);
  await file.read(0, back);
  assert.equal(back[0], 7);
});
