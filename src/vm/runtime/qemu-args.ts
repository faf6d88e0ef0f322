/**
 * The QEMU command line for a launch spec: pure, so tests can read it and
 * the daemon can show it.
 *
 * Design notes
 * - `-nodefaults -no-user-config`: nothing the spec does not ask for (no
 *   default NIC, VGA, floppy, CD drive, user config files), so the device
 *   set, and with it the migration stream, depends only on the spec. A saved
 *   state loads only into a QEMU started from the same spec (and binary).
 * - Disks: each is a `-blockdev` of the nbd driver on a Unix socket (the
 *   export served by snapstack) under a virtio-blk-pci device with
 *   write-cache=on: the guest sees a volatile write cache and sends FLUSH,
 *   which reaches snapstack as NBD_CMD_FLUSH. QEMU itself caches nothing for
 *   NBD, so a flushed guest write is a flushed snapstack write. With
 *   discard=unmap the guest's discards reach snapstack as TRIM (virtio-blk
 *   offers discard by default), and the layer's freed clusters get holes.
 * - Serial: one Unix socket chardev (server, wait=off) with `logfile=`:
 *   everything the guest prints is appended to the log file whether or not
 *   anyone is connected; a client connected to the socket can also type.
 * - QMP on its own socket in runDir. Unix socket paths are limited to 107
 *   bytes (sun_path), so runDir must be short (e.g. under $XDG_RUNTIME_DIR
 *   or /tmp): validateLaunchSpec checks every socket path.
 * - Saved state: `-incoming defer` and `-S`; the process then loads it
 *   through migrate-incoming (see QemuProcess).
 */
import { join } from "node:path";
import { SnapstackError } from "../../base/errors.ts";
import { SUN_PATH_BYTES_MAX } from "../../io/user-socket-dir.ts";
import type { Accelerator } from "./accelerator.ts";

export interface QemuDiskSpec {
  /** Unix socket of the NBD server serving this disk. */
  nbdSocketPath: string;
  exportName: string;
  readOnly?: boolean;
  /**
   * When the NBD connection drops (the daemon restarts), QEMU reconnects;
   * for this many seconds guest requests wait for it instead of failing.
   * Default 0: they fail at once (the guest sees I/O errors).
   */
  reconnectDelaySeconds?: number;
}

export interface QemuLaunchSpec {
  name: string;
  memoryBytes: number;
  cpus: number;
  disks: QemuDiskSpec[];
  kernelPath?: string;
  initrdPath?: string;
  append?: string;
  cdromPath?: string;
  /** Boot from the first disk (default; CD-ROM as fallback) or the CD-ROM first. */
  bootFrom?: "disk" | "cdrom";
  /** "user": a virtio NIC on QEMU's user-mode network (NAT). Default none. */
  network?: "none" | "user";
  extraArgs?: string[];
  /** QMP socket, serial socket, pid file, QEMU's stderr and migration sockets go here. */
  runDir: string;
  /** The guest's serial output is appended here. */
  serialLogPath: string;
  /** Start paused, loading the VM state saved in this file (QemuProcess.saveState). */
  incomingStatePath?: string;
  /** QEMU's -cpu value; default "host" under KVM, "max" under TCG. Saved states need the same model. */
  cpuModel?: string;
  /** Default: probeAccelerator(). A state saved under one accelerator is restored under the same. */
  accelerator?: Accelerator;
}

/** File names inside runDir. */
export const RUN_FILES = {
  qmpSocket: "qmp.sock",
  serialSocket: "serial.sock",
  pidFile: "qemu.pid",
  stderrLog: "qemu.stderr",
  incomingSocket: "incoming.sock",
  outgoingSocket: "outgoing.sock",
} as const;

