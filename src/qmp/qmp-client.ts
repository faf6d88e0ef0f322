/**
 * A QMP client over a Unix socket: the greeting, capability negotiation,
 * commands with replies matched by id, and events. It knows nothing of disks
 * or machines.
 *
 * Design notes
 * - States: connecting -> greeting (waiting for QEMU's {"QMP": ...}) ->
 *   negotiating (qmp_capabilities sent) -> ready -> closed. `execute` is
 *   accepted only in `ready`; in any other state it fails with an error
 *   naming the state. `connect` resolves only once `ready` is reached.
 * - Every command carries an id ("snapstack-N"); QEMU echoes it, so replies
 *   are matched by id, not by order. A reply without an id (QEMU could not
 *   parse the command) belongs to the oldest command still waiting: QEMU
 *   answers in order.
 * - A command that times out is forgotten: its late reply, if any, is
 *   dropped. The connection stays usable.
 * - Events are emitted as "event" with {event, data, timestampMs};
 *   `waitForEvent` listens for one, bounded by a timeout. Register the wait
 *   before running the command that causes the event, or the event may pass
 *   before anyone listens.
 * - When the connection ends (QEMU exited, `close`), every waiting command
 *   and event wait fails with E_QEMU and "close" is emitted once.
 */
import { EventEmitter } from "node:events";
import net from "node:net";
import { SnapstackError } from "../base/errors.ts";
import { QmpParser, encodeQmpCommand, type QmpMessage } from "./qmp-parser.ts";

/** Default bound for a command's reply; migration waits use their own. */
export const QMP_COMMAND_TIMEOUT_MS = 30_000;
/** Default bound for reaching `ready` (socket appearing + greeting + negotiation). */
export const QMP_CONNECT_TIMEOUT_MS = 10_000;
/** Pause between attempts while the socket does not exist or refuses. */
const CONNECT_RETRY_MS = 20;

export type QmpState = "connecting" | "greeting" | "negotiating" | "ready" | "closed";

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  /** QEMU's timestamp, in milliseconds since the epoch. */
  timestampMs: number;
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

export interface QmpConnectOptions {
  /** Bound for the whole connect, retries included. Default QMP_CONNECT_TIMEOUT_MS. */
  timeoutMs?: number;
  /** Stop retrying (e.g. the QEMU process exited). */
  signal?: AbortSignal;
}

export interface QmpClientEvents {
  event: [event: QmpEvent];
  close: [error: Error | null];
}

interface PendingCommand {
  command: string;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout | null;
}

export class QmpClient extends EventEmitter<QmpClientEvents> {
  readonly socketPath: string;
  #socket: net.Socket;
  #parser = new QmpParser();
  #state: QmpState = "greeting";
  #greeting: QmpGreeting | null = null;
  #onGreeting: ((greeting: QmpGreeting) => void) | null = null;
  #pending = new Map<string, PendingCommand>();
  #nextId = 1;
  #closeError: Error | null = null;
  #closed: Promise<void>;

