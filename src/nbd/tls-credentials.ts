/**
 * x509 credentials for STARTTLS from a directory laid out as QEMU's
 * tls-creds-x509 object expects: ca-cert.pem, server-cert.pem,
 * server-key.pem (and optionally ca-crl.pem). With verifyPeer, clients must
 * present a certificate signed by the CA (qemu's verify-peer=on).
 */
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import tls from "node:tls";
import { SnapstackError, fromSystemError } from "../base/errors.ts";

export interface TlsCredentials {
  secureContext: tls.SecureContext;
  verifyPeer: boolean;
}

function readPem(dir: string, name: string): Buffer {
  const path = join(dir, name);
  try {
    return readFileSync(path);
  } catch (error) {
    throw fromSystemError(error, path, "read TLS credentials");
  }
}

export function loadTlsCredentials(dir: string, options: { verifyPeer?: boolean } = {}): TlsCredentials {
  const cert = readPem(dir, "server-cert.pem");
  const key = readPem(dir, "server-key.pem");
  const caPath = join(dir, "ca-cert.pem");
  const ca = existsSync(caPath) ? readPem(dir, "ca-cert.pem") : undefined;
  const crlPath = join(dir, "ca-crl.pem");
  const crl = existsSync(crlPath) ? readPem(dir, "ca-crl.pem") : undefined;
  try {
    const secureContext = tls.createSecureContext({ cert, key, ca, crl, minVersion: "TLSv1.2" });
    return { secureContext, verifyPeer: options.verifyPeer ?? false };
  } catch (error) {
    throw new SnapstackError("E_INVALID_OPTION", `${dir}: invalid TLS credentials: ${(error as Error).message}`, { path: dir });
  }
}
