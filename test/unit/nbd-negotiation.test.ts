/**
 * The handshake against a raw socket client: every bad-input rule of the
 * option phase, and one regression test per known CVE of nbd-server,
 * qemu-nbd and nbdkit that concerns negotiation. After each rejected
 * option the connection must still work (LIST or GO succeeds), unless the
 * rule says it closes.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { infoData, metaData, negotiate, type OptionReply } from "./nbd-raw-client.ts";
import { memoryDevice, MiB, startServer } from "./nbd-test-server.ts";

const ACK = 1;
const REP_SERVER = 2;
const REP_INFO = 3;
const REP_META_CONTEXT = 4;
const ERR_UNSUP = 0x80000001;
const ERR_POLICY = 0x80000002;
const ERR_INVALID = 0x80000003;
const ERR_TLS_REQD = 0x80000005;
const ERR_UNKNOWN = 0x80000006;

const OPT_EXPORT_NAME = 1;
const OPT_ABORT = 2;
const OPT_LIST = 3;
const OPT_STARTTLS = 5;
const OPT_INFO = 6;
const OPT_GO = 7;
const OPT_SR = 8;
const OPT_LIST_META = 9;
const OPT_SET_META = 10;
const OPT_EXTENDED_HEADERS = 11;

function exportsA(): Array<{ name: string; device: ReturnType<typeof memoryDevice>; description?: string; allocationDepth?: boolean }> {
  return [
    { name: "a", device: memoryDevice(MiB), description: "first export" },
    { name: "b", device: memoryDevice(2 * MiB), allocationDepth: true },
  ];
}

function final(replies: OptionReply[]): OptionReply {
  return replies[replies.length - 1];
}

/** The connection still negotiates: LIST answers with both exports. */
async function assertListWorks(client: Awaited<ReturnType<Awaited<ReturnType<typeof startServer>>["connect"]>>): Promise<void> {
  const replies = await client.option(OPT_LIST);
  assert.equal(final(replies).type, ACK);
  assert.deepEqual(
    replies.filter((r) => r.type === REP_SERVER).map((r) => r.data.subarray(4, 4 + r.data.readUInt32BE(0)).toString()),
    ["a", "b"],
  );
}

test("greeting: fixed newstyle with NO_ZEROES", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  const { handshakeFlags } = await client.handshake();
  assert.equal(handshakeFlags, 3);
  await assertListWorks(client);
});

test("unknown client flag bits close the connection", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake(0x83);
  assert.equal(await client.waitClosed(), true);
});

test("bad option magic closes the connection", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  client.write(Buffer.from("0102030405060708000000030000000", "hex"));
  client.write(Buffer.alloc(9));
  assert.equal(await client.waitClosed(), true);
});

test("CVE-2017-15119: an option length of 0x7ffffff0 closes the connection without buffering it", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  client.sendOption(OPT_LIST_META, Buffer.alloc(1024), 0x7ffffff0);
  assert.equal(await client.waitClosed(), true);
});

test("unknown option with payload: ERR_UNSUP, payload consumed, LIST still works", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  const replies = await client.option(0x7654321, Buffer.from("abcd"));
  assert.equal(final(replies).type, ERR_UNSUP);
  assert.equal(final(replies).option, 0x7654321);
  await assertListWorks(client);
});

test("EXTENDED_HEADERS is answered ERR_UNSUP and structured replies follow", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  assert.equal(final(await client.option(OPT_EXTENDED_HEADERS)).type, ERR_UNSUP);
  assert.equal(final(await client.option(OPT_SR)).type, ACK);
  assert.equal(final(await client.option(OPT_GO, infoData("a"))).type, ACK);
});

test("LIST, STRUCTURED_REPLY and STARTTLS with a payload: ERR_INVALID, connection usable", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  for (const option of [OPT_LIST, OPT_SR, OPT_STARTTLS]) {
    assert.equal(final(await client.option(option, Buffer.from([1, 2]))).type, ERR_INVALID, `option ${option}`);
  }
  await assertListWorks(client);
});

