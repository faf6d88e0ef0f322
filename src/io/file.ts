/**
 * The medium under every image: a file addressed by host offsets.
 *
 * Every format reads and writes its bytes through this interface and never
 * through node:fs directly, so tests can substitute an in-memory file or a
 * fault-injecting one (dropping unflushed writes, tearing writes, failing the
 * Nth write).
 */
/**
 * Largest write a caller makes with ImageFile.writeSync (Qcow2Image.write,
 * the NBD server's WRITEs): 1 MiB copies into the page cache in ~0.2-0.5 ms;
 * a 32 MiB write, or one throttled by dirty-page writeback, would stall the
 * event loop, and with it every other client of the process, much longer.
 */
export const WRITE_SYNC_BYTES_MAX = 1024 * 1024;

/** Size of the zero buffer writeZeroBytes writes from (one per process). */
const WRITE_ZEROES_CHUNK_BYTES = 1 << 20;

let zeroChunk: Uint8Array | null = null;

/**
 * Make [hostOffset, hostOffset + lengthBytes) of a file read as zeroes.
 * - Without `how`: zero bytes are written, a chunk at a time (the file grows
 *   to the range's end).
 * - "allocate": zeroed in place, allocated (ImageFile.zeroInPlace; the file
 *   grows as a write would), else written.
 * - "punch": a hole (ImageFile.zeroInPlace), else zero bytes written over
 *   the part inside the file; the file's size never changes (what lies past
 *   its end reads as zeroes already).
 */
export async function writeZeroBytes(file: ImageFile, hostOffset: number, lengthBytes: number, how?: ZeroInPlace): Promise<void> {
  if (lengthBytes <= 0) return;
  if (how !== undefined && (await file.zeroInPlace?.(hostOffset, lengthBytes, how)) === true) return;
  if (how === "punch") lengthBytes = Math.max(0, Math.min(lengthBytes, (await file.sizeBytes()) - hostOffset));
  zeroChunk ??= new Uint8Array(WRITE_ZEROES_CHUNK_BYTES);
  for (let done = 0; done < lengthBytes; ) {
    const chunk = zeroChunk.subarray(0, Math.min(lengthBytes - done, WRITE_ZEROES_CHUNK_BYTES));
    await file.write(hostOffset + done, chunk);
    done += chunk.length;
  }
}

export interface HolesOptions {
  /**
   * The answer may come from what the file found before (a data run), as
   * BlockDevice.readStatus allows: a hole made meanwhile through another
   * descriptor may show as data, never data as a hole.
   */
  knownDataOk?: boolean;
}

/**
 * Read `buffer.length` bytes at `hostOffset` as ImageFile.read does, but
 * fill the file's holes with zeroes instead of reading them. A read of a
 * hole that the page cache does not hold makes the kernel allocate and
 * zero a fresh page-cache page for each of its pages; a metadata table
 * with sparse pages (an image copied with `cp --sparse`, or whose tables
 * were written a chunk at a time) read this way costs two lseeks per data
 * run instead (measured: 200 such L2 tables read in 12 ms instead of 31 on
 * the AMD EPYC VM). A range the page cache holds whole (holes included,
 * once read) is read in one call (ImageFile.cached: cachestat): seeking
 * would cost more there. Where holes cannot be seen, or the file system's
 * answers are not known to be exact (ImageFile.holesReliable: a hole
 * reported over data would read as zeroed entries, and refcounts computed
 * from them would be wrong), it is a plain read.
 */
export async function readSkippingHoles(file: Pick<ImageFile, "read" | "holes" | "cached" | "holesReliable">, hostOffset: number, buffer: Uint8Array): Promise<void> {
  let runs: FileRun[] | null = null;
  if (file.holes !== undefined && file.holesReliable?.() === true) {
    try {
      if ((await file.cached?.(hostOffset, buffer.length)) !== true) runs = await file.holes(hostOffset, buffer.length);
    } catch {
      runs = null; // asking failed (a kernel or filter refusing the call): the plain read decides
    }
  }
  if (runs === null || (runs.length === 1 && !runs[0].hole && runs[0].lengthBytes === buffer.length)) {
    await file.read(hostOffset, buffer);
    return;
  }
  let covered = 0;
  for (const run of runs) {
    const from = run.hostOffset - hostOffset;
    const to = from + run.lengthBytes;
    if (run.hole) buffer.fill(0, from, to);
    else await file.read(run.hostOffset, buffer.subarray(from, to));
    covered = to;
  }
  buffer.fill(0, covered); // past the file's end
}

