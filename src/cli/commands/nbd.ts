/**
 * `snapstack nbd [options] FILE`: serve an image (with its backing chain)
 * over NBD, with qemu-nbd 7.2's options where they apply.
 *
 * Design notes
 * - Differences from qemu-nbd, on purpose: -b defaults to 127.0.0.1 (qemu-nbd
 *   listens on 0.0.0.0); TLS credentials are a directory given directly with
 *   --tls-creds DIR (qemu-nbd's `--object tls-creds-x509,id=ID,dir=DIR
 *   --tls-creds ID` is accepted too); -c (kernel device) and --image-opts
 *   are refused with a coded error; -p 0 picks a free port,
 *   printed with -v. -l exports a read-only view of an internal snapshot
 *   (src/formats/qcow2/snapshot-view.ts), always read-only as in qemu-nbd.
 * - Lifetime as qemu-nbd: without -t the server exits when the last client
 *   that completed negotiation disconnects; -e N serves N clients at once
 *   (default 1; 0 = up to the server's hard cap), further clients wait.
 *   SIGTERM, SIGINT and SIGHUP stop listening, let in-flight requests finish,
 *   flush and close the image, remove the pid file, and exit 0.
 * - --fork: Node cannot fork, so the command re-runs itself detached and
 *   exits once the child reports (over an IPC channel) that it is listening;
 *   the child keeps the original stderr, as qemu-nbd's does.
 * - File I/O runs on the event loop thread ("sync", src/io/node-file.ts):
 *   on page-cached images a pread/pwrite costs less than a hop to libuv's
 *   thread pool and back (measured with nbdcopy on a 1 GiB image: ~100 ms
 *   of CPU per GiB less for reads). Writes of 256 KiB or more are the
 *   exception ("auto" for writes): on the event loop the client blocks on
 *   a full socket while we pwrite, so large writes go to the pool, where
 *   they overlap with reading the next request (raw file, fio 1 MiB
 *   sequential writes: 1620 vs 839 MiB/s and 491 vs 877 ms of CPU per GiB;
 *   nbdcopy into the export 1223 vs 843 MiB/s; qcow2 chain equal or
 *   better). Small writes stay on the event loop: sending them to the pool
 *   ("small-async") lost on a quiet machine (4 KiB random writes: 82 vs 35
 *   us of CPU per request). On top of that, the connection writes a raw
 *   file's WRITEs with writeSync (large ones too in busy data workers) and
 *   Qcow2Image.write does so up to 1 MiB, where measured cheaper
 *   (src/nbd/nbd-connection.ts, docs/nbd.md). A cold or slow disk would block every connection while a
 *   request waits for it: `--aio=threads` (qemu-nbd's default mode) sends
 *   every request to the pool instead.
 * - Data workers (src/nbd/data-workers.ts): exports without shared mutable
 *   metadata (a raw file, or any read-only export) are served by worker
 *   processes after negotiation, so multi-conn clients use several cores.
 *   --workers=N (default: one per core, 2 to 8; none with -e 1, where
 *   only one client is served, or with TLS); --workers=0 serves everything
 *   in this process. A worker is this command run again (bin/snapstack, so
 *   it works from the sources and from the bundle) with DATA_WORKER_ENV set:
 *   it opens the image itself and serves the sockets it is handed.
 * - This command talks to `process` for signals and --fork, the only CLI
 *   command that outlives its arguments.
 */
