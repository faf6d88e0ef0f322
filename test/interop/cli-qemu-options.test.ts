/**
 * Options of convert, commit, rebase and compare that qemu-img 7.2 accepts or
 * refuses: each command line runs under qemu-img and snapstack on copies of
 * the same files; both must succeed or both fail, a refusal leaves every file
 * as it was, and where both convert, the targets are byte for byte equal.
 * Plus -r (convert and commit): the copy is held to the rate.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, scratchDir } from "../helpers/tools.ts";
import { assertUnchanged, ok, qemuImg, qemuIo, snapshotFiles, snapstack } from "./cli-helpers.ts";

const MiB = 1024 * 1024;

/** b.qcow2 (1 MiB of 0x01, snapshot s1 of its first half, persistent bitmap b0) <- t.qcow2 (4 KiB of 0x02); z.qcow2: an empty 1 MiB image; in `dir`. */
async function fixtures(dir: string): Promise<void> {
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "b.qcow2", "1M"], dir), "create b");
  ok(await qemuIo(["-f", "qcow2", "-c", "write -P 1 0 512k", "b.qcow2"], dir), "fill b");
  ok(await qemuImg(["snapshot", "-c", "s1", "b.qcow2"], dir), "snapshot b");
  ok(await qemuIo(["-f", "qcow2", "-c", "write -P 1 512k 512k", "b.qcow2"], dir), "fill b");
  ok(await qemuImg(["bitmap", "--add", "b.qcow2", "b0"], dir), "bitmap on b");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2"], dir), "create t");
  ok(await qemuIo(["-f", "qcow2", "-c", "write -P 2 0 4k", "t.qcow2"], dir), "write t");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "z.qcow2", "1M"], dir), "create z");
}

