/**
 * Data workers: processes that serve the transmission phase of NBD
 * connections, so one export's connections run on several cores.
 *
 * Design notes
 * - The main process accepts and negotiates every connection. When a client
 *   sends GO or EXPORT_NAME for the pool's export, it is waiting for the
 *   reply and sends nothing more, so the socket moves to the worker with
 *   the fewest connections (child_process handle passing) together with the
 *   negotiated state and the unsent replies; the worker sends them and
 *   serves transmission with the ordinary NbdConnection
 *   (startTransmission). TLS connections never move (the TLS state lives
 *   in the main process).
 * - Only exports without shared mutable metadata qualify, and the caller
 *   decides that: raw files (writable or not) and read-only exports of any
 *   format. Each worker opens the image itself (its own fd, its own
 *   read-only engine). A FLUSH is an fdatasync, which covers every dirty
 *   page of the file whoever wrote it, so a flush on any connection in any
 *   process covers the writes completed on all of them (CAN_MULTI_CONN).
 * - Accounting stays in the main process: a moved connection counts in the
 *   server's connection limit until its worker reports it closed.
 * - A worker that dies takes its connections with it (the kernel closes
 *   their sockets) and is replaced; after RESPAWNS_MAX deaths, or when one
 *   dies before it was ready, the pool stops replacing them; with no worker
 *   ready, new connections are served in the main process.
 * - Workers never outlive the main process: they exit when the IPC channel
 *   closes (the main process exited, even by SIGKILL), after letting their
 *   in-flight requests finish and flushing. They ignore SIGINT, SIGTERM and
 *   SIGHUP (a terminal's Ctrl-C reaches the whole process group): the main
 *   process decides when to stop and tells them.
 * - Large writes (data-workers' raw exports): a worker serving one client
 *   alone puts them on libuv's thread pool, so the socket copy and the page
 *   cache copy run on two cores (fio, 1 MiB sequential writes, one
 *   connection: ~20% faster). Once every worker has a connection (as many
 *   connections as workers, at least two: nbdcopy's), the cores are all
 *   busy anyway, and pool threads only add wake-ups, context switches and
 *   contention for the file's inode lock: the pool tells the workers
 *   ("busy") and they write synchronously (nbdcopy into a raw export: ~25%
 *   less server CPU per GiB). See NbdConnection's syncLargeWrites.
 * - Messages carry only JSON (buffers as base64).
 */
import { EventEmitter } from "node:events";
import type { ChildProcess } from "node:child_process";
import type { Socket } from "node:net";
import { connectionLimits, NbdConnection, type ConnectionLimits, type TransmissionHandoff } from "./nbd-connection.ts";
import type { NbdExport } from "./nbd-export.ts";
import { BufferPool } from "./buffer-pool.ts";

/** Worker deaths the pool replaces before it stops starting workers. */
const RESPAWNS_MAX = 8;
/** A worker whose main process vanished exits after this even if requests still run. */
const ORPHAN_EXIT_MS = 10_000;
/** start() waits at most this long for the workers to get ready. */
const WORKER_START_WAIT_MS = 20_000;
/** close(): a worker that has not exited after this is killed. */
const WORKER_EXIT_WAIT_MS = 5_000;

type ToWorker =
  | { type: "connection"; id: number; exportName: string; structuredReplies: boolean; metaContextIds: number[]; replies: string[] }
  | { type: "busy"; allWorkersBusy: boolean }
  | { type: "shutdown" };

type FromWorker = { type: "ready"; rssBytes: number } | { type: "error"; message: string } | { type: "closed"; id: number; reason: string };

interface WorkerState {
  child: ChildProcess;
  ready: boolean;
  /** Connection id -> called once when that connection ends. */
  connections: Map<number, (reason: string) => void>;
}

export interface DataWorkerPoolOptions {
  /** The export the workers serve (each opens its own device for it). */
  exportName: string;
  /** Worker processes to keep running. */
  count: number;
  /** Start one worker process with an IPC channel (it runs runDataWorker). */
  spawnWorker(): ChildProcess;
  log?: (message: string) => void;
}

export interface DataWorkerPoolEvents {
  /** A worker is ready to take connections; rssBytes is its resident memory then. */
  "worker-ready": [info: { pid: number; rssBytes: number }];
}

export class DataWorkerPool extends EventEmitter<DataWorkerPoolEvents> {
  readonly exportName: string;
  readonly count: number;
  #spawnWorker: () => ChildProcess;
  #log: ((message: string) => void) | undefined;
  #workers = new Set<WorkerState>();
  #nextId = 1;
  #respawns = 0;
  #closing = false;
  /** What the workers were last told (see the design notes). */
  #allWorkersBusy = false;

