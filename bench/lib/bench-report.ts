/**
 * The benchmark report: rows as bench files return them, checked at the edge
 * (a bench file is code we import, its result is input), and rendered as the
 * markdown table that goes into bench/results/latest.md and the README.
 *
 * Pure: no I/O here; bench/lib/bench-runner.ts runs the files and
 * bench/lib/machine-info.ts describes the machine.
 */
import type { MachineInfo } from "./machine-info.ts";

/** One measured figure, snapstack against its peer (qemu-img, qemu-io, ...). */
export interface BenchRow {
  name: string;
  /** snapstack's figure, or null when snapstack could not run it (see notes). */
  snapstack: number | null;
  /** The peer's figure, or null when there is none. */
  peer: number | null;
  /** snapstack / peer, or null when either is missing. */
  ratio: number | null;
  unit: string;
  notes: string;
}

/** What one bench file produced. */
export interface BenchFileResult {
  /** Path relative to the repository root, e.g. "bench/convert.bench.ts". */
  file: string;
  durationSeconds: number;
  rows: BenchRow[];
  /** Set when the file failed to load, threw, or returned malformed rows. */
  error: string | null;
}

export interface BenchReport {
  generatedAt: string;
  /** Substrings the file names were filtered by; empty for a full run. */
  filters: string[];
  machine: MachineInfo;
  results: BenchFileResult[];
}

const NUMBER_FIELDS = ["snapstack", "peer", "ratio"] as const;
const STRING_FIELDS = ["name", "unit", "notes"] as const;

/** Checks what a bench function returned; throws naming the first bad field. */
export function validateRows(value: unknown): BenchRow[] {
  if (!Array.isArray(value)) throw new Error(`expected an array of rows, got ${describe(value)}`);
  return value.map((item: unknown, index) => {
    if (typeof item !== "object" || item === null) throw new Error(`row ${index}: expected an object, got ${describe(item)}`);
    const fields = item as Record<string, unknown>;
    for (const key of STRING_FIELDS) {
      if (typeof fields[key] !== "string") throw new Error(`row ${index}: ${key} must be a string, got ${describe(fields[key])}`);
    }
    for (const key of NUMBER_FIELDS) {
      const field = fields[key];
      if (field !== null && (typeof field !== "number" || !Number.isFinite(field))) {
        throw new Error(`row ${index} (${String(fields.name)}): ${key} must be a finite number or null, got ${describe(field)}`);
      }
    }
    return {
      name: fields.name as string,
      snapstack: fields.snapstack as number | null,
      peer: fields.peer as number | null,
      ratio: fields.ratio as number | null,
      unit: fields.unit as string,
      notes: fields.notes as string,
    };
  });
}

function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "number") return String(value);
  return typeof value;
}

/** Three significant digits, thousands separated from 1000 up; "-" for none. */
export function formatFigure(value: number | null): string {
  if (value === null) return "-";
  if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString("en-US");
  return Number(value.toPrecision(3)).toString();
}

/** Markdown cells must not contain pipes or line breaks. */
function cell(text: string): string {
  return text.replaceAll("|", "\\|").replaceAll(/\r?\n/g, " ");
}

export function renderTable(results: readonly BenchFileResult[]): string {
  const lines = ["| benchmark | snapstack | peer | ratio | unit | notes |", "|---|---:|---:|---:|---|---|"];
  for (const result of results) {
    for (const row of result.rows) {
      lines.push(`| ${cell(row.name)} | ${formatFigure(row.snapstack)} | ${formatFigure(row.peer)} | ${formatFigure(row.ratio)} | ${cell(row.unit)} | ${cell(row.notes)} |`);
    }
    if (result.error !== null) lines.push(`| ${cell(result.file)} | - | - | - | - | FAILED: ${cell(result.error)} |`);
  }
  return lines.join("\n");
}

export function renderMachine(machine: MachineInfo): string {
  return [
    `- CPU: ${machine.cpuModel}, ${machine.cpuCount} logical cores`,
    `- Memory: ${machine.memoryGiB} GiB`,
    `- OS: ${machine.osName}, kernel ${machine.kernel}`,
    `- Node: ${machine.nodeVersion}; ${machine.qemuImgVersion}`,
    `- Scratch directory: ${machine.scratchDir} (${machine.scratchFilesystem})`,
    `- Commit: ${machine.gitCommit}`,
  ].join("\n");
}

export function renderMarkdown(report: BenchReport): string {
  const scope = report.filters.length === 0 ? "all bench files" : `bench files matching ${report.filters.map((f) => `"${f}"`).join(", ")}`;
  const files = report.results.map((r) => `${r.file} (${r.durationSeconds.toFixed(1)} s${r.error === null ? "" : ", FAILED"})`).join(", ");
  return [
    "# snapstack benchmarks",
    "",
    `Generated ${report.generatedAt} by \`npm run bench\` (${scope}).`,
    "",
    "## Machine",
    "",
    renderMachine(report.machine),
    "",
    "## Method",
    "",
    "- What each figure measures (what is timed, how many runs, median or not) is in its bench file's header comment and the row's notes.",
    "- ratio = snapstack / peer. Whether higher or lower is better depends on the unit (seconds: lower; ops/s, GB/s: higher); the notes say so.",
    "- The page cache is NOT dropped between runs: figures are warm-cache figures (dropping caches needs root and would disturb the machine).",
    "- Images are built with qemu-img/qemu-io in the scratch directory and deleted afterwards.",
    "",
    "## Results",
    "",
    renderTable(report.results),
    "",
    `Files: ${files}.`,
    "",
  ].join("\n");
}
