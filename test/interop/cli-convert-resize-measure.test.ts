// snapstack img convert / resize / measure, checked with qemu-img.
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, run, scratchDir } from "../helpers/tools.ts";
import { assertCodedError, buildFixtures, ok, qemuImg, qemuIo, snapstack } from "./cli-helpers.ts";

test("convert: the result passes qemu-img compare and check", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await buildFixtures(dir);
  const cases: Array<{ args: string[]; target: string; source: string }> = [
    { args: ["-O", "qcow2"], source: "top.qcow2", target: "c1.qcow2" },
    { args: ["-O", "raw"], source: "top.qcow2", target: "c2.raw" },
    { args: ["-O", "qcow2", "-c"], source: "base.qcow2", target: "c3.qcow2" },
    { args: ["-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k,compat=0.10"], source: "plain.raw", target: "c4.qcow2" },
    { args: ["-O", "qcow2", "-S", "0"], source: "v2.qcow2", target: "c5.qcow2" },
    { args: ["-q", "-O", "qcow2"], source: "snap.qcow2", target: "c6.qcow2" },
  ];
  for (const { args, source, target } of cases) {
    const ours = ok(await snapstack(["img", "convert", ...args, source, target], { cwd: dir }), `convert ${args.join(" ")}`);
    assert.equal(ours.stdout, "");
    ok(await qemuImg(["compare", source, target], dir), `qemu-img compare ${source} ${target} after convert ${args.join(" ")}`);
    if (target.endsWith(".qcow2")) ok(await qemuImg(["check", target], dir), `qemu-img check ${target}`);
  }
  // -B: the target gets the backing file; only the top layer's data is copied.
  ok(await snapstack(["img", "convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "cb.qcow2"], { cwd: dir }), "convert -B");
  ok(await qemuImg(["compare", "top.qcow2", "cb.qcow2"], dir), "compare after -B");
  const info = JSON.parse(ok(await qemuImg(["info", "--output=json", "cb.qcow2"], dir), "info").stdout) as Record<string, unknown>;
  assert.equal(info["backing-filename"], "base.qcow2");
  assert.equal(info["backing-filename-format"], "qcow2");
});

test("convert side by side with qemu-img: -n into a backed target, -l by ID, name and size, --bitmaps -l, -c with preallocation, --target-is-zero", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const sh = async (script: string): Promise<void> => {
    ok(await run("bash", ["-euc", `cd '${dir}'\n${script}`]), script);
  };
  /** Run one convert with each tool (qemu-img writes q.*, snapstack s.*); both must end alike. */
  const both = async (what: string, args: (target: string) => string[], prepare?: (target: string) => Promise<void>): Promise<{ code: number }> => {
    await sh("rm -f q.img s.img");
    if (prepare !== undefined) await Promise.all([prepare("q.img"), prepare("s.img")]);
    const theirs = await qemuImg(["convert", ...args("q.img")], dir);
    const ours = await snapstack(["img", "convert", ...args("s.img")], { cwd: dir });
    assert.equal(ours.code, theirs.code, `${what}: exit status (qemu-img: ${theirs.stderr.trim()}; snapstack: ${ours.stderr.trim()})`);
    assert.ok(!/\n\s+at /.test(ours.stderr), `${what}: no stack trace`);
    return { code: ours.code };
  };
  const sameContent = async (what: string): Promise<void> => {
    ok(await qemuImg(["compare", "q.img", "s.img"], dir), `${what}: snapstack's target equals qemu-img's`);
  };

  // -n into a target whose own backing file is shorter than it: zero past the backing's end is written.
  await sh(`qemu-img create -q -f qcow2 src.qcow2 2M; qemu-io -c 'write -P 1 0 4k' src.qcow2 >/dev/null; qemu-img create -q -f qcow2 short.qcow2 1M`);
  const backedTarget = async (target: string): Promise<void> => sh(`qemu-img create -q -f qcow2 -b short.qcow2 -F qcow2 ${target} 2M; qemu-io -c 'write -P 170 1536k 64k' ${target} >/dev/null`);
  await both("-n into a backed target", (target) => ["-n", "-O", "qcow2", "src.qcow2", target], backedTarget);
  ok(await qemuImg(["compare", "src.qcow2", "s.img"], dir), "-n: the target reads as the source past its backing's end");
  // The same with -B: a zero cluster of the source's top layer past the backing's end is written too.
  await sh(`rm -f src.qcow2; qemu-img create -q -f qcow2 -b short.qcow2 -F qcow2 src.qcow2 2M; qemu-io -c 'write -z 1536k 64k' src.qcow2 >/dev/null`);
  await both("-n -B", (target) => ["-n", "-B", "short.qcow2", "-F", "qcow2", "-O", "qcow2", "src.qcow2", target], backedTarget);
  ok(await qemuImg(["compare", "src.qcow2", "s.img"], dir), "-n -B: the zero cluster past the backing's end was written");
  // --target-is-zero with -n into a backed target, without -B: allowed (the backing is all zero here).
  await sh(`rm -f src.qcow2; qemu-img create -q -f qcow2 src.qcow2 2M; qemu-io -c 'write -P 3 64k 64k' src.qcow2 >/dev/null`);
  const plainBacked = async (target: string): Promise<void> => sh(`qemu-img create -q -f qcow2 -b short.qcow2 -F qcow2 ${target} 2M`);
  assert.equal((await both("--target-is-zero into a backed target", (target) => ["-n", "--target-is-zero", "-O", "qcow2", "src.qcow2", target], plainBacked)).code, 0);
  await sameContent("--target-is-zero into a backed target");

  // -l: ID 1 is named "2", ID 2 is named "x"; the current image then grows to 3 MiB.
  await sh(`rm -f src.qcow2; qemu-img create -q -f qcow2 src.qcow2 1M
    qemu-io -c 'write -P 1 0 1M' src.qcow2 >/dev/null; qemu-img snapshot -c 2 src.qcow2
    qemu-io -c 'write -P 2 0 64k' src.qcow2 >/dev/null; qemu-img snapshot -c x src.qcow2
    qemu-img bitmap --add src.qcow2 bm; qemu-img resize -q src.qcow2 3M; qemu-io -c 'write -P 9 2M 64k' src.qcow2 >/dev/null`);
  for (const selector of ["2", "x", "snapshot.name=2", "snapshot.id=2", "snapshot.id=1,snapshot.name=2", "snapshot.name=1", "snapshot.id=x", "snapshot.id=1,snapshot.name=x", "9"]) {
    const { code } = await both(`-l ${selector}`, (target) => ["-O", "qcow2", "-l", selector, "src.qcow2", target]);
    if (code !== 0) continue;
    await sameContent(`-l ${selector}`);
    const size = (JSON.parse(ok(await qemuImg(["info", "--output=json", "s.img"], dir), "info").stdout) as { "virtual-size": number })["virtual-size"];
    assert.equal(size, 3 * 1024 * 1024, `-l ${selector}: the target has the image's current size, as qemu-img's`);
  }
  // --bitmaps with -l copies the image's bitmaps (a snapshot holds none of its own).
  await both("--bitmaps -l", (target) => ["-O", "qcow2", "--bitmaps", "-l", "x", "src.qcow2", target]);
  const bitmaps = (image: string): Promise<unknown> =>
    qemuImg(["info", "--output=json", image], dir).then((r) => (JSON.parse(r.stdout) as { "format-specific": { data: { bitmaps?: unknown } } })["format-specific"].data.bitmaps);
  assert.deepEqual(await bitmaps("s.img"), await bitmaps("q.img"));
  assert.notEqual(await bitmaps("s.img"), undefined);
  // -c with a preallocation mode is refused before anything is created.
  for (const mode of ["metadata", "falloc"]) {
    await both(`-c -o preallocation=${mode}`, (target) => ["-O", "qcow2", "-c", "-o", `preallocation=${mode}`, "src.qcow2", target]);
    assert.equal(existsSync(join(dir, "s.img")), false, "no target left behind");
  }
});

test("convert -p prints qemu-img's progress lines", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await buildFixtures(dir);
  const ours = ok(await snapstack(["img", "convert", "-p", "-O", "qcow2", "base.qcow2", "p.qcow2"], { cwd: dir }), "convert -p");
  const updates = ours.stdout.split("\r");
  assert.equal(updates[0], "    (0.00/100%)");
  assert.ok(updates.slice(0, -1).every((update) => /^ {4}\(\d{1,3}\.\d\d\/100%\)$/.test(update)), JSON.stringify(ours.stdout));
  assert.ok(ours.stdout.endsWith("    (100.00/100%)\r\n"), JSON.stringify(ours.stdout));
});

