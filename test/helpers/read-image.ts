/** Whole-disk reads for tests that compare an image's content with a model. */
import { openImage } from "../../src/chain/open-image.ts";

/** Every byte of a device's virtual disk. */
export async function readDevice(device: { sizeBytes: number; read(guestOffset: number, buffer: Uint8Array): Promise<void> }): Promise<Uint8Array> {
  const buffer = new Uint8Array(device.sizeBytes);
  await device.read(0, buffer);
  return buffer;
}

/** Open an image (with its chain) read-only and return every byte of its virtual disk. */
export async function readImage(path: string): Promise<Uint8Array> {
  const device = await openImage(path, { readOnly: true });
  try {
    return await readDevice(device);
  } finally {
    await device.close();
  }
}
