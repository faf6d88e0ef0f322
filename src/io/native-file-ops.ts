/**
 * The Linux file calls Node does not expose: fallocate (punch a hole, zero a
 * range, preallocate) and lseek with SEEK_DATA / SEEK_HOLE (find a file's
 * holes). They come from a small optional N-API addon, native/file-ops.c,
 * which `npm install` builds (native/build.mjs).
 *
 * Design notes
 * - Optional by design: without the addon (no C compiler where snapstack was
 *   installed, or SNAPSTACK_NATIVE=0) every function here reports "not
 *   supported" and callers fall back to what they did before the addon
 *   existed: write zero bytes instead of punching, keep discarded space,
 *   treat the whole file as data. Results stay byte-identical; only disk
 *   usage and speed differ. `nativeFileOpsLoaded()` tells which (the test
 *   suite requires the addon under CI=true).
 * - A file system that lacks a call (EOPNOTSUPP, ENOSYS; EINVAL for a mode
 *   it does not know) also reports "not supported", as qemu's file-posix
 *   falls back per call. Any other errno is thrown as a system error for
 *   the caller's fromSystemError (which names the file).
 * - Where they run: fallocate (punch, zero, preallocate) and the allocating
 *   write on libuv's thread pool, as qemu's file-posix runs them on its
 *   own pool: a punch over a large dirty range takes tens of milliseconds
 *   (measured: 37 ms for 64 MiB a snapshot apply freed), which would stall
 *   every client of a server on the event loop. The allocation just before
 *   a synchronous write and lseek run on the calling thread: both read or
 *   change extent metadata only, in microseconds.
 * - byteLock gives QEMU's image locks (io/qemu-locks.ts): open file
 *   description locks on single bytes, on the calling thread (they never
 *   wait: F_OFD_SETLK, not F_OFD_SETLKW).
 * - Loaded on first use, not at import: most commands never need it.
 */
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import { getSystemErrorName } from "node:util";
import type { FileRun } from "./file.ts";

interface FileOpsAddon {
  /** 0 or -errno, on libuv's thread pool. */
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<number>;
  /** 0 or -errno. */
  fallocateSync(fd: number, mode: number, offset: number, length: number): number;
  /** The new offset or -errno. */
  seek(fd: number, offset: number, whence: number): number;
  /** 0, 1 (mode 2: another open file description holds a lock on the byte) or -errno; absent from an addon built before it. */
  byteLock?(fd: number, byte: number, mode: number): number;
  /** 1 when the page cache holds every page of the range (cachestat), 0 when not, or -errno; absent from an addon built before it. */
  cached?(fd: number, offset: number, length: number): number;
  /** Bytes written or -errno, on libuv's thread pool. */
  writeAllocating(fd: number, offset: number, buffers: readonly Uint8Array[]): Promise<number>;
}

const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;
const FALLOC_FL_ZERO_RANGE = 0x10;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const ADDON_URL = new URL("../../native/build/file-ops.node", import.meta.url);

let addon: FileOpsAddon | null | undefined;

function loadAddon(): FileOpsAddon | null {
  if (addon !== undefined) return addon;
  addon = null;
  if (process.env.SNAPSTACK_NATIVE === "0") return addon;
  try {
    addon = createRequire(import.meta.url)(fileURLToPath(ADDON_URL)) as FileOpsAddon;
  } catch {
    // Not built (no compiler at install time): the callers' fallbacks apply.
  }
  return addon;
}

/** Whether the addon is in use (false: every call below reports "not supported"). */
export function nativeFileOpsLoaded(): boolean {
  return loadAddon() !== null;
}

const UNSUPPORTED = new Set(["EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EINVAL"]);

/** -errno as the error node:fs would throw (code and message), for fromSystemError. */
function systemError(negativeErrno: number, call: string): NodeJS.ErrnoException {
  const code = getSystemErrorName(negativeErrno);
  return Object.assign(new Error(`${code}: ${call}`), { code, errno: negativeErrno, syscall: call });
}

async function fallocate(fd: number, mode: number, offset: number, length: number): Promise<boolean> {
  const ops = loadAddon();
  if (ops === null || length === 0) return ops !== null;
  const result = await ops.fallocate(fd, mode, offset, length);
  if (result === 0) return true;
  if (UNSUPPORTED.has(getSystemErrorName(result))) return false;
  throw systemError(result, "fallocate");
}

/**
 * Deallocate [offset, offset + length) without changing the file's size:
 * it reads back as zeroes and its space returns to the file system. False
 * when that cannot be done here.
 */
export function punchHole(fd: number, offset: number, length: number): Promise<boolean> {
  return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

/**
 * Make [offset, offset + length) read as zeroes, allocated (extends the file
 * if it ends beyond): FALLOC_FL_ZERO_RANGE, or where the file system lacks it
 * (tmpfs) a punched hole allocated again, as qemu's file driver falls back.
 * False when neither works.
 */
export async function zeroRange(fd: number, offset: number, length: number): Promise<boolean> {
  return (await fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, length)) || ((await punchHole(fd, offset, length)) && (await preallocate(fd, offset, length)));
}

/** Allocate [offset, offset + length) without writing it (reads as zeroes where it was a hole; extends the file). False when unsupported. */
export function preallocate(fd: number, offset: number, length: number): Promise<boolean> {
  return fallocate(fd, 0, offset, length);
}

/** Most buffers one writeAllocating call takes (Linux's IOV_MAX). */
const WRITE_BUFFERS_MAX = 1024;