import { fork, spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { rmSync, writeFileSync } from "node:fs";
import { availableParallelism, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { SnapstackError, type ErrorCode } from "../../base/errors.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { NbdExport, NbdServer, loadTlsCredentials, type DetectZeroes, type ExportedBitmap, type NbdListenAddress } from "../../nbd/index.ts";
import { Qcow2Image } from "../../formats/qcow2/qcow2-image.ts";
import { createImage, openImage } from "../../chain/index.ts";
import { DataWorkerPool, runDataWorker } from "../../nbd/data-workers.ts";
import { optionFlag, optionList, optionString, parseArgs } from "../args.ts";
import { expectPositionals, isCacheMode } from "../command-helpers.ts";
import type { CliCommand, CliContext } from "../context.ts";
import { toSnapstackError } from "../error-report.ts";
import type { NodeFileIoMode } from "../../io/node-file.ts";
import { openSource, parseSnapshotParam } from "../snapshot-source.ts";
import type { SnapshotSelector } from "../../formats/qcow2/internal-snapshots.ts";

export const NBD_DEFAULT_PORT = 10809;
export const NBD_DEFAULT_ADDRESS = "127.0.0.1";
/** Environment marker of the child started by --fork. */
const FORK_CHILD_ENV = "SNAPSTACK_NBD_FORK_CHILD";
/** Environment marker of a data worker (see the design notes). */
const DATA_WORKER_ENV = "SNAPSTACK_NBD_DATA_WORKER";
/** What a data worker runs: the command-line entry, which picks the bundle or the sources. */
const SNAPSTACK_BIN = fileURLToPath(new URL("../../../bin/snapstack", import.meta.url));
/** Largest --workers. */
const WORKERS_MAX = 64;
/** Most workers started by default (each is a Node process of ~60 MiB; clients rarely open more connections). */
const DEFAULT_WORKERS_MAX = 8;

const OPTION_SPECS = [
  { name: "format", short: "f", long: "format", value: true },
  { name: "exportName", short: "x", long: "export-name", value: true },
  { name: "description", short: "D", long: "description", value: true },
  { name: "port", short: "p", long: "port", value: true },
  { name: "bind", short: "b", long: "bind", value: true },
  { name: "socket", short: "k", long: "socket", value: true },
  { name: "readOnly", short: "r", long: "read-only" },
  { name: "snapshot", short: "l", long: "load-snapshot", value: true },
  { name: "persistent", short: "t", long: "persistent" },
  { name: "shared", short: "e", long: "shared", value: true },
  { name: "allocationDepth", short: "A", long: "allocation-depth" },
  { name: "pidFile", long: "pid-file", value: true },
  { name: "fork", long: "fork" },
  { name: "verbose", short: "v", long: "verbose" },
  { name: "tlsCreds", long: "tls-creds", value: true },
  { name: "object", long: "object", value: true, repeat: "list" as const },
  { name: "device", short: "c", long: "connect", value: true },
  { name: "bitmap", short: "B", long: "bitmap", value: true, repeat: "list" as const },
  { name: "imageOpts", long: "image-opts" },
  { name: "temporaryOverlay", short: "s", long: "snapshot" },
  { name: "cache", long: "cache", value: true, repeat: "list" as const },
  { name: "aio", long: "aio", value: true },
  { name: "discard", long: "discard", value: true },
  { name: "detectZeroes", long: "detect-zeroes", value: true },
  { name: "nocache", short: "n", long: "nocache" },
  { name: "workers", long: "workers", value: true },
];

export interface NbdCommandOptions {
  path: string;
  /** -l: internal snapshot to export read-only. */
  snapshot?: SnapshotSelector;
  format?: string;
  exportName: string;
  description: string;
  address: NbdListenAddress;
  readOnly: boolean;
  persistent: boolean;
  connectionsMax: number;
  allocationDepth: boolean;
  /** -B NAME, in the order given: persistent dirty bitmaps offered as qemu:dirty-bitmap:NAME contexts. */
  bitmaps: string[];
  /** -s: serve a temporary qcow2 overlay over the image, deleted at exit (the image is only read). */
  temporaryOverlay: boolean;
  /** --discard: unmap (on) lets TRIM free space; ignore (off, qemu-nbd's default) makes it a no-op. */
  discard: boolean;
  /** --detect-zeroes: off (default), on, unmap (needs --discard=unmap). */
  detectZeroes: DetectZeroes;
  pidFile?: string;
  fork: boolean;
  verbose: boolean;
  tlsDir?: string;
  tlsVerifyPeer: boolean;
  /** How image files do I/O: "sync" (default) or, with --aio=threads, "async" (see the design notes). */
  ioMode: NodeFileIoMode;
  /** How image files write: "auto" by default (large writes on the thread pool), else ioMode. */
  writeIoMode: NodeFileIoMode;
  /** --workers: data worker processes; undefined = automatic (see the design notes). */
  workers?: number;
}

/** qemu-nbd's --discard modes (bdrv_parse_discard_flags): whether TRIM and unmapping zero writes free space. */
const DISCARD_MODES: Record<string, boolean> = { ignore: false, off: false, unmap: true, on: true };
/** qemu-nbd's --detect-zeroes modes (BlockdevDetectZeroesOptions). */
const DETECT_ZEROES_MODES: readonly DetectZeroes[] = ["off", "on", "unmap"];

/** qemu-nbd's --aio modes: threads uses the thread pool; native and io_uring (Linux AIO) run like the default. */
const AIO_MODES: Readonly<Record<string, NodeFileIoMode>> = { threads: "async", native: "sync", io_uring: "sync" };

function usage(message: string): SnapstackError {
  return new SnapstackError("E_USAGE", message);
}

function parseInteger(text: string, what: string, min: number, max: number): number {
  if (!/^\d+$/.test(text) || Number(text) < min || Number(text) > max) throw usage(`Invalid ${what} '${text}'`);
  return Number(text);
}

/** qemu's `--object tls-creds-x509,id=ID,dir=DIR[,endpoint=server][,verify-peer=on|off]`. */
function parseTlsObjects(objects: readonly string[]): Map<string, { dir: string; verifyPeer: boolean }> {
  const byId = new Map<string, { dir: string; verifyPeer: boolean }>();
  for (const object of objects) {
    const [kind, ...pairs] = object.split(",");
    if (kind !== "tls-creds-x509") throw new SnapstackError("E_UNSUPPORTED_FEATURE", `--object ${kind}: only tls-creds-x509 is supported`);
    const fields = new Map(pairs.map((pair) => [pair.slice(0, pair.indexOf("=")), pair.slice(pair.indexOf("=") + 1)]));
    const id = fields.get("id");
    const dir = fields.get("dir");
    if (id === undefined || dir === undefined) throw usage(`--object ${object}: id= and dir= are required`);
    if ((fields.get("endpoint") ?? "server") !== "server") throw usage(`--object ${object}: endpoint must be 'server'`);
    byId.set(id, { dir, verifyPeer: ["on", "yes", "true"].includes(fields.get("verify-peer") ?? "off") });
  }
  return byId;
}

/** The device to export: the image with its chain, (-l) a read-only view of one of its internal snapshots, or (-s) a temporary overlay over it. */
async function openExportDevice(options: NbdCommandOptions): Promise<{ device: BlockDevice; image: BlockDevice; close(): Promise<void> }> {
  const path = options.temporaryOverlay ? await createTemporaryOverlay(options) : options.path;
  let opened: Awaited<ReturnType<typeof openSource>>;
  try {
    opened = await openSource(path, { format: options.temporaryOverlay ? "qcow2" : options.format, readOnly: options.readOnly, ioMode: options.ioMode, writeIoMode: options.writeIoMode, snapshot: options.snapshot, locks: process.env[DATA_WORKER_ENV] === "1" ? false : { fixedSize: true } });
  } finally {
    // Open, the overlay needs no name: nothing is left behind, even if the server is killed.
    if (options.temporaryOverlay) rmSync(path, { force: true });
  }
  return opened;
}

/**
 * -s (qemu-nbd --snapshot): a new qcow2 overlay over the image in the
 * temporary directory ($TMPDIR, else /tmp), its backing file named by
 * absolute path with the image's format; the image itself is opened
 * read-only under it, so it is never written.
 */
async function createTemporaryOverlay(options: NbdCommandOptions): Promise<string> {
  const base = await openImage(options.path, { format: options.format, readOnly: true });
  const backingFormat = base.format;
  await base.close();
  const path = join(tmpdir(), `snapstack-nbd-${process.pid}-${randomBytes(6).toString("hex")}.qcow2`);
  await createImage(path, { format: "qcow2", backingFile: resolve(options.path), backingFormat });
  return path;
}

/** The first qcow2 image of the chain from `image` down that has a bitmap `name` (qemu-nbd looks down the chain too). */
function bitmapHolder(image: BlockDevice, name: string): Qcow2Image | null {
  for (let layer: BlockDevice | null = image; layer !== null; layer = layer.backing) {
    if (layer instanceof Qcow2Image && layer.info().bitmaps.some((bitmap) => bitmap.name === name)) return layer;
  }
  return null;
}

/**
 * The export of the opened image, with its -B bitmaps: numbered as qemu-nbd
 * 7.2 numbers them (it prepends each -B to its list, so the last given gets
 * the first id and is listed first).
 */
async function exportFor(options: NbdCommandOptions, opened: { device: BlockDevice; image: BlockDevice }): Promise<NbdExport> {
  const dirtyBitmaps: ExportedBitmap[] = [];
  for (const name of [...options.bitmaps].reverse()) {
    const holder = bitmapHolder(opened.image, name);
    if (holder === null) throw new SnapstackError("E_NOT_FOUND", `Bitmap '${name}' is not found in ${options.path} or its backing chain`, { path: options.path });
    dirtyBitmaps.push({ name, read: await holder.bitmapReader(name) });
  }
  return new NbdExport({
    name: options.exportName,
    device: opened.device,
    description: options.description,
    allocationDepth: options.allocationDepth,
    discard: options.discard,
    detectZeroes: options.detectZeroes,
    dirtyBitmaps,
  });
}

export function parseNbdCommand(argv: readonly string[]): NbdCommandOptions {
  const parsed = parseArgs(argv, OPTION_SPECS);
  for (const [name, what] of [
    ["device", "-c (kernel NBD devices)"],
    ["imageOpts", "--image-opts"],
  ] as const) {
    if (parsed.options[name] !== undefined) throw new SnapstackError("E_UNSUPPORTED_FEATURE", `${what} is not supported by snapstack nbd`);
  }
  expectPositionals(parsed.positionals, 1, 1, "Expected exactly one file name argument");
  const socketPath = optionString(parsed, "socket");
  const portText = optionString(parsed, "port");
  const bindText = optionString(parsed, "bind");
  if (socketPath !== undefined && (portText !== undefined || bindText !== undefined)) throw usage("-k cannot be used with -p or -b");
  const address: NbdListenAddress =
    socketPath !== undefined
      ? { path: socketPath }
      : { host: bindText ?? NBD_DEFAULT_ADDRESS, port: portText === undefined ? NBD_DEFAULT_PORT : parseInteger(portText, "port", 0, 65535) };
  const sharedText = optionString(parsed, "shared");
  const connectionsMax = sharedText === undefined ? 1 : parseInteger(sharedText, "shared device number", 0, 1 << 20);
  const tlsObjects = parseTlsObjects(optionList(parsed, "object"));
  const tlsCreds = optionString(parsed, "tlsCreds");
  const tlsObject = tlsCreds !== undefined ? tlsObjects.get(tlsCreds) : undefined;
  const snapshotText = optionString(parsed, "snapshot");
  const aioText = optionString(parsed, "aio");
  if (aioText !== undefined && !Object.hasOwn(AIO_MODES, aioText)) throw usage(`Invalid aio mode '${aioText}'`);
  const ioMode = aioText === undefined ? "sync" : AIO_MODES[aioText];
  // qemu-nbd checks -n and --cache (one of them, once, a mode it knows) and then uses them; snapstack
  // goes through the page cache whatever they say.
  const cacheModes = [...optionList(parsed, "cache"), ...(optionFlag(parsed, "nocache") ? ["none"] : [])];
  if (cacheModes.length > 1) throw usage("-n and --cache can only be specified once");
  if (cacheModes.length === 1 && !isCacheMode(cacheModes[0])) throw usage(`Invalid cache mode \`${cacheModes[0]}'`);
  const discardText = optionString(parsed, "discard") ?? "ignore";
  if (!Object.hasOwn(DISCARD_MODES, discardText)) throw usage(`Invalid discard mode \`${discardText}'`);
  const detectZeroes = optionString(parsed, "detectZeroes") ?? "off";
  if (!DETECT_ZEROES_MODES.includes(detectZeroes as DetectZeroes)) throw usage(`Failed to parse detect_zeroes mode: Invalid parameter '${detectZeroes}'`);
  if (detectZeroes === "unmap" && !DISCARD_MODES[discardText]) throw usage("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap");
  const workersText = optionString(parsed, "workers");
  const bitmaps = optionList(parsed, "bitmap");
  if (bitmaps.length > 0 && snapshotText !== undefined) throw new SnapstackError("E_UNSUPPORTED_FEATURE", "-B (dirty bitmaps) cannot be combined with -l (a snapshot has no bitmaps)");
  const temporaryOverlay = optionFlag(parsed, "temporaryOverlay");
  if (temporaryOverlay && snapshotText !== undefined) throw usage("-s and -l cannot be used together (-l exports a snapshot read-only)");
  return {
    path: parsed.positionals[0],
    snapshot: snapshotText === undefined ? undefined : parseSnapshotParam(snapshotText),
    format: optionString(parsed, "format"),
    exportName: optionString(parsed, "exportName") ?? "",
    description: optionString(parsed, "description") ?? "",
    address,
    readOnly: optionFlag(parsed, "readOnly"),
    persistent: optionFlag(parsed, "persistent"),
    connectionsMax,
    allocationDepth: optionFlag(parsed, "allocationDepth"),
    bitmaps,
    temporaryOverlay,
    discard: DISCARD_MODES[discardText],
    detectZeroes: detectZeroes as DetectZeroes,
    pidFile: optionString(parsed, "pidFile"),
    fork: optionFlag(parsed, "fork"),
    verbose: optionFlag(parsed, "verbose"),
    tlsDir: tlsObject?.dir ?? tlsCreds,
    tlsVerifyPeer: tlsObject?.verifyPeer ?? false,
    ioMode,
    writeIoMode: aioText === undefined ? "auto" : ioMode,
    workers: workersText === undefined ? undefined : parseInteger(workersText, "number of workers", 0, WORKERS_MAX),
  };
}

/**
 * --fork: run this command again detached; resolve with 0 once it listens.
 * A failure before that comes back over the IPC channel as a coded error.
 * The child's stderr is the parent's only with -v (qemu-nbd keeps it
 * always, which makes `$(qemu-nbd --fork ...)` wait for the server to exit).
 */
function forkServer(argv: readonly string[], verbose: boolean): Promise<number> {
  const args = [...process.execArgv, process.argv[1], "nbd", ...argv.filter((word) => word !== "--fork")];
  const child = spawn(process.execPath, args, {
    detached: true,
    stdio: ["ignore", "ignore", verbose ? "inherit" : "ignore", "ipc"],
    env: { ...process.env, [FORK_CHILD_ENV]: "1" },
  });
  return new Promise((resolve, reject) => {
    child.once("message", (message: { ready?: boolean; error?: { code: ErrorCode; message: string } }) => {
      child.disconnect();
      child.unref();
      if (message.error !== undefined) reject(new SnapstackError(message.error.code, message.error.message));
      else resolve(0);
    });
    child.once("exit", (code) => resolve(code === 0 ? 1 : (code ?? 1)));
  });
}

/** In the --fork child: tell the parent we are listening, or why we could not. */
function reportToParent(message: { ready: true } | { error: { code: string; message: string } }): void {
  if (process.env[FORK_CHILD_ENV] !== "1" || process.send === undefined || !process.connected) return;
  process.send(message);
  process.disconnect?.();
}

function describeAddress(address: string | { address: string; port: number }): string {
  return typeof address === "string" ? address : `${address.address}:${address.port}`;
}

/** Data workers to run: --workers, or one per core (2 to 8) when more than one client may connect. */
function workerCount(options: NbdCommandOptions): number {
  if (options.workers !== undefined) return options.workers;
  // -s: each worker would make an overlay of its own.
  if (options.connectionsMax === 1 || options.tlsDir !== undefined || options.temporaryOverlay) return 0;
  return Math.min(DEFAULT_WORKERS_MAX, Math.max(2, availableParallelism()));
}

/** Start data workers for an export that has no shared mutable metadata (raw, or read-only); null when none should run. */
async function startDataWorkers(options: NbdCommandOptions, argv: readonly string[], exp: NbdExport, log: ((message: string) => void) | undefined): Promise<DataWorkerPool | null> {
  const count = workerCount(options);
  if (count === 0) return null;
  if (options.tlsDir !== undefined || !(exp.readOnly || exp.device.format === "raw")) {
    log?.(`--workers: not used for ${options.tlsDir !== undefined ? "TLS" : `a writable ${exp.device.format} export`}; serving in this process`);
    return null;
  }
  const args = ["nbd", ...argv.filter((word) => word !== "--fork")];
  const env: NodeJS.ProcessEnv = { ...process.env, [DATA_WORKER_ENV]: "1" };
  delete env[FORK_CHILD_ENV];
  const spawnWorker = (): ChildProcess => fork(SNAPSTACK_BIN, args, { env, execArgv: [], stdio: ["ignore", "ignore", "inherit", "ipc"] });
  const pool = new DataWorkerPool({ exportName: exp.name, count, spawnWorker, log });
  await pool.start();
  if (pool.readyCount === 0) log?.("no data worker started: serving in this process");
  return pool;
}

/** In a data worker: open the image and serve the connections handed over, until the main process is done. */
async function serveAsDataWorker(options: NbdCommandOptions, context: CliContext): Promise<number> {
  const log = options.verbose ? (message: string) => context.err(`snapstack nbd [worker ${process.pid}]: ${message}\n`) : undefined;
  let opened: Awaited<ReturnType<typeof openExportDevice>>;
  try {
    opened = await openExportDevice(options);
  } catch (error) {
    process.send?.({ type: "error", message: toSnapstackError(error).message });
    throw error;
  }
  try {
    const exp = await exportFor(options, opened);
    await runDataWorker({ export: exp, multiConn: options.connectionsMax !== 1, log });
    await opened.device.flush();
    return 0;
  } finally {
    await opened.close();
  }
}

async function serve(options: NbdCommandOptions, argv: readonly string[], context: CliContext): Promise<number> {
  const log = options.verbose ? (message: string) => context.err(`snapstack nbd: ${message}\n`) : undefined;
  const tls = options.tlsDir !== undefined ? loadTlsCredentials(options.tlsDir, { verifyPeer: options.tlsVerifyPeer }) : null;
  const opened = await openExportDevice(options);
  const device = opened.device;
  let server: NbdServer | null = null;
  let dataWorkers: DataWorkerPool | null = null;
  let stoppedCleanly = false;
  try {
    const exp = await exportFor(options, opened);
    dataWorkers = await startDataWorkers(options, argv, exp, log);
    server = new NbdServer({ exports: [exp], tls, connectionsMax: options.connectionsMax, log, dataWorkers });
    const bound = await server.listen(options.address);
    const activeServer = server;
    // The signal handlers go in before anyone can learn that the server is up (the log line, the
    // pid file, the --fork parent): a supervisor that signals at once must get the clean stop, not
    // the default action (seen: SIGINT right after "serving" killed a loaded machine's server).
    const stopped = new Promise<void>((resolve) => {
      let stopping = false;
      const stop = (why: string): void => {
        if (stopping) return;
        stopping = true;
        log?.(`stopping: ${why}`);
        resolve();
      };
      // The first signal stops cleanly, also when a stop is already under way (the last client
      // left: a supervisor's `kill` right after its client finished must still get the flush);
      // a second one exits at once.
      let signalsSeen = 0;
      routeStopSignals((signal) => {
        if (++signalsSeen > 1) process.exit(1);
        stop(signal);
      });
      activeServer.on("connection-closed", (info) => {
        log?.(`client disconnected (${info.reason || "closed"}); ${info.open} open`);
        if (!options.persistent && info.negotiated && info.open === 0) stop("last client left (no -t)");
      });
    });
    log?.(`serving '${options.exportName}' (${device.format}, ${device.sizeBytes} bytes${exp.readOnly ? ", read-only" : ""}) on ${describeAddress(bound)}`);
    if (options.pidFile !== undefined) writeFileSync(options.pidFile, `${process.pid}\n`);
    reportToParent({ ready: true });
    await stopped;
    await server.close();
    await device.flush();
    stoppedCleanly = true;
    return 0;
  } finally {
    await server?.close().catch(() => {});
    await dataWorkers?.close();
    await opened.close();
    if (options.pidFile !== undefined) rmSync(options.pidFile, { force: true });
    // A signal from now until the process ends exits with the command's status.
    routeStopSignals(() => process.exit(stoppedCleanly ? 0 : 1));
  }
}

/** Signals that stop the server cleanly (a second one exits at once). */
const STOP_SIGNALS: NodeJS.Signals[] = ["SIGTERM", "SIGINT", "SIGHUP"];

/** Where STOP_SIGNALS go: the running server's stop, then, once it stopped, a clean exit. */
let stopSignalRoute: ((signal: NodeJS.Signals) => void) | null = null;

/**
 * Send STOP_SIGNALS to `route` from now on. The process's handlers go in
 * once and stay until it ends (one per signal however many servers a
 * process runs), so that no signal, from the server's start to the
 * process's last moment, takes the default action and kills it with the
 * image not yet closed, or closed but with a killed status.
 */
function routeStopSignals(route: (signal: NodeJS.Signals) => void): void {
  if (stopSignalRoute === null) for (const signal of STOP_SIGNALS) process.on(signal, (received) => stopSignalRoute?.(received));
  stopSignalRoute = route;
}

export const nbdCommand: CliCommand = {
  name: "nbd",
  synopsis: "nbd [-f fmt] [-x name] [-D description] [-p port] [-b address] [-k socket] [-r] [-l snapshot] [-s] [-t] [-e shared] [-A] [-B bitmap]... [--tls-creds dir] [--pid-file file] [--fork] [--aio mode] [--discard mode] [--detect-zeroes mode] [-n | --cache mode] [--workers N] [-v] filename",
  summary: "Serve an image and its backing chain over NBD (like qemu-nbd).",
  optionHelp: [
    "  -f, --format=FMT        image format (raw, qcow2); probed when omitted",
    "  -x, --export-name=NAME  export name (default: empty)",
    "  -D, --description=TEXT  export description",
    `  -p, --port=PORT         TCP port (default ${NBD_DEFAULT_PORT}; 0 picks a free one)`,
    `  -b, --bind=ADDRESS      address to listen on (default ${NBD_DEFAULT_ADDRESS})`,
    "  -k, --socket=PATH       listen on a Unix socket instead of TCP",
    "  -r, --read-only         export read-only",
    "  -t, --persistent        keep serving after the last client disconnects",
    "  -e, --shared=N          clients served at once (default 1, 0 = no limit)",
    "  -A, --allocation-depth  offer the qemu:allocation-depth metadata context",
    "  -B, --bitmap=NAME       offer persistent dirty bitmap NAME (of the image or its chain) as qemu:dirty-bitmap:NAME; repeatable",
    "  -s, --snapshot          serve a temporary overlay over the image (writes go there, removed at exit)",
    "  --tls-creds=DIR         require TLS; DIR holds ca-cert.pem, server-cert.pem, server-key.pem",
    "  --object tls-creds-x509,id=ID,dir=DIR[,verify-peer=on]  qemu-style TLS credentials (then --tls-creds ID)",
    "  --pid-file=PATH         write the server's process id once it listens",
    "  --fork                  run in the background once listening",
    "  -v, --verbose           log connections to stderr",
    "  --aio=MODE              threads: file I/O on the thread pool (for slow disks); native, io_uring: default (event loop thread)",
    "  --discard=MODE          ignore (default: TRIM succeeds and frees nothing) or unmap (TRIM and unmapping zero writes free space)",
    "  --detect-zeroes=MODE    off (default), on (all-zero WRITEs become zero writes), unmap (that may free clusters; needs --discard=unmap)",
    "  -n, --nocache, --cache=MODE  accepted as qemu-nbd accepts them; files are read and written through the page cache",
    "  -l, --load-snapshot=SNAPSHOT  export internal snapshot SNAPSHOT (ID or name, or snapshot.id=/snapshot.name=) read-only",
    "  --workers=N             processes serving a raw or read-only export's connections after negotiation",
    "                          (default: one per core, 2 to 8; none with -e 1 or TLS; 0 = all in this process)",
  ],
  async run(argv, context) {
    const options = parseNbdCommand(argv);
    if (process.env[DATA_WORKER_ENV] === "1") return serveAsDataWorker(options, context);
    if (options.fork && process.env[FORK_CHILD_ENV] !== "1") return forkServer(argv, options.verbose);
    try {
      return await serve(options, argv, context);
    } catch (error) {
      const coded = toSnapstackError(error);
      reportToParent({ error: { code: coded.code, message: coded.message } });
      throw error;
    }
  },
};
