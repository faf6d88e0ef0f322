/**
 * A raw-socket NBD client for protocol tests: it sends exactly the bytes a
 * test asks for (malformed ones included) and reads replies field by field.
 * Every wait is bounded by a timeout so a server that fails to reply fails
 * the test instead of hanging it.
 */
import net from "node:net";
import tls from "node:tls";

export const IHAVEOPT = 0x49484156454f5054n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
const WAIT_MS = 10_000;

export type Endpoint = { path: string } | { host: string; port: number };

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export type Reply =
  | { kind: "simple"; error: number; cookie: bigint; data: Buffer }
  | { kind: "chunk"; flags: number; type: number; cookie: bigint; payload: Buffer };

export interface RequestFields {
  type: number;
  flags?: number;
  cookie?: bigint;
  offset?: bigint | number;
  length?: number;
  payload?: Uint8Array;
  magic?: number;
}

export class RawNbdClient {
  socket: net.Socket;
  #buffer = Buffer.alloc(0);
  #waiter: (() => void) | null = null;
  closed = false;
  #closedPromise: Promise<void>;

  constructor(socket: net.Socket) {
    this.socket = socket;
    this.#closedPromise = new Promise((resolve) => socket.once("close", () => resolve()));
    this.#attach(socket);
  }

  #attach(socket: net.Socket): void {
    socket.on("data", (chunk: Buffer) => {
      this.#buffer = Buffer.concat([this.#buffer, chunk]);
      this.#waiter?.();
    });
    socket.on("close", () => {
      this.closed = true;
      this.#waiter?.();
    });
    socket.on("error", () => {});
  }

  static connect(endpoint: Endpoint): Promise<RawNbdClient> {
    return new Promise((resolve, reject) => {
      const socket = "path" in endpoint ? net.connect(endpoint.path) : net.connect(endpoint.port, endpoint.host);
      socket.once("connect", () => resolve(new RawNbdClient(socket)));
      socket.once("error", reject);
    });
  }

  /** Resolve with exactly n bytes; reject if the connection closes first or the wait times out. */
  async read(n: number, timeoutMs = WAIT_MS): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.#buffer.length < n) {
      if (this.closed) throw new Error(`connection closed with ${this.#buffer.length}/${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.#buffer.length})`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.#waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.#waiter = null;
    }
    const out = this.#buffer.subarray(0, n);
    this.#buffer = this.#buffer.subarray(n);
    return Buffer.from(out);
  }

  /** Bytes received and not yet read. */
  get pending(): number {
    return this.#buffer.length;
  }

  write(data: Uint8Array): void {
    this.socket.write(data);
  }

  /** True when the server closes within timeoutMs. */
  async waitClosed(timeoutMs = WAIT_MS): Promise<boolean> {
    if (this.closed) return true;
    const timer = new Promise<false>((resolve) => setTimeout(() => resolve(false), timeoutMs).unref());
    return Promise.race([this.#closedPromise.then(() => true as const), timer]);
  }

  close(): void {
    this.socket.destroy();
  }

  /** Read the greeting and send client flags (default FIXED_NEWSTYLE | NO_ZEROES). */
  async handshake(clientFlags = 3): Promise<{ handshakeFlags: number }> {
    const greeting = await this.read(18);
    if (greeting.toString("latin1", 0, 8) !== "NBDMAGIC") throw new Error("bad greeting");
    if (greeting.readBigUInt64BE(8) !== IHAVEOPT) throw new Error("not newstyle");
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(clientFlags >>> 0);
    this.write(flags);
    return { handshakeFlags: greeting.readUInt16BE(16) };
  }

  sendOption(option: number, data: Uint8Array = Buffer.alloc(0), lengthOverride?: number): void {
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(IHAVEOPT, 0);
    header.writeUInt32BE(option >>> 0, 8);
    header.writeUInt32BE(lengthOverride ?? data.length, 12);
    this.write(Buffer.concat([header, data]));
  }

  async readOptionReply(): Promise<OptionReply> {
    const header = await this.read(20);
    if (header.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new Error(`bad option reply magic ${header.toString("hex")}`);
    const length = header.readUInt32BE(16);
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data: length > 0 ? await this.read(length) : Buffer.alloc(0) };
  }

  /** Replies up to and including the final one (ACK or an error). */
  async readOptionReplies(): Promise<OptionReply[]> {
    const replies: OptionReply[] = [];
    for (let i = 0; i < 10_000; i++) {
      const reply = await this.readOptionReply();
      replies.push(reply);
      if (reply.type === 1 || reply.type >= 0x80000000) return replies;
    }
    throw new Error("too many option replies");
  }

  async option(option: number, data: Uint8Array = Buffer.alloc(0)): Promise<OptionReply[]> {
    this.sendOption(option, data);
    return this.readOptionReplies();
  }

  /** STARTTLS: returns once the TLS session is up (the client keeps using this object). */
  async startTls(options: tls.ConnectionOptions): Promise<void> {
    const replies = await this.option(5);
    if (replies[0].type !== 1) throw new Error(`STARTTLS refused: 0x${replies[0].type.toString(16)}`);
    this.socket.removeAllListeners("data");
    const secure = tls.connect({ ...options, socket: this.socket });
    await new Promise<void>((resolve, reject) => {
      secure.once("secureConnect", () => resolve());
      secure.once("error", reject);
    });
    this.socket = secure;
    this.#attach(secure);
  }

  sendRequest(fields: RequestFields): void {
    const header = Buffer.alloc(28);
    header.writeUInt32BE(fields.magic ?? REQUEST_MAGIC, 0);
    header.writeUInt16BE(fields.flags ?? 0, 4);
    header.writeUInt16BE(fields.type, 6);
    header.writeBigUInt64BE(fields.cookie ?? 1n, 8);
    header.writeBigUInt64BE(BigInt(fields.offset ?? 0), 16);
    header.writeUInt32BE(fields.length ?? fields.payload?.length ?? 0, 24);
    this.write(fields.payload !== undefined ? Buffer.concat([header, fields.payload]) : header);
  }

  /** One reply: a simple reply (reading `simpleDataBytes` of data when error is 0) or one structured chunk. */
  async readReply(simpleDataBytes = 0): Promise<Reply> {
    const magic = (await this.read(4)).readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const rest = await this.read(12);
      const error = rest.readUInt32BE(0);
      const data = error === 0 && simpleDataBytes > 0 ? await this.read(simpleDataBytes) : Buffer.alloc(0);
      return { kind: "simple", error, cookie: rest.readBigUInt64BE(4), data };
    }
    if (magic === STRUCTURED_REPLY_MAGIC) {
      const rest = await this.read(16);
      const length = rest.readUInt32BE(12);
      return { kind: "chunk", flags: rest.readUInt16BE(0), type: rest.readUInt16BE(2), cookie: rest.readBigUInt64BE(4), payload: length > 0 ? await this.read(length) : Buffer.alloc(0) };
    }
    throw new Error(`bad reply magic 0x${magic.toString(16)}`);
  }

  /** Chunks of one structured reply, through the one with DONE (assumes no other reply interleaves). */
  async readStructured(): Promise<Extract<Reply, { kind: "chunk" }>[]> {
    const chunks: Extract<Reply, { kind: "chunk" }>[] = [];
    for (let i = 0; i < 100_000; i++) {
      const reply = await this.readReply();
      if (reply.kind !== "chunk") throw new Error(`expected a structured chunk, got a simple reply (error ${reply.error})`);
      chunks.push(reply);
      if (reply.flags & 1) return chunks;
    }
    throw new Error("no DONE chunk");
  }
}

