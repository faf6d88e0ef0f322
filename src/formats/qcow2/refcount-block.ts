/**
 * Refcount blocks and the refcount table: pure codecs, no I/O (reference §4).
 *
 * A refcount block is one cluster of big-endian refcounts, each
 * 2^refcount_order bits wide (1..64). Entries narrower than a byte are packed
 * with entry 0 in the least significant bits of byte 0 (QEMU's
 * get_refcount_ro0 .. ro2). Values are plain numbers; 64-bit refcounts above
 * 2^53 - 1 cannot be represented and read as Number.MAX_SAFE_INTEGER (no
 * sane image has them, refcountMax caps what we write).
 *
 * Refcount table entries: bits 9-63 refcount block offset, bits 0-8
 * reserved (REFT_RESERVED_MASK).
 */

export const REFTABLE_ENTRY_BYTES = 8;
/** QCOW_MAX_REFTABLE_SIZE: 8 MiB of refcount table. */
export const REFTABLE_BYTES_MAX = 8 * 1024 * 1024;
const REFTABLE_RESERVED_MASK = 0x1ffn;

/** Entries in one refcount block. */
export function refcountsPerBlock(clusterBits: number, refcountOrder: number): number {
  return (2 ** clusterBits * 8) / 2 ** refcountOrder;
}

/** Largest refcount a block can hold (capped at a safe integer for 64-bit entries). */
export function refcountMax(refcountOrder: number): number {
  const bits = 2 ** refcountOrder;
  return bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
}

export function getRefcount(block: Uint8Array, index: number, refcountOrder: number): number {
  switch (refcountOrder) {
    case 0:
      return (block[index >>> 3] >>> (index & 7)) & 0x1;
    case 1:
      return (block[index >>> 2] >>> (2 * (index & 3))) & 0x3;
    case 2:
      return (block[index >>> 1] >>> (4 * (index & 1))) & 0xf;
    case 3:
      return block[index];
    case 4:
      return (block[2 * index] << 8) | block[2 * index + 1];
    case 5: {
      const at = 4 * index;
      return ((block[at] << 24) >>> 0) + ((block[at + 1] << 16) | (block[at + 2] << 8) | block[at + 3]);
    }
    case 6: {
      const view = new DataView(block.buffer, block.byteOffset, block.byteLength);
      const value = view.getBigUint64(8 * index);
      return value > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(value);
    }
    default:
      throw new RangeError(`refcount order ${refcountOrder} out of range`);
  }
}

/** Offset in a refcount block of the byte where entry `index` starts (or that holds it, when narrower). */
export function refcountByteOffset(index: number, refcountOrder: number): number {
  return Math.floor((index * 2 ** refcountOrder) / 8);
}

/** Bytes an entry occupies (1 for entries narrower than a byte). */
export function refcountEntryBytes(refcountOrder: number): number {
  return Math.max(1, 2 ** refcountOrder / 8);
}

export function setRefcount(block: Uint8Array, index: number, refcountOrder: number, value: number): void {
  if (!Number.isInteger(value) || value < 0 || value > refcountMax(refcountOrder)) {
    throw new RangeError(`refcount ${value} does not fit ${2 ** refcountOrder} bits`);
  }
  switch (refcountOrder) {
    case 0: {
      const shift = index & 7;
      block[index >>> 3] = (block[index >>> 3] & ~(0x1 << shift)) | (value << shift);
      return;
    }
    case 1: {
      const shift = 2 * (index & 3);
      block[index >>> 2] = (block[index >>> 2] & ~(0x3 << shift)) | (value << shift);
      return;
    }
    case 2: {
      const shift = 4 * (index & 1);
      block[index >>> 1] = (block[index >>> 1] & ~(0xf << shift)) | (value << shift);
      return;
    }
    case 3:
      block[index] = value;
      return;
    case 4:
      block[2 * index] = value >>> 8;
      block[2 * index + 1] = value & 0xff;
      return;
    case 5: {
      const view = new DataView(block.buffer, block.byteOffset, block.byteLength);
      view.setUint32(4 * index, value);
      return;
    }
    case 6: {
      const view = new DataView(block.buffer, block.byteOffset, block.byteLength);
      view.setBigUint64(8 * index, BigInt(value));
      return;
    }
    default:
      throw new RangeError(`refcount order ${refcountOrder} out of range`);
  }
}

/**
 * Add `delta` (non-zero) to the `count` consecutive refcounts from `index`
 * of a block, stopping before the first whose result would leave
 * [1, max] (a raise past the maximum, a drop to zero or below: freeing a
 * cluster has effects the caller handles one cluster at a time) or whose
 * value is below `minOld` (1: stop at a free cluster, which a caller that
 * remembers freed clusters must see alone). Returns how many were changed.
 * Synchronous and small, with the common 16-bit width inline, so that a
 * fresh process optimizes it early: a snapshot pass changes ~16k
 * refcounts on the bench's image, which cost ~12 ms a cluster at a time.
 */
export function changeRefcountRun(block: Uint8Array, index: number, count: number, refcountOrder: number, delta: number, max: number, minOld = 0): number {
  if (refcountOrder === 4) {
    for (let i = 0, at = 2 * index; i < count; i++, at += 2) {
      const old = (block[at] << 8) | block[at + 1];
      const changed = old + delta;
      if (old < minOld || changed < 1 || changed > max) return i;
      block[at] = changed >>> 8;
      block[at + 1] = changed & 0xff;
    }
    return count;
  }
  for (let i = 0; i < count; i++) {
    const old = getRefcount(block, index + i, refcountOrder);
    const changed = old + delta;
    if (old < minOld || changed < 1 || changed > max) return i;
    setRefcount(block, index + i, refcountOrder, changed);
  }
  return count;
}

export interface RefcountTableEntry {
  /** Host offset of the refcount block, 0 = none. */
  blockOffset: number;
  reservedBitsSet: boolean;
}

export function decodeRefcountTableEntry(value: bigint): RefcountTableEntry {
  const offset = value & ~REFTABLE_RESERVED_MASK;
  return {
    blockOffset: offset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(offset),
    reservedBitsSet: (value & REFTABLE_RESERVED_MASK) !== 0n,
  };
}

/** Decode a whole refcount table (raw bytes) into block offsets. */
export function decodeRefcountTable(bytes: Uint8Array): RefcountTableEntry[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out: RefcountTableEntry[] = [];
  for (let at = 0; at + REFTABLE_ENTRY_BYTES <= bytes.length; at += REFTABLE_ENTRY_BYTES) {
    out.push(decodeRefcountTableEntry(view.getBigUint64(at)));
  }
  return out;
}

/** Encode refcount block offsets as a table of `entryCount` entries (zero-padded). */
export function encodeRefcountTable(blockOffsets: readonly number[], entryCount = blockOffsets.length): Uint8Array {
  const out = new Uint8Array(entryCount * REFTABLE_ENTRY_BYTES);
  const view = new DataView(out.buffer);
  blockOffsets.forEach((offset, i) => view.setBigUint64(i * REFTABLE_ENTRY_BYTES, BigInt(offset)));
  return out;
}
