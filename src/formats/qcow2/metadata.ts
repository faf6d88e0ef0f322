/**
 * Qcow2Metadata: the in-memory state of an open qcow2 image's metadata and
 * every operation that changes it, with QEMU's ordering rules.
 *
 * State: the header, the active L1 table (whole, in memory), the refcount
 * table (whole, in memory), and two bounded caches of one-cluster tables
 * (L2 tables, refcount blocks).
 *
 * Allocation is a port of QEMU 7.2's qcow2-refcount.c so that images we
 * create and grow have the same layout as QEMU's: first fit from
 * `freeClusterIndex` (alloc_clusters_noref), refcounts raised afterwards
 * (update_refcount) with "try again" when a new refcount block had to be
 * placed (alloc_refcount_block; self-describing blocks; a full refcount
 * table is replaced by qcow2_refcount_area's table + blocks at the end),
 * byte-packed compressed allocation (qcow2_alloc_bytes).
 *
 * Write ordering (reference §10) without per-write syncs: both caches are
 * write-back; after a refcount increase L2 tables depend on refcount blocks
 * (refcount blocks are written first), after a decrease refcount blocks
 * depend on L2 tables; setting one dependency first resolves the other, as
 * qcow2_cache_set_dependency does. Guest data written since the last file
 * flush is flushed before any L2 table reaches the file. New L2 tables, L1
 * entries, refcount table entries and header fields are written through
 * with a flush, as QEMU does. A crash can therefore leak clusters but never
 * leave a reference to a cluster with a too-small refcount (lazy refcounts
 * excepted, where the dirty bit covers it).
 *
 * All mutating methods must be called under the image's metadata mutex.
 */
import { SnapstackError, assert } from "../../base/errors.ts";
import { readSkippingHoles, writeZeroBytes, type ImageFile } from "../../io/file.ts";
import { isAllZero } from "../../io/io-buffer.ts";
import { INCOMPAT_EXTL2, encodeQcow2Header, type Qcow2Header } from "./header.ts";
import { compressedStreamBytes } from "./compression.ts";
import { COMPRESSED_SECTOR_BYTES, HI_OFFSET_UNSAFE, compressedReadBytes, L1_ENTRY_BYTES, LO_OFFSET_MASK, TWO_POW_32, getL1EntryOffset, l2EntryBytes, setL1Entry, type L2Entry } from "./entries.ts";
import { REFTABLE_BYTES_MAX, REFTABLE_ENTRY_BYTES, encodeRefcountTable, getRefcount, refcountByteOffset, changeRefcountRun, refcountEntryBytes, refcountMax, refcountsPerBlock, setRefcount } from "./refcount-block.ts";
import { TableCache, dirtyChunkBytes, dirtyRuns, markDirty, type CachedTable } from "./table-cache.ts";
import { OverlapGuard, type MetadataStructure } from "./metadata-overlap.ts";
import { CHECK_CLUSTERS_MAX } from "./reference-counter.ts";

/** QCOW_MAX_L1_SIZE: 32 MiB of active L1 table. */
export const L1_BYTES_MAX = 32 * 1024 * 1024;
/**
 * Default bound of both metadata caches together: 14 MiB of L2 tables cover
 * 112 GiB of guest disk at 64 KiB clusters (QEMU's default 32 MiB of L2
 * covers 256 GiB; a snapshot pass over a 100 GiB disk's 200 tables must fit,
 * or each of apply's three passes reads them all again); 2 MiB of refcount
 * blocks cover 64 GiB of host file (QEMU's default: 256 KiB). Was 32 MiB
 * with a quarter for refcount blocks: a reader of a 1 TiB sparse image then
 * peaked at ~98 MiB of RSS against issue 2's 100 MiB
 * (bench/memory.bench.ts). A miss costs one page-cached read of a cluster;
 * callers with a larger working set pass cacheBytesMax.
 */
export const METADATA_CACHE_BYTES_DEFAULT = 16 * 1024 * 1024;
/** Share of the cache bound given to refcount blocks (the rest holds L2 tables). */
const REFBLOCK_CACHE_SHARE = 0.125;
/**
 * Clusters the allocator hands out at most: the largest file check and the
 * refcount rebuild can examine (CHECK_CLUSTERS_MAX: 8 TiB at 64 KiB
 * clusters). Bounds how far damaged refcounts can push an allocation.
 */
export const FILE_CLUSTERS_MAX = CHECK_CLUSTERS_MAX;
/** L1 entries are written in 512-byte blocks, as qcow2_write_l1_entry does. */
const L1_WRITE_BLOCK_BYTES = 512;

export interface Qcow2Geometry {
  clusterBits: number;
  clusterSizeBytes: number;
  extendedL2: boolean;
  /** Entries per L2 table. */
  l2Entries: number;
  l2EntryBytes: number;
  /** Guest bytes covered by one L2 table. */
  l2CoverageBytes: number;
  subclusterSizeBytes: number;
  refcountOrder: number;
  refcountBlockEntries: number;
  refcountMax: number;
}

export function qcow2Geometry(header: Qcow2Header): Qcow2Geometry {
  const clusterSizeBytes = 2 ** header.clusterBits;
  const extendedL2 = (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
  const entryBytes = l2EntryBytes(extendedL2);
  const l2Entries = clusterSizeBytes / entryBytes;
  return {
    clusterBits: header.clusterBits,
    clusterSizeBytes,
    extendedL2,
    l2Entries,
    l2EntryBytes: entryBytes,
    l2CoverageBytes: l2Entries * clusterSizeBytes,
    subclusterSizeBytes: extendedL2 ? clusterSizeBytes / 32 : clusterSizeBytes,
    refcountOrder: header.refcountOrder,
    refcountBlockEntries: refcountsPerBlock(header.clusterBits, header.refcountOrder),
    refcountMax: refcountMax(header.refcountOrder),
  };
}

/** L1 entries needed for a virtual size (size_to_l1). */
export function l1EntriesForSize(sizeBytes: number, geometry: Qcow2Geometry): number {
  return Math.ceil(sizeBytes / geometry.l2CoverageBytes);
}

/**
 * qcow2_refcount_metadata_size: refcount blocks (and table clusters) needed
 * to cover `clusters` clusters plus themselves.
 */
export function refcountMetadataSize(
  clusters: number,
  clusterSizeBytes: number,
  refcountOrder: number,
  generousIncrease: boolean,
): { bytes: number; refblockCount: number } {
  const blocksPerTableCluster = clusterSizeBytes / REFTABLE_ENTRY_BYTES;
  const refcountsPerBlockCount = (clusterSizeBytes * 8) / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  let generous = generousIncrease;
  let total = clusters;
  do {
    last = n;
    blocks = Math.ceil((total + table + blocks) / refcountsPerBlockCount);
    table = Math.ceil(blocks / blocksPerTableCluster);
    n = total + blocks + table;
    if (n === last && generous) {
      total += Math.ceil(table / 2);
      n = 0;
      generous = false;
    }
  } while (n !== last);
  return { bytes: (blocks + table) * clusterSizeBytes, refblockCount: blocks };
}

const AGAIN = Symbol("again");

function be64(value: number): Uint8Array {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt(value));
  return out;
}

/** A zero 16-bit refcount, searched for by the allocator. */
const ZERO_REFCOUNT16 = Buffer.alloc(2);

/** Refcount table bytes are compared against this in blocks: all-zero blocks (no refcount block) need no decoding. */
const REFTABLE_ZERO_BLOCK = Buffer.alloc(4096);

/**
 * The refcount block offsets of a refcount table (decodeRefcountTable's
 * blockOffset: reserved bits 0-8 dropped, offsets past 2^53 clamped to
 * MAX_SAFE_INTEGER) from 32-bit words, without a BigInt and an object per
 * entry: every layer of a chain decodes its table at open (100 layers with
 * one-cluster tables: 800,000 entries). Most entries are zero: 4 KiB blocks
 * of zeroes are skipped by one native compare each (in a process that has
 * just started, a JS loop over a one-cluster table's 8192 entries cost
 * several milliseconds of every open).
 */
