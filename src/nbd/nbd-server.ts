/**
 * The NBD server: exports by name, listeners on TCP and Unix sockets,
 * connection limits, shutdown.
 *
 * Design notes
 * - Several exports at once; clients pick one by name (GO, INFO,
 *   EXPORT_NAME) and LIST shows them all. Exports can be added and removed
 *   while serving; a removed export keeps serving the connections already
 *   on it.
 * - connectionsMax (qemu-nbd -e): connections beyond it are accepted by the
 *   kernel but wait, without a greeting, until a slot frees, as qemu-nbd
 *   leaves them in the listen backlog; so a client that reconnects right
 *   after closing (fio's size probe) is never refused. At most
 *   PENDING_CONNECTIONS_MAX wait; more are closed. A waiting socket is
 *   read, so a client that gives up while waiting leaves the queue at once.
 *   0 means
 *   CONNECTIONS_HARD_MAX, so no setting allows unbounded connections.
 * - CAN_MULTI_CONN is advertised unless connectionsMax is 1 (as qemu-nbd:
 *   with one client there is nobody to be consistent with). Every connection
 *   to an export uses the one device object, so a flush anywhere covers
 *   writes completed everywhere.
 * - TLS: with a secure context every connection must STARTTLS (FORCEDTLS).
 * - close(): stop listening, let every connection finish its in-flight
 *   requests and end, then resolve. Devices belong to the caller.
 * - dataWorkers (data-workers.ts): connections to the pool's export move to
 *   worker processes once negotiated (not TLS ones: their state is here).
 *   They count against connectionsMax until their worker reports them
 *   closed, and close() waits for them too; the pool belongs to the caller.
 */
import { EventEmitter } from "node:events";
import net from "node:net";
import { rmSync } from "node:fs";
import { SnapstackError } from "../base/errors.ts";
import { listenUnixSocket } from "../io/unix-listen.ts";
import { connectionLimits, NbdConnection, type ConnectionEnv, type ConnectionLimits, type TransmissionHandoff } from "./nbd-connection.ts";
import type { NbdExport } from "./nbd-export.ts";
import type { TlsCredentials } from "./tls-credentials.ts";
import { BufferPool } from "./buffer-pool.ts";
import type { DataWorkerPool } from "./data-workers.ts";
import { CONNECTIONS_HARD_MAX, PENDING_CONNECTIONS_MAX } from "./protocol.ts";

/** Bytes a waiting connection may send before its greeting; more closes it. */
const PENDING_EARLY_BYTES_MAX = 64 * 1024;

/** What the server needs of a DataWorkerPool. */
export type DataWorkers = Pick<DataWorkerPool, "canTake" | "handOff" | "shutdownConnections">;

export interface NbdServerOptions {
  exports?: NbdExport[];
  /** TLS credentials (loadTlsCredentials); when given, TLS is required of every client. */
  tls?: TlsCredentials | null;
  /** Clients served at once (qemu-nbd -e); 0 = CONNECTIONS_HARD_MAX. Default 0. */
  connectionsMax?: number;
  handshakeTimeoutMs?: number;
  /** How long a draining connection may take to hand over its last replies (DRAIN_TIMEOUT_MS). */
  drainTimeoutMs?: number;
  inFlightBytesMax?: number;
  inFlightRequestsMax?: number;
  optionsPerHandshakeMax?: number;
  /** Diagnostic lines (qemu-nbd -v). */
  log?: (message: string) => void;
  /** Worker processes that serve negotiated connections to their export (see the design notes). */
  dataWorkers?: DataWorkers | null;
}

export type NbdListenAddress = { host: string; port: number } | { path: string };

export interface NbdServerEvents {
  /** A connection closed; `negotiated` tells whether it reached transmission. */
  "connection-closed": [info: { negotiated: boolean; reason: string; open: number }];
  "connection-negotiated": [info: { exportName: string; open: number }];
}

export class NbdServer extends EventEmitter<NbdServerEvents> {
  readonly tls: TlsCredentials | null;
  readonly connectionsMax: number;
  #exports = new Map<string, NbdExport>();
  #connections = new Set<NbdConnection>();
  /** Connections moved to a data worker and not yet reported closed. */
  #movedCount = 0;
  #dataWorkers: DataWorkers | null;
  #pending: net.Socket[] = [];
  /** What a waiting socket sent before its turn (nothing, from a client that follows the protocol). */
  #earlyBytes = new WeakMap<net.Socket, Buffer[]>();
  #listeners: Array<{ server: net.Server; path: string | null }> = [];
  #limits: ConnectionLimits;
  #log: ((message: string) => void) | undefined;
  #pool = new BufferPool();
  #closing = false;
  #allClosed: (() => void) | null = null;

