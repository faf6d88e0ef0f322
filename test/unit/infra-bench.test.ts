/**
 * The benchmark harness: row validation, the markdown table, and running
 * bench files that succeed, throw, export the wrong thing or return junk.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { formatFigure, renderMarkdown, renderTable, validateRows, type BenchRow } from "../../bench/lib/bench-report.ts";
import { findBenchFiles, runBenchFile } from "../../bench/lib/bench-runner.ts";
import { readMachineInfo } from "../../bench/lib/machine-info.ts";
import { scratchDir } from "../helpers/tools.ts";

const goodRow: BenchRow = { name: "convert", snapstack: 1.5, peer: 2, ratio: 0.75, unit: "s", notes: "median of 5" };

test("validateRows keeps well-formed rows and names the first bad field", () => {
  assert.deepEqual(validateRows([goodRow, { ...goodRow, snapstack: null, ratio: null }]), [goodRow, { ...goodRow, snapstack: null, ratio: null }]);
  assert.deepEqual(validateRows([{ ...goodRow, extra: 1 }]), [goodRow]);
  assert.throws(() => validateRows(goodRow), /expected an array of rows, got object/);
  assert.throws(() => validateRows([goodRow, 3]), /row 1: expected an object, got 3/);
  assert.throws(() => validateRows([{ ...goodRow, unit: undefined }]), /row 0: unit must be a string, got undefined/);
  assert.throws(() => validateRows([{ ...goodRow, peer: "2" }]), /row 0 \(convert\): peer must be a finite number or null, got string/);
  assert.throws(() => validateRows([{ ...goodRow, ratio: Number.NaN }]), /ratio must be a finite number or null, got NaN/);
});

test("formatFigure: three significant digits, separators from 1000, dash for none", () => {
  assert.equal(formatFigure(null), "-");
  assert.equal(formatFigure(0.123456), "0.123");
  assert.equal(formatFigure(1.5), "1.5");
  assert.equal(formatFigure(999.94), "1000");
  assert.equal(formatFigure(123456.7), "123,457");
});

test("renderTable escapes cells and lists failed files", () => {
  const table = renderTable([
    { file: "bench/a.bench.ts", durationSeconds: 1, rows: [{ ...goodRow, notes: "a | b\nc" }], error: null },
    { file: "bench/b.bench.ts", durationSeconds: 2, rows: [], error: "threw: boom" },
  ]);
  assert.deepEqual(table.split("\n"), [
    "| benchmark | snapstack | peer | ratio | unit | notes |",
    "|---|---:|---:|---:|---|---|",
    "| convert | 1.5 | 2 | 0.75 | s | a \\| b c |",
    "| bench/b.bench.ts | - | - | - | - | FAILED: threw: boom |",
  ]);
});

test("renderMarkdown includes the machine and says the page cache stays warm", () => {
  const machine = readMachineInfo(process.cwd());
  assert.equal(machine.nodeVersion, process.version);
  assert.ok(machine.cpuCount >= 1);
  const markdown = renderMarkdown({ generatedAt: "2026-01-01T00:00:00.000Z", filters: ["convert"], machine, results: [] });
  assert.match(markdown, /bench files matching "convert"/);
  assert.ok(markdown.includes(`- Node: ${process.version}; ${machine.qemuImgVersion}`));
  assert.match(markdown, /page cache is NOT dropped/);
});

test("runBenchFile records rows, throws, wrong exports and malformed rows; findBenchFiles filters", async (t) => {
  const dir = scratchDir(t);
  const sources: Record<string, string> = {
    "good.bench.ts": `export default async () => [${JSON.stringify(goodRow)}];`,
    "throws.bench.ts": `export default () => { throw new Error("no qemu-img"); };`,
    "named.bench.ts": `export const bench = () => [];`,
    "junk.bench.ts": `export default () => [{ name: "x" }];`,
    "helper.ts": `export const notABench = 1;`,
  };
  for (const [name, source] of Object.entries(sources)) writeFileSync(join(dir, name), source);

  const files = findBenchFiles(dir);
  assert.deepEqual(
    files.map((file) => file.slice(dir.length + 1)),
    ["good.bench.ts", "junk.bench.ts", "named.bench.ts", "throws.bench.ts"],
  );
  assert.deepEqual(findBenchFiles(dir, ["goo", "thr"]), [join(dir, "good.bench.ts"), join(dir, "throws.bench.ts")]);

  const results = new Map<string, Awaited<ReturnType<typeof runBenchFile>>>();
  for (const file of files) results.set(file.slice(dir.length + 1), await runBenchFile(file, dir));
  assert.deepEqual(results.get("good.bench.ts")?.rows, [goodRow]);
  assert.equal(results.get("good.bench.ts")?.error, null);
  assert.equal(results.get("good.bench.ts")?.file, "good.bench.ts");
  assert.equal(results.get("throws.bench.ts")?.error, "threw: no qemu-img");
  assert.equal(results.get("named.bench.ts")?.error, "the default export is not a function");
  assert.match(results.get("junk.bench.ts")?.error ?? "", /^malformed rows: row 0: unit must be a string/);
});
