/** Running VMs: the accelerator probe, QEMU's command line, QEMU processes. */
export { probeAccelerator, acceleratorChoice, runAcceleratorProbe, chooseAccelerator, resetAcceleratorProbe, ACCEL_PROBE_TIMEOUT_MS, QEMU_SYSTEM_BINARY, type Accelerator, type AcceleratorChoice } from "./accelerator.ts";
export { buildQemuArgs, validateLaunchSpec, escapeOptionValue, runFilePaths, RUN_FILES, type RunFilePaths, MEMORY_BYTES_MIN, MEMORY_BYTES_MAX, CPUS_MAX, DISKS_MAX, RECONNECT_DELAY_SECONDS_MAX, type QemuDiskSpec, type QemuLaunchSpec } from "./qemu-args.ts";
export { QemuProcess, liveSaveSupported, QEMU_START_TIMEOUT_MS, STATE_TRANSFER_TIMEOUT_MS, QUIT_TIMEOUT_MS, type QemuExit, type SaveStateOptions, type SaveStateResult } from "./qemu-process.ts";
