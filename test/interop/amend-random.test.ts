/**
 * Randomized: qemu-io builds an image (writes, zero writes with and without
 * unmap, discards) with internal snapshots taken, applied and deleted in
 * between, sometimes over a backing file; then `amend -o compat=0.10` and
 * `amend -o refcount_bits=N` by snapstack, each on a copy. Every state (the
 * active one and each snapshot, read with qemu-img convert -l) must read as
 * before and qemu-img check must pass. qemu-img does the same amends on its
 * own copies: its exit status must match ours, and where its downgrade kept
 * every state (it zeroes a snapshot's cluster that the active state maps as
 * a zero-alloc entry) and left no error for check (it sets COPIED on a
 * cluster that a snapshot's table maps too) its file must be byte for byte
 * ours. Prints its seed;
 * replay with SNAPSTACK_SEED=<seed>.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { createRandom, testSeed } from "../helpers/random.ts";
import { qemuImg, qemuIo, snapstack } from "./jobs-helpers.ts";
import { run } from "../helpers/tools.ts";

const SIZE = 8 * 1024 * 1024;
const ROUNDS = 5;
const WIDTHS = [1, 2, 4, 8, 32, 64];

type Random = ReturnType<typeof createRandom>;

/** One qemu-io command at a random 4 KiB-aligned place: data (never pattern 0), zeroes, zeroes with unmap, discard. */
function randomCommand(random: Random): string {
  const offset = random.int(SIZE / 4096) * 4096;
  const length = Math.min(SIZE - offset, (1 + random.int(48)) * 4096);
  const roll = random.int(10);
  if (roll < 5) return `write -q -P ${1 + random.int(255)} ${offset} ${length}`;
  if (roll < 7) return `write -q -z ${offset} ${length}`;
  if (roll < 9) return `write -q -z -u ${offset} ${length}`;
  return `discard -q ${offset} ${length}`;
}

/** The snapshot names of an image, in table order. */
async function snapshotNames(path: string): Promise<string[]> {
  const info = JSON.parse(await qemuImg("info", "--output=json", path)) as { snapshots?: { name: string }[] };
  return (info.snapshots ?? []).map((snapshot) => snapshot.name);
}

/** Every state of the image as raw bytes: "" for the active one, then each snapshot by name. */
async function readStates(path: string, scratch: string): Promise<Map<string, Buffer>> {
  const states = new Map<string, Buffer>();
  for (const name of ["", ...(await snapshotNames(path))]) {
    const out = join(scratch, "state.raw");
    await qemuImg("convert", "-O", "raw", ...(name === "" ? [] : ["-l", `snapshot.name=${name}`]), path, out);
    states.set(name, readFileSync(out));
  }
  return states;
}

/** qemu-img check's exit status and output. */
async function check(path: string): Promise<{ clean: boolean; output: string }> {
  const result = await run("qemu-img", ["check", path]);
  return { clean: result.code === 0, output: `${result.stdout}${result.stderr}` };
}

async function assertClean(path: string, what: string): Promise<void> {
  const { clean, output } = await check(path);
  assert.ok(clean, `${what}: qemu-img check: ${output}`);
}

function statesEqual(a: Map<string, Buffer>, b: Map<string, Buffer>): boolean {
  return a.size === b.size && [...a].every(([name, bytes]) => b.get(name)?.equals(bytes) === true);
}

function assertStates(actual: Map<string, Buffer>, expected: Map<string, Buffer>, what: string): void {
  assert.deepEqual([...actual.keys()], [...expected.keys()], `${what}: snapshots`);
  for (const [name, bytes] of expected) assert.ok(actual.get(name)?.equals(bytes), `${what}: state '${name || "active"}' differs`);
}

