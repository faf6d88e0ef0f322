/**
 * FaultFile: an ImageFile for tests that lies the way disks and kernels do.
 *
 * Design notes
 * - It wraps another ImageFile (a MemoryFile or a NodeFile). Reads, writes
 *   and truncates go to the wrapped file at once, so the engine sees a
 *   normal file while it runs.
 * - Beside that it keeps the *durable* state: the contents as of the last
 *   successful flush (in a MemoryFile of its own), and the *volatile*
 *   operations since then (writes and truncates, in order). A flush moves
 *   the volatile operations into the durable state.
 * - `crash(random)` answers "what could be on the platter if power failed
 *   now": the durable state plus an arbitrary subset of the volatile
 *   operations applied in order, each write possibly torn at 512-byte sector
 *   boundaries (every sector of it kept or lost independently). Applying a
 *   subset in order at sector granularity reaches every per-sector outcome
 *   a reordering disk can produce: each sector ends up with its durable
 *   bytes or the bytes of one volatile write to it.
 * - `crashAtWrite: N` makes the Nth write the last thing the "machine" does:
 *   it joins the volatile set (so it too may land, partly or wholly), then
 *   throws E_IO, and every later call throws E_IO. The engine cannot tell
 *   this from a dying disk, which is the point.
 * - `faults` fail the Nth write or flush with E_IO or E_NO_SPACE without
 *   touching anything (the call had no effect); `sizeLimitBytes` makes every
 *   write or truncate past that size fail with E_NO_SPACE, like a full file
 *   system. A failed flush leaves the volatile operations volatile.
 * - `recordLog` keeps every write, truncate and flush (`log`) so a test can
 *   run an operation sequence once and then compute the crash state at any
 *   earlier write with `CrashReplay`, instead of re-running the sequence per
 *   crash point.
 * - A `journal` shared by several FaultFiles records every file's
 *   operations in one global order, so a test on a chain of images (jobs
 *   writing several files) can crash all of them at one moment: each file
 *   keeps what it had flushed before that moment plus a random subset of
 *   its later writes (`CrashReplay.crashAfter` per file).
 * - Not modelled: lost flushes (a flush that returns but did not persist),
 *   misdirected writes, bit rot.
 * - discard zeroes the range inside the file, as a punched hole reads, and
 *   is volatile like a write (see discard).
 */
import { SnapstackError, assert } from "../base/errors.ts";
import type { ImageFile } from "./file.ts";
import { MemoryFile } from "./memory-file.ts";

/** Torn writes split at this granularity (a disk sector). */
export const SECTOR_BYTES = 512;

export type FaultCode = "E_IO" | "E_NO_SPACE";

export interface FaultPlan {
  /** Which calls count. */
  op: "write" | "flush";
  /** 1-based: the Nth call of that kind (among those `where` matches) fails. */
  index: number;
  /** Count only writes to matching ranges (default: every call). */
  where?: (hostOffset: number, lengthBytes: number) => boolean;
  code: FaultCode;
  /** Every later call of that kind fails too (a disk that stays broken). */
  sticky?: boolean;
}

export interface FaultFileOptions {
  /** Name in error messages (default: the wrapped file's name). */
  name?: string;
  faults?: FaultPlan[];
  /** The Nth write (1-based) is the last: it may land, then the file is dead. */
  crashAtWrite?: number;
  /** Writes and truncates ending past this many bytes fail with E_NO_SPACE. */
  sizeLimitBytes?: number;
  /** Keep every operation in `log` (for CrashReplay). */
  recordLog?: boolean;
  /** Also append every operation, with this file's name, to a journal shared by several files. */
  journal?: FaultJournal;
  /**
   * Offer ImageFile.writeSync when the wrapped file has it (default: yes, as
   * NodeFile does; no: the engine takes the paths of files that write only
   * asynchronously, e.g. with --aio=threads).
   */
  writeSync?: boolean;
}

/** Operations of several FaultFiles in the one order they happened. */
export class FaultJournal {
  readonly entries: { file: string; op: FileOp }[] = [];
}

