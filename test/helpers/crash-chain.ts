/**
 * Crash tests over backing chains: random sequences of guest operations on
 * the top image (writes, zero-writes, discards, flushes, internal snapshot
 * create/apply/delete) mixed with chain jobs (overlay create, commit,
 * rebase safe and unsafe, stream), every file of the chain on a FaultFile,
 * all sharing one journal so a crash hits every file at the same moment.
 *
 * Design notes
 * - Files live on disk (the chain code resolves backing names, real paths
 *   and file identities there); the jobs reach them only through
 *   `FaultDisk.openFile`, the `openFile` injection point of openImage,
 *   createImage and the jobs. Each path has one FaultFile for the whole
 *   run; every open hands out a handle on it (a job opening the same base
 *   twice sees one file, as on a real disk) whose close leaves it open.
 * - The workload runs once with the journal recorded. After every operation
 *   the *state* is read: every file's guest view (each sector's version id,
 *   read through its backing chain) and every internal snapshot's view.
 *   Views come from the engine's own reads in the uncrashed run; the crash
 *   checks then ask that crashed files read like one of those states.
 * - Durability: guest writes, zero-writes and discards are volatile until
 *   the next flush point; every other operation ends durable: a flush, a
 *   close, a snapshot operation (they end with a flush), a job that
 *   reported success (its result must survive a crash right after), an
 *   overlay create. A crash during operation k allows each sector of each
 *   file, and of each snapshot, to read what it read in any state from the
 *   last durable one before k up to the state after k; snapshots present in
 *   all of those states must exist, others may.
 * - A file whose creation was interrupted may not open, or open with size
 *   0, without its backing name or with refcounts not yet written
 *   (qemu-img create is not atomic either: the size and the backing name
 *   are written last): nobody's data is in it yet. Opening and checking it
 *   must only end in a result or a coded error.
 * - The crash state at journal write g: each file keeps what it had flushed
 *   before g plus a random subset of its later writes, torn at sectors
 *   (CrashReplay.crashAfter per file, with the number of that file's
 *   operations up to g).
 */