test("convert, commit, rebase and compare accept and refuse the options qemu-img 7.2 does; convert results are byte for byte qemu-img's", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const root = scratchDir(t);
  const cases: Array<{ args: string[]; accepted: boolean; output?: string; sameStdout?: boolean }> = [
    // -o backing_file / backing_fmt mean -B / -F: only the top layer is copied.
    { args: ["convert", "-O", "qcow2", "-o", "backing_file=b.qcow2,backing_fmt=qcow2", "t.qcow2", "o.qcow2"], accepted: true, output: "o.qcow2" },
    { args: ["convert", "-O", "qcow2", "-B", "b.qcow2", "-o", "backing_fmt=qcow2", "t.qcow2", "o.qcow2"], accepted: true, output: "o.qcow2" },
    { args: ["convert", "-O", "qcow2", "-B", "b.qcow2", "-F", "qcow2", "-o", "backing_file=x.qcow2,backing_fmt=qcow2", "t.qcow2", "o.qcow2"], accepted: true, output: "o.qcow2" },
    { args: ["convert", "-O", "qcow2", "-o", "backing_file=b.qcow2", "t.qcow2", "o.qcow2"], accepted: false },
    { args: ["convert", "-O", "qcow2", "-o", "backing_fmt=qcow2", "t.qcow2", "o.qcow2"], accepted: false },
    // -m as qemu-img checks it; -r, -C, -W, --target-is-zero.
    ...["0", "17", "abc", "5x"].map((count) => ({ args: ["convert", "-m", count, "-O", "qcow2", "t.qcow2", "o.qcow2"], accepted: false })),
    { args: ["convert", "-m", " 3", "-O", "qcow2", "t.qcow2", "o.qcow2"], accepted: true, output: "o.qcow2" },
    // -W lets qemu-img allocate out of order: the layout may differ, so only the acceptance is compared.
    { args: ["convert", "-m", "8", "-W", "-O", "qcow2", "t.qcow2", "o.qcow2"], accepted: true },
    { args: ["convert", "-r", "10M", "-O", "qcow2", "t.qcow2", "o.qcow2"], accepted: true, output: "o.qcow2" },
    { args: ["convert", "-r", "abc", "-O", "qcow2", "t.qcow2", "o.qcow2"], accepted: false },
    { args: ["convert", "-C", "-O", "qcow2", "t.qcow2", "o.qcow2"], accepted: true, output: "o.qcow2" },
    { args: ["convert", "-C", "-c", "-O", "qcow2", "t.qcow2", "o.qcow2"], accepted: false },
    { args: ["convert", "-C", "-S", "4k", "-O", "qcow2", "t.qcow2", "o.qcow2"], accepted: false },
    { args: ["convert", "--target-is-zero", "-O", "qcow2", "t.qcow2", "o.qcow2"], accepted: false },
    { args: ["convert", "-n", "--target-is-zero", "-O", "qcow2", "t.qcow2", "z.qcow2"], accepted: true, output: "z.qcow2" },
    // commit -r: a size; 0 is no limit.
    { args: ["commit", "-r", "abc", "t.qcow2"], accepted: false },
    { args: ["commit", "-r", "-5", "t.qcow2"], accepted: false },
    { args: ["commit", "-r", "0", "-d", "t.qcow2"], accepted: true },
    { args: ["rebase", "-U", "-u", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2"], accepted: true },
    // -c -S 0: every cluster compressed, the zero ones too (the same bytes as qemu-img's).
    { args: ["convert", "-c", "-S", "0", "-O", "qcow2", "z.qcow2", "o.qcow2"], accepted: true, output: "o.qcow2" },
    // convert -l: an internal snapshot, the same bytes as qemu-img's.
    ...["s1", "snapshot.name=s1", "snapshot.id=1"].map((ref) => ({ args: ["convert", "-O", "qcow2", "-l", ref, "b.qcow2", "o.qcow2"], accepted: true, output: "o.qcow2" })),
    { args: ["convert", "-O", "qcow2", "-l", "nope", "b.qcow2", "o.qcow2"], accepted: false },
    // -n with -o: nothing to create the options for (qemu-img refuses, the target untouched).
    { args: ["convert", "-n", "-O", "qcow2", "-o", "cluster_size=4k", "t.qcow2", "z.qcow2"], accepted: false },
    { args: ["check", "-T", "none", "t.qcow2"], accepted: true, sameStdout: true },
    { args: ["check", "-T", "bogus", "t.qcow2"], accepted: false },
    { args: ["compare", "-T", "none", "t.qcow2", "t.qcow2"], accepted: true },
    { args: ["compare", "-T", "bogus", "t.qcow2", "t.qcow2"], accepted: false },
    // -U only where the image is opened read-only.
    { args: ["snapshot", "-U", "-c", "s1", "t.qcow2"], accepted: false },
    { args: ["check", "-U", "-r", "leaks", "t.qcow2"], accepted: false },
    { args: ["resize", "-U", "t.qcow2", "+1M"], accepted: false },
    { args: ["snapshot", "-U", "-l", "t.qcow2"], accepted: true, sameStdout: true },
    // Printed exactly as qemu-img prints it: the create banner with compat and a backing file, measure for a v2 target.
    { args: ["create", "-f", "qcow2", "-o", "compat=0.10", "-b", "b.qcow2", "-F", "qcow2", "n.qcow2", "10M"], accepted: true, sameStdout: true },
    { args: ["measure", "-O", "qcow2", "-o", "compat=0.10", "t.qcow2"], accepted: true, sameStdout: true },
    { args: ["measure", "-O", "qcow2", "t.qcow2"], accepted: true, sameStdout: true },
    // measure -l (an internal snapshot: the image's bitmaps are counted) and --size with a backing file but no backing format.
    ...["s1", "snapshot.name=s1", "snapshot.id=1"].map((ref) => ({ args: ["measure", "-O", "qcow2", "-l", ref, "b.qcow2"], accepted: true, sameStdout: true })),
    { args: ["measure", "-O", "qcow2", "-l", "nope", "b.qcow2"], accepted: false },
    { args: ["measure", "--size", "1G", "-O", "qcow2", "-o", "backing_file=b.qcow2"], accepted: true, sameStdout: true },
    // Each -o list as is_valid_option_list checks it: not empty, no leading comma, no unescaped trailing one.
    { args: ["create", "-f", "qcow2", "-o", "", "o.qcow2", "1M"], accepted: false },
    { args: ["create", "-f", "qcow2", "-o", "cluster_size=4k,", "o.qcow2", "1M"], accepted: false },
    { args: ["create", "-f", "qcow2", "-o", "cluster_size=4k", "-o", "", "o.qcow2", "1M"], accepted: false },
    { args: ["convert", "-O", "qcow2", "-o", ",cluster_size=4k", "t.qcow2", "o.qcow2"], accepted: false },
    { args: ["measure", "--size", "1G", "-O", "qcow2", "-o", ""], accepted: false },
    // Number options parse as C's strtoull with base 0: 010 is 8, 0x10 is 16, 016 (14) is refused.
    { args: ["create", "-f", "qcow2", "-o", "refcount_bits=010", "o.qcow2", "1M"], accepted: true, output: "o.qcow2", sameStdout: true },
    { args: ["create", "-f", "qcow2", "-o", "refcount_bits=0x10", "o.qcow2", "1M"], accepted: true, output: "o.qcow2", sameStdout: true },
    { args: ["create", "-f", "qcow2", "-o", "refcount_bits=016", "o.qcow2", "1M"], accepted: false },
    // measure: -f and -l need a filename; one filename at most.
    { args: ["measure", "--size", "1G", "-f", "qcow2"], accepted: false },
    { args: ["measure", "--size", "1G", "-l", "s1"], accepted: false },
    { args: ["measure", "-O", "qcow2", "t.qcow2", "b.qcow2"], accepted: false },
  ];
  for (const [index, { args, accepted, output, sameStdout }] of cases.entries()) {
    const results = [];
    const outputs: string[] = [];
    for (const tool of ["qemu-img", "snapstack"] as const) {
      const dir = join(root, `${index}-${tool}`);
      mkdirSync(dir);
      await fixtures(dir);
      const before = accepted ? null : snapshotFiles(readdirSync(dir).map((name) => join(dir, name)));
      const result = tool === "qemu-img" ? await qemuImg(args, dir) : await snapstack(["img", ...args], { cwd: dir });
      results.push(result);
      if (before !== null) {
        assertUnchanged(before);
        // qemu-img may leave a half-made target behind; snapstack refuses before creating it.
        if (tool === "snapstack" && output === undefined && (args[0] === "convert" || args[0] === "create")) assert.ok(!existsSync(join(dir, "o.qcow2")), `img ${args.join(" ")} created its target`);
      }
      if (output !== undefined) outputs.push(join(dir, output));
    }
    const [theirs, ours] = results;
    const what = `img ${args.join(" ")}: qemu-img exit ${theirs.code} (${theirs.stderr.trim()}), snapstack exit ${ours.code} (${ours.stderr.trim()})`;
    assert.equal(theirs.code === 0, accepted, `qemu-img: ${what}`);
    assert.equal(ours.code === 0, accepted, what);
    if (!accepted) assert.match(ours.stderr, /^snapstack: error E_[A-Z_]+: /, what);
    if (outputs.length === 2) assert.ok(readFileSync(outputs[0]).equals(readFileSync(outputs[1])), `targets differ: ${what}`);
    if (sameStdout === true) assert.equal(ours.stdout, theirs.stdout, `stdout of ${what}`);
  }
});

test("convert -r and commit -r hold the copy to the rate (a lower bound only: a slow machine cannot fail it); the results are right", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  // 8 MiB of data at 4 MiB/s: the chunks after the first wait; at least 1.5 s in all.
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "base.qcow2", "8M"], dir), "create base");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"], dir), "create top");
  ok(await qemuIo(["-f", "qcow2", "-c", "write -P 7 0 8M", "top.qcow2"], dir), "fill top");
  for (const args of [
    ["convert", "-r", "4M", "-O", "qcow2", "top.qcow2", "copy.qcow2"],
    ["commit", "-r", "4M", "top.qcow2"],
  ]) {
    const started = process.hrtime.bigint();
    ok(await snapstack(["img", ...args], { cwd: dir }), `img ${args.join(" ")}`);
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    assert.ok(seconds >= 1.5, `img ${args.join(" ")} took ${seconds.toFixed(2)} s: not held to 4 MiB/s`);
  }
  ok(await qemuIo(["-f", "qcow2", "-c", `read -P 7 0 ${8 * MiB}`, "copy.qcow2"], dir), "convert -r copied the data");
  ok(await qemuIo(["-f", "qcow2", "-c", `read -P 7 0 ${8 * MiB}`, "base.qcow2"], dir), "commit -r committed the data");
  ok(await qemuImg(["check", "base.qcow2"], dir), "check base");
});