/** Limits QEMU enforces or that keep a launch sane; checked before spawning. */
export const MEMORY_BYTES_MIN = 16 * 1024 * 1024;
export const MEMORY_BYTES_MAX = 1024 * 1024 * 1024 * 1024;
export const CPUS_MAX = 255;
/** virtio-blk-pci devices on q35's root bus: one PCI slot each, leaving room for the rest. */
export const DISKS_MAX = 16;
/** Longest a guest request may wait for the NBD connection to come back. */
export const RECONNECT_DELAY_SECONDS_MAX = 3600;
const MiB = 1024 * 1024;
/** NUL or newline in a value would cut a QEMU option or a QMP line. */
const BAD_CHARACTERS = /[\0\n\r]/;

/** Validate the spec at the edge: coded errors naming the field. */
export function validateLaunchSpec(spec: QemuLaunchSpec): void {
  const bad = (message: string, field: string): SnapstackError => new SnapstackError("E_INVALID_OPTION", `VM '${spec.name}': ${message}`, { field });
  if (typeof spec.name !== "string" || spec.name === "" || BAD_CHARACTERS.test(spec.name)) throw bad("name must be a non-empty single line", "name");
  if (!Number.isSafeInteger(spec.memoryBytes) || spec.memoryBytes % MiB !== 0 || spec.memoryBytes < MEMORY_BYTES_MIN || spec.memoryBytes > MEMORY_BYTES_MAX) {
    throw bad(`memory ${spec.memoryBytes} bytes must be a whole number of MiB between ${MEMORY_BYTES_MIN / MiB} MiB and ${MEMORY_BYTES_MAX / MiB} MiB`, "memoryBytes");
  }
  if (!Number.isSafeInteger(spec.cpus) || spec.cpus < 1 || spec.cpus > CPUS_MAX) throw bad(`CPU count ${spec.cpus} must be between 1 and ${CPUS_MAX}`, "cpus");
  if (spec.disks.length > DISKS_MAX) throw bad(`${spec.disks.length} disks exceed the limit of ${DISKS_MAX}`, "disks");
  for (const disk of spec.disks) {
    if (BAD_CHARACTERS.test(disk.nbdSocketPath) || disk.nbdSocketPath === "") throw bad(`NBD socket path '${disk.nbdSocketPath}' is invalid`, "disks");
    const delay = disk.reconnectDelaySeconds ?? 0;
    if (!Number.isSafeInteger(delay) || delay < 0 || delay > RECONNECT_DELAY_SECONDS_MAX) throw bad(`NBD reconnect delay ${delay} s must be a whole number from 0 to ${RECONNECT_DELAY_SECONDS_MAX}`, "disks");
    if (Buffer.byteLength(disk.nbdSocketPath) > SUN_PATH_BYTES_MAX) {
      throw bad(`NBD socket path ${disk.nbdSocketPath} is longer than ${SUN_PATH_BYTES_MAX} bytes (the Unix socket limit)`, "disks");
    }
  }
  for (const path of Object.values(runFilePaths(spec.runDir))) {
    if (Buffer.byteLength(path) > SUN_PATH_BYTES_MAX) {
      throw bad(`run directory ${spec.runDir} is too long: ${path} exceeds the ${SUN_PATH_BYTES_MAX}-byte Unix socket path limit`, "runDir");
    }
  }
  if (spec.initrdPath !== undefined && spec.kernelPath === undefined) throw bad("an initrd needs a kernel", "initrdPath");
  if (spec.append !== undefined && spec.kernelPath === undefined) throw bad("a kernel command line needs a kernel", "append");
  for (const [field, value] of [["kernelPath", spec.kernelPath], ["initrdPath", spec.initrdPath], ["append", spec.append], ["cdromPath", spec.cdromPath], ["runDir", spec.runDir], ["serialLogPath", spec.serialLogPath], ["incomingStatePath", spec.incomingStatePath], ["cpuModel", spec.cpuModel]] as const) {
    if (value !== undefined && BAD_CHARACTERS.test(value)) throw bad(`${field} must not contain NUL or line breaks`, field);
  }
  if (spec.cpuModel !== undefined && spec.cpuModel.trim() === "") throw bad("CPU model must not be empty", "cpuModel");
  if (spec.accelerator !== undefined && spec.accelerator !== "kvm" && spec.accelerator !== "tcg") throw bad(`accelerator '${String(spec.accelerator)}' must be kvm or tcg`, "accelerator");
}


