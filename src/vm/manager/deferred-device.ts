/**
 * A stand-in device for an NBD export while its real device is closed and
 * reopened (the chain below a running VM's top changed). Requests that
 * arrive meanwhile wait until `install(device)` and then run on it; the
 * guest is paused around this, so normally none arrive. Its own flush is a
 * no-op (nothing was ever written to it), which lets NbdExport.swapDevice
 * move from it to the real device without waiting on it.
 */
import type { BlockDevice, LayerExtent, WriteZeroesOptions } from "../../device/block-device.ts";

export class DeferredDevice implements BlockDevice {
  readonly name: string;
  readonly format = "qcow2";
  readonly sizeBytes: number;
  readonly readOnly = false;
  readonly backing = null;
  #ready: Promise<BlockDevice>;
  #install!: (device: BlockDevice) => void;

  constructor(name: string, sizeBytes: number) {
    this.name = name;
    this.sizeBytes = sizeBytes;
    this.#ready = new Promise((resolve) => (this.#install = resolve));
  }

  install(device: BlockDevice): void {
    this.#install(device);
  }

  async read(guestOffset: number, buffer: Uint8Array): Promise<void> {
    return (await this.#ready).read(guestOffset, buffer);
  }

  async write(guestOffset: number, data: Uint8Array): Promise<void> {
    return (await this.#ready).write(guestOffset, data);
  }

  async writeZeroes(guestOffset: number, lengthBytes: number, options?: WriteZeroesOptions): Promise<void> {
    return (await this.#ready).writeZeroes(guestOffset, lengthBytes, options);
  }

  async discard(guestOffset: number, lengthBytes: number): Promise<void> {
    return (await this.#ready).discard(guestOffset, lengthBytes);
  }

  async flush(): Promise<void> {}

  async layerStatus(guestOffset: number, lengthBytes: number): Promise<LayerExtent[]> {
    return (await this.#ready).layerStatus(guestOffset, lengthBytes);
  }

  async close(): Promise<void> {}
}