export interface ImageFile {
  /** Path or a descriptive name, used in error messages. */
  readonly name: string;
  readonly readOnly: boolean;
  /**
   * Read `buffer.length` bytes at `hostOffset`. Bytes past the end of the
   * file read as zeroes. Resolves to the number of bytes that came from the
   * file (the rest were zero-filled).
   */
  read(hostOffset: number, buffer: Uint8Array): Promise<number>;
  /** Write all of `data` at `hostOffset`, extending the file if needed. */
  write(hostOffset: number, data: Uint8Array): Promise<void>;
  /**
   * Optional: write `pieces` back to back starting at `hostOffset` in one
   * call (pwritev), with no copy into one buffer. Callers fall back to
   * `write` when a file does not provide it.
   */
  writev?(hostOffset: number, pieces: readonly Uint8Array[]): Promise<void>;
  /**
   * Optional: `write` done synchronously on the calling thread (pwrite);
   * throws what `write` would reject with. Absent when the file was opened
   * to write on a thread pool only.
   * For callers that decide themselves when blocking is cheap: the NBD
   * server's raw-file WRITEs, Qcow2Image.write() up to 1 MiB, and metadata
   * table write-back (no copy of a table is needed when nothing can run
   * during the write).
   */
  writeSync?(hostOffset: number, data: Uint8Array): void;
  /** Current length of the file in bytes. */
  sizeBytes(): Promise<number>;
  /** Set the file length (grow with zeroes or shrink). */
  truncate(sizeBytes: number): Promise<void>;
  /**
   * Make every completed write durable (fdatasync). A real file (NodeFile)
   * fails every flush after one failed: written data may be lost then. Test
   * files (MemoryFile, FaultFile) let a later flush succeed, so the engine's
   * own recovery is tested as well.
   */
  flush(): Promise<void>;
  /**
   * Tell the medium a range is no longer needed. It may read back as
   * anything afterwards unless the implementation says otherwise; callers
   * that need zeroes write them.
   */
  discard(hostOffset: number, lengthBytes: number): Promise<void>;
  /**
   * Optional: make [hostOffset, hostOffset + lengthBytes) read as zeroes
   * without writing them: "punch" deallocates the range (a hole: its space
   * returns to the host; the file's size does not change), "allocate" keeps
   * it allocated (and grows the file to the range's end). Resolves false
   * when the file system cannot; callers then write zeroes (writeZeroBytes
   * does both).
   */
  zeroInPlace?(hostOffset: number, lengthBytes: number, how: ZeroInPlace): Promise<boolean>;
  /**
   * Optional: allocate [hostOffset, hostOffset + lengthBytes) without
   * writing it (posix_fallocate: holes in it read as zeroes afterwards,
   * data stays), extending the file if it ends beyond. False when the file
   * system cannot.
   */
  preallocate?(hostOffset: number, lengthBytes: number): Promise<boolean>;
  /**
   * Optional: which parts of [hostOffset, hostOffset + lengthBytes) before
   * the file's end are holes (SEEK_DATA / SEEK_HOLE), as ordered runs that
   * cover it. Null when holes cannot be seen: treat it all as data.
   */
  holes?(hostOffset: number, lengthBytes: number, options?: HolesOptions): Promise<FileRun[] | null>;
  /**
   * Optional: whether the host's page cache holds all of [hostOffset,
   * hostOffset + lengthBytes) (cachestat); null where that cannot be asked.
   */
  cached?(hostOffset: number, lengthBytes: number): Promise<boolean | null>;
  /**
   * Optional: whether holes() answers on this file are exact enough to skip
   * reading metadata there: true on file systems whose SEEK_DATA/SEEK_HOLE
   * are known to be (ext4, xfs, btrfs, tmpfs); OpenZFS 2.2.0-2.2.1 reported
   * holes over dirty data, for one.
   */
  holesReliable?(): boolean;
  /** Optional: bytes the file occupies on the host (st_blocks * 512, what QEMU's file driver reports). */
  allocatedBytes?(): Promise<number>;
  close(): Promise<void>;
}

/** How ImageFile.zeroInPlace zeroes: free the space (a hole) or keep it allocated. */
export type ZeroInPlace = "punch" | "allocate";

/** A run of a file: a hole reads as zeroes and takes no space; the rest is data (or a file system that cannot tell). */
export interface FileRun {
  hostOffset: number;
  lengthBytes: number;
  hole: boolean;
}
