/**
 * Crash-test workloads: random guest operation sequences on a qcow2 image,
 * a model of what every guest sector may read after a crash at any write,
 * and the checks a crashed image must pass.
 *
 * Design notes
 * - Guest data is tracked per 512-byte sector as a *version id*: 0 reads as
 *   zeroes, 1 is the backing image's content, every data write gets a fresh
 *   id >= 2. A sector written with id N holds a pattern naming N and the
 *   sector number (and compresses well, so compressed writes shrink), so a
 *   read tells which write the bytes came from and whether they sit at the
 *   right guest offset.
 * - The workload runs once on a FaultFile with the write log recorded; for
 *   every operation we keep the FaultFile write counter before and after.
 *   A crash during write N falls in some operation k. What each sector may
 *   read after such a crash: its version as of the last guest flush that
 *   completed before k, or any version written to it by operations after
 *   that flush up to and including k (whether k's took effect is unknown).
 * - Sectors are verified by decoding: a sector whose bytes match no version
 *   pattern (torn inside a sector, shifted, garbage) fails at once.
 */
import assert from "node:assert/strict";
import { createQcow2 } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2, type Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { openSnapshotView } from "../../src/formats/qcow2/snapshot-view.ts";
import { checkQcow2, type Qcow2CheckResult } from "../../src/formats/qcow2/check.ts";
import { decodeQcow2Header, INCOMPAT_DIRTY } from "../../src/formats/qcow2/header.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { FaultFile } from "../../src/io/fault-file.ts";
import type { createRandom } from "./random.ts";
import { assertCachedTablesMatchFile } from "./table-cache-check.ts";

export type Random = ReturnType<typeof createRandom>;

export const SECTOR_BYTES = 512;
export const ZERO_ID = 0;
export const BACKING_ID = 1;
const FIRST_WRITE_ID = 2;
const KiB = 1024;
const MiB = 1024 * KiB;

// ------------------------------------------------------------- patterns

/** Fill one sector with the pattern of version `id` at guest sector `sector`. */
export function fillSector(buffer: Uint8Array, at: number, id: number, sector: number): void {
  if (id === ZERO_ID) {
    buffer.fill(0, at, at + SECTOR_BYTES);
    return;
  }
  const view = new DataView(buffer.buffer, buffer.byteOffset + at, SECTOR_BYTES);
  view.setUint32(0, id);
  view.setUint32(4, sector);
  const word = (Math.imul(id, 0x9e3779b1) ^ sector) >>> 0;
  for (let i = 8; i < SECTOR_BYTES; i += 4) view.setUint32(i, word);
}

/** The version id a sector holds, or -1 when it matches no pattern for this sector. */
export function decodeSector(buffer: Uint8Array, at: number, sector: number): number {
  const view = new DataView(buffer.buffer, buffer.byteOffset + at, SECTOR_BYTES);
  const id = view.getUint32(0);
  if (id === ZERO_ID) {
    for (let i = 0; i < SECTOR_BYTES; i += 4) if (view.getUint32(i) !== 0) return -1;
    return ZERO_ID;
  }
  if (view.getUint32(4) !== sector) return -1;
  const word = (Math.imul(id, 0x9e3779b1) ^ sector) >>> 0;
  for (let i = 8; i < SECTOR_BYTES; i += 4) if (view.getUint32(i) !== word) return -1;
  return id;
}

export function patternBytes(firstSector: number, sectorCount: number, id: number): Uint8Array {
  const out = new Uint8Array(sectorCount * SECTOR_BYTES);
  for (let i = 0; i < sectorCount; i++) fillSector(out, i * SECTOR_BYTES, id, firstSector + i);
  return out;
}

// ------------------------------------------------------------- scenarios

export interface CrashScenario {
  clusterSizeBytes: number;
  refcountBits: number;
  compat: "0.10" | "1.1";
  lazyRefcounts: boolean;
  extendedL2: boolean;
  sizeBytes: number;
  withBacking: boolean;
  /** Metadata cache bound: small values force write-back on eviction. */
  cacheBytesMax: number;
  /** The file offers writeSync, as NodeFile does (default), or writes only asynchronously (--aio=threads). */
  syncWrites?: boolean;
}

export function describeScenario(s: CrashScenario): string {
  return `cluster=${s.clusterSizeBytes} refcount_bits=${s.refcountBits} compat=${s.compat} lazy=${s.lazyRefcounts} extended_l2=${s.extendedL2} size=${s.sizeBytes} backing=${s.withBacking} cache=${s.cacheBytesMax} sync_writes=${s.syncWrites !== false}`;
}

