/**
 * ImageFile over node:fs.
 *
 * Design notes
 * - I/O mode. Measured on Node 24 (bench/file-read.ts, page-cached 1 GiB file,
 *   one request at a time): random 4 KiB reads reach ~27k/s with
 *   `fs.promises` FileHandle.read, ~110k/s with callback `fs.read` and
 *   ~650k/s with `fs.readSync`; 1 MiB sequential reads reach 7.0, 7.6 and
 *   8.9 GB/s; with 8 requests in flight, 1 MiB reads reach ~12.5 GB/s with
 *   the thread pool but stay at ~7.8 GB/s with readSync. The thread-pool hop
 *   costs far more than a small copy, so the default mode ("auto") performs
 *   requests under ASYNC_IO_THRESHOLD_BYTES with a synchronous pread/pwrite
 *   on the calling thread (an already-settled promise; blocks the event loop
 *   for microseconds on cached data, a disk seek otherwise) and larger ones
 *   with callback fs.read/fs.write on libuv's pool, where they overlap.
 *   "sync" and "async" force one path (servers on cold, slow media may want
 *   "async"). "small-async" is auto's converse, for the writes of a raw NBD
 *   export: a small buffered write costs its time in the file system's
 *   per-call work, which the pool overlaps with the event loop's parsing,
 *   while large ones are a memory copy under the inode lock that concurrent
 *   writes to the same file contend for (measured: 256 KiB writes on the
 *   pool cost ~40% more CPU for the same throughput). All modes loop over
 *   short reads and writes.
 * - Bytes past the end of the file read as zeroes (the ImageFile contract).
 * - flush = fdatasync, unless the file was opened with cache "unsafe"
 *   (qemu's -t unsafe, the default target mode of qemu-img convert): then
 *   flush does nothing and durability is left to the kernel's writeback.
 * - Flushes run one at a time, and once one failed every later one fails
 *   with the same error (QEMU's file-posix does the same: its
 *   page_cache_inconsistent). Linux reports a writeback error to one
 *   fdatasync per open file: a flush that ran beside a failing one (a
 *   write-behind, io/write-behind.ts, beside a qcow2 metadata flush that
 *   orders tables after data), or after it, would return success although
 *   written data was lost, and whatever the caller orders after it would
 *   land on top of the loss. Callers that arrive while a flush runs share
 *   the one fdatasync that starts after it (it covers everything each of
 *   them wrote before calling).
 * - Hole punching, zeroing in place, preallocation and hole finding
 *   (discard, zeroInPlace, preallocate, holes) use fallocate and
 *   lseek(SEEK_DATA/SEEK_HOLE) from the optional native addon
 *   (io/native-file-ops.ts). Without it, or on a file system without them,
 *   discard does nothing (the ImageFile contract lets discarded ranges read
 *   back as anything, and space is not returned), zeroInPlace and
 *   preallocate report false (callers write zeroes) and holes reports null.
 * - holes() remembers the last data run it found, whole (from SEEK_DATA to
 *   the SEEK_HOLE after it, beyond the range asked about), and with
 *   knownDataOk answers a range inside it with no system call: a raw NBD
 *   export asks about every READ (to send holes as holes), and a fully
 *   allocated file is then one lookup. Only data is remembered, never a
 *   hole: a write makes data but nothing here sees it, while only this
 *   object's discard, zeroInPlace (and preallocate) and truncate can make
 *   holes, and they forget the run. A hole made through another descriptor
 *   (a data worker serving the same file) leaves the run remembered, so a
 *   READ sends its zeroes as data: the same bytes, never wrong ones. Map
 *   and block status never use it (they must be exact).
 * - allocateLargeWrites (opt-in, for a file written mostly into holes, as
 *   a new convert target is): writes of ALLOCATE_BEFORE_WRITE_BYTES or
 *   more allocate their range first (fallocate with FALLOC_FL_KEEP_SIZE),
 *   in the same thread-pool job as the pwritev when they run on the pool
 *   (the addon's writeAllocating), just before the pwrite when on this
 *   thread. On ext4 a buffered write
 *   into a hole otherwise reserves its blocks page by page (delayed
 *   allocation): measured on the AMD development VM, 1 GiB of 1 MiB writes
 *   into a new file took 0.48-0.53 s of kernel time plain and 0.40-0.44 s
 *   allocated first (C, page-cached source), and over allocated blocks the
 *   same either way (0.36 s); `img convert` into raw went 0.73-0.78 s ->
 *   0.44-0.58 s (qemu-img 0.53-0.62 s). The blocks allocated are exactly
 *   the write's, the size is set by the write, and a failed allocation is
 *   ignored (the write reports what matters). Not the default: over
 *   allocated blocks the fallocate is one more inode-lock and journal
 *   round per write, which cost a raw NBD export ~7% of nbdcopy's write
 *   throughput (several writers on one file). Without the addon, writes
 *   are plain node:fs ones.
 * - Writes to a file opened read-only fail with E_READ_ONLY before touching
 *   the file; every OS error becomes a coded error naming the path.
 */
