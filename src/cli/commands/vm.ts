/**
 * `snapstack vm <command>`: clients of the daemon's API (src/api). When no
 * daemon answers for the store, one is started in the background (its log
 * in $SNAPSTACK_HOME/daemon.log) and the CLI says so on stderr.
 *
 * Paths given on the command line (kernel, initrd, ISO, --disk-from, an
 * export's output and backing) are made absolute here: the daemon runs in
 * another directory.
 *
 * Long operations (revert, delete-snapshot, diff, export, remove) show progress on
 * stderr only with -p, as `snapstack img` does: without it, a failure
 * prints exactly one line.
 */
import { spawn } from "node:child_process";
import { openSync, closeSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { ERROR_CODES, SnapstackError, fromSystemError, type ErrorCode } from "../../base/errors.ts";
import { formatSize, parseSize } from "../../base/units.ts";
import { NOT_QEMU, optionFlag, optionList, optionString, parseArgs, type OptionSpec, type ParsedArgs } from "../args.ts";
import { expectPositionals, parseOutputFormat } from "../command-helpers.ts";
import type { CliCommand, CliContext } from "../context.ts";
import { ApiClient } from "../../api/api-client.ts";
import { checkStorePermissions, daemonLockHolder, daemonSocketPath } from "../../api/daemon-lock.ts";
import { MachineStore, resolveHome } from "../../vm/store/machine-store.ts";
import type { MachineStatus } from "../../vm/manager/machine-manager.ts";
import type { TreeView } from "../../vm/manager/machine-operations.ts";
import type { JobProgress } from "../../chain/jobs/index.ts";

/** How long to wait for a daemon the CLI started to answer. */
export const DAEMON_START_TIMEOUT_MS = 20_000;
const DAEMON_POLL_MS = 50;

const HOME_OPTION: OptionSpec = { name: "home", long: "home", value: true };
const OUTPUT_OPTION: OptionSpec = { name: "output", long: "output", value: true };
const PROGRESS_OPTION: OptionSpec = { name: "progress", short: "p", long: "progress" };
/** diff and export: which disk (1 for the first). */
const DISK_NUMBER_OPTION: OptionSpec = { name: "disk", long: "disk", value: true };

/** The last non-empty line of a daemon log (why it did not start). */
function lastLogLine(path: string): string {
  try {
    const lines = readFileSync(path, "utf8").split("\n").filter((line) => line.trim() !== "");
    return lines.at(-1) ?? "";
  } catch {
    return "";
  }
}

/** A client for the store's daemon, starting one when none answers. */
export async function connectDaemon(home: string, context: CliContext): Promise<ApiClient> {
  let store: MachineStore;
  try {
    store = new MachineStore(home);
  } catch (error) {
    throw fromSystemError(error, home, "create the store");
  }
  checkStorePermissions(store.home);
  const client = new ApiClient(daemonSocketPath(store.home));
  if (await client.alive()) return client;
  const script = fileURLToPath(new URL("../../../bin/snapstack", import.meta.url));
  const logPath = join(store.home, "daemon.log");
  let logFd: number;
  try {
    logFd = openSync(logPath, "a", 0o600);
  } catch (error) {
    throw fromSystemError(error, logPath, "open the daemon log");
  }
  const child = spawn(process.execPath, [script, "serve", "--home", store.home], { detached: true, stdio: ["ignore", logFd, logFd], env: context.env });
  closeSync(logFd);
  child.unref();
  context.err(`snapstack: no daemon answered for ${store.home}; started one (pid ${child.pid}, log ${logPath})\n`);
  const deadline = Date.now() + DAEMON_START_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (await client.alive()) return client;
    // Ours exited: fine if another client's daemon holds the store and is starting; else it failed.
    if (child.exitCode !== null && daemonLockHolder(store.home) === null) {
      if (await client.alive()) return client;
      // Its one-line error (error-report.ts) keeps its code.
      const reported = /^(?:\S+Z )?snapstack: error (E_[A-Z_]+): (.*)$/.exec(lastLogLine(logPath));
      const code = reported !== null && reported[1] in ERROR_CODES ? (reported[1] as ErrorCode) : "E_IO";
      throw new SnapstackError(code, `the daemon for ${store.home} did not start: ${reported?.[2] ?? `it exited with code ${child.exitCode}`} (log ${logPath})`, { home: store.home });
    }
    await new Promise((wake) => setTimeout(wake, DAEMON_POLL_MS));
  }
  throw new SnapstackError("E_TIMEOUT", `no daemon answered for ${store.home} within ${DAEMON_START_TIMEOUT_MS} ms: see ${logPath}`, { home: store.home });
}