function decodeReftableOffsets(bytes: Uint8Array): number[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const tableBytes = bytes.length - (bytes.length % REFTABLE_ENTRY_BYTES);
  const offsets: number[] = new Array<number>(tableBytes / REFTABLE_ENTRY_BYTES).fill(0);
  for (let block = 0; block < tableBytes; block += REFTABLE_ZERO_BLOCK.length) {
    const blockEnd = Math.min(block + REFTABLE_ZERO_BLOCK.length, tableBytes);
    if (REFTABLE_ZERO_BLOCK.compare(bytes, block, blockEnd, 0, blockEnd - block) === 0) continue;
    for (let at = block; at < blockEnd; at += REFTABLE_ENTRY_BYTES) {
      const hi = view.getUint32(at);
      offsets[at / REFTABLE_ENTRY_BYTES] = hi >= HI_OFFSET_UNSAFE ? Number.MAX_SAFE_INTEGER : hi * TWO_POW_32 + ((view.getUint32(at + 4) & LO_OFFSET_MASK) >>> 0);
    }
  }
  return offsets;
}

export function corruption(message: string, details: Record<string, unknown> = {}): SnapstackError {
  return new SnapstackError("E_CORRUPT_IMAGE", message, details);
}

export class Qcow2Metadata {
  readonly file: ImageFile;
  header: Qcow2Header;
  readonly geometry: Qcow2Geometry;
  /** Active L1 table bytes (l1Size entries). */
  l1: Uint8Array;
  l1View: DataView;
  /** Refcount block offsets, one per refcount table entry. */
  reftable: number[];
  readonly l2Cache: TableCache;
  readonly refblockCache: TableCache;
  freeClusterIndex = 0;
  freeByteOffset = 0;
  /** With lazy refcounts and the dirty bit set, refcounts need not be ordered. */
  lazyRefcounts = false;
  #l2DependsOnRefblocks = false;
  #refblocksDependOnL2 = false;
  #dataNeedsFlush = false;
  /** An L2 table was written outside the cache (writeUncachedL2) and not flushed since. */
  #uncachedL2Unflushed = false;
  /**
   * Wipe after delete: while set, every host cluster whose refcount drops to 0
   * is remembered, and overwritten with zeroes by completeFreeing() or, if it is
   * allocated again before that, when it is allocated (so a partial write by
   * its new owner cannot leave old bytes behind), and punched once zeroed
   * (the space returns to the host, where the file system can). Set for a whole
   * session (commit's base) here, or for one operation with whileFreeing.
   */
  wipeFreedClusters = false;
  readonly #wipePending = new Set<number>();
  /**
   * Operations inside whileFreeing, without and with wipe. Counters, not
   * saved and restored flags: operations overlap (a guest discard holds the
   * metadata lock while a snapshot apply waits for it inside whileFreeing),
   * and a restore in the wrong order would leave a flag set for good.
   */
  #freeingDepth = 0;
  #wipingDepth = 0;
  /**
   * Discard passthrough (QEMU's pass-discard-request/-snapshot/-always: on
   * for guest discards and unmapping zero writes, snapshot operations,
   * emptying and shrinking; off for clusters a write replaces): while set,
   * every host cluster whose refcount drops to 0 gets a hole punched by
   * completeFreeing (ImageFile.discard), unless it was allocated again
   * before. Unlike a wipe, nothing is written where the file system cannot
   * punch and nothing is flushed: a discarded cluster may read as anything.
   * On inside whileFreeing.
   */
  get discardFreedClusters(): boolean {
    return this.#freeingDepth > 0;
  }