import assert from "node:assert/strict";
import { basename, resolve } from "node:path";
import { isSnapstackError } from "../../src/base/errors.ts";
import type { BlockDevice } from "../../src/device/block-device.ts";
import { createImage, type CreateOptionValue } from "../../src/chain/create-image.ts";
import { openImage, type FileOpenRequest, type OpenImageFile } from "../../src/chain/open-image.ts";
import { commitImage } from "../../src/chain/jobs/commit-image.ts";
import { rebaseImage } from "../../src/chain/jobs/rebase-image.ts";
import { streamImage } from "../../src/chain/jobs/stream-image.ts";
import { Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { openSnapshotView } from "../../src/formats/qcow2/snapshot-view.ts";
import { checkQcow2 } from "../../src/formats/qcow2/check.ts";
import { decodeQcow2Header } from "../../src/formats/qcow2/header.ts";
import type { ImageFile } from "../../src/io/file.ts";
import { createNodeFile } from "../../src/io/node-file.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { CrashReplay, FaultFile, FaultJournal, type RandomSource } from "../../src/io/fault-file.ts";
import { applyOp, assertCrashConsistent, assertNoCorruption, decodeSector, headerIsDirty, patternBytes, SECTOR_BYTES, type GuestOp, type Random } from "./crash-workload.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
/** Layers in the current chain at most (top included). */
export const CHAIN_LAYERS_MAX = 4;
/** Files created at most in one workload (orphans of rebase and stream included). */
const FILES_MAX = 6;
const SNAPSHOTS_LIVE_MAX = 3;

// ------------------------------------------------------------- files

/** An ImageFile on a shared file: the path's name, its own read-only flag, a close that leaves the file open. */
class SharedHandle implements ImageFile {
  readonly name: string;
  readonly readOnly: boolean;
  readonly #file: ImageFile;
  /** The shared file's writeSync (FaultFile over NodeFile offers it, as NodeFile does in production). */
  readonly writeSync?: (hostOffset: number, data: Uint8Array) => void;

  constructor(file: ImageFile, name: string, readOnly: boolean) {
    this.#file = file;
    this.name = name;
    this.readOnly = readOnly;
    const fileWriteSync = file.writeSync?.bind(file);
    if (fileWriteSync !== undefined) {
      this.writeSync = (hostOffset, data) => {
        assert.ok(!this.readOnly, `${this.name}: write through a read-only handle`);
        fileWriteSync(hostOffset, data);
      };
    }
  }

  read(hostOffset: number, buffer: Uint8Array): Promise<number> {
    return this.#file.read(hostOffset, buffer);
  }

  write(hostOffset: number, data: Uint8Array): Promise<void> {
    assert.ok(!this.readOnly, `${this.name}: write through a read-only handle`);
    return this.#file.write(hostOffset, data);
  }

  sizeBytes(): Promise<number> {
    return this.#file.sizeBytes();
  }

  truncate(sizeBytes: number): Promise<void> {
    assert.ok(!this.readOnly, `${this.name}: truncate through a read-only handle`);
    return this.#file.truncate(sizeBytes);
  }

  flush(): Promise<void> {
    return this.#file.flush();
  }

  discard(hostOffset: number, lengthBytes: number): Promise<void> {
    return this.#file.discard(hostOffset, lengthBytes);
  }

  async close(): Promise<void> {}
}

function notFound(path: string): Error {
  return Object.assign(new Error(`ENOENT: no such file or directory, open '${path}'`), { code: "ENOENT", path });
}

/** Files of one workload: one FaultFile per path, all on one journal. */
export class FaultDisk {
  readonly journal = new FaultJournal();
  readonly files = new Map<string, FaultFile>();
  /** Journal length when each file was created. */
  readonly createdAt = new Map<string, number>();

  readonly openFile: OpenImageFile = async (path: string, request: FileOpenRequest): Promise<ImageFile> => {
    const key = resolve(path);
    let file = this.files.get(key);
    if (request.create === true) {
      if (file === undefined) {
        // The FaultFile models durability; the disk file under it need not fsync.
        file = await FaultFile.wrap(await createNodeFile(key, { cache: "unsafe" }), { name: key, journal: this.journal, recordLog: true });
        this.files.set(key, file);
        this.createdAt.set(key, this.journal.entries.length);
      } else {
        await file.truncate(0);
      }
    }
    if (file === undefined) throw notFound(path);
    return new SharedHandle(file, path, request.readOnly);
  };

  async close(): Promise<void> {
    for (const file of this.files.values()) await file.close();
  }
}

/** Crashed contents by absolute path, opened through `openFile` (no disk I/O). */
export class CrashedFiles {
  readonly contents: Map<string, MemoryFile>;

  constructor(contents: Map<string, Uint8Array>) {
    this.contents = new Map([...contents].map(([path, bytes]) => [path, new MemoryFile({ name: path, contents: bytes })]));
  }

  readonly openFile: OpenImageFile = async (path: string, request: FileOpenRequest): Promise<ImageFile> => {
    const file = this.contents.get(resolve(path));
    if (file === undefined) throw notFound(path);
    return new SharedHandle(file, path, request.readOnly);
  };
}

// ------------------------------------------------------------ operations

export type ChainOp =
  | Exclude<GuestOp, { kind: "compressed" }>
  | { kind: "overlay"; path: string; options: Record<string, CreateOptionValue>; sizeBytes?: number }
  /** `base`: commit into that deeper layer (-b, implies -d); null: into the backing file. */
  | { kind: "commit"; drop: boolean; base: string | null }
  | { kind: "rebase"; backing: string; unsafe: boolean }
  | { kind: "stream"; base: string | null };

/** Operations whose effects may still be volatile when the next one starts. */
function isVolatile(op: ChainOp): boolean {
  return op.kind === "write" || op.kind === "zero" || op.kind === "discard";
}

export function describeOp(op: ChainOp): string {
  switch (op.kind) {
    case "overlay":
      return `overlay ${basename(op.path)} ${JSON.stringify(op.options)}`;
    case "commit":
      return `commit${op.drop ? " -d" : ""}${op.base === null ? "" : ` -b ${basename(op.base)}`}`;
    case "rebase":
      return `rebase${op.unsafe ? " -u" : ""} -b '${op.backing === "" ? "" : basename(op.backing)}'`;
    case "stream":
      return `stream${op.base === null ? "" : ` --base ${basename(op.base)}`}`;
    case "write":
    case "zero":
    case "discard":
      return `${op.kind} ${op.guestOffset}+${op.lengthBytes}`;
    case "snapshot-create":
    case "snapshot-apply":
    case "snapshot-delete":
      return `${op.kind} ${op.name}`;
    default:
      return op.kind;
  }
}

/** What one file reads: its guest view and each internal snapshot's view (version ids per sector). */
export interface FileState {
  view: Int32Array;
  snapshots: Map<string, Int32Array>;
}

export type ChainState = Map<string, FileState>;

export interface ChainRun {
  ops: ChainOp[];
  /** Journal length before / after each op (op k issued entries [before[k], after[k])). */
  before: number[];
  after: number[];
  /** states[0]: before the first op; states[k + 1]: after op k. */
  states: ChainState[];
  disk: FaultDisk;
  /** Each file's create options (refcount bits decide whether snapshots fit). */
  sizeBytes: number;
}

function randomLayerOptions(random: Random): Record<string, CreateOptionValue> {
  const clusterSize = [512, 1024, 4096, 4096, 65536, 65536][random.int(6)];
  const v2 = random.next() < 0.15;
  const options: Record<string, CreateOptionValue> = { cluster_size: clusterSize, compat: v2 ? "0.10" : "1.1" };
  if (!v2) {
    options.refcount_bits = [1, 16, 16, 64][random.int(4)];
    if (random.next() < 0.25) options.lazy_refcounts = "on";
    if (clusterSize >= 16 * KiB && random.next() < 0.3) options.extended_l2 = "on";
  }
  return options;
}

/**
 * The version id each guest sector holds (decodeSector: -1 for garbage).
 * A read that fails is an assertion failure; garbage is one too unless
 * `garbageAllowed` (a crashed image is judged by checkSectors instead).
 */
async function readVersions(device: BlockDevice, where: string, garbageAllowed = false): Promise<Int32Array> {
  const out = new Int32Array(device.sizeBytes / SECTOR_BYTES);
  const chunkBytes = 256 * KiB;
  const buffer = new Uint8Array(chunkBytes);
  for (let guestOffset = 0; guestOffset < device.sizeBytes; guestOffset += chunkBytes) {
    const length = Math.min(chunkBytes, device.sizeBytes - guestOffset);
    const view = buffer.subarray(0, length);
    try {
      await device.read(guestOffset, view);
    } catch (error) {
      assert.fail(`${where}: read at ${guestOffset} failed: ${String(error)}`);
    }
    for (let at = 0; at < length; at += SECTOR_BYTES) {
      const sector = (guestOffset + at) / SECTOR_BYTES;
      const id = decodeSector(view, at, sector);
      if (id < 0 && !garbageAllowed) assert.fail(`${where}: guest sector ${sector} reads garbage in the uncrashed run`);
      out[sector] = id;
    }
  }
  return out;
}

function sameVersions(a: Int32Array, b: Int32Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** The state of one image (top of an open chain): its view and its snapshots' views; unchanged arrays are shared with `previous`. */
async function readFileState(image: BlockDevice, previous: FileState | undefined, where: string): Promise<FileState> {
  const reuse = (fresh: Int32Array, old: Int32Array | undefined): Int32Array => (old !== undefined && sameVersions(fresh, old) ? old : fresh);
  const view = reuse(await readVersions(image, where), previous?.view);
  const snapshots = new Map<string, Int32Array>();
  if (image instanceof Qcow2Image) {
    for (const snapshot of image.snapshots) {
      const snapshotView = await openSnapshotView(image, snapshot.name);
      try {
        snapshots.set(snapshot.name, reuse(await readVersions(snapshotView, `${where} snapshot ${snapshot.name}`), previous?.snapshots.get(snapshot.name)));
      } finally {
        await snapshotView.close();
      }
    }
  }
  return { view, snapshots };
}

/**
 * Run one random chain workload on a FaultDisk in `dir`, recording the
 * journal, the op boundaries and the state after every op.
 */
export async function recordChainRun(random: Random, dir: string, opCount: number): Promise<ChainRun> {
  const disk = new FaultDisk();
  const sizeBytes = [1, 1, 2][random.int(3)] * MiB;
  const sectors = sizeBytes / SECTOR_BYTES;
  const ops: ChainOp[] = [];
  const before: number[] = [];
  const after: number[] = [];
  const states: ChainState[] = [new Map()];
  const refcountBits = new Map<string, number>();
  /** The current chain, top first. */
  let chain: string[] = [];
  let session: Qcow2Image | null = null;
  let filesMade = 0;
  let nextId = 2;
  let snapshotsMade = 0;
  const live = new Map<string, string[]>();

  const randomRange = (): { guestOffset: number; lengthBytes: number } => {
    const roll = random.next();
    let lengthSectors = roll < 0.4 ? 1 + random.int(8) : roll < 0.8 ? 1 + random.int(256) : 1 + random.int(512);
    lengthSectors = Math.min(lengthSectors, sectors);
    let first = random.int(sectors - lengthSectors + 1);
    if (random.next() < 0.5) first -= first % 128;
    return { guestOffset: first * SECTOR_BYTES, lengthBytes: lengthSectors * SECTOR_BYTES };
  };

  const run = async (op: ChainOp): Promise<void> => {
    const k = ops.length;
    const where = `op ${k} (${describeOp(op)})`;
    ops.push(op);
    before.push(disk.journal.entries.length);
    let touchesAll = true;
    switch (op.kind) {
      case "overlay":
        await createImage(op.path, {
          format: "qcow2",
          sizeBytes: op.sizeBytes,
          ...(chain.length > 0 ? { backingFile: basename(chain[0]), backingFormat: "qcow2" } : {}),
          options: op.options,
          openFile: disk.openFile,
        });
        chain = [op.path, ...chain];
        break;
      case "commit":
        await commitImage(chain[0], { drop: op.drop, ...(op.base === null ? {} : { base: op.base }), openFile: disk.openFile, searchDirectories: [] });
        break;
      case "rebase":
        await rebaseImage(chain[0], { backingFile: op.backing === "" ? "" : basename(op.backing), backingFormat: "qcow2", unsafe: op.unsafe, openFile: disk.openFile });
        chain = op.backing === "" ? [chain[0]] : [chain[0], ...chain.slice(chain.indexOf(op.backing))];
        break;
      case "stream":
        await streamImage(chain[0], { ...(op.base === null ? {} : { base: op.base }), openFile: disk.openFile });
        chain = op.base === null ? [chain[0]] : [chain[0], ...chain.slice(chain.indexOf(op.base))];
        break;
      case "close":
        await session?.close();
        session = null;
        break;
      default: {
        if (session === null) {
          const opened = await openImage(chain[0], { readOnly: false, openFile: disk.openFile, cacheBytesMax: random.next() < 0.3 ? 64 * KiB : undefined });
          assert.ok(opened instanceof Qcow2Image);
          session = opened;
        }
        await applyOp(session, op);
        touchesAll = false;
      }
    }
    after.push(disk.journal.entries.length);
    // The state after op k: re-read what the op can have changed.
    const previous = states[states.length - 1];
    const state: ChainState = new Map(previous);
    for (const path of disk.files.keys()) {
      if (!touchesAll && path !== chain[0]) continue;
      if (session !== null && path === chain[0]) {
        state.set(path, await readFileState(session, previous.get(path), `${where}: ${basename(path)}`));
        continue;
      }
      const device = await openImage(path, { readOnly: true, openFile: disk.openFile });
      try {
        state.set(path, await readFileState(device, previous.get(path), `${where}: ${basename(path)}`));
      } finally {
        await device.close();
      }
    }
    states.push(state);
  };

  const newOverlay = (): ChainOp => {
    const path = resolve(dir, `layer${filesMade++}.qcow2`);
    const options = randomLayerOptions(random);
    refcountBits.set(path, Number(options.refcount_bits ?? 16));
    live.set(path, []);
    return { kind: "overlay", path, options, ...(chain.length === 0 ? { sizeBytes } : {}) };
  };

  await run(newOverlay());
  for (let i = 0; i < opCount; i++) {
    const top = chain[0];
    const snapshots = live.get(top) as string[];
    const roll = random.next();
    if (roll < 0.4) {
      await run({ kind: "write", ...randomRange(), id: nextId++ });
    } else if (roll < 0.48) {
      await run({ kind: "zero", ...randomRange(), unmap: random.next() < 0.5 });
    } else if (roll < 0.54) {
      await run({ kind: "discard", ...randomRange() });
    } else if (roll < 0.6) {
      await run({ kind: session === null || random.next() < 0.3 ? "close" : "flush" });
    } else if (roll < 0.72 && (refcountBits.get(top) ?? 16) >= 8) {
      if (snapshots.length === 0 || (snapshots.length < SNAPSHOTS_LIVE_MAX && random.next() < 0.5)) {
        const name = `snap${snapshotsMade++}`;
        snapshots.push(name);
        await run({ kind: "snapshot-create", name });
      } else if (random.next() < 0.5) {
        await run({ kind: "snapshot-apply", name: snapshots[random.int(snapshots.length)] });
      } else {
        await run({ kind: "snapshot-delete", name: snapshots.splice(random.int(snapshots.length), 1)[0] });
      }
    } else {
      // A chain job: the guest session ends first (a close, durable).
      const jobRoll = random.next();
      let op: ChainOp | null = null;
      if ((chain.length < CHAIN_LAYERS_MAX && filesMade < FILES_MAX && jobRoll < 0.35) || chain.length === 1) {
        if (chain.length < CHAIN_LAYERS_MAX && filesMade < FILES_MAX) op = newOverlay();
      } else if (jobRoll < 0.6) {
        // Into the backing file (emptying the top unless -d), or -b into a deeper layer (the ones between change too).
        const deeper = chain.length > 2 && random.next() < 0.3;
        op = deeper ? { kind: "commit", drop: true, base: chain[2 + random.int(chain.length - 2)] } : { kind: "commit", drop: random.next() < 0.3, base: null };
      } else if (jobRoll < 0.8) {
        // Safe: onto any image below (the immediate backing too: nothing to copy) or none; unsafe: the content changes.
        const target = random.int(chain.length);
        op = { kind: "rebase", backing: target === 0 ? "" : chain[target], unsafe: random.next() < 0.3 };
      } else {
        const target = 1 + random.int(chain.length);
        op = { kind: "stream", base: target >= chain.length ? null : chain[target] };
      }
      if (op === null) continue;
      if (session !== null) await run({ kind: "close" });
      await run(op);
    }
  }
  if (session !== null) await run({ kind: "close" });
  return { ops, before, after, states, disk, sizeBytes };
}

// ----------------------------------------------------------------- crashes

/** Crash states of a recorded run at journal writes in increasing order. */
export class ChainCrashReplay {
  readonly #run: ChainRun;
  readonly #replays = new Map<string, CrashReplay>();
  /** Per file: journal index of each of its entries. */
  readonly #entryIndices = new Map<string, number[]>();
  /** Journal indices of the writes. */
  readonly writeIndices: number[] = [];

  constructor(run: ChainRun) {
    this.#run = run;
    for (const [path, file] of run.disk.files) {
      this.#replays.set(path, new CrashReplay(new Uint8Array(0), file.log ?? []));
      this.#entryIndices.set(path, []);
    }
    run.disk.journal.entries.forEach((entry, index) => {
      (this.#entryIndices.get(entry.file) as number[]).push(index);
      if (entry.op.kind === "write") this.writeIndices.push(index);
    });
  }

  /** The op during which journal entry `index` was issued. */
  opAt(index: number): number {
    const k = this.#run.after.findIndex((end) => end > index);
    assert.ok(k >= 0 && this.#run.before[k] <= index, `journal entry ${index} belongs to an op`);
    return k;
  }

  /** Every existing file after a crash during journal entry `index` (it may or may not have landed). */
  crashAt(index: number, random: RandomSource): Map<string, Uint8Array> {
    const out = new Map<string, Uint8Array>();
    for (const [path, replay] of this.#replays) {
      if ((this.#run.disk.createdAt.get(path) as number) > index) continue;
      const indices = this.#entryIndices.get(path) as number[];
      let count = 0;
      while (count < indices.length && indices[count] <= index) count++;
      out.set(path, replay.crashAfter(count, random));
    }
    return out;
  }
}

export interface ChainCrashOutcome {
  files: number;
  leakyFiles: number;
  dirtyFiles: number;
  /** Files whose interrupted creation left something that does not open or check. */
  unopenedCreates: number;
}

/** What a crash during op k allows: the states from the last durable one before k to the one after k. */
export function allowedStates(run: ChainRun, k: number): ChainState[] {
  let base = k;
  while (base > 0 && isVolatile(run.ops[base - 1])) base--;
  return run.states.slice(base, k + 2);
}

function checkSectors(actual: Int32Array, allowed: Int32Array[], where: string): void {
  assert.ok(
    allowed.some((versions) => versions.length === actual.length),
    `${where}: virtual size ${actual.length * SECTOR_BYTES} bytes, allowed ${allowed.map((v) => v.length * SECTOR_BYTES).join(", ")}`,
  );
  for (let s = 0; s < actual.length; s++) {
    const id = actual[s];
    let ok = false;
    for (const versions of allowed) {
      if (versions[s] === id) {
        ok = true;
        break;
      }
    }
    if (!ok) assert.fail(`${where}: guest sector ${s} reads version ${id < 0 ? "garbage" : id}, allowed ${[...new Set(allowed.map((v) => v[s]))].join(", ")}`);
  }
}

/**
 * Judge one crashed set of files: every file checks clean but for leaks
 * (dirty lazy-refcount images after snapstack's rebuild), every file that
 * existed at the last durable point opens with its chain and reads an
 * allowed state, its snapshots exist as required and read as allowed;
 * when thorough, `-r leaks` leaves no leak and the top takes a write.
 */
export async function judgeChainCrash(run: ChainRun, k: number, crashed: CrashedFiles, where: string, thorough: boolean): Promise<ChainCrashOutcome> {
  const allowed = allowedStates(run, k);
  const op = run.ops[k];
  const outcome: ChainCrashOutcome = { files: 0, leakyFiles: 0, dirtyFiles: 0, unopenedCreates: 0 };
  const creating = op.kind === "overlay" ? op.path : null;
  const copiedMayLag = op.kind.startsWith("snapshot-");
  const usable: string[] = [];
  for (const [path, file] of crashed.contents) {
    const name = `${where}: ${basename(path)}`;
    outcome.files++;
    const contents = file.contents();
    if (path === creating) {
      // An interrupted create: opening and checking it end in a result or a coded error, never a crash.
      try {
        const device = await openImage(path, { readOnly: true, openFile: crashed.openFile });
        await device.close();
        await checkQcow2(new MemoryFile({ name: path, contents, readOnly: true }));
      } catch (error) {
        if (!isSnapstackError(error)) throw error;
        outcome.unopenedCreates++;
      }
      crashed.contents.delete(path);
      continue;
    }
    usable.push(path);
    if (contents.length >= 512 && headerIsDirty(contents)) {
      // Lazy refcounts: stale refcounts are allowed until a read-write open rebuilds them.
      outcome.dirtyFiles++;
      const image = await openImage(path, { readOnly: false, openBacking: false, openFile: crashed.openFile });
      await image.close();
      assertNoCorruption(await checkQcow2(file), `${name}: check after the lazy-refcount rebuild`);
      continue;
    }
    const result = await checkQcow2(new MemoryFile({ name: path, contents, readOnly: true }));
    const clusterSizeBytes = 2 ** decodeQcow2Header(contents.subarray(0, 64 * KiB)).clusterBits;
    assertCrashConsistent(result, clusterSizeBytes, copiedMayLag && run.states[k + 1].has(path), `${name}: check of the crashed image`);
    if (result.leaks > 0) outcome.leakyFiles++;
  }
  for (const path of usable) {
    const name = `${where}: ${basename(path)}`;
    const states = allowed.map((state) => state.get(path)).filter((state): state is FileState => state !== undefined);
    assert.ok(states.length > 0, `${name}: a state exists`);
    let device: BlockDevice;
    try {
      device = await openImage(path, { readOnly: true, openFile: crashed.openFile });
    } catch (error) {
      assert.fail(`${name}: does not open: ${String(error)}`);
    }
    try {
      checkSectors(await readVersions(device, name, true), states.map((state) => state.view), name);
      const image = device as Qcow2Image;
      const names = image.snapshots.map((snapshot) => snapshot.name);
      for (const state of states) {
        for (const required of state.snapshots.keys()) {
          if (states.every((other) => other.snapshots.has(required))) assert.ok(names.includes(required), `${name}: snapshot ${required} lost (have ${names.join(", ")})`);
        }
      }
      for (const snapshot of names) {
        const views = states.map((state) => state.snapshots.get(snapshot)).filter((view): view is Int32Array => view !== undefined);
        assert.ok(views.length > 0, `${name}: unexpected snapshot ${snapshot}`);
        const snapshotView = await openSnapshotView(image, snapshot);
        try {
          checkSectors(await readVersions(snapshotView, `${name} snapshot ${snapshot}`, true), views, `${name} snapshot ${snapshot}`);
        } finally {
          await snapshotView.close();
        }
      }
    } finally {
      await device.close();
    }
  }
  if (!thorough) return outcome;
  // Leaks repaired by -r leaks (lagging COPIED flags need -r all, as with qemu-img); then the newest file takes a write.
  for (const path of usable) {
    const name = `${where}: ${basename(path)}`;
    const file = crashed.contents.get(path) as MemoryFile;
    const before = await checkQcow2(new MemoryFile({ name: path, contents: file.contents(), readOnly: true }));
    const repaired = await checkQcow2(file, { repair: before.corruptions > 0 ? "all" : "leaks" });
    assertNoCorruption(repaired, `${name}: check -r`);
    assert.equal(repaired.leaks, 0, `${name}: leaks left after -r leaks`);
  }
  const newest = usable.at(-1);
  if (newest !== undefined) {
    const name = `${where}: ${basename(newest)}`;
    const image = (await openImage(newest, { readOnly: false, openFile: crashed.openFile })) as Qcow2Image;
    const sectors = image.sizeBytes / SECTOR_BYTES;
    const first = (k * 7919 + 13) % Math.max(1, sectors - 64);
    await image.write(first * SECTOR_BYTES, patternBytes(first, 64, 0x7fff0000));
    await image.close();
    assertNoCorruption(await checkQcow2(new MemoryFile({ name: newest, contents: (crashed.contents.get(newest) as MemoryFile).contents(), readOnly: true })), `${name}: check after a write`);
  }
  return outcome;
}
