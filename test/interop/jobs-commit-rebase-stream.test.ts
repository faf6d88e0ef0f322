/**
 * commit, rebase, stream against qemu-img 7.2: chains built by qemu-img and
 * changed by snapstack (and the other way round), results compared with
 * qemu-img's own commit/rebase on copies of the same chain, a raw model,
 * and qemu-img check after each step.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { cpSync, mkdirSync, readFileSync, statSync, symlinkSync } from "node:fs";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { commitImage, rebaseImage, streamImage } from "../../src/chain/jobs/index.ts";
import { isSnapstackError } from "../../src/base/errors.ts";
import { COPY_WRITE_BEHIND_BYTES } from "../../src/chain/copy-pipeline.ts";
import { openNodeFile } from "../../src/io/node-file.ts";
import {
  DiskModel,
  assertClean,
  assertMatchesModel,
  assertSameContent,
  backingOf,
  createQcow2,
  qemuImg,
  qemuIo,
  snapstack,
  snapstackOk,
} from "./jobs-helpers.ts";

const MiB = 1024 * 1024;
const KiB = 1024;
const SIZE = 4 * MiB;

interface Chain {
  dir: string;
  base: string;
  mid: string;
  top: string;
  /** Content of each layer's state. */
  models: { base: DiskModel; mid: DiskModel; top: DiskModel };
}

/** base <- mid <- top, built by qemu-img and qemu-io; partial clusters, zero clusters, discards. */
async function buildChain(dir: string): Promise<Chain> {
  mkdirSync(dir, { recursive: true });
  const base = await createQcow2(join(dir, "base.qcow2"), { sizeBytes: SIZE });
  await qemuIo(base, "write -P 0x11 0 1M", "write -P 0x15 3M 512k");
  const baseModel = new DiskModel(SIZE);
  baseModel.fill(0, MiB, 0x11);
  baseModel.fill(3 * MiB, 512 * KiB, 0x15);
  const mid = await createQcow2(join(dir, "mid.qcow2"), { backing: "base.qcow2" });
  await qemuIo(mid, "write -P 0x22 512k 1M", "write -z 3M 64k");
  const midModel = baseModel.clone();
  midModel.fill(512 * KiB, MiB, 0x22);
  midModel.fill(3 * MiB, 64 * KiB, 0);
  const top = await createQcow2(join(dir, "top.qcow2"), { backing: "mid.qcow2" });
  await qemuIo(top, "write -P 0x33 100k 10k", "write -P 0x44 2M 256k", "write -z 700k 100k");
  const topModel = midModel.clone();
  topModel.fill(100 * KiB, 10 * KiB, 0x33);
  topModel.fill(2 * MiB, 256 * KiB, 0x44);
  topModel.fill(700 * KiB, 100 * KiB, 0);
  return { dir, base, mid, top, models: { base: baseModel, mid: midModel, top: topModel } };
}

/** A copy of the chain's directory (relative backing names keep working). */
function copyChain(chain: Chain, dir: string): Chain {
  cpSync(chain.dir, dir, { recursive: true });
  return { ...chain, dir, base: join(dir, "base.qcow2"), mid: join(dir, "mid.qcow2"), top: join(dir, "top.qcow2") };
}

async function assertAllClean(chain: Chain): Promise<void> {
  for (const path of [chain.base, chain.mid, chain.top]) await assertClean(path);
}

/** The chain in dir/ours and a copy in dir/qemu. */
async function twoChains(t: TestContext): Promise<{ ours: Chain; qemu: Chain }> {
  const dir = scratchDir(t);
  const ours = await buildChain(join(dir, "ours"));
  return { ours, qemu: copyChain(ours, join(dir, "qemu")) };
}

test("commit into the backing file equals qemu-img commit; the overlay is emptied", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const { ours, qemu } = await twoChains(t);
  const { stdout } = await snapstackOk("img", "commit", ours.top);
  assert.equal(stdout, "Image committed.\n");
  await qemuImg("commit", qemu.top);
  await assertAllClean(ours);
  await assertSameContent(ours.mid, qemu.mid);
  await assertSameContent(ours.top, qemu.top);
  await assertMatchesModel(ours.mid, ours.models.top, ours.dir, "committed-mid");
  await assertMatchesModel(ours.top, ours.models.top, ours.dir, "committed-top");
  await assertMatchesModel(ours.base, ours.models.base, ours.dir, "base-untouched");
  // Emptied: nothing allocated in the top layer any more.
  const map = JSON.parse(await qemuImg("map", "--output=json", ours.top)) as { depth: number; present: boolean }[];
  assert.ok(map.every((entry) => entry.depth > 0 || !entry.present), JSON.stringify(map));
  assert.ok(statSync(ours.top).size <= statSync(qemu.top).size + 4 * 65536, "emptied overlay is small");
});

