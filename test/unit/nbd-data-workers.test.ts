/**
 * DataWorkerPool's process management with stand-in workers (tiny Node
 * scripts speaking the pool's messages): start-up failures, replacement of
 * a worker that dies, no replacement of one that never got ready, close().
 * Real workers serving real clients: test/interop/nbd-workers.test.ts.
 */
import test from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { DataWorkerPool } from "../../src/nbd/data-workers.ts";
import { NbdExport } from "../../src/nbd/nbd-export.ts";
import { memoryDevice } from "./nbd-test-server.ts";

/** A stand-in worker: reports ready, then lives until the IPC channel closes. */
const READY_WORKER = `process.send({ type: "ready", rssBytes: process.memoryUsage.rss() }); process.on("disconnect", () => process.exit(0));`;
/** A stand-in worker that fails before it is ready (an image it cannot open). */
const FAILING_WORKER = `process.send({ type: "error", message: "cannot open" }); process.exit(1);`;

function nodeWorker(script: string): ChildProcess {
  return spawn(process.execPath, ["-e", script], { stdio: ["ignore", "ignore", "inherit", "ipc"] });
}

function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once("exit", () => resolve()));
}

const exp = new NbdExport({ name: "disk", device: memoryDevice(1024 * 1024), readOnly: true });

test("a ready worker that dies is replaced; close() ends every worker", async () => {
  const children: ChildProcess[] = [];
  const pool = new DataWorkerPool({ exportName: "disk", count: 2, spawnWorker: () => children[children.push(nodeWorker(READY_WORKER)) - 1] });
  await pool.start();
  assert.equal(pool.readyCount, 2);
  assert.ok(pool.canTake(exp));
  assert.ok(!pool.canTake(new NbdExport({ name: "other", device: memoryDevice(4096) })), "only the pool's export");
  const replaced = new Promise((resolve) => pool.once("worker-ready", resolve));
  children[0].kill("SIGKILL");
  await replaced;
  assert.equal(children.length, 3, "one replacement started");
  assert.equal(pool.readyCount, 2);
  await pool.close();
  await Promise.all(children.map(exited));
  assert.ok(!pool.canTake(exp), "a closed pool takes nothing");
});

test("a worker that fails before it is ready is not replaced, and one that cannot start does not hang start()", async () => {
  let spawned = 0;
  const failing = new DataWorkerPool({
    exportName: "disk",
    count: 1,
    spawnWorker: () => {
      spawned++;
      return nodeWorker(FAILING_WORKER);
    },
  });
  await failing.start();
  assert.equal(failing.readyCount, 0);
  assert.equal(spawned, 1);
  assert.ok(!failing.canTake(exp), "no worker: connections stay in the main process");
  await failing.close();

  const missing = new DataWorkerPool({ exportName: "disk", count: 2, spawnWorker: () => spawn("/nonexistent/snapstack-worker", [], { stdio: ["ignore", "ignore", "ignore", "ipc"] }) });
  await missing.start();
  assert.equal(missing.readyCount, 0);
  await missing.close();
});