function pick<T>(random: Random, values: readonly T[]): T {
  return values[random.int(values.length)];
}

export function randomScenario(random: Random): CrashScenario {
  const clusterSizeBytes = pick(random, [512, 1024, 4096, 4096, 65536, 65536]);
  const compat = random.next() < 0.2 ? "0.10" : "1.1";
  const v3 = compat === "1.1";
  return {
    clusterSizeBytes,
    refcountBits: v3 ? pick(random, [1, 2, 8, 16, 16, 16, 64]) : 16,
    compat,
    lazyRefcounts: v3 && random.next() < 0.25,
    extendedL2: v3 && clusterSizeBytes >= 16 * KiB && random.next() < 0.4,
    sizeBytes: pick(random, [1, 2, 4]) * MiB + pick(random, [0, 0, 512, 3 * 512]),
    withBacking: random.next() < 0.35,
    cacheBytesMax: random.next() < 0.3 ? 8 * clusterSizeBytes : 32 * MiB,
    syncWrites: random.next() < 0.7,
  };
}

// ------------------------------------------------------------ operations

export type GuestOp =
  | { kind: "write"; guestOffset: number; lengthBytes: number; id: number }
  | { kind: "compressed"; guestOffset: number; lengthBytes: number; id: number }
  | { kind: "zero"; guestOffset: number; lengthBytes: number; unmap: boolean }
  | { kind: "discard"; guestOffset: number; lengthBytes: number }
  | { kind: "flush" }
  | { kind: "close" }
  | { kind: "snapshot-create"; name: string }
  | { kind: "snapshot-delete"; name: string }
  /** `versions`: the snapshot's sector versions, filled in by recordRun. */
  | { kind: "snapshot-apply"; name: string; versions?: Int32Array };

/** Operations after which everything before is durable (they end with a flush). */
export function isFlushPoint(op: GuestOp): boolean {
  return op.kind === "flush" || op.kind === "close" || op.kind.startsWith("snapshot-");
}

/** Sectors an operation sets, and to which version. */
interface Effect {
  firstSector: number;
  endSector: number;
  id: number;
}

function opEffects(op: GuestOp, scenario: CrashScenario): Effect[] {
  switch (op.kind) {
    case "write":
    case "compressed":
      return [{ firstSector: op.guestOffset / SECTOR_BYTES, endSector: (op.guestOffset + op.lengthBytes) / SECTOR_BYTES, id: op.id }];
    case "zero":
      return [{ firstSector: op.guestOffset / SECTOR_BYTES, endSector: (op.guestOffset + op.lengthBytes) / SECTOR_BYTES, id: ZERO_ID }];
    case "snapshot-apply": {
      // Runs of equal versions: the active state becomes the snapshot's.
      const versions = op.versions;
      if (versions === undefined) return [];
      const effects: Effect[] = [];
      for (let s = 0; s < versions.length; ) {
        let e = s + 1;
        while (e < versions.length && versions[e] === versions[s]) e++;
        effects.push({ firstSector: s, endSector: e, id: versions[s] });
        s = e;
      }
      return effects;
    }
    case "discard": {
      // qcow2 drops whole clusters only (a partial last cluster at the image end counts);
      // v2 with a backing file ignores discards (there is no zero flag).
      if (scenario.compat === "0.10" && scenario.withBacking) return [];
      const cs = scenario.clusterSizeBytes;
      const start = Math.ceil(op.guestOffset / cs) * cs;
      const requestEnd = op.guestOffset + op.lengthBytes;
      const end = requestEnd === scenario.sizeBytes ? requestEnd : Math.floor(requestEnd / cs) * cs;
      if (start >= end) return [];
      return [{ firstSector: start / SECTOR_BYTES, endSector: end / SECTOR_BYTES, id: ZERO_ID }];
    }
    default:
      return [];
  }
}

