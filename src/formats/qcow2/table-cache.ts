/**
 * A bounded cache of one-cluster metadata tables (L2 tables or refcount
 * blocks) keyed by host offset.
 *
 * - `peek` is synchronous so the read path can resolve guest offsets without
 *   an async hop when the table is cached.
 * - Loads of the same table are de-duplicated; a table inserted by `create`
 *   while a load is in flight wins over the (stale) loaded bytes.
 * - Eviction (`trim`) only drops clean tables, least recently used first;
 *   dirty tables are written back by the owner (which knows the required
 *   write ordering) and then become evictable. The cache may therefore
 *   exceed its bound by the number of dirty tables until the owner writes
 *   them back.
 * - Dirtiness is kept per chunk (a 32nd of the table, at least a page):
 *   `markDirty` records which bytes changed, and write-back writes only the
 *   changed chunks (`dirtyRuns`). A snapshot pass flips COPIED in a few
 *   entries of each table it walks: over the 200 tables of a 100 GiB image
 *   with 1 GiB of data spread out, ~4 MiB are written instead of 12.8 (and
 *   flushed: QEMU writes whole tables). A table's bytes outside its dirty
 *   chunks equal the file's: it was loaded from there, or it is whole dirty
 *   (`create`).
 * - While someone holds a table object across an await (a metadata update
 *   about to modify it, a read resolving many tables) eviction is held off
 *   (`holdEviction`), so a held table is never dropped and then modified or
 *   reloaded behind the holder's back; the last release trims.
 */
import { assert } from "../../base/errors.ts";
import type { ImageFile } from "../../io/file.ts";

/** ArrayBuffer.prototype.transfer (ES2024, Node 22+), beyond the project's TypeScript lib. */
type DetachableBuffer = ArrayBuffer & { transfer(newLengthBytes: number): ArrayBuffer };

export interface CachedTable {
  readonly hostOffset: number;
  readonly bytes: Uint8Array;
  readonly view: DataView;
  /**
   * Bit i set: chunk i (dirtyChunkBytes) differs from the file; 0: clean.
   * Set with markDirty. A signed 32-bit value (bit 31 makes it negative):
   * test it against 0 with !==, never with >.
   */
  dirtyChunks: number;
  lastUsed: number;
}

/** Most chunks a table's dirtiness is kept in (one bit each of a 32-bit mask). */
const DIRTY_CHUNKS_MAX = 32;
/**
 * Smallest chunk: a page. Writing part of a page that the page cache does
 * not hold makes the kernel read the rest first, synchronously.
 */
const DIRTY_CHUNK_BYTES_MIN = 4096;

/** Bytes per dirty chunk of a table of `tableBytes`: a 32nd of it, at least a page, at most all of it. */
export function dirtyChunkBytes(tableBytes: number): number {
  return Math.min(tableBytes, Math.max(DIRTY_CHUNK_BYTES_MIN, tableBytes / DIRTY_CHUNKS_MAX));
}

/** The mask with every chunk of a table of `tableBytes` dirty. */
function wholeMask(tableBytes: number): number {
  const chunks = tableBytes / dirtyChunkBytes(tableBytes);
  return chunks >= 32 ? -1 : (1 << chunks) - 1;
}

/**
 * Record that `byteLength` bytes at `byteOffset` of the table changed (by
 * default all of it). Every change to a cached table's bytes is recorded
 * here: write-back writes the marked chunks only.
 */
export function markDirty(table: CachedTable, byteOffset = 0, byteLength = table.bytes.length): void {
  if (byteOffset < 0 || byteLength < 0 || byteOffset + byteLength > table.bytes.length) {
    assert(false, `dirty range [${byteOffset}, +${byteLength}) within the ${table.bytes.length}-byte table`);
  }
  const chunkBytes = dirtyChunkBytes(table.bytes.length);
  const last = Math.floor((byteOffset + byteLength - 1) / chunkBytes);
  for (let chunk = Math.floor(byteOffset / chunkBytes); chunk <= last; chunk++) table.dirtyChunks |= 1 << chunk;
}

/**
 * The byte ranges of a table of `tableBytes` that the dirty-chunk mask
 * `dirtyChunks` marks, as [byteOffset, byteLength] pairs, adjacent chunks
 * merged, in order.
 */
export function dirtyRuns(dirtyChunks: number, tableBytes: number): [byteOffset: number, byteLength: number][] {
  const chunkBytes = dirtyChunkBytes(tableBytes);
  const chunks = tableBytes / chunkBytes;
  const runs: [number, number][] = [];
  for (let chunk = 0; chunk < chunks; chunk++) {
    if ((dirtyChunks & (1 << chunk)) === 0) continue;
    const last = runs[runs.length - 1];
    if (last !== undefined && last[0] + last[1] === chunk * chunkBytes) last[1] += chunkBytes;
    else runs.push([chunk * chunkBytes, chunkBytes]);
  }
  return runs;
}

export class TableCache {
  readonly #file: ImageFile;
  readonly #tableBytes: number;
  readonly entriesMax: number;
  readonly #entries = new Map<number, CachedTable>();
  readonly #inflight = new Map<number, Promise<CachedTable>>();
  #clock = 0;
  #evictionHolds = 0;
  readonly #freeEvicted: boolean;
  /** Buffers of the tables the last trim evicted, detached at the next trim (freeEvicted). */
  #evicted: DetachableBuffer[] = [];