test("resize: qemu-img info sees the new size; shrinking needs --shrink", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await buildFixtures(dir);
  const size = async (image: string): Promise<number> =>
    (JSON.parse(ok(await qemuImg(["info", "--output=json", image], dir), "info").stdout) as { "virtual-size": number })["virtual-size"];
  const steps: Array<[string[], number]> = [
    [["base.qcow2", "+1G"], 64 * 2 ** 20 + 2 ** 30],
    [["base.qcow2", "2G"], 2 * 2 ** 30],
    [["--shrink", "base.qcow2", "-1G"], 2 ** 30],
    [["-f", "raw", "plain.raw", "4M"], 4 * 2 ** 20],
    [["v2.qcow2", "+1M"], 9 * 2 ** 20],
  ];
  for (const [args, expected] of steps) {
    const ours = ok(await snapstack(["img", "resize", ...args], { cwd: dir }), `resize ${args.join(" ")}`);
    assert.equal(ours.stdout, "Image resized.\n");
    const image = args.find((arg) => arg.includes("."));
    assert.equal(await size(image ?? ""), expected, args.join(" "));
    if (image?.endsWith(".qcow2")) ok(await qemuImg(["check", image], dir), `check ${image}`);
  }
  const quiet = ok(await snapstack(["img", "resize", "-q", "base.qcow2", "+1M"], { cwd: dir }), "quiet");
  assert.equal(quiet.stdout, "");
  const refused = await snapstack(["img", "resize", "base.qcow2", "1M"], { cwd: dir });
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /^snapstack: error E_\w+: .*--shrink/);
});

