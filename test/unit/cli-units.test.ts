import { test } from "node:test";
import assert from "node:assert/strict";
import { formatG3, formatIoSize, formatSize, parseSize } from "../../src/base/units.ts";
import { SnapstackError } from "../../src/base/errors.ts";

// Expected values were produced by qemu-img 7.2 (`qemu-img create -f raw t SIZE` banners).
const GOOD: Array<[string, number]> = [
  ["0", 0],
  ["512", 512],
  ["1000", 1000],
  ["1b", 1],
  ["1B", 1],
  ["1k", 1024],
  ["1K", 1024],
  ["1m", 1048576],
  ["1M", 1048576],
  ["1g", 1073741824],
  ["1G", 1073741824],
  ["5t", 5497558138880],
  ["1T", 2 ** 40],
  ["1p", 1125899906842624],
  ["1P", 2 ** 50],
  ["1.5k", 1536],
  ["1.k", 1024],
  ["1.", 1],
  ["0.5G", 536870912],
  ["1.5G", 1610612736],
  ["0.5k", 512],
  ["0.0009765625k", 1],
  ["1.0000000001k", 1024],
  ["1.9999999999999999k", 2048],
  ["010k", 10240],
  ["010", 10],
  ["09", 9],
  ["0001k", 1024],
  ["0x10", 16],
  ["0X10", 16],
  ["0x10k", 16384],
  [" +0x10k", 16384],
  [" 5", 5],
  ["+5", 5],
];

const BAD = [".5k", "1e3", "1kb", "1.5", "1.5b", "0.5", "0.5b", "", "1.5.5", "1 k", "1.5e3k", "1.0e0k", "0x1.8k", "0x", "00x1", "1k ", "-0", "-5", "5x", "k", "abc"];

test("parseSize accepts what qemu-img accepts, with the same value", () => {
  for (const [text, expected] of GOOD) {
    assert.equal(parseSize(text), expected, `parseSize(${JSON.stringify(text)})`);
  }
});

test("parseSize refuses what qemu-img refuses, with E_INVALID_SIZE and qemu's message", () => {
  for (const text of BAD) {
    assert.throws(
      () => parseSize(text, { what: "image size" }),
      (error: unknown) =>
        error instanceof SnapstackError &&
        error.code === "E_INVALID_SIZE" &&
        error.message.startsWith("Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes"),
      `parseSize(${JSON.stringify(text)})`,
    );
  }
});

test("parseSize range: qemu's INT64_MAX limit, then snapstack's 2^53 limit", () => {
  for (const text of ["8E", "18446744073709551615", "18446744073709551616", "0x8000000000000000", "99999999999999999999999"]) {
    assert.throws(
      () => parseSize(text, { what: "image size" }),
      (error: unknown) =>
        error instanceof SnapstackError &&
        error.code === "E_INVALID_SIZE" &&
        error.message === "Invalid image size specified. Must be between 0 and 9223372036854775807.",
      text,
    );
  }
  for (const text of ["7.99999E", "2e", "1.e", "9P", String(2 ** 53 + 2)]) {
    assert.throws(
      () => parseSize(text),
      (error: unknown) => error instanceof SnapstackError && error.code === "E_TOO_LARGE",
      text,
    );
  }
  assert.equal(parseSize(String(Number.MAX_SAFE_INTEGER)), Number.MAX_SAFE_INTEGER);
  assert.equal(parseSize("7P"), 7 * 2 ** 50);
  assert.throws(() => parseSize("100", { minBytes: 512, what: "length" }), /Must be between 512 and/);
});

test("formatSize matches qemu-img's size_to_str", () => {
  const cases: Array<[number, string]> = [
    [0, "0 B"],
    [1, "1 B"],
    [512, "512 B"],
    [999, "999 B"],
    [1000, "0.977 KiB"],
    [1024, "1 KiB"],
    [4096, "4 KiB"],
    [196608, "192 KiB"],
    [335872, "328 KiB"],
    [4.5 * 2 ** 20, "4.5 MiB"],
    [1048576, "1 MiB"],
    [1073741824, "1 GiB"],
    [1610612736, "1.5 GiB"],
    [2 ** 40, "1 TiB"],
    [2 ** 50 * 3, "3 PiB"],
    [123456789, "118 MiB"],
    // Exact ties round to even, as glibc's printf (qemu-img info of a 197120-byte raw file: 192 KiB).
    [197120, "192 KiB"],
    [1179648, "1.12 MiB"],
    [1184768, "1.13 MiB"],
    [199168, "194 KiB"],
  ];
  for (const [value, expected] of cases) assert.equal(formatSize(value), expected, String(value));
});

test("formatG3 is C's %0.3g", () => {
  assert.equal(formatG3(0), "0");
  assert.equal(formatG3(1.5), "1.5");
  assert.equal(formatG3(999.6), "1e+03");
  assert.equal(formatG3(0.9765625), "0.977");
  assert.equal(formatG3(117.73756885528564), "118");
  assert.equal(formatG3(192.5), "192");
  assert.equal(formatG3(193.5), "194");
  assert.equal(formatG3(1.125), "1.12");
  assert.equal(formatG3(99.95), "100");
  assert.equal(formatG3(9.995), "9.99", "9.995 is below the tie in binary");
  assert.equal(formatG3(0.0001234), "0.000123");
  assert.equal(formatG3(0.00001234), "1.23e-05");
  assert.equal(formatG3(1234), "1.23e+03");
  // Rounding that reaches the next power of ten changes the style; ties in %e style go to even too.
  assert.equal(formatG3(0.00009996), "0.0001");
  assert.equal(formatG3(1005), "1e+03");
  assert.equal(formatG3(1025), "1.02e+03");
  assert.equal(formatG3(1035), "1.04e+03");
  assert.equal(formatG3(999.5), "1e+03");
  assert.equal(formatG3(0.5), "0.5");
  assert.equal(formatG3(123), "123");
  assert.equal(formatG3(12.5), "12.5");
  assert.equal(formatG3(2 ** 70), "1.18e+21");
});

test("formatIoSize matches qemu-io's cvtstr", () => {
  const cases: Array<[number, string]> = [
    [0, "0 bytes"],
    [3, "3 bytes"],
    [40, "40 bytes"],
    [1536, "1.500 KiB"],
    [4096, "4 KiB"],
    [65536, "64 KiB"],
    [1114112, "1.062 MiB"],
    [1071579136, "1021.938 MiB"],
    [1073741824, "1 GiB"],
  ];
  for (const [value, expected] of cases) assert.equal(formatIoSize(value), expected, String(value));
});

test("formatFixed is C's %.Nf (ties to even on exact binary values)", async () => {
  const { formatFixed } = await import("../../src/base/units.ts");
  const cases: Array<[number, number, string]> = [
    [1.0625, 3, "1.062"],
    [1.0635, 3, "1.063"],
    [0.5, 0, "0"],
    [1.5, 0, "2"],
    [2.5, 0, "2"],
    [99.5, 0, "100"],
    [9.9996, 3, "10.000"],
    [0, 6, "0.000000"],
    [1021.9375, 3, "1021.938"],
  ];
  for (const [value, digits, expected] of cases) assert.equal(formatFixed(value, digits), expected, `${value} ${digits}`);
});
