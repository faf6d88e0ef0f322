/**
 * listenUnixSocket (src/io/unix-listen.ts), shared by the NBD server, the
 * resident helper and the API daemon: a dead server's socket file is
 * replaced, a live one and any other file are refused, and ownerOnly makes
 * the socket 0600.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { linkSync, lstatSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createConnection, createServer, type Server } from "node:net";
import { join } from "node:path";
import { SnapstackError } from "../../src/base/errors.ts";
import { listenUnixSocket, someoneListens, type UnixListenFailure } from "../../src/io/unix-listen.ts";
import { scratchDir } from "../helpers/tools.ts";

const refusal = (failure: UnixListenFailure, error: NodeJS.ErrnoException): SnapstackError =>
  new SnapstackError("E_IO", `${failure}: ${error.code}`, { failure });

function closeLater(t: { after: (fn: () => void) => void }, server: Server): Server {
  t.after(() => server.close());
  return server;
}

function connects(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = createConnection(path, () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

test("a socket file left by a killed server is replaced; the new server answers on it", async (t) => {
  const path = join(scratchDir(t), "dead.sock");
  spawnSync(process.execPath, ["-e", `require("net").createServer().listen(${JSON.stringify(path)}, () => process.kill(process.pid, "SIGKILL"))`]);
  assert.ok(lstatSync(path).isSocket(), "the killed server left its socket file");
  assert.equal(someoneListens(path), "no");
  const server = closeLater(t, createServer((socket) => socket.end()));
  await listenUnixSocket(server, path, { ownerOnly: false, refusal });
  assert.equal(someoneListens(path), "yes");
  assert.equal(await connects(path), true);
});

test("a live server's socket is refused (in-use) and keeps serving; a regular file is refused (not-socket) and kept", async (t) => {
  const dir = scratchDir(t);
  const path = join(dir, "live.sock");
  const live = closeLater(t, createServer((socket) => socket.end()));
  await listenUnixSocket(live, path, { ownerOnly: false, refusal });
  const second = closeLater(t, createServer());
  await assert.rejects(listenUnixSocket(second, path, { ownerOnly: false, refusal }), (error: unknown) => error instanceof SnapstackError && error.details.failure === "in-use");
  assert.equal(await connects(path), true, "the live server still answers");

  const notes = join(dir, "notes.txt");
  writeFileSync(notes, "keep me");
  const third = closeLater(t, createServer());
  await assert.rejects(listenUnixSocket(third, notes, { ownerOnly: false, refusal }), (error: unknown) => error instanceof SnapstackError && error.details.failure === "not-socket");
  assert.equal(readFileSync(notes, "utf8"), "keep me");

  const fourth = closeLater(t, createServer());
  await assert.rejects(listenUnixSocket(fourth, join(dir, "no-such-dir", "x.sock"), { ownerOnly: false, refusal }), (error: unknown) => error instanceof SnapstackError && error.details.failure === "other");
});

test("ownerOnly: the socket is created 0600 and the process umask is restored", async (t) => {
  const path = join(scratchDir(t), "private.sock");
  const umaskBefore = process.umask();
  const server = closeLater(t, createServer());
  await listenUnixSocket(server, path, { ownerOnly: true, refusal });
  assert.equal(lstatSync(path).mode & 0o777, 0o600);
  assert.equal(process.umask(), umaskBefore);
});

test("a live server bound by a relative path from another directory: kept without a probe, settled by one", async (t) => {
  const dir = scratchDir(t);
  const path = join(dir, "rel.sock");
  // The other server binds "rel.sock" relative to its own working directory, as `snapstack nbd -k rel.sock` would.
  const child = spawn(process.execPath, ["-e", 'require("net").createServer().listen("rel.sock", () => console.log("up"))'], { cwd: dir, stdio: ["ignore", "pipe", "ignore"] });
  t.after(() => child.kill("SIGKILL"));
  await new Promise<void>((resolve) => child.stdout.once("data", () => resolve()));
  assert.equal(someoneListens(path), "maybe", "found by its name, though /proc/net/unix holds it relative");
  const server = closeLater(t, createServer());
  await assert.rejects(listenUnixSocket(server, path, { ownerOnly: false, refusal }), (error: unknown) => error instanceof SnapstackError && error.details.failure === "in-use");
  assert.ok(lstatSync(path).isSocket(), "the live server's socket file is kept");
  await assert.rejects(listenUnixSocket(server, path, { ownerOnly: false, refusal, probeByConnecting: true }), (error: unknown) => error instanceof SnapstackError && error.details.failure === "in-use");

  // A dead socket elsewhere with the same name: the probe finds it refused and replaces it.
  const other = join(scratchDir(t), "elsewhere");
  mkdirSync(other);
  const dead = join(other, "rel.sock");
  spawnSync(process.execPath, ["-e", `require("net").createServer().listen(${JSON.stringify(dead)}, () => process.kill(process.pid, "SIGKILL"))`]);
  assert.equal(someoneListens(dead), "maybe");
  const replacing = closeLater(t, createServer((socket) => socket.end()));
  await listenUnixSocket(replacing, dead, { ownerOnly: false, refusal, probeByConnecting: true });
  assert.equal(await connects(dead), true, "the new server answers on the replaced socket");
});

test("probeByConnecting: a socket that answers is in use even when the table does not list it", async (t) => {
  const path = join(scratchDir(t), "probe.sock");
  const live = closeLater(t, createServer((socket) => socket.end()));
  await listenUnixSocket(live, path, { ownerOnly: false, refusal });
  // Ask with a name the table cannot match (a hard link to the socket file): only the probe finds the server.
  const link = join(scratchDir(t), "link.sock");
  linkSync(path, link);
  assert.equal(someoneListens(link), "no");
  const second = closeLater(t, createServer());
  await assert.rejects(listenUnixSocket(second, link, { ownerOnly: false, refusal, probeByConnecting: true }), (error: unknown) => error instanceof SnapstackError && error.details.failure === "in-use");
});