export type FileOp =
  | { kind: "write"; hostOffset: number; data: Uint8Array }
  | { kind: "truncate"; sizeBytes: number }
  | { kind: "flush" };

export interface CrashOptions {
  /** Probability that a volatile write is lost whole (default 0.3). */
  dropProbability?: number;
  /** Probability that a volatile write is torn, sectors kept independently (default 0.3). The rest land whole. */
  tearProbability?: number;
}

/** A source of numbers in [0, 1): Math.random or a seeded generator. */
export type RandomSource = () => number;

/**
 * The durable contents plus a random subset of `volatile` applied in order,
 * writes possibly torn at sector boundaries. Pure apart from `random`.
 */
export function crashContents(durable: Uint8Array, volatile: readonly FileOp[], random: RandomSource, options: CrashOptions = {}): Uint8Array {
  const drop = options.dropProbability ?? 0.3;
  const tear = options.tearProbability ?? 0.3;
  const out = new MemoryFile({ contents: durable });
  for (const op of volatile) {
    assert(op.kind !== "flush", "volatile operations hold no flush");
    const roll = random();
    if (roll < drop) continue;
    if (op.kind === "truncate") {
      applySync(out, op);
      continue;
    }
    if (roll < drop + tear) {
      for (const piece of sectorPieces(op.hostOffset, op.data.length)) {
        if (random() < 0.5) applySync(out, { kind: "write", hostOffset: op.hostOffset + piece.at, data: op.data.subarray(piece.at, piece.at + piece.length) });
      }
      continue;
    }
    applySync(out, op);
  }
  return out.contents();
}

/** The sector-aligned pieces of a host range, in range coordinates. */
function sectorPieces(hostOffset: number, lengthBytes: number): { at: number; length: number }[] {
  const pieces: { at: number; length: number }[] = [];
  let at = 0;
  while (at < lengthBytes) {
    const sectorEnd = (Math.floor((hostOffset + at) / SECTOR_BYTES) + 1) * SECTOR_BYTES;
    const length = Math.min(lengthBytes - at, sectorEnd - (hostOffset + at));
    pieces.push({ at, length });
    at += length;
  }
  return pieces;
}

/** MemoryFile operations complete synchronously; apply one without awaiting an event-loop turn. */
function applySync(file: MemoryFile, op: FileOp): void {
  // MemoryFile's async methods run to completion before returning their promise.
  if (op.kind === "write") void file.write(op.hostOffset, op.data);
  else if (op.kind === "truncate") void file.truncate(op.sizeBytes);
}

export class FaultFile implements ImageFile {
  readonly name: string;
  readonly readOnly: boolean;
  readonly #inner: ImageFile;
  readonly #durable: MemoryFile;
  #volatile: FileOp[] = [];
  readonly #faults: FaultPlan[];
  /** Matching calls seen so far, per plan. */
  readonly #faultCounts: number[];
  readonly #crashAtWrite: number;
  readonly #sizeLimitBytes: number;
  #dead = false;
  /** Calls so far (including failed ones). */
  writeCount = 0;
  flushCount = 0;
  /** Writes and flushes that failed by plan or by the size limit. */
  faultsInjected = 0;
  /** Every operation, when recordLog is set. */
  readonly log: FileOp[] | null;
  readonly #journal: FaultJournal | undefined;

  private constructor(inner: ImageFile, durable: Uint8Array, options: FaultFileOptions) {
    this.#inner = inner;
    this.name = options.name ?? inner.name;
    this.readOnly = inner.readOnly;
    this.#durable = new MemoryFile({ name: `${this.name} (durable)`, contents: durable });
    this.#faults = options.faults ?? [];
    this.#faultCounts = this.#faults.map(() => 0);
    this.#crashAtWrite = options.crashAtWrite ?? 0;
    this.#sizeLimitBytes = options.sizeLimitBytes ?? Number.MAX_SAFE_INTEGER;
    this.log = options.recordLog ? [] : null;
    this.#journal = options.journal;
    const innerWriteSync = options.writeSync === false ? undefined : inner.writeSync?.bind(inner);
    if (innerWriteSync !== undefined) {
      this.writeSync = (hostOffset, data) => {
        const copy = this.#beforeWrite(hostOffset, data);
        innerWriteSync(hostOffset, copy);
        this.#record({ kind: "write", hostOffset, data: copy });
      };
    }
  }

