/**
 * One running qemu-system-x86_64: start it from a launch spec, drive it over
 * QMP (pause, resume, save its state, quit), and know when it exits.
 *
 * Design notes
 * - Start: validate the spec, clear stale sockets in runDir, spawn QEMU
 *   (its own process group, so a Ctrl-C meant for the daemon does not kill
 *   guests; stderr to runDir/qemu.stderr, so it survives the daemon), then
 *   connect QMP. If QEMU exits first, start fails with E_QEMU carrying
 *   QEMU's stderr; any later failure of start kills the process it spawned.
 * - Saving state (the VM must be paused: `stop` has drained and flushed the
 *   guest's I/O): QEMU migrates to a Unix socket we listen on and our own
 *   `cat` child copies it into the file, which we fsync (see
 *   state-file-transfer.ts for why not exec: or Node). Migration bandwidth is unthrottled
 *   (QEMU's default is 32 MiB/s); zero pages cost a few bytes each, so a
 *   256 MiB guest saves in well under a second. After saving, the VM is in
 *   "postmigrate"; `resume()` continues it (the live-snapshot path).
 * - Loading state: QEMU starts with `-S -incoming defer`; migrate-incoming
 *   makes it listen on runDir/incoming.sock and we stream the file into it.
 *   A truncated or foreign file makes QEMU 7.2 fail the load and exit; start
 *   then fails with E_QEMU and QEMU's message. On success the VM is
 *   "paused" and the caller resumes it.
 * - The device set must be the same as when the state was saved (same spec,
 *   same QEMU binary, same accelerator); QEMU refuses a mismatch.
 * - `exited` resolves (never rejects) once the process is gone, with its
 *   exit code or signal and the tail of its stderr.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { chmodSync, closeSync, existsSync, fstatSync, mkdirSync, openSync, readSync, rmSync, statSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { SnapstackError, fromSystemError, isSnapstackError } from "../../base/errors.ts";
import { QmpClient } from "../../qmp/qmp-client.ts";
import { probeAccelerator, QEMU_SYSTEM_BINARY, type Accelerator } from "./accelerator.ts";
import { buildQemuArgs, runFilePaths, validateLaunchSpec, type QemuLaunchSpec } from "./qemu-args.ts";
import { receiveStateFile, sendStateFile } from "./state-file-transfer.ts";

export type { QemuDiskSpec, QemuLaunchSpec } from "./qemu-args.ts";

/** Bound for QEMU to create its QMP socket and greet after being spawned. */
export const QEMU_START_TIMEOUT_MS = 30_000;
/** Bound for saving or loading a VM state file (256 MiB takes well under a second). */
export const STATE_TRANSFER_TIMEOUT_MS = 10 * 60_000;
/** Default wait for QMP `quit` before SIGKILL. */
export const QUIT_TIMEOUT_MS = 10_000;
/** Migration bandwidth cap set before saving (bytes/s): effectively none. */
const MIGRATION_BANDWIDTH_BYTES_PER_S = 1024 * 1024 * 1024 * 1024;
/** query-migrate polling while a state transfer runs (MIGRATION events wake it sooner). */
const MIGRATION_POLL_MS = 20;
/** Polling for the run state to leave "inmigrate" after a load. */
const RUN_STATE_POLL_MS = 2;
/**
 * Live save: QEMU stops the guest for the final pass once what is left
 * could be sent in this time. Lower means more passes and a shorter pause.
 */
const LIVE_DOWNTIME_LIMIT_MS = 50;
/** Live save: after this long without reaching the switchover, the limit below applies. */
const LIVE_CONVERGE_MS = 3_000;
/** Live save that does not converge: switch over at the end of the current pass. */
const LIVE_FORCED_DOWNTIME_LIMIT_MS = 60_000;
/** How long a failed start waits for QEMU to exit by itself before killing it. */
const EXIT_GRACE_MS = 1_000;
/** Bytes of QEMU's stderr kept for error messages. */
const STDERR_TAIL_BYTES = 16 * 1024;

/**
 * Whether a live save (saveState live: true) restores a consistent guest
 * under this accelerator. Not under TCG with QEMU 7.2: its x86 page-table
 * walker sets PTE accessed/dirty bits with x86_stl_phys_notdirty, which the
 * migration's dirty log does not see (fixed by "target/i386: Use atomic
 * operations for pte updates", QEMU 8.1), so a page table sent early can
 * arrive without later updates: a guest dirtying memory during the save was
 * restored with a NULL dereference or list corruption in 1 of 2-5 tries
 * here (a paused save: 0 of 8). KVM's dirty log has no such gap.
 * SNAPSTACK_LIVE_SAVE=1 forces it on (tests of the live path's mechanics),
 * =0 off.
 */
