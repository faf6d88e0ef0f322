/**
 * STARTTLS with x509 certificates made by openssl for the test: qemu-img and
 * nbdinfo connect over TLS, plain clients are refused, and negotiation state
 * from before STARTTLS does not survive it (nbdkit CVE-2021-3716).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, readFileSync, writeFileSync, copyFileSync } from "node:fs";
import { join } from "node:path";
import { requireTools, run, runOk, scratchDir } from "../helpers/tools.ts";
import { infoData, RawNbdClient } from "../unit/nbd-raw-client.ts";
import { startNbd } from "./nbd-helpers.ts";

/** CA + server certificate for localhost/127.0.0.1; returns the server and client credential directories. */
async function makeCertificates(dir: string): Promise<{ serverDir: string; clientDir: string }> {
  const serverDir = join(dir, "server-creds");
  const clientDir = join(dir, "client-creds");
  mkdirSync(serverDir);
  mkdirSync(clientDir);
  const ca = join(serverDir, "ca-cert.pem");
  const caKey = join(dir, "ca-key.pem");
  await runOk("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", caKey, "-out", ca, "-days", "2", "-subj", "/CN=snapstack test CA", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
  const csr = join(dir, "server.csr");
  await runOk("openssl", ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", join(serverDir, "server-key.pem"), "-out", csr, "-subj", "/CN=localhost"]);
  const extensions = join(dir, "server.ext");
  writeFileSync(extensions, "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n");
  await runOk("openssl", ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", caKey, "-CAcreateserial", "-out", join(serverDir, "server-cert.pem"), "-days", "2", "-extfile", extensions]);
  copyFileSync(ca, join(clientDir, "ca-cert.pem"));
  return { serverDir, clientDir };
}

test("TLS: qemu-img and nbdinfo over STARTTLS; plain clients refused; pre-TLS state forgotten", async (t) => {
  if (!requireTools(t, "qemu-img", "qemu-io", "nbdinfo", "openssl")) return;
  const dir = scratchDir(t);
  const { serverDir, clientDir } = await makeCertificates(dir);
  const image = join(dir, "disk.qcow2");
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", image, "16M"]);
  await runOk("qemu-io", ["-f", "qcow2", "-c", "write -q -P 0x5c 1M 1M", image]);
  const server = await startNbd(t, "snapstack", dir, image, { args: ["-t", "-e", "0", "-A", `--tls-creds=${serverDir}`], tcp: true, exportName: "secure" });
  const port = server.port!;

  // nbdinfo over TLS (GnuTLS checks the certificate against the CA and the host name).
  const details = (await runOk("nbdinfo", [`nbds://localhost:${port}/secure?tls-certificates=${clientDir}`])).stdout;
  assert.match(details, /newstyle-fixed with TLS/);
  assert.match(details, /export-size: 16777216/);
  const map = (await runOk("nbdinfo", ["--map", `nbds://localhost:${port}/secure?tls-certificates=${clientDir}`])).stdout;
  assert.match(map, /1048576\s+1048576\s+0\s+data/);

  // qemu-img / qemu-io with qemu's tls-creds-x509 object.
  const object = `tls-creds-x509,id=tls0,dir=${clientDir},endpoint=client`;
  const imageOpts = `driver=nbd,server.type=inet,server.host=localhost,server.port=${port},export=secure,tls-creds=tls0`;
  const info = JSON.parse((await runOk("qemu-img", ["info", "--output=json", "--object", object, "--image-opts", imageOpts])).stdout) as { "virtual-size": number };
  assert.equal(info["virtual-size"], 16 * 1024 * 1024);
  await runOk("qemu-io", ["--object", object, "--image-opts", "-c", "write -P 0x6d 4M 64k", "-c", "read -P 0x6d 4M 64k", "-c", "read -P 0x5c 1M 1M", imageOpts]);
  const copy = join(dir, "copy.raw");
  await runOk("qemu-img", ["convert", "--object", object, "--image-opts", imageOpts, "-O", "raw", copy]);
  await runOk("qemu-io", ["-f", "raw", "-c", "read -P 0x6d 4M 64k", copy]);

  // Plain clients are refused.
  const plain = await run("nbdinfo", [`nbd://127.0.0.1:${port}/secure`]);
  assert.notEqual(plain.code, 0);
  assert.doesNotMatch(plain.stdout, /export-size/);
  const plainQemu = await run("qemu-img", ["info", `nbd://127.0.0.1:${port}/secure`]);
  assert.notEqual(plainQemu.code, 0);
  // A client with the wrong CA cannot complete the TLS handshake.
  const wrongDir = join(dir, "wrong-ca");
  mkdirSync(wrongDir);
  await runOk("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", join(dir, "wrong-key.pem"), "-out", join(wrongDir, "ca-cert.pem"), "-days", "2", "-subj", "/CN=other CA"]);
  assert.notEqual((await run("nbdinfo", [`nbds://localhost:${port}/secure?tls-certificates=${wrongDir}`])).code, 0);

  // CVE-2021-3716: structured replies asked in plaintext must not survive STARTTLS.
  const raw = await RawNbdClient.connect({ host: "127.0.0.1", port });
  t.after(() => raw.close());
  await raw.handshake();
  const early = await raw.option(8);
  assert.equal(early[0].type, 0x80000005, "STRUCTURED_REPLY before TLS: ERR_TLS_REQD");
  await raw.startTls({ ca: readFileSync(join(clientDir, "ca-cert.pem")), servername: "localhost" });
  const twice = await raw.option(5);
  assert.equal(twice[0].type, 0x80000003, "STARTTLS inside TLS: ERR_INVALID");
  const go = await raw.option(7, infoData("secure"));
  assert.equal(go[go.length - 1].type, 1);
  raw.sendRequest({ type: 0, cookie: 42n, offset: 1024 * 1024, length: 512 });
  const reply = await raw.readReply(512);
  assert.equal(reply.kind, "simple", "no structured replies were negotiated inside TLS");
  assert.ok(reply.kind === "simple" && reply.data.equals(Buffer.alloc(512, 0x5c)));
});