function randomRange(random: Random, scenario: CrashScenario): { guestOffset: number; lengthBytes: number } {
  const sectors = scenario.sizeBytes / SECTOR_BYTES;
  const cs = scenario.clusterSizeBytes;
  const roll = random.next();
  let lengthSectors: number;
  if (roll < 0.4) lengthSectors = 1 + random.int(8);
  else if (roll < 0.8) lengthSectors = 1 + random.int(Math.max(1, (3 * cs) / SECTOR_BYTES));
  else lengthSectors = 1 + random.int((256 * KiB) / SECTOR_BYTES);
  lengthSectors = Math.min(lengthSectors, sectors);
  // Half the ranges start on a cluster boundary (whole-cluster paths), the rest anywhere.
  let first = random.int(sectors - lengthSectors + 1);
  if (random.next() < 0.5) first -= first % (cs / SECTOR_BYTES);
  return { guestOffset: first * SECTOR_BYTES, lengthBytes: lengthSectors * SECTOR_BYTES };
}

/** Live internal snapshots at most (refcount_bits >= 8 only: narrower refcounts overflow). */
const SNAPSHOTS_LIVE_MAX = 3;

/** A random sequence of guest operations ending with close. */
export function randomOps(random: Random, scenario: CrashScenario, count: number, options: { snapshots?: boolean; apply?: boolean } = {}): GuestOp[] {
  const ops: GuestOp[] = [];
  const withSnapshots = (options.snapshots ?? true) && scenario.refcountBits >= 8;
  const live: string[] = [];
  let snapshotsMade = 0;
  const cs = scenario.clusterSizeBytes;
  const touched = new Set<number>();
  let nextId = FIRST_WRITE_ID;
  const touch = (guestOffset: number, lengthBytes: number): void => {
    for (let c = Math.floor(guestOffset / cs); c < Math.ceil((guestOffset + lengthBytes) / cs); c++) touched.add(c);
  };
  for (let i = 0; i < count; i++) {
    const roll = random.next();
    if (roll < 0.5) {
      const range = randomRange(random, scenario);
      ops.push({ kind: "write", ...range, id: nextId++ });
      touch(range.guestOffset, range.lengthBytes);
    } else if (roll < 0.62) {
      const range = randomRange(random, scenario);
      ops.push({ kind: "zero", ...range, unmap: random.next() < 0.5 });
      touch(range.guestOffset, range.lengthBytes);
    } else if (roll < 0.72) {
      ops.push({ kind: "discard", ...randomRange(random, scenario) });
    } else if (roll < 0.8) {
      // Compressed writes go to clusters nothing has touched (qcow2 refuses allocated ones).
      const clusters = Math.floor(scenario.sizeBytes / cs);
      const cluster = random.int(clusters);
      if (!touched.has(cluster)) {
        ops.push({ kind: "compressed", guestOffset: cluster * cs, lengthBytes: cs, id: nextId++ });
        touch(cluster * cs, cs);
      }
    } else if (roll < 0.9 || !withSnapshots) {
      ops.push({ kind: "flush" });
    } else if (live.length < SNAPSHOTS_LIVE_MAX && (live.length === 0 || random.next() < 0.5)) {
      const name = `snap${snapshotsMade++}`;
      live.push(name);
      ops.push({ kind: "snapshot-create", name });
    } else if ((options.apply ?? true) && random.next() < 0.5) {
      ops.push({ kind: "snapshot-apply", name: pick(random, live) });
      // Every cluster may be shared now: compressed writes need untouched clusters.
      for (let c = 0; c < Math.ceil(scenario.sizeBytes / cs); c++) touched.add(c);
    } else {
      const name = live.splice(random.int(live.length), 1)[0];
      ops.push({ kind: "snapshot-delete", name });
    }
  }
  ops.push({ kind: "close" });
  return ops;
}

export async function applyOp(image: Qcow2Image, op: GuestOp): Promise<void> {
  // (async: snapshot creation returns the new entry, not void)
  switch (op.kind) {
    case "write":
      return image.write(op.guestOffset, patternBytes(op.guestOffset / SECTOR_BYTES, op.lengthBytes / SECTOR_BYTES, op.id));
    case "compressed":
      return image.writeCompressed(op.guestOffset, patternBytes(op.guestOffset / SECTOR_BYTES, op.lengthBytes / SECTOR_BYTES, op.id));
    case "zero":
      return image.writeZeroes(op.guestOffset, op.lengthBytes, { unmap: op.unmap });
    case "discard":
      return image.discard(op.guestOffset, op.lengthBytes);
    case "flush":
      return image.flush();
    case "close":
      return image.close();
    case "snapshot-create":
      await image.createSnapshot(op.name);
      return;
    case "snapshot-apply":
      return image.applySnapshot(op.name);
    case "snapshot-delete":
      return image.deleteSnapshot(op.name);
  }
}

