/**
 * QEMU's image locks, seen from outside.
 *
 * QEMU (block/file-posix.c) takes OFD byte-range locks on every image file
 * it opens: byte 100+i while it holds permission i, byte 200+i while it
 * refuses to share permission i with others (i: 0 consistent read,
 * 1 write, 2 write-unchanged, 3 resize). qemu-img and qemu-io refuse an
 * open those locks forbid ("Failed to get "write" lock"). snapstack cannot
 * take such locks (Node has no fcntl), but it reads them from /proc/locks
 * and refuses the same opens, so it does not write an image a running QEMU
 * uses, nor read one a QEMU is writing unless told to (-U, force-share, as
 * qemu-img). A check, not a lock: a QEMU that opens the image afterwards is
 * not seen, and snapstack processes do not see each other.
 *
 * `parseProcLocks` and `qemuLockConflict` are pure; `readProcLocks` does
 * the I/O. Files are named by io/file-identity.ts fileKey.
 */
import { closeSync, openSync, readdirSync, readFileSync, readSync } from "node:fs";
import { fileKey } from "./file-identity.ts";

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

/** What is done to a file: opened to read, opened to write, or created over (truncated, formatted). */
export type LockedAccess = "read" | "write" | "create";

/**
 * Why QEMU's locks forbid `access` to the file, in qemu-img's words, or
 * null. A reader needs consistent reads and does not share writing; a
 * writer needs consistent reads, writing and resizing and shares neither
 * of the last two (what qemu-img asks for a qcow2 image); creating needs
 * writing and resizing and does not share resizing (raw_co_create).
 */
export function qemuLockConflict(ranges: ReadonlyArray<readonly [number, number]>, access: LockedAccess): string | null {
  const locked = (byte: number): boolean => ranges.some(([first, last]) => first <= byte && byte <= last);
  const needed = access === "read" ? [CONSISTENT_READ] : access === "write" ? [CONSISTENT_READ, WRITE, RESIZE] : [WRITE, RESIZE];
  const unshared = access === "read" ? [WRITE] : access === "write" ? [WRITE, RESIZE] : [RESIZE];
  for (const permission of needed) if (locked(LOCK_SHARED_BASE + permission)) return `Failed to get "${PERMISSIONS[permission]}" lock`;
  for (const permission of unshared) if (locked(LOCK_PERM_BASE + permission)) return `Failed to get shared "${PERMISSIONS[permission]}" lock`;
  return null;
}

/**
 * Why QEMU's locks on the file at `path` forbid `access`, or null (also
 * when the file does not exist). The file is stat'ed only when some lock
 * exists (usually none: no QEMU runs).
 */
export function qemuLockConflictAt(path: string, access: LockedAccess): string | null {
  const locks = readProcLocks();
  if (locks.size === 0) return null;
  return qemuLockConflict(locks.get(fileKey(path) ?? "") ?? [], access);
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