/** QEMU's -opt key=value,... syntax doubles commas inside values. */
export function escapeOptionValue(value: string): string {
  return value.replaceAll(",", ",,");
}

/** Paths of the files QEMU and snapstack share in runDir. */
export type RunFilePaths = { -readonly [K in keyof typeof RUN_FILES]: string };

export function runFilePaths(runDir: string): RunFilePaths {
  const paths = {} as RunFilePaths;
  for (const [key, name] of Object.entries(RUN_FILES)) paths[key as keyof RunFilePaths] = join(runDir, name);
  return paths;
}

/** The arguments after the binary name. Paths in the spec should be absolute. */
export function buildQemuArgs(spec: QemuLaunchSpec, accelerator: Accelerator): string[] {
  const files = runFilePaths(spec.runDir);
  const args = [
    "-name", escapeOptionValue(spec.name),
    "-nodefaults", "-no-user-config", "-display", "none",
    "-machine", `q35,accel=${accelerator}`,
    "-cpu", spec.cpuModel ?? (accelerator === "kvm" ? "host" : "max"),
    "-m", `${spec.memoryBytes / MiB}M`,
    "-smp", String(spec.cpus),
    "-pidfile", files.pidFile,
    "-chardev", `socket,id=qmp,path=${escapeOptionValue(files.qmpSocket)},server=on,wait=off`,
    "-mon", "chardev=qmp,mode=control",
    "-chardev", `socket,id=serial0,path=${escapeOptionValue(files.serialSocket)},server=on,wait=off,logfile=${escapeOptionValue(spec.serialLogPath)},logappend=on`,
    "-serial", "chardev:serial0",
  ];
  const cdromFirst = spec.bootFrom === "cdrom";
  spec.disks.forEach((disk, index) => {
    const node = `disk${index}`;
    const blockdev = {
      "driver": "nbd",
      "node-name": node,
      "server": { type: "unix", path: disk.nbdSocketPath },
      "export": disk.exportName,
      "read-only": disk.readOnly ?? false,
      // Guest discards (fstrim, blkdiscard) reach the export as TRIM, which frees the layer's clusters.
      ...(disk.readOnly === true ? {} : { "discard": "unmap" }),
      ...(disk.reconnectDelaySeconds ? { "reconnect-delay": disk.reconnectDelaySeconds } : {}),
    };
    args.push("-blockdev", JSON.stringify(blockdev));
    const bootIndex = index === 0 ? `,bootindex=${cdromFirst ? 2 : 1}` : "";
    args.push("-device", `virtio-blk-pci,drive=${node},id=${node}-device,write-cache=on${bootIndex}`);
  });
  if (spec.cdromPath !== undefined) {
    args.push("-blockdev", JSON.stringify({ "driver": "file", "node-name": "cdrom0-file", "filename": spec.cdromPath, "read-only": true }));
    args.push("-blockdev", JSON.stringify({ "driver": "raw", "node-name": "cdrom0", "file": "cdrom0-file", "read-only": true }));
    args.push("-device", `ide-cd,drive=cdrom0,bus=ide.0,id=cdrom0-device,bootindex=${cdromFirst ? 1 : 2}`);
  }
  if (spec.kernelPath !== undefined) args.push("-kernel", spec.kernelPath);
  if (spec.initrdPath !== undefined) args.push("-initrd", spec.initrdPath);
  if (spec.append !== undefined) args.push("-append", spec.append);
  if (spec.network === "user") args.push("-nic", "user,model=virtio-net-pci");
  if (spec.incomingStatePath !== undefined) args.push("-S", "-incoming", "defer");
  args.push(...(spec.extraArgs ?? []));
  return args;
}
