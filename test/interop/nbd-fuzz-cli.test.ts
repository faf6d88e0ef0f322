/**
 * The NBD fuzzer (test/helpers/nbd-fuzz.ts) against `snapstack nbd`
 * processes, as users run them: a qcow2 image (-A), a raw file and a raw file
 * served read-only (-r), each persistent with unlimited clients (-t -e 0),
 * so the raw exports' connections move to data worker processes. Between
 * cases every server must still run and no data worker may have died (a
 * worker that dies is replaced, which would hide a crash).
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { exportModel, runNbdFuzz, type ExportModel, type FuzzTarget } from "../helpers/nbd-fuzz.ts";
import { runOk, scratchDir } from "../helpers/tools.ts";
import { RawNbdClient } from "../unit/nbd-raw-client.ts";
import { patternAt } from "../unit/nbd-test-server.ts";
import { SNAPSTACK_BIN, startNbd, type RunningServer } from "./nbd-helpers.ts";

const MiB = 1024 * 1024;

function childPids(pid: number): number[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

async function processTarget(t: TestContext): Promise<FuzzTarget> {
  const dir = scratchDir(t, "snapstack-nbd-fuzz-");
  const qcow2Path = join(dir, "fuzz.qcow2");
  await runOk(process.execPath, [SNAPSTACK_BIN, "img", "create", "-q", "-f", "qcow2", qcow2Path, "4M"]);
  const rawBytes = 2 * MiB + 512;
  const rawPath = join(dir, "fuzz.raw");
  writeFileSync(rawPath, patternAt(0, rawBytes));
  const readOnlyPath = join(dir, "fuzz-ro.raw");
  writeFileSync(readOnlyPath, patternAt(0, MiB));
  const servers = new Map<string, RunningServer>();
  const serve = async (name: string, image: string, args: string[]): Promise<void> => {
    servers.set(name, await startNbd(t, "snapstack", dir, image, { exportName: name, args: ["-t", "-e", "0", ...args] }));
  };
  await serve("", qcow2Path, ["-f", "qcow2", "-A"]);
  await serve("raw", rawPath, ["-f", "raw"]);
  await serve("ro", readOnlyPath, ["-f", "raw", "-r"]);
  const models: ExportModel[] = [exportModel("", new Uint8Array(4 * MiB), false), exportModel("raw", new Uint8Array(patternAt(0, rawBytes)), false), exportModel("ro", new Uint8Array(patternAt(0, MiB)), true)];
  /** Data worker pids seen so far, per export's server. */
  const workersSeen = new Map<string, Set<number>>();
  return {
    models,
    connect: (name) => RawNbdClient.connect({ path: servers.get(name)!.socketPath! }),
    servedWith: (name) => models.filter((model) => model.name === name),
    async checkHealthy() {
      for (const [name, server] of servers) {
        assert.equal(server.process.exitCode ?? server.process.signalCode, null, `the server of export ${JSON.stringify(name)} exited: ${server.stderr()}`);
        const workers = childPids(server.process.pid!);
        const seen = workersSeen.get(name) ?? new Set<number>();
        for (const worker of seen) assert.ok(workers.includes(worker), `data worker ${worker} of export ${JSON.stringify(name)} died: ${server.stderr()}`);
        for (const worker of workers) seen.add(worker);
        workersSeen.set(name, seen);
      }
    },
  };
}

for (const kind of ["negotiation", "transmission"] as const) {
  test(`nbd fuzz, snapstack nbd processes with data workers: random ${kind} never crashes, hangs or wedges a server (seeded)`, async (t) => {
    await runNbdFuzz(t, kind, await processTarget(t));
  });
}