test("STARTTLS without TLS configured: ERR_POLICY, connection usable", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  const reply = final(await client.option(OPT_STARTTLS));
  assert.equal(reply.type, ERR_POLICY);
  assert.match(reply.data.toString(), /TLS not configured/);
  await assertListWorks(client);
});

test("STRUCTURED_REPLY twice: ACK then ERR_INVALID (as qemu-nbd)", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  assert.equal(final(await client.option(OPT_SR)).type, ACK);
  assert.equal(final(await client.option(OPT_SR)).type, ERR_INVALID);
});

test("LIST names every export with its description", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  const replies = await client.option(OPT_LIST);
  const first = replies[0].data;
  assert.equal(first.subarray(4, 4 + first.readUInt32BE(0)).toString(), "a");
  assert.equal(first.subarray(4 + first.readUInt32BE(0)).toString(), "first export");
});

test("INFO and GO: NAME when requested, DESCRIPTION, BLOCK_SIZE, EXPORT then ACK; INFO then GO agree", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  await client.option(OPT_SR);
  const info = await client.option(OPT_INFO, infoData("a", [1, 2, 3, 3]));
  assert.deepEqual(
    info.map((r) => (r.type === REP_INFO ? r.data.readUInt16BE(0) : -r.type)),
    [1, 2, 3, 0, -ACK],
  );
  const blockSize = info.find((r) => r.type === REP_INFO && r.data.readUInt16BE(0) === 3)!.data;
  assert.deepEqual([blockSize.readUInt32BE(2), blockSize.readUInt32BE(6), blockSize.readUInt32BE(10)], [1, 4096, 32 * MiB]);
  const exportInfo = info.find((r) => r.type === REP_INFO && r.data.readUInt16BE(0) === 0)!.data;
  assert.equal(exportInfo.length, 12);
  assert.equal(Number(exportInfo.readBigUInt64BE(2)), MiB);
  const go = await client.option(OPT_GO, infoData("a", [1, 2, 3, 3]));
  assert.deepEqual(
    go.map((r) => r.data.toString("hex")),
    info.map((r) => r.data.toString("hex")),
  );
  // Transmission: a read works right after GO's ACK (no padding after it).
  client.sendRequest({ type: 0, cookie: 7n, offset: 0, length: 512 });
  const [chunk] = await client.readStructured();
  assert.equal(chunk.type, 1);
  assert.equal(chunk.cookie, 7n);
});

test("transmission flags are truthful: read-only, writable, DF only with structured replies, multi-conn per connection limit", async (t) => {
  const ro = memoryDevice(MiB, { readOnly: true });
  const { connect } = await startServer(t, [{ name: "ro", device: ro }, { name: "rw", device: memoryDevice(MiB) }]);
  const roFlags = (await negotiate(await connect(), { name: "ro" })).transmissionFlags;
  assert.equal(roFlags, 0x0001 | 0x0002 | 0x0004 | 0x0008 | 0x0080 | 0x0100 | 0x0400);
  const rwFlags = (await negotiate(await connect(), { name: "rw" })).transmissionFlags;
  assert.equal(rwFlags, 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0080 | 0x0100 | 0x0400 | 0x0800);
  const simpleFlags = (await negotiate(await connect(), { name: "rw", structured: false })).transmissionFlags;
  assert.equal(simpleFlags & 0x0080, 0, "no DF without structured replies");
  const single = await startServer(t, [{ name: "", device: memoryDevice(MiB) }], { connectionsMax: 1 });
  assert.equal((await negotiate(await single.connect())).transmissionFlags & 0x0100, 0, "no CAN_MULTI_CONN with -e 1");
});

test("GO for an unknown export: ERR_UNKNOWN with the name, connection usable", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  const reply = final(await client.option(OPT_GO, infoData("no-such-export-xyz")));
  assert.equal(reply.type, ERR_UNKNOWN);
  assert.match(reply.data.toString(), /no-such-export-xyz/);
  await assertListWorks(client);
});

