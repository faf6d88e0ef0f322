// Rendering checked against text captured from qemu-img / qemu-io 7.2.
import { test } from "node:test";
import assert from "node:assert/strict";
import { SnapstackError } from "../../src/base/errors.ts";
import { checkCreateOptions, formatCreateBanner, parseOptionList } from "../../src/cli/create-options.ts";
import { formatQemuJson, orderLikeQdict } from "../../src/cli/qemu-json.ts";
import { formatImageInfoHuman, formatSnapshotRow, SNAPSHOT_TABLE_HEADER } from "../../src/cli/render-info.ts";
import { MAP_HUMAN_HEADER } from "../../src/cli/commands/map.ts";
import { formatMapJson } from "../../src/cli/engine.ts";
import { formatMeasureHuman } from "../../src/cli/commands/measure.ts";
import { formatHexdump, formatReport } from "../../src/cli/io/io-subcommands.ts";
import { parseSizeSpec } from "../../src/cli/commands/resize.ts";

function banner(format: string, options: string, extra: Array<{ name: string; value: string }> = []): string {
  return formatCreateBanner("o.qcow2", format, checkCreateOptions(format, [...parseOptionList(options), ...extra]).banner);
}

test("create banner: qemu-img's option order and defaults", () => {
  assert.equal(
    banner("qcow2", "", [{ name: "size", value: "1073741824" }]),
    "Formatting 'o.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16\n",
  );
  assert.equal(
    banner("qcow2", "cluster_size=4k", [
      { name: "size", value: "1073741824" },
      { name: "backing_file", value: "a.qcow2" },
      { name: "backing_fmt", value: "qcow2" },
    ]),
    "Formatting 'o.qcow2', fmt=qcow2 cluster_size=4096 extended_l2=off compression_type=zlib size=1073741824 backing_file=a.qcow2 backing_fmt=qcow2 lazy_refcounts=off refcount_bits=16\n",
  );
  assert.equal(
    banner("qcow2", "preallocation=metadata,nocow=on,extent_size_hint=2M,refcount_bits=8,lazy_refcounts=on,extended_l2=on,compression_type=zstd,cluster_size=32k,compat=1.1,data_file=o1.data,data_file_raw=on,size=1M"),
    "Formatting 'o.qcow2', fmt=qcow2 cluster_size=32768 extended_l2=on preallocation=metadata compression_type=zstd size=1048576 compat=1.1 data_file=o1.data data_file_raw=on lazy_refcounts=on refcount_bits=8 nocow=on extent_size_hint=2097152\n",
  );
  assert.equal(banner("qcow2", "compat=1.1,compat=0.10,size=1M"), "Formatting 'o.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 compat=0.10 lazy_refcounts=off refcount_bits=16\n");
  assert.equal(banner("raw", "preallocation=full,nocow=on,extent_size_hint=1M,size=1M"), "Formatting 'o.qcow2', fmt=raw size=1048576 nocow=on preallocation=full extent_size_hint=1048576\n");
  assert.equal(banner("raw", "size=1000"), "Formatting 'o.qcow2', fmt=raw size=1000\n");
});

