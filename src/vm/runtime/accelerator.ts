/**
 * Which accelerator QEMU should use: KVM when it really runs guest code
 * faster than TCG, TCG otherwise.
 *
 * Design notes
 * - /dev/kvm existing (even opening) proves little: under nested
 *   virtualization KVM can create a VM and then crawl once the guest runs
 *   real code. Measured on this project's CI VM (QEMU 7.2, 2 vCPUs): a
 *   Linux guest under KVM prints nothing in 20 s (-cpu default, host, max,
 *   host,-kvmclock, -smp 2 alike; QMP `info registers` shows it spending
 *   4-5 s in the linuxboot ROM and then creeping through the kernel's
 *   decompressor), while TCG boots it in 3-5 s.
 * - So the probe runs real guest code under both accelerators and compares:
 *   a q35 machine with no disks boots SeaBIOS, which logs to the debug
 *   console (I/O port 0x402) and ends with "No bootable device". TCG runs
 *   first (about 0.1-0.4 s); KVM counts only if it gets there no slower
 *   than TCG did (about 0.1 s on working KVM; 1.5-8 s on the crawling host,
 *   which an absolute 2 s limit let through now and then: the "passes the
 *   probe, then hangs the guest" bug). A KVM slower than TCG on SeaBIOS is
 *   not worth using even if it would not hang.
 * - The answer is cached per process (a promise, so concurrent callers
 *   share one probe), with its reason for the daemon's log.
 *   SNAPSTACK_ACCEL=kvm|tcg overrides without probing.
 */
import { spawn } from "node:child_process";
import { accessSync, constants } from "node:fs";
import { SnapstackError } from "../../base/errors.ts";

export type Accelerator = "kvm" | "tcg";

export interface AcceleratorChoice {
  accelerator: Accelerator;
  /** One line for the log: why this accelerator. */
  reason: string;
}

/** Bound for each probe run (TCG's, then KVM's at most TCG's time). */
export const ACCEL_PROBE_TIMEOUT_MS = 10_000;
/** What SeaBIOS prints on the debug console once POST ran to its end. */
const PROBE_DONE = /No bootable device|Booting from/;
export const QEMU_SYSTEM_BINARY = "qemu-system-x86_64";
/** KVM may take this long even when TCG was faster (timer granularity, process start). */
const KVM_SLACK_MS = 50;

let cached: Promise<AcceleratorChoice> | null = null;

/** The accelerator to use (probed once per process; SNAPSTACK_ACCEL overrides). */
export async function probeAccelerator(): Promise<Accelerator> {
  return (await acceleratorChoice()).accelerator;
}

/** probeAccelerator with its reason. */
export function acceleratorChoice(): Promise<AcceleratorChoice> {
  const forced = process.env.SNAPSTACK_ACCEL;
  if (forced !== undefined && forced !== "") {
    if (forced !== "kvm" && forced !== "tcg") {
      return Promise.reject(new SnapstackError("E_INVALID_OPTION", `SNAPSTACK_ACCEL='${forced}' must be kvm or tcg`));
    }
    return Promise.resolve({ accelerator: forced, reason: `SNAPSTACK_ACCEL=${forced}` });
  }
  cached ??= runAcceleratorProbe();
  return cached;
}

/** Forget the cached answer (tests). */
export function resetAcceleratorProbe(): void {
  cached = null;
}

/** Time SeaBIOS to its end under each accelerator and choose (uncached). */
export async function runAcceleratorProbe(options: { timeoutMs?: number } = {}): Promise<AcceleratorChoice> {
  try {
    accessSync("/dev/kvm", constants.R_OK | constants.W_OK);
  } catch {
    return { accelerator: "tcg", reason: "/dev/kvm is not usable" };
  }
  const timeoutMs = options.timeoutMs ?? ACCEL_PROBE_TIMEOUT_MS;
  const tcgMs = await timeFirmware("tcg", timeoutMs);
  const kvmMs = await timeFirmware("kvm", tcgMs === null ? timeoutMs : Math.min(timeoutMs, tcgMs + KVM_SLACK_MS));
  return chooseAccelerator(kvmMs, tcgMs);
}

/** The decision (pure): times to the end of SeaBIOS, null when it did not get there in time. */
export function chooseAccelerator(kvmMs: number | null, tcgMs: number | null): AcceleratorChoice {
  const shown = (ms: number | null): string => (ms === null ? "did not finish" : `${ms.toFixed(0)} ms`);
  const times = `firmware probe: kvm ${shown(kvmMs)}, tcg ${shown(tcgMs)}`;
  if (kvmMs === null && tcgMs === null) return { accelerator: "tcg", reason: `the firmware probe did not finish, using TCG (${times})` };
  if (kvmMs === null || (tcgMs !== null && kvmMs > tcgMs + KVM_SLACK_MS)) return { accelerator: "tcg", reason: `KVM runs guest code slower than TCG, using TCG (${times})` };
  return { accelerator: "kvm", reason: `using KVM (${times})` };
}

/** Milliseconds from spawning QEMU to SeaBIOS's last line, or null (timeout, QEMU missing or failing). */
function timeFirmware(accelerator: Accelerator, timeoutMs: number): Promise<number | null> {
  return new Promise((resolve) => {
    const args = [
      "-accel", accelerator, "-machine", "q35", "-m", "16", "-nodefaults", "-display", "none", "-no-reboot",
      "-chardev", "stdio,id=dbg,signal=off", "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
    ];
    const startedAt = performance.now();
    let child;
    try {
      child = spawn(QEMU_SYSTEM_BINARY, args, { stdio: ["ignore", "pipe", "ignore"] });
    } catch {
      resolve(null);
      return;
    }
    let output = "";
    let settled = false;
    const finish = (done: boolean): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.kill("SIGKILL");
      resolve(done ? performance.now() - startedAt : null);
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
