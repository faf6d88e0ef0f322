/**
 * JSON exactly as qemu-img 7.2 prints it (qobject_to_json_pretty), so our
 * output can be compared byte for byte.
 *
 * Design notes
 * - Indentation is 4 spaces, `"key": value`, like JSON.stringify(x, null, 4).
 * - Key order is not insertion order: QEMU keeps a dict in 512 hash buckets
 *   (qobject/qdict.c, tdb_hash) and prints bucket by bucket; within one bucket
 *   the key inserted last comes first. Callers pass objects whose keys are in
 *   QAPI (insertion) order; `orderLikeQdict` reproduces what QEMU prints.
 * - An empty array or object still ends on a line of its own: `[` newline
 *   indent `]` (json-writer.c's end_array / end_object: pretty_newline),
 *   as info prints a bitmap without flags.
 * - Strings are quoted as json-writer.c's quoted_str: every character
 *   outside 0x20-0x7E becomes \uXXXX with upper-case digits (a snapshot
 *   named "ü" prints as "\u00FC"; beyond the BMP a surrogate pair), except
 *   the short escapes \b \f \n \r \t.
 */

const QDICT_BUCKETS = 512;

/** QEMU's tdb_hash over the key's bytes (keys are ASCII). */
export function qdictHash(key: string): number {
  let value = Math.imul(0x238f13af, key.length) >>> 0;
  for (let index = 0; index < key.length; index++) {
    value = (value + ((key.charCodeAt(index) << ((index * 5) % 24)) >>> 0)) >>> 0;
  }
  return (Math.imul(1103515243, value) + 12345) >>> 0;
}

/** Keys in the order QEMU would print a dict filled in this order. */
export function orderLikeQdict(keys: readonly string[]): string[] {
  const withBucket = keys.map((key, insertion) => ({ key, insertion, bucket: qdictHash(key) % QDICT_BUCKETS }));
  withBucket.sort((a, b) => a.bucket - b.bucket || b.insertion - a.insertion);
  return withBucket.map((entry) => entry.key);
}

const SHORT_ESCAPES: Record<number, string> = { 0x22: '\\"', 0x5c: "\\\\", 0x08: "\\b", 0x0c: "\\f", 0x0a: "\\n", 0x0d: "\\r", 0x09: "\\t" };

/** A string as QEMU's JSON writer quotes it (see the design notes). */
export function quoteQemuJson(text: string): string {
  if (/^[\x20\x21\x23-\x5b\x5d-\x7e]*$/.test(text)) return `"${text}"`;
  let quoted = '"';
  for (let index = 0; index < text.length; index++) {
    const code = text.charCodeAt(index);
    const short = SHORT_ESCAPES[code];
    if (short !== undefined) quoted += short;
    else if (code < 0x20 || code >= 0x7f) quoted += `\\u${code.toString(16).toUpperCase().padStart(4, "0")}`;
    else quoted += text[index];
  }
  return `${quoted}"`;
}

function render(value: unknown, indent: string): string {
  if (value === null || value === undefined) return "null";
  if (Array.isArray(value)) {
    if (value.length === 0) return `[\n${indent}]`;
    const inner = indent + "    ";
    return `[\n${value.map((item) => inner + render(item, inner)).join(",\n")}\n${indent}]`;
  }
  if (typeof value === "object") {
    const record = value as Record<string, unknown>;
    const keys = orderLikeQdict(Object.keys(record).filter((key) => record[key] !== undefined));
    if (keys.length === 0) return `{\n${indent}}`;
    const inner = indent + "    ";
    return `{\n${keys.map((key) => `${inner}${quoteQemuJson(key)}: ${render(record[key], inner)}`).join(",\n")}\n${indent}}`;
  }
  if (typeof value === "string") return quoteQemuJson(value);
  return JSON.stringify(value);
}

/** Pretty JSON with QEMU's key order, without a trailing newline. */
export function formatQemuJson(value: unknown): string {
  return render(value, "");
}