test("-o lists: escapes, bare names, type errors, unknown names", () => {
  assert.deepEqual(parseOptionList("backing_file=a,,b.qcow2,lazy_refcounts"), [
    { name: "backing_file", value: "a,b.qcow2" },
    { name: "lazy_refcounts", value: "on" },
  ]);
  const expectCode = (fn: () => unknown, code: string, message: RegExp): void => {
    assert.throws(fn, (error: unknown) => error instanceof SnapstackError && error.code === code && message.test(error.message));
  };
  expectCode(() => checkCreateOptions("qcow2", parseOptionList("foo=bar")), "E_INVALID_OPTION", /^Invalid parameter 'foo'$/);
  expectCode(() => checkCreateOptions("qcow2", parseOptionList("lazy_refcounts=maybe")), "E_INVALID_OPTION", /expects 'on' or 'off'/);
  expectCode(() => checkCreateOptions("qcow2", parseOptionList("cluster_size=big")), "E_INVALID_OPTION", /cluster_size/);
  expectCode(() => checkCreateOptions("qcow2", parseOptionList("refcount_bits=x")), "E_INVALID_OPTION", /expects a number/);
  expectCode(() => checkCreateOptions("raw", parseOptionList("backing_file=a")), "E_INVALID_OPTION", /backing_file/);
  expectCode(() => checkCreateOptions("vmdk", []), "E_UNSUPPORTED_FEATURE", /reads vmdk images but does not write them/);
  expectCode(() => checkCreateOptions("qed", []), "E_UNKNOWN_FORMAT", /Unknown file format 'qed'/);
  const typed = checkCreateOptions("qcow2", parseOptionList("lazy_refcounts=yes,cluster_size=2M,refcount_bits=64")).typed;
  assert.deepEqual(typed, { lazy_refcounts: true, cluster_size: 2097152, refcount_bits: 64 });
});

test("qemu JSON: QDict print order and layout", () => {
  assert.deepEqual(orderLikeQdict(["filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size", "format-specific"]), [
    "virtual-size",
    "filename",
    "cluster-size",
    "format",
    "actual-size",
    "format-specific",
    "dirty-flag",
  ]);
  const info = {
    filename: "r.img",
    format: "raw",
    "dirty-flag": false,
    "actual-size": 4096,
    "virtual-size": 1024,
  };
  assert.equal(formatQemuJson(info), '{\n    "virtual-size": 1024,\n    "filename": "r.img",\n    "format": "raw",\n    "actual-size": 4096,\n    "dirty-flag": false\n}');
  assert.equal(formatQemuJson({ required: 393216, "fully-allocated": 1074135040 }), '{\n    "required": 393216,\n    "fully-allocated": 1074135040\n}');
  // qemu's json-writer ends every array and object on a line of its own, empty ones too (qemu-img info prints a bitmap without flags so).
  assert.equal(formatQemuJson([]), "[\n]");
  assert.equal(formatQemuJson({ flags: [], name: "b1" }), '{\n    "flags": [\n    ],\n    "name": "b1"\n}');
  assert.equal(formatQemuJson({ data: {} }), '{\n    "data": {\n    }\n}');
});

const QCOW2_INFO = {
  filename: "a.qcow2",
  format: "qcow2",
  "dirty-flag": false,
  "actual-size": 335872,
  "virtual-size": 1073741824,
  "cluster-size": 65536,
  "format-specific": {
    type: "qcow2",
    data: { compat: "1.1", "compression-type": "zlib", "lazy-refcounts": false, "refcount-bits": 16, corrupt: false, "extended-l2": false },
  },
};

test("info human output", () => {
  assert.equal(
    formatImageInfoHuman(QCOW2_INFO),
    [
      "image: a.qcow2",
      "file format: qcow2",
      "virtual size: 1 GiB (1073741824 bytes)",
      "disk size: 328 KiB",
      "cluster_size: 65536",
      "Format specific information:",
      "    compat: 1.1",
      "    compression type: zlib",
      "    lazy refcounts: false",
      "    refcount bits: 16",
      "    corrupt: false",
      "    extended l2: false",
      "",
    ].join("\n"),
  );
  const overlay = {
    ...QCOW2_INFO,
    filename: "sub/top.qcow2",
    "backing-filename": "base.qcow2",
    "full-backing-filename": "sub/base.qcow2",
    "backing-filename-format": "qcow2",
    "dirty-flag": true,
  };
  const text = formatImageInfoHuman(overlay);
  assert.match(text, /\ncluster_size: 65536\ncleanly shut down: no\nbacking file: base\.qcow2 \(actual path: sub\/base\.qcow2\)\nbacking file format: qcow2\n/);
  const bitmaps = formatImageInfoHuman({
    ...QCOW2_INFO,
    "format-specific": { type: "qcow2", data: { compat: "1.1", bitmaps: [{ flags: ["auto"], name: "b1", granularity: 65536 }] } },
  });
  assert.match(bitmaps, / {4}compat: 1\.1\n {4}bitmaps:\n {8}\[0\]:\n {12}flags:\n {16}\[0\]: auto\n {12}name: b1\n {12}granularity: 65536\n$/);
});

