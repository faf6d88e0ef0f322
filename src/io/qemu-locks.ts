/**
 * QEMU's image locks, taken and honoured.
 *
 * QEMU (block/file-posix.c) takes OFD byte-range locks on every image file
 * it opens: a shared lock on byte 100+i while it holds permission i, on
 * byte 200+i while it refuses to share permission i with others (i: 0
 * consistent read, 1 write, 2 write-unchanged, 3 resize). Before it keeps
 * an open, it tests (F_OFD_GETLK) that no other open file description
 * locks byte 200+i of a permission it wants, nor byte 100+i of one it
 * refuses to share; qemu-img and qemu-io then refuse with `Failed to get
 * "write" lock`.
 *
 * Design notes
 * - snapstack takes the same locks, through the native addon's byteLock
 *   (io/native-file-ops.ts), so a QEMU tool refuses an image snapstack
 *   writes (and one it reads, from writing it), two snapstack processes
 *   refuse each other as two qemu-img would, and snapstack refuses what a
 *   QEMU holds. Which bytes each access locks was read from /proc/locks
 *   under qemu-io and qemu-nbd 7.2 (lockBits).
 * - One lock descriptor per file per process. The locks sit on a
 *   descriptor of their own, opened read-only through the image's
 *   (/proc/self/fd/N: the same file whatever its name is by then), keyed
 *   by device and inode: every open of the file in this process (a server's
 *   export, a snapshot's backing, a diff reading the layer) adds its
 *   permissions to that descriptor's, and drops them when it closes. So
 *   opens in one process never refuse each other (the daemon coordinates
 *   them itself, as QEMU's block layer shares one node), and the locks
 *   last exactly as long as some open does.
 * - Lock, then test, as QEMU does: two processes opening at once see each
 *   other's locks, and a refused open drops what it had added. An image
 *   is locked once its format is known (a raw file's users share writing,
 *   a qcow2 file's do not) and before anything is written.
 * - Without the addon (no C compiler at install) or on a file system
 *   without OFD locks, it falls back to a check: QEMU's locks are read
 *   from /proc/locks and the same opens are refused, but nothing is held,
 *   so a QEMU that opens the image afterwards is not stopped, and
 *   snapstack processes do not see each other.
 *
 * `parseProcLocks`, `lockBits` and `qemuLockConflict` are pure; the rest
 * does the I/O. Files in /proc/locks are named by io/file-identity.ts
 * fileKey.
 */
import { closeSync, constants, fstatSync, openSync, readdirSync, readFileSync, readSync } from "node:fs";
import { fromSystemError } from "../base/errors.ts";
import { fileKey } from "./file-identity.ts";
import { byteLock } from "./native-file-ops.ts";

const LOCK_PERM_BASE = 100;
const LOCK_SHARED_BASE = 200;
const PERMISSIONS = ["consistent read", "write", "write unchanged", "resize"] as const;
const CONSISTENT_READ = 0;
const WRITE = 1;
const RESIZE = 3;

/** Locked byte ranges [first, last] per file, keyed as /proc/locks names files ("fe:00:2179099", io/file-identity.ts fileKey). */
export type LockTable = Map<string, Array<[first: number, last: number]>>;

/**
 * The byte-range locks of /proc/locks text (POSIX and OFD, which QEMU's
 * own lock test sees; flock() locks and leases are another kind); waiting
 * requests ("->") are not locks.
 */
export function parseProcLocks(text: string): LockTable {
  const table: LockTable = new Map();
  for (const line of text.split("\n")) {
    const match = /^\d+:\s+(?:POSIX|OFDLCK)\s+\S+\s+\S+\s+-?\d+\s+([0-9a-f]+:[0-9a-f]+:\d+)\s+(\d+)\s+(\d+|EOF)\s*$/.exec(line);
    if (match === null) continue;
    const ranges = table.get(match[1]) ?? [];
    ranges.push([Number(match[2]), match[3] === "EOF" ? Number.POSITIVE_INFINITY : Number(match[3])]);
    table.set(match[1], ranges);
  }
  return table;
}

/**
 * What is done to a file: opened to read, to read while others may write
 * (qemu-img -U, force-share), to write, created over (truncated,
 * formatted), or removed (snapstack's `img remove`).
 */
