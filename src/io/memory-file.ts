/**
 * A growable in-memory ImageFile for tests. Storage doubles as the file
 * grows; `sizeBytes` is the logical length. discard zeroes the range inside
 * the file, as a hole NodeFile punches reads back.
 */
import { SnapstackError, assert } from "../base/errors.ts";
import type { ImageFile } from "./file.ts";

/** Largest in-memory file; bounds test memory (1 GiB). */
export const MEMORY_FILE_SIZE_MAX_BYTES = 1 << 30;

export interface MemoryFileOptions {
  name?: string;
  readOnly?: boolean;
  /** Initial contents (copied). */
  contents?: Uint8Array;
}

export class MemoryFile implements ImageFile {
  readonly name: string;
  readonly readOnly: boolean;
  #storage: Uint8Array;
  #lengthBytes: number;
  #closed = false;
  /** Number of flush() calls, for tests. */
  flushCount = 0;

  constructor(options: MemoryFileOptions = {}) {
    this.name = options.name ?? "memory";
    this.readOnly = options.readOnly ?? false;
    const contents = options.contents ?? new Uint8Array(0);
    this.#storage = new Uint8Array(Math.max(contents.length, 4096));
    this.#storage.set(contents);
    this.#lengthBytes = contents.length;
  }

  #checkOpen(): void {
    if (this.#closed) throw new SnapstackError("E_IO", `${this.name}: file is closed`, { path: this.name });
  }

  #checkWritable(action: string): void {
    this.#checkOpen();
    if (this.readOnly) throw new SnapstackError("E_READ_ONLY", `${this.name}: cannot ${action}: opened read-only`, { path: this.name });
  }

  #ensureCapacity(lengthBytes: number): void {
    if (lengthBytes > MEMORY_FILE_SIZE_MAX_BYTES) {
      throw new SnapstackError("E_NO_SPACE", `${this.name}: in-memory file would grow to ${lengthBytes} bytes, limit ${MEMORY_FILE_SIZE_MAX_BYTES}`);
    }
    if (lengthBytes <= this.#storage.length) return;
    let capacity = this.#storage.length;
    while (capacity < lengthBytes) capacity *= 2;
    const grown = new Uint8Array(Math.min(capacity, MEMORY_FILE_SIZE_MAX_BYTES));
    grown.set(this.#storage.subarray(0, this.#lengthBytes));
    this.#storage = grown;
  }

  async read(hostOffset: number, buffer: Uint8Array): Promise<number> {
    assert(Number.isSafeInteger(hostOffset) && hostOffset >= 0, "read offset is a non-negative integer");
    this.#checkOpen();
    const available = Math.max(0, Math.min(buffer.length, this.#lengthBytes - hostOffset));
    if (available > 0) buffer.set(this.#storage.subarray(hostOffset, hostOffset + available));
    if (available < buffer.length) buffer.fill(0, available);
    return available;
  }

  async write(hostOffset: number, data: Uint8Array): Promise<void> {
    this.writeSync(hostOffset, data);
  }

  /** ImageFile.writeSync: `write` on the calling thread (the same code). */
  writeSync(hostOffset: number, data: Uint8Array): void {
    assert(Number.isSafeInteger(hostOffset) && hostOffset >= 0, "write offset is a non-negative integer");
    this.#checkWritable("write");
    const end = hostOffset + data.length;
    this.#ensureCapacity(end);
    // Bytes between the old end and hostOffset must read as zero; storage
    // past #lengthBytes may hold stale bytes from a shrink, so clear them.
    if (hostOffset > this.#lengthBytes) this.#storage.fill(0, this.#lengthBytes, hostOffset);
    this.#storage.set(data, hostOffset);
    this.#lengthBytes = Math.max(this.#lengthBytes, end);
  }

  async sizeBytes(): Promise<number> {
    this.#checkOpen();
    return this.#lengthBytes;
  }

  async truncate(sizeBytes: number): Promise<void> {
    assert(Number.isSafeInteger(sizeBytes) && sizeBytes >= 0, "truncate size is a non-negative integer");
    this.#checkWritable("truncate");
    this.#ensureCapacity(sizeBytes);
    if (sizeBytes > this.#lengthBytes) this.#storage.fill(0, this.#lengthBytes, sizeBytes);
    this.#lengthBytes = sizeBytes;
  }

  async flush(): Promise<void> {
    this.#checkOpen();
    this.flushCount++;
  }

  async discard(hostOffset: number, lengthBytes: number): Promise<void> {
    assert(hostOffset >= 0 && lengthBytes >= 0, "discard range is non-negative");
    this.#checkWritable("discard");
    const end = Math.min(hostOffset + lengthBytes, this.#lengthBytes);
    if (end > hostOffset) this.#storage.fill(0, hostOffset, end);
  }

  async close(): Promise<void> {
    this.#closed = true;
  }

  /** A copy of the current contents. */
  contents(): Uint8Array {
    return this.#storage.slice(0, this.#lengthBytes);
  }
}