test("snapshot table", () => {
  assert.equal(SNAPSHOT_TABLE_HEADER, "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT");
  const row = formatSnapshotRow({ id: "1", name: "snap1", "vm-state-size": 0, "date-sec": 0, "date-nsec": 0, "vm-clock-sec": 3723, "vm-clock-nsec": 5000000, icount: 0 });
  assert.match(row, /^1 {9}snap1 {17}0 B \d{4}-\d\d-\d\d \d\d:\d\d:\d\d 01:02:03\.005 {10}0$/);
  assert.equal(row.length, SNAPSHOT_TABLE_HEADER.length);
});

test("map JSON and human header", () => {
  assert.equal(
    formatMapJson([
      { start: 0, length: 65536, depth: 0, present: true, zero: false, data: true, offset: 327680 },
      { start: 65536, length: 983040, depth: 0, present: false, zero: true, data: false },
    ]),
    '[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},\n{ "start": 65536, "length": 983040, "depth": 0, "present": false, "zero": true, "data": false}]\n',
  );
  assert.equal(MAP_HUMAN_HEADER, "Offset          Length          Mapped to       File\n");
});

test("measure human", () => {
  assert.equal(formatMeasureHuman({ required: 393216, "fully-allocated": 1074135040 }), "required size: 393216\nfully allocated size: 1074135040\n");
  assert.equal(formatMeasureHuman({ required: 1, "fully-allocated": 2, bitmaps: 0 }), "required size: 1\nfully allocated size: 2\nbitmaps size: 0\n");
});

test("qemu-io hexdump and report lines", () => {
  const data = new Uint8Array(40).fill(0xab);
  assert.equal(
    formatHexdump(data, 0),
    "00000000:  ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab  ................\n" +
      "00000010:  ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab  ................\n" +
      "00000020:  ab ab ab ab ab ab ab ab  ........\n",
  );
  assert.equal(formatHexdump(new TextEncoder().encode("Az09 -"), 0xfffa), "0000fffa:  41 7a 30 39 20 2d  Az09..\n");
  const report = formatReport("wrote", 0, 4096, 0.001).split("\n");
  assert.equal(report[0], "wrote 4096/4096 bytes at offset 0");
  assert.match(report[1], /^4 KiB, 1 ops; 00\.00 sec \([\d.]+ [KMG]iB\/sec and [\d.]+ ops\/sec\)$/);
  // qemu-io's timestr: from one second on, H:MM:SS.hh.
  assert.match(formatReport("wrote", 0, 1 << 30, 0.4567).split("\n")[1], /; 00\.46 sec \(/);
  assert.match(formatReport("wrote", 0, 1 << 30, 31.42).split("\n")[1], /; 0:00:31\.42 \(/);
  assert.match(formatReport("wrote", 0, 1 << 30, 3725.5).split("\n")[1], /; 1:02:05\.50 \(/);
  // The style follows the whole seconds; %05.2f rounds the rest (qemu-io's timestr).
  assert.match(formatReport("wrote", 0, 1 << 30, 0.996).split("\n")[1], /; 01\.00 sec \(/);
  assert.match(formatReport("wrote", 0, 1 << 30, 1.996).split("\n")[1], /; 0:00:02\.00 \(/);
});

test("resize size specs", () => {
  assert.deepEqual(parseSizeSpec("+1G"), { deltaBytes: 1073741824 });
  assert.deepEqual(parseSizeSpec("-512M"), { deltaBytes: -536870912 });
  assert.deepEqual(parseSizeSpec("2G"), { absoluteBytes: 2147483648 });
  assert.throws(() => parseSizeSpec("5x"), /Invalid image size/);
});
