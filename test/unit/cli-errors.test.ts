import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { ERROR_CODES, SnapstackError, type ErrorCode } from "../../src/base/errors.ts";
import { exitCodeFor } from "../../src/cli/exit-codes.ts";
import { formatErrorLine, toSnapstackError } from "../../src/cli/error-report.ts";
import { captureContext } from "../../src/cli/context.ts";
import { runCli } from "../../src/cli/main.ts";

const DOC = readFileSync(new URL("../../docs/errors.md", import.meta.url), "utf8");

/** Rows of the code table: | `E_X` | meaning | cause | exit | compare | */
function documentedRows(): Map<string, { meaning: string; exit: number; compare: number }> {
  const rows = new Map<string, { meaning: string; exit: number; compare: number }>();
  for (const line of DOC.split("\n")) {
    const match = /^\| `(E_[A-Z_]+)` \| (.*?) \| .*? \| (\d+) \| (\d+) \|$/.exec(line);
    if (match) rows.set(match[1], { meaning: match[2], exit: Number(match[3]), compare: Number(match[4]) });
  }
  return rows;
}

test("docs/errors.md lists exactly the codes of ERROR_CODES, with their meaning", () => {
  const rows = documentedRows();
  assert.deepEqual([...rows.keys()].sort(), Object.keys(ERROR_CODES).sort());
  for (const [code, meaning] of Object.entries(ERROR_CODES)) assert.equal(rows.get(code)?.meaning, meaning, code);
});

test("docs/errors.md exit statuses match the exit-code table", () => {
  for (const [code, row] of documentedRows()) {
    assert.equal(row.exit, exitCodeFor("create", code as ErrorCode), `${code} exit`);
    assert.equal(row.compare, exitCodeFor("compare", code as ErrorCode), `${code} compare exit`);
  }
});

test("an error is one line: program, code, message; newlines folded", () => {
  const line = formatErrorLine(new SnapstackError("E_NOT_FOUND", "x.qcow2: cannot open: no such file or directory"));
  assert.equal(line, "snapstack: error E_NOT_FOUND: x.qcow2: cannot open: no such file or directory\n");
  const folded = formatErrorLine(new SnapstackError("E_INVALID_SIZE", "first\nsecond\n"));
  assert.equal(folded, "snapstack: error E_INVALID_SIZE: first; second\n");
});

test("unexpected errors become E_INTERNAL without a stack trace", () => {
  const coded = toSnapstackError(new TypeError("x is undefined"));
  assert.equal(coded.code, "E_INTERNAL");
  const line = formatErrorLine(coded);
  assert.equal(line.split("\n").length, 2);
  assert.ok(!line.includes("    at "), line);
});

test("runCli prints one error line and returns the mapped exit status", async () => {
  const context = captureContext();
  const status = await runCli(["img", "create", "--foo"], context);
  assert.equal(status, 1);
  assert.equal(context.stdout, "");
  assert.match(context.stderr, /^snapstack: error E_USAGE: unrecognized option '--foo'; try 'snapstack img create --help'\n$/);

  const unknown = captureContext();
  assert.equal(await runCli(["frobnicate"], unknown), 1);
  assert.match(unknown.stderr, /^snapstack: error E_USAGE: unknown command 'frobnicate'/);

  const compare = captureContext();
  assert.equal(await runCli(["img", "compare", "only-one"], compare), 1, "usage errors in compare exit 1");
  assert.match(compare.stderr, /E_USAGE: Expecting two image file names/);
});

test("SNAPSTACK_DEBUG=1 adds the stack of an internal error, otherwise not", async () => {
  const { formatDebugDetails } = await import("../../src/cli/error-report.ts");
  const error = new Error("boom");
  assert.equal(formatDebugDetails(error, {}), "");
  assert.match(formatDebugDetails(error, { SNAPSTACK_DEBUG: "1" }), /Error: boom\n\s+at /);
});

test("help and version print to stdout and exit 0", async () => {
  for (const argv of [["--help"], ["img", "--help"], ["--version"], ["img", "create", "--help"], ["io", "--help"]]) {
    const context = captureContext();
    assert.equal(await runCli(argv, context), 0, argv.join(" "));
    assert.ok(context.stdout.length > 0);
    assert.equal(context.stderr, "");
  }
});
