/**
 * The daemon's API boundary (src/api): who can connect (Unix socket 0600
 * in a directory nobody else can write; TCP only on 127.0.0.1 and only
 * with the bearer token), one daemon per store (daemon.lock), errors as
 * coded JSON with their HTTP status, and progress events streamed during
 * long operations. No QEMU needed: stopped machines only.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import net from "node:net";
import { networkInterfaces } from "node:os";
import { spawn } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { openImage } from "../../src/chain/open-image.ts";
import { startDaemon } from "../../src/api/daemon.ts";
import { ApiClient } from "../../src/api/api-client.ts";
import { MachineStore } from "../../src/vm/store/machine-store.ts";
import type { JobProgress } from "../../src/chain/jobs/index.ts";
import { run, scratchDir, type RunResult } from "../helpers/tools.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { killChild, layerPath, processAlive, readSnapshotDisk, scratchStore, sleep, SNAPSTACK_BIN, stopDaemonOf, vmCli, vmTestEnv } from "../helpers/vm-daemon.ts";

const MiB = 1024 * 1024;

interface Answer {
  status: number;
  contentType: string;
  body: string;
}

function request(target: { socketPath: string } | { port: number }, method: string, path: string, options: { headers?: Record<string, string>; body?: string } = {}): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const where = "socketPath" in target ? { socketPath: target.socketPath } : { host: "127.0.0.1", port: target.port };
    const req = http.request({ ...where, method, path, headers: options.headers }, (response) => {
      let body = "";
      response.setEncoding("utf8");
      response.on("data", (chunk: string) => (body += chunk));
      response.on("end", () => resolve({ status: response.statusCode ?? 0, contentType: String(response.headers["content-type"]), body }));
    });
    req.on("error", reject);
    req.end(options.body);
  });
}

/** `snapstack serve ARGS` run to its end (for arguments it refuses). */
function serveCli(args: string[]): Promise<RunResult> {
  return run(process.execPath, [SNAPSTACK_BIN, "serve", ...args], { env: vmTestEnv(), timeoutMs: 60_000 });
}

function errorOf(answer: Answer): { code: string; message: string } {
  return (JSON.parse(answer.body) as { error: { code: string; message: string } }).error;
}

/** Write random data at [startOffset, +bytes) of the current disk of a stopped machine. */
async function scribble(home: string, name: string, random: ReturnType<typeof createRandom>, startOffset: number, bytes: number): Promise<void> {
  const store = new MachineStore(home);
  const device = await openImage(layerPath(home, name, store.loadTree(name).current.layer));
  try {
    for (let offset = startOffset; offset < startOffset + bytes; offset += MiB) await device.write(offset, random.bytes(MiB));
    await device.flush();
  } finally {
    await device.close();
  }
}