/** NBD_OPT_GO / INFO data. */
export function infoData(name: string, infoTypes: number[] = []): Buffer {
  const nameBytes = Buffer.from(name, "utf8");
  const data = Buffer.alloc(4 + nameBytes.length + 2 + 2 * infoTypes.length);
  data.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(data, 4);
  data.writeUInt16BE(infoTypes.length, 4 + nameBytes.length);
  infoTypes.forEach((type, i) => data.writeUInt16BE(type, 6 + nameBytes.length + 2 * i));
  return data;
}

/** NBD_OPT_LIST/SET_META_CONTEXT data. */
export function metaData(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const nameBytes = Buffer.from(name, "utf8");
  const head = Buffer.alloc(4);
  head.writeUInt32BE(nameBytes.length);
  parts.push(head, nameBytes);
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length);
  parts.push(count);
  for (const query of queries) {
    const bytes = Buffer.from(query, "utf8");
    const length = Buffer.alloc(4);
    length.writeUInt32BE(bytes.length);
    parts.push(length, bytes);
  }
  return Buffer.concat(parts);
}

/** Handshake, optional structured replies and meta contexts, then GO; returns size and flags. */
export async function negotiate(
  client: RawNbdClient,
  options: { name?: string; structured?: boolean; contexts?: string[] } = {},
): Promise<{ sizeBytes: number; transmissionFlags: number; contextIds: Map<string, number> }> {
  const name = options.name ?? "";
  await client.handshake();
  const contextIds = new Map<string, number>();
  if (options.structured ?? true) {
    const sr = await client.option(8);
    if (sr[0].type !== 1) throw new Error("structured replies refused");
    if (options.contexts !== undefined) {
      for (const reply of await client.option(10, metaData(name, options.contexts))) {
        if (reply.type === 4) contextIds.set(reply.data.subarray(4).toString(), reply.data.readUInt32BE(0));
      }
    }
  }
  const replies = await client.option(7, infoData(name));
  const final = replies[replies.length - 1];
  if (final.type !== 1) throw new Error(`GO failed: 0x${final.type.toString(16)} ${final.data.toString()}`);
  const info = replies.find((reply) => reply.type === 3 && reply.data.readUInt16BE(0) === 0)!;
  return { sizeBytes: Number(info.data.readBigUInt64BE(2)), transmissionFlags: info.data.readUInt16BE(10), contextIds };
}

/** Structured error chunk fields. */
export function chunkError(chunk: { type: number; payload: Buffer }): { errno: number; message: string } {
  if (chunk.type !== 0x8001 && chunk.type !== 0x8002) throw new Error(`chunk type ${chunk.type} is not an error`);
  const length = chunk.payload.readUInt16BE(4);
  return { errno: chunk.payload.readUInt32BE(0), message: chunk.payload.subarray(6, 6 + length).toString() };
}