test("resize --shrink of qcow2 images: refcount blocks left counting nothing are dropped and the file truncated, the same bytes as qemu-img's", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const cases: Array<[string, string, string, boolean]> = [
    // [create options, size written, shrunk to, with an internal snapshot]
    ["cluster_size=4k", "24M", "4M", false],
    ["cluster_size=4k,refcount_bits=64", "12M", "1M", false],
    ["cluster_size=4k,refcount_bits=1", "40M", "3M", false],
    ["cluster_size=4k", "24M", "4M", true],
    ["cluster_size=64k", "64M", "16M", false],
  ];
  for (const [options, written, shrunk, snapshot] of cases) {
    const what = `${options}, ${written} written${snapshot ? ", a snapshot" : ""}, shrunk to ${shrunk}`;
    ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", options, "theirs.qcow2", written], dir), "create");
    ok(await qemuIo(["-c", `write -q -P 0x5c 0 ${written}`, "theirs.qcow2"], dir), "write");
    if (snapshot) ok(await qemuImg(["snapshot", "-c", "s", "theirs.qcow2"], dir), "snapshot");
    copyFileSync(join(dir, "theirs.qcow2"), join(dir, "ours.qcow2"));
    ok(await qemuImg(["resize", "-q", "--shrink", "theirs.qcow2", shrunk], dir), `qemu-img ${what}`);
    ok(await snapstack(["img", "resize", "-q", "--shrink", "ours.qcow2", shrunk], { cwd: dir }), what);
    ok(await qemuImg(["check", "ours.qcow2"], dir), `check ${what}`);
    ok(await qemuIo(["-c", `read -q -P 0x5c 0 ${shrunk}`, "ours.qcow2"], dir), `data ${what}`);
    assert.ok(readFileSync(join(dir, "ours.qcow2")).equals(readFileSync(join(dir, "theirs.qcow2"))), `${what}: files differ`);
  }
});

test("resize --preallocation=metadata|falloc|full of qcow2 images: the same bytes as qemu-img's; what is not done is refused, the image left alone", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const cases: Array<[string, string, string, boolean]> = [
    // [create options, old size, new size, done]
    ["cluster_size=64k", "64M", "200M", true],
    ["cluster_size=4k", "1000k", "5M", true],
    ["extended_l2=on", "64M", "128M", true],
    ["cluster_size=64k", "1000k", "5M", false], // falloc/full from a partial last cluster
  ];
  for (const [options, oldSize, newSize, done] of cases) {
    for (const mode of ["metadata", "falloc", "full"]) {
      const what = `${options} ${oldSize} -> ${newSize} ${mode}`;
      ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", options, "theirs.qcow2", oldSize], dir), "create");
      ok(await qemuIo(["-c", "write -P 7 0 512k", "theirs.qcow2"], dir), "write");
      copyFileSync(join(dir, "theirs.qcow2"), join(dir, "ours.qcow2"));
      const before = readFileSync(join(dir, "ours.qcow2"));
      ok(await qemuImg(["resize", "-q", `--preallocation=${mode}`, "theirs.qcow2", newSize], dir), `qemu-img ${what}`);
      const ours = await snapstack(["img", "resize", "-q", `--preallocation=${mode}`, "ours.qcow2", newSize], { cwd: dir });
      if (done || mode === "metadata") {
        ok(ours, what);
        assert.ok(readFileSync(join(dir, "ours.qcow2")).equals(readFileSync(join(dir, "theirs.qcow2"))), `${what}: files differ`);
      } else {
        assert.equal(ours.code, 1, what);
        assert.match(ours.stderr, /^snapstack: error E_UNSUPPORTED_FEATURE: /);
        assert.ok(readFileSync(join(dir, "ours.qcow2")).equals(before), `${what}: the refused resize changed the image`);
      }
    }
  }
  // A preallocation mode needs the image to grow: a shrink or the same size is refused, as qemu-img refuses it.
  for (const [format, args] of [
    ["qcow2", ["--shrink", "--preallocation=metadata", "5M"]],
    ["qcow2", ["--preallocation=metadata", "5M"]],
    ["qcow2", ["--preallocation=full", "10M"]],
    ["raw", ["--shrink", "--preallocation=falloc", "5M"]],
  ] as const) {
    ok(await qemuImg(["create", "-q", "-f", format, "theirs.img", "10M"], dir), "create");
    copyFileSync(join(dir, "theirs.img"), join(dir, "ours.img"));
    const before = readFileSync(join(dir, "ours.img"));
    const theirs = await qemuImg(["resize", "-f", format, "theirs.img", ...args], dir);
    assert.equal(theirs.code, 1, `qemu-img resize ${args.join(" ")}`);
    assert.match(theirs.stderr, /Preallocation can only be used for growing images/);
    const ours = await snapstack(["img", "resize", "-f", format, "ours.img", ...args], { cwd: dir });
    assertCodedError(ours, "E_INVALID_OPTION");
    assert.match(ours.stderr, /Preallocation can only be used for growing images/);
    assert.ok(readFileSync(join(dir, "ours.img")).equals(before), `${format} ${args.join(" ")}: the refused resize changed the image`);
  }
});

