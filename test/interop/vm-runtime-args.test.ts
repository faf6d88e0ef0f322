/**
 * The QEMU command line built from a launch spec (pure), the spec's
 * validation at the edge, and the accelerator override. The interop test
 * vm-runtime.test.ts shows that QEMU accepts these arguments.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { buildQemuArgs, validateLaunchSpec, runFilePaths, type QemuLaunchSpec } from "../../src/vm/runtime/qemu-args.ts";
import { chooseAccelerator, probeAccelerator, runAcceleratorProbe } from "../../src/vm/runtime/accelerator.ts";
import { requireTools } from "../helpers/tools.ts";

const MiB = 1024 * 1024;

const BASE: QemuLaunchSpec = {
  name: "web",
  memoryBytes: 256 * MiB,
  cpus: 2,
  disks: [
    { nbdSocketPath: "/run/snapstack/web/nbd.sock", exportName: "disk0" },
    { nbdSocketPath: "/run/snapstack/web/nbd.sock", exportName: "data", readOnly: true, reconnectDelaySeconds: 30 },
  ],
  kernelPath: "/boot/vmlinuz",
  initrdPath: "/boot/initrd.gz",
  append: "console=ttyS0 quiet",
  runDir: "/run/snapstack/web",
  serialLogPath: "/var/lib/snapstack/web,1/serial.log",
};

/** The value following `option` (first occurrence, or the nth). */
function valueOf(args: string[], option: string, nth = 0): string | undefined {
  const indexes = args.flatMap((arg, index) => (arg === option ? [index] : []));
  const index = indexes[nth];
  return index === undefined ? undefined : args[index + 1];
}

test("buildQemuArgs: no defaults, q35 with the accelerator, memory and CPUs, QMP and serial sockets in runDir", () => {
  const args = buildQemuArgs(BASE, "tcg");
  const files = runFilePaths(BASE.runDir);
  assert.ok(args.includes("-nodefaults") && args.includes("-no-user-config"));
  assert.equal(valueOf(args, "-display"), "none");
  assert.equal(valueOf(args, "-machine"), "q35,accel=tcg");
  assert.equal(valueOf(args, "-cpu"), "max");
  assert.equal(valueOf(buildQemuArgs(BASE, "kvm"), "-cpu"), "host");
  assert.equal(valueOf(buildQemuArgs({ ...BASE, cpuModel: "qemu64" }, "tcg"), "-cpu"), "qemu64");
  assert.equal(valueOf(args, "-m"), "256M");
  assert.equal(valueOf(args, "-smp"), "2");
  assert.equal(valueOf(args, "-pidfile"), files.pidFile);
  assert.equal(valueOf(args, "-chardev", 0), `socket,id=qmp,path=${files.qmpSocket},server=on,wait=off`);
  assert.equal(valueOf(args, "-mon"), "chardev=qmp,mode=control");
  // Commas inside an option value are doubled.
  assert.equal(valueOf(args, "-chardev", 1), `socket,id=serial0,path=${files.serialSocket},server=on,wait=off,logfile=/var/lib/snapstack/web,,1/serial.log,logappend=on`);
  assert.equal(valueOf(args, "-serial"), "chardev:serial0");
  assert.equal(valueOf(args, "-kernel"), "/boot/vmlinuz");
  assert.equal(valueOf(args, "-initrd"), "/boot/initrd.gz");
  assert.equal(valueOf(args, "-append"), "console=ttyS0 quiet");
  assert.equal(args.includes("-incoming"), false);
  assert.equal(args.includes("-S"), false);
});

test("buildQemuArgs: each disk an nbd blockdev on the Unix socket under virtio-blk with a write cache, writable ones passing discards; the first disk boots", () => {
  const args = buildQemuArgs(BASE, "tcg");
  assert.deepEqual(JSON.parse(valueOf(args, "-blockdev", 0)!), {
    "driver": "nbd",
    "node-name": "disk0",
    "server": { type: "unix", path: "/run/snapstack/web/nbd.sock" },
    "export": "disk0",
    "read-only": false,
    "discard": "unmap",
  });
  assert.deepEqual(JSON.parse(valueOf(args, "-blockdev", 1)!), {
    "driver": "nbd",
    "node-name": "disk1",
    "server": { type: "unix", path: "/run/snapstack/web/nbd.sock" },
    "export": "data",
    "read-only": true,
    "reconnect-delay": 30,
  });
  assert.equal(valueOf(args, "-device", 0), "virtio-blk-pci,drive=disk0,id=disk0-device,write-cache=on,bootindex=1");
  assert.equal(valueOf(args, "-device", 1), "virtio-blk-pci,drive=disk1,id=disk1-device,write-cache=on");
});