test("random images with snapshots: amend compat=0.10 and refcount_bits keep every state; qemu-img agrees", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const seed = testSeed();
  t.diagnostic(`seed ${seed}`);
  console.log(`amend-random seed ${seed}`);
  const random = createRandom(seed);
  const dir = scratchDir(t);
  const path = (name: string): string => join(dir, name);

  for (let round = 0; round < ROUNDS; round++) {
    const clusterSize = random.int(2) === 0 ? "4k" : "64k";
    const backed = random.int(2) === 0;
    const log = [`round ${round}: cluster_size=${clusterSize}${backed ? ", over a backing file" : ""}`];
    const where = (): string => `seed ${seed}, ${log.join("; ")}`;
    if (backed) {
      await qemuImg("create", "-f", "qcow2", path("base.qcow2"), String(SIZE));
      await qemuIo(path("base.qcow2"), `write -q -P 201 0 ${SIZE}`);
      await qemuImg("create", "-f", "qcow2", "-o", `cluster_size=${clusterSize}`, "-b", "base.qcow2", "-F", "qcow2", path("image.qcow2"));
    } else {
      await qemuImg("create", "-f", "qcow2", "-o", `cluster_size=${clusterSize}`, path("image.qcow2"), String(SIZE));
    }
    let taken = 0;
    for (let segment = 0; segment < 4 + random.int(4); segment++) {
      const commands = Array.from({ length: 2 + random.int(8) }, () => randomCommand(random));
      await qemuIo(path("image.qcow2"), ...commands);
      log.push(commands.join(", "));
      const names = await snapshotNames(path("image.qcow2"));
      const roll = random.int(10);
      if (roll < 6 || names.length === 0) {
        await qemuImg("snapshot", "-c", `s${taken}`, path("image.qcow2"));
        log.push(`snapshot -c s${taken++}`);
      } else if (roll < 8) {
        const name = names[random.int(names.length)];
        await qemuImg("snapshot", "-a", name, path("image.qcow2"));
        log.push(`snapshot -a ${name}`);
      } else {
        const name = names[random.int(names.length)];
        await qemuImg("snapshot", "-d", name, path("image.qcow2"));
        log.push(`snapshot -d ${name}`);
      }
    }
    await assertClean(path("image.qcow2"), `${where()}: the image qemu-io built`);
    const before = await readStates(path("image.qcow2"), dir);

    // Downgrade.
    copyFileSync(path("image.qcow2"), path("ours.qcow2"));
    copyFileSync(path("image.qcow2"), path("theirs.qcow2"));
    const ours = await snapstack("img", "amend", "-o", "compat=0.10", path("ours.qcow2"));
    const theirs = await run("qemu-img", ["amend", "-o", "compat=0.10", path("theirs.qcow2")]);
    assert.equal(ours.status, 0, `${where()}: amend compat=0.10: ${ours.stderr}`);
    assert.equal(theirs.code, 0, `${where()}: qemu-img amend compat=0.10: ${theirs.stderr}`);
    await assertClean(path("ours.qcow2"), `${where()}: after compat=0.10`);
    assertStates(await readStates(path("ours.qcow2"), dir), before, `${where()}: after compat=0.10`);
    assert.match(await qemuImg("info", path("ours.qcow2")), /compat: 0\.10/);
    // qemu-img's downgrade also sets COPIED on a zeroed cluster two tables map (check: an error).
    if (statesEqual(await readStates(path("theirs.qcow2"), dir), before) && (await check(path("theirs.qcow2"))).clean) {
      assert.ok(readFileSync(path("ours.qcow2")).equals(readFileSync(path("theirs.qcow2"))), `${where()}: the downgraded file is not qemu-img's`);
    } else {
      log.push("(qemu-img's downgrade changed a state or left an error)");
      t.diagnostic(`round ${round}: qemu-img's downgrade changed a state or left an error check finds; snapstack's did neither`);
    }

    // Another refcount width: the same exit status as qemu-img, every state kept, and qemu-img can go on using it.
    const width = WIDTHS[random.int(WIDTHS.length)];
    log.push(`refcount_bits=${width}`);
    copyFileSync(path("image.qcow2"), path("ours.qcow2"));
    copyFileSync(path("image.qcow2"), path("theirs.qcow2"));
    const unchanged = readFileSync(path("ours.qcow2"));
    const oursWidth = await snapstack("img", "amend", "-o", `refcount_bits=${width}`, path("ours.qcow2"));
    const theirsWidth = await run("qemu-img", ["amend", "-o", `refcount_bits=${width}`, path("theirs.qcow2")]);
    assert.equal(oursWidth.status, theirsWidth.code, `${where()}: exit status (qemu-img: ${theirsWidth.stderr.trim()}; snapstack: ${oursWidth.stderr.trim()})`);
    if (oursWidth.status !== 0) {
      assert.match(oursWidth.stderr, /E_INVALID_OPTION: Cannot decrease refcount entry width/, where());
      assert.ok(readFileSync(path("ours.qcow2")).equals(unchanged), `${where()}: a refused amend changed the image`);
      continue;
    }
    await assertClean(path("ours.qcow2"), `${where()}: after the new width`);
    assert.match(await qemuImg("info", path("ours.qcow2")), new RegExp(`refcount bits: ${width}\\n`));
    assertStates(await readStates(path("ours.qcow2"), dir), before, `${where()}: after refcount_bits=${width}`);
    // qemu-img snapshot -c needs every refcount to take one more; at 1 bit it is refused, as on any such image.
    if (width > 2) {
      await qemuIo(path("ours.qcow2"), `write -q -P 77 0 ${SIZE / 2}`);
      await qemuImg("snapshot", "-c", "after", path("ours.qcow2"));
      await assertClean(path("ours.qcow2"), `${where()}: after qemu-img wrote and took a snapshot on the new width`);
    }
  }
});