export function liveSaveSupported(accelerator: Accelerator): boolean {
  const forced = process.env.SNAPSTACK_LIVE_SAVE;
  if (forced === "1" || forced === "0") return forced === "1";
  return accelerator === "kvm";
}

export interface SaveStateOptions {
  /** Save while the guest runs (it must be running); see saveState. */
  live?: boolean;
  /** Live save only: runs while the guest is stopped at the save's point in time. */
  atSwitchover?: () => Promise<void>;
  /** Bytes written to the file so far (about every 50 ms, and once at the end). */
  onProgress?: (doneBytes: number) => void;
  timeoutMs?: number;
}

export interface SaveStateResult {
  sizeBytes: number;
  /** Live save: how long the guest was stopped (switchover to running again); 0 for a paused save. */
  pausedMs: number;
}

export interface QemuExit {
  code: number | null;
  signal: string | null;
  /** The tail of QEMU's stderr. */
  stderr: string;
}


export class QemuProcess {
  readonly pid: number;
  readonly qmp: QmpClient;
  readonly spec: QemuLaunchSpec;
  readonly accelerator: Accelerator;
  /** The full command line (binary first), for logs and `vm status`. */
  readonly commandLine: string[];
  readonly qmpSocketPath: string;
  /** Connect here to type on the guest's serial console (one client at a time). */
  readonly serialSocketPath: string;
  readonly exited: Promise<QemuExit>;
  #child: ChildProcess;
  #exit: QemuExit | null = null;
  #stateOperation: Promise<unknown> | null = null;

