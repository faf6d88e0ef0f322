/**
 * In-process NBD servers for protocol tests: memory-backed raw devices, a
 * device whose operations can be held back (to test concurrency, reply
 * order, back-pressure and device swaps), and a server on a Unix socket in a
 * scratch directory, closed when the test ends.
 */
import { join } from "node:path";
import type { TestContext } from "node:test";
import type { BlockDevice, LayerExtent, WriteZeroesOptions } from "../../src/device/block-device.ts";
import { RawImage } from "../../src/formats/raw/raw-image.ts";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { NbdExport, NbdServer, type NbdExportOptions, type NbdServerOptions } from "../../src/nbd/index.ts";
import { scratchDir } from "../helpers/tools.ts";
import { RawNbdClient } from "./nbd-raw-client.ts";

export const MiB = 1024 * 1024;

/** A raw device on an in-memory file, filled with a byte pattern derived from the offset. */
export function memoryDevice(sizeBytes: number, options: { readOnly?: boolean; name?: string } = {}): RawImage {
  const contents = new Uint8Array(sizeBytes);
  for (let i = 0; i < sizeBytes; i += 512) contents.fill((i / 512) & 0xff, i, i + 512);
  return new RawImage(new MemoryFile({ contents, readOnly: options.readOnly ?? false, name: options.name ?? "memory" }), sizeBytes);
}

/** Expected content of memoryDevice at an offset. */
export function patternAt(offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i < length; i++) out[i] = Math.floor((offset + i) / 512) & 0xff;
  return out;
}

/**
 * Wraps a device; while `held` is true every read/write waits until
 * release(). Counts the operations running at once.
 */
export class GatedDevice implements BlockDevice {
  readonly inner: BlockDevice;
  held = false;
  running = 0;
  runningMax = 0;
  started = 0;
  #waiters: Array<() => void> = [];
  /** Per-call delay hook: reads at these offsets wait for releaseOffset(). */
  #heldOffsets = new Map<number, Array<() => void>>();
  holdOffsets = new Set<number>();

  constructor(inner: BlockDevice) {
    this.inner = inner;
  }

  get name(): string {
    return `gated:${this.inner.name}`;
  }
  get format(): string {
    return this.inner.format;
  }
  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get backing(): BlockDevice | null {
    return this.inner.backing;
  }

  release(): void {
    this.held = false;
    for (const waiter of this.#waiters.splice(0)) waiter();
  }

  releaseOffset(offset: number): void {
    this.holdOffsets.delete(offset);
    for (const waiter of this.#heldOffsets.get(offset)?.splice(0) ?? []) waiter();
  }

  async #gate<T>(offset: number, fn: () => Promise<T>): Promise<T> {
    this.started++;
    this.running++;
    this.runningMax = Math.max(this.runningMax, this.running);
    try {
      if (this.held) await new Promise<void>((resolve) => this.#waiters.push(resolve));
      if (this.holdOffsets.has(offset)) {
        await new Promise<void>((resolve) => {
          const list = this.#heldOffsets.get(offset) ?? [];
          list.push(resolve);
          this.#heldOffsets.set(offset, list);
        });
      }
      return await fn();
    } finally {
      this.running--;
    }
  }

  read(guestOffset: number, buffer: Uint8Array): Promise<void> {
    return this.#gate(guestOffset, () => this.inner.read(guestOffset, buffer));
  }
  write(guestOffset: number, data: Uint8Array): Promise<void> {
    return this.#gate(guestOffset, () => this.inner.write(guestOffset, data));
  }
  writeZeroes(guestOffset: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    return this.inner.writeZeroes(guestOffset, lengthBytes, options);
  }
  discard(guestOffset: number, lengthBytes: number): Promise<void> {
    return this.inner.discard(guestOffset, lengthBytes);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  layerStatus(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]> {
    return this.inner.layerStatus(guestOffset, lengthBytes);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

export interface TestServer {
  server: NbdServer;
  endpoint: { path: string };
  dir: string;
  connect(): Promise<RawNbdClient>;
}

/** A server on a Unix socket in a scratch directory; closed (and clients destroyed) when the test ends. */
export async function startServer(t: TestContext, exports: Array<NbdExportOptions | NbdExport>, options: NbdServerOptions = {}): Promise<TestServer> {
  const dir = scratchDir(t, "snapstack-nbd-");
  const server = new NbdServer({ ...options, exports: exports.map((e) => (e instanceof NbdExport ? e : new NbdExport(e))) });
  const endpoint = { path: join(dir, "nbd.sock") };
  await server.listen(endpoint);
  const clients: RawNbdClient[] = [];
  t.after(async () => {
    for (const client of clients) client.close();
    await server.close();
  });
  return {
    server,
    endpoint,
    dir,
    async connect() {
      const client = await RawNbdClient.connect(endpoint);
      clients.push(client);
      return client;
    },
  };
}