test("resize --preallocation=metadata over a longer backing file and into freed clusters: the new area reads as zeroes, and the bytes are qemu-img's", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "base.qcow2", "4M"], dir), "base");
  ok(await qemuIo(["-c", "write -P 3 0 4M", "base.qcow2"], dir), "base data");
  for (const extendedL2 of ["on", "off"]) {
    // Over a longer backing file: the grown area was zeroed; preallocating must keep it zero.
    ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", `extended_l2=${extendedL2}`, "-b", "base.qcow2", "-F", "qcow2", "theirs.qcow2", "1000k"], dir), "overlay");
    copyFileSync(join(dir, "theirs.qcow2"), join(dir, "ours.qcow2"));
    ok(await qemuImg(["resize", "-q", "--preallocation=metadata", "theirs.qcow2", "5M"], dir), "qemu-img resize");
    ok(await snapstack(["img", "resize", "-q", "--preallocation=metadata", "ours.qcow2", "5M"], { cwd: dir }), "resize");
    ok(await qemuIo(["-r", "-c", "read -P 0 1000k 4120k", "ours.qcow2"], dir), `extended_l2=${extendedL2}: the grown area reads as zeroes, not the backing file's data`);
    assert.ok(readFileSync(join(dir, "ours.qcow2")).equals(readFileSync(join(dir, "theirs.qcow2"))), `extended_l2=${extendedL2}: files differ`);
  }
  // Over a shorter backing file, from a size inside an unallocated cluster: the new cluster keeps the
  // backing file's data below the old size (QEMU's cow_start copies it; it read as zeroes, a review).
  writeFileSync(join(dir, "short.raw"), Buffer.alloc(1_000_000, 9));
  ok(await qemuImg(["convert", "-q", "-f", "raw", "-O", "qcow2", "short.raw", "short.qcow2"], dir), "qcow2 backing");
  for (const [backing, backingFormat, compat] of [["short.raw", "raw", "1.1"], ["short.qcow2", "qcow2", "1.1"], ["short.raw", "raw", "0.10"]]) {
    const what = `${backingFormat} backing, compat=${compat}`;
    ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", `compat=${compat}`, "-b", backing, "-F", backingFormat, "theirs.qcow2", "1000448"], dir), "overlay");
    copyFileSync(join(dir, "theirs.qcow2"), join(dir, "ours.qcow2"));
    ok(await qemuImg(["resize", "-q", "--preallocation=metadata", "theirs.qcow2", "+1M"], dir), "qemu-img resize");
    ok(await snapstack(["img", "resize", "-q", "--preallocation=metadata", "ours.qcow2", "+1M"], { cwd: dir }), "resize");
    ok(await qemuIo(["-r", "-c", "read -P 9 0 1000000", "-c", "read -P 0 1000000 1048896", "ours.qcow2"], dir), `${what}: the backing file's data stays, the rest reads as zeroes`);
    assert.ok(readFileSync(join(dir, "ours.qcow2")).equals(readFileSync(join(dir, "theirs.qcow2"))), `${what}: files differ`);
  }
  // Without preallocation over a longer backing file (a review): with extended L2 the zeroing reaches the
  // image's end, so all 32 zero bits of the new last cluster are set; a compat=0.10 image grows when the
  // new area stays inside its old last cluster (zeroed by a data write), and is refused past it.
  writeFileSync(join(dir, "long.raw"), Buffer.alloc(8_000_000, 7));
  for (const [options, oldSize, growth, grows] of [
    ["cluster_size=64k,extended_l2=on", "1000448", "+3000320", true],
    ["cluster_size=2M,compat=0.10", "100864", "+1261056", true],
    ["cluster_size=64k,compat=0.10", "100864", "+30208", true],
    ["cluster_size=64k,compat=0.10", "100864", "+1261056", false],
  ] as const) {
    const what = `${options}, ${oldSize} ${growth}`;
    ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", options, "-b", "long.raw", "-F", "raw", "theirs.qcow2", oldSize], dir), "overlay");
    copyFileSync(join(dir, "theirs.qcow2"), join(dir, "ours.qcow2"));
    const theirs = await qemuImg(["resize", "-q", "theirs.qcow2", growth], dir);
    const ours = await snapstack(["img", "resize", "-q", "ours.qcow2", growth], { cwd: dir });
    assert.equal(theirs.code === 0, grows, `${what}: qemu-img ${theirs.stderr}`);
    if (grows) ok(ours, `${what}: resize`);
    else assertCodedError(ours, "E_UNSUPPORTED_FEATURE");
    assert.ok(readFileSync(join(dir, "ours.qcow2")).equals(readFileSync(join(dir, "theirs.qcow2"))), `${what}: files differ`);
  }
  // Freed clusters keep their old bytes here (no hole punching): preallocating into them must not expose them.
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "reuse.qcow2", "1M"], dir), "create");
  ok(await qemuIo(["-c", "write -P 7 0 1M", "reuse.qcow2"], dir), "write");
  ok(await snapstack(["img", "snapshot", "-c", "s", "reuse.qcow2"], { cwd: dir }), "-c");
  ok(await qemuIo(["-c", "write -P 8 0 1M", "reuse.qcow2"], dir), "overwrite");
  ok(await snapstack(["img", "snapshot", "-d", "s", "reuse.qcow2"], { cwd: dir }), "-d");
  ok(await snapstack(["img", "resize", "-q", "--preallocation=metadata", "reuse.qcow2", "2M"], { cwd: dir }), "resize");
  ok(await qemuIo(["-c", "read -P 8 0 1M", "-c", "read -P 0 1M 1M", "reuse.qcow2"], dir), "the grown area reads as zeroes, not a freed cluster's bytes");
  ok(await qemuImg(["check", "reuse.qcow2"], dir), "check");
});

