/**
 * Which accelerator QEMU should use: KVM when it really runs guest code,
 * TCG otherwise.
 *
 * Design notes
 * - /dev/kvm existing (even opening) proves little: under nested
 *   virtualization KVM can create a VM and then crawl or hang once the guest
 *   leaves real mode (seen on Firecracker hosts: SeaBIOS takes 5 s, a Linux
 *   kernel prints nothing in 40 s). So the probe runs real guest code: a
 *   q35 machine with no disks boots SeaBIOS, which logs to the debug console
 *   (I/O port 0x402) and ends with "No bootable device". KVM counts only if
 *   that line arrives within the timeout (about 0.1 s on working KVM; TCG
 *   needs about 0.4 s).
 * - The answer is cached per process (a promise, so concurrent callers share
 *   one probe). SNAPSTACK_ACCEL=kvm|tcg overrides without probing.
 */
import { spawn } from "node:child_process";
import { accessSync, constants } from "node:fs";
import { SnapstackError } from "../../base/errors.ts";

export type Accelerator = "kvm" | "tcg";

/** How long SeaBIOS may take under KVM before KVM is declared unusable. */
export const ACCEL_PROBE_TIMEOUT_MS = 2_000;
/** What SeaBIOS prints on the debug console once POST ran to its end. */
const PROBE_DONE = /No bootable device|Booting from/;
export const QEMU_SYSTEM_BINARY = "qemu-system-x86_64";

let cached: Promise<Accelerator> | null = null;

export function probeAccelerator(options: { timeoutMs?: number } = {}): Promise<Accelerator> {
  const forced = process.env.SNAPSTACK_ACCEL;
  if (forced !== undefined && forced !== "") {
    if (forced !== "kvm" && forced !== "tcg") {
      return Promise.reject(new SnapstackError("E_INVALID_OPTION", `SNAPSTACK_ACCEL='${forced}' must be kvm or tcg`));
    }
    return Promise.resolve(forced);
  }
  cached ??= runProbe(options.timeoutMs ?? ACCEL_PROBE_TIMEOUT_MS);
  return cached;
}

/** Forget the cached answer (tests). */
export function resetAcceleratorProbe(): void {
  cached = null;
}

async function runProbe(timeoutMs: number): Promise<Accelerator> {
  try {
    accessSync("/dev/kvm", constants.R_OK | constants.W_OK);
  } catch {
    return "tcg";
  }
  return (await kvmRunsGuestCode(timeoutMs)) ? "kvm" : "tcg";
}

function kvmRunsGuestCode(timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const args = [
      "-accel", "kvm", "-machine", "q35", "-m", "16", "-nodefaults", "-display", "none", "-no-reboot",
      "-chardev", "stdio,id=dbg,signal=off", "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
    ];
    let child;
    try {
      child = spawn(QEMU_SYSTEM_BINARY, args, { stdio: ["ignore", "pipe", "ignore"] });
    } catch {
      resolve(false);
      return;
    }
    let output = "";
    let settled = false;
    const finish = (answer: boolean): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.kill("SIGKILL");
      resolve(answer);
    };
    const timer = setTimeout(() => finish(false), timeoutMs);
    child.stdout.setEncoding("latin1");
    child.stdout.on("data", (chunk: string) => {
      output = (output + chunk).slice(-4096);
      if (PROBE_DONE.test(output)) finish(true);
    });
    child.on("error", () => finish(false));
    child.on("exit", () => finish(PROBE_DONE.test(output)));
  });
}
