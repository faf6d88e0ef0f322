/**
 * A forward-only cursor over a chain's resolved block status (what
 * bdrv_block_status_above(bs, NULL) answers): for a guest offset, the entry
 * of the layer that resolves it, as mapImage computes them (unmerged).
 * Compare and convert walk an image front to back with it; entries are
 * fetched a window at a time so memory stays bounded on huge images.
 *
 * A window that fails (a corrupt L2 entry, an I/O error) is shortened
 * (walkChainPrefix): an error surfaces when the walk reaches it, as with
 * QEMU, which asks about one run at a time (so compare reports a content
 * difference before a corruption further on).
 */
import type { BlockDevice, MapExtent } from "../device/block-device.ts";
import { walkChainPrefix } from "./map-image.ts";

/** Guest bytes resolved per refill (bounds the entries held at once). */
export const STATUS_WINDOW_BYTES = 256 * 1024 * 1024;

export class ChainStatusCursor {
  readonly device: BlockDevice;
  #entries: MapExtent[] = [];
  #index = 0;
  #fetchedEnd = 0;

  constructor(device: BlockDevice) {
    this.device = device;
  }

  /** The resolved entry containing guestOffset, clipped to start there. Offsets must not go backwards. */
  async at(guestOffset: number): Promise<MapExtent> {
    for (;;) {
      while (this.#index < this.#entries.length) {
        const entry = this.#entries[this.#index];
        if (guestOffset < entry.start + entry.length) {
          const skip = guestOffset - entry.start;
          const clipped: MapExtent = { ...entry, start: guestOffset, length: entry.length - skip };
          if (entry.offset !== undefined) clipped.offset = entry.offset + skip;
          return clipped;
        }
        this.#index++;
      }
      const start = Math.max(guestOffset, this.#fetchedEnd);
      const walked = await walkChainPrefix(this.device, start, Math.min(this.device.sizeBytes, start + STATUS_WINDOW_BYTES));
      this.#entries = walked.entries;
      this.#index = 0;
      this.#fetchedEnd = walked.end;
    }
  }
}