test("a commit of more data than COPY_WRITE_BEHIND_BYTES flushes BASE behind the copy; BASE equals qemu-img's commit and is clean", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const dataBytes = 2 * COPY_WRITE_BEHIND_BYTES + 8 * MiB;
  const sizeBytes = 2 * dataBytes;
  for (const side of ["ours", "qemu"]) {
    mkdirSync(join(dir, side));
    const base = await createQcow2(join(dir, side, "base.qcow2"), { sizeBytes });
    await qemuIo(base, "write -P 0x11 0 1M");
    const top = await createQcow2(join(dir, side, "top.qcow2"), { backing: "base.qcow2" });
    // Data every other MiB, so BASE allocates clusters all through the copy (and its write-behinds).
    const writes: string[] = [];
    for (let at = 0; at < sizeBytes; at += 2 * MiB) writes.push(`write -P ${1 + ((at / MiB) % 250)} ${at} 1M`);
    await qemuIo(top, ...writes);
  }
  // For each flush of BASE, how many data writes (64 KiB or more) it had seen: a flush behind the copy has more after it.
  let dataWrites = 0;
  const dataWritesAtFlush: number[] = [];
  await commitImage(join(dir, "ours", "top.qcow2"), {
    openFile: async (path, request) => {
      const file = await openNodeFile(path, { readOnly: request.readOnly });
      if (!path.endsWith("base.qcow2") || request.readOnly) return file;
      const flush = file.flush.bind(file);
      const write = file.write.bind(file);
      file.write = async (hostOffset, data) => {
        await write(hostOffset, data);
        if (data.length >= 64 * KiB) dataWrites++;
      };
      file.flush = async () => {
        dataWritesAtFlush.push(dataWrites);
        await flush();
      };
      return file;
    },
  });
  await qemuImg("commit", join(dir, "qemu", "top.qcow2"));
  const behind = dataWritesAtFlush.filter((seen) => seen > 0 && seen < dataWrites).length;
  assert.ok(behind >= 1, `BASE flushed behind the copy ${behind} times (data writes seen at each flush: ${dataWritesAtFlush.join(", ")} of ${dataWrites})`);
  await assertClean(join(dir, "ours", "base.qcow2"));
  await assertClean(join(dir, "ours", "top.qcow2"));
  await assertSameContent(join(dir, "ours", "base.qcow2"), join(dir, "qemu", "base.qcow2"));
  await assertSameContent(join(dir, "ours", "top.qcow2"), join(dir, "qemu", "top.qcow2"));
});

test("commit -b base (through an intermediate) equals qemu-img commit -b; warns about the intermediate", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const { ours, qemu } = await twoChains(t);
  const result = await snapstackOk("img", "commit", "-b", "base.qcow2", ours.top);
  assert.match(result.stderr, /mid\.qcow2' lies between/);
  await qemuImg("commit", "-b", "base.qcow2", qemu.top);
  await assertAllClean(ours);
  await assertSameContent(ours.base, qemu.base);
  await assertMatchesModel(ours.base, ours.models.top, ours.dir, "committed-base");
  // -b implies -d: the top still holds its data and reads the same.
  await assertMatchesModel(ours.top, ours.models.top, ours.dir, "top-kept");
});

test("commit -d keeps the overlay; commit of a snapstack-written chain by qemu-img and back", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const { ours } = await twoChains(t);
  await snapstackOk("img", "commit", "-d", ours.top);
  await assertAllClean(ours);
  await assertMatchesModel(ours.mid, ours.models.top, ours.dir, "mid");
  await assertMatchesModel(ours.top, ours.models.top, ours.dir, "top");
  // snapstack writes more into the top, qemu-img commits it, snapstack commits mid into base.
  await snapstackOk("io", "-c", "write -P 0x66 1M 64k", ours.top);
  ours.models.top.fill(MiB, 64 * KiB, 0x66);
  await qemuImg("commit", ours.top);
  await assertAllClean(ours);
  await assertMatchesModel(ours.mid, ours.models.top, ours.dir, "mid2");
  await commitImage(ours.mid);
  await assertAllClean(ours);
  await assertMatchesModel(ours.base, ours.models.top, ours.dir, "base2");
  await assertMatchesModel(ours.top, ours.models.top, ours.dir, "top2");
});

