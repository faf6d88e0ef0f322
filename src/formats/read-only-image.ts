/**
 * What every read-only image format (vmdk, vpc) shares: writes refused
 * with E_READ_ONLY, a flush that has nothing to do, close once, and no use
 * after close. A format extends it with its reads and layerStatus.
 */
import { SnapstackError } from "../base/errors.ts";

export abstract class ReadOnlyImage {
  abstract readonly format: string;
  readonly readOnly = true;
  readonly backing = null;
  readonly name: string;
  #closed = false;

  constructor(name: string) {
    this.name = name;
  }

  /** Close the files the image holds (once). */
  protected abstract closeFiles(): Promise<void>;

  protected checkOpen(): void {
    if (this.#closed) throw new SnapstackError("E_INTERNAL", `${this.name}: the image was used after it was closed`, { path: this.name });
  }

  #refuse(action: string): never {
    throw new SnapstackError("E_READ_ONLY", `${this.name}: cannot ${action}: snapstack opens ${this.format} images read-only`, { path: this.name });
  }

  async write(): Promise<void> {
    this.#refuse("write");
  }

  async writeZeroes(): Promise<void> {
    this.#refuse("write zeroes");
  }

  async discard(): Promise<void> {
    this.#refuse("discard");
  }

  async flush(): Promise<void> {
    this.checkOpen();
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.closeFiles();
  }
}