  constructor(options: DataWorkerPoolOptions) {
    super();
    this.exportName = options.exportName;
    this.count = options.count;
    this.#spawnWorker = options.spawnWorker;
    this.#log = options.log;
  }

  /**
   * Start the workers; resolves when each is ready or has failed, or after
   * WORKER_START_WAIT_MS (a late one takes connections once ready). Until
   * one is ready, connections are served in the main process.
   */
  async start(): Promise<void> {
    const started: Promise<void>[] = [];
    for (let i = 0; i < this.count; i++) started.push(this.#startWorker());
    let timer: NodeJS.Timeout | undefined;
    const waited = new Promise<void>((resolve) => (timer = setTimeout(resolve, WORKER_START_WAIT_MS)));
    await Promise.race([Promise.all(started), waited]);
    clearTimeout(timer);
  }

  /** Workers ready to take connections. */
  get readyCount(): number {
    let ready = 0;
    for (const worker of this.#workers) if (worker.ready) ready++;
    return ready;
  }

  #startWorker(): Promise<void> {
    let child: ChildProcess;
    try {
      child = this.#spawnWorker();
    } catch (error) {
      this.#log?.(`data worker: cannot start: ${(error as Error).message}`);
      return Promise.resolve();
    }
    const worker: WorkerState = { child, ready: false, connections: new Map() };
    this.#workers.add(worker);
    return new Promise((resolve) => {
      child.on("message", (message: FromWorker) => {
        if (message.type === "ready") {
          worker.ready = true;
          this.#updateBusy(); // a respawned, idle worker ends "every worker has a connection"
          this.#log?.(`data worker ${child.pid} ready (RSS ${(message.rssBytes / 1048576).toFixed(0)} MiB)`);
          this.emit("worker-ready", { pid: child.pid ?? 0, rssBytes: message.rssBytes });
          resolve();
        } else if (message.type === "error") {
          this.#log?.(`data worker ${child.pid}: ${message.message}`);
        } else if (message.type === "closed") {
          const onClosed = worker.connections.get(message.id);
          worker.connections.delete(message.id);
          this.#updateBusy();
          onClosed?.(message.reason);
        }
      });
      child.on("error", (error) => {
        // A process that could not be started emits no 'exit'.
        this.#log?.(`data worker ${child.pid ?? "(not started)"}: ${error.message}`);
        if (child.pid === undefined) {
          this.#workers.delete(worker);
          resolve();
        }
      });
      child.once("exit", (code, signal) => {
        this.#workers.delete(worker);
        const wasReady = worker.ready;
        worker.ready = false;
        const lost = [...worker.connections.values()];
        worker.connections.clear();
        this.#updateBusy();
        for (const onClosed of lost) onClosed(`data worker exited (${signal ?? code})`);
        resolve();
        if (this.#closing) return;
        this.#log?.(`data worker ${child.pid} exited (${signal ?? code}) with ${lost.length} connections`);
        // One that never got ready (cannot open the image, say) would fail again.
        if (wasReady && ++this.#respawns <= RESPAWNS_MAX) void this.#startWorker();
        else if (this.readyCount === 0) this.#log?.("no data worker running: serving in the main process");
      });
    });
  }

  /** Whether a connection to `exp` can move to a worker now. */
  canTake(exp: NbdExport): boolean {
    return !this.#closing && exp.name === this.exportName && this.readyCount > 0;
  }

  /**
   * Move a negotiated connection to the ready worker with the fewest
   * connections; false (socket untouched, onClosed never called) when no
   * worker can take it. `onClosed` is called once, when the connection ends.
   */
  handOff(socket: Socket, handoff: TransmissionHandoff, onClosed: (reason: string) => void): boolean {
    let target: WorkerState | null = null;
    for (const worker of this.#workers) {
      if (worker.ready && worker.child.connected && (target === null || worker.connections.size < target.connections.size)) target = worker;
    }
    if (target === null || this.#closing) return false;
    const id = this.#nextId++;
    const worker = target;
    worker.connections.set(id, onClosed);
    const message: ToWorker = { type: "connection", id, exportName: handoff.exportName, structuredReplies: handoff.structuredReplies, metaContextIds: handoff.metaContextIds, replies: handoff.replies.map((reply) => reply.toString("base64")) };
    worker.child.send(message, socket, (error) => {
      if (error === null) return;
      socket.destroy();
      if (worker.connections.delete(id)) onClosed(`cannot reach data worker: ${error.message}`);
      this.#updateBusy();
    });
    this.#updateBusy();
    return true;
  }

  /** Tell the workers when "every worker has a connection" changes (see the design notes). */
  #updateBusy(): void {
    let total = 0;
    let idleWorker = false;
    for (const worker of this.#workers) {
      if (!worker.ready) continue;
      total += worker.connections.size;
      if (worker.connections.size === 0) idleWorker = true;
    }
    const busy = !idleWorker && total >= Math.max(2, this.count);
    if (busy === this.#allWorkersBusy) return;
    this.#allWorkersBusy = busy;
    for (const worker of this.#workers) if (worker.ready && worker.child.connected) worker.child.send({ type: "busy", allWorkersBusy: busy } satisfies ToWorker);
  }

  /** Stop taking connections and let the workers' connections finish their in-flight requests and end. */
  shutdownConnections(): void {
    this.#closing = true;
    for (const worker of this.#workers) if (worker.child.connected) worker.child.send({ type: "shutdown" } satisfies ToWorker);
  }

  /** End the workers (closing the IPC channel makes them exit) and wait for them. */
  async close(): Promise<void> {
    this.#closing = true;
    const exits: Promise<unknown>[] = [];
    for (const worker of this.#workers) {
      const child = worker.child;
      if (child.exitCode !== null || child.signalCode !== null) continue;
      exits.push(
        new Promise<void>((resolve) => {
          const timer = setTimeout(() => child.kill("SIGKILL"), WORKER_EXIT_WAIT_MS);
          child.once("exit", () => {
            clearTimeout(timer);
            resolve();
          });
        }),
      );
      if (child.connected) child.disconnect();
    }
    await Promise.all(exits);
  }
}

export interface DataWorkerOptions {
  export: NbdExport;
  multiConn: boolean;
  limits?: Partial<ConnectionLimits>;
  log?: (message: string) => void;
}

/**
 * The worker's side: serve the connections the main process hands over
 * until it disconnects; resolves once they have all ended. Call it in a
 * process started with an IPC channel, after opening the export's device.
 */
export function runDataWorker(options: DataWorkerOptions): Promise<void> {
  const send = process.send?.bind(process);
  if (send === undefined) throw new Error("runDataWorker needs an IPC channel to the main process");
  const exp = options.export;
  const connections = new Map<number, NbdConnection>();
  const pool = new BufferPool();
  const limits = connectionLimits(options.limits);
  let stopping = false;
  /** The pool's last "busy" message: every worker has a connection. */
  let allWorkersBusy = false;
  let allEnded: (() => void) | null = null;
  const report = (message: FromWorker): void => {
    if (process.connected) send(message);
  };
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) process.on(signal, () => {});

  const serve = (message: Extract<ToWorker, { type: "connection" }>, socket: Socket | undefined): void => {
    if (socket === undefined || stopping || message.exportName !== exp.name) {
      socket?.destroy();
      report({ type: "closed", id: message.id, reason: "data worker could not serve it" });
      return;
    }
    const connection = new NbdConnection(socket, {
      findExport: (name) => (name === exp.name ? exp : undefined),
      listExports: () => [exp],
      tlsConfigured: false,
      tls: null,
      multiConn: options.multiConn,
      limits,
      pool,
      log: options.log,
      syncLargeWrites: () => allWorkersBusy,
      onClosed: (closed) => {
        connections.delete(message.id);
        report({ type: "closed", id: message.id, reason: closed.closeReason });
        if (connections.size === 0) {
          pool.clear();
          if (stopping) allEnded?.();
        }
      },
    });
    connections.set(message.id, connection);
    options.log?.(`serving a connection to '${exp.name}' (${connections.size} in this worker)`);
    const handoff: TransmissionHandoff = {
      exportName: message.exportName,
      structuredReplies: message.structuredReplies,
      metaContextIds: message.metaContextIds,
      replies: message.replies.map((reply) => Buffer.from(reply, "base64")),
    };
    connection.startTransmission(exp, handoff);
  };

  return new Promise((resolve) => {
    const stop = (): void => {
      if (stopping) return;
      stopping = true;
      if (connections.size === 0) {
        resolve();
        return;
      }
      allEnded = resolve;
      for (const connection of connections.values()) connection.shutdown();
    };
    process.on("message", (message: ToWorker, socket: Socket | undefined) => {
      if (message.type === "connection") serve(message, socket);
      else if (message.type === "busy") allWorkersBusy = message.allWorkersBusy;
      else if (message.type === "shutdown") stop();
    });
    process.once("disconnect", () => {
      // The main process is gone (or done with us): finish, but never linger.
      setTimeout(() => process.exit(1), ORPHAN_EXIT_MS).unref();
      stop();
    });
    report({ type: "ready", rssBytes: process.memoryUsage.rss() });
  });
}
