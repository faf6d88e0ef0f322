import { test } from "node:test";
import assert from "node:assert/strict";
import { NOT_QEMU, QEMU_UNIMPLEMENTED, parseArgs, type OptionSpec } from "../../src/cli/args.ts";
import { SnapstackError } from "../../src/base/errors.ts";

const SPECS: OptionSpec[] = [
  { name: "format", short: "f", value: true },
  { name: "backingFormat", short: "F", value: true },
  { name: "options", short: "o", value: true, repeat: "comma" },
  { name: "quiet", short: "q" },
  { name: "unsafe", short: "u" },
  { name: "output", long: "output", value: true },
  { name: "backingChain", long: "backing-chain" },
  { name: "command", short: "c", value: true, repeat: "list" },
];

function usageMessage(fn: () => unknown): string {
  try {
    fn();
  } catch (error) {
    assert.ok(error instanceof SnapstackError);
    assert.equal(error.code, "E_USAGE");
    return error.message;
  }
  assert.fail("expected E_USAGE");
}

test("options before and after positionals (GNU permutation)", () => {
  const parsed = parseArgs(["a.qcow2", "-f", "qcow2", "1G", "-q"], SPECS);
  assert.deepEqual(parsed.positionals, ["a.qcow2", "1G"]);
  assert.equal(parsed.options.format, "qcow2");
  assert.equal(parsed.options.quiet, true);
});

test("glued short values and clusters", () => {
  assert.equal(parseArgs(["-fqcow2"], SPECS).options.format, "qcow2");
  const cluster = parseArgs(["-qufraw", "x"], SPECS);
  assert.equal(cluster.options.quiet, true);
  assert.equal(cluster.options.unsafe, true);
  assert.equal(cluster.options.format, "raw");
  assert.deepEqual(cluster.positionals, ["x"]);
  const cluster2 = parseArgs(["-qf", "raw"], SPECS);
  assert.equal(cluster2.options.format, "raw");
});

test("long options with = or a separate value, and unique prefixes", () => {
  assert.equal(parseArgs(["--output=json"], SPECS).options.output, "json");
  assert.equal(parseArgs(["--output", "json", "x"], SPECS).options.output, "json");
  assert.equal(parseArgs(["--outp=json"], SPECS).options.output, "json");
  assert.equal(parseArgs(["--backing-chain"], SPECS).options.backingChain, true);
  assert.equal(parseArgs(["--output="], SPECS).options.output, "");
});

