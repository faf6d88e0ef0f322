/**
 * The LUKS (version 1) header of an encrypted qcow2 image, decoded for
 * `info` only: a pure codec, no I/O, no key material used (QEMU 7.2
 * crypto/block-luks.c, qcrypto_block_luks_get_info; the header lies where
 * the qcow2 crypto header extension points).
 *
 * Layout (big-endian): magic "LUKS\xba\xbe", u16 version, char[32] cipher
 * name, char[32] cipher mode ("xts-plain64", "cbc-essiv:sha256"), char[32]
 * hash, u32 payload offset (sectors), u32 key bytes, 20-byte master key
 * digest, 32-byte salt, u32 digest iterations, char[40] UUID, then 8 key
 * slots of 48 bytes: u32 active (0x00AC71F3) or disabled (0x0000DEAD), u32
 * iterations, 32-byte salt, u32 key material offset (sectors), u32 stripes.
 *
 * QEMU names the cipher by algorithm and key size ("aes-256"): an XTS key
 * holds two keys, so its size counts half.
 */
import { SnapstackError } from "../../base/errors.ts";

const LUKS_MAGIC = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe];
const LUKS_SECTOR_BYTES = 512;
const LUKS_SLOT_COUNT = 8;
const LUKS_SLOTS_OFFSET = 208;
const LUKS_SLOT_BYTES = 48;
const LUKS_SLOT_ACTIVE = 0x00ac71f3;
/** Bytes of the fixed header, key slots included. */
export const LUKS_HEADER_BYTES = LUKS_SLOTS_OFFSET + LUKS_SLOT_COUNT * LUKS_SLOT_BYTES;

export interface LuksKeySlot {
  active: boolean;
  /** Only for an active slot. */
  iterations?: number;
  /** Only for an active slot. */
  stripes?: number;
  keyOffsetBytes: number;
}

export interface LuksHeaderInfo {
  /** QEMU's QCryptoCipherAlgorithm name, e.g. "aes-256". */
  cipherAlg: string;
  /** "xts", "cbc", "ecb", "ctr". */
  cipherMode: string;
  /** "plain64", "plain", "essiv". */
  ivgenAlg: string;
  /** The hash of an essiv IV generator ("cbc-essiv:sha256"), else undefined. */
  ivgenHashAlg?: string;
  hashAlg: string;
  payloadOffsetBytes: number;
  masterKeyIterations: number;
  uuid: string;
  slots: LuksKeySlot[];
}

function cString(bytes: Uint8Array, offset: number, length: number): string {
  const field = bytes.subarray(offset, offset + length);
  const end = field.indexOf(0);
  return String.fromCharCode(...field.subarray(0, end < 0 ? field.length : end));
}

/** QEMU's cipher algorithm name for a LUKS cipher name and key size (qcrypto_block_luks_cipher_name_lookup). */
function cipherAlgName(cipherName: string, keyBytes: number): string {
  switch (cipherName) {
    case "aes":
    case "serpent":
    case "twofish":
      return `${cipherName}-${keyBytes * 8}`;
    case "cast5":
      return "cast5-128";
    default:
      return cipherName;
  }
}

export function decodeLuksHeader(bytes: Uint8Array): LuksHeaderInfo {
  if (bytes.length < LUKS_HEADER_BYTES || LUKS_MAGIC.some((byte, i) => bytes[i] !== byte)) {
    throw new SnapstackError("E_BAD_HEADER", "Volume is not in LUKS format");
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const version = view.getUint16(6);
  if (version !== 1) throw new SnapstackError("E_UNSUPPORTED_FEATURE", `Unsupported LUKS version ${version}`, { version });
  const [mode, ivgen = ""] = cString(bytes, 40, 32).split("-", 2);
  const [ivgenAlg, ivgenHashAlg] = ivgen.split(":", 2);
  const keyBytes = view.getUint32(108);
  const slots: LuksKeySlot[] = [];
  for (let i = 0; i < LUKS_SLOT_COUNT; i++) {
    const at = LUKS_SLOTS_OFFSET + i * LUKS_SLOT_BYTES;
    const active = view.getUint32(at) === LUKS_SLOT_ACTIVE;
    const keyOffsetBytes = view.getUint32(at + 40) * LUKS_SECTOR_BYTES;
    slots.push(active ? { active, iterations: view.getUint32(at + 4), stripes: view.getUint32(at + 44), keyOffsetBytes } : { active, keyOffsetBytes });
  }
  return {
    cipherAlg: cipherAlgName(cString(bytes, 8, 32), mode === "xts" ? keyBytes / 2 : keyBytes),
    cipherMode: mode,
    ivgenAlg,
    ...(ivgenHashAlg === undefined ? {} : { ivgenHashAlg }),
    hashAlg: cString(bytes, 72, 32),
    payloadOffsetBytes: view.getUint32(104) * LUKS_SECTOR_BYTES,
    masterKeyIterations: view.getUint32(164),
    uuid: cString(bytes, 168, 40),
    slots,
  };
}
