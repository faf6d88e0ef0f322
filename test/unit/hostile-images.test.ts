/**
 * Hostile input never hurts the host: the corpus (test/fuzz/corpus), the
 * generated malformed images (test/fuzz/hostile-cases.ts) and a mutation
 * fuzzer over valid images all go through the probe (test/fuzz/probe-image.ts)
 * in a worker with a per-case timeout and a heap limit. Every case must end
 * in data or clean coded errors: no unhandled exception, no E_INTERNAL, no
 * hang, no unbounded memory, no write to a read-only file or far past the
 * end. Failing cases are saved to the corpus.
 *
 * SNAPSTACK_SEED replays; SNAPSTACK_FUZZ_SECONDS sets the fuzzing time
 * (default 40; SNAPSTACK_SOAK=1: 600).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { writeFileSync } from "node:fs";
import { createRandom, testSeed } from "../helpers/random.ts";
import { scratchDir } from "../helpers/tools.ts";
import { hostileCases, mutate, mutationContext, seedImages } from "../fuzz/hostile-cases.ts";
import { ProbeRunner, corpusFiles, problemOf, saveToCorpus, type CaseOutcome } from "../fuzz/fuzz-runner.ts";
import { openImage } from "../../src/chain/open-image.ts";
import { createQcow2 } from "../../src/formats/qcow2/create-qcow2.ts";
import { createNodeFile } from "../../src/io/node-file.ts";
import { isSnapstackError } from "../../src/base/errors.ts";

const SOAK = process.env.SNAPSTACK_SOAK === "1";
const FUZZ_SECONDS = Number(process.env.SNAPSTACK_FUZZ_SECONDS ?? (SOAK ? 600 : 40));

interface Tally {
  cases: number;
  opened: number;
  refusedAtOpen: number;
  codes: Map<string, number>;
}

function count(tally: Tally, outcome: CaseOutcome): void {
  tally.cases++;
  if (outcome.kind !== "done") return;
  const open = outcome.reply.steps["open read-only"];
  if (open === "ok") tally.opened++;
  else tally.refusedAtOpen++;
  for (const code of Object.values(outcome.reply.steps)) if (code !== "ok") tally.codes.set(code, (tally.codes.get(code) ?? 0) + 1);
}

function summary(tally: Tally): string {
  const codes = [...tally.codes].sort((a, b) => b[1] - a[1]).map(([code, n]) => `${code} ${n}`).join(", ");
  return `${tally.cases} cases: ${tally.opened} opened, ${tally.refusedAtOpen} refused at open; step errors: ${codes || "none"}; problems: 0`;
}

test("the corpus and generated malformed images end in data or clean errors", async (t) => {
  const runner = new ProbeRunner();
  t.after(() => runner.close());
  const tally: Tally = { cases: 0, opened: 0, refusedAtOpen: 0, codes: new Map() };
  const failures: string[] = [];
  for (const { name, bytes } of corpusFiles()) {
    const outcome = await runner.run(bytes);
    count(tally, outcome);
    const problem = problemOf(outcome);
    if (problem !== null) failures.push(`corpus ${name}: ${problem}`);
  }
  const corpusCount = tally.cases;
  const seeds = await seedImages();
  for (const [i, seed] of seeds.entries()) {
    for (const hostile of hostileCases(seed, 1000 + i)) {
      const outcome = await runner.run(hostile.bytes);
      count(tally, outcome);
      const problem = problemOf(outcome);
      if (problem !== null) failures.push(`${hostile.name} (saved as ${saveToCorpus(hostile.bytes, hostile.name)}): ${problem}`);
    }
  }
  t.diagnostic(`malformed images tried: ${tally.cases} (${corpusCount} from the corpus); ${summary(tally)}`);
  assert.deepEqual(failures, []);
});

test("mutation fuzzer over valid images: no crash, hang, unbounded memory or stray write", async (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (replay with SNAPSTACK_SEED=${seed}); ${FUZZ_SECONDS} s`);
  const random = createRandom(seed);
  const seeds = await seedImages();
  const contexts = seeds.map((s) => mutationContext(s));
  const runner = new ProbeRunner();
  t.after(() => runner.close());
  const tally: Tally = { cases: 0, opened: 0, refusedAtOpen: 0, codes: new Map() };
  const failures: string[] = [];
  const deadline = Date.now() + FUZZ_SECONDS * 1000;
  while (Date.now() < deadline && failures.length < 5) {
    const which = random.int(seeds.length);
    const { bytes, what } = mutate(seeds[which], contexts[which], random);
    const outcome = await runner.run(bytes);
    count(tally, outcome);
    const problem = problemOf(outcome);
    if (problem !== null) {
      const label = `fuzz ${seeds[which].name}`;
      failures.push(`${label} [${what.join("; ")}] (saved as ${saveToCorpus(bytes, label)}): ${problem}`);
    }
  }
  t.diagnostic(`fuzz cases tried: ${tally.cases}; ${summary(tally)}`);
  assert.deepEqual(failures, []);
});

test("backing chains that loop or carry 1023+ byte names are refused with coded errors", async (t) => {
  const dir = scratchDir(t, "snapstack-hostile-");
  const make = async (name: string, backing?: string): Promise<string> => {
    const path = join(dir, name);
    const file = await createNodeFile(path);
    await createQcow2(file, { sizeBytes: 1024 * 1024, clusterSizeBytes: 4096, ...(backing !== undefined ? { backingFile: backing, backingFormat: "qcow2" } : {}) });
    await file.close();
    return path;
  };
  // a -> b -> a, and a self loop.
  await make("a.qcow2", "b.qcow2");
  await make("b.qcow2", "a.qcow2");
  await make("self.qcow2", "self.qcow2");
  for (const name of ["a.qcow2", "self.qcow2"]) {
    await assert.rejects(openImage(join(dir, name), { readOnly: true }), (e: unknown) => isSnapstackError(e) && e.code === "E_BACKING_LOOP", name);
  }
  // A 1023-byte name (the limit) that does not exist, and a header claiming a longer one.
  const longName = `${"x".repeat(1013)}.qcow2`;
  const longPath = await make("long.qcow2", longName);
  await assert.rejects(openImage(longPath, { readOnly: true }), (e: unknown) => isSnapstackError(e) && e.code !== "E_INTERNAL");
  const { readFileSync } = await import("node:fs");
  const bytes = new Uint8Array(readFileSync(longPath));
  new DataView(bytes.buffer).setUint32(16, 1100);
  writeFileSync(longPath, bytes);
  await assert.rejects(openImage(longPath, { readOnly: true }), (e: unknown) => isSnapstackError(e) && e.code !== "E_INTERNAL");
});