test("amend: compat, lazy_refcounts, refcount_bits and size as qemu-img does them (its bytes where its layout is deterministic); what qemu-img refuses is refused, the image left alone", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  // [create options, amend options, outcome]: "same" bytes as qemu-img's; "equivalent": both succeed and the
  // images agree in content, snapshots and format options (a new refcount structure is laid out differently);
  // "refused" by snapstack (qemu-img refuses too, sometimes only after changing the image).
  type Outcome = "same" | "equivalent" | "refused";
  const cases: Array<[string, string, Outcome]> = [
    ["compat=0.10", "compat=1.1", "same"],
    ["compat=0.10", "compat=v3,lazy_refcounts=on", "same"],
    ["compat=0.10", "lazy_refcounts=on", "refused"],
    ["compat=1.1", "lazy_refcounts=on", "same"],
    ["lazy_refcounts=on", "lazy_refcounts=off", "same"],
    ["compat=1.1", "size=128M", "same"],
    ["compat=1.1", "compat=1.1,size=100M,refcount_bits=16", "same"],
    ["compat=1.1", "refcount_bits=8", "equivalent"],
    ["compat=1.1", "refcount_bits=64,lazy_refcounts=on", "equivalent"],
    ["compat=1.1", "refcount_bits=2,size=100M", "equivalent"],
    ["compat=1.1", "refcount_bits=1", "refused"], // the snapshot gives clusters refcount 2
    ["compat=1.1", "compat=0.10", "same"],
    ["compat=1.1,compression_type=zstd", "compat=0.10", "same"], // no compressed cluster: allowed
    ["compat=1.1,refcount_bits=8", "compat=0.10", "refused"],
    ["compat=1.1,refcount_bits=8", "compat=0.10,refcount_bits=16", "equivalent"],
    ["compat=1.1,extended_l2=on", "compat=0.10", "refused"],
    ["compat=1.1", "compat=0.10,lazy_refcounts=on", "refused"],
    ["lazy_refcounts=on", "compat=0.10,lazy_refcounts=on", "same"], // already on: not a change, so not refused
    ["compat=1.1", "lazy_refcounts=on,refcount_bits=1", "refused"], // nothing applied before the width is refused
    ["compat=1.1", "compat=0.10,size=128M", "refused"], // the snapshot's disk size would differ
    ["compat=0.10", "refcount_bits=8", "refused"],
    ["compat=1.1", "compat=2", "refused"],
    ["compat=1.1", "refcount_bits=3", "refused"],
    ["compat=1.1", "cluster_size=4k", "refused"],
    ["compat=1.1", "backing_file=other.qcow2", "refused"],
    ["compat=1.1", "data_file=x.raw", "refused"],
    ["compat=1.1", "foo=bar", "refused"],
    ["compat=1.1", "encryption=on", "refused"],
    ["compat=1.1", "data_file_raw=on", "refused"],
    ["compat=1.1", "data_file_raw=off", "same"],
    ["compat=0.10", "size=64M", "refused"], // a v2 image with snapshots: refused even at its current size
    ["compat=0.10", "compat=1.1,size=128M", "same"],
  ];
  const formatOptions = async (file: string): Promise<unknown> => {
    const info = JSON.parse(ok(await qemuImg(["info", "--output=json", file], dir), `info ${file}`).stdout) as Record<string, unknown>;
    return { size: info["virtual-size"], format: info["format-specific"], snapshots: info.snapshots };
  };
  for (const [createOptions, amendOptions, outcome] of cases) {
    const what = `${createOptions}: amend -o ${amendOptions}`;
    ok(await qemuImg(["create", "-q", "-f", "qcow2", "-o", createOptions, "theirs.qcow2", "64M"], dir), "create");
    ok(await qemuIo(["-c", "write -P 1 0 1M", "-c", "write -z 2M 64k", "theirs.qcow2"], dir), "write");
    ok(await qemuImg(["snapshot", "-c", "s1", "theirs.qcow2"], dir), "snapshot");
    ok(await qemuIo(["-c", "write -P 2 512k 64k", "-c", "write -z 4M 64k", "theirs.qcow2"], dir), "write after the snapshot");
    copyFileSync(join(dir, "theirs.qcow2"), join(dir, "ours.qcow2"));
    const before = readFileSync(join(dir, "ours.qcow2"));
    const theirs = await qemuImg(["amend", "-o", amendOptions, "theirs.qcow2"], dir);
    const ours = await snapstack(["img", "amend", "-o", amendOptions, "ours.qcow2"], { cwd: dir });
    if (outcome === "refused") {
      assert.notEqual(theirs.code, 0, `${what}: qemu-img accepted it: ${theirs.stdout}`);
      assert.equal(ours.code, 1, `${what}: ${ours.stderr}`);
      assert.match(ours.stderr, /^snapstack: error E_[A-Z_]+: /);
      assert.ok(readFileSync(join(dir, "ours.qcow2")).equals(before), `${what}: the refused amend changed the image`);
      continue;
    }
    ok(theirs, `qemu-img ${what}`);
    ok(ours, what);
    if (outcome === "same") {
      assert.ok(readFileSync(join(dir, "ours.qcow2")).equals(readFileSync(join(dir, "theirs.qcow2"))), `${what}: files differ`);
      continue;
    }
    ok(await qemuImg(["check", "ours.qcow2"], dir), `${what}: qemu-img check`);
    ok(await qemuImg(["compare", "theirs.qcow2", "ours.qcow2"], dir), `${what}: content`);
    assert.deepEqual(await formatOptions("ours.qcow2"), await formatOptions("theirs.qcow2"), `${what}: format options and snapshots`);
    ok(await qemuImg(["snapshot", "-a", "s1", "theirs.qcow2"], dir), "qemu-img snapshot -a");
    ok(await qemuImg(["snapshot", "-a", "s1", "ours.qcow2"], dir), `${what}: qemu-img snapshot -a on ours`);
    ok(await qemuImg(["compare", "theirs.qcow2", "ours.qcow2"], dir), `${what}: the snapshot's content`);
    ok(await qemuImg(["check", "ours.qcow2"], dir), `${what}: qemu-img check after snapshot -a`);
  }
  // The backing file and format the image has already: a no-op in both tools; anything else is refused.
  ok(await qemuImg(["create", "-q", "-f", "raw", "base.raw", "1M"], dir), "create base");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "theirs.qcow2"], dir), "create overlay");
  copyFileSync(join(dir, "theirs.qcow2"), join(dir, "ours.qcow2"));
  ok(await qemuImg(["amend", "-o", "backing_file=base.raw,backing_fmt=raw", "theirs.qcow2"], dir), "qemu-img amend, same backing");
  ok(await snapstack(["img", "amend", "-o", "backing_file=base.raw,backing_fmt=raw", "ours.qcow2"], { cwd: dir }), "amend, same backing");
  assert.ok(readFileSync(join(dir, "ours.qcow2")).equals(readFileSync(join(dir, "theirs.qcow2"))), "same backing: files differ");
  for (const options of ["backing_file=base.raw", "backing_file=other.raw,backing_fmt=raw", "backing_fmt=qcow2"]) {
    assert.equal((await qemuImg(["amend", "-o", options, "theirs.qcow2"], dir)).code, 1, `qemu-img amend -o ${options}`);
    assertCodedError(await snapstack(["img", "amend", "-o", options, "ours.qcow2"], { cwd: dir }), "E_UNSUPPORTED_FEATURE");
  }
  const raw = await snapstack(["img", "amend", "-f", "raw", "-o", "size=1M", "theirs.qcow2"], { cwd: dir });
  assert.match(raw.stderr, /E_UNSUPPORTED_FEATURE: Format driver 'raw' does not support option amendment/);
  assert.match((await snapstack(["img", "amend", "theirs.qcow2"], { cwd: dir })).stderr, /E_USAGE: Must specify options \(-o\)/);
  assert.equal(ok(await snapstack(["img", "amend", "-o", "help", "theirs.qcow2"], { cwd: dir }), "-o help").stdout, ok(await qemuImg(["amend", "-o", "help", "theirs.qcow2"], dir), "qemu-img -o help").stdout);
  // -p: 0% and 100% (qemu-img prints just these for a resize; other options add steps between).
  copyFileSync(join(dir, "theirs.qcow2"), join(dir, "ours.qcow2"));
  const theirsProgress = ok(await qemuImg(["amend", "-p", "-o", "size=2M", "theirs.qcow2"], dir), "qemu-img amend -p").stdout;
  assert.equal(ok(await snapstack(["img", "amend", "-p", "-o", "size=2M", "ours.qcow2"], { cwd: dir }), "amend -p").stdout, theirsProgress);
  assert.equal(theirsProgress, "    (0.00/100%)\r    (100.00/100%)\r\n");
  assert.equal(ok(await snapstack(["img", "amend", "-p", "-q", "-o", "size=3M", "ours.qcow2"], { cwd: dir }), "amend -p -q").stdout, "");
  // Failing before the image is open: only the newline; failing in the amend: 0% and 100% first.
  for (const args of [["-o", "size=2M", "missing.qcow2"], ["-o", "bogus=1", "ours.qcow2"], ["-o", "cluster_size=4k", "ours.qcow2"], ["-o", "backing_file=other.raw", "ours.qcow2"], ["-o", "encrypt.new-secret=x", "ours.qcow2"]]) {
    const theirsOut = await qemuImg(["amend", "-p", ...args], dir);
    const oursOut = await snapstack(["img", "amend", "-p", ...args], { cwd: dir });
    assert.equal(theirsOut.code, 1, `qemu-img amend -p ${args.join(" ")}`);
    assert.equal(oursOut.code, 1, `amend -p ${args.join(" ")}`);
    assert.equal(oursOut.stdout, theirsOut.stdout, `amend -p ${args.join(" ")}`);
  }
  // A file-protocol create option is no amend option (it used to be accepted and ignored).
  for (const options of ["nocow=on", "extent_size_hint=1M"]) {
    assert.equal((await qemuImg(["amend", "-o", options, "ours.qcow2"], dir)).code, 1, `qemu-img amend -o ${options}`);
    assert.match((await snapstack(["img", "amend", "-o", options, "ours.qcow2"], { cwd: dir })).stderr, /E_INVALID_OPTION: Invalid parameter/);
  }
  // -o help: with -f, that format's options without opening anything; without, the named image's format.
  assert.equal(ok(await snapstack(["img", "amend", "-f", "qcow2", "-o", "help"], { cwd: dir }), "-f qcow2 -o help").stdout, ok(await qemuImg(["amend", "-f", "qcow2", "-o", "help"], dir), "qemu-img -f qcow2 -o help").stdout);
  const refusedHelp: Array<[string[], string]> = [
    [["-o", "help"], "E_USAGE: Expecting one image file name"],
    [["-o", "help", "base.raw"], "E_UNSUPPORTED_FEATURE: Format driver 'raw' does not support option amendment"],
    [["-f", "raw", "-o", "help"], "E_UNSUPPORTED_FEATURE: Format driver 'raw' does not support option amendment"],
    [["-f", "foo", "-o", "help"], "E_UNKNOWN_FORMAT: Unknown file format 'foo'"],
    [["-o", "help", "missing.qcow2"], "E_NOT_FOUND: Could not open 'missing.qcow2'"],
  ];
  for (const [args, message] of refusedHelp) {
    assert.equal((await qemuImg(["amend", ...args], dir)).code, 1, `qemu-img amend ${args.join(" ")}`);
    const ours = await snapstack(["img", "amend", ...args], { cwd: dir });
    assert.equal(ours.code, 1, `amend ${args.join(" ")}`);
    assert.ok(ours.stderr.includes(message), `amend ${args.join(" ")}: ${ours.stderr}`);
  }
});