  private constructor(socketPath: string, socket: net.Socket) {
    super();
    this.socketPath = socketPath;
    this.#socket = socket;
    this.#closed = new Promise((resolve) => socket.once("close", () => resolve()));
    socket.on("data", (chunk: Buffer) => this.#onData(chunk));
    socket.on("error", (error) => this.#shutdown(new SnapstackError("E_QEMU", `QMP connection ${socketPath}: ${error.message}`)));
    socket.on("close", () => this.#shutdown(null));
  }

  /** Connect (retrying while the socket is absent or refuses), read the greeting, negotiate. */
  static async connect(socketPath: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? QMP_CONNECT_TIMEOUT_MS;
    const deadline = Date.now() + timeoutMs;
    const socket = await connectSocket(socketPath, deadline, options.signal);
    const client = new QmpClient(socketPath, socket);
    try {
      await client.#handshake(Math.max(1, deadline - Date.now()));
    } catch (error) {
      await client.close();
      throw error;
    }
    return client;
  }

  get state(): QmpState {
    return this.#state;
  }

  /** QEMU's greeting (version, capabilities); null before it arrived. */
  get greeting(): QmpGreeting | null {
    return this.#greeting;
  }

  /** Run a command; resolves to its "return" value, rejects with E_QMP (QEMU's class and description) or E_TIMEOUT. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, options: { timeoutMs?: number } = {}): Promise<T> {
    if (this.#state !== "ready") {
      return Promise.reject(new SnapstackError("E_QEMU", `QMP command '${command}' needs a ready connection; the connection is ${this.#state}`, { command, state: this.#state }));
    }
    return this.#send<T>(command, args, options.timeoutMs ?? QMP_COMMAND_TIMEOUT_MS);
  }

  /**
   * Wait for the next event named `name` whose data passes `predicate`.
   * Resolves to the event; rejects with E_TIMEOUT, or E_QEMU if the
   * connection closes first.
   */
  waitForEvent(name: string, timeoutMs: number, predicate: (data: Record<string, unknown>) => boolean = () => true): Promise<QmpEvent> {
    if (this.#state === "closed") return Promise.reject(this.#closedError(`waiting for event ${name}`));
    return new Promise((resolve, reject) => {
      const onEvent = (event: QmpEvent): void => {
        if (event.event !== name) return;
        let matches: boolean;
        try {
          matches = predicate(event.data);
        } catch (error) {
          finish();
          reject(error as Error);
          return;
        }
        if (!matches) return;
        finish();
        resolve(event);
      };
      const onClose = (): void => {
        finish();
        reject(this.#closedError(`waiting for event ${name}`));
      };
      const timer = setTimeout(() => {
        finish();
        reject(new SnapstackError("E_TIMEOUT", `QMP event ${name} did not arrive within ${timeoutMs} ms`, { event: name, timeoutMs }));
      }, timeoutMs);
      const finish = (): void => {
        clearTimeout(timer);
        this.off("event", onEvent);
        this.off("close", onClose);
      };
      this.on("event", onEvent);
      this.on("close", onClose);
    });
  }

  /** End the connection; waiting commands fail with E_QEMU. Idempotent. */
  async close(): Promise<void> {
    if (!this.#socket.destroyed) this.#socket.destroy();
    this.#shutdown(null);
    await this.#closed;
  }

  async #handshake(timeoutMs: number): Promise<void> {
    const greeting = await new Promise<QmpGreeting>((resolve, reject) => {
      if (this.#greeting !== null) {
        resolve(this.#greeting);
        return;
      }
      const timer = setTimeout(() => {
        this.off("close", onClose);
        reject(new SnapstackError("E_TIMEOUT", `QMP ${this.socketPath}: no greeting within ${timeoutMs} ms`, { timeoutMs }));
      }, timeoutMs);
      const onClose = (): void => {
        clearTimeout(timer);
        reject(this.#closedError("waiting for the QMP greeting"));
      };
      this.once("close", onClose);
      this.#onGreeting = (value) => {
        clearTimeout(timer);
        this.off("close", onClose);
        resolve(value);
      };
    });
    this.#greeting = greeting;
    this.#state = "negotiating";
    await this.#send("qmp_capabilities", undefined, timeoutMs);
    this.#state = "ready";
  }

  #send<T>(command: string, args: Record<string, unknown> | undefined, timeoutMs: number): Promise<T> {
    const id = `snapstack-${this.#nextId++}`;
    return new Promise<T>((resolve, reject) => {
      const entry: PendingCommand = { command, resolve: resolve as (value: unknown) => void, reject, timer: null };
      entry.timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new SnapstackError("E_TIMEOUT", `QMP command '${command}' got no reply within ${timeoutMs} ms`, { command, timeoutMs }));
      }, timeoutMs);
      this.#pending.set(id, entry);
      this.#socket.write(encodeQmpCommand(command, args, id));
    });
  }

  #onData(chunk: Buffer): void {
    let messages: QmpMessage[];
    try {
      messages = this.#parser.feed(chunk);
    } catch (error) {
      this.#shutdown(error as Error);
      this.#socket.destroy();
      return;
    }
    for (const message of messages) this.#dispatch(message);
  }

  #dispatch(message: QmpMessage): void {
    if ("QMP" in message) {
      const greeting = message.QMP as QmpGreeting;
      this.#greeting = greeting;
      this.#onGreeting?.(greeting);
      this.#onGreeting = null;
      return;
    }
    if (typeof message.event === "string") {
      this.emit("event", decodeEvent(message));
      return;
    }
    if ("return" in message || "error" in message) {
      const id = typeof message.id === "string" ? message.id : this.#pending.keys().next().value;
      if (id === undefined) return;
      const entry = this.#pending.get(id);
      if (entry === undefined) return; // timed out earlier
      this.#pending.delete(id);
      if (entry.timer !== null) clearTimeout(entry.timer);
      if ("error" in message) entry.reject(qmpCommandError(entry.command, message.error));
      else entry.resolve(message.return);
    }
    // Anything else is ignored: QMP allows new members and message kinds.
  }