test("qemu's long options that snapstack lacks still make abbreviations ambiguous, take their values as qemu's do, and naming one is E_UNSUPPORTED_FEATURE", () => {
  const convertSpecs: OptionSpec[] = [...SPECS, { name: "targetIsZero", long: "target-is-zero" }];
  const convert = { unimplementedLong: [...QEMU_UNIMPLEMENTED, { long: "target-image-opts", value: false }] };
  // qemu-img convert refuses --target (--target-image-opts or --target-is-zero?): it must not run as --target-is-zero.
  assert.equal(usageMessage(() => parseArgs(["--target", "-n"], convertSpecs, convert)), "unrecognized option '--target'");
  assert.equal(parseArgs(["--target-is"], convertSpecs, convert).options.targetIsZero, true);
  // The default set (most qemu-img subcommands): --object and --image-opts.
  assert.equal(usageMessage(() => parseArgs(["--o=json"], SPECS)), "unrecognized option '--o=json'");
  assert.equal(parseArgs(["--ou=json"], SPECS).options.output, "json");
  for (const [words, settings] of [
    [["--image-opts"], undefined],
    [["--image"], undefined],
    [["--object=secret,id=s"], undefined],
    [["--obj", "secret,id=s"], undefined],
    [["--target-image-opts"], convert],
  ] as const) {
    assert.throws(
      () => parseArgs([...words, "x"], convertSpecs, settings),
      (error: unknown) => error instanceof SnapstackError && error.code === "E_UNSUPPORTED_FEATURE" && /^option '--(image-opts|object|target-image-opts)' is not supported by snapstack$/.test(error.message),
      words.join(" "),
    );
  }
  // What qemu itself refuses stays a usage error: a value for a flag, a missing value, a name this command lacks.
  assert.equal(usageMessage(() => parseArgs(["--image-opts=1", "x"], SPECS)), "unrecognized option '--image-opts=1'");
  assert.equal(usageMessage(() => parseArgs(["x", "--object"], SPECS)), "missing argument for option '--object'");
  assert.equal(usageMessage(() => parseArgs(["--target-image-opts"], convertSpecs)), "unrecognized option '--target-image-opts'");
  // One a command implements (qemu-nbd's --object) is that command's own, abbreviated too.
  const nbdSpecs: OptionSpec[] = [...SPECS, { name: "object", long: "object", value: true, repeat: "list" }];
  assert.deepEqual(parseArgs(["--obj", "tls-creds-x509,id=t,dir=d"], nbdSpecs).options.object, ["tls-creds-x509,id=t,dir=d"]);
  // Commands without a qemu counterpart, and qemu-io's inner commands (glibc style), know of none.
  assert.equal(parseArgs(["--o=json"], SPECS, NOT_QEMU).options.output, "json");
  assert.equal(usageMessage(() => parseArgs(["--image-opts"], SPECS, { style: "glibc", program: "read" })), "read: unrecognized option '--image-opts'");
});

test("-- ends options; a lone - is a positional", () => {
  const parsed = parseArgs(["-q", "--", "-f", "--output=json", "-"], SPECS);
  assert.deepEqual(parsed.positionals, ["-f", "--output=json", "-"]);
  assert.equal(parsed.options.format, undefined);
  assert.deepEqual(parseArgs(["-"], SPECS).positionals, ["-"]);
});

test("repeated options: last wins, -o joined with commas, lists kept", () => {
  assert.equal(parseArgs(["-f", "raw", "-f", "qcow2"], SPECS).options.format, "qcow2");
  assert.equal(parseArgs(["-o", "cluster_size=4k", "-o", "lazy_refcounts=on"], SPECS).options.options, "cluster_size=4k,lazy_refcounts=on");
  assert.deepEqual(parseArgs(["-c", "read 0 1", "-c", "flush"], SPECS).options.command, ["read 0 1", "flush"]);
});

test("unknown options and missing values give qemu-img's messages", () => {
  assert.equal(usageMessage(() => parseArgs(["-x"], SPECS)), "unrecognized option '-x'");
  assert.equal(usageMessage(() => parseArgs(["-qx"], SPECS)), "unrecognized option '-x'");
  assert.equal(usageMessage(() => parseArgs(["--foo"], SPECS)), "unrecognized option '--foo'");
  assert.equal(usageMessage(() => parseArgs(["--foo=1"], SPECS)), "unrecognized option '--foo=1'");
  assert.equal(usageMessage(() => parseArgs(["--backing-chain=1"], SPECS)), "unrecognized option '--backing-chain=1'");
  assert.equal(usageMessage(() => parseArgs(["-f"], SPECS)), "missing argument for option '-f'");
  assert.equal(usageMessage(() => parseArgs(["x", "--output"], SPECS)), "missing argument for option '--output'");
});

test("glibc style messages for qemu-io's inner commands", () => {
  const settings = { style: "glibc" as const, program: "read" };
  assert.equal(usageMessage(() => parseArgs(["-1", "5"], SPECS, settings)), "read: invalid option -- '1'");
  assert.equal(usageMessage(() => parseArgs(["-f"], SPECS, settings)), "read: option requires an argument -- 'f'");
  assert.equal(usageMessage(() => parseArgs(["--zzz"], SPECS, settings)), "read: unrecognized option '--zzz'");
});