import fs from "node:fs";
import { SnapstackError, assert, fromSystemError } from "../base/errors.ts";
import type { FileRun, HolesOptions, ImageFile, ZeroInPlace } from "./file.ts";
import { allocateForWrite, fileRuns, pagesCached, preallocate, punchHole, writeAllocating, zeroRange } from "./native-file-ops.ts";
import { lockImageFile, type ImageLock, type LockBits } from "./qemu-locks.ts";

export type NodeFileIoMode = "sync" | "async" | "auto" | "small-async";

/**
 * In "auto" mode, requests of at least this many bytes go to the thread pool
 * (they overlap when several are in flight, and do not block the event loop
 * for long); smaller ones run on the calling thread.
 */
export const ASYNC_IO_THRESHOLD_BYTES = 256 * 1024;

/**
 * With allocateLargeWrites, writes of at least this many bytes allocate
 * their range first (io/native-file-ops.ts allocateForWrite), in the same
 * thread-pool job when they run there.
 */
const ALLOCATE_BEFORE_WRITE_BYTES = 256 * 1024;

/** Whether a write of `bytes` allocates its range first (allocateLargeWrites). */
function allocatesFirst(allocateLarge: boolean, bytes: number): boolean {
  return allocateLarge && bytes >= ALLOCATE_BEFORE_WRITE_BYTES;
}

function useSync(ioMode: NodeFileIoMode, length: number): boolean {
  if (ioMode === "auto") return length < ASYNC_IO_THRESHOLD_BYTES;
  if (ioMode === "small-async") return length >= ASYNC_IO_THRESHOLD_BYTES;
  return ioMode === "sync";
}

/** "writeback": flush is fdatasync. "unsafe": flush is a no-op (qemu's cache=unsafe). */
export type NodeFileCacheMode = "writeback" | "unsafe";

export interface OpenNodeFileOptions {
  readOnly?: boolean;
  cache?: NodeFileCacheMode;
  /** "auto" (default), "sync", "async" or "small-async" (see the design notes). */
  ioMode?: NodeFileIoMode;
  /** Mode of writes when it differs from reads' (default: ioMode). */
  writeIoMode?: NodeFileIoMode;
  /** Large writes allocate their range first (see the design notes): for a file written mostly into holes. */
  allocateLargeWrites?: boolean;
}

export interface CreateNodeFileOptions {
  /** Fail with E_EXISTS instead of truncating an existing file. */
  exclusive?: boolean;
  ioMode?: NodeFileIoMode;
  cache?: NodeFileCacheMode;
}

function readOnce(fd: number, buffer: Uint8Array, offset: number, length: number, position: number, ioMode: NodeFileIoMode): number | Promise<number> {
  if (useSync(ioMode, length)) return fs.readSync(fd, buffer, offset, length, position);
  return new Promise((resolve, reject) => {
    fs.read(fd, buffer, offset, length, position, (error, bytesRead) => (error ? reject(error) : resolve(bytesRead)));
  });
}

