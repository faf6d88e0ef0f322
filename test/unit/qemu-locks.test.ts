/**
 * QEMU's image locks read from /proc/locks (src/io/qemu-locks.ts): the
 * parser on the kernel's lines, and which opens the locks of a QEMU that
 * reads or writes an image forbid (as qemu-img decides).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { execFileSync, spawn } from "node:child_process";
import { lockBits, parseProcLocks, qemuLockConflict, type LockContext, type LockedAccess } from "../../src/io/qemu-locks.ts";
import { fileKey } from "../../src/io/file-identity.ts";
import { requireTools, scratchDir } from "../helpers/tools.ts";

// /proc/locks while `qemu-io img.qcow2` (read-write) and, on another file, `qemu-io -r` held them.
const PROC_LOCKS = [
  "1: OFDLCK ADVISORY  READ -1 fe:00:2179099 203 203",
  "2: OFDLCK ADVISORY  READ -1 fe:00:2179099 201 201",
  "3: OFDLCK ADVISORY  READ -1 fe:00:2179099 103 103",
  "4: OFDLCK ADVISORY  READ -1 fe:00:2179099 100 101",
  "5: OFDLCK ADVISORY  READ -1 fe:00:42 203 203",
  "6: OFDLCK ADVISORY  READ -1 fe:00:42 201 201",
  "7: OFDLCK ADVISORY  READ -1 fe:00:42 100 100",
  "8: POSIX  ADVISORY  WRITE 1234 08:01:7 0 EOF",
  "8: -> POSIX  ADVISORY  WRITE 1235 08:01:9 0 EOF",
  "9: FLOCK  ADVISORY  WRITE 1236 08:01:11 0 EOF",
  "",
].join("\n");

test("parseProcLocks: ranges per file, EOF as unbounded, waiting requests and flock() locks skipped", () => {
  const table = parseProcLocks(PROC_LOCKS);
  assert.deepEqual(table.get("fe:00:2179099"), [
    [203, 203],
    [201, 201],
    [103, 103],
    [100, 101],
  ]);
  assert.deepEqual(table.get("08:01:7"), [[0, Number.POSITIVE_INFINITY]]);
  assert.equal(table.has("08:01:9"), false);
  assert.equal(table.has("08:01:11"), false, "an flock() lock is not a byte-range lock QEMU sees");
});

test("qemuLockConflict: a QEMU writing refuses readers and writers; a QEMU reading refuses writers only; no locks, no conflict", () => {
  const table = parseProcLocks(PROC_LOCKS);
  const writing = table.get("fe:00:2179099")!;
  const reading = table.get("fe:00:42")!;
  assert.equal(qemuLockConflict(writing, lockBits("write")), 'Failed to get "write" lock');
  assert.equal(qemuLockConflict(writing, lockBits("read")), 'Failed to get shared "write" lock');
  assert.equal(qemuLockConflict(reading, lockBits("write")), 'Failed to get "write" lock');
  assert.equal(qemuLockConflict(reading, lockBits("read")), null);
  assert.equal(qemuLockConflict([], lockBits("write")), null);
  // An unrelated lock elsewhere in the file (another program's) forbids nothing here.
  assert.equal(qemuLockConflict([[0, 99]], lockBits("write")), null);
  assert.equal(qemuLockConflict([[0, Number.POSITIVE_INFINITY]], lockBits("read")), 'Failed to get "consistent read" lock');
  // Creating over a file (raw_co_create) needs write and resize and does not share resize.
  assert.equal(qemuLockConflict(writing, lockBits("create", { raw: true })), 'Failed to get "write" lock');
  assert.equal(qemuLockConflict(reading, lockBits("create", { raw: true })), 'Failed to get "write" lock');
  assert.equal(qemuLockConflict([[103, 103]], lockBits("create", { raw: true })), 'Failed to get shared "resize" lock');
  assert.equal(qemuLockConflict([[100, 100]], lockBits("create", { raw: true })), null, "a reader that shares writing does not stop a create");
  assert.equal(qemuLockConflict([], lockBits("create", { raw: true })), null);
  // A reader shares neither writing nor resizing (qemu-io -r locks 203); -U shares everything.
  assert.equal(qemuLockConflict([[103, 103]], lockBits("read")), 'Failed to get shared "resize" lock');
  assert.equal(qemuLockConflict(writing, lockBits("read-shared")), null);
});

test("lockBits: the bytes each access locks are those qemu-io and qemu-nbd 7.2 hold (PROC_LOCKS above: read-write and -r; -U holds byte 100 only; raw files)", () => {
  const bytes = (access: LockedAccess, context: LockContext = {}): number[] => {
    const bits = lockBits(access, context);
    const locked: number[] = [];
    for (let permission = 0; permission < 4; permission++) if (bits.held & (1 << permission)) locked.push(100 + permission);
    for (let permission = 0; permission < 4; permission++) if (bits.unshared & (1 << permission)) locked.push(200 + permission);
    return locked;
  };
  const held = (key: string): number[] => parseProcLocks(PROC_LOCKS).get(key)!.flatMap(([first, last]) => Array.from({ length: last - first + 1 }, (_, i) => first + i)).sort((a, b) => a - b);
  assert.deepEqual(bytes("write"), held("fe:00:2179099"));
  assert.deepEqual(bytes("read"), held("fe:00:42"));
  assert.deepEqual(bytes("read-shared"), [100]);
  assert.deepEqual(bytes("create", { raw: true }), [101, 103, 203]);
  assert.deepEqual(bytes("create"), bytes("write"), "a qcow2 image is formatted as a writer");
  assert.deepEqual(bytes("read", { raw: true, stableSource: true }), bytes("read"), "convert's raw source: 100, 201, 203");
  assert.deepEqual(bytes("remove"), [100, 101, 103, 200, 201, 202, 203]);
  // A raw file's users share everything (qemu-io on raw: 100-101, -r: 100); qemu-nbd keeps resizing (203).
  assert.deepEqual(bytes("write", { raw: true }), [100, 101]);
  assert.deepEqual(bytes("read", { raw: true }), [100]);
  assert.deepEqual(bytes("write", { raw: true, fixedSize: true }), [100, 101, 203]);
  assert.deepEqual(bytes("write", { raw: true, resize: true }), [100, 101, 103], "qemu-img resize on a raw file");
  assert.deepEqual(bytes("read", { raw: true, fixedSize: true }), [100, 203]);
  assert.deepEqual(bytes("write", { fixedSize: true }), held("fe:00:2179099"), "qcow2 keeps resizing to itself anyway");
});

test("fileKey (io/file-identity.ts): the file as /proc/locks names it (major:minor in hex, inode), as stat(1) prints them", (t) => {
  const path = join(scratchDir(t), "f");
  writeFileSync(path, "x");
  const [devHex, inode] = execFileSync("stat", ["-c", "%D %i", path], { encoding: "utf8" }).trim().split(" ");
  const dev = Number.parseInt(devHex, 16);
  // stat's %D is the old 16-bit encoding for small numbers: major in the high byte.
  const expected = `${(dev >> 8).toString(16).padStart(2, "0")}:${(dev & 0xff).toString(16).padStart(2, "0")}:${inode}`;
  assert.equal(fileKey(path), expected);
  assert.equal(fileKey(join(path, "missing")), null);
});

test("readProcLocks: a lock table is never reused (an old one could name an inode reused since); with a QEMU holding a file, each call sees its locks", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const { readProcLocks } = await import("../../src/io/qemu-locks.ts");
  const dir = scratchDir(t);
  const image = join(dir, "held.qcow2");
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", image, "1M"]);
  const holder = spawn("qemu-io", [image], { stdio: ["pipe", "ignore", "ignore"] });
  const exited = new Promise<void>((resolve) => holder.on("exit", () => resolve()));
  try {
    const key = fileKey(image) ?? "";
    const locked = (): boolean => parseProcLocks(readFileSync("/proc/locks", "utf8")).has(key);
    for (let tries = 0; tries < 500 && !locked(); tries++) await new Promise((resolve) => setTimeout(resolve, 10));
    assert.ok(readProcLocks().has(key), "the holder's locks are seen");
  } finally {
    holder.stdin.end("quit\n");
    await exited;
  }
  // The same process, right after: the locks are gone, and the table says so (no reused table).
  assert.equal(readProcLocks().has(fileKey(image) ?? ""), false);
});