export type LockedAccess = "read" | "read-shared" | "write" | "create" | "remove";

/** Permissions as bit masks (bit i: permission i of PERMISSIONS). */
export interface LockBits {
  /** Held: byte 100+i locked. */
  held: number;
  /** Not shared with others: byte 200+i locked. */
  unshared: number;
}

const bit = (permission: number): number => 1 << permission;

/** What decides the locks besides the access. */
export interface LockContext {
  /** The file holds a raw image (default: qcow2 metadata). */
  raw?: boolean;
  /** The image is served at a fixed size (an NBD export): others may not resize it. */
  fixedSize?: boolean;
  /** The reader needs the data unchanged until it is done (convert's source): others may not write it. */
  stableSource?: boolean;
  /** The writer changes the file's size (img resize; restore matching sizes): it holds resizing even on a raw file. */
  resize?: boolean;
}

/**
 * The permissions QEMU 7.2 holds and keeps to itself for each access, as
 * /proc/locks shows them under qemu-io and qemu-nbd.
 * - A qcow2 file's metadata must not change under its user: a reader (the
 *   image opened read-only, or a backing file) holds consistent read and
 *   shares neither writing nor resizing (bytes 100, 201, 203); a writer
 *   also holds write and resize (100, 101, 103, 201, 203).
 * - A raw file's user shares everything (qemu-io: 100 reading, 100-101
 *   writing; raw under a qcow2 overlay: 100), except that qemu-nbd keeps
 *   resizing to itself (203): `fixedSize`; qemu-img resize holds resizing
 *   (103): `resize`.
 * - With -U a reader shares everything (100).
 * - Creating over a file holds write and resize and keeps resizing
 *   (raw_co_create: 101, 103, 203); a qcow2 image is then opened to be
 *   formatted, as a writer.
 * - `stableSource`: a reader that needs the data unchanged until it is
 *   done keeps writing and resizing to itself even on a raw file, as
 *   qemu-img convert does with its source (100, 201, 203).
 * - Removing (snapstack's own) holds what a writer holds and shares
 *   nothing: no other process may have the file open at all.
 */
export function lockBits(access: LockedAccess, context: LockContext = {}): LockBits {
  const fixed = context.fixedSize === true ? bit(RESIZE) : 0;
  switch (access) {
    case "read":
      return { held: bit(CONSISTENT_READ), unshared: (context.raw === true && context.stableSource !== true ? 0 : bit(WRITE) | bit(RESIZE)) | fixed };
    case "read-shared":
      return { held: bit(CONSISTENT_READ), unshared: fixed };
    case "write":
      if (context.raw === true) return { held: bit(CONSISTENT_READ) | bit(WRITE) | (context.resize === true ? bit(RESIZE) : 0), unshared: fixed };
      return { held: bit(CONSISTENT_READ) | bit(WRITE) | bit(RESIZE), unshared: bit(WRITE) | bit(RESIZE) };
    case "create":
      if (context.raw === true) return { held: bit(WRITE) | bit(RESIZE), unshared: bit(RESIZE) };
      return lockBits("write");
    case "remove":
      return { held: bit(CONSISTENT_READ) | bit(WRITE) | bit(RESIZE), unshared: (1 << PERMISSIONS.length) - 1 };
  }
}

/**
 * Why locks on the bytes for which `lockedElsewhere` is true forbid
 * `bits`, in qemu-img's words (raw_check_lock_bytes: held permissions
 * first), or null.
 */
function conflictReason(bits: LockBits, lockedElsewhere: (byte: number) => boolean): string | null {
  for (let permission = 0; permission < PERMISSIONS.length; permission++) {
    if (bits.held & bit(permission) && lockedElsewhere(LOCK_SHARED_BASE + permission)) return `Failed to get "${PERMISSIONS[permission]}" lock`;
  }
  for (let permission = 0; permission < PERMISSIONS.length; permission++) {
    if (bits.unshared & bit(permission) && lockedElsewhere(LOCK_PERM_BASE + permission)) return `Failed to get shared "${PERMISSIONS[permission]}" lock`;
  }
  return null;
}