/**
 * Allocate [offset, offset + length) for a write that follows at once,
 * without changing the file's size; errors are left for the write to
 * report. A large write into a hole of an ext4 file then takes ~20% less
 * kernel time (its blocks are found allocated instead of being reserved a
 * page at a time); over allocated blocks it changes nothing.
 */
export function allocateForWrite(fd: number, offset: number, length: number): void {
  loadAddon()?.fallocateSync(fd, FALLOC_FL_KEEP_SIZE, offset, length);
}

/**
 * pwritev of `buffers` at `offset` on libuv's thread pool, after
 * allocateForWrite over their range, in one job: the bytes written (maybe
 * fewer than asked). Null without the addon, or for more buffers than one
 * call takes: the caller writes with node:fs.
 */
export function writeAllocating(fd: number, offset: number, buffers: readonly Uint8Array[]): Promise<number> | null {
  const ops = loadAddon();
  if (ops === null || buffers.length > WRITE_BUFFERS_MAX) return null;
  return ops.writeAllocating(fd, offset, buffers).then((result) => {
    if (result < 0) throw systemError(result, "pwritev");
    return result;
  });
}

/**
 * The data and hole runs of [offset, offset + length) in a file of
 * `fileSizeBytes`, in order, covering exactly the part before the file's
 * end. Null when holes cannot be seen here (no addon): callers treat the
 * range as data. `onDataRun`, when given, hears of each data run found
 * with its whole extent as the file system reported it, not cut at the
 * end of the query (where SEEK_HOLE found its end).
 */
export function fileRuns(fd: number, offset: number, length: number, fileSizeBytes: number, onDataRun?: (start: number, end: number) => void): FileRun[] | null {
  const ops = loadAddon();
  if (ops === null) return null;
  const end = Math.min(offset + length, fileSizeBytes);
  const runs: FileRun[] = [];
  const push = (from: number, to: number, hole: boolean): void => {
    if (to > from) runs.push({ hostOffset: from, lengthBytes: to - from, hole });
  };
  /** The seek's offset (at most `end`); `onEnxio` for ENXIO; null where the file system cannot seek so. */
  const seekTo = (at: number, whence: number, onEnxio: number): number | null => {
    const result = ops.seek(fd, at, whence);
    if (result >= 0) {
      if (whence === SEEK_HOLE && result > at) onDataRun?.(at, result);
      return Math.min(result, end);
    }
    const code = getSystemErrorName(result);
    if (code === "ENXIO") return onEnxio;
    if (UNSUPPORTED.has(code)) return null;
    throw systemError(result, whence === SEEK_DATA ? "lseek(SEEK_DATA)" : "lseek(SEEK_HOLE)");
  };
  for (let at = offset; at < end; ) {
    // ENXIO: no data at or after `at` (the rest is a hole).
    const dataStart = seekTo(at, SEEK_DATA, end);
    if (dataStart === null) return null;
    push(at, dataStart, true);
    if (dataStart >= end) break;
    // ENXIO here: the file shrank since its size was read; what is gone reads as zeroes (a hole).
    const dataEnd = seekTo(dataStart, SEEK_HOLE, dataStart);
    if (dataEnd === null) return null;
    if (dataEnd === dataStart) {
      push(dataStart, end, true);
      break;
    }
    push(dataStart, dataEnd, false);
    at = dataEnd;
  }
  return runs;
}

/** The kernel has no cachestat (ENOSYS once). */
let cachestatMissing = false;

/**
 * Whether the page cache holds every page of [offset, offset + length)
 * (cachestat, Linux 6.5). Null where that cannot be asked (no addon, or
 * one built before it; an older kernel).
 */
export function pagesCached(fd: number, offset: number, length: number): boolean | null {
  if (cachestatMissing) return null;
  const ops = loadAddon();
  if (ops === null || typeof ops.cached !== "function") return null;
  const result = ops.cached(fd, offset, length);
  if (result >= 0) return result === 1;
  const code = getSystemErrorName(result);
  // A kernel without the call (before 6.5) stays without it: not asked again, once per table.
  if (code === "ENOSYS") cachestatMissing = true;
  if (UNSUPPORTED.has(code)) return null;
  throw systemError(result, "cachestat");
}

/** What byteLock does: drop this description's lock, take a shared one, or test for another description's. */
export type ByteLockAction = "unlock" | "shared" | "test";
const BYTE_LOCK_MODES: Record<ByteLockAction, number> = { unlock: 0, shared: 1, test: 2 };

/**
 * An open file description lock on one byte of the file open at `fd`
 * (never waiting). "test" answers whether another open file description,
 * in this process or another, holds a lock there; "shared" answers false
 * where another holds an exclusive one. Null without the addon, or where
 * the file system has no such locks.
 */
export function byteLock(fd: number, byte: number, action: ByteLockAction): boolean | null {
  const ops = loadAddon();
  // An addon built before byteLock existed (a checkout updated without `npm run build`): as without one.
  if (ops === null || typeof ops.byteLock !== "function") return null;
  const result = ops.byteLock(fd, byte, BYTE_LOCK_MODES[action]);
  if (result >= 0) return action === "test" ? result === 1 : true;
  const code = getSystemErrorName(result);
  if (code === "EAGAIN" || code === "EACCES") return false;
  if (UNSUPPORTED.has(code) || code === "ENOLCK") return null;
  throw systemError(result, "fcntl(F_OFD_SETLK)");
}