test("amend -o compat=0.10: zero clusters over a backing file become zeroed clusters as qemu-img makes them; a snapshot's data under a zero-alloc entry is kept (qemu-img 7.2 zeroes it)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  const sh = async (script: string): Promise<void> => {
    ok(await run("bash", ["-euc", `cd '${dir}'\n${script}`]), script);
  };
  // Over a backing file: zero-plain and zero-alloc entries in a table the snapshot and the active state
  // share (refcount 2: so are the new clusters), zero-plain ones in a table the active state copied after
  // the snapshot. (Not a zero-alloc entry in a copied table: qemu-img sets COPIED on its cluster, which the
  // snapshot's table maps too, and its check then reports an error; snapstack's result differs there.)
  await sh(`qemu-img create -q -f qcow2 base.qcow2 1G; qemu-io -c 'write -P 5 0 8M' -c 'write -P 6 600M 8M' base.qcow2 >/dev/null
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 theirs.qcow2
    qemu-io -c 'write -z 1M 128k' -c 'write -z 601M 128k' -c 'write -P 3 604M 64k' -c 'write -z 604M 64k' theirs.qcow2 >/dev/null
    qemu-img snapshot -c s theirs.qcow2; qemu-io -c 'write -z 7M 64k' theirs.qcow2 >/dev/null
    cp theirs.qcow2 ours.qcow2; cp theirs.qcow2 before.qcow2`);
  ok(await qemuImg(["amend", "-o", "compat=0.10", "theirs.qcow2"], dir), "qemu-img amend");
  ok(await snapstack(["img", "amend", "-o", "compat=0.10", "ours.qcow2"], { cwd: dir }), "amend");
  assert.ok(readFileSync(join(dir, "ours.qcow2")).equals(readFileSync(join(dir, "theirs.qcow2"))), "backed downgrade: files differ from qemu-img's");
  ok(await qemuImg(["check", "ours.qcow2"], dir), "check after the backed downgrade");
  ok(await qemuImg(["compare", "before.qcow2", "ours.qcow2"], dir), "content kept");

  // A write of zeroes without unmap after a snapshot: the active entry is zero-alloc on the cluster the
  // snapshot maps as data. qemu-img's downgrade writes zeroes into it, destroying the snapshot's data.
  await sh(`qemu-img create -q -f qcow2 shared.qcow2 8M; qemu-io -c 'write -P 3 4M 64k' shared.qcow2 >/dev/null
    qemu-img snapshot -c s shared.qcow2; qemu-io -c 'write -z 4M 64k' shared.qcow2 >/dev/null`);
  ok(await snapstack(["img", "amend", "-o", "compat=0.10", "shared.qcow2"], { cwd: dir }), "amend");
  ok(await qemuImg(["check", "shared.qcow2"], dir), "check after the downgrade");
  assert.match(ok(await qemuImg(["info", "shared.qcow2"], dir), "info").stdout, /compat: 0\.10/);
  ok(await qemuIo(["-c", "read -P 0 4M 64k", "shared.qcow2"], dir), "the active state reads zeroes");
  ok(await qemuImg(["snapshot", "-a", "s", "shared.qcow2"], dir), "snapshot -a");
  ok(await qemuIo(["-c", "read -P 3 4M 64k", "shared.qcow2"], dir), "the snapshot's data survived the downgrade");
  ok(await qemuImg(["check", "shared.qcow2"], dir), "check after snapshot -a");

  // Persistent dirty bitmaps: qemu-img downgrades and leaves them behind as leaks; refused here, untouched.
  await sh(`qemu-img create -q -f qcow2 bitmaps.qcow2 8M; qemu-img bitmap --add bitmaps.qcow2 b0`);
  const withBitmaps = readFileSync(join(dir, "bitmaps.qcow2"));
  const refused = await snapstack(["img", "amend", "-o", "compat=0.10", "bitmaps.qcow2"], { cwd: dir });
  assertCodedError(refused, "E_UNSUPPORTED_FEATURE");
  assert.match(refused.stderr, /persistent dirty bitmaps/);
  assert.ok(readFileSync(join(dir, "bitmaps.qcow2")).equals(withBitmaps), "the refused downgrade changed the image");

  // Zero-alloc over a snapshot's data, then that snapshot reverted to and deleted: the cluster the active
  // state maps as data is back to refcount 1 and gets COPIED (qemu-img's own result zeroes that data).
  await sh(`qemu-img create -q -f qcow2 reverted.qcow2 8M; qemu-io -c 'write -P 3 0 64k' reverted.qcow2 >/dev/null
    qemu-img snapshot -c s1 reverted.qcow2; qemu-io -c 'write -z 0 64k' reverted.qcow2 >/dev/null; qemu-img snapshot -c s2 reverted.qcow2
    qemu-img snapshot -a s1 reverted.qcow2; qemu-img snapshot -d s1 reverted.qcow2`);
  ok(await snapstack(["img", "amend", "-o", "compat=0.10", "reverted.qcow2"], { cwd: dir }), "amend after revert and delete");
  ok(await qemuImg(["check", "reverted.qcow2"], dir), "check: COPIED where the refcount is 1");
  ok(await qemuIo(["-c", "read -P 3 0 64k", "reverted.qcow2"], dir), "the active state keeps its data");
  ok(await qemuImg(["snapshot", "-a", "s2", "reverted.qcow2"], dir), "snapshot -a s2");
  ok(await qemuIo(["-c", "read -P 0 0 64k", "reverted.qcow2"], dir), "s2 reads zeroes");

  // zstd with a compressed cluster, in the active state or only in a snapshot: refused (qemu-img refuses
  // the first and downgrades the second, leaving a zstd cluster the zlib-only version 2 cannot read).
  await sh(`qemu-img create -q -f qcow2 -o compression_type=zstd zstd.qcow2 8M; qemu-io -c 'write -c -P 4 0 64k' zstd.qcow2 >/dev/null
    cp zstd.qcow2 zstd-snap.qcow2; qemu-img snapshot -c s zstd-snap.qcow2; qemu-io -c 'write -P 5 0 64k' zstd-snap.qcow2 >/dev/null`);
  for (const name of ["zstd.qcow2", "zstd-snap.qcow2"]) {
    const untouched = readFileSync(join(dir, name));
    const zstd = await snapstack(["img", "amend", "-o", "compat=0.10", name], { cwd: dir });
    assertCodedError(zstd, "E_UNSUPPORTED_FEATURE");
    assert.match(zstd.stderr, /zstd compression type and existing compressed clusters/);
    assert.ok(readFileSync(join(dir, name)).equals(untouched), `${name}: the refused downgrade changed the image`);
  }

  // refcount_bits copies the stored refcounts, leaks included, as qemu-img does (a recount would drop
  // them and leave COPIED wrong): a snapshot delete cut short (the header no longer lists the snapshot).
  await sh(`qemu-img create -q -f qcow2 leaky.qcow2 8M; qemu-io -c 'write -P 1 0 128k' leaky.qcow2 >/dev/null; qemu-img snapshot -c s leaky.qcow2
    printf '\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0' | dd of=leaky.qcow2 bs=1 seek=60 conv=notrunc status=none; cp leaky.qcow2 leaky-q.qcow2`);
  const leaksBefore = await qemuImg(["check", "--output=json", "leaky.qcow2"], dir);
  assert.equal(leaksBefore.code, 3, `the leaky fixture has leaks only: ${leaksBefore.stdout}`);
  ok(await snapstack(["img", "amend", "-o", "refcount_bits=8", "leaky.qcow2"], { cwd: dir }), "amend a leaky image");
  ok(await qemuImg(["amend", "-o", "refcount_bits=8", "leaky-q.qcow2"], dir), "qemu-img amend a leaky image");
  const leaksOurs = await qemuImg(["check", "--output=json", "leaky.qcow2"], dir);
  const leaksTheirs = await qemuImg(["check", "--output=json", "leaky-q.qcow2"], dir);
  assert.equal(leaksOurs.code, 3, `leaks kept, nothing worse: ${leaksOurs.stdout}`);
  assert.equal(JSON.parse(leaksOurs.stdout).leaks, JSON.parse(leaksTheirs.stdout).leaks);
  assert.equal(JSON.parse(leaksOurs.stdout).leaks, JSON.parse(leaksBefore.stdout).leaks);

  // A refcount too large for the new width: qemu-img's message, naming the same cluster.
  await sh(`qemu-img create -q -f qcow2 wide.qcow2 8M; qemu-io -c 'write -P 1 0 1M' wide.qcow2 >/dev/null; qemu-img snapshot -c s wide.qcow2; cp wide.qcow2 wide2.qcow2`);
  const theirs = await qemuImg(["amend", "-o", "refcount_bits=1", "wide.qcow2"], dir);
  const ours = await snapstack(["img", "amend", "-o", "refcount_bits=1", "wide2.qcow2"], { cwd: dir });
  assertCodedError(ours, "E_INVALID_OPTION");
  assert.equal(ours.stderr.replace(/^snapstack: error E_INVALID_OPTION: /, ""), theirs.stderr.replace(/^qemu-img: /, ""));
});