test("commit grows a smaller base to the overlay's size", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const base = await createQcow2(join(dir, "small.qcow2"), { sizeBytes: MiB });
  await qemuIo(base, "write -P 0x01 0 1M");
  const top = join(dir, "big.qcow2");
  await qemuImg("create", "-f", "qcow2", "-b", "small.qcow2", "-F", "qcow2", top, String(3 * MiB));
  await qemuIo(top, "write -P 0x02 2M 64k");
  const model = new DiskModel(3 * MiB);
  model.fill(0, MiB, 0x01);
  model.fill(2 * MiB, 64 * KiB, 0x02);
  await snapstackOk("img", "commit", top);
  await assertClean(base);
  const info = JSON.parse(await qemuImg("info", "--output=json", base)) as { "virtual-size": number };
  assert.equal(info["virtual-size"], 3 * MiB);
  await assertMatchesModel(base, model, dir);
});

test("commit grows a base whose own backing file is longer: the grown area reads as zeroes, as after qemu-img commit", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  // long (4 MiB of 0x05) <- base (1,000,448 bytes, empty) <- top (3 MiB, 64 KiB of 0x07 at 2 MiB).
  const long = await createQcow2(join(dir, "long.qcow2"), { sizeBytes: 4 * MiB });
  await qemuIo(long, "write -P 0x05 0 4M");
  const base = join(dir, "base.qcow2");
  await qemuImg("create", "-f", "qcow2", "-b", "long.qcow2", "-F", "qcow2", base, "1000000");
  const top = join(dir, "top.qcow2");
  await qemuImg("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, String(3 * MiB));
  await qemuIo(top, "write -P 0x07 2M 64k");
  const model = new DiskModel(3 * MiB);
  model.fill(0, 1000448, 0x05); // qemu-img rounds the size up to a sector
  model.fill(2 * MiB, 64 * KiB, 0x07);
  await assertMatchesModel(top, model, dir);
  await snapstackOk("img", "commit", top);
  await assertClean(base);
  await assertMatchesModel(base, model, dir);
  await assertMatchesModel(top, model, dir);
});

test("commit errors: no backing file, base not in the chain (coded, nothing written)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const { ours } = await twoChains(t);
  const noBacking = await snapstack("img", "commit", ours.base);
  assert.equal(noBacking.status, 1);
  assert.match(noBacking.stderr, /E_NOT_IN_CHAIN: Image does not have a backing file/);
  const missing = await snapstack("img", "commit", "-b", "nothere.qcow2", ours.top);
  assert.match(missing.stderr, /E_NOT_IN_CHAIN: Did not find 'nothere\.qcow2' in the backing chain of '.*top\.qcow2'/);
  const self = await snapstack("img", "commit", "-b", "top.qcow2", ours.top);
  assert.match(self.stderr, /E_NOT_IN_CHAIN/);
  // A name with a protocol prefix is compared as a plain string, as qemu-img's bdrv_find_backing_image does.
  const prefixed = await snapstack("img", "commit", "-b", `file:${ours.base}`, ours.top);
  assert.match(prefixed.stderr, /E_NOT_IN_CHAIN: Did not find 'file:/);
  await assertAllClean(ours);
  await assertMatchesModel(ours.top, ours.models.top, ours.dir, "top");
  await assertMatchesModel(ours.mid, ours.models.mid, ours.dir, "mid");
});

test("safe rebase onto the base (dropping mid) equals qemu-img rebase; content unchanged", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const { ours, qemu } = await twoChains(t);
  const result = await rebaseImage(ours.top, { backingFile: "base.qcow2", backingFormat: "qcow2" });
  await qemuImg("rebase", "-b", "base.qcow2", "-F", "qcow2", qemu.top);
  assert.equal(await backingOf(ours.top), "base.qcow2");
  await assertAllClean(ours);
  await assertMatchesModel(ours.top, ours.models.top, ours.dir);
  await assertSameContent(ours.top, qemu.top);
  // Ranges where mid equals base by metadata were not read: only mid's own clusters were compared.
  assert.ok(result.compare !== null);
  assert.ok(result.compare.comparedBytes <= 2 * MiB, `compared ${result.compare.comparedBytes}`);
  assert.ok(result.compare.metadataEqualBytes >= MiB);
});