test("GO/INFO with inconsistent lengths: ERR_INVALID, connection usable", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  const shortData = Buffer.from([0, 0]);
  const nameTooLong = Buffer.from("0000000a" + "61" + "0000", "hex"); // namelen 10 > length - 6
  const countMismatch = Buffer.from("00000001" + "61" + "0005" + "0003", "hex"); // 5 requests, 1 given
  for (const data of [shortData, nameTooLong, countMismatch]) {
    for (const option of [OPT_INFO, OPT_GO]) {
      assert.equal(final(await client.option(option, data)).type, ERR_INVALID, `${option} ${data.toString("hex")}`);
    }
  }
  await assertListWorks(client);
});

test("CVE-2022-26495: name length 0xffffffff in INFO and GO is ERR_INVALID", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  const data = Buffer.from("ffffffff" + "0000", "hex");
  for (const option of [OPT_INFO, OPT_GO]) {
    const reply = final(await client.option(option, data));
    assert.equal(reply.type, ERR_INVALID);
    assert.match(reply.data.toString(), /Invalid name length: 4294967295/);
  }
  await assertListWorks(client);
});

test("CVE-2022-26496, CVE-2017-15118, CVE-2020-10761: 4096- and 5000-byte names, bounded error messages", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  await client.option(OPT_SR);
  const name4096 = "a".repeat(4096);
  for (const option of [OPT_INFO, OPT_GO]) {
    const reply = final(await client.option(option, infoData(name4096)));
    assert.equal(reply.type, ERR_UNKNOWN);
    assert.ok(reply.data.length < 1000, `message of ${reply.data.length} bytes`);
  }
  for (const option of [OPT_INFO, OPT_GO]) {
    const reply = final(await client.option(option, infoData("a".repeat(5000))));
    assert.equal(reply.type, ERR_INVALID);
    assert.match(reply.data.toString(), /Invalid name length: 5000/);
  }
  for (const option of [OPT_LIST_META, OPT_SET_META]) {
    const reply = final(await client.option(option, metaData(name4096, ["base:allocation"])));
    assert.equal(reply.type, ERR_UNKNOWN);
    assert.ok(reply.data.length < 1000);
  }
  await assertListWorks(client);
});

test("CVE-2019-14851: INFO before GO, for the same and for another export", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  assert.equal(final(await client.option(OPT_INFO, infoData("a"))).type, ACK);
  assert.equal(final(await client.option(OPT_INFO, infoData("b"))).type, ACK);
  const go = await client.option(OPT_GO, infoData("b"));
  assert.equal(final(go).type, ACK);
  const exportInfo = go.find((r) => r.type === REP_INFO && r.data.readUInt16BE(0) === 0)!.data;
  assert.equal(Number(exportInfo.readBigUInt64BE(2)), 2 * MiB);
});

test("meta contexts: SET before structured replies is ERR_INVALID; LIST all, namespaces, unknown names, SET exact names", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  assert.equal(final(await client.option(OPT_SET_META, metaData("b", ["base:allocation"]))).type, ERR_INVALID);
  await client.option(OPT_SR);
  const names = (replies: OptionReply[]): string[] => replies.filter((r) => r.type === REP_META_CONTEXT).map((r) => r.data.subarray(4).toString());
  assert.deepEqual(names(await client.option(OPT_LIST_META, metaData("b", []))), ["base:allocation", "qemu:allocation-depth"]);
  assert.deepEqual(names(await client.option(OPT_LIST_META, metaData("a", []))), ["base:allocation"], "allocation depth only where enabled");
  assert.deepEqual(names(await client.option(OPT_LIST_META, metaData("b", ["qemu:"]))), ["qemu:allocation-depth"]);
  assert.deepEqual(names(await client.option(OPT_LIST_META, metaData("b", ["base:"]))), ["base:allocation"]);
  const unknown = await client.option(OPT_SET_META, metaData("b", ["foo:bar", "base:nope", "base:"]));
  assert.deepEqual(names(unknown), []);
  assert.equal(final(unknown).type, ACK);
  const set = await client.option(OPT_SET_META, metaData("b", ["qemu:allocation-depth", "base:allocation", "base:allocation"]));
  assert.deepEqual(
    set.filter((r) => r.type === REP_META_CONTEXT).map((r) => [r.data.readUInt32BE(0), r.data.subarray(4).toString()]),
    [
      [1, "qemu:allocation-depth"],
      [0, "base:allocation"],
    ],
  );
  assert.equal(final(await client.option(OPT_SET_META, metaData("b", []))).type, ACK, "0 queries selects nothing");
});