function writevOnce(fd: number, pieces: readonly Uint8Array[], position: number, totalBytes: number, ioMode: NodeFileIoMode, allocateLarge: boolean): number | Promise<number> {
  const allocate = allocatesFirst(allocateLarge, totalBytes);
  if (useSync(ioMode, totalBytes)) {
    if (allocate) allocateForWrite(fd, position, totalBytes);
    return fs.writevSync(fd, pieces, position);
  }
  const allocating = allocate ? writeAllocating(fd, position, pieces) : null;
  if (allocating !== null) return allocating;
  return new Promise((resolve, reject) => {
    fs.writev(fd, pieces, position, (error, bytesWritten) => (error ? reject(error) : resolve(bytesWritten)));
  });
}

function writeSyncOnce(fd: number, data: Uint8Array, offset: number, length: number, position: number, allocateLarge: boolean): number {
  if (allocatesFirst(allocateLarge, length)) allocateForWrite(fd, position, length);
  return fs.writeSync(fd, data, offset, length, position);
}

function writeOnce(fd: number, data: Uint8Array, offset: number, length: number, position: number, ioMode: NodeFileIoMode, allocateLarge: boolean): number | Promise<number> {
  if (useSync(ioMode, length)) return writeSyncOnce(fd, data, offset, length, position, allocateLarge);
  const allocating = allocatesFirst(allocateLarge, length) ? writeAllocating(fd, position, [data.subarray(offset, offset + length)]) : null;
  if (allocating !== null) return allocating;
  return new Promise((resolve, reject) => {
    fs.write(fd, data, offset, length, position, (error, bytesWritten) => (error ? reject(error) : resolve(bytesWritten)));
  });
}

/** statfs f_type of ext4 (and ext2/3), xfs, btrfs and tmpfs: file systems whose SEEK_DATA/SEEK_HOLE answers are exact. */
const EXACT_HOLES_FILE_SYSTEMS = new Set([0xef53, 0x58465342, 0x9123683e, 0x01021994]);

export class NodeFile implements ImageFile {
  readonly name: string;
  readonly readOnly: boolean;
  readonly ioMode: NodeFileIoMode;
  /** How writes run (ioMode unless opened with writeIoMode). */
  readonly writeIoMode: NodeFileIoMode;
  readonly cache: NodeFileCacheMode;
  /** Writes of ALLOCATE_BEFORE_WRITE_BYTES or more allocate their range first (see the design notes). */
  allocateLargeWrites = false;
  #fd: number | null;
  /** The fdatasync running now, else null; flushes that arrive meanwhile wait for it and share #flushNext. */
  #flushRunning: Promise<void> | null = null;
  #flushNext: Promise<void> | null = null;
  /** The first failed flush: every later one fails with it. */
  #flushFailure: unknown = null;
  /** The last data run holes() found, [start, end) (empty when end <= start); see the design notes. */
  #dataRunStart = 0;
  #dataRunEnd = 0;
  /** Whether the file system's hole answers are exact (holesReliable), once asked. */
  #holesReliable: boolean | null = null;
  /** QEMU-style image locks this open holds (io/qemu-locks.ts), dropped when it closes. */
  #lock: ImageLock | null = null;

  constructor(name: string, fd: number, readOnly: boolean, ioMode: NodeFileIoMode, cache: NodeFileCacheMode = "writeback", writeIoMode: NodeFileIoMode = ioMode) {
    this.name = name;
    this.#fd = fd;
    this.readOnly = readOnly;
    this.ioMode = ioMode;
    this.writeIoMode = writeIoMode;
    this.cache = cache;
    if (writeIoMode !== "async") this.writeSync = (hostOffset, data) => this.#writeSync(hostOffset, data);
  }

  #openFd(action: string): number {
    if (this.#fd === null) throw new SnapstackError("E_IO", `${this.name}: cannot ${action}: file is closed`, { path: this.name });
    return this.#fd;
  }