test("API access: socket 0600 in a private directory, TCP only on 127.0.0.1 with the bearer token", async (t) => {
  const home = join(scratchDir(t, "ss-api-"), "store");
  const daemon = await startDaemon({ home, tcpPort: 0 });
  t.after(() => daemon.close());

  // The Unix socket: this user only, in a directory nobody else can write.
  assert.equal(statSync(daemon.socketPath).mode & 0o777, 0o600);
  assert.ok(statSync(daemon.socketPath).isSocket());
  assert.equal(statSync(home).mode & 0o022, 0, "the store is not writable by group or others");
  assert.equal(statSync(join(home, "api-token")).mode & 0o777, 0o600);
  assert.equal(statSync(join(home, "daemon.lock")).mode & 0o777, 0o600);
  const viaSocket = await request({ socketPath: daemon.socketPath }, "GET", "/v1/health");
  assert.equal(viaSocket.status, 200, "no token needed on the Unix socket");
  assert.equal((JSON.parse(viaSocket.body) as { home: string }).home, home);

  // TCP: 127.0.0.1 only, and the token is required.
  const port = daemon.tcpPort!;
  const token = readFileSync(join(home, "api-token"), "utf8").trim();
  assert.equal(daemon.token, token);
  assert.ok(token.length >= 32, "a long random token");
  const others = Object.values(networkInterfaces())
    .flat()
    .filter((address) => address !== undefined && !address.internal && address.family === "IPv4")
    .map((address) => address!.address);
  for (const address of others) {
    const refused = await new Promise<string>((resolve) => {
      const socket = net.connect({ host: address, port }, () => {
        socket.destroy();
        resolve("connected");
      });
      socket.on("error", (error: NodeJS.ErrnoException) => resolve(error.code ?? "error"));
    });
    assert.notEqual(refused, "connected", `not listening on ${address}`);
  }
  const health = "/v1/health";
  const wrongHeaders: Array<Record<string, string>> = [{}, { authorization: "Bearer wrong" }, { authorization: `Bearer ${token}x` }, { authorization: `Basic ${token}` }, { authorization: token }];
  for (const headers of wrongHeaders) {
    const denied = await request({ port }, "GET", health, { headers });
    assert.equal(denied.status, 401, JSON.stringify(headers));
    assert.equal(errorOf(denied).code, "E_ACCESS");
  }
  const deniedCreate = await request({ port }, "POST", "/v1/machines", { headers: { "content-type": "application/json" }, body: JSON.stringify({ name: "sneaky", diskSizeBytes: MiB }) });
  assert.equal(deniedCreate.status, 401);
  assert.deepEqual(readdirSync(join(home, "machines")), [], "a refused request changes nothing");
  const allowed = await request({ port }, "GET", health, { headers: { authorization: `Bearer ${token}` } });
  assert.equal(allowed.status, 200);
  const created = await request({ port }, "POST", "/v1/machines", { headers: { authorization: `Bearer ${token}` }, body: JSON.stringify({ name: "m", diskSizeBytes: MiB }) });
  assert.equal(created.status, 200, created.body);

  // A second daemon on the same store refuses to start.
  await assert.rejects(startDaemon({ home }), (error: Error & { code?: string }) => error.code === "E_IN_USE");
});