  /**
   * With `freeEvicted`, trim() detaches the buffer of every table it evicted
   * (ArrayBuffer.transfer(0), at the following trim): the memory goes back to
   * the allocator instead of waiting, as garbage, for a collection (V8 collects external
   * memory only after tens of MiB of it: a reader cycling a full cache of
   * 64 KiB tables would hold that much more than the bound). Only for tables
   * read through DataViews (L2 tables): a stale holder then fails with a
   * TypeError instead of reading another table's bytes.
   */
  constructor(file: ImageFile, tableBytes: number, entriesMax: number, options: { freeEvicted?: boolean } = {}) {
    this.#file = file;
    this.#tableBytes = tableBytes;
    this.entriesMax = Math.max(2, entriesMax);
    this.#freeEvicted = options.freeEvicted ?? false;
  }

  get size(): number {
    return this.#entries.size;
  }

  peek(hostOffset: number): CachedTable | undefined {
    const entry = this.#entries.get(hostOffset);
    if (entry !== undefined) entry.lastUsed = ++this.#clock;
    return entry;
  }

  get(hostOffset: number): Promise<CachedTable> | CachedTable {
    const cached = this.peek(hostOffset);
    if (cached !== undefined) return cached;
    let pending = this.#inflight.get(hostOffset);
    if (pending === undefined) {
      pending = this.#load(hostOffset);
      this.#inflight.set(hostOffset, pending);
    }
    return pending;
  }

  async #load(hostOffset: number): Promise<CachedTable> {
    try {
      // Not zeroed first: the read overwrites every byte (ImageFile.read zero-fills past the end
      // of the file). Slow = never a slice of Node's shared pool (trim detaches the buffer).
      const bytes = Buffer.allocUnsafeSlow(this.#tableBytes);
      await this.#file.read(hostOffset, bytes);
      const raced = this.#entries.get(hostOffset);
      if (raced !== undefined) return raced;
      // Make room first, so the table just loaded is never the one evicted.
      this.trim();
      const entry: CachedTable = { hostOffset, bytes, view: new DataView(bytes.buffer), dirtyChunks: 0, lastUsed: ++this.#clock };
      this.#entries.set(hostOffset, entry);
      return entry;
    } finally {
      this.#inflight.delete(hostOffset);
    }
  }

  /** Insert a table (zeroed or a copy of `contents`), marked dirty. */
  create(hostOffset: number, contents?: Uint8Array): CachedTable {
    const bytes = contents === undefined || contents.length < this.#tableBytes ? new Uint8Array(this.#tableBytes) : Buffer.allocUnsafeSlow(this.#tableBytes);
    if (contents !== undefined) bytes.set(contents);
    const entry: CachedTable = { hostOffset, bytes, view: new DataView(bytes.buffer), dirtyChunks: wholeMask(this.#tableBytes), lastUsed: ++this.#clock };
    this.#entries.set(hostOffset, entry);
    return entry;
  }

  /** Forget a table (its cluster was freed). */
  drop(hostOffset: number): void {
    this.#entries.delete(hostOffset);
  }

  /** Forget everything (after the structures were rebuilt elsewhere). */
  clear(): void {
    this.#entries.clear();
  }

  /** Every cached table, in no particular order (for checks of the cache against the file). */
  tables(): IterableIterator<CachedTable> {
    return this.#entries.values();
  }

  dirtyTables(): CachedTable[] {
    const out: CachedTable[] = [];
    for (const entry of this.#entries.values()) if (entry.dirtyChunks !== 0) out.push(entry);
    return out.sort((a, b) => a.hostOffset - b.hostOffset);
  }

  hasDirty(): boolean {
    for (const entry of this.#entries.values()) if (entry.dirtyChunks !== 0) return true;
    return false;
  }

  /**
   * Keep every table in the cache until the returned function is called.
   * The last release trims the cache: loads made under a hold (every load
   * of the read path) could not, so without it a reader alone would grow
   * the cache without bound.
   */
  holdEviction(): () => void {
    this.#evictionHolds++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.#evictionHolds--;
      if (this.#evictionHolds === 0) this.trim();
    };
  }

  /**
   * trim() for a caller that holds eviction off itself (`ownHolds` of the
   * holds are its own) and keeps no table from before the call: a long run
   * under the metadata mutex (zeroing or discarding a huge range) stays
   * within the bound. Does nothing while anyone else holds eviction off (a
   * reader may be using a table it looked up).
   */
  trimHeldBy(ownHolds: number): void {
    if (this.#evictionHolds > ownHolds) return;
    const holds = this.#evictionHolds;
    this.#evictionHolds = 0;
    try {
      this.trim();
    } finally {
      this.#evictionHolds = holds;
    }
  }

  /**
   * Evict clean tables, least recently used first, down to 3/4 of the
   * bound. With `freeEvicted`, the buffers evicted by the previous trim are
   * detached now (one trim later: a reader that peeked a table just before
   * it was evicted has long finished with it).
   */
  trim(): void {
    if (this.#evictionHolds > 0 || this.#entries.size < this.entriesMax) return;
    for (const buffer of this.#evicted) buffer.transfer(0);
    this.#evicted = [];
    const clean = [...this.#entries.values()].filter((e) => e.dirtyChunks === 0).sort((a, b) => a.lastUsed - b.lastUsed);
    const target = Math.floor((this.entriesMax * 3) / 4);
    for (const entry of clean) {
      if (this.#entries.size <= target) break;
      this.#entries.delete(entry.hostOffset);
      if (this.#freeEvicted) this.#evicted.push(entry.bytes.buffer as DetachableBuffer);
    }
  }
}