test("safe rebase onto an unrelated image of another size, and -b '' (flatten), equal qemu-img's", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const { ours, qemu } = await twoChains(t);
  for (const chain of [ours, qemu]) {
    const other = await createQcow2(join(chain.dir, "other.qcow2"), { sizeBytes: 2 * MiB });
    await qemuIo(other, "write -P 0x77 0 2M");
  }
  await snapstackOk("img", "rebase", "-b", "other.qcow2", "-F", "qcow2", ours.top);
  await qemuImg("rebase", "-b", "other.qcow2", "-F", "qcow2", qemu.top);
  await assertClean(ours.top);
  await assertMatchesModel(ours.top, ours.models.top, ours.dir, "on-other");
  await assertSameContent(ours.top, qemu.top);
  await snapstackOk("img", "rebase", "-b", "", ours.top);
  await qemuImg("rebase", "-b", "", qemu.top);
  assert.equal(await backingOf(ours.top), undefined);
  await assertClean(ours.top);
  await assertMatchesModel(ours.top, ours.models.top, ours.dir, "flat");
  await assertSameContent(ours.top, qemu.top);
});

test("rebase -u rewrites the header only; -F is required; names that do not fit are refused", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const { ours } = await twoChains(t);
  const noFormat = await snapstack("img", "rebase", "-b", "base.qcow2", ours.top);
  assert.equal(noFormat.status, 1);
  assert.match(noFormat.stderr, /E_BACKING_FORMAT: Could not change the backing file to 'base\.qcow2': backing format must be specified/);
  const noBacking = await snapstack("img", "rebase", ours.top);
  assert.match(noBacking.stderr, /E_USAGE: Must specify backing file \(-b\) or use unsafe mode \(-u\)/);
  await snapstackOk("img", "rebase", "-u", "-b", "renamed.qcow2", "-F", "qcow2", ours.top);
  assert.equal(await backingOf(ours.top), "renamed.qcow2");
  const tooLong = await snapstack("img", "rebase", "-u", "-b", "x".repeat(2000), "-F", "qcow2", ours.top);
  assert.equal(tooLong.status, 1);
  assert.match(tooLong.stderr, /E_TOO_LARGE/);
  assert.equal(await backingOf(ours.top), "renamed.qcow2");
  // qemu-img puts it back (unsafe), then the chain reads as before.
  await qemuImg("rebase", "-u", "-b", "mid.qcow2", "-F", "qcow2", ours.top);
  await assertClean(ours.top);
  await assertMatchesModel(ours.top, ours.models.top, ours.dir);
});

test("stream --base base pulls mid's data into the overlay; stream without base flattens", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const { ours } = await twoChains(t);
  const result = await streamImage(ours.top, { base: "base.qcow2" });
  assert.equal(result.backingFile, "base.qcow2");
  assert.equal(await backingOf(ours.top), "base.qcow2");
  await assertAllClean(ours);
  await assertMatchesModel(ours.top, ours.models.top, ours.dir, "streamed");
  // Only mid's data was copied (1 MiB + 64 KiB zero cluster, minus what top already held).
  assert.ok(result.streamedBytes <= MiB + 64 * KiB, `streamed ${result.streamedBytes}`);
  // qemu-img now works on the shorter chain.
  await qemuIo(ours.top, "write -P 0x55 3M 4k");
  ours.models.top.fill(3 * MiB, 4 * KiB, 0x55);
  await snapstackOk("img", "stream", ours.top);
  assert.equal(await backingOf(ours.top), undefined);
  await assertClean(ours.top);
  await assertMatchesModel(ours.top, ours.models.top, ours.dir, "flat");
  const bad = await snapstack("img", "stream", "--base", "nothere.qcow2", ours.top);
  assert.match(bad.stderr, /E_NOT_IN_CHAIN/);
});