test("API errors: coded JSON with the HTTP status; names, paths and queries validated at the edge", async (t) => {
  const home = join(scratchDir(t, "ss-api-"), "store");
  const daemon = await startDaemon({ home });
  t.after(() => daemon.close());
  const socket = { socketPath: daemon.socketPath };
  const json = { "content-type": "application/json" };
  assert.equal((await request(socket, "POST", "/v1/machines", { headers: json, body: JSON.stringify({ name: "m", diskSizeBytes: 4 * MiB }) })).status, 200);
  const cases: Array<[string, string, string | undefined, number, string]> = [
    ["GET", "/v1/machines/nope", undefined, 404, "E_NOT_FOUND"],
    ["GET", "/v1/machines/m/snapshots/nope/revert", undefined, 405, "E_USAGE"],
    ["POST", "/v1/machines/m/snapshots/nope/revert", "{}", 404, "E_SNAPSHOT_NOT_FOUND"],
    ["GET", "/v1/nothing-here", undefined, 404, "E_NOT_FOUND"],
    ["PUT", "/v1/machines", "{}", 405, "E_USAGE"],
    ["POST", "/v1/machines", "{not json", 400, "E_USAGE"],
    ["POST", "/v1/machines", "[1,2]", 400, "E_USAGE"],
    ["POST", "/v1/machines", JSON.stringify({ name: "x", diskSizeBytes: "big" }), 400, "E_USAGE"],
    ["POST", "/v1/machines", JSON.stringify({ name: "x", diskSizeBytes: MiB, extraArgs: "-S" }), 400, "E_USAGE"],
    ["POST", "/v1/machines", JSON.stringify({ name: "a/b", diskSizeBytes: MiB }), 400, "E_USAGE"],
    ["POST", "/v1/machines", JSON.stringify({ name: "..", diskSizeBytes: MiB }), 400, "E_USAGE"],
    ["POST", "/v1/machines", JSON.stringify({ name: "tab\there", diskSizeBytes: MiB }), 400, "E_USAGE"],
    ["POST", "/v1/machines", JSON.stringify({ name: "m", diskSizeBytes: MiB }), 409, "E_EXISTS"],
    ["POST", "/v1/machines", "x".repeat(1024 * 1024 + 1), 400, "E_USAGE"],
    ["GET", "/v1/machines/..%2F..%2Fetc", undefined, 400, "E_USAGE"],
    ["GET", "/v1/machines/%E0%A4%A", undefined, 400, "E_USAGE"],
    ["GET", "/v1/machines/m/log?bytes=abc", undefined, 400, "E_USAGE"],
    ["GET", "/v1/machines/m/log?bytes=-1", undefined, 400, "E_USAGE"],
    ["GET", "/v1/machines/m/diff?from=a", undefined, 400, "E_USAGE"],
    ["POST", "/v1/machines/m/snapshots", JSON.stringify({ snapshot: "a\u0000b" }), 400, "E_USAGE"],
    ["POST", "/v1/machines/m/snapshots", JSON.stringify({}), 400, "E_USAGE"],
    ["POST", "/v1/machines/m/stop", "{}", 400, "E_USAGE"],
    // Dot segments would be resolved by the URL parser: /snapshots/.. reached DELETE /machines/m.
    ["DELETE", "/v1/machines/m/snapshots/..", undefined, 400, "E_USAGE"],
    ["DELETE", "/v1/machines/m/snapshots/%2e%2E?wipe=1", undefined, 400, "E_USAGE"],
    ["DELETE", "/v1/machines/m/snapshots/.%2e/", undefined, 400, "E_USAGE"],
    ["DELETE", "/v1/machines/m/snapshots/x/..", undefined, 400, "E_USAGE"],
    ["POST", "/v1/machines/m/./start", "{}", 400, "E_USAGE"],
    ["POST", "/v1/machines", JSON.stringify({ name: ".hidden", diskSizeBytes: MiB }), 400, "E_USAGE"],
    // Built-in object keys are not snapshot ids.
    ["DELETE", "/v1/machines/m/snapshots/constructor", undefined, 404, "E_SNAPSHOT_NOT_FOUND"],
    ["DELETE", "/v1/machines/m/snapshots/__proto__", undefined, 404, "E_SNAPSHOT_NOT_FOUND"],
    ["POST", "/v1/machines/m/snapshots/toString/revert", "{}", 404, "E_SNAPSHOT_NOT_FOUND"],
    ["GET", "/v1/machines/m/diff?from=valueOf&to=current", undefined, 404, "E_SNAPSHOT_NOT_FOUND"],
  ];
  for (const [method, path, body, status, code] of cases) {
    const answer = await request(socket, method, path, { headers: body === undefined ? {} : json, body });
    assert.equal(answer.status, status, `${method} ${path}: ${answer.body}`);
    assert.equal(answer.contentType, "application/json");
    const error = errorOf(answer);
    assert.equal(error.code, code, `${method} ${path}: ${error.message}`);
    assert.ok(error.message.length > 0 && !error.message.includes("\n    at "), "a message, not a stack");
  }
  assert.equal((await request(socket, "GET", "/v1/machines/m/log?bytes=10")).status, 200);
  assert.deepEqual(readdirSync(join(home, "machines")), ["m"], "no bad request created or removed anything");
  // Nothing was left half done either: the machine still takes operations (a journal would refuse them).
  assert.equal((await request(socket, "POST", "/v1/machines/m/snapshots", { headers: json, body: JSON.stringify({ snapshot: "after" }) })).status, 200);
  assert.equal((await request(socket, "DELETE", "/v1/machines/m/snapshots/after")).status, 200);
});