// ----------------------------------------------------------------- images

export interface PreparedImages {
  /** The image file before the workload (durable). */
  initial: Uint8Array;
  /** Read-only backing image, or null. */
  backing: Qcow2Image | null;
  /** Initial version of every sector (BACKING_ID where the backing holds data). */
  initialVersions: Int32Array;
}

/** Create the image (and its backing image) for a scenario. */
export async function prepareImages(scenario: CrashScenario, random: Random): Promise<PreparedImages> {
  const sectors = scenario.sizeBytes / SECTOR_BYTES;
  const initialVersions = new Int32Array(sectors);
  let backing: Qcow2Image | null = null;
  if (scenario.withBacking) {
    const backingFile = new MemoryFile({ name: "backing.qcow2" });
    await createQcow2(backingFile, { sizeBytes: scenario.sizeBytes, clusterSizeBytes: 65536 });
    const writer = await openQcow2(backingFile, { readOnly: false, backing: null });
    for (let i = 0; i < 6; i++) {
      const first = random.int(sectors - 256);
      const count = 1 + random.int(256);
      await writer.write(first * SECTOR_BYTES, patternBytes(first, count, BACKING_ID));
      initialVersions.fill(BACKING_ID, first, first + count);
    }
    await writer.close();
    backing = await openQcow2(new MemoryFile({ name: "backing.qcow2", contents: backingFile.contents(), readOnly: true }), { readOnly: true, backing: null });
  }
  const file = new MemoryFile({ name: "crash.qcow2" });
  await createQcow2(file, {
    sizeBytes: scenario.sizeBytes,
    clusterSizeBytes: scenario.clusterSizeBytes,
    refcountBits: scenario.refcountBits,
    compat: scenario.compat,
    lazyRefcounts: scenario.lazyRefcounts,
    extendedL2: scenario.extendedL2,
    ...(scenario.withBacking ? { backingFile: "backing.qcow2", backingFormat: "qcow2" } : {}),
  });
  return { initial: file.contents(), backing, initialVersions };
}

export async function openScenarioImage(file: MemoryFile | FaultFile, scenario: CrashScenario, images: PreparedImages, readOnly = false): Promise<Qcow2Image> {
  return openQcow2(file, { readOnly, backing: images.backing, closeBacking: false, cacheBytesMax: scenario.cacheBytesMax });
}

// ------------------------------------------------------------- recording

export interface RecordedRun {
  ops: GuestOp[];
  /** FaultFile write count before / after each op (op k spans writes (before[k], after[k]]). */
  writesBefore: number[];
  writesAfter: number[];
  /** Sector versions after each completed flush point: index of the op -> versions. */
  flushedVersions: Map<number, Int32Array>;
  /** Each snapshot's sector versions, by name. */
  snapshotVersions: Map<string, Int32Array>;
  file: FaultFile;
  /** The FaultFile write count when the image was open (writes up to it belong to opening). */
  writesAtOpen: number;
}

/** Run the workload once, recording the file log and op boundaries. */
export async function recordRun(scenario: CrashScenario, images: PreparedImages, ops: GuestOp[]): Promise<RecordedRun> {
  const file = await FaultFile.fromBytes(images.initial, { name: "crash.qcow2", recordLog: true, writeSync: scenario.syncWrites !== false });
  const image = await openScenarioImage(file, scenario, images);
  const writesAtOpen = file.writeCount;
  const writesBefore: number[] = [];
  const writesAfter: number[] = [];
  const flushedVersions = new Map<number, Int32Array>();
  const snapshotVersions = new Map<string, Int32Array>();
  const versions = images.initialVersions.slice();
  for (let k = 0; k < ops.length; k++) {
    const op = ops[k];
    if (op.kind === "snapshot-create") snapshotVersions.set(op.name, versions.slice());
    if (op.kind === "snapshot-apply") op.versions = snapshotVersions.get(op.name);
    writesBefore.push(file.writeCount);
    await applyOp(image, op);
    writesAfter.push(file.writeCount);
    // A change to a cached table made without markDirty would be lost at write-back: caught here, after the op that made it.
    if (op.kind !== "close") await assertCachedTablesMatchFile(image, `workload op ${k} (${op.kind})`);
    for (const effect of opEffects(op, scenario)) versions.fill(effect.id, effect.firstSector, effect.endSector);
    if (isFlushPoint(op)) flushedVersions.set(k, versions.slice());
  }
  return { ops, writesBefore, writesAfter, flushedVersions, snapshotVersions, file, writesAtOpen };
}