  private constructor(spec: QemuLaunchSpec, accelerator: Accelerator, commandLine: string[], child: ChildProcess, exited: Promise<QemuExit>, qmp: QmpClient) {
    this.spec = spec;
    this.accelerator = accelerator;
    this.commandLine = commandLine;
    this.#child = child;
    this.pid = child.pid!;
    this.exited = exited;
    void exited.then((exit) => (this.#exit = exit));
    this.qmp = qmp;
    const files = runFilePaths(spec.runDir);
    this.qmpSocketPath = files.qmpSocket;
    this.serialSocketPath = files.serialSocket;
  }

  /**
   * Spawn QEMU and connect QMP. With spec.incomingStatePath, resolves once
   * the saved state is loaded and the VM is paused; call resume() next.
   */
  static async start(inputSpec: QemuLaunchSpec): Promise<QemuProcess> {
    const spec = absoluteSpec(inputSpec);
    validateLaunchSpec(spec);
    for (const [what, path] of [["kernel", spec.kernelPath], ["initrd", spec.initrdPath], ["CD-ROM image", spec.cdromPath], ["saved VM state", spec.incomingStatePath]] as const) {
      if (path !== undefined && !existsSync(path)) throw new SnapstackError("E_NOT_FOUND", `VM '${spec.name}': ${what} ${path} does not exist`, { path });
    }
    const accelerator = spec.accelerator ?? (await probeAccelerator());
    const files = runFilePaths(spec.runDir);
    try {
      mkdirSync(spec.runDir, { recursive: true, mode: 0o700 });
      mkdirSync(dirname(spec.serialLogPath), { recursive: true });
      // QEMU appends to the console log; created here so that it is the owner's alone, like the rest of the store.
      closeSync(openSync(spec.serialLogPath, "a", 0o600));
      chmodSync(spec.serialLogPath, 0o600);
      for (const path of [files.qmpSocket, files.serialSocket, files.pidFile, files.incomingSocket, files.outgoingSocket]) rmSync(path, { force: true });
    } catch (error) {
      throw fromSystemError(error, spec.runDir, "prepare the run directory");
    }
    const args = buildQemuArgs(spec, accelerator);
    const stderrFd = openSync(files.stderrLog, "w", 0o600);
    let child: ChildProcess;
    try {
      child = spawn(QEMU_SYSTEM_BINARY, args, { cwd: spec.runDir, stdio: ["ignore", "ignore", stderrFd], detached: true });
    } finally {
      closeSync(stderrFd);
    }
    const exited = watchExit(child, files.stderrLog);
    const spawnFailed = new Promise<never>((_, reject) => child.once("error", (error) => reject(new SnapstackError("E_QEMU", `VM '${spec.name}': cannot run ${QEMU_SYSTEM_BINARY}: ${error.message}`))));
    spawnFailed.catch(() => {});

    const exitedEarly = new AbortController();
    void exited.then(() => exitedEarly.abort("QEMU exited"));
    let qmp: QmpClient | null = null;
    try {
      qmp = await Promise.race([
        QmpClient.connect(files.qmpSocket, { timeoutMs: QEMU_START_TIMEOUT_MS, signal: exitedEarly.signal }),
        spawnFailed,
        exited.then((exit) => Promise.reject(earlyExitError(spec.name, "during start-up", exit))),
      ]);
      const process = new QemuProcess(spec, accelerator, [QEMU_SYSTEM_BINARY, ...args], child, exited, qmp);
      if (spec.incomingStatePath !== undefined) await process.#loadState(spec.incomingStatePath);
      return process;
    } catch (error) {
      await qmp?.close();
      if (child.pid === undefined) throw error;
      // QEMU closing QMP usually means it is exiting: give it a moment, so the
      // error can show why (its stderr) rather than a reset connection.
      const exitedByItself = await Promise.race([exited.then(() => true), sleep(EXIT_GRACE_MS).then(() => false)]);
      if (!exitedByItself) child.kill("SIGKILL");
      const exit = await exited;
      if (exitedByItself) {
        throw earlyExitError(spec.name, spec.incomingStatePath !== undefined ? "while starting or loading its saved state" : "during start-up", exit);
      }
      throw error;
    }
  }

  /** True until the process has exited. */
  get running(): boolean {
    return this.#exit === null && this.#child.exitCode === null && this.#child.signalCode === null;
  }

  /** query-status: "running", "paused", "postmigrate", "inmigrate", "prelaunch", "shutdown", ... */
  async status(): Promise<string> {
    const reply = await this.#execute<{ status: string }>("query-status");
    return reply.status;
  }

  /** Stop the vCPUs; QEMU drains in-flight guest I/O and flushes the disks before replying. */
  async pause(): Promise<void> {
    await this.#execute("stop");
  }

  /** Continue the vCPUs (from "paused", "postmigrate" after saveState, or a freshly loaded state). */
  async resume(): Promise<void> {
    await this.#execute("cont");
  }

  /**
   * Save RAM, CPU and device state to `path` (created or truncated, then
   * fsynced; the caller fsyncs the directory or renames).
   *
   * Paused save (default): the VM must be paused (pause() drained and
   * flushed its I/O); it is left in "postmigrate" and resume() continues it.
   *
   * Live save (`live: true`): the VM must be running. RAM is copied while
   * the guest runs; QEMU then stops the vCPUs (draining and flushing guest
   * I/O) and waits: `atSwitchover` runs at that instant, the one point in
   * time the saved state describes (freeze the disks here). Then QEMU sends
   * the last dirty pages and device state and the VM resumes by itself;
   * `pausedMs` is how long the guest was stopped.
   */
  async saveState(path: string, options: SaveStateOptions = {}): Promise<SaveStateResult> {
    if (this.#stateOperation !== null) throw new SnapstackError("E_QEMU", `VM '${this.spec.name}': a state transfer is already running`);
    const operation = this.#saveState(resolve(path), options);
    this.#stateOperation = operation;
    try {
      return await operation;
    } finally {
      this.#stateOperation = null;
    }
  }

  /** QMP quit; SIGKILL if QEMU is still there after timeoutMs. Resolves once it has exited. */
  async quit(options: { timeoutMs?: number } = {}): Promise<QemuExit> {
    if (this.running) {
      this.qmp.execute("quit").catch(() => {}); // the connection closes as QEMU goes
      const timeoutMs = options.timeoutMs ?? QUIT_TIMEOUT_MS;
      let timer: NodeJS.Timeout | undefined;
      const timedOut = new Promise<"timeout">((resolveTimeout) => (timer = setTimeout(() => resolveTimeout("timeout"), timeoutMs)));
      const outcome = await Promise.race([this.exited, timedOut]);
      clearTimeout(timer);
      if (outcome === "timeout") this.#child.kill("SIGKILL");
    }
    await this.qmp.close();
    return this.exited;
  }

  /** SIGKILL; resolves once the process has exited. */
  async kill(): Promise<QemuExit> {
    if (this.running) this.#child.kill("SIGKILL");
    await this.qmp.close();
    return this.exited;
  }

  async #execute<T>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (!this.running) throw this.#notRunning(command);
    try {
      return await this.qmp.execute<T>(command, args);
    } catch (error) {
      if (isSnapstackError(error) && error.code === "E_QEMU" && !this.running) throw this.#notRunning(command);
      throw error;
    }
  }

  #notRunning(what: string): SnapstackError {
    const exit = this.#exit;
    const how = exit === null ? "is exiting" : `exited (${describeExit(exit)})`;
    return new SnapstackError("E_QEMU", `VM '${this.spec.name}': cannot ${what}: QEMU ${how}${exit?.stderr.trim() ? `: ${exit.stderr.trim()}` : ""}`, { pid: this.pid });
  }

  async #saveState(path: string, options: SaveStateOptions): Promise<SaveStateResult> {
    const live = options.live ?? false;
    const status = await this.status();
    const wanted = live ? "running" : "paused";
    if (status !== wanted) {
      // QEMU cannot migrate twice without running in between ("postmigrate").
      const hint = status === "postmigrate" ? " (its state was just saved: resume it before saving again)" : "";
      throw new SnapstackError("E_QEMU", `VM '${this.spec.name}': ${live ? "a live save" : "saving the VM state"} needs a ${wanted} VM; it is ${status}${hint}`, { status });
    }
    await this.#execute("migrate-set-capabilities", {
      capabilities: [
        { "capability": "pause-before-switchover", state: live },
        { "capability": "events", state: true },
      ],
    });
    await this.#execute("migrate-set-parameters", { "max-bandwidth": MIGRATION_BANDWIDTH_BYTES_PER_S, "downtime-limit": LIVE_DOWNTIME_LIMIT_MS });
    const socketPath = runFilePaths(this.spec.runDir).outgoingSocket;
    rmSync(socketPath, { force: true });
    const receiver = await receiveStateFile(socketPath, path, options.onProgress);
    const deadline = Date.now() + (options.timeoutMs ?? STATE_TRANSFER_TIMEOUT_MS);
    let pausedAt: number | null = null;
    let pausedMs = 0;
    try {
      await this.#execute("migrate", { uri: `unix:${socketPath}` });
      if (live) {
        // A guest that dirties RAM faster than it can be copied never gets under the
        // downtime limit: after a while, accept any downtime so the save ends.
        const escalate = setTimeout(() => {
          this.qmp.execute("migrate-set-parameters", { "downtime-limit": LIVE_FORCED_DOWNTIME_LIMIT_MS }).catch(() => {});
        }, LIVE_CONVERGE_MS);
        try {
          await this.#waitForMigration("saving the VM state", deadline, "pre-switchover");
        } finally {
          clearTimeout(escalate);
        }
        pausedAt = performance.now();
        await options.atSwitchover?.();
        await this.#execute("migrate-continue", { state: "pre-switchover" });
      }
      await this.#waitForMigration("saving the VM state", deadline, "completed");
      // "completed" comes before the run state leaves finish-migrate; `cont` is refused until then.
      await this.#waitWhileRunState("finish-migrate", deadline);
      if (pausedAt !== null) {
        await this.#execute("cont");
        pausedMs = performance.now() - pausedAt;
        pausedAt = null;
      }
      const sizeBytes = await withDeadline(receiver.done, deadline, `VM '${this.spec.name}': writing the VM state to ${path}`);
      return { sizeBytes, pausedMs };
    } catch (error) {
      // Cancelling restarts a VM that the migration stopped (live save).
      await this.qmp.execute("migrate_cancel").catch(() => {});
      if (pausedAt !== null) await this.#waitForMigration("cancelling the save", Date.now() + 10_000, "cancelled").catch(() => {});
      receiver.abort();
      await receiver.done.catch(() => {});
      rmSync(path, { force: true });
      throw error;
    } finally {
      rmSync(socketPath, { force: true });
    }
  }

  async #loadState(path: string): Promise<void> {
    let fileBytes: number;
    try {
      fileBytes = statSync(path).size;
    } catch (error) {
      throw fromSystemError(error, path, "read the saved VM state");
    }
    if (fileBytes === 0) throw new SnapstackError("E_QEMU", `VM '${this.spec.name}': saved VM state ${path} is empty`, { path });
    const deadline = Date.now() + STATE_TRANSFER_TIMEOUT_MS;
    const socketPath = runFilePaths(this.spec.runDir).incomingSocket;
    await this.#execute("migrate-set-capabilities", { capabilities: [{ capability: "events", state: true }] });
    await this.#execute("migrate-incoming", { uri: `unix:${socketPath}` });
    const sent = sendStateFile(path, socketPath, deadline);
    sent.catch(() => {});
    try {
      await this.#waitForMigration("loading the VM state", deadline, "completed");
      await sent;
    } finally {
      rmSync(socketPath, { force: true });
    }
    // QEMU sets the run state from the saved one after "completed": wait for it to settle.
    await this.#waitWhileRunState("inmigrate", deadline);
  }

  async #waitWhileRunState(transient: string, deadline: number): Promise<void> {
    while ((await this.status()) === transient) {
      if (Date.now() > deadline) throw new SnapstackError("E_TIMEOUT", `VM '${this.spec.name}': still "${transient}" after the state transfer`);
      await sleep(RUN_STATE_POLL_MS);
    }
  }

  /**
   * Wait until query-migrate reports `target`; "failed"/"cancelled" (when
   * not the target) become E_QEMU with QEMU's reason. MIGRATION events wake
   * the loop early; polling covers a missed event.
   */
  async #waitForMigration(what: string, deadline: number, target: string): Promise<void> {
    for (;;) {
      // Listen before asking, so an event between the reply and the wait is not missed.
      const wake = this.qmp.waitForEvent("MIGRATION", MIGRATION_POLL_MS).catch(() => {});
      const info = await this.#execute<{ status?: string; "error-desc"?: string }>("query-migrate");
      const status = info.status ?? "none";
      if (status === target) return;
      if (status === "failed" || status === "cancelled" || (status === "completed" && target !== "completed")) {
        throw new SnapstackError("E_QEMU", `VM '${this.spec.name}': ${what} ${status}${info["error-desc"] ? `: ${info["error-desc"]}` : ""}`, { status });
      }
      if (Date.now() > deadline) throw new SnapstackError("E_TIMEOUT", `VM '${this.spec.name}': ${what} did not finish in time (migration ${status})`, { status });
      await wake;
    }
  }
}