test("API progress: long operations stream NDJSON progress events, then the result or the error", async (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (SNAPSTACK_SEED=${seed} to replay)`);
  const random = createRandom(seed);
  const home = join(scratchDir(t, "ss-api-"), "store");
  const daemon = await startDaemon({ home });
  t.after(() => daemon.close());
  const api = new ApiClient(daemon.socketPath);
  const DISK = 64 * MiB;
  await api.request("POST", "/machines", { name: "m", diskSizeBytes: DISK });
  await scribble(home, "m", random, 0, 16 * MiB);
  await api.request("POST", "/machines/m/snapshots", { snapshot: "a" });
  await scribble(home, "m", random, 32 * MiB, 24 * MiB);
  await api.request("POST", "/machines/m/snapshots", { snapshot: "b" });
  const bDisk = await readSnapshotDisk(home, "m", "b");

  // Raw NDJSON: progress lines, then exactly one result line.
  const answer = await request({ socketPath: daemon.socketPath }, "GET", "/v1/machines/m/diff?from=a&to=b", { headers: { accept: "application/x-ndjson" } });
  assert.equal(answer.status, 200);
  assert.equal(answer.contentType, "application/x-ndjson");
  const events = answer.body.trimEnd().split("\n").map((line) => JSON.parse(line) as { event: string } & JobProgress & { result?: { changedBytes: number } });
  const progress = events.filter((event) => event.event === "progress");
  assert.ok(progress.length >= 2, `progress events: ${progress.length}`);
  for (const event of progress) {
    assert.equal(typeof event.job, "string");
    assert.equal(typeof event.phase, "string");
    assert.ok(event.fraction >= 0 && event.fraction <= 1 && event.doneBytes <= event.totalBytes);
  }
  assert.ok(progress.every((event, index) => index === 0 || event.fraction >= progress[index - 1].fraction), "never backwards");
  assert.ok(progress.length <= 101 * new Set(progress.map((event) => `${event.job}/${event.phase}`)).size, "at most one event per percent and phase");
  assert.deepEqual(events.slice(progress.length).map((event) => event.event), ["result"]);
  assert.ok(events.at(-1)!.result!.changedBytes > 0);

  // Deleting a's snapshot merges its data: progress through the client, then the result.
  const seen: JobProgress[] = [];
  const deleted = await api.request<{ mergedBytes: number; freedBytes: number }>("DELETE", "/machines/m/snapshots/a", undefined, (event) => seen.push(event));
  assert.ok(seen.length > 0, "progress reached the client");
  assert.equal(seen.at(-1)!.fraction, 1);
  assert.ok(deleted.mergedBytes > 0 && deleted.freedBytes > 0, JSON.stringify(deleted));
  assert.ok((await readSnapshotDisk(home, "m", "b")).equals(bDisk), "b's disk is intact after the merge");

  // An error during a streamed request: an error event with the code.
  const failed = await request({ socketPath: daemon.socketPath }, "DELETE", "/v1/machines/m/snapshots/a", { headers: { accept: "application/x-ndjson" } });
  const last = JSON.parse(failed.body.trimEnd().split("\n").at(-1)!) as { event: string; error: { code: string } };
  assert.equal(last.event, "error");
  assert.equal(last.error.code, "E_SNAPSHOT_NOT_FOUND");
  await assert.rejects(api.request("DELETE", "/machines/m/snapshots/a", undefined, () => {}), (error: Error & { code?: string }) => error.code === "E_SNAPSHOT_NOT_FOUND");
});

test("one daemon per store: CLIs starting daemons at once get one; a stale lock is broken; a store others can write is refused", async (t) => {
  const home = scratchStore(t, "ss-api-");
  const dir = join(home, "..");
  const clients = await Promise.all([0, 1, 2, 3].map(() => vmCli(["list", "--home", home])));
  for (const client of clients) assert.equal(client.code, 0, client.stderr);
  const daemonPid = Number(readFileSync(join(home, "daemon.pid"), "utf8"));
  assert.ok(processAlive(daemonPid));
  assert.equal(readFileSync(join(home, "daemon.lock"), "utf8").split(" ")[0], String(daemonPid), "the answering daemon holds the lock");
  const serving = (): string[] =>
    readdirSync("/proc")
      .filter((entry) => /^\d+$/.test(entry) && processAlive(Number(entry)))
      .filter((entry) => {
        try {
          return readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0").join(" ").includes(`serve --home ${home}`);
        } catch {
          return false;
        }
      });
  // The daemons started by the other clients find the store taken and exit.
  for (let tries = 0; serving().length > 1 && tries < 300; tries++) await sleep(50);
  assert.deepEqual(serving(), [String(daemonPid)], "exactly one daemon serves the store");
  await stopDaemonOf(home);

  // A lock left by a daemon that is gone (a pid that is not running) does not block the next one.
  writeFileSync(join(home, "daemon.lock"), "999999999 12345\n");
  const daemon = await startDaemon({ home });
  await daemon.close();

  // Group- or world-writable store: daemon and CLI refuse, naming the fix.
  const open = join(dir, "open");
  mkdirSync(open);
  chmodSync(open, 0o777);
  await assert.rejects(startDaemon({ home: open }), (error: Error & { code?: string }) => error.code === "E_ACCESS" && /chmod go-w/.test(error.message));
  const cli = await vmCli(["list", "--home", open], vmTestEnv());
  assert.equal(cli.code, 1);
  assert.match(cli.stderr, /^snapstack: error E_ACCESS: .*writable by others.*\n$/);
});

test("snapstack serve: --listen-tcp serves 127.0.0.1 with the token; no TCP unless asked; SIGTERM shuts down cleanly", async (t) => {
  const home = join(scratchDir(t, "ss-api-"), "store");
  const badPort = await serveCli(["--listen-tcp", "http", "--home", home]);
  assert.equal(badPort.code, 1);
  assert.match(badPort.stderr, /^snapstack: error E_USAGE: --listen-tcp http: not a port number/);
  for (const port of ["", "-1", "65536", "1e3"]) assert.equal((await serveCli(["--listen-tcp", port, "--home", home])).code, 1, `--listen-tcp '${port}'`);

  const child = spawn(process.execPath, [SNAPSTACK_BIN, "serve", "--home", home, "--listen-tcp", "0"], { stdio: ["ignore", "ignore", "pipe"], env: vmTestEnv() });
  t.after(() => killChild(child));
  let stderr = "";
  child.stderr!.on("data", (chunk) => (stderr += chunk));
  for (let tries = 0; !/127\.0\.0\.1:\d+/.test(stderr) && tries < 1200; tries++) {
    assert.equal(child.exitCode, null, stderr);
    await sleep(25);
  }
  const port = Number(/127\.0\.0\.1:(\d+)/.exec(stderr)![1]);
  const taken = await serveCli(["--listen-tcp", String(port), "--home", join(scratchDir(t, "ss-api-"), "other")]);
  assert.equal(taken.code, 1);
  assert.match(taken.stderr, /^snapstack: error E_IN_USE: 127\.0\.0\.1:\d+ is already in use/);
  const token = readFileSync(join(home, "api-token"), "utf8").trim();
  assert.equal((await request({ port }, "GET", "/v1/health")).status, 401);
  assert.equal((await request({ port }, "GET", "/v1/health", { headers: { authorization: `Bearer ${token}` } })).status, 200);
  const api = new ApiClient(join(home, "daemon.sock"));
  await api.request("POST", "/machines", { name: "m", diskSizeBytes: MiB });

  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  child.kill("SIGTERM");
  assert.equal(await exited, 0, stderr);
  for (const file of ["daemon.sock", "daemon.pid", "daemon.lock"]) assert.equal(existsSync(join(home, file)), false, `${file} removed at shutdown`);
  assert.equal(new MachineStore(home).has("m"), true);

  // Without --listen-tcp: no TCP listener, no token.
  const plain = join(scratchDir(t, "ss-api-"), "store");
  const daemon = await startDaemon({ home: plain });
  t.after(() => daemon.close());
  assert.equal(daemon.tcpPort, null);
  assert.equal(daemon.token, null);
  assert.equal(existsSync(join(plain, "api-token")), false);
});

test("a store whose socket path is too long for a socket address: the API socket goes to a private directory in /tmp", async (t) => {
  const home = scratchStore(t, "ss-api-", [], "a-store-with-a-long-name-".repeat(5));
  assert.ok(Buffer.byteLength(join(home, "daemon.sock")) > 107);
  const listed = await vmCli(["list", "--output=json", "--home", home]);
  assert.equal(listed.code, 0, listed.stderr);
  assert.deepEqual(JSON.parse(listed.stdout), []);
  const created = await vmCli(["create", "m", "--disk", "1M", "--home", home]);
  assert.equal(created.code, 0, created.stderr);
  const socketPath = /serving .* on (\/\S+\.sock)\n/.exec(readFileSync(join(home, "daemon.log"), "utf8"))![1];
  assert.ok(Buffer.byteLength(socketPath) <= 107);
  assert.equal(statSync(socketPath).mode & 0o777, 0o600);
  assert.equal(statSync(join(socketPath, "..")).mode & 0o077, 0, "its directory is private");
  assert.equal((await new ApiClient(socketPath).request<Array<{ name: string }>>("GET", "/machines")).map((m) => m.name).join(), "m");
});