/** Which versions a guest sector may read. */
export interface VersionOracle {
  allows(sector: number, id: number): boolean;
  /** The allowed versions of a sector, for failure messages. */
  describe(sector: number): string;
  /** Internal snapshots that must exist and that may exist, with their sector versions. */
  readonly snapshots?: { required: Map<string, Int32Array>; optional: Map<string, Int32Array> };
}

/** Exactly these versions (an internal snapshot). */
class ExactVersions implements VersionOracle {
  readonly #versions: Int32Array;
  constructor(versions: Int32Array) {
    this.#versions = versions;
  }
  allows(sector: number, id: number): boolean {
    return this.#versions[sector] === id;
  }
  describe(sector: number): string {
    return `exactly ${this.#versions[sector]}`;
  }
}

/** What a crash during write `writeNumber` allows each sector to read. */
export class AllowedVersions implements VersionOracle {
  readonly base: Int32Array;
  /** Effects of the ops after the last completed flush, up to and including the interrupted one. */
  readonly effects: Effect[];
  readonly interruptedOp: number;
  readonly snapshots: { required: Map<string, Int32Array>; optional: Map<string, Int32Array> };

  constructor(run: RecordedRun, scenario: CrashScenario, images: PreparedImages, writeNumber: number) {
    let k = -1;
    if (writeNumber > run.writesAtOpen) {
      k = run.writesAfter.findIndex((after) => after >= writeNumber);
      assert.ok(k >= 0, "crash point inside the run");
    }
    this.interruptedOp = k;
    let base = images.initialVersions;
    let from = 0;
    for (let f = k - 1; f >= 0; f--) {
      const flushed = run.flushedVersions.get(f);
      if (flushed !== undefined) {
        base = flushed;
        from = f + 1;
        break;
      }
    }
    this.base = base;
    this.effects = [];
    for (let j = from; j <= k; j++) this.effects.push(...opEffects(run.ops[j], scenario));
    // Snapshot operations end with a flush: those completed before k are durable; k's may or may not be.
    const required = new Map<string, Int32Array>();
    const optional = new Map<string, Int32Array>();
    for (let j = 0; j <= k; j++) {
      const op = run.ops[j];
      const target = j < k ? required : optional;
      if (op.kind === "snapshot-create") target.set(op.name, run.snapshotVersions.get(op.name) as Int32Array);
      if (op.kind === "snapshot-delete") {
        const versions = required.get(op.name) as Int32Array;
        required.delete(op.name);
        if (j === k) optional.set(op.name, versions);
      }
    }
    this.snapshots = { required, optional };
  }

  allows(sector: number, id: number): boolean {
    if (this.base[sector] === id) return true;
    return this.effects.some((e) => e.id === id && sector >= e.firstSector && sector < e.endSector);
  }

  describe(sector: number): string {
    const expected = [this.base[sector], ...this.effects.filter((e) => sector >= e.firstSector && sector < e.endSector).map((e) => e.id)];
    return `${[...new Set(expected)].join(", ")} (interrupted op ${this.interruptedOp})`;
  }
}

/**
 * Possible versions per sector when operations may fail midway (EIO,
 * ENOSPC): a failed operation may have taken effect on any subset of its
 * sectors; a failed flush made nothing durable that was not already.
 */
export class PossibleVersions implements VersionOracle {
  readonly #scenario: CrashScenario;
  /** What each sector may read now (the guest's view). */
  #current: number[][];
  /** What each sector may hold on disk as of the last successful flush. */
  #durable: number[][];
  /** Versions written since the last successful flush. */
  #since: number[][];
  /** True once the guest view is not trusted any more (a failed flush or close: only durable + since). */
  #afterCrash = false;

  constructor(initial: Int32Array, scenario: CrashScenario) {
    this.#scenario = scenario;
    this.#current = Array.from(initial, (id) => [id]);
    this.#durable = Array.from(initial, (id) => [id]);
    this.#since = Array.from(initial, () => []);
  }

