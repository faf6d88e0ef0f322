/**
 * The layering rule of docs/architecture.md, checked against the code: each
 * top-level folder under src/ imports only from folders below it, and the
 * diagram in docs/architecture.md lists every folder in that order. Folders
 * on one rank (nbd/ and qmp/) do not import each other.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";

const repoRoot = join(import.meta.dirname, "..", "..");
const srcRoot = join(repoRoot, "src");

/** Top first. A rank may hold several folders that must not import each other. */
const LAYERS: readonly (readonly string[])[] = [["cli"], ["api"], ["vm"], ["nbd", "qmp"], ["chain"], ["formats"], ["device"], ["io"], ["base"]];

function rankOf(folder: string): number {
  return LAYERS.findIndex((rank) => rank.includes(folder));
}

function sourceFiles(dir: string): string[] {
  const files: string[] = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const full = join(dir, entry.name);
    if (entry.isDirectory()) files.push(...sourceFiles(full));
    else if (entry.name.endsWith(".ts")) files.push(full);
  }
  return files;
}

/** Relative module specifiers of `import ... from`, `export ... from`, `import "..."` and `import("...")`. */
export function relativeImports(text: string): string[] {
  const specifiers: string[] = [];
  for (const match of text.matchAll(/(?:\bfrom\s*|\bimport\s*\(?\s*)["'](\.{1,2}\/[^"']+)["']/g)) specifiers.push(match[1]);
  return specifiers;
}

/** The top-level folder under src/ that `file` lives in ("" for src/index.ts). */
function topFolder(file: string): string {
  const parts = relative(srcRoot, file).split("/");
  return parts.length > 1 ? parts[0] : "";
}

test("relativeImports finds static, re-export, side-effect and dynamic imports, and nothing else", () => {
  const text = [
    'import { a } from "../chain/open-image.ts";',
    'export { b } from "./local.ts";',
    'import "../io/side-effect.ts";',
    'const m = await import("../../nbd/nbd-server.ts");',
    'import { c } from "node:fs";',
    '// "from ../vm/x.ts" in a comment is not an import',
  ].join("\n");
  assert.deepEqual(relativeImports(text), ["../chain/open-image.ts", "./local.ts", "../io/side-effect.ts", "../../nbd/nbd-server.ts"]);
});

test("every folder under src/ imports only from folders below it", () => {
  const folders = readdirSync(srcRoot, { withFileTypes: true }).filter((entry) => entry.isDirectory()).map((entry) => entry.name);
  for (const folder of folders) assert.notEqual(rankOf(folder), -1, `src/${folder}/ has no place in LAYERS (and docs/architecture.md's diagram)`);
  const violations: string[] = [];
  let checked = 0;
  for (const file of sourceFiles(srcRoot)) {
    const from = topFolder(file);
    if (from === "") continue; // src/index.ts: the public API re-exports every layer
    for (const specifier of relativeImports(readFileSync(file, "utf8"))) {
      const to = topFolder(resolve(dirname(file), specifier));
      checked++;
      if (to === from) continue;
      if (to === "" || rankOf(to) <= rankOf(from)) violations.push(`${relative(repoRoot, file)} imports ${specifier} (${from}/ -> ${to || "src/index.ts"})`);
    }
  }
  assert.ok(checked > 500, `only ${checked} relative imports found: the pattern no longer matches the code`);
  assert.deepEqual(violations, []);
});

test("docs/architecture.md's diagram lists the folders under src/ in the layers' order", () => {
  const doc = readFileSync(join(repoRoot, "docs", "architecture.md"), "utf8");
  const diagram = /```\nsrc\/\n([\s\S]*?)```/.exec(doc);
  assert.ok(diagram !== null, "no src/ diagram in docs/architecture.md");
  const listed: string[] = [];
  for (const line of diagram[1].split("\n")) {
    const folder = /^ {2}([a-z]+)\//.exec(line)?.[1];
    if (folder !== undefined && !listed.includes(folder)) listed.push(folder);
  }
  assert.deepEqual(listed, LAYERS.flat());
});
