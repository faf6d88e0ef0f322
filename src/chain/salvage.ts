/**
 * Reading what can be read of a damaged image: `convert --salvage`
 * (qemu-img.c convert_co_read and convert_iteration_sectors with
 * s->salvage, QEMU 7.2).
 *
 * Design notes
 * - Reads: a request that fails is read again one 512-byte sector at a
 *   time; a sector that still fails reads as zeroes, and the caller hears
 *   of it (qemu-img: "warning: error while reading offset N: <strerror>"),
 *   so only the sectors that cannot be read are lost. A compressed cluster
 *   whose stream is damaged fails whole, sector by sector, as in QEMU.
 * - Block status: a window whose status cannot be looked up is split
 *   (QEMU divides by four, here by two: the sectors that fail are the same)
 *   until it succeeds or is one sector long; a sector whose status fails is
 *   taken as data ("error while reading block status at offset N"), so its
 *   read is tried too, and then usually fails and reads as zeroes.
 * - What is salvaged: coded errors of the image and its files (I/O errors,
 *   corrupt metadata, clusters that do not decompress). Not: a cancel
 *   (E_ABORTED), a bug (E_INTERNAL or an error without a code), a request
 *   outside the disk (E_OUT_OF_RANGE: the caller's own mistake).
 * - Without salvaging, a failed read is reported at the first sector that
 *   cannot be read ("error while reading at byte N", as qemu-img names the
 *   byte where its failed request starts), and a failed status lookup at
 *   its first sector ("error while reading block status at offset N"),
 *   keeping the error's code.
 */
import { SnapstackError, qemuErrnoText } from "../base/errors.ts";
import type { BlockDevice } from "../device/block-device.ts";

const SECTOR_BYTES = 512;

/** Errors a salvaging copy gets past (see the design notes). */
export function isSalvageable(error: unknown): error is SnapstackError {
  return error instanceof SnapstackError && error.code !== "E_ABORTED" && error.code !== "E_INTERNAL" && error.code !== "E_OUT_OF_RANGE";
}

/** The line qemu-img prints (after "warning: ") for a sector that cannot be read. */
export function unreadableSectorWarning(guestOffset: number, error: SnapstackError): string {
  return `error while reading offset ${guestOffset}: ${qemuErrnoText(error.code)}`;
}

/** The line qemu-img prints for a sector whose block status cannot be read. */
export function unknownStatusWarning(guestOffset: number, error: SnapstackError): string {
  return `error while reading block status at offset ${guestOffset}: ${qemuErrnoText(error.code)}`;
}

type Read = (guestOffset: number, buffer: Uint8Array) => Promise<void>;

/** Read `buffer` sector by sector; each sector that fails (salvageably) goes to `onUnreadable`, which may throw. */
async function readSectors(source: Pick<BlockDevice, "read">, guestOffset: number, buffer: Uint8Array, onUnreadable: (guestOffset: number, error: SnapstackError, sector: Uint8Array) => void): Promise<void> {
  for (let at = 0; at < buffer.length; at += SECTOR_BYTES) {
    const sector = buffer.subarray(at, Math.min(buffer.length, at + SECTOR_BYTES));
    try {
      await source.read(guestOffset + at, sector);
    } catch (error) {
      if (!isSalvageable(error)) throw error;
      onUnreadable(guestOffset + at, error, sector);
    }
  }
}

/**
 * `source`'s read, where a sector that cannot be read reads as zeroes and
 * `onUnreadable` hears of it (in guest order within a request).
 */
export function salvagingRead(source: Pick<BlockDevice, "read">, onUnreadable: (guestOffset: number, error: SnapstackError) => void): Read {
  return async (guestOffset, buffer) => {
    try {
      await source.read(guestOffset, buffer);
      return;
    } catch (error) {
      if (!isSalvageable(error)) throw error;
    }
    await readSectors(source, guestOffset, buffer, (offset, error, sector) => {
      sector.fill(0);
      onUnreadable(offset, error);
    });
  };
}

/**
 * `source`'s read, where a failure names the first sector of the request
 * that cannot be read: "error while reading at byte N: <its message>",
 * with its code and details (the request's own start and error when every
 * sector reads alone).
 */
export function locatingRead(source: Pick<BlockDevice, "read">): Read {
  const located = (error: SnapstackError, guestOffset: number): SnapstackError =>
    new SnapstackError(error.code, `error while reading at byte ${guestOffset}: ${error.message}`, { ...error.details, guestOffset });
  return async (guestOffset, buffer) => {
    try {
      await source.read(guestOffset, buffer);
    } catch (error) {
      if (!isSalvageable(error)) throw error;
      await readSectors(source, guestOffset, buffer, (offset, sectorError) => {
        throw located(sectorError, offset);
      });
      throw located(error, guestOffset);
    }
  };
}

/**
 * Look up [start, end) with `lookup`, which hands its results over only
 * when it succeeds; with salvaging, a window that fails is halved until it
 * succeeds or is one sector long, and such a sector goes to `onUnknown`
 * (the caller takes it as data). The window after a failed sector starts
 * at one sector and doubles with each success, so a long damaged stretch
 * costs a lookup or two per sector, not a halving from the whole range
 * each time. Without salvaging (`onUnknown` null) a failure is thrown
 * naming its first sector ("error while reading block status at offset N",
 * as qemu-img words it), found the same way.
 */
export async function lookupSalvaging(
  start: number,
  end: number,
  lookup: (start: number, end: number) => Promise<void>,
  onUnknown: ((guestOffset: number, lengthBytes: number, error: SnapstackError) => void) | null,
): Promise<void> {
  if (onUnknown === null) {
    try {
      await lookup(start, end);
      return;
    } catch (error) {
      if (!isSalvageable(error)) throw error;
    }
    await lookupSalvaging(start, end, lookup, (guestOffset, _lengthBytes, error) => {
      throw new SnapstackError(error.code, `error while reading block status at offset ${guestOffset}: ${error.message}`, { ...error.details, guestOffset });
    });
    return;
  }
  let window = end - start;
  let at = start;
  while (at < end) {
    let windowEnd = Math.min(end, at + window);
    for (;;) {
      try {
        await lookup(at, windowEnd);
        window = 2 * (windowEnd - at);
        break;
      } catch (error) {
        if (!isSalvageable(error)) throw error;
        if (windowEnd - at <= SECTOR_BYTES) {
          onUnknown(at, windowEnd - at, error);
          window = SECTOR_BYTES;
          break;
        }
        windowEnd = at + Math.max(SECTOR_BYTES, Math.floor((windowEnd - at) / 2 / SECTOR_BYTES) * SECTOR_BYTES);
      }
    }
    at = windowEnd;
  }
}