/**
 * Progress of a long operation on stderr with -p: one line per job phase,
 * rewritten in place; `end` finishes a line left open (before an error).
 */
function progressPrinter(context: CliContext, enabled: boolean): { onProgress?: (progress: JobProgress) => void; end(): void } {
  if (!enabled) return { end() {} };
  let open = "";
  let lastPercent = -1;
  return {
    onProgress(progress) {
      const percent = Math.floor(progress.fraction * 100);
      const phase = `  ${progress.job} ${progress.phase}:`;
      if (phase === open && percent === lastPercent) return;
      if (phase !== open && open !== "") context.err("\n");
      context.err(`\r${phase} ${percent}%`);
      open = phase;
      lastPercent = percent;
    },
    end() {
      if (open !== "") context.err("\n");
      open = "";
    },
  };
}

/** Run a request whose progress -p shows. */
async function withProgress<T>(parsed: ParsedArgs, context: CliContext, request: (onProgress?: (progress: JobProgress) => void) => Promise<T>): Promise<T> {
  const printer = progressPrinter(context, optionFlag(parsed, "progress"));
  try {
    return await request(printer.onProgress);
  } finally {
    printer.end();
  }
}

function sizeOption(parsed: ParsedArgs, name: string, what: string): number | undefined {
  const text = optionString(parsed, name);
  return text === undefined ? undefined : parseSize(text, { what });
}

function absolute(path: string | undefined): string | undefined {
  return path === undefined ? undefined : resolve(path);
}

function json(context: CliContext, value: unknown): void {
  context.out(JSON.stringify(value, null, 2) + "\n");
}

function machinePath(name: string, suffix = ""): string {
  return `/machines/${encodeURIComponent(name)}${suffix}`;
}

function snapshotPath(name: string, snapshot: string, suffix = ""): string {
  return machinePath(name, `/snapshots/${encodeURIComponent(snapshot)}${suffix}`);
}

function renderStatus(status: MachineStatus): string {
  const lines = [
    `machine: ${status.name}`,
    `state: ${status.state}${status.pid !== null ? ` (pid ${status.pid}, ${status.accelerator})` : ""}`,
    `memory: ${formatSize(status.config.memoryBytes)}, cpus: ${status.config.cpus}, disk: ${[status.config.diskSizeBytes, ...(status.config.extraDiskSizesBytes ?? [])].map(formatSize).join(" + ")}`,
    `current snapshot: ${status.currentSnapshot ?? "(none)"}, snapshots: ${status.snapshotCount}`,
  ];
  if (status.config.cloneOf !== null) lines.push(`linked clone of ${status.config.cloneOf.machine}@${status.config.cloneOf.snapshot}`);
  if (status.lastExit !== null && status.state !== "running") {
    lines.push(`last exit: code ${status.lastExit.code} signal ${status.lastExit.signal} at ${status.lastExit.at}${status.lastExit.stderr.trim() ? `: ${status.lastExit.stderr.trim()}` : ""}`);
  }
  return lines.join("\n") + "\n";
}

/** The tree for a terminal; descriptions are quoted with their control characters escaped (one line each, no escape sequences). */
function renderTree(view: TreeView): string {
  const lines: string[] = [];
  for (const snapshot of view.snapshots) {
    const marks = [snapshot.hasState ? "vm state" : "disk only", `own ${formatSize(snapshot.ownBytes)}`, `frees ${formatSize(snapshot.freeableBytes)}`];
    if (snapshot.retainedBy.length > 0) marks.push(`needed by ${snapshot.retainedBy.join(", ")}`);
    const here = snapshot.current ? "  <- current" : "";
    lines.push(`${"  ".repeat(snapshot.depth)}${snapshot.name}  [${marks.join("; ")}]  ${snapshot.createdAt}${snapshot.description ? `  ${JSON.stringify(snapshot.description)}` : ""}${here}`);
  }
  if (view.current.snapshot === null) lines.push("(current disk has no parent snapshot)");
  lines.push(`current disk: ${formatSize(view.current.topBytes)} written since ${view.current.snapshot ?? "creation"}; ${view.layerCount} layer files, chain depth ${view.chainDepth}`);
  return lines.join("\n") + "\n";
}

interface Subcommand {
  synopsis: string;
  options: OptionSpec[];
  args: [number, number, string];
  run(client: ApiClient, parsed: ParsedArgs, context: CliContext): Promise<number>;
}

