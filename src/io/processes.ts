/**
 * Whether a process is still there, from /proc: a pid's identity is
 * "PID START_TIME" (start time in clock ticks since boot, /proc/PID/stat),
 * so a pid the kernel has since given to another process is not taken for
 * the one that wrote it down; a zombie counts as gone. Without /proc (not
 * Linux) the pid alone, alive if signal 0 reaches it.
 */
import { existsSync, readFileSync } from "node:fs";

/** "PID START_TIME" of a live process, or null when it is gone or a zombie. */
export function processIdentity(pid: number): string | null {
  if (!existsSync("/proc/self/stat")) {
    try {
      process.kill(pid, 0);
      return `${pid}`;
    } catch (error) {
      // EPERM: it exists, owned by someone else.
      return (error as NodeJS.ErrnoException).code === "EPERM" ? `${pid}` : null;
    }
  }
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return null;
  }
  // Fields after the command name (which may hold spaces and parentheses): state is the 3rd, starttime the 22nd.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  if (fields[0] === "Z" || fields[0] === "X") return null;
  return `${pid} ${fields[19]}`;
}

/** Whether a process with this pid runs (not a zombie). */
export function processAlive(pid: number): boolean {
  return processIdentity(pid) !== null;
}
