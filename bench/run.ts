/**
 * `npm run bench [-- name-filter...]`: runs bench/*.bench.ts one after
 * another, prints the machine and a markdown table, and writes
 * bench/results/latest.md and bench/results/latest.json. Exits 1 if any bench
 * file failed (its failure is in the table too).
 *
 * A single bench file can also run on its own: `node bench/convert.bench.ts`.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { join, relative } from "node:path";
import { parseArgs } from "node:util";
import { renderMachine, renderMarkdown, renderTable, type BenchFileResult, type BenchReport } from "./lib/bench-report.ts";
import { findBenchFiles, runBenchFile } from "./lib/bench-runner.ts";
import { readMachineInfo } from "./lib/machine-info.ts";

const benchDir = import.meta.dirname;
const repoRoot = join(benchDir, "..");
const resultsDir = join(benchDir, "results");

const { positionals: filters, values: options } = parseArgs({
  allowPositionals: true,
  options: { list: { type: "boolean", default: false }, help: { type: "boolean", short: "h", default: false } },
});

if (options.help) {
  console.log("usage: npm run bench [-- [--list] [name-filter...]]\n  runs bench/*.bench.ts (those whose names contain a filter, if any)");
  process.exit(0);
}

const files = findBenchFiles(benchDir, filters);
if (options.list) {
  for (const file of files) console.log(relative(repoRoot, file));
  process.exit(0);
}
if (files.length === 0) {
  console.error(`bench: no bench files${filters.length > 0 ? ` matching ${filters.join(", ")}` : ""} in ${benchDir}`);
  process.exit(1);
}

const machine = readMachineInfo(repoRoot);
console.log(renderMachine(machine));
console.log("(page cache is not dropped between runs: warm-cache figures)\n");

const results: BenchFileResult[] = [];
for (const file of files) {
  console.log(`bench: running ${relative(repoRoot, file)}`);
  const result = await runBenchFile(file, repoRoot);
  results.push(result);
  console.log(`bench: ${result.file}: ${result.error === null ? `${result.rows.length} rows` : `FAILED: ${result.error}`} in ${result.durationSeconds.toFixed(1)} s`);
}

const report: BenchReport = { generatedAt: new Date().toISOString(), filters, machine, results };
console.log(`\n${renderTable(results)}\n`);
mkdirSync(resultsDir, { recursive: true });
writeFileSync(join(resultsDir, "latest.md"), renderMarkdown(report));
writeFileSync(join(resultsDir, "latest.json"), `${JSON.stringify(report, null, 2)}\n`);
console.log(`bench: wrote ${join("bench", "results", "latest.md")} and latest.json`);
process.exit(results.some((result) => result.error !== null) ? 1 : 0);