test("SET_META_CONTEXT with a truncated query: ERR_INVALID", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  await client.option(OPT_SR);
  const data = metaData("a", ["base:allocation"]);
  data.writeUInt32BE(100, 4 + 1 + 4); // query length 100 > what follows
  assert.equal(final(await client.option(OPT_SET_META, data)).type, ERR_INVALID);
  const hugeCount = metaData("a", []);
  hugeCount.writeUInt32BE(0xffffffff, 5);
  assert.equal(final(await client.option(OPT_LIST_META, hugeCount)).type, ERR_INVALID);
  await assertListWorks(client);
});

test("meta context chosen for export A does not apply to GO on export B: BLOCK_STATUS is EINVAL", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  await client.option(OPT_SR);
  await client.option(OPT_SET_META, metaData("a", ["base:allocation"]));
  assert.equal(final(await client.option(OPT_GO, infoData("b"))).type, ACK);
  client.sendRequest({ type: 7, cookie: 3n, offset: 0, length: 4096 });
  const [chunk] = await client.readStructured();
  assert.equal(chunk.type, 0x8001);
  assert.equal(chunk.payload.readUInt32BE(0), 22);
});

test("a failed SET_META_CONTEXT clears the previous selection", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  await client.option(OPT_SR);
  await client.option(OPT_SET_META, metaData("a", ["base:allocation"]));
  assert.equal(final(await client.option(OPT_SET_META, metaData("zzz", ["base:allocation"]))).type, ERR_UNKNOWN);
  await client.option(OPT_GO, infoData("a"));
  client.sendRequest({ type: 7, cookie: 3n, offset: 0, length: 4096 });
  const [chunk] = await client.readStructured();
  assert.equal(chunk.type, 0x8001);
});

test("EXPORT_NAME: 134-byte reply without NO_ZEROES, 10 bytes with it; unknown export closes", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const padded = await connect();
  await padded.handshake(1);
  padded.sendOption(OPT_EXPORT_NAME, Buffer.from("a"));
  const reply = await padded.read(134);
  assert.equal(Number(reply.readBigUInt64BE(0)), MiB);
  assert.ok(reply.subarray(10).equals(Buffer.alloc(124)));
  // Nothing more: the next bytes are the reply to a request.
  padded.sendRequest({ type: 0, cookie: 9n, offset: 0, length: 16 });
  const simple = await padded.readReply(16);
  assert.equal(simple.kind === "simple" && simple.cookie, 9n);
  assert.equal(padded.pending, 0);

  const short = await connect();
  await short.handshake(3);
  short.sendOption(OPT_EXPORT_NAME, Buffer.from("b"));
  const tenBytes = await short.read(10);
  assert.equal(Number(tenBytes.readBigUInt64BE(0)), 2 * MiB);
  short.sendRequest({ type: 3, cookie: 1n });
  assert.equal((await short.readReply()).kind, "simple");

  const unknown = await connect();
  await unknown.handshake(3);
  unknown.sendOption(OPT_EXPORT_NAME, Buffer.from("missing"));
  assert.equal(await unknown.waitClosed(), true);
});

test("a client without fixed newstyle may only send EXPORT_NAME; anything else closes", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake(0);
  client.sendOption(OPT_LIST);
  assert.equal(await client.waitClosed(), true);
  const old = await connect();
  await old.handshake(0);
  old.sendOption(OPT_EXPORT_NAME, Buffer.from("a"));
  assert.equal((await old.read(134)).length, 134);
});

test("ABORT is acknowledged and the server closes", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const client = await connect();
  await client.handshake();
  assert.equal(final(await client.option(OPT_ABORT)).type, ACK);
  assert.equal(await client.waitClosed(), true);
});

test("CVE-2024-7409: a client sending endless options is dropped at the option cap", async (t) => {
  const { connect } = await startServer(t, exportsA(), { optionsPerHandshakeMax: 32 });
  const client = await connect();
  await client.handshake();
  let answered = 0;
  for (let i = 0; i < 200 && !client.closed; i++) {
    client.sendOption(0x7654321);
    try {
      await client.readOptionReplies();
      answered++;
    } catch {
      break;
    }
  }
  assert.equal(answered, 32);
  assert.equal(await client.waitClosed(), true);
});

