/**
 * Finds and runs bench files. A bench file is `bench/<name>.bench.ts` whose
 * default export is a function (sync or async, no arguments) returning
 * BenchRow[]. Files run one after another, never in parallel, so they do not
 * compete for the CPU or the disk. A file that fails to load, throws or
 * returns malformed rows is recorded as failed and the run goes on.
 */
import { readdirSync } from "node:fs";
import { join, relative } from "node:path";
import { pathToFileURL } from "node:url";
import { validateRows, type BenchFileResult } from "./bench-report.ts";

export const BENCH_FILE_SUFFIX = ".bench.ts";

/** Bench files directly in `benchDir` whose names contain any filter (all when none), sorted. */
export function findBenchFiles(benchDir: string, filters: readonly string[] = []): string[] {
  return readdirSync(benchDir)
    .filter((name) => name.endsWith(BENCH_FILE_SUFFIX))
    .filter((name) => filters.length === 0 || filters.some((filter) => name.includes(filter)))
    .sort()
    .map((name) => join(benchDir, name));
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

export async function runBenchFile(path: string, repoRoot: string): Promise<BenchFileResult> {
  const file = relative(repoRoot, path);
  const started = performance.now();
  const finish = (rows: BenchFileResult["rows"], error: string | null): BenchFileResult => ({
    file,
    durationSeconds: (performance.now() - started) / 1000,
    rows,
    error,
  });
  let benchFunction: unknown;
  try {
    benchFunction = ((await import(pathToFileURL(path).href)) as { default?: unknown }).default;
  } catch (error) {
    return finish([], `import failed: ${errorText(error)}`);
  }
  if (typeof benchFunction !== "function") return finish([], "the default export is not a function");
  let returned: unknown;
  try {
    returned = await (benchFunction as () => unknown)();
  } catch (error) {
    return finish([], `threw: ${errorText(error)}`);
  }
  try {
    return finish(validateRows(returned), null);
  } catch (error) {
    return finish([], `malformed rows: ${errorText(error)}`);
  }
}