test("cancelled commit, rebase and stream leave every image consistent and reading as before", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const base = await createQcow2(join(dir, "base.qcow2"), { sizeBytes: 32 * MiB });
  await qemuIo(base, "write -P 0x01 0 16M");
  const top = await createQcow2(join(dir, "top.qcow2"), { backing: "base.qcow2" });
  await qemuIo(top, "write -P 0x02 4M 12M");
  const model = new DiskModel(32 * MiB);
  model.fill(0, 16 * MiB, 0x01);
  model.fill(4 * MiB, 12 * MiB, 0x02);
  const cancelAfter = (bytes: number): { signal: AbortSignal; onProgress: (p: { doneBytes: number }) => void } => {
    const controller = new AbortController();
    return { signal: controller.signal, onProgress: (p) => void (p.doneBytes >= bytes && controller.abort()) };
  };
  const expectAborted = (error: unknown): boolean => isSnapstackError(error) && error.code === "E_ABORTED";

  await assert.rejects(commitImage(top, cancelAfter(4 * MiB)), expectAborted);
  await assertClean(base);
  await assertClean(top);
  await assertMatchesModel(top, model, dir, "after-commit-cancel");

  await assert.rejects(streamImage(top, cancelAfter(2 * MiB)), expectAborted);
  assert.equal(await backingOf(top), "base.qcow2");
  await assertClean(top);
  await assertMatchesModel(top, model, dir, "after-stream-cancel");

  await qemuImg("create", "-f", "qcow2", join(dir, "other.qcow2"), String(32 * MiB));
  await assert.rejects(rebaseImage(top, { backingFile: "other.qcow2", backingFormat: "qcow2", ...cancelAfter(20 * MiB) }), expectAborted);
  assert.equal(await backingOf(top), "base.qcow2");
  await assertClean(top);
  await assertMatchesModel(top, model, dir, "after-rebase-cancel");
});

test("a chain through a symbolically linked directory: a '..' after the link resolves as the kernel (and qemu-img) resolves it, in diff --export, stream and commit", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  mkdirSync(join(dir, "T"));
  mkdirSync(join(dir, "else", "deep", "dir"), { recursive: true });
  mkdirSync(join(dir, "store", "deltas"), { recursive: true });
  const base = await createQcow2(join(dir, "else", "deep", "base.qcow2"), { sizeBytes: 4 * MiB });
  await qemuIo(base, "write -P 0x11 0 1M");
  const mid = await createQcow2(join(dir, "else", "deep", "dir", "mid.qcow2"), { backing: "../base.qcow2" });
  await qemuIo(mid, "write -P 0x22 1M 1M");
  symlinkSync("../else/deep/dir", join(dir, "T", "sub"));
  symlinkSync("../store/deltas", join(dir, "T", "out"));
  // top names "sub/mid.qcow2", whose "../base.qcow2" is else/deep/base.qcow2 (textually it would be T/base.qcow2).
  const top = await createQcow2(join(dir, "T", "top.qcow2"), { backing: "sub/mid.qcow2" });
  await qemuIo(top, "write -P 0x33 2M 1M");
  const reference = join(dir, "reference.raw");
  await qemuImg("convert", "-O", "raw", top, reference);
  // diff --export into the linked "out": the delta must name base.qcow2 so that QEMU finds it from store/deltas.
  const delta = join(dir, "T", "out", "delta.qcow2");
  await snapstackOk("img", "diff", "-q", "--export", delta, base, top);
  assert.equal(await backingOf(delta), "../../else/deep/base.qcow2");
  await assertSameContent(delta, reference);
  await assertClean(delta);
  // stream mid into top, keeping base: top's new backing name leads to base from T.
  await snapstackOk("img", "stream", "--base", `${join(dir, "T", "sub")}/../base.qcow2`, top);
  assert.equal(await backingOf(top), "../else/deep/base.qcow2");
  await assertSameContent(top, reference);
  await assertClean(top);
  // commit top into base through the new name.
  await snapstackOk("img", "commit", top);
  await assertSameContent(base, reference);
  await assertClean(base);
});

test("rebase refuses a backing name the header cannot hold before it copies anything: the overlay is untouched", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const deep = join(dir, ...Array.from({ length: 45 }, () => "dddddddd"));
  mkdirSync(deep, { recursive: true });
  const base = await createQcow2(join(dir, "base.qcow2"), { sizeBytes: 4 * MiB }, ["-o", "cluster_size=512"]);
  await qemuIo(base, "write -P 0x11 0 1M");
  const newBase = await createQcow2(join(deep, "new.qcow2"), { sizeBytes: 4 * MiB });
  const top = await createQcow2(join(dir, "top.qcow2"), { backing: "base.qcow2" }, ["-o", "cluster_size=512"]);
  const before = readFileSync(top);
  const refused = await snapstack("img", "rebase", "-b", newBase, "-F", "qcow2", top);
  assert.equal(refused.status, 1);
  assert.equal(refused.stderr, `snapstack: error E_TOO_LARGE: Could not change the backing file to '${newBase}': No space left in the file header\n`);
  assert.deepEqual(readFileSync(top), before, "nothing was copied into the overlay");
  await assertClean(top);
});