function absoluteSpec(spec: QemuLaunchSpec): QemuLaunchSpec {
  const absolute = (path: string | undefined): string | undefined => (path === undefined ? undefined : resolve(path));
  return {
    ...spec,
    disks: spec.disks.map((disk) => ({ ...disk, nbdSocketPath: resolve(disk.nbdSocketPath) })),
    kernelPath: absolute(spec.kernelPath),
    initrdPath: absolute(spec.initrdPath),
    cdromPath: absolute(spec.cdromPath),
    runDir: resolve(spec.runDir),
    serialLogPath: resolve(spec.serialLogPath),
    incomingStatePath: absolute(spec.incomingStatePath),
  };
}

function watchExit(child: ChildProcess, stderrPath: string): Promise<QemuExit> {
  return new Promise((resolveExit) => {
    let done = false;
    const finish = (code: number | null, signal: string | null): void => {
      if (done) return;
      done = true;
      resolveExit({ code, signal, stderr: readTail(stderrPath, STDERR_TAIL_BYTES) });
    };
    child.once("exit", (code, signal) => finish(code, signal));
    child.once("error", () => {
      if (child.pid === undefined) finish(null, null);
    });
  });
}

function readTail(path: string, bytesMax: number): string {
  try {
    const fd = openSync(path, "r");
    try {
      const size = fstatSync(fd).size;
      const length = Math.min(size, bytesMax);
      const buffer = Buffer.alloc(length);
      const read = readSync(fd, buffer, 0, length, size - length);
      return buffer.subarray(0, read).toString("utf8");
    } finally {
      closeSync(fd);
    }
  } catch {
    return "";
  }
}

function describeExit(exit: QemuExit): string {
  return exit.signal !== null ? `signal ${exit.signal}` : `code ${exit.code}`;
}

function earlyExitError(name: string, when: string, exit: QemuExit): SnapstackError {
  const stderr = exit.stderr.trim();
  return new SnapstackError("E_QEMU", `VM '${name}': QEMU exited ${when} (${describeExit(exit)})${stderr ? `: ${stderr}` : ""}`, { exitCode: exit.code, signal: exit.signal, stderr });
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolveSleep) => setTimeout(resolveSleep, ms));
}

async function withDeadline<T>(promise: Promise<T>, deadline: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new SnapstackError("E_TIMEOUT", `${what} did not finish in time`)), Math.max(0, deadline - Date.now()));
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