/** Why the locked byte ranges of a file (its /proc/locks entries) forbid an open wanting `bits`, or null. */
export function qemuLockConflict(ranges: ReadonlyArray<readonly [number, number]>, bits: LockBits): string | null {
  return conflictReason(bits, (byte) => ranges.some(([first, last]) => first <= byte && byte <= last));
}

/**
 * Why QEMU's locks on the file at `path` forbid an open wanting `bits`, or
 * null (also when the file does not exist): the check without the addon.
 * The file is stat'ed only when some lock exists (usually none: no QEMU
 * runs).
 */
function qemuLockConflictAt(path: string, bits: LockBits): string | null {
  const locks = readProcLocks();
  if (locks.size === 0) return null;
  return qemuLockConflict(locks.get(fileKey(path) ?? "") ?? [], bits);
}

/**
 * How long a look that found no qemu* process serves the opens that follow
 * (`info --backing-chain` opens each of up to 1,024 layers by itself).
 * Only that answer is reused: a lock table is read afresh each time, since
 * an old one could name an inode freed since and reused by another file
 * (seen: a layer refused for a lock a finished qemu-io had held). A reused
 * "none" can only miss a QEMU that started meanwhile, which the check
 * cannot promise to see anyway. After the first read in a process,
 * /proc/locks costs ~0.05 ms.
 */
const NO_QEMU_REUSE_MS = 1000;
let noQemuSeenAtMs: number | null = null;

/**
 * /proc/locks, or an empty table where there is none (not Linux, no procfs)
 * or no QEMU process runs: reading /proc/locks costs the kernel an RCU grace
 * period (10-25 ms here, every command), a look at the processes' names
 * ~25 us per process.
 */
export function readProcLocks(): LockTable {
  // process.hrtime, not performance.now(): the global `performance` loads perf_hooks on first use
  // (~1.2 ms of a command's start-up, for this one clock reading).
  const nowMs = Number(process.hrtime.bigint()) / 1e6;
  if (noQemuSeenAtMs !== null && nowMs - noQemuSeenAtMs < NO_QEMU_REUSE_MS) return new Map();
  if (!qemuRunning()) {
    noQemuSeenAtMs = nowMs;
    return new Map();
  }
  noQemuSeenAtMs = null;
  try {
    return parseProcLocks(readFileSync("/proc/locks", "utf8"));
  } catch {
    return new Map(); // no procfs: no locks seen
  }
}

/** Processes looked at before /proc/locks is read anyway. */
const PROCESSES_SCANNED_MAX = 4096;

/** "qemu", the start of the names qemuRunning looks for. */
const QEMU_PREFIX = [0x71, 0x65, 0x6d, 0x75];
/** One small buffer for every comm file qemuRunning reads (only the first 4 bytes matter). */
const commPrefix = new Uint8Array(QEMU_PREFIX.length);

/**
 * Whether a process named qemu* (qemu-system-*, qemu-img, qemu-io, qemu-nbd,
 * qemu-storage-daemon) may be running. Each /proc/PID/comm is opened and
 * its first 4 bytes read into one buffer: readFileSync would also fstat it
 * and decode a string, and this loop runs in every command's start-up
 * (~0.8 ms against ~1.8 ms for 70 processes).
 */
function qemuRunning(): boolean {
  let entries: string[];
  try {
    entries = readdirSync("/proc");
  } catch {
    return false;
  }
  let scanned = 0;
  for (const entry of entries) {
    const first = entry.charCodeAt(0);
    if (first < 48 || first > 57) continue; // not a process id
    if (++scanned > PROCESSES_SCANNED_MAX) return true;
    if (commStartsWithQemu(`/proc/${entry}/comm`)) return true;
  }
  return false;
}

function commStartsWithQemu(path: string): boolean {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch {
    return false; // the process ended meanwhile
  }
  try {
    const length = readSync(fd, commPrefix, 0, commPrefix.length, 0);
    return length === commPrefix.length && commPrefix.every((byte, i) => byte === QEMU_PREFIX[i]);
  } catch {
    return false;
  } finally {
    closeSync(fd);
  }
}

/** An open's share of a file's locks: release() drops it (at most once counts). */
export interface ImageLock {
  release(): void;
}

