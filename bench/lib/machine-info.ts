/**
 * What the benchmarks ran on, printed above every results table: figures are
 * meaningless without the CPU, the kernel, the peer's version and the
 * filesystem the images lived on (tmpfs and ext4 differ by an order of
 * magnitude for writes).
 */
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import os from "node:os";

export interface MachineInfo {
  cpuModel: string;
  cpuCount: number;
  memoryGiB: number;
  osName: string;
  kernel: string;
  nodeVersion: string;
  /** First line of `qemu-img --version`, or "qemu-img not found". */
  qemuImgVersion: string;
  /** Where bench fixtures are built (os.tmpdir()). */
  scratchDir: string;
  /** Filesystem type of scratchDir as `stat -f` reports it. */
  scratchFilesystem: string;
  /** `git describe --always --dirty` of the checkout, or "unknown". */
  gitCommit: string;
}

/** First line of a command's stdout, or `fallback` when it cannot run. */
function firstLine(command: string, args: string[], fallback: string, cwd?: string): string {
  try {
    const output = execFileSync(command, args, { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"], cwd });
    return output.split("\n")[0].trim() || fallback;
  } catch {
    return fallback;
  }
}

function readOsName(): string {
  try {
    const match = /^PRETTY_NAME="?([^"\n]*)"?$/m.exec(readFileSync("/etc/os-release", "utf8"));
    return match?.[1] ?? os.type();
  } catch {
    return os.type();
  }
}

export function readMachineInfo(repoRoot: string): MachineInfo {
  const cpus = os.cpus();
  const scratchDir = os.tmpdir();
  return {
    cpuModel: cpus[0]?.model.trim() ?? "unknown",
    cpuCount: os.availableParallelism(),
    memoryGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    osName: readOsName(),
    kernel: os.release(),
    nodeVersion: process.version,
    qemuImgVersion: firstLine("qemu-img", ["--version"], "qemu-img not found"),
    scratchDir,
    scratchFilesystem: firstLine("stat", ["-f", "-c", "%T", scratchDir], "unknown filesystem"),
    gitCommit: firstLine("git", ["describe", "--always", "--dirty"], "unknown", repoRoot),
  };
}
