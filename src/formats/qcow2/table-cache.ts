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
 * - While someone holds a table object across an await (a metadata update
 *   about to modify it, a read resolving many tables) eviction is held off
 *   (`holdEviction`), so a held table is never dropped and then modified or
 *   reloaded behind the holder's back.
 */
import type { ImageFile } from "../../io/file.ts";

export interface CachedTable {
  readonly hostOffset: number;
  readonly bytes: Uint8Array;
  readonly view: DataView;
  dirty: boolean;
  lastUsed: number;
}

export class TableCache {
  readonly #file: ImageFile;
  readonly #tableBytes: number;
  readonly entriesMax: number;
  readonly #entries = new Map<number, CachedTable>();
  readonly #inflight = new Map<number, Promise<CachedTable>>();
  #clock = 0;
  #evictionHolds = 0;

  constructor(file: ImageFile, tableBytes: number, entriesMax: number) {
    this.#file = file;
    this.#tableBytes = tableBytes;
    this.entriesMax = Math.max(2, entriesMax);
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
      const bytes = new Uint8Array(this.#tableBytes);
      await this.#file.read(hostOffset, bytes);
      const raced = this.#entries.get(hostOffset);
      if (raced !== undefined) return raced;
      // Make room first, so the table just loaded is never the one evicted.
      this.trim();
      const entry: CachedTable = { hostOffset, bytes, view: new DataView(bytes.buffer), dirty: false, lastUsed: ++this.#clock };
      this.#entries.set(hostOffset, entry);
      return entry;
    } finally {
      this.#inflight.delete(hostOffset);
    }
  }

  /** Insert a table (zeroed or a copy of `contents`), marked dirty. */
  create(hostOffset: number, contents?: Uint8Array): CachedTable {
    const bytes = new Uint8Array(this.#tableBytes);
    if (contents !== undefined) bytes.set(contents);
    const entry: CachedTable = { hostOffset, bytes, view: new DataView(bytes.buffer), dirty: true, lastUsed: ++this.#clock };
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

  dirtyTables(): CachedTable[] {
    const out: CachedTable[] = [];
    for (const entry of this.#entries.values()) if (entry.dirty) out.push(entry);
    return out.sort((a, b) => a.hostOffset - b.hostOffset);
  }

  hasDirty(): boolean {
    for (const entry of this.#entries.values()) if (entry.dirty) return true;
    return false;
  }

  /** Keep every table in the cache until the returned function is called. */
  holdEviction(): () => void {
    this.#evictionHolds++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.#evictionHolds--;
    };
  }

  /** Evict clean tables, least recently used first, down to 3/4 of the bound. */
  trim(): void {
    if (this.#evictionHolds > 0 || this.#entries.size < this.entriesMax) return;
    const clean = [...this.#entries.values()].filter((e) => !e.dirty).sort((a, b) => a.lastUsed - b.lastUsed);
    const target = Math.floor((this.entriesMax * 3) / 4);
    for (const entry of clean) {
      if (this.#entries.size <= target) break;
      this.#entries.delete(entry.hostOffset);
    }
  }
}