test("measure equals qemu-img measure (human and JSON)", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io")) return;
  const dir = scratchDir(t);
  await buildFixtures(dir);
  const cases: string[][] = [
    ["--size", "1G", "-O", "qcow2"],
    ["--size", "1G"],
    ["--size", "100G", "-O", "qcow2", "-o", "cluster_size=4k"],
    ["--size", "10G", "-O", "qcow2", "-o", "preallocation=metadata"],
    ["-O", "qcow2", "base.qcow2"],
    ["-O", "qcow2", "top.qcow2"],
    ["-O", "raw", "top.qcow2"],
    ["-O", "qcow2", "-f", "raw", "full.raw"],
    ["-O", "qcow2", "-o", "cluster_size=512", "base.qcow2"],
    ["-O", "qcow2", "-o", "backing_file=x.qcow2,backing_fmt=qcow2", "top.qcow2"],
    ["-O", "qcow2", "v2.qcow2"], // a v2 source holds no bitmaps: no "bitmaps" field
    ["-O", "qcow2", "-l", "s", "shrunk.qcow2"], // a snapshot, measured at the image's current (smaller) size
  ];
  // A raw file without holes: qemu-img finds holes with SEEK_HOLE, which snapstack cannot (src/formats/raw).
  ok(await qemuImg(["create", "-q", "-f", "raw", "full.raw", "3M"], dir), "full.raw");
  ok(await qemuIo(["-f", "raw", "-c", "write -P 0x5 0 3M", "full.raw"], dir), "fill full.raw");
  ok(await qemuImg(["create", "-q", "-f", "qcow2", "shrunk.qcow2", "64M"], dir), "shrunk.qcow2");
  ok(await qemuIo(["-c", "write -P 1 0 1M", "-c", "write -P 2 48M 8M", "shrunk.qcow2"], dir), "fill shrunk.qcow2");
  ok(await qemuImg(["snapshot", "-c", "s", "shrunk.qcow2"], dir), "snapshot");
  ok(await qemuImg(["resize", "-q", "--shrink", "shrunk.qcow2", "16M"], dir), "shrink");
  for (const args of cases) {
    for (const output of ["human", "json"]) {
      const ours = ok(await snapstack(["img", "measure", `--output=${output}`, ...args], { cwd: dir }), `measure ${args.join(" ")}`);
      const theirs = ok(await qemuImg(["measure", `--output=${output}`, ...args], dir), `qemu-img measure ${args.join(" ")}`);
      assert.equal(ours.stdout, theirs.stdout, `${output} ${args.join(" ")}`);
    }
  }
});