/** A file this process holds locks on: the descriptor they sit on and the opens that want them. */
interface LockedFile {
  fd: number;
  holds: Set<LockBits>;
  /** What the descriptor has locked now. */
  applied: LockBits;
}

/** Files this process holds locks on, by device and inode. */
const lockedFiles = new Map<string, LockedFile>();

/** A lock that holds nothing: for a file that is not there, or one only checked (no addon). */
const NO_LOCK: ImageLock = { release() {} };

function unionOf(holds: Iterable<LockBits>): LockBits {
  const union = { held: 0, unshared: 0 };
  for (const bits of holds) {
    union.held |= bits.held;
    union.unshared |= bits.unshared;
  }
  return union;
}

/** Bytes locked for `bits` and not for `except`. */
function lockBytes(bits: LockBits, except: LockBits): number[] {
  const bytes: number[] = [];
  for (let permission = 0; permission < PERMISSIONS.length; permission++) {
    if (bits.held & ~except.held & bit(permission)) bytes.push(LOCK_PERM_BASE + permission);
    if (bits.unshared & ~except.unshared & bit(permission)) bytes.push(LOCK_SHARED_BASE + permission);
  }
  return bytes;
}

/** Make the file's descriptor lock what its opens want now, dropping the rest; closes it when none is left. */
function settle(key: string, file: LockedFile): void {
  if (file.holds.size === 0) {
    lockedFiles.delete(key);
    closeSync(file.fd); // drops every lock of the descriptor
    return;
  }
  const wanted = unionOf(file.holds);
  for (const byte of lockBytes(file.applied, wanted)) byteLock(file.fd, byte, "unlock");
  file.applied = wanted;
}

/**
 * Take the locks for `bits` (lockBits) on the file at `path` and keep them
 * until release(), or say in qemu-img's words why another process's locks
 * forbid it (nothing is then held). A file that is not there gets no lock
 * (its own open reports that); one this process cannot open for reading is
 * checked against /proc/locks only. `path` may be /proc/self/fd/N: the
 * file an open descriptor is on, whatever its name now (NodeFile.lockImage).
 */
export function lockImageFile(path: string, bits: LockBits): ImageLock | string {
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "ENOENT" ? NO_LOCK : (qemuLockConflictAt(path, bits) ?? NO_LOCK);
  }
  let key: string;
  try {
    const stat = fstatSync(fd, { bigint: true });
    key = `${stat.dev}:${stat.ino}`;
  } catch (error) {
    closeSync(fd);
    throw fromSystemError(error, path, "stat");
  }
  let file = lockedFiles.get(key);
  if (file === undefined) {
    file = { fd, holds: new Set(), applied: { held: 0, unshared: 0 } };
  } else {
    closeSync(fd);
  }
  // A hold of its own (holds is a set of objects): two opens wanting the same bits release separately.
  bits = { ...bits };
  const wanted = unionOf([...file.holds, bits]);
  const added = lockBytes(wanted, file.applied);
  /** Bytes another description holds an exclusive lock on (QEMU takes none; another program might). */
  const refused: number[] = [];
  const held = file;
  let reason: string | null;
  try {
    for (const byte of added) {
      const taken = byteLock(held.fd, byte, "shared");
      if (taken === null) {
        // No addon, or no OFD locks on this file system: a check only.
        for (const locked of added) byteLock(held.fd, locked, "unlock");
        if (held.holds.size === 0) closeSync(held.fd);
        return qemuLockConflictAt(path, bits) ?? NO_LOCK;
      }
      if (!taken) refused.push(byte);
    }
    held.applied = wanted;
    reason = conflictReason(wanted, (byte) => refused.includes(byte) || byteLock(held.fd, byte, "test") === true) ?? (refused.length > 0 ? `Failed to lock byte ${refused[0]}` : null);
  } catch (error) {
    // An errno fcntl should never give (EBADF, ENOMEM): undo what was added, report it coded.
    held.applied = wanted;
    settle(key, held);
    throw fromSystemError(error, path, "lock");
  }
  if (reason !== null) {
    settle(key, held);
    return reason;
  }
  held.holds.add(bits);
  lockedFiles.set(key, held);
  let released = false;
  return {
    release() {
      if (released) return;
      released = true;
      held.holds.delete(bits);
      settle(key, held);
    },
  };
}