const SUBCOMMANDS: Record<string, Subcommand> = {
  create: {
    synopsis: "create NAME [--memory SIZE] [--cpus N] (--disk SIZE | --disk-from IMAGE) [--extra-disk SIZE]... [--kernel F [--initrd F] [--append TEXT]] [--cdrom ISO] [--qemu-arg ARG]...",
    options: [
      { name: "memory", long: "memory", value: true },
      { name: "cpus", long: "cpus", value: true },
      { name: "disk", long: "disk", value: true },
      { name: "diskFrom", long: "disk-from", value: true },
      { name: "extraDisk", long: "extra-disk", value: true, repeat: "list" },
      { name: "kernel", long: "kernel", value: true },
      { name: "initrd", long: "initrd", value: true },
      { name: "append", long: "append", value: true },
      { name: "cdrom", long: "cdrom", value: true },
      { name: "qemuArg", long: "qemu-arg", value: true, repeat: "list" },
    ],
    args: [1, 1, "Expecting a machine name"],
    async run(client, parsed, context) {
      const cpusText = optionString(parsed, "cpus");
      if (cpusText !== undefined && !/^[1-9][0-9]*$/.test(cpusText)) throw new SnapstackError("E_USAGE", `--cpus ${JSON.stringify(cpusText)}: expecting a whole number of CPUs`);
      const config = await client.request<{ name: string; diskSizeBytes: number; extraDiskSizesBytes?: number[] }>("POST", "/machines", {
        name: parsed.positionals[0],
        memoryBytes: sizeOption(parsed, "memory", "memory size"),
        cpus: cpusText === undefined ? undefined : Number(cpusText),
        diskSizeBytes: sizeOption(parsed, "disk", "disk size"),
        diskFrom: absolute(optionString(parsed, "diskFrom")),
        extraDiskSizesBytes: optionList(parsed, "extraDisk").map((text) => parseSize(text, { what: "disk size" })),
        kernel: absolute(optionString(parsed, "kernel")),
        initrd: absolute(optionString(parsed, "initrd")),
        append: optionString(parsed, "append"),
        cdrom: absolute(optionString(parsed, "cdrom")),
        extraArgs: optionList(parsed, "qemuArg"),
      });
      const extra = config.extraDiskSizesBytes ?? [];
      const disks = extra.length === 0 ? `a ${formatSize(config.diskSizeBytes)} disk` : `disks of ${[config.diskSizeBytes, ...extra].map(formatSize).join(", ")}`;
      context.out(`Created machine '${config.name}' with ${disks}.\n`);
      return 0;
    },
  },
  list: {
    synopsis: "list [--output=json]",
    options: [OUTPUT_OPTION],
    args: [0, 0, ""],
    async run(client, parsed, context) {
      const machines = await client.request<MachineStatus[]>("GET", "/machines");
      if (parseOutputFormat(optionString(parsed, "output")) === "json") json(context, machines);
      else {
        context.out(`${"NAME".padEnd(24)} ${"STATE".padEnd(8)} ${"MEMORY".padEnd(8)} ${"DISK".padEnd(8)} SNAPSHOTS CURRENT\n`);
        for (const m of machines) {
          context.out(`${m.name.padEnd(24)} ${m.state.padEnd(8)} ${formatSize(m.config.memoryBytes).padEnd(8)} ${formatSize(m.config.diskSizeBytes).padEnd(8)} ${String(m.snapshotCount).padEnd(9)} ${m.currentSnapshot ?? "-"}\n`);
        }
      }
      return 0;
    },
  },
  start: {
    synopsis: "start NAME",
    options: [],
    args: [1, 1, "Expecting a machine name"],
    async run(client, parsed, context) {
      const status = await client.request<MachineStatus>("POST", machinePath(parsed.positionals[0], "/start"));
      context.out(`Started '${status.name}' (pid ${status.pid}, ${status.accelerator}).\n`);
      return 0;
    },
  },
  stop: {
    synopsis: "stop NAME [--force]",
    options: [{ name: "force", long: "force" }],
    args: [1, 1, "Expecting a machine name"],
    async run(client, parsed, context) {
      await client.request("POST", machinePath(parsed.positionals[0], "/stop"), { force: optionFlag(parsed, "force") });
      context.out(`Stopped '${parsed.positionals[0]}'.\n`);
      return 0;
    },
  },
  status: {
    synopsis: "status NAME [--output=json]",
    options: [OUTPUT_OPTION],
    args: [1, 1, "Expecting a machine name"],
    async run(client, parsed, context) {
      const status = await client.request<MachineStatus>("GET", machinePath(parsed.positionals[0]));
      if (parseOutputFormat(optionString(parsed, "output")) === "json") json(context, status);
      else context.out(renderStatus(status));
      return 0;
    },
  },
  log: {
    synopsis: "log NAME [--bytes N]",
    options: [{ name: "bytes", long: "bytes", value: true }],
    args: [1, 1, "Expecting a machine name"],
    async run(client, parsed, context) {
      const bytes = sizeOption(parsed, "bytes", "byte count");
      const { text } = await client.request<{ text: string }>("GET", machinePath(parsed.positionals[0], `/log${bytes === undefined ? "" : `?bytes=${bytes}`}`));
      context.out(text);
      return 0;
    },
  },
  snapshot: {
    synopsis: "snapshot NAME SNAP [--disk-only] [--description TEXT]",
    options: [
      { name: "diskOnly", long: "disk-only" },
      { name: "description", long: "description", value: true },
    ],
    args: [2, 2, "Expecting a machine name and a snapshot name"],
    async run(client, parsed, context) {
      const [name, snapshot] = parsed.positionals;
      const result = await client.request<{ snapshot: { name: string; hasState: boolean }; timings: { pausedMs: number; totalMs: number } }>("POST", machinePath(name, "/snapshots"), {
        snapshot,
        description: optionString(parsed, "description"),
        diskOnly: optionFlag(parsed, "diskOnly"),
      });
      const what = result.snapshot.hasState ? "disk, VM state and configuration" : "disk and configuration";
      context.out(`Snapshot '${result.snapshot.name}' of '${name}' taken (${what}; paused ${result.timings.pausedMs.toFixed(1)} ms, total ${result.timings.totalMs.toFixed(0)} ms).\n`);
      return 0;
    },
  },
  revert: {
    synopsis: "revert NAME SNAP [--wipe] [-p]",
    options: [{ name: "wipe", long: "wipe" }, PROGRESS_OPTION],
    args: [2, 2, "Expecting a machine name and a snapshot name"],
    async run(client, parsed, context) {
      const [name, snapshot] = parsed.positionals;
      const result = await withProgress(parsed, context, (onProgress) =>
        client.request<{ state: string; freedBytes: number; totalMs: number }>("POST", snapshotPath(name, snapshot, "/revert"), { wipe: optionFlag(parsed, "wipe") }, onProgress),
      );
      context.out(`Reverted '${name}' to '${snapshot}' in ${result.totalMs.toFixed(0)} ms; it is ${result.state}; freed ${formatSize(result.freedBytes)}.\n`);
      return 0;
    },
  },
  snapshots: {
    synopsis: "snapshots NAME [--output=json]",
    options: [OUTPUT_OPTION],
    args: [1, 1, "Expecting a machine name"],
    async run(client, parsed, context) {
      const view = await client.request<TreeView>("GET", machinePath(parsed.positionals[0], "/snapshots"));
      if (parseOutputFormat(optionString(parsed, "output")) === "json") json(context, view);
      else context.out(renderTree(view));
      return 0;
    },
  },
  "delete-snapshot": {
    synopsis: "delete-snapshot NAME SNAP [--wipe] [-p]",
    options: [{ name: "wipe", long: "wipe" }, PROGRESS_OPTION],
    args: [2, 2, "Expecting a machine name and a snapshot name"],
    async run(client, parsed, context) {
      const [name, snapshot] = parsed.positionals;
      const wipe = optionFlag(parsed, "wipe");
      const result = await withProgress(parsed, context, (onProgress) =>
        client.request<{ freedBytes: number; mergedBytes: number }>("DELETE", snapshotPath(name, snapshot, wipe ? "?wipe=1" : ""), undefined, onProgress),
      );
      context.out(`Deleted snapshot '${snapshot}' of '${name}': merged ${formatSize(result.mergedBytes)}, freed ${formatSize(result.freedBytes)}${wipe ? " (wiped)" : ""}.\n`);
      return 0;
    },
  },
  diff: {
    synopsis: "diff NAME A B [--disk N] [--output=json] [-p]",
    options: [DISK_NUMBER_OPTION, OUTPUT_OPTION, PROGRESS_OPTION],
    args: [3, 3, "Expecting a machine name and two snapshot names"],
    async run(client, parsed, context) {
      const [name, from, to] = parsed.positionals;
      // The daemon checks the number (and that the machine has that disk).
      const diskText = optionString(parsed, "disk");
      const disk = diskText === undefined ? "" : `&disk=${encodeURIComponent(diskText)}`;
      const result = await withProgress(parsed, context, (onProgress) =>
        client.request<{ disk: number; ranges: Array<{ start: number; length: number }>; changedBytes: number }>(
          "GET",
          machinePath(name, `/diff?from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}${disk}`),
          undefined,
          onProgress,
        ),
      );
      if (parseOutputFormat(optionString(parsed, "output")) === "json") json(context, result);
      else {
        for (const range of result.ranges) context.out(`${range.start}\t${range.length}\n`);
        context.out(`${result.ranges.length} changed ranges, ${formatSize(result.changedBytes)}\n`);
      }
      return 0;
    },
  },
  export: {
    synopsis: "export NAME SNAP OUTPUT [-O qcow2|raw] [--from A --backing PREVIOUS] [--disk N] [-p]",
    options: [
      { name: "outputFormat", short: "O", value: true },
      { name: "from", long: "from", value: true },
      { name: "backing", long: "backing", value: true },
      DISK_NUMBER_OPTION,
      PROGRESS_OPTION,
    ],
    args: [3, 3, "Expecting a machine name, a snapshot name and an output file"],
    async run(client, parsed, context) {
      const [name, snapshot, output] = parsed.positionals;
      const diskText = optionString(parsed, "disk");
      if (diskText !== undefined && !/^[1-9][0-9]{0,2}$/.test(diskText)) throw new SnapstackError("E_USAGE", `--disk ${JSON.stringify(diskText)} is not a disk number (1 for the first)`);
      const body = {
        path: absolute(output),
        format: optionString(parsed, "outputFormat"),
        from: optionString(parsed, "from"),
        backing: absolute(optionString(parsed, "backing")),
        disk: diskText === undefined ? undefined : Number(diskText),
      };
      const result = await withProgress(parsed, context, (onProgress) =>
        client.request<{ disk: number; path: string; format: string; writtenBytes: number; changedBytes?: number; backing?: string }>("POST", snapshotPath(name, snapshot, "/export"), body, onProgress),
      );
      const what = result.backing === undefined ? `disk ${result.disk} of '${name}' at '${snapshot}'` : `what changed on disk ${result.disk} of '${name}' from '${body.from}' to '${snapshot}' (${formatSize(result.changedBytes ?? 0)}), over ${result.backing}`;
      context.out(`Exported ${what} to ${result.path} (${result.format}, ${formatSize(result.writtenBytes)} of data).\n`);
      return 0;
    },
  },
  clone: {
    synopsis: "clone NAME SNAP NEWNAME",
    options: [],
    args: [3, 3, "Expecting a machine name, a snapshot name and a new machine name"],
    async run(client, parsed, context) {
      const [name, snapshot, newName] = parsed.positionals;
      await client.request("POST", snapshotPath(name, snapshot, "/clone"), { name: newName });
      context.out(`Created '${newName}', a linked clone of '${name}' at '${snapshot}'.\n`);
      return 0;
    },
  },
  remove: {
    synopsis: "remove NAME [--wipe] [-p]",
    options: [{ name: "wipe", long: "wipe" }, PROGRESS_OPTION],
    args: [1, 1, "Expecting a machine name"],
    async run(client, parsed, context) {
      const wipe = optionFlag(parsed, "wipe");
      const result = await withProgress(parsed, context, (onProgress) => client.request<{ freedBytes: number }>("DELETE", machinePath(parsed.positionals[0], wipe ? "?wipe=1" : ""), undefined, onProgress));
      context.out(`Removed '${parsed.positionals[0]}', freed ${formatSize(result.freedBytes)}${wipe ? " (wiped)" : ""}.\n`);
      return 0;
    },
  },
};

export const vmCommand: CliCommand = {
  name: "vm",
  synopsis: "vm <command> [--home DIR] ...",
  summary: "Manage machines and their snapshot trees through the snapstack daemon.",
  optionHelp: [
    "commands:",
    ...Object.values(SUBCOMMANDS).map((sub) => `  ${sub.synopsis}`),
    "",
    "  --home DIR   the store (default $SNAPSTACK_HOME or ~/.local/share/snapstack); a daemon is started for it if none answers",
    "  -p           show the progress of a long operation on stderr",
  ],
  async run(argv, context) {
    const [name, ...rest] = argv;
    const sub = name === undefined ? undefined : SUBCOMMANDS[name];
    if (sub === undefined) throw new SnapstackError("E_USAGE", name === undefined ? "missing vm command" : `unknown vm command '${name}'`);
    const parsed = parseArgs(rest, [HOME_OPTION, ...sub.options], NOT_QEMU);
    expectPositionals(parsed.positionals, sub.args[0], sub.args[1], sub.args[2]);
    const client = await connectDaemon(resolveHome(optionString(parsed, "home"), context.env), context);
    return sub.run(client, parsed, context);
  },
};