test("buildQemuArgs: CD-ROM after the disk by default, first with bootFrom cdrom; user network; incoming state; extra arguments last", () => {
  const withCd = buildQemuArgs({ ...BASE, kernelPath: undefined, initrdPath: undefined, append: undefined, cdromPath: "/iso/debian.iso" }, "tcg");
  assert.match(valueOf(withCd, "-device", 2)!, /^ide-cd,drive=cdrom0,bus=ide\.0,id=cdrom0-device,bootindex=2$/);
  assert.equal(JSON.parse(valueOf(withCd, "-blockdev", 2)!).filename, "/iso/debian.iso");
  const cdFirst = buildQemuArgs({ ...BASE, cdromPath: "/iso/debian.iso", bootFrom: "cdrom" }, "tcg");
  assert.match(valueOf(cdFirst, "-device", 0)!, /bootindex=2$/);
  assert.match(valueOf(cdFirst, "-device", 2)!, /bootindex=1$/);
  assert.equal(valueOf(buildQemuArgs({ ...BASE, network: "user" }, "tcg"), "-nic"), "user,model=virtio-net-pci");
  const incoming = buildQemuArgs({ ...BASE, incomingStatePath: "/state", extraArgs: ["-device", "virtio-rng-pci"] }, "tcg");
  assert.equal(valueOf(incoming, "-incoming"), "defer");
  assert.ok(incoming.includes("-S"));
  assert.deepEqual(incoming.slice(-2), ["-device", "virtio-rng-pci"]);
});

test("validateLaunchSpec: bad values are E_INVALID_OPTION naming the field", () => {
  validateLaunchSpec(BASE);
  const cases: Array<[Partial<QemuLaunchSpec>, string, RegExp]> = [
    [{ memoryBytes: 256 * MiB + 1 }, "memoryBytes", /whole number of MiB/],
    [{ memoryBytes: 8 * MiB }, "memoryBytes", /between 16 MiB/],
    [{ cpus: 0 }, "cpus", /between 1 and 255/],
    [{ cpus: 1.5 }, "cpus", /CPU count/],
    [{ name: "" }, "name", /name/],
    [{ name: "a\nb" }, "name", /single line/],
    [{ kernelPath: undefined }, "initrdPath", /initrd needs a kernel/],
    [{ append: "console=ttyS0\n-device evil" }, "append", /line breaks/],
    [{ runDir: `/tmp/${"d".repeat(100)}` }, "runDir", /107-byte/],
    [{ disks: [{ nbdSocketPath: `/tmp/${"s".repeat(110)}.sock`, exportName: "x" }] }, "disks", /Unix socket limit/],
    [{ disks: [{ nbdSocketPath: "/n.sock", exportName: "x", reconnectDelaySeconds: -1 }] }, "disks", /reconnect delay/],
    [{ disks: Array.from({ length: 17 }, () => ({ nbdSocketPath: "/n.sock", exportName: "x" })) }, "disks", /limit of 16/],
    [{ cpuModel: " " }, "cpuModel", /CPU model/],
  ];
  for (const [change, field, message] of cases) {
    assert.throws(() => validateLaunchSpec({ ...BASE, ...change }), (error: Error & { code?: string; details?: Record<string, unknown> }) => {
      assert.equal(error.code, "E_INVALID_OPTION", JSON.stringify(change));
      assert.equal(error.details?.field, field, JSON.stringify(change));
      assert.match(error.message, message);
      assert.match(error.message, /^VM '/);
      return true;
    });
  }
});

test("SNAPSTACK_ACCEL overrides the probe; anything but kvm or tcg is E_INVALID_OPTION", async (t) => {
  const saved = process.env.SNAPSTACK_ACCEL;
  t.after(() => {
    if (saved === undefined) delete process.env.SNAPSTACK_ACCEL;
    else process.env.SNAPSTACK_ACCEL = saved;
  });
  process.env.SNAPSTACK_ACCEL = "tcg";
  assert.equal(await probeAccelerator(), "tcg");
  process.env.SNAPSTACK_ACCEL = "kvm";
  assert.equal(await probeAccelerator(), "kvm");
  process.env.SNAPSTACK_ACCEL = "hvf";
  await assert.rejects(probeAccelerator(), { code: "E_INVALID_OPTION", message: /SNAPSTACK_ACCEL='hvf'/ });
});

test("accelerator choice: KVM only when it runs the firmware no slower than TCG", () => {
  assert.equal(chooseAccelerator(90, 300).accelerator, "kvm");
  assert.equal(chooseAccelerator(320, 300).accelerator, "kvm"); // within the slack
  // The crawling nested KVM of the CI VM: SeaBIOS in 1.5-8 s where TCG needs 0.1-0.8 s.
  const slow = chooseAccelerator(1_500, 300);
  assert.equal(slow.accelerator, "tcg");
  assert.match(slow.reason, /KVM runs guest code slower than TCG.*kvm 1500 ms, tcg 300 ms/);
  assert.equal(chooseAccelerator(null, 300).accelerator, "tcg");
  assert.equal(chooseAccelerator(90, null).accelerator, "kvm");
  assert.match(chooseAccelerator(null, null).reason, /did not finish/);
});

test("accelerator probe on this host: the choice agrees with the times it measured", { timeout: 60_000 }, async (t) => {
  if (!requireTools(t, "qemu-system-x86_64")) return;
  const choice = await runAcceleratorProbe();
  t.diagnostic(choice.reason);
  const times = /kvm (\d+) ms, tcg (\d+) ms/.exec(choice.reason);
  if (choice.accelerator === "kvm") {
    assert.ok(times !== null, choice.reason);
    assert.ok(Number(times[1]) <= Number(times[2]) + 50, choice.reason);
  } else {
    assert.match(choice.reason, /\/dev\/kvm is not usable|slower than TCG|did not finish/);
  }
});