  /** ImageFile.writeSync, with the same faults, crash and log as write (see FaultFileOptions.writeSync). */
  readonly writeSync?: (hostOffset: number, data: Uint8Array) => void;

  /** Wrap `inner`; its current contents count as durable. */
  static async wrap(inner: ImageFile, options: FaultFileOptions = {}): Promise<FaultFile> {
    const contents = new Uint8Array(await inner.sizeBytes());
    await inner.read(0, contents);
    return new FaultFile(inner, contents, options);
  }

  /** A fault-injecting in-memory file holding `contents`. */
  static async fromBytes(contents: Uint8Array, options: FaultFileOptions = {}): Promise<FaultFile> {
    return FaultFile.wrap(new MemoryFile({ name: options.name ?? "fault.qcow2", contents }), options);
  }

  #checkAlive(action: string): void {
    if (this.#dead) throw new SnapstackError("E_IO", `${this.name}: cannot ${action}: the (simulated) machine crashed`, { path: this.name, simulatedCrash: true });
  }

  #plannedFault(op: "write" | "flush", hostOffset: number, lengthBytes: number): FaultPlan | undefined {
    let hit: FaultPlan | undefined;
    this.#faults.forEach((fault, i) => {
      if (fault.op !== op || (fault.where !== undefined && !fault.where(hostOffset, lengthBytes))) return;
      const count = ++this.#faultCounts[i];
      if (hit === undefined && (count === fault.index || (fault.sticky === true && count > fault.index))) hit = fault;
    });
    return hit;
  }

  #fail(code: FaultCode, action: string): never {
    this.faultsInjected++;
    const why = code === "E_IO" ? "input/output error (injected)" : "no space left on device (injected)";
    throw new SnapstackError(code, `${this.name}: cannot ${action}: ${why}`, { path: this.name, injected: true });
  }

  #record(op: FileOp): void {
    if (op.kind !== "flush") this.#volatile.push(op);
    this.log?.push(op);
    this.#journal?.entries.push({ file: this.name, op });
  }

  async read(hostOffset: number, buffer: Uint8Array): Promise<number> {
    this.#checkAlive("read");
    return this.#inner.read(hostOffset, buffer);
  }

  async write(hostOffset: number, data: Uint8Array): Promise<void> {
    const copy = this.#beforeWrite(hostOffset, data);
    await this.#inner.write(hostOffset, copy);
    this.#record({ kind: "write", hostOffset, data: copy });
  }

  /** A write's planned fault, size limit and crash point; returns the copy of data to write and log. */
  #beforeWrite(hostOffset: number, data: Uint8Array): Uint8Array {
    this.#checkAlive("write");
    const count = ++this.writeCount;
    const action = `write ${data.length} bytes at offset ${hostOffset}`;
    const fault = this.#plannedFault("write", hostOffset, data.length);
    if (fault !== undefined) this.#fail(fault.code, action);
    if (hostOffset + data.length > this.#sizeLimitBytes) this.#fail("E_NO_SPACE", action);
    // A copy the caller cannot change later (Buffer#slice would be a view).
    const copy = Uint8Array.prototype.slice.call(data);
    if (count === this.#crashAtWrite) {
      this.#record({ kind: "write", hostOffset, data: copy });
      this.#dead = true;
      this.#checkAlive(action);
    }
    return copy;
  }

  async sizeBytes(): Promise<number> {
    this.#checkAlive("stat");
    return this.#inner.sizeBytes();
  }

  async truncate(sizeBytes: number): Promise<void> {
    this.#checkAlive("truncate");
    if (sizeBytes > this.#sizeLimitBytes) this.#fail("E_NO_SPACE", `truncate to ${sizeBytes} bytes`);
    await this.#inner.truncate(sizeBytes);
    this.#record({ kind: "truncate", sizeBytes });
  }

  async flush(): Promise<void> {
    this.#checkAlive("flush");
    this.flushCount++;
    const fault = this.#plannedFault("flush", 0, 0);
    if (fault !== undefined) this.#fail(fault.code, "flush");
    await this.#inner.flush();
    for (const op of this.#volatile) applySync(this.#durable, op);
    this.#volatile = [];
    this.#record({ kind: "flush" });
  }

  /**
   * A punched hole, modelled as a write of zeroes over the part inside the
   * file: it counts as a write (it can fail, and be the crash point), and is
   * volatile until the next flush, so a crash may keep it, wholly or in
   * part, and lose metadata written before it, as a file system may.
   */
  async discard(hostOffset: number, lengthBytes: number): Promise<void> {
    this.#checkAlive("discard");
    const end = Math.min(hostOffset + lengthBytes, await this.#inner.sizeBytes());
    if (end > hostOffset) await this.write(hostOffset, new Uint8Array(end - hostOffset));
  }

  async close(): Promise<void> {
    await this.#inner.close();
  }

  /** True once crashAtWrite was reached. */
  get crashed(): boolean {
    return this.#dead;
  }

  /** The contents as of the last successful flush. */
  durableContents(): Uint8Array {
    return this.#durable.contents();
  }

  /** Operations since the last successful flush. */
  volatileOps(): readonly FileOp[] {
    return this.#volatile;
  }

  /** What a power failure now could leave: durable state plus a random subset of volatile writes, possibly torn. */
  crash(random: RandomSource, options: CrashOptions = {}): Uint8Array {
    return crashContents(this.#durable.contents(), this.#volatile, random, options);
  }
}

/**
 * Crash states from a recorded log: after one run with `recordLog`, the
 * state a crash during write N would leave, for increasing N, without
 * re-running the workload. Keeps the durable state incrementally, so a scan
 * over all crash points costs one pass over the log.
 */
export class CrashReplay {
  readonly #log: readonly FileOp[];
  readonly #durable: MemoryFile;
  /** Index in the log of the first operation not yet made durable. */
  #durableUpTo = 0;
  /** Log index of each write, by 1-based write number. */
  readonly #writeAt: number[] = [-1];

  constructor(initialContents: Uint8Array, log: readonly FileOp[]) {
    this.#log = log;
    this.#durable = new MemoryFile({ contents: initialContents });
    log.forEach((op, i) => {
      if (op.kind === "write") this.#writeAt.push(i);
    });
  }

  get writeCount(): number {
    return this.#writeAt.length - 1;
  }

  /**
   * The file after a crash during write `writeNumber` (1-based; it may land
   * or not). Calls must come in non-decreasing writeNumber order.
   */
  crashAt(writeNumber: number, random: RandomSource, options: CrashOptions = {}): Uint8Array {
    assert(writeNumber >= 1 && writeNumber <= this.writeCount, "crash point is a recorded write");
    return this.crashAfter(this.#writeAt[writeNumber] + 1, random, options);
  }

  /**
   * The file after a crash once the first `opCount` logged operations had
   * been issued (the last of them may or may not have landed). Calls must
   * come in non-decreasing opCount order.
   */
  crashAfter(opCount: number, random: RandomSource, options: CrashOptions = {}): Uint8Array {
    assert(Number.isSafeInteger(opCount) && opCount >= this.#durableUpTo && opCount <= this.#log.length, "crash points come in order, inside the log");
    const end = opCount;
    let lastFlush = -1;
    for (let i = end - 1; i >= this.#durableUpTo; i--) {
      if (this.#log[i].kind === "flush") {
        lastFlush = i;
        break;
      }
    }
    if (lastFlush >= 0) {
      for (let i = this.#durableUpTo; i < lastFlush; i++) applySync(this.#durable, this.#log[i]);
      this.#durableUpTo = lastFlush + 1;
    }
    return crashContents(this.#durable.contents(), this.#log.slice(this.#durableUpTo, end), random, options);
  }
}
