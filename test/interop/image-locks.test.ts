/**
 * QEMU's image locks, taken by snapstack (src/io/qemu-locks.ts): the bytes
 * `snapstack nbd` locks on an overlay and its backing file equal qemu-nbd's
 * (read-write, -r), so qemu-img and qemu-io refuse what they refuse beside
 * qemu-nbd; a second snapstack process is refused as a second qemu-img is,
 * the refused image untouched; opens in one process share one set of locks
 * that lasts as long as some open does.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, existsSync, readdirSync, readFileSync, readlinkSync } from "node:fs";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { fileKey } from "../../src/io/file-identity.ts";
import { nativeFileOpsLoaded } from "../../src/io/native-file-ops.ts";
import { parseProcLocks } from "../../src/io/qemu-locks.ts";
import { openImage } from "../../src/chain/open-image.ts";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { assertCodedError, assertUnchanged, ok, qemuImg, qemuIo, snapshotFiles, snapstack } from "./cli-helpers.ts";
import { SNAPSTACK_BIN, startNbd, waitExit, type RunningServer } from "./nbd-helpers.ts";

/** The bytes of `path` some process holds a lock on now, ascending (read fresh from /proc/locks). */
function lockedBytes(path: string): number[] {
  const ranges = parseProcLocks(readFileSync("/proc/locks", "utf8")).get(fileKey(path) ?? "") ?? [];
  const bytes = new Set<number>();
  for (const [first, last] of ranges) for (let byte = first; byte <= Math.min(last, 1023); byte++) bytes.add(byte);
  return [...bytes].sort((a, b) => a - b);
}

async function stop(server: RunningServer): Promise<void> {
  server.process.kill("SIGTERM");
  assert.equal(await waitExit(server.process), 0, server.stderr());
}

/** base.qcow2 (64 KiB of 0xab at 0) under top.qcow2, made by qemu-img. */
async function chain(dir: string): Promise<{ base: string; top: string }> {
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "base.qcow2", "4M"], dir), "base");
  ok(await qemuIo(["-c", "write -q -P 0xab 0 64k", "base.qcow2"], dir), "base data");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"], dir), "overlay");
  return { base: join(dir, "base.qcow2"), top: join(dir, "top.qcow2") };
}

function requireLocks(t: Parameters<typeof requireTools>[0]): boolean {
  if (process.env.CI !== "true" && !nativeFileOpsLoaded()) {
    t.skip("snapstack takes image locks through its native addon, which is not built here (a C compiler and Node's headers: npm run build)");
    return false;
  }
  assert.ok(nativeFileOpsLoaded(), "CI builds the native addon");
  return true;
}

test("snapstack nbd locks the bytes qemu-nbd locks on a raw file, read-write and -r; qemu-img resize is refused beside both", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-nbd") || !requireLocks(t)) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "raw", "disk.raw", "4M"], dir), "raw");
  const raw = join(dir, "disk.raw");
  for (const readOnly of [false, true]) {
    const held: Record<string, number[]> = {};
    for (const which of ["qemu-nbd", "snapstack"] as const) {
      const server = await startNbd(t, which, dir, raw, { args: ["-f", "raw", ...(readOnly ? ["-r"] : [])] });
      held[which] = lockedBytes(raw);
      // A raw file's users share writing: qemu-img reads it beside the server; resizing is kept.
      ok(await qemuImg(["info", "disk.raw"], dir), `${which}: qemu-img info`);
      const resize = await qemuImg(["resize", "-f", "raw", "disk.raw", "8M"], dir);
      assert.match(resize.stderr, /Failed to get "resize" lock/, `${which}: qemu-img resize refused`);
      const ours = await snapstack(["img", "resize", "-f", "raw", "disk.raw", "8M"], { cwd: dir });
      assertCodedError(ours, "E_IN_USE");
      assert.match(ours.stderr, /Failed to get "resize" lock/, `${which}: snapstack img resize refused`);
      await stop(server);
    }
    assert.deepEqual(held.snapstack, held["qemu-nbd"], readOnly ? "-r" : "read-write");
    assert.deepEqual(held.snapstack, readOnly ? [100, 203] : [100, 101, 203]);
  }
});