  constructor(options: NbdServerOptions = {}) {
    super();
    const connectionsMax = options.connectionsMax ?? 0;
    if (!Number.isSafeInteger(connectionsMax) || connectionsMax < 0) {
      throw new SnapstackError("E_INVALID_OPTION", `connection limit ${connectionsMax} must be a non-negative integer`);
    }
    this.connectionsMax = connectionsMax === 0 ? CONNECTIONS_HARD_MAX : Math.min(connectionsMax, CONNECTIONS_HARD_MAX);
    this.tls = options.tls ?? null;
    this.#limits = connectionLimits(options);
    this.#log = options.log;
    this.#dataWorkers = options.dataWorkers ?? null;
    for (const exp of options.exports ?? []) this.addExport(exp);
  }

  addExport(exp: NbdExport): void {
    if (this.#exports.has(exp.name)) throw new SnapstackError("E_EXISTS", `an export named '${exp.name}' already exists`);
    this.#exports.set(exp.name, exp);
  }

  removeExport(name: string): NbdExport | undefined {
    const exp = this.#exports.get(name);
    this.#exports.delete(name);
    return exp;
  }

  getExport(name: string): NbdExport | undefined {
    return this.#exports.get(name);
  }

  get exports(): NbdExport[] {
    return [...this.#exports.values()];
  }

  /** Connections open (handshake or transmission, here or in a data worker), not counting those waiting for a slot. */
  get connectionCount(): number {
    return this.#connections.size + this.#movedCount;
  }

  get multiConn(): boolean {
    return this.connectionsMax !== 1;
  }

  /**
   * Listen on a TCP address or a Unix socket path; resolves to the bound
   * address. A socket file nobody listens on any more (a server that was
   * killed leaves it behind) is removed and the listen tried again, as
   * qemu-nbd removes it; one a live server listens on is refused
   * (E_EXISTS), where qemu-nbd would take its path.
   */
  async listen(address: NbdListenAddress): Promise<net.AddressInfo | string> {
    if (this.#closing) throw new SnapstackError("E_USAGE", "the server is closed");
    const server = net.createServer({ allowHalfOpen: true, noDelay: true, pauseOnConnect: true }, (socket) => this.acceptSocket(socket));
    const path = "path" in address ? address.path : null;
    const refusal = (error: NodeJS.ErrnoException): SnapstackError => {
      const where = path ?? `${(address as { host: string }).host}:${(address as { port: number }).port}`;
      return new SnapstackError(error.code === "EADDRINUSE" ? "E_EXISTS" : "E_IO", `cannot listen on ${where}: ${error.message}`, { errno: error.code });
    };
    if (path !== null) await listenUnixSocket(server, path, { ownerOnly: false, refusal: (_failure, error) => refusal(error) });
    else {
      await new Promise<void>((resolve, reject) => {
        server.once("error", (error: NodeJS.ErrnoException) => reject(refusal(error)));
        server.listen({ host: (address as { host: string }).host, port: (address as { port: number }).port }, () => resolve());
      });
      server.removeAllListeners("error");
    }
    server.on("error", (error) => this.#log?.(`listener error: ${error.message}`));
    this.#listeners.push({ server, path });
    return server.address() ?? "";
  }

  /** Serve a socket accepted elsewhere (socket activation, tests). */
  acceptSocket(socket: net.Socket): void {
    if (this.#closing) {
      socket.destroy();
      return;
    }
    if (this.connectionCount >= this.connectionsMax) {
      if (this.#pending.length >= PENDING_CONNECTIONS_MAX) {
        socket.destroy();
        return;
      }
      this.#pending.push(socket);
      socket.once("close", () => {
        const index = this.#pending.indexOf(socket);
        if (index >= 0) this.#pending.splice(index, 1);
      });
      socket.on("error", () => {});
      // Read while it waits, or a client that gave up (a probe, a retry) would hold its place until
      // the kernel told us, which it does only when read: 128 such made every new client refused.
      // A client sends nothing before the greeting; what one sends anyway is kept for its connection.
      const early: Buffer[] = [];
      let earlyBytes = 0;
      socket.on("data", (chunk: Buffer) => {
        early.push(chunk);
        earlyBytes += chunk.length;
        if (earlyBytes > PENDING_EARLY_BYTES_MAX) socket.destroy();
      });
      socket.on("end", () => socket.destroy());
      this.#earlyBytes.set(socket, early);
      socket.resume();
      return;
    }
    this.#startConnection(socket);
  }

  #startConnection(socket: net.Socket): void {
    const connection = new NbdConnection(socket, this.#connectionEnv());
    this.#connections.add(connection);
    connection.start();
  }

  #connectionEnv(): ConnectionEnv {
    return {
      findExport: (name) => this.#exports.get(name),
      listExports: () => this.#exports.values(),
      tlsConfigured: this.tls !== null,
      tls: this.tls,
      multiConn: this.multiConn,
      limits: this.#limits,
      pool: this.#pool,
      log: this.#log,
      onClosed: (connection) => this.#connectionClosed(connection),
      onNegotiated: (connection) => this.emit("connection-negotiated", { exportName: connection.exportName ?? "", open: this.connectionCount }),
      handOff: (connection, exp) => this.#handOff(connection, exp),
    };
  }

  /** env.handOff: move a negotiated connection to a data worker when the pool serves its export. */
  #handOff(connection: NbdConnection, exp: NbdExport): ((socket: net.Socket, handoff: TransmissionHandoff) => void) | null {
    const pool = this.#dataWorkers;
    if (pool === null || this.tls !== null || this.#closing || !pool.canTake(exp)) return null;
    return (socket, handoff) => {
      this.#connections.delete(connection);
      if (socket.destroyed || this.#closing) {
        socket.destroy();
        this.#released(true, "closed before transmission");
        return;
      }
      this.#movedCount++;
      let open = true;
      const moved = pool.handOff(socket, handoff, (reason) => {
        if (!open) return;
        open = false;
        this.#movedCount--;
        this.#released(true, reason);
      });
      if (moved) {
        this.emit("connection-negotiated", { exportName: exp.name, open: this.connectionCount });
        return;
      }
      // The last worker went away meanwhile: serve it here after all.
      this.#movedCount--;
      const here = new NbdConnection(socket, this.#connectionEnv());
      this.#connections.add(here);
      here.startTransmission(exp, handoff);
    };
  }

  #connectionClosed(connection: NbdConnection): void {
    if (!this.#connections.delete(connection)) return;
    this.#released(connection.negotiated, connection.closeReason);
  }

  /** A connection (here or in a data worker) ended: start waiting ones, settle close(). */
  #released(negotiated: boolean, reason: string): void {
    this.emit("connection-closed", { negotiated, reason, open: this.connectionCount });
    while (!this.#closing && this.#pending.length > 0 && this.connectionCount < this.connectionsMax) {
      const next = this.#pending.shift()!;
      next.pause();
      for (const event of ["close", "error", "data", "end"]) next.removeAllListeners(event);
      const early = this.#earlyBytes.get(next) ?? [];
      this.#earlyBytes.delete(next);
      if (next.destroyed) continue;
      if (early.length > 0) next.unshift(Buffer.concat(early));
      this.#startConnection(next);
    }
    if (this.#connections.size === 0) this.#pool.clear();
    if (this.#closing && this.connectionCount === 0) this.#allClosed?.();
  }

  /**
   * Stop listening, finish in-flight requests, end every connection (a
   * client that does not take its replies is cut off after drainTimeoutMs),
   * then wait until no request runs on any export's device: the caller may
   * flush and close the devices when this resolves.
   */
  async close(): Promise<void> {
    if (!this.#closing) {
      this.#closing = true;
      for (const socket of this.#pending) socket.destroy();
      this.#pending = [];
      for (const { server, path } of this.#listeners) {
        server.close();
        if (path !== null) rmSync(path, { force: true });
      }
      this.#listeners = [];
    }
    if (this.connectionCount > 0) {
      const done = new Promise<void>((resolve) => (this.#allClosed = resolve));
      for (const connection of this.#connections) connection.shutdown();
      this.#dataWorkers?.shutdownConnections();
      await done;
    }
    // A connection cut off (or whose client vanished) may leave requests running on a device.
    for (const exp of this.#exports.values()) await exp.idle();
  }
}