  #shutdown(error: Error | null): void {
    if (this.#state === "closed") return;
    this.#state = "closed";
    this.#closeError = error;
    for (const entry of this.#pending.values()) {
      if (entry.timer !== null) clearTimeout(entry.timer);
      entry.reject(this.#closedError(`QMP command '${entry.command}'`));
    }
    this.#pending.clear();
    this.emit("close", error);
  }

  #closedError(what: string): SnapstackError {
    const why = this.#closeError ? `: ${this.#closeError.message}` : "";
    return new SnapstackError("E_QEMU", `${what}: the QMP connection ${this.socketPath} closed${why}`, { socketPath: this.socketPath });
  }
}

function decodeEvent(message: QmpMessage): QmpEvent {
  const stamp = message.timestamp as { seconds?: number; microseconds?: number } | undefined;
  const timestampMs = stamp && typeof stamp.seconds === "number" ? stamp.seconds * 1000 + (stamp.microseconds ?? 0) / 1000 : Date.now();
  const data = message.data !== null && typeof message.data === "object" ? (message.data as Record<string, unknown>) : {};
  return { event: message.event as string, data, timestampMs };
}

/** QEMU's {"class": ..., "desc": ...} as a coded error. */
export function qmpCommandError(command: string, error: unknown): SnapstackError {
  const body = (error ?? {}) as { class?: unknown; desc?: unknown };
  const errorClass = typeof body.class === "string" ? body.class : "GenericError";
  const description = typeof body.desc === "string" ? body.desc : JSON.stringify(error);
  return new SnapstackError("E_QMP", `QMP command '${command}' failed: ${errorClass}: ${description}`, { command, errorClass, description });
}

function connectSocket(socketPath: string, deadline: number, signal: AbortSignal | undefined): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const attempt = (): void => {
      if (signal?.aborted) {
        reject(new SnapstackError("E_QEMU", `QMP ${socketPath}: connect abandoned: ${String(signal.reason ?? "aborted")}`));
        return;
      }
      const socket = net.createConnection({ path: socketPath });
      socket.once("connect", () => {
        socket.removeAllListeners("error");
        resolve(socket);
      });
      socket.once("error", (error: NodeJS.ErrnoException) => {
        socket.destroy();
        const retryable = error.code === "ENOENT" || error.code === "ECONNREFUSED";
        if (retryable && Date.now() + CONNECT_RETRY_MS < deadline) {
          setTimeout(attempt, CONNECT_RETRY_MS);
          return;
        }
        const code = retryable ? "E_TIMEOUT" : "E_QEMU";
        reject(new SnapstackError(code, `cannot connect to QMP socket ${socketPath}: ${error.code ?? error.message}`, { socketPath, errno: error.code }));
      });
    };
    attempt();
  });
}