test("snapstack nbd locks the bytes qemu-nbd locks on an overlay and its backing file, read-write and -r; qemu-img and qemu-io refuse alike", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "qemu-nbd") || !requireLocks(t)) return;
  const dir = scratchDir(t);
  const { base, top } = await chain(dir);
  for (const readOnly of [false, true]) {
    const held: Record<string, { top: number[]; base: number[] }> = {};
    for (const which of ["qemu-nbd", "snapstack"] as const) {
      const server = await startNbd(t, which, dir, top, { args: ["-f", "qcow2", ...(readOnly ? ["-r"] : [])] });
      held[which] = { top: lockedBytes(top), base: lockedBytes(base) };
      const info = await qemuImg(["info", "top.qcow2"], dir);
      if (readOnly) ok(info, `${which} -r: qemu-img info reads beside a reader`);
      else assert.match(info.stderr, /Failed to get shared "write" lock/, `${which}: qemu-img info refused beside a writer`);
      ok(await qemuImg(["info", "-U", "top.qcow2"], dir), `${which}: qemu-img info -U`);
      const write = await qemuIo(["-c", "write -q -P 1 0 4k", "base.qcow2"], dir);
      assert.match(write.stderr + write.stdout, /Failed to get "write" lock/, `${which}: qemu-io may not write the backing file`);
      await stop(server);
      assert.deepEqual(lockedBytes(top), [], `${which} left no lock behind`);
      assert.deepEqual(lockedBytes(base), []);
    }
    assert.deepEqual(held.snapstack, held["qemu-nbd"], readOnly ? "-r" : "read-write");
    assert.deepEqual(held.snapstack.top, readOnly ? [100, 201, 203] : [100, 101, 103, 201, 203]);
    assert.deepEqual(held.snapstack.base, [100, 201, 203]);
  }
  ok(await qemuImg(["check", "-q", "top.qcow2"], dir), "check");
});

test("a second snapstack process is refused while snapstack nbd writes the image (E_IN_USE, image untouched), and works once it exits", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io") || !requireLocks(t)) return;
  const dir = scratchDir(t);
  const { base, top } = await chain(dir);
  const server = await startNbd(t, "snapstack", dir, top, { args: ["-f", "qcow2"] });
  const before = snapshotFiles([base, top]);
  for (const args of [
    ["img", "snapshot", "-c", "s1", "top.qcow2"],
    ["img", "info", "top.qcow2"],
    ["img", "check", "top.qcow2"],
    ["io", "-c", "write 0 4k", "base.qcow2"],
    ["img", "create", "-f", "qcow2", "top.qcow2", "1M"],
    ["img", "remove", "top.qcow2"],
  ]) {
    const result = await snapstack(args, { cwd: dir });
    assertCodedError(result, "E_IN_USE");
    assert.match(result.stderr, /Failed to get (shared )?"write" lock/, args.join(" "));
  }
  ok(await snapstack(["img", "info", "-U", "top.qcow2"], { cwd: dir }), "info -U reads beside the writer");
  // An overlay over the served image (a live snapshot's first step) opens it shared, as qemu-img create does.
  ok(await snapstack(["img", "create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", "next.qcow2"], { cwd: dir }), "create -b over a served image");
  assertUnchanged(before);
  await stop(server);
  ok(await snapstack(["img", "snapshot", "-c", "s1", "top.qcow2"], { cwd: dir }), "snapshot once the server is gone");
  ok(await qemuImg(["check", "-q", "top.qcow2"], dir), "check");
});

test("opens in one process share one set of locks: a read-write and a read-only open of one image both succeed, and the locks last as long as some open does", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io") || !requireLocks(t)) return;
  const dir = scratchDir(t);
  const { base, top } = await chain(dir);
  const writer = await openImage(top, { readOnly: false });
  const reader = await openImage(top, { readOnly: true });
  const baseReader = await openImage(base, { readOnly: true, forceShare: true });
  try {
    assert.deepEqual(lockedBytes(top), [100, 101, 103, 201, 203]);
    assert.deepEqual(lockedBytes(base), [100, 201, 203]);
    await writer.close();
    assert.deepEqual(lockedBytes(top), [100, 201, 203], "the reader's locks stay");
    assert.deepEqual(lockedBytes(base), [100, 201, 203], "the reader's chain still reads the backing file");
    // A QEMU may now read the image beside us, not write it.
    ok(await qemuImg(["info", "top.qcow2"], dir), "qemu-img info beside a reader");
    const write = await qemuIo(["-c", "write -q 0 4k", "top.qcow2"], dir);
    assert.match(write.stderr + write.stdout, /Failed to get "write" lock/);
    await reader.close();
    assert.deepEqual(lockedBytes(top), []);
    assert.deepEqual(lockedBytes(base), [100], "-U shares everything: consistent read only");
  } finally {
    await writer.close();
    await reader.close();
    await baseReader.close();
  }
  assert.deepEqual(lockedBytes(base), []);
});

/** qemu-io on `args` until stop() is called; resolves once it holds all of `bytes` of `image` (QEMU takes them in steps). */
async function qemuIoHolding(dir: string, args: string[], image: string, bytes: number[]): Promise<() => Promise<void>> {
  const child = spawn("qemu-io", args, { cwd: dir, stdio: ["pipe", "ignore", "ignore"] });
  const exited = new Promise<void>((resolve) => child.on("exit", () => resolve()));
  for (let tries = 0; tries < 500 && lockedBytes(image).join() !== bytes.join(); tries++) await new Promise((resolve) => setTimeout(resolve, 10));
  assert.deepEqual(lockedBytes(image), bytes, "qemu-io took its locks");
  return async () => {
    child.stdin.end("quit\n");
    await exited;
  };
}