  /** Wiping freed clusters: for the session (wipeFreedClusters) or inside whileFreeing({ wipe: true }). */
  get #wiping(): boolean {
    return this.wipeFreedClusters || this.#wipingDepth > 0;
  }

  readonly #discardPending = new Set<number>();
  /** Every cluster whose refcount dropped to 0 while wiping, until completeFreeing (zeroed whole, or reused whole: no partial wipe there). */
  readonly #droppedWhileWiping = new Set<number>();
  /**
   * Compressed clusters whose reference a wiping operation dropped, by host
   * offset: [guest cluster, bytes from the offset to the end of its last
   * sector]. Their host clusters may stay in use by other compressed
   * clusters packed beside them, so the refcount never reaches 0; once no
   * L1 tree maps them any more, completeFreeing zeroes exactly their bytes.
   */
  readonly #compressedDrops = new Map<number, [guestCluster: number, readBytes: number]>();
  /**
   * Whether an L1 tree (active or an internal snapshot) still maps
   * `guestCluster` to the compressed data at `hostOffset` (a compressed
   * cluster is mapped only at its own guest offset). Set by the image; null:
   * dropped compressed data is never wiped partially.
   */
  compressedDataMapped: ((guestCluster: number, hostOffset: number) => Promise<boolean>) | null = null;
  /** Refuses writes that would land on live metadata (QEMU's overlap check, "cached" mode). */
  readonly overlap: OverlapGuard;

  constructor(file: ImageFile, header: Qcow2Header, l1: Uint8Array, reftable: number[], cacheBytesMax: number) {
    this.file = file;
    this.header = header;
    this.geometry = qcow2Geometry(header);
    this.l1 = l1;
    this.l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    this.reftable = reftable;
    const cs = this.geometry.clusterSizeBytes;
    const tablesMax = Math.max(4, Math.floor(cacheBytesMax / cs));
    const refblocksMax = Math.max(2, Math.floor(tablesMax * REFBLOCK_CACHE_SHARE));
    this.l2Cache = new TableCache(file, cs, Math.max(2, tablesMax - refblocksMax), { freeEvicted: true });
    this.refblockCache = new TableCache(file, cs, refblocksMax);
    this.overlap = new OverlapGuard(this);
  }

  /** Guest data (or compressed data) is about to be written here: it must not hit metadata. */
  checkDataWrite(hostOffset: number, lengthBytes: number): void {
    this.overlap.check(hostOffset, lengthBytes, null);
  }

  /** Read the L1 table and refcount table the header points to. */
  static async load(file: ImageFile, header: Qcow2Header, cacheBytesMax: number): Promise<Qcow2Metadata> {
    const l1 = new Uint8Array(header.l1Size * L1_ENTRY_BYTES);
    if (l1.length > 0) await file.read(header.l1TableOffset, l1);
    const reftableBytes = new Uint8Array(header.refcountTableClusters * 2 ** header.clusterBits);
    if (reftableBytes.length > 0) await file.read(header.refcountTableOffset, reftableBytes);
    const reftable = decodeReftableOffsets(reftableBytes);
    const meta = new Qcow2Metadata(file, header, l1, reftable, cacheBytesMax);
    meta.overlap.noteFileEnd(await file.sizeBytes());
    return meta;
  }

  /** Hold off eviction of L2 tables and refcount blocks (see TableCache). */
  holdEviction(): () => void {
    const releaseL2 = this.l2Cache.holdEviction();
    const releaseRefblocks = this.refblockCache.holdEviction();
    return () => {
      releaseL2();
      releaseRefblocks();
    };
  }

  get clusterSizeBytes(): number {
    return this.geometry.clusterSizeBytes;
  }

  get l1Size(): number {
    return this.header.l1Size;
  }

  /** Note that guest data was written: it must reach the disk before any L2 table does. */
  noteDataWritten(): void {
    this.#dataNeedsFlush = true;
  }

  // ---------------------------------------------------------------- header

  /** Rewrite cluster 0 (header, extensions, backing name) and flush. */
  async writeHeader(): Promise<void> {
    const encoded = encodeQcow2Header(this.header);
    await this.file.write(0, encoded);
    await this.file.flush();
  }

  /**
   * Rewrite the header so that a crash tearing the write at any sector
   * leaves the old header or the new one. QEMU rewrites the header cluster
   * in one write; with the feature name table the backing name lies past
   * the first sector, so a torn write could pair the new name offset and
   * size with stale name bytes (an image that no longer opens), or the old
   * offset with a cleared name. Here, when the header (or the header
   * without the feature table) fits in the first sector: that sector first
   * (it refers to nothing beyond it), then the full header's later
   * sectors, then, if it was the compact one, the full first sector; each
   * flushed. The final bytes are QEMU's.
   */
  async writeHeaderTornSafe(): Promise<void> {
    const sectorBytes = 512;
    const full = encodeQcow2Header(this.header);
    const compact = encodeQcow2Header(this.header, { featureTable: false });
    const fitsInSector = (bytes: Uint8Array): boolean => bytes.subarray(sectorBytes).every((byte) => byte === 0);
    const first = fitsInSector(full) ? full : fitsInSector(compact) ? compact : null;
    if (first === null) {
      await this.writeHeader();
      return;
    }
    await this.writeHeaderBytes(0, first.subarray(0, sectorBytes));
    await this.writeHeaderBytes(sectorBytes, full.subarray(sectorBytes));
    if (first !== full) await this.writeHeaderBytes(0, full.subarray(0, sectorBytes));
  }

  /** Synchronously update a few header bytes (QEMU's bdrv_pwrite_sync of single fields). */
  async writeHeaderBytes(hostOffset: number, bytes: Uint8Array): Promise<void> {
    await this.file.write(hostOffset, bytes);
    await this.file.flush();
  }

  /** Set the autoclear features (header bytes 88-95), synced. */
  async writeAutoclearFeatures(features: bigint): Promise<void> {
    const bytes = new Uint8Array(8);
    new DataView(bytes.buffer).setBigUint64(0, features);
    await this.writeHeaderBytes(88, bytes);
    this.header.autoclearFeatures = features;
  }

  async writeIncompatibleFeatures(): Promise<void> {
    const bytes = new Uint8Array(8);
    new DataView(bytes.buffer).setBigUint64(0, this.header.incompatibleFeatures);
    await this.writeHeaderBytes(72, bytes);
  }

  // -------------------------------------------------------------- ordering

  async #setL2DependsOnRefblocks(): Promise<void> {
    // Resolved with lazy refcounts too: a cluster freed since the L2 tables were last written
    // may be handed out again now, and the tables that dropped it must reach the disk before
    // anything is written into it (else a crash leaves an old L2 entry showing another guest
    // range's data). As QEMU, lazy refcounts skip only the increase dependency.
    if (this.#refblocksDependOnL2) {
      await this.writeDirtyL2();
      this.#refblocksDependOnL2 = false;
    }
    if (this.lazyRefcounts) return;
    this.#l2DependsOnRefblocks = true;
  }

  async #setRefblocksDependOnL2(): Promise<void> {
    if (this.#l2DependsOnRefblocks) {
      await this.writeDirtyRefblocks();
      this.#l2DependsOnRefblocks = false;
    }
    this.#refblocksDependOnL2 = true;
  }

  async #writeTables(cache: TableCache): Promise<void> {
    const dirty = cache.dirtyTables();
    if (dirty.length === 0) return;
    const structure = cache === this.l2Cache ? "active L2 table" : "refcount block";
    // Only a table's changed chunks are written (table-cache.ts), and a table counts as clean from
    // the moment its write starts: eviction is held off until the flush, or a reader could drop it
    // and load the file's bytes between two of its writes (missing the later chunks, yet clean).
    // A table may change while an asynchronous write of it is in flight (the pwrite runs on the
    // thread pool while JavaScript goes on), so such a write goes out from a copy of its dirty runs
    // taken before the first of its writes: the file gets the bytes the write ordering was decided
    // for, never a mix. One copy buffer serves the whole batch (the writes are sequential). Where
    // the file has a synchronous write, nothing can run during it: the table's own bytes go out,
    // no copy (a snapshot operation writes ~200 tables: a copy, a promise and a thread-pool hop
    // each).
    const release = cache.holdEviction();
    try {
      let copy: Uint8Array | null = null;
      for (const table of dirty) {
        if (this.file.writeSync === undefined) copy ??= new Uint8Array(this.clusterSizeBytes);
        await this.#writeDirtyRuns(table, structure, copy);
      }
      await this.file.flush();
      if (cache === this.l2Cache) this.#uncachedL2Unflushed = false; // this flush covered those tables too
    } finally {
      release();
    }
  }

  /**
   * Write a table's dirty chunks and mark it clean (dirty again if a write
   * fails). Without a synchronous write, the chunks go out from `copy` (see
   * #writeTables); the caller flushes.
   */
  async #writeDirtyRuns(table: CachedTable, structure: MetadataStructure, copy: Uint8Array | null): Promise<void> {
    this.overlap.check(table.hostOffset, this.clusterSizeBytes, structure);
    const writeSync = this.file.writeSync;
    const dirtyChunks = table.dirtyChunks;
    table.dirtyChunks = 0;
    const runs = dirtyRuns(dirtyChunks, table.bytes.length);
    let source = table.bytes;
    if (writeSync === undefined) {
      assert(copy !== null, "a copy buffer for asynchronous table writes");
      for (const [byteOffset, byteLength] of runs) copy.set(table.bytes.subarray(byteOffset, byteOffset + byteLength), byteOffset);
      source = copy;
    }
    try {
      for (const [byteOffset, byteLength] of runs) {
        const bytes = source.subarray(byteOffset, byteOffset + byteLength);
        if (writeSync !== undefined) writeSync.call(this.file, table.hostOffset + byteOffset, bytes);
        else await this.file.write(table.hostOffset + byteOffset, bytes);
      }
    } catch (error) {
      table.dirtyChunks |= dirtyChunks;
      throw error;
    }
  }

  /** Tables readUncachedL2 read in part: the chunks it read, as a dirty-chunk mask (kept apart so that every table has one shape). */
  readonly #chunksRead = new WeakMap<CachedTable, number>();

  /**
   * Read an L2 table that is not cached into `bytes` (one cluster), as a
   * table object that is not cached either: a snapshot pass walks ~200
   * tables through one buffer this way, where caching them would fault in
   * ~3,200 fresh pages (create and delete on the bench's 100 GiB image:
   * ~9 ms less each, of ~100, on the development VM). The file's holes are
   * not read (readSkippingHoles): a table with sparse pages would fault in
   * a zeroed page-cache page for each.
   * With `entries` (the indexes of the entries the caller will look at),
   * only the dirty chunks (table-cache.ts) that
   * hold them are read; the rest of `bytes` keeps what it held, and since
   * write-back writes dirty chunks only, it never reaches the file (a
   * pass that knows a table's used entries from an earlier pass reads ~5
   * pages of the bench's tables instead of 16).
   * Only under the image's exclusive lock (nothing else may load or change
   * the table meanwhile); write it back with writeUncachedL2.
   */
  async readUncachedL2(l2Offset: number, bytes: Uint8Array, entries?: Int32Array): Promise<CachedTable> {
    assert(bytes.length === this.clusterSizeBytes && this.l2Cache.peek(l2Offset) === undefined, "an uncached L2 table, one cluster");
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (entries === undefined) {
      await readSkippingHoles(this.file, l2Offset, bytes);
      return { hostOffset: l2Offset, bytes, view, dirtyChunks: 0, lastUsed: 0 };
    }
    // The chunks holding the entries, as a dirty-chunk mask: read as write-back would write them.
    // An entry never straddles two chunks (entries are 8 or 16 bytes, chunks at least a page).
    const entryBytes = this.geometry.l2EntryBytes;
    const chunkBytes = dirtyChunkBytes(bytes.length);
    let loadedChunks = 0;
    for (const l2Index of entries) loadedChunks |= 1 << Math.floor((l2Index * entryBytes) / chunkBytes);
    for (const [byteOffset, byteLength] of dirtyRuns(loadedChunks, bytes.length)) await this.file.read(l2Offset + byteOffset, bytes.subarray(byteOffset, byteOffset + byteLength));
    const table = { hostOffset: l2Offset, bytes, view, dirtyChunks: 0, lastUsed: 0 };
    this.#chunksRead.set(table, loadedChunks);
    return table;
  }

  /**
   * Write back the dirty chunks of a table from readUncachedL2 now, in the
   * order a cached table's write-back keeps: after the refcount blocks it
   * depends on and flushed guest data; the refcount blocks that depend on
   * it are written only after a flush (writeDirtyL2).
   */
  async writeUncachedL2(table: CachedTable): Promise<void> {
    if (table.dirtyChunks === 0) return;
    // A chunk that was not read holds the buffer's old bytes: writing it would corrupt the table.
    const chunksRead = this.#chunksRead.get(table);
    assert(chunksRead === undefined || (table.dirtyChunks & ~chunksRead) === 0, "only the chunks read of a partly read L2 table are changed");
    await this.#beforeL2Writes(true);
    // The buffer is the caller's alone, and the caller waits for this write: it is its own copy.
    this.#uncachedL2Unflushed = true;
    await this.#writeDirtyRuns(table, "active L2 table", table.bytes);
  }

  /**
   * What must be on disk before L2 tables are written: the refcount blocks
   * they depend on, and (when tables are about to be written) guest data.
   */
  async #beforeL2Writes(tablesFollow: boolean): Promise<void> {
    if (this.#l2DependsOnRefblocks) {
      this.#l2DependsOnRefblocks = false;
      await this.writeDirtyRefblocks();
    }
    if (tablesFollow && this.#dataNeedsFlush) {
      this.#dataNeedsFlush = false;
      await this.file.flush();
    }
  }

  /** Write dirty L2 tables (after what they depend on); without any, flush the ones writeUncachedL2 wrote. */
  async writeDirtyL2(): Promise<void> {
    const dirty = this.l2Cache.hasDirty();
    await this.#beforeL2Writes(dirty);
    if (dirty) {
      await this.#writeTables(this.l2Cache);
    } else if (this.#uncachedL2Unflushed) {
      this.#uncachedL2Unflushed = false;
      await this.file.flush();
    }
  }

  /** Write dirty refcount blocks (after what they depend on). */
  async writeDirtyRefblocks(): Promise<void> {
    if (this.#refblocksDependOnL2) {
      this.#refblocksDependOnL2 = false;
      await this.writeDirtyL2();
    }
    await this.#writeTables(this.refblockCache);
  }

  /** Write all dirty metadata in order (qcow2_write_caches). */
  async writeCaches(): Promise<void> {
    await this.writeDirtyL2();
    await this.writeDirtyRefblocks();
  }

  /** Keep the caches within bounds: write back and evict when over. */
  async trimCaches(): Promise<void> {
    // Called by the holder of the metadata mutex, which holds eviction off: trim happens on release.
    if (this.#overBound()) {
      await this.writeCaches();
      this.l2Cache.trim();
      this.refblockCache.trim();
    }
  }

  /**
   * trimCaches in the middle of a long run by the holder of the metadata
   * mutex, whose `ownHolds` eviction holds are the only ones and who keeps
   * no table across the call (TableCache.trimHeldBy): growing an image by
   * 511 GiB over a longer backing file held all 1,022 new L2 tables (64
   * MiB) until the end.
   */
  async trimCachesHeldBy(ownHolds: number): Promise<void> {
    if (this.#overBound()) {
      await this.writeCaches();
      this.l2Cache.trimHeldBy(ownHolds);
      this.refblockCache.trimHeldBy(ownHolds);
    }
  }

  #overBound(): boolean {
    return this.l2Cache.size > this.l2Cache.entriesMax || this.refblockCache.size > this.refblockCache.entriesMax;
  }

  // ------------------------------------------------------------- refcounts

  #refblockOffset(clusterIndex: number): number {
    const tableIndex = Math.floor(clusterIndex / this.geometry.refcountBlockEntries);
    if (tableIndex >= this.reftable.length) return 0;
    const blockOffset = this.reftable[tableIndex];
    if (blockOffset % this.clusterSizeBytes !== 0) {
      throw corruption(`Refblock offset 0x${blockOffset.toString(16)} unaligned (reftable index: 0x${tableIndex.toString(16)})`);
    }
    return blockOffset;
  }

  /** The refcount when its refcount block is cached (no await, for loops over many clusters), else undefined. */
  peekRefcount(clusterIndex: number): number | undefined {
    const blockOffset = this.#refblockOffset(clusterIndex);
    if (blockOffset === 0) return 0;
    const block = this.refblockCache.peek(blockOffset);
    return block === undefined ? undefined : getRefcount(block.bytes, clusterIndex % this.geometry.refcountBlockEntries, this.geometry.refcountOrder);
  }

  async getRefcount(clusterIndex: number): Promise<number> {
    const blockOffset = this.#refblockOffset(clusterIndex);
    if (blockOffset === 0) return 0;
    const block = this.refblockCache.peek(blockOffset) ?? (await this.refblockCache.get(blockOffset));
    return getRefcount(block.bytes, clusterIndex % this.geometry.refcountBlockEntries, this.geometry.refcountOrder);
  }

  /**
   * The first cluster index at or after `from` whose refcount may be 0,
   * passing over used clusters in bulk while their refcount blocks are
   * cached and hold 16-bit refcounts (the default): a native search for a
   * zero 16-bit word instead of a refcount lookup per cluster (the first
   * allocation after an open passes every used cluster, 16k per GiB of
   * data, in a process that has just started). Stops at anything else; the
   * caller checks each cluster from there.
   */
  #skipUsedClusters(from: number): number {
    if (this.geometry.refcountOrder !== 4) return from;
    const entries = this.geometry.refcountBlockEntries;
    let clusterIndex = from;
    while (clusterIndex < FILE_CLUSTERS_MAX) {
      const blockOffset = this.#refblockOffset(clusterIndex);
      const block = blockOffset === 0 ? undefined : this.refblockCache.peek(blockOffset);
      if (block === undefined) return clusterIndex;
      const blockStart = clusterIndex - (clusterIndex % entries);
      const bytes = Buffer.from(block.bytes.buffer, block.bytes.byteOffset, block.bytes.byteLength);
      for (let at = bytes.indexOf(ZERO_REFCOUNT16, 2 * (clusterIndex - blockStart)); at >= 0; at = bytes.indexOf(ZERO_REFCOUNT16, at + 1)) {
        // Two zero bytes: a free cluster when they are one aligned 16-bit word.
        if (at % 2 === 0) return blockStart + at / 2;
      }
      clusterIndex = blockStart + entries;
    }
    return clusterIndex;
  }

  async #allocClustersNoref(count: number): Promise<number> {
    for (;;) {
      this.freeClusterIndex = this.#skipUsedClusters(this.freeClusterIndex);
      let free = true;
      for (let i = 0; i < count; i++) {
        const clusterIndex = this.freeClusterIndex++;
        if (clusterIndex >= FILE_CLUSTERS_MAX) {
          // Refcounts claiming every cluster used (a damaged or hostile refcount structure) would
          // otherwise push the allocator, and the file, towards 2^50 bytes.
          this.freeClusterIndex = clusterIndex;
          throw new SnapstackError("E_TOO_LARGE", `${this.file.name}: no free cluster below ${FILE_CLUSTERS_MAX} clusters (the largest file check can examine); the refcounts may be damaged`);
        }
        // No await while the refcount block is cached: the first allocation after an open scans
        // every used cluster from the start (as QEMU's free_cluster_index does), 16k of them
        // for 1 GiB of data, and an await per cluster cost ~25 ms there.
        if ((this.peekRefcount(clusterIndex) ?? (await this.getRefcount(clusterIndex))) !== 0) {
          free = false;
          break;
        }
      }
      if (free) return (this.freeClusterIndex - count) * this.clusterSizeBytes;
    }
  }

  /**
   * update_refcount: add or subtract `addend` for every cluster touching
   * [hostOffset, hostOffset + lengthBytes). Returns AGAIN when a refcount
   * block had to be allocated (changes made are rolled back; the caller
   * searches for free space again). `referenced`: the clusters are in use
   * (a snapshot's raise): one whose refcount is 0 is corruption, refused
   * (what the call changed before it is undone), not counted as newly in use.
   */
  async #updateRefcount(hostOffset: number, lengthBytes: number, addend: number, decrease: boolean, referenced = false): Promise<typeof AGAIN | undefined> {
    if (lengthBytes <= 0) return undefined;
    // No await when nothing is to be written first (a pass over a tree calls this per range).
    if (decrease) {
      if (this.#l2DependsOnRefblocks) await this.#setRefblocksDependOnL2();
      else this.#refblocksDependOnL2 = true;
    }
    const cs = this.clusterSizeBytes;
    const start = Math.floor(hostOffset / cs) * cs;
    const last = Math.floor((hostOffset + lengthBytes - 1) / cs) * cs;
    const entries = this.geometry.refcountBlockEntries;
    let block: CachedTable | null = null;
    let oldTableIndex = -1;
    let clusterOffset = start;
    let again = false;
    let failure: unknown = null;
    // Changes that leave a refcount in [1, max] go a run at a time (changeRefcountRun); a raise has
    // other effects only on a freed cluster waiting to be wiped or punched, so while any waits, a run
    // stops at every free one. The rest, one at a time.
    const minOld = !decrease && (referenced || this.#wipePending.size > 0 || this.#discardPending.size > 0) ? 1 : 0;
    const order = this.geometry.refcountOrder;
    try {
      for (; clusterOffset <= last; clusterOffset += cs) {
        let clusterIndex = clusterOffset / cs;
        const tableIndex = Math.floor(clusterIndex / entries);
        if (tableIndex !== oldTableIndex || block === null) {
          if ((decrease || referenced) && this.#refblockOffset(clusterIndex) === 0) {
            // No refcount block: the refcount is 0 and cannot drop (a reference to a cluster
            // nothing counts, e.g. past the end); never place refcount structures for it.
            failure = decrease
              ? corruption(`refcount of host cluster ${clusterIndex} would drop below zero (no refcount block covers it)`, { hostOffset: clusterOffset })
              : corruption(`host cluster ${clusterIndex} is in use but no refcount block covers it`, { hostOffset: clusterOffset });
            break;
          }
          const cachedOffset = this.#refblockOffset(clusterIndex);
          const result = (cachedOffset !== 0 ? this.refblockCache.peek(cachedOffset) : undefined) ?? (await this.#allocRefcountBlock(clusterIndex));
          if (result === AGAIN) {
            if (this.freeClusterIndex > start / cs) this.freeClusterIndex = start / cs;
            again = true;
            break;
          }
          block = result;
        }
        oldTableIndex = tableIndex;
        let blockIndex = clusterIndex % entries;
        const count = Math.min((last - clusterOffset) / cs + 1, entries - blockIndex);
        const changed = changeRefcountRun(block.bytes, blockIndex, count, order, decrease ? -addend : addend, this.geometry.refcountMax, minOld);
        if (changed > 0) {
          const firstByte = refcountByteOffset(blockIndex, order);
          markDirty(block, firstByte, refcountByteOffset(blockIndex + changed - 1, order) + refcountEntryBytes(order) - firstByte);
          if (!decrease) this.overlap.noteFileEnd(clusterOffset + changed * cs);
        }
        if (changed === count) {
          clusterOffset += (count - 1) * cs;
          continue;
        }
        // The run stopped at a cluster (in this block) that overflows, drops below zero, is freed, or is free and may be pending.
        clusterOffset += changed * cs;
        clusterIndex += changed;
        blockIndex += changed;
        let refcount = getRefcount(block.bytes, blockIndex, this.geometry.refcountOrder);
        if (referenced && refcount === 0) {
          failure = corruption(`host cluster ${clusterIndex} is in use but its refcount is 0`, { hostOffset: clusterOffset });
          break;
        }
        if (decrease ? refcount < addend : refcount + addend > this.geometry.refcountMax) {
          failure = this.#refcountOutOfRange(clusterIndex, decrease);
          break;
        }
        refcount = decrease ? refcount - addend : refcount + addend;
        if (refcount === 0 && clusterIndex < this.freeClusterIndex) this.freeClusterIndex = clusterIndex;
        setRefcount(block.bytes, blockIndex, this.geometry.refcountOrder, refcount);
        markDirty(block, refcountByteOffset(blockIndex, this.geometry.refcountOrder), refcountEntryBytes(this.geometry.refcountOrder));
        if (!decrease) this.overlap.noteFileEnd(clusterOffset + cs);
        if (refcount === 0 && this.#wiping) {
          this.#wipePending.add(clusterIndex);
          this.#droppedWhileWiping.add(clusterIndex);
        }
        else if (refcount === 0 && this.discardFreedClusters) this.#discardPending.add(clusterIndex);
        else if (!decrease && this.#wipePending.size > 0 && this.#wipePending.delete(clusterIndex)) await this.#writeZeroClusters([clusterIndex]);
        if (!decrease && this.#discardPending.size > 0) this.#discardPending.delete(clusterIndex);
        if (refcount === 0) {
          // A freed cluster may be reused for anything: stop packing compressed data into it.
          if (this.freeByteOffset !== 0 && Math.floor(this.freeByteOffset / cs) === clusterIndex) this.freeByteOffset = 0;
          if (block.hostOffset === clusterOffset) {
            block = null;
            oldTableIndex = -1;
          }
          this.refblockCache.drop(clusterOffset);
          this.l2Cache.drop(clusterOffset);
        }
      }
    } catch (error) {
      failure = error;
    }
    if (again || failure !== null) {
      try {
        await this.#updateRefcount(hostOffset, clusterOffset - hostOffset, addend, !decrease);
      } catch {
        // Best effort, as QEMU: a failed undo leaves a leak at worst.
      }
      if (failure !== null) throw failure;
      return AGAIN;
    }
    return undefined;
  }

  #refcountOutOfRange(clusterIndex: number, decrease: boolean): SnapstackError {
    return decrease
      ? new SnapstackError("E_CORRUPT_IMAGE", `refcount of host cluster ${clusterIndex} would drop below zero`)
      : new SnapstackError("E_TOO_LARGE", `refcount of host cluster ${clusterIndex} would exceed ${this.geometry.refcountMax} (refcount_bits=${2 ** this.geometry.refcountOrder})`);
  }

  /** alloc_refcount_block: the block covering clusterIndex, or AGAIN after placing a new one. */
  async #allocRefcountBlock(clusterIndex: number): Promise<CachedTable | typeof AGAIN> {
    const cs = this.clusterSizeBytes;
    const entries = this.geometry.refcountBlockEntries;
    const tableIndex = Math.floor(clusterIndex / entries);
    const existing = this.#refblockOffset(clusterIndex);
    if (existing !== 0) return this.refblockCache.peek(existing) ?? (await this.refblockCache.get(existing));

    // We write to the refcount table, so we might depend on L2 tables.
    await this.writeDirtyL2();
    const newBlock = await this.#allocClustersNoref(1);
    this.overlap.noteFileEnd(newBlock + cs);
    if (Math.floor(newBlock / cs / entries) === tableIndex) {
      // The block describes itself (create marks it whole dirty).
      const block = this.refblockCache.create(newBlock);
      setRefcount(block.bytes, (newBlock / cs) % entries, this.geometry.refcountOrder, 1);
    } else {
      // Described elsewhere: recurses at most twice before reaching a self-describing block.
      if ((await this.#updateRefcount(newBlock, cs, 1, false)) === AGAIN) return AGAIN;
      await this.writeDirtyRefblocks();
      this.refblockCache.create(newBlock);
    }
    // The new (zeroed or self-counting) block reaches the file before the table points at it.
    await this.writeDirtyRefblocks();

    if (tableIndex < this.reftable.length) {
      this.overlap.check(this.header.refcountTableOffset + tableIndex * REFTABLE_ENTRY_BYTES, REFTABLE_ENTRY_BYTES, "refcount table");
      await this.file.write(this.header.refcountTableOffset + tableIndex * REFTABLE_ENTRY_BYTES, be64(newBlock));
      await this.file.flush();
      this.reftable[tableIndex] = newBlock;
      this.overlap.note(newBlock, "refcount block");
      return AGAIN;
    }

    // The refcount table is full: new table + blocks at the end, covering themselves.
    const blocksUsed = Math.ceil(Math.max(clusterIndex + 1, newBlock / cs + 1) / entries);
    const metaOffset = blocksUsed * entries * cs;
    await this.refcountArea(metaOffset, 0, false, tableIndex, newBlock);
    return AGAIN;
  }

  /**
   * qcow2_refcount_area: create refcount blocks and a new refcount table at
   * startOffset (free space up to the end), covering the existing clusters,
   * `additionalClusters` more, and themselves; switch the header to it and
   * free the old table. Returns the end offset of the new structures.
   */
  async refcountArea(startOffset: number, additionalClusters: number, exactSize: boolean, newRefblockIndex: number, newRefblockOffset: number): Promise<number> {
    const cs = this.clusterSizeBytes;
    const entries = this.geometry.refcountBlockEntries;
    assert(startOffset % cs === 0, "refcount area starts on a cluster boundary");
    const { refblockCount: totalRefblockCount } = refcountMetadataSize(startOffset / cs + additionalClusters, cs, this.geometry.refcountOrder, !exactSize);
    if (totalRefblockCount * REFTABLE_ENTRY_BYTES > REFTABLE_BYTES_MAX) {
      throw new SnapstackError("E_TOO_LARGE", "qcow2 refcount table would exceed its maximum size");
    }
    const areaReftableIndex = Math.floor(startOffset / cs / entries);
    let tableSize = exactSize ? totalRefblockCount : totalRefblockCount + Math.ceil(totalRefblockCount / 2);
    const entriesPerCluster = cs / REFTABLE_ENTRY_BYTES;
    tableSize = Math.ceil(tableSize / entriesPerCluster) * entriesPerCluster;
    const tableClusters = (tableSize * REFTABLE_ENTRY_BYTES) / cs;
    if (tableSize * REFTABLE_ENTRY_BYTES > REFTABLE_BYTES_MAX) {
      throw new SnapstackError("E_TOO_LARGE", "qcow2 refcount table would exceed its maximum size");
    }
    const newTable = new Array<number>(tableSize).fill(0);
    let maxIndex = -1;
    this.reftable.forEach((offset, i) => {
      if (offset !== 0) maxIndex = i;
    });
    const copyCount = tableSize > maxIndex ? maxIndex + 1 : tableSize;
    for (let i = 0; i < copyCount && i < this.reftable.length; i++) newTable[i] = this.reftable[i];
    if (newRefblockOffset) {
      assert(newRefblockIndex < totalRefblockCount, "new refcount block index within the new table");
      newTable[newRefblockIndex] = newRefblockOffset;
    }
    let additionalRefblocks = 0;
    for (let i = areaReftableIndex; i < totalRefblockCount; i++) if (!newTable[i]) additionalRefblocks++;
    const tableOffset = startOffset + additionalRefblocks * cs;
    const endOffset = tableOffset + tableClusters * cs;
    if (endOffset / cs > FILE_CLUSTERS_MAX) {
      throw new SnapstackError("E_TOO_LARGE", `${this.file.name}: refcount structures would end at cluster ${endOffset / cs}, past ${FILE_CLUSTERS_MAX} (the largest file check can examine)`);
    }
    this.overlap.noteFileEnd(endOffset);

    let blockOffset = startOffset;
    for (let i = areaReftableIndex; i < totalRefblockCount; i++) {
      let block: CachedTable;
      if (newTable[i]) {
        block = this.refblockCache.peek(newTable[i]) ?? (await this.refblockCache.get(newTable[i]));
      } else {
        block = this.refblockCache.create(blockOffset);
        newTable[i] = blockOffset;
        blockOffset += cs;
      }
      const firstOffsetCovered = i * entries * cs;
      if (firstOffsetCovered < endOffset) {
        let j = firstOffsetCovered < startOffset ? (startOffset - firstOffsetCovered) / cs : 0;
        const endIndex = Math.min((endOffset - firstOffsetCovered) / cs, entries);
        for (; j < endIndex; j++) {
          assert(getRefcount(block.bytes, j, this.geometry.refcountOrder) === 0, "refcount area is free");
          setRefcount(block.bytes, j, this.geometry.refcountOrder, 1);
        }
        markDirty(block);
      }
    }
    assert(blockOffset === tableOffset, "refcount blocks end where the table starts");
    await this.writeDirtyRefblocks();

    await this.file.write(tableOffset, encodeRefcountTable(newTable, tableSize));
    await this.file.flush();
    const fields = new Uint8Array(12);
    const view = new DataView(fields.buffer);
    view.setBigUint64(0, BigInt(tableOffset));
    view.setUint32(8, tableClusters);
    await this.writeHeaderBytes(48, fields);

    const oldTableOffset = this.header.refcountTableOffset;
    const oldTableBytes = this.reftable.length * REFTABLE_ENTRY_BYTES;
    this.reftable = newTable;
    this.header.refcountTableOffset = tableOffset;
    this.header.refcountTableClusters = tableClusters;
    await this.freeClusters(oldTableOffset, oldTableBytes);
    return endOffset;
  }

  /** qcow2_alloc_clusters: `lengthBytes` rounded up to clusters, contiguous, refcount 1. */
  async allocClusters(lengthBytes: number): Promise<number> {
    const count = Math.ceil(lengthBytes / this.clusterSizeBytes);
    assert(count > 0, "allocating at least one cluster");
    for (;;) {
      const hostOffset = await this.#allocClustersNoref(count);
      if ((await this.#updateRefcount(hostOffset, count * this.clusterSizeBytes, 1, false)) !== AGAIN) {
        await this.#setL2DependsOnRefblocks();
        return hostOffset;
      }
    }
  }

  /** qcow2_alloc_clusters_at: allocate up to `count` free clusters starting exactly at hostOffset; returns how many. */
  async allocClustersAt(hostOffset: number, count: number): Promise<number> {
    if (count === 0) return 0;
    const cs = this.clusterSizeBytes;
    for (;;) {
      let free = 0;
      while (free < count && (await this.getRefcount(hostOffset / cs + free)) === 0) free++;
      if ((await this.#updateRefcount(hostOffset, free * cs, 1, false)) !== AGAIN) {
        if (free > 0) await this.#setL2DependsOnRefblocks();
        return free;
      }
    }
  }

  /** qcow2_alloc_bytes: byte-packed space for compressed data. */
  async allocBytes(lengthBytes: number): Promise<number> {
    const cs = this.clusterSizeBytes;
    assert(lengthBytes > 0 && lengthBytes <= cs, "compressed allocation of at most one cluster");
    let offset = this.freeByteOffset;
    if (offset !== 0 && (await this.getRefcount(Math.floor(offset / cs))) === this.geometry.refcountMax) offset = 0;
    let freeInCluster = cs - (offset % cs);
    for (;;) {
      if (offset === 0 || freeInCluster < lengthBytes) {
        const newCluster = await this.#allocClustersNoref(1);
        if (newCluster === 0) throw corruption("Preventing invalid allocation of compressed cluster at offset 0");
        if (offset === 0 || Math.ceil(offset / cs) * cs !== newCluster) {
          offset = newCluster;
          freeInCluster = cs;
        } else {
          freeInCluster += cs;
        }
      }
      const result = await this.#updateRefcount(offset, lengthBytes, 1, false);
      if (result !== AGAIN) break;
      offset = 0;
    }
    await this.#setL2DependsOnRefblocks();
    this.freeByteOffset = (offset + lengthBytes) % cs === 0 ? 0 : offset + lengthBytes;
    return offset;
  }

  /** qcow2_free_clusters: decrement every cluster touching the range. */
  async freeClusters(hostOffset: number, lengthBytes: number): Promise<void> {
    await this.#updateRefcount(hostOffset, lengthBytes, 1, true);
  }

  /**
   * Raise refcounts of every cluster touching the range by one (snapshots).
   * The L2 tables written after this depend on it (QEMU: the snapshot
   * pass's cache dependency): a table whose COPIED bits a create clears
   * reaches the disk only after the raised refcounts.
   */
  async increaseRefcounts(hostOffset: number, lengthBytes: number): Promise<void> {
    // The clusters are in use: a refcount of 0 is corruption (raising it would hide it, and a
    // table counted once would keep COPIED and be changed in place under the snapshot).
    // Never AGAIN: a cluster no refcount block covers is refused, so no block is placed.
    assert((await this.#updateRefcount(hostOffset, lengthBytes, 1, false, true)) !== AGAIN, "a raise of clusters in use placed a refcount block");
    if (!this.#l2DependsOnRefblocks) await this.#setL2DependsOnRefblocks();
  }

  /** qcow2_free_any_cluster: release what an L2 entry referenced (`guestCluster`: where it was mapped, for a wipe of compressed data). */
  async freeEntry(entry: L2Entry, guestCluster?: number): Promise<void> {
    switch (entry.type) {
      case "normal":
      case "zero-alloc":
        await this.freeClusters(entry.hostOffset, this.clusterSizeBytes);
        return;
      case "compressed": {
        const start = entry.hostOffset - (entry.hostOffset % COMPRESSED_SECTOR_BYTES);
        await this.freeClusters(start, entry.compressedSectors * COMPRESSED_SECTOR_BYTES);
        if (guestCluster !== undefined) this.noteCompressedDrop(guestCluster, entry.hostOffset, compressedReadBytes(entry.hostOffset, entry.compressedSectors));
        return;
      }
      default:
        return;
    }
  }

  // -------------------------------------------------------------- L1 / L2

  l1EntryOffset(l1Index: number): number {
    if (l1Index >= this.header.l1Size) return 0;
    return getL1EntryOffset(this.l1View, l1Index);
  }

  l1EntryCopied(l1Index: number): boolean {
    return l1Index < this.header.l1Size && (this.l1[l1Index * L1_ENTRY_BYTES] & 0x80) !== 0;
  }

  /** Cached L2 table if present (sync), for the read path. */
  peekL2(l2Offset: number): CachedTable | undefined {
    return this.l2Cache.peek(l2Offset);
  }

  async getL2(l2Offset: number): Promise<CachedTable> {
    if (!Number.isSafeInteger(l2Offset)) throw corruption(`L2 table offset 0x${l2Offset.toString(16)} beyond 8 PiB`);
    if (l2Offset % this.clusterSizeBytes !== 0) {
      throw corruption(`L2 table offset 0x${l2Offset.toString(16)} unaligned`);
    }
    return this.l2Cache.peek(l2Offset) ?? (await this.l2Cache.get(l2Offset));
  }

  /** Write the 512-byte block of the on-disk L1 table holding entry l1Index (qcow2_write_l1_entry). */
  async writeL1Entry(l1Index: number): Promise<void> {
    const perBlock = Math.min(L1_WRITE_BLOCK_BYTES, this.clusterSizeBytes) / L1_ENTRY_BYTES;
    const start = l1Index - (l1Index % perBlock);
    const count = Math.min(perBlock, this.header.l1Size - start);
    this.overlap.check(this.header.l1TableOffset + start * L1_ENTRY_BYTES, count * L1_ENTRY_BYTES, "active L1 table");
    await this.file.write(this.header.l1TableOffset + start * L1_ENTRY_BYTES, this.l1.slice(start * L1_ENTRY_BYTES, (start + count) * L1_ENTRY_BYTES));
    await this.file.flush();
  }

  /**
   * get_cluster_table: the L2 table for l1Index, writable in place
   * (allocated, or copied when shared, and the L1 entry updated).
   */
  async getL2ForWrite(l1Index: number): Promise<CachedTable> {
    assert(l1Index < this.header.l1Size, "L1 index within the table");
    const oldOffset = this.l1EntryOffset(l1Index);
    if (oldOffset % this.clusterSizeBytes !== 0) throw corruption(`L2 table offset 0x${oldOffset.toString(16)} unaligned (L1 index: ${l1Index})`);
    if (oldOffset !== 0 && this.l1EntryCopied(l1Index)) return this.getL2(oldOffset);
    // l2_allocate
    const newOffset = await this.allocClusters(this.clusterSizeBytes);
    if (newOffset === 0) throw corruption("Preventing invalid allocation of L2 table at offset 0");
    await this.writeDirtyRefblocks();
    let contents: Uint8Array | undefined;
    if (oldOffset !== 0) contents = (await this.getL2(oldOffset)).bytes;
    const table = this.l2Cache.create(newOffset, contents);
    const oldEntry = this.l1.slice(l1Index * L1_ENTRY_BYTES, (l1Index + 1) * L1_ENTRY_BYTES);
    try {
      await this.writeDirtyL2();
      setL1Entry(this.l1, l1Index, { l2Offset: newOffset, copied: true });
      this.overlap.note(newOffset, "active L2 table");
      await this.writeL1Entry(l1Index);
    } catch (error) {
      // The L1 entry on disk is the old one or the new one: keep the in-memory entry as it
      // was (the next write of this L1 block must not publish a table nothing was written
      // through), and leak the new table rather than free it (the disk may point at it).
      this.l1.set(oldEntry, l1Index * L1_ENTRY_BYTES);
      this.l2Cache.drop(newOffset);
      throw error;
    }
    if (oldOffset !== 0) await this.freeClusters(oldOffset, this.clusterSizeBytes);
    return table;
  }

  /**
   * qcow2_grow_l1_table: a new, larger L1 at a fresh place, then the header
   * switched to it, then the old one freed.
   */
  async growL1(minEntries: number, exactSize: boolean): Promise<void> {
    const oldSize = this.header.l1Size;
    if (minEntries <= oldSize) return;
    let newSize: number;
    if (exactSize) newSize = minEntries;
    else {
      newSize = Math.max(oldSize, 1);
      while (minEntries > newSize) newSize = Math.ceil((newSize * 3) / 2);
    }
    if (newSize * L1_ENTRY_BYTES > L1_BYTES_MAX) {
      throw new SnapstackError("E_TOO_LARGE", "The image size is too large for file format 'qcow2' (try using a larger cluster size)");
    }
    const newL1 = new Uint8Array(newSize * L1_ENTRY_BYTES);
    newL1.set(this.l1);
    const newOffset = await this.allocClusters(newL1.length);
    await this.writeDirtyRefblocks();
    this.overlap.check(newOffset, newL1.length, null);
    await this.file.write(newOffset, newL1);
    await this.file.flush();
    const fields = new Uint8Array(12);
    const view = new DataView(fields.buffer);
    view.setUint32(0, newSize);
    view.setBigUint64(4, BigInt(newOffset));
    await this.writeHeaderBytes(36, fields);
    const oldOffset = this.header.l1TableOffset;
    this.l1 = newL1;
    this.l1View = new DataView(newL1.buffer);
    this.header.l1Size = newSize;
    this.header.l1TableOffset = newOffset;
    await this.freeClusters(oldOffset, oldSize * L1_ENTRY_BYTES);
  }

  /**
   * Run `fn`, which frees clusters, with discard passthrough on and, with
   * `wipe`, wiping on, for as long as it runs (see #freeingDepth). The
   * caller runs completeFreeing once the metadata that freed them is written.
   */
  async whileFreeing<T>(options: { wipe?: boolean }, fn: () => Promise<T>): Promise<T> {
    const wipe = options.wipe === true;
    this.#freeingDepth++;
    if (wipe) this.#wipingDepth++;
    try {
      return await fn();
    } finally {
      this.#freeingDepth--;
      if (wipe) this.#wipingDepth--;
    }
  }

  /**
   * Write the caches back (writeCaches, which flushes after each table
   * cache), and only then, so that no table on disk can map a punched or
   * zeroed cluster after a crash: overwrite with zeroes every cluster freed
   * while wiping that is still free (clusters taken since by refcount
   * structures were rewritten whole) and flush, so the old bytes are gone
   * from the disk's blocks and not only from the file; then punch holes in
   * them, and in those freed while discardFreedClusters was set, as QEMU's
   * discards do (the space returns to the host). The crash tests check this
   * order (FaultFile models a punch as a volatile write of zeroes).
   */
  async completeFreeing(): Promise<void> {
    await this.writeCaches();
    await this.#wipeDroppedCompressed();
    this.#droppedWhileWiping.clear();
    const wiped = this.#wipePending.size > 0 ? await this.#stillFree(this.#wipePending) : [];
    if (wiped.length > 0) {
      await this.#writeZeroClusters(wiped);
      // The zeroes reach the disk before the punch: a punch first would drop them from the page cache unwritten.
      await this.file.flush();
    }
    const discarded = this.#discardPending.size > 0 ? await this.#stillFree(this.#discardPending) : [];
    const cs = this.clusterSizeBytes;
    for (const [first, end] of clusterRuns([...wiped, ...discarded].sort((a, b) => a - b))) await this.file.discard(first * cs, (end - first) * cs);
  }

  /** Clusters freed with discard passthrough whose holes completeFreeing has yet to punch. */
  get discardsPending(): number {
    return this.#discardPending.size;
  }

  /** The clusters of `pending` whose refcount is 0, sorted; `pending` is emptied. */
  async #stillFree(pending: Set<number>): Promise<number[]> {
    const free: number[] = [];
    for (const clusterIndex of pending) if ((await this.getRefcount(clusterIndex)) === 0) free.push(clusterIndex);
    pending.clear();
    return free.sort((a, b) => a - b);
  }

  /**
   * While wiping, note that the compressed cluster of `guestCluster` at
   * `hostOffset` (`readBytes` to the end of its last sector) lost a
   * reference: completeFreeing zeroes its bytes if no tree maps it then.
   */
  noteCompressedDrop(guestCluster: number, hostOffset: number, readBytes: number): void {
    if (this.#wiping && this.compressedDataMapped !== null) this.#compressedDrops.set(hostOffset, [guestCluster, readBytes]);
  }

  /**
   * Zero the bytes of each dropped compressed cluster that no tree maps any
   * more, in the host clusters still in use (one whose refcount reached 0
   * meanwhile is zeroed whole, or was taken whole by a new owner: not
   * touched here). The bytes are exactly the compressed stream's: the rest
   * of its last sector may hold the next compressed cluster. Data that does
   * not decompress is left alone (its extent is unknown).
   */
  async #wipeDroppedCompressed(): Promise<void> {
    if (this.#compressedDrops.size === 0) return;
    const drops = [...this.#compressedDrops];
    this.#compressedDrops.clear();
    const cs = this.clusterSizeBytes;
    const fileSizeBytes = await this.file.sizeBytes();
    let wrote = false;
    for (const [hostOffset, [guestCluster, readBytes]] of drops) {
      const end = Math.min(hostOffset + readBytes, fileSizeBytes);
      const kept: number[] = [];
      for (let cluster = Math.floor(hostOffset / cs); cluster * cs < end; cluster++) {
        if (!this.#droppedWhileWiping.has(cluster) && (await this.getRefcount(cluster)) > 0) kept.push(cluster);
      }
      if (kept.length === 0 || (await this.compressedDataMapped!(guestCluster, hostOffset))) continue;
      const input = new Uint8Array(end - hostOffset);
      await this.file.read(hostOffset, input);
      let streamBytes: number;
      try {
        streamBytes = compressedStreamBytes(input, this.header.compressionType, cs);
      } catch {
        continue;
      }
      for (const cluster of kept) {
        const start = Math.max(hostOffset, cluster * cs);
        const stop = Math.min(hostOffset + streamBytes, (cluster + 1) * cs);
        if (stop > start) {
          await writeZeroBytes(this.file, start, stop - start);
          wrote = true;
        }
      }
    }
    if (wrote) await this.file.flush();
  }

  /** Zero bytes over the given clusters, in ascending order (contiguous ones in one write each), never past the end of the file. */
  async #writeZeroClusters(sortedClusterIndexes: readonly number[]): Promise<void> {
    const cs = this.clusterSizeBytes;
    const fileSizeBytes = await this.file.sizeBytes();
    for (const [first, end] of clusterRuns(sortedClusterIndexes)) {
      const stop = Math.min(end * cs, fileSizeBytes);
      if (stop > first * cs) await writeZeroBytes(this.file, first * cs, stop - first * cs);
    }
  }

  /**
   * qcow2_shrink_reftable, after a shrink freed clusters: a refcount block
   * that counts nothing but (possibly) itself is dropped. The table without
   * those entries is written and synced first, then each dropped block's
   * cluster is released: punched when it counted itself (nothing else counts
   * it), its refcount dropped where another block counts it. So the file can
   * then be truncated after the last cluster still in use, as QEMU's is.
   */
  async shrinkReftable(): Promise<void> {
    const cs = this.clusterSizeBytes;
    const entries = this.geometry.refcountBlockEntries;
    const order = this.geometry.refcountOrder;
    const dropped: Array<{ tableIndex: number; blockOffset: number; countsItself: boolean }> = [];
    for (let tableIndex = 0; tableIndex < this.reftable.length; tableIndex++) {
      const blockOffset = this.reftable[tableIndex];
      if (blockOffset === 0) continue;
      const block = this.refblockCache.peek(blockOffset) ?? (await this.refblockCache.get(blockOffset));
      const countsItself = Math.floor(blockOffset / cs / entries) === tableIndex;
      // As QEMU: the block's own count set aside for the test (restored before any await).
      const ownIndex = (blockOffset / cs) % entries;
      const ownRefcount = countsItself ? getRefcount(block.bytes, ownIndex, order) : 0;
      if (countsItself) setRefcount(block.bytes, ownIndex, order, 0);
      const unused = isAllZero(block.bytes);
      if (countsItself) setRefcount(block.bytes, ownIndex, order, ownRefcount);
      if (unused) dropped.push({ tableIndex, blockOffset, countsItself });
    }
    if (dropped.length === 0) return;
    await this.writeDirtyRefblocks();
    const newTable = [...this.reftable];
    for (const { tableIndex } of dropped) newTable[tableIndex] = 0;
    this.overlap.check(this.header.refcountTableOffset, newTable.length * REFTABLE_ENTRY_BYTES, "refcount table");
    await this.file.write(this.header.refcountTableOffset, encodeRefcountTable(newTable, newTable.length));
    await this.file.flush();
    this.reftable = newTable;
    this.overlap.invalidate();
    for (const { blockOffset, countsItself } of dropped) {
      this.refblockCache.drop(blockOffset);
      if (countsItself) await this.file.discard(blockOffset, cs);
      else await this.freeClusters(blockOffset, cs);
    }
  }

  /** Highest host cluster index with a non-zero refcount (qcow2_get_last_cluster), or -1. */
  async lastUsedCluster(fileSizeBytes: number): Promise<number> {
    const cs = this.clusterSizeBytes;
    for (let i = Math.ceil(fileSizeBytes / cs) - 1; i >= 0; i--) {
      if ((await this.getRefcount(i)) !== 0) return i;
    }
    return -1;
  }
}

/** Runs of consecutive cluster indexes in a sorted list, as [first, end) pairs. */
function clusterRuns(sorted: readonly number[]): Array<[number, number]> {
  const runs: Array<[number, number]> = [];
  for (const index of sorted) {
    const last = runs[runs.length - 1];
    if (last !== undefined && last[1] === index) last[1] = index + 1;
    else runs.push([index, index + 1]);
  }
  return runs;
}