  /** Record an operation that succeeded (certain) or failed (maybe applied, in part). */
  apply(op: GuestOp, succeeded: boolean): void {
    if (isFlushPoint(op) && op.kind !== "snapshot-apply") {
      if (succeeded) {
        this.#durable = this.#current.map((ids) => ids.slice());
        this.#since = this.#since.map(() => []);
      }
      return;
    }
    for (const effect of opEffects(op, this.#scenario)) {
      for (let s = effect.firstSector; s < effect.endSector; s++) {
        if (succeeded) this.#current[s] = [effect.id];
        else if (!this.#current[s].includes(effect.id)) this.#current[s].push(effect.id);
        if (!this.#since[s].includes(effect.id)) this.#since[s].push(effect.id);
      }
    }
  }

  /** From now on judge as after a crash: durable state or anything written since. */
  assumeCrash(): void {
    this.#afterCrash = true;
  }

  #set(sector: number): number[] {
    return this.#afterCrash ? [...this.#durable[sector], ...this.#since[sector]] : this.#current[sector];
  }

  allows(sector: number, id: number): boolean {
    return this.#set(sector).includes(id);
  }

  describe(sector: number): string {
    return [...new Set(this.#set(sector))].join(", ");
  }

  /** A copy judged as after a crash now. */
  crashed(): PossibleVersions {
    const copy = new PossibleVersions(new Int32Array(0), this.#scenario);
    copy.#current = this.#current;
    copy.#durable = this.#durable.map((ids) => ids.slice());
    copy.#since = this.#since.map((ids) => ids.slice());
    copy.#afterCrash = true;
    return copy;
  }
}

/** Read the whole guest disk and check every sector against the allowed versions. */
export async function verifyGuest(image: Qcow2Image, allowed: VersionOracle, where: string): Promise<void> {
  const chunkBytes = 256 * KiB;
  const buffer = new Uint8Array(chunkBytes);
  for (let guestOffset = 0; guestOffset < image.sizeBytes; guestOffset += chunkBytes) {
    const length = Math.min(chunkBytes, image.sizeBytes - guestOffset);
    const view = buffer.subarray(0, length);
    await image.read(guestOffset, view);
    for (let at = 0; at < length; at += SECTOR_BYTES) {
      const sector = (guestOffset + at) / SECTOR_BYTES;
      const id = decodeSector(view, at, sector);
      if (id < 0 || !allowed.allows(sector, id)) {
        assert.fail(`${where}: guest sector ${sector} reads version ${id < 0 ? "garbage" : id}, allowed ${allowed.describe(sector)}`);
      }
    }
  }
}

/** Every required snapshot exists, no unknown one does, and each reads exactly as when it was taken. */
export async function verifySnapshots(image: Qcow2Image, expected: { required: Map<string, Int32Array>; optional: Map<string, Int32Array> }, where: string): Promise<void> {
  const names = image.snapshots.map((s) => s.name);
  for (const name of expected.required.keys()) assert.ok(names.includes(name), `${where}: snapshot ${name} lost (have ${names.join(", ")})`);
  for (const name of names) {
    const versions = expected.required.get(name) ?? expected.optional.get(name);
    assert.ok(versions !== undefined, `${where}: unexpected snapshot ${name}`);
    const view = await openSnapshotView(image, name);
    try {
      await verifyGuest(view, new ExactVersions(versions), `${where}: snapshot ${name}`);
    } finally {
      await view.close();
    }
  }
}

export function headerIsDirty(contents: Uint8Array): boolean {
  const header = decodeQcow2Header(contents.subarray(0, Math.min(contents.length, 64 * KiB)));
  return (header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
}

export function assertNoCorruption(result: Qcow2CheckResult, where: string): void {
  if (result.failure !== null || result.checkErrors > 0 || result.corruptions > 0) {
    assert.fail(`${where}: check found corruptions=${result.corruptions} check-errors=${result.checkErrors} failure=${result.failure}\n${result.messages.slice(0, 12).join("\n")}`);
  }
}

/**
 * Like assertNoCorruption, but while a snapshot operation was interrupted
 * refcounts and COPIED flags live in different clusters and cannot change
 * together (QEMU has the same windows): allow COPIED flags that lag their
 * refcounts, as long as no flag claims exclusive ownership of a cluster
 * that is really shared (that one would let a write corrupt a snapshot).
 */
export function assertCrashConsistent(result: Qcow2CheckResult, clusterSizeBytes: number, copiedMayLag: boolean, where: string): void {
  if (!copiedMayLag || result.failure !== null || result.checkErrors > 0 || result.corruptions === 0) {
    assertNoCorruption(result, where);
    return;
  }
  const trulyExclusive = new Set<number>();
  for (const line of result.messages) {
    const leak = /^Leaked cluster (\d+) refcount=\d+ reference=1$/.exec(line);
    if (leak !== null) trulyExclusive.add(Number(leak[1]));
  }
  let copiedErrors = 0;
  for (const line of result.messages) {
    if (!line.startsWith("ERROR")) continue;
    const copied = /^ERROR OFLAG_COPIED (?:L2|data) cluster: (?:l1_index=\d+ l1_entry|l2_entry)=([0-9a-f]+) refcount=(\d+)$/.exec(line);
    if (copied === null) assert.fail(`${where}: ${line}\n${result.messages.slice(0, 12).join("\n")}`);
    copiedErrors++;
    const entry = BigInt(`0x${copied[1]}`);
    const refcount = Number(copied[2]);
    if ((entry & (1n << 63n)) !== 0n && refcount > 1) {
      const cluster = Number((entry & 0x00fffffffffffe00n) / BigInt(clusterSizeBytes));
      assert.ok(trulyExclusive.has(cluster), `${where}: COPIED set on cluster ${cluster} which is shared (${line})`);
    }
  }
  assert.equal(copiedErrors, result.corruptions, `${where}: every corruption is a lagging COPIED flag`);
}

export interface CrashPointOutcome {
  leaks: number;
  dirty: boolean;
}

/**
 * The checks for one crashed image: check (unless dirty: lazy refcounts
 * allow stale refcounts then), reopen read-write (a dirty image is rebuilt),
 * every sector reads an allowed version and every snapshot as taken; when
 * thorough, the image also takes a new write, closes, checks clean but for
 * leaks, and `-r leaks` leaves none.
 */
export async function checkCrashedImage(
  contents: Uint8Array,
  scenario: CrashScenario,
  images: PreparedImages,
  allowed: VersionOracle,
  where: string,
  salt = 0,
  copiedMayLag = false,
  /** Also write after reopening, close, check, repair and check again. */
  thorough = true,
): Promise<CrashPointOutcome> {
  const dirty = headerIsDirty(contents);
  const cs = scenario.clusterSizeBytes;
  let leaks = 0;
  if (!dirty) {
    const result = await checkQcow2(new MemoryFile({ name: "crashed.qcow2", contents, readOnly: true }));
    assertCrashConsistent(result, cs, copiedMayLag, `${where}: check of the crashed image`);
    leaks = result.leaks;
  } else {
    assert.ok(scenario.lazyRefcounts, `${where}: dirty bit set on an image without lazy refcounts`);
  }
  const file = new MemoryFile({ name: "crashed.qcow2", contents });
  const image = await openScenarioImage(file, scenario, images);
  await verifyGuest(image, allowed, `${where}: after reopen`);
  if (allowed.snapshots !== undefined) await verifySnapshots(image, allowed.snapshots, where);
  if (!thorough) {
    await image.close();
    return { leaks, dirty };
  }
  // The reopened image must stay usable: a write through all the paths, then close.
  const sectors = scenario.sizeBytes / SECTOR_BYTES;
  const first = (salt * 7919 + 13) % Math.max(1, sectors - 64);
  await image.write(first * SECTOR_BYTES, patternBytes(first, 64, 0x7fff0000));
  await image.close();
  const closed = new MemoryFile({ name: "crashed.qcow2", contents: file.contents() });
  const after = await checkQcow2(closed);
  assertCrashConsistent(after, cs, copiedMayLag, `${where}: check after reopen and write`);
  // Lagging COPIED flags need -r all, as with qemu-img; everything else -r leaks.
  const repaired = await checkQcow2(closed, { repair: copiedMayLag && after.corruptions > 0 ? "all" : "leaks" });
  assertNoCorruption(repaired, `${where}: check -r leaks`);
  assert.equal(repaired.leaks, 0, `${where}: leaks left after -r leaks`);
  const reread = await openScenarioImage(new MemoryFile({ contents: closed.contents(), readOnly: true }), scenario, images, true);
  const back = new Uint8Array(64 * SECTOR_BYTES);
  await reread.read(first * SECTOR_BYTES, back);
  for (let i = 0; i < 64; i++) assert.equal(decodeSector(back, i * SECTOR_BYTES, first + i), 0x7fff0000, `${where}: write after reopen reads back`);
  await reread.close();
  return { leaks, dirty };
}