test("CVE-2024-7409: a client that never finishes negotiating is dropped after the handshake timeout", async (t) => {
  const { connect, server } = await startServer(t, exportsA(), { handshakeTimeoutMs: 300 });
  const silent = await connect();
  const halfway = await connect();
  await halfway.handshake();
  await halfway.option(OPT_SR);
  assert.equal(await silent.waitClosed(), true);
  assert.equal(await halfway.waitClosed(), true);
  assert.equal(server.connectionCount, 0);
});

test("CVE-2013-7441: disconnecting mid-negotiation or naming a missing export leaves the server serving", async (t) => {
  const { connect } = await startServer(t, exportsA());
  const quitter = await connect();
  await quitter.handshake();
  quitter.sendOption(OPT_GO, infoData("a").subarray(0, 3), 100); // header promises 100 bytes, 3 arrive
  quitter.close();
  const missing = await connect();
  await missing.handshake();
  assert.equal(final(await missing.option(OPT_GO, infoData("missing"))).type, ERR_UNKNOWN);
  missing.close();
  const later = await connect();
  const { sizeBytes } = await negotiate(later, { name: "a" });
  assert.equal(sizeBytes, MiB);
});

test("connection limit (-e 2): a third client waits without a greeting until a slot frees", async (t) => {
  const { connect, server } = await startServer(t, exportsA(), { connectionsMax: 2 });
  const first = await connect();
  const second = await connect();
  await first.handshake();
  await second.handshake();
  const third = await connect();
  await assert.rejects(third.read(18, 300), /timed out/);
  first.close();
  const greeting = await third.read(18);
  assert.equal(greeting.toString("latin1", 0, 8), "NBDMAGIC");
  assert.equal(server.connectionCount, 2);
});

test("connection limit: waiting clients that give up leave the queue (128 probes do not lock out the next client); bytes sent while waiting are kept", async (t) => {
  const { connect, server } = await startServer(t, exportsA(), { connectionsMax: 1 });
  const first = await connect();
  await first.handshake();
  // More than PENDING_CONNECTIONS_MAX connect-and-close probes while the slot is taken. Before, the
  // waiting sockets were never read, so their EOF went unseen and they filled the queue for good.
  for (let i = 0; i < 130; i++) (await connect()).close();
  await new Promise((resolve) => setTimeout(resolve, 200));
  const waiting = await connect();
  await assert.rejects(waiting.read(18, 300), /timed out/, "it waits for the slot, it is not closed");
  assert.equal(waiting.closed, false);
  // A client that sends its flags before the greeting (against the protocol, harmless) keeps them.
  waiting.write(Buffer.from([0, 0, 0, 3]));
  await new Promise((resolve) => setTimeout(resolve, 50));
  first.close();
  const greeting = await waiting.read(18);
  assert.equal(greeting.toString("latin1", 0, 8), "NBDMAGIC");
  await assertListWorks(waiting);
  assert.equal(server.connectionCount, 1);
});

test("TLS required: options other than STARTTLS get ERR_TLS_REQD with their payload consumed; EXPORT_NAME closes", async (t) => {
  // A context that is never used: the client below never starts TLS.
  const tls = await import("node:tls");
  const { connect } = await startServer(t, exportsA(), { tls: { secureContext: tls.createSecureContext({}), verifyPeer: false } });
  const client = await connect();
  await client.handshake();
  for (const [option, data] of [
    [OPT_LIST, Buffer.alloc(0)],
    [OPT_GO, infoData("a")],
    [OPT_INFO, infoData("a", [3])],
    [OPT_SR, Buffer.alloc(0)],
    [OPT_SET_META, metaData("a", ["base:allocation"])],
  ] as const) {
    assert.equal(final(await client.option(option, data)).type, ERR_TLS_REQD, `option ${option}`);
  }
  client.sendOption(OPT_EXPORT_NAME, Buffer.from("a"));
  assert.equal(await client.waitClosed(), true);
});