  async read(hostOffset: number, buffer: Uint8Array): Promise<number> {
    // The message is built only on failure (a template literal costs ~0.2 us per call on the hot path).
    if (!Number.isSafeInteger(hostOffset) || hostOffset < 0) assert(false, `read offset ${hostOffset} is a non-negative integer`);
    const fd = this.#openFd("read");
    let done = 0;
    try {
      while (done < buffer.length) {
        // A synchronous pread returns a number: no await, so no microtask tick per call.
        const pending = readOnce(fd, buffer, done, buffer.length - done, hostOffset + done, this.ioMode);
        const got = typeof pending === "number" ? pending : await pending;
        if (got === 0) break;
        done += got;
      }
    } catch (error) {
      throw fromSystemError(error, this.name, `read ${buffer.length} bytes at offset ${hostOffset}`);
    }
    if (done < buffer.length) buffer.fill(0, done);
    return done;
  }

  /** The descriptor for a write at hostOffset, after the checks every write makes. */
  #writableFd(hostOffset: number): number {
    if (!Number.isSafeInteger(hostOffset) || hostOffset < 0) assert(false, `write offset ${hostOffset} is a non-negative integer`);
    if (this.readOnly) throw new SnapstackError("E_READ_ONLY", `${this.name}: cannot write: opened read-only`, { path: this.name });
    return this.#openFd("write");
  }

  async write(hostOffset: number, data: Uint8Array): Promise<void> {
    const fd = this.#writableFd(hostOffset);
    let done = 0;
    try {
      while (done < data.length) {
        const pending = writeOnce(fd, data, done, data.length - done, hostOffset + done, this.writeIoMode, this.allocateLargeWrites);
        done += typeof pending === "number" ? pending : await pending;
      }
    } catch (error) {
      throw fromSystemError(error, this.name, `write ${data.length} bytes at offset ${hostOffset}`);
    }
  }

  /**
   * ImageFile.writeSync: `write` as a synchronous pwrite on the calling
   * thread. Absent when writes were asked to run on the pool (writeIoMode
   * "async", qemu's aio=threads).
   */
  readonly writeSync?: (hostOffset: number, data: Uint8Array) => void;

  #writeSync(hostOffset: number, data: Uint8Array): void {
    const fd = this.#writableFd(hostOffset);
    let done = 0;
    try {
      while (done < data.length) done += writeSyncOnce(fd, data, done, data.length - done, hostOffset + done, this.allocateLargeWrites);
    } catch (error) {
      throw fromSystemError(error, this.name, `write ${data.length} bytes at offset ${hostOffset}`);
    }
  }

  /**
   * Write `pieces` back to back from `hostOffset` with one vectored call
   * (pwritev): no copy into one buffer, one syscall, and no concurrent
   * writes to neighbouring ranges of the file (on ext4 those contend for the
   * inode and cost several times the CPU). A short write is finished piece
   * by piece.
   */
  async writev(hostOffset: number, pieces: readonly Uint8Array[]): Promise<void> {
    const fd = this.#writableFd(hostOffset);
    const totalBytes = pieces.reduce((sum, piece) => sum + piece.length, 0);
    try {
      let done = await writevOnce(fd, pieces, hostOffset, totalBytes, this.writeIoMode, this.allocateLargeWrites);
      for (let index = 0, pieceStart = 0; done < totalBytes && index < pieces.length; pieceStart += pieces[index].length, index++) {
        const piece = pieces[index];
        while (done < pieceStart + piece.length) {
          const at = done - pieceStart;
          done += await writeOnce(fd, piece, at, piece.length - at, hostOffset + done, this.writeIoMode, this.allocateLargeWrites);
        }
      }
    } catch (error) {
      throw fromSystemError(error, this.name, `write ${totalBytes} bytes at offset ${hostOffset}`);
    }
  }

  async sizeBytes(): Promise<number> {
    const fd = this.#openFd("stat");
    try {
      return fs.fstatSync(fd).size;
    } catch (error) {
      throw fromSystemError(error, this.name, "stat");
    }
  }

  async truncate(sizeBytes: number): Promise<void> {
    assert(Number.isSafeInteger(sizeBytes) && sizeBytes >= 0, `truncate size ${sizeBytes} is a non-negative integer`);
    if (this.readOnly) throw new SnapstackError("E_READ_ONLY", `${this.name}: cannot truncate: opened read-only`, { path: this.name });
    const fd = this.#openFd("truncate");
    this.#forgetDataRun();
    try {
      await new Promise<void>((resolve, reject) => fs.ftruncate(fd, sizeBytes, (error) => (error ? reject(error) : resolve())));
    } catch (error) {
      throw fromSystemError(error, this.name, `truncate to ${sizeBytes} bytes`);
    } finally {
      this.#forgetDataRun();
    }
  }

  async flush(): Promise<void> {
    this.#openFd("flush");
    if (this.readOnly || this.cache === "unsafe") return;
    if (this.#flushRunning === null) return this.#startFlush();
    // Any fdatasync that starts after this call covers what the caller wrote: the next one, or
    // one another caller started first when the running one ended.
    const afterRunning = (): Promise<void> => this.#flushRunning ?? this.#startFlush();
    this.#flushNext ??= this.#flushRunning.then(afterRunning, afterRunning);
    return this.#flushNext;
  }

  /** One fdatasync, unless a flush failed before (see the design notes). Only while none runs. */
  #startFlush(): Promise<void> {
    this.#flushNext = null;
    if (this.#flushFailure !== null) return Promise.reject(this.#flushFailure);
    const fd = this.#openFd("flush");
    const running: Promise<void> = new Promise<void>((resolve, reject) =>
      fs.fdatasync(fd, (error) => {
        if (this.#flushRunning === running) this.#flushRunning = null;
        if (error === null) return resolve();
        this.#flushFailure ??= fromSystemError(error, this.name, "flush (fdatasync)");
        reject(this.#flushFailure);
      }),
    );
    this.#flushRunning = running;
    return running;
  }

  /** Punch a hole where the file system can (the range then reads as zeroes), else nothing (see the design notes). */
  async discard(hostOffset: number, lengthBytes: number): Promise<void> {
    assert(hostOffset >= 0 && lengthBytes >= 0, "discard range is non-negative");
    if (this.readOnly) throw new SnapstackError("E_READ_ONLY", `${this.name}: cannot discard: opened read-only`, { path: this.name });
    await this.#fallocate("discard", hostOffset, lengthBytes, punchHole);
  }

  async zeroInPlace(hostOffset: number, lengthBytes: number, how: ZeroInPlace): Promise<boolean> {
    this.#writableFd(hostOffset);
    return this.#fallocate(how === "punch" ? "punch a hole" : "zero", hostOffset, lengthBytes, how === "punch" ? punchHole : zeroRange);
  }

  async preallocate(hostOffset: number, lengthBytes: number): Promise<boolean> {
    this.#writableFd(hostOffset);
    return this.#fallocate("preallocate", hostOffset, lengthBytes, preallocate);
  }

  /** One fallocate on the thread pool (io/native-file-ops.ts); false when unsupported (nothing was changed then). */
  async #fallocate(action: string, hostOffset: number, lengthBytes: number, call: (fd: number, offset: number, length: number) => Promise<boolean>): Promise<boolean> {
    const fd = this.#openFd(action);
    // It may make holes: the data run known is forgotten before, and after (a holes() call while it ran may have seen the old data).
    this.#forgetDataRun();
    try {
      return await call(fd, hostOffset, lengthBytes);
    } catch (error) {
      throw fromSystemError(error, this.name, `${action} ${lengthBytes} bytes at offset ${hostOffset}`);
    } finally {
      this.#forgetDataRun();
    }
  }

  /** fileRuns' report of a data run: the one holes() answers from next. */
  readonly #noteDataRun = (start: number, end: number): void => {
    this.#dataRunStart = start;
    this.#dataRunEnd = end;
  };

  #forgetDataRun(): void {
    this.#dataRunStart = 0;
    this.#dataRunEnd = 0;
  }

  async holes(hostOffset: number, lengthBytes: number, options: HolesOptions = {}): Promise<FileRun[] | null> {
    const fd = this.#openFd("find holes");
    // Inside the last data run found: no fstat and no lseek (see the design notes).
    if (options.knownDataOk === true && lengthBytes > 0 && hostOffset >= this.#dataRunStart && hostOffset + lengthBytes <= this.#dataRunEnd) return [{ hostOffset, lengthBytes, hole: false }];
    try {
      return fileRuns(fd, hostOffset, lengthBytes, fs.fstatSync(fd).size, this.#noteDataRun);
    } catch (error) {
      throw fromSystemError(error, this.name, `find holes in ${lengthBytes} bytes at offset ${hostOffset}`);
    }
  }

  holesReliable(): boolean {
    if (this.#holesReliable === null) {
      try {
        this.#holesReliable = EXACT_HOLES_FILE_SYSTEMS.has(fs.statfsSync(`/proc/self/fd/${this.#openFd("stat its file system")}`).type);
      } catch {
        this.#holesReliable = false;
      }
    }
    return this.#holesReliable;
  }

  async cached(hostOffset: number, lengthBytes: number): Promise<boolean | null> {
    const fd = this.#openFd("ask the page cache");
    try {
      return pagesCached(fd, hostOffset, lengthBytes);
    } catch (error) {
      throw fromSystemError(error, this.name, `ask the page cache about ${lengthBytes} bytes at offset ${hostOffset}`);
    }
  }

  /** Bytes the file occupies on the host (stat blocks * 512), as `qemu-img info` reports as actual-size. */
  async allocatedBytes(): Promise<number> {
    const fd = this.#openFd("stat");
    try {
      return fs.fstatSync(fd).blocks * 512;
    } catch (error) {
      throw fromSystemError(error, this.name, "stat");
    }
  }

  /**
   * Take QEMU's image locks for `bits` on this file (io/qemu-locks.ts) and
   * hold them until it closes, in place of any taken before; or say why
   * another process's locks forbid it (then what was held before stays).
   * The locks go on the file this descriptor is open on, whatever its
   * name now.
   */
  lockImage(bits: LockBits): string | null {
    const lock = lockImageFile(`/proc/self/fd/${this.#openFd("lock")}`, bits);
    if (typeof lock === "string") return lock;
    this.#lock?.release();
    this.#lock = lock;
    return null;
  }

  async close(): Promise<void> {
    const fd = this.#fd;
    if (fd === null) return;
    this.#fd = null;
    // No fdatasync may run on a descriptor that is closed (and maybe reused).
    while (this.#flushRunning !== null) await this.#flushRunning.catch(() => undefined);
    try {
      fs.closeSync(fd);
    } catch (error) {
      throw fromSystemError(error, this.name, "close");
    } finally {
      this.#lock?.release();
      this.#lock = null;
    }
  }
}

export async function openNodeFile(path: string, options: OpenNodeFileOptions = {}): Promise<NodeFile> {
  const readOnly = options.readOnly ?? false;
  let fd: number;
  try {
    fd = fs.openSync(path, readOnly ? "r" : "r+");
  } catch (error) {
    throw fromSystemError(error, path, readOnly ? "open for reading" : "open for reading and writing");
  }
  const ioMode = options.ioMode ?? "auto";
  const file = new NodeFile(path, fd, readOnly, ioMode, options.cache, options.writeIoMode ?? ioMode);
  file.allocateLargeWrites = options.allocateLargeWrites ?? false;
  return file;
}

/** Create (or, unless exclusive, truncate) a file for reading and writing. */
export async function createNodeFile(path: string, options: CreateNodeFileOptions = {}): Promise<NodeFile> {
  let fd: number;
  try {
    fd = fs.openSync(path, options.exclusive ? "wx+" : "w+", 0o644);
  } catch (error) {
    throw fromSystemError(error, path, "create");
  }
  return new NodeFile(path, fd, false, options.ioMode ?? "auto", options.cache);
}

/** fsync a directory so a newly created entry in it survives a crash. */
export async function syncDirectory(path: string): Promise<void> {
  let fd: number;
  try {
    fd = fs.openSync(path, "r");
  } catch (error) {
    throw fromSystemError(error, path, "open directory");
  }
  try {
    fs.fsyncSync(fd);
  } catch (error) {
    throw fromSystemError(error, path, "sync directory");
  } finally {
    fs.closeSync(fd);
  }
}