test("beside a qemu-io writing a raw file or reading a qcow2 with -U, each command succeeds or is refused as the same qemu-img command is", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io") || !requireLocks(t)) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "raw", "disk.raw", "4M"], dir), "raw");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "disk.qcow2", "4M"], dir), "qcow2");
  const cases: Array<{ holder: string[]; image: string; bytes: number[]; commands: string[][] }> = [
    {
      holder: ["-f", "raw", "disk.raw"],
      image: "disk.raw",
      bytes: [100, 101],
      commands: [
        ["info", "disk.raw"],
        ["check", "disk.raw"],
        ["convert", "-f", "raw", "-O", "raw", "disk.raw", "out.raw"],
        ["compare", "-f", "raw", "-F", "raw", "disk.raw", "disk.raw"],
        ["create", "-q", "-f", "raw", "disk.raw", "1M"],
        ["resize", "-f", "raw", "disk.raw", "8M"],
        // Last: refused, qemu-img deletes the file.
        ["create", "-q", "-f", "qcow2", "disk.raw", "1M"],
      ],
    },
    {
      holder: ["-r", "-U", "disk.qcow2"],
      image: "disk.qcow2",
      bytes: [100],
      commands: [
        ["info", "disk.qcow2"],
        ["snapshot", "-c", "s", "disk.qcow2"],
        ["convert", "-O", "raw", "disk.qcow2", "out.raw"],
        ["resize", "disk.qcow2", "8M"],
      ],
    },
  ];
  for (const { holder, image, bytes, commands } of cases) {
    const path = join(dir, image);
    const stop = await qemuIoHolding(dir, holder, path, bytes);
    try {
      for (const command of commands) {
        // Each tool gets the same starting file: a command that succeeds may change it. snapstack goes first:
        // a refused `qemu-img create -f qcow2` deletes the file it refused to format (the holder keeps the old inode).
        const saved = join(dir, "saved");
        copyFileSync(path, saved);
        const ours = await snapstack(["img", ...command], { cwd: dir });
        assert.ok(existsSync(path), `snapstack ${command.join(" ")} left the file in place`);
        copyFileSync(saved, path);
        const qemu = await qemuImg(command, dir);
        if (existsSync(path)) copyFileSync(saved, path);
        assert.equal(ours.code === 0, qemu.code === 0, `${command.join(" ")} beside qemu-io ${holder.join(" ")}: qemu-img ${qemu.code} ${qemu.stderr} / snapstack ${ours.code} ${ours.stderr}`);
        if (/lock/.test(qemu.stderr)) assert.match(ours.stderr, /E_IN_USE/, command.join(" "));
      }
    } finally {
      await stop();
    }
  }
});

test("img remove is refused while any other process has the image open, even one that shares everything (qemu-io -r -U)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io") || !requireLocks(t)) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "disk.qcow2", "4M"], dir), "qcow2");
  const path = join(dir, "disk.qcow2");
  const stop = await qemuIoHolding(dir, ["-r", "-U", "disk.qcow2"], path, [100]);
  try {
    const before = snapshotFiles([path]);
    assertCodedError(await snapstack(["img", "remove", "disk.qcow2"], { cwd: dir }), "E_IN_USE");
    assertUnchanged(before);
  } finally {
    await stop();
  }
  ok(await snapstack(["img", "remove", "disk.qcow2"], { cwd: dir }), "remove once nobody holds it");
});

test("without the native addon (SNAPSTACK_NATIVE=0) QEMU's locks are still honoured, read from /proc/locks, and none is taken", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const { top } = await chain(dir);
  const env = { ...process.env, SNAPSTACK_NATIVE: "0" };
  const stop = await qemuIoHolding(dir, ["top.qcow2"], top, [100, 101, 103, 201, 203]);
  try {
    const before = snapshotFiles([top]);
    assertCodedError(await snapstack(["img", "snapshot", "-c", "s", "top.qcow2"], { cwd: dir, env }), "E_IN_USE");
    assertCodedError(await snapstack(["img", "info", "top.qcow2"], { cwd: dir, env }), "E_IN_USE");
    ok(await snapstack(["img", "info", "-U", "top.qcow2"], { cwd: dir, env }), "info -U");
    assertUnchanged(before);
  } finally {
    await stop();
  }
  // What snapstack opens is not locked: a QEMU tool is not kept out.
  const reader = spawn(process.execPath, [SNAPSTACK_BIN, "io", "-c", "sleep 2000", "top.qcow2"], { cwd: dir, env, stdio: "ignore" });
  const exited = new Promise<void>((resolve) => reader.on("exit", () => resolve()));
  const opened = (): boolean => {
    try {
      return readdirSync(`/proc/${reader.pid}/fd`).some((fd) => {
        try {
          return readlinkSync(`/proc/${reader.pid}/fd/${fd}`) === top;
        } catch {
          return false;
        }
      });
    } catch {
      return false;
    }
  };
  for (let tries = 0; tries < 500 && !opened(); tries++) await new Promise((resolve) => setTimeout(resolve, 10));
  assert.ok(opened(), "snapstack io has the image open");
  assert.deepEqual(lockedBytes(top), []);
  await exited;
});
