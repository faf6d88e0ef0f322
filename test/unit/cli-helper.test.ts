/**
 * The resident helper's protocol codecs (split at every offset) and its
 * server (src/cli/helper/), driven over a real Unix socket by a client in
 * JavaScript, with the command runner, code stamp, open-file count and
 * lost-client action injected. The native client and a real helper process
 * are tested in test/interop/cli-helper.test.ts.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { lstatSync, mkdirSync, readFileSync, realpathSync, statSync, writeFileSync } from "node:fs";
import { createConnection } from "node:net";
import { join } from "node:path";
import {
  decodeHelperRequest,
  encodeFrames,
  encodeHelperRequest,
  FRAME_PAYLOAD_BYTES_MAX,
  HelperFrameReader,
  HelperRequestReader,
  REQUEST_BYTES_MAX,
  type HelperFrame,
  type HelperRequest,
} from "../../src/cli/helper/helper-protocol.ts";
import { startHelperServer, type HelperServerOptions } from "../../src/cli/helper/helper-server.ts";
import { helperCommand } from "../../src/cli/commands/helper.ts";
import { captureContext } from "../../src/cli/context.ts";
import { SnapstackError } from "../../src/base/errors.ts";
import { scratchDir } from "../helpers/tools.ts";

const REQUEST: HelperRequest = { umask: 0o027, cwd: "/tmp/dir with space", argv: ["img", "info", "--output=json", "ä.qcow2", ""], env: { HOME: "/root", EMPTY: "", WITH_EQUALS: "a=b" } };

test("a request survives encoding and decoding, fed in two pieces split at every offset", () => {
  const bytes = encodeHelperRequest(REQUEST);
  for (let split = 0; split <= bytes.length; split++) {
    const reader = new HelperRequestReader();
    const first = reader.feed(bytes.subarray(0, split));
    const second = split === bytes.length ? first : reader.feed(bytes.subarray(split));
    if (split < bytes.length) assert.equal(first, null, `complete after ${split} of ${bytes.length} bytes`);
    assert.deepEqual(second, REQUEST, `split at ${split}`);
  }
});

test("malformed requests are refused with E_USAGE naming what is wrong", () => {
  const body = (fields: string[]): Buffer => Buffer.from(fields.map((field) => `${field}\0`).join(""));
  const cases: Array<[string, Buffer, RegExp]> = [
    ["other protocol", body(["snapstack-helper/9", "18", "/", "1", "img", "0"]), /protocol 'snapstack-helper\/9'/],
    ["umask not a number", body(["snapstack-helper/1", "x", "/", "1", "img", "0"]), /umask 'x'/],
    ["umask too large", body(["snapstack-helper/1", "1000", "/", "1", "img", "0"]), /umask 1000 is above 511/],
    ["relative cwd", body(["snapstack-helper/1", "18", "here", "1", "img", "0"]), /not absolute/],
    ["missing arguments", body(["snapstack-helper/1", "18", "/", "3", "img"]), /ends before argument 2 of 3/],
    ["trailing fields", body(["snapstack-helper/1", "18", "/", "1", "img", "0", "extra"]), /1 fields after the environment/],
    ["no final NUL", Buffer.from("snapstack-helper/1\x0018"), /not NUL-terminated/],
  ];
  for (const [name, bytes, message] of cases) {
    assert.throws(
      () => decodeHelperRequest(bytes),
      (error: unknown) => error instanceof SnapstackError && error.code === "E_USAGE" && message.test(error.message),
      name,
    );
  }
  const tooLong = Buffer.alloc(4);
  tooLong.writeUInt32LE(REQUEST_BYTES_MAX + 1);
  assert.throws(() => new HelperRequestReader().feed(tooLong), /more than 4194304/);
  // An environment entry without '=' is no variable, as in Node's process.env.
  assert.deepEqual(decodeHelperRequest(body(["snapstack-helper/1", "0", "/", "1", "img", "2", "NOEQUALS", "A=1"])).env, { A: "1" });
});

test("frames survive encoding and decoding at every split; a long payload becomes several frames", () => {
  const bytes = Buffer.concat([encodeFrames("started", ""), encodeFrames("stdout", "héllo\n"), encodeFrames("stderr", Buffer.from([0, 255, 10])), encodeFrames("exit", "3")]);
  for (let split = 0; split <= bytes.length; split++) {
    const reader = new HelperFrameReader();
    const frames = [...reader.feed(bytes.subarray(0, split)), ...reader.feed(bytes.subarray(split))];
    assert.deepEqual(
      frames.map((frame) => [frame.kind, frame.payload.toString("latin1")]),
      [
        ["started", ""],
        ["stdout", Buffer.from("héllo\n").toString("latin1")],
        ["stderr", "\u0000\u00ff\n"],
        ["exit", "3"],
      ],
      `split at ${split}`,
    );
    assert.equal(reader.pendingBytes, 0);
  }
  const long = Buffer.alloc(FRAME_PAYLOAD_BYTES_MAX * 2 + 5, 7);
  const frames = new HelperFrameReader().feed(encodeFrames("stdout", long));
  assert.deepEqual(
    frames.map((frame) => frame.payload.length),
    [FRAME_PAYLOAD_BYTES_MAX, FRAME_PAYLOAD_BYTES_MAX, 5],
  );
  assert.throws(() => new HelperFrameReader().feed(Buffer.from([0x41, 0, 0, 0, 0])), /unknown frame kind 0x41/);
});

interface Exchange {
  frames: HelperFrame[];
  /** The connection ended. */
  ended: Promise<void>;
  close(): void;
}

/** Send `request` (or raw bytes) to the helper and collect its frames. */
function exchange(socketPath: string, request: HelperRequest | Buffer): Promise<Exchange> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(socketPath);
    const reader = new HelperFrameReader();
    const frames: HelperFrame[] = [];
    let resolveEnded: () => void = () => {};
    const ended = new Promise<void>((done) => (resolveEnded = done));
    socket.on("data", (chunk: Buffer) => frames.push(...reader.feed(chunk)));
    socket.on("close", () => resolveEnded());
    socket.once("error", reject);
    socket.once("connect", () => {
      socket.write(Buffer.isBuffer(request) ? request : encodeHelperRequest(request));
      resolve({ frames, ended, close: () => socket.destroy() });
    });
  });
}

function kinds(frames: readonly HelperFrame[]): string[] {
  return frames.map((frame) => (frame.kind === "stdout" || frame.kind === "stderr" || frame.kind === "exit" || frame.kind === "refused" ? `${frame.kind}:${frame.payload.toString()}` : frame.kind));
}

function imgRequest(cwd: string, ...argv: string[]): HelperRequest {
  return { umask: 0o022, cwd, argv: ["img", ...argv], env: { MARK: "client" } };
}

async function startTestHelper(t: { after: (fn: () => unknown) => void }, dir: string, overrides: Partial<HelperServerOptions> = {}) {
  const log: string[] = [];
  const options: HelperServerOptions = {
    socketPath: join(dir, "h.sock"),
    idleTimeoutMs: 0,
    run: async (argv, context) => {
      context.out(`out ${argv.join(" ")}\n`);
      context.err(`err ${context.env.MARK}\n`);
      return 0;
    },
    codeStamp: () => "stamp",
    log: (line) => log.push(line),
    onClientLost: () => log.push("client lost"),
    openFileCount: () => 10,
    ...overrides,
  };
  const helper = await startHelperServer(options);
  t.after(() => helper.stop("test over"));
  return { helper, log, socketPath: options.socketPath };
}

test("the helper runs a command in the client's directory, umask and environment, and frames its output and status", async (t) => {
  const dir = realpathSync(scratchDir(t));
  const work = join(dir, "work");
  mkdirSync(work);
  const cwdBefore = process.cwd();
  const umaskBefore = process.umask();
  const seen: Array<{ cwd: string; umask: number; env: NodeJS.ProcessEnv }> = [];
  const { socketPath, log } = await startTestHelper(t, dir, {
    run: async (argv, context) => {
      seen.push({ cwd: process.cwd(), umask: process.umask(), env: context.env });
      writeFileSync("made-here", "x", { mode: 0o666 });
      context.out("one\n");
      context.err("two\n");
      context.out("three\n");
      return argv.length;
    },
  });
  assert.equal(statSync(socketPath).mode & 0o777, 0o600, "socket is private");
  const done = await exchange(socketPath, { umask: 0o077, cwd: work, argv: ["img", "x", "y"], env: { A: "1" } });
  await done.ended;
  assert.deepEqual(kinds(done.frames), ["started", "stdout:one\n", "stderr:two\n", "stdout:three\n", "exit:3"]);
  assert.deepEqual(seen, [{ cwd: work, umask: 0o077, env: { A: "1" } }]);
  assert.equal(statSync(join(work, "made-here")).mode & 0o777, 0o600, "the client's umask applied to what the command created");
  assert.equal(process.cwd(), cwdBefore, "the helper's own directory is back");
  assert.equal(process.umask(), umaskBefore, "the helper's own umask is back");
  assert.match(log.join("\n"), /'img x' in .*work: exit status 3/);
});

test("commands run one at a time, in the order they came", async (t) => {
  const dir = scratchDir(t);
  let running = 0;
  let most = 0;
  const order: string[] = [];
  const { socketPath } = await startTestHelper(t, dir, {
    run: async (argv, context) => {
      running++;
      most = Math.max(most, running);
      order.push(argv[1]);
      await new Promise((wake) => setTimeout(wake, 20));
      context.out(argv[1]);
      running--;
      return 0;
    },
  });
  const clients = [];
  for (const name of ["a", "b", "c", "d"]) {
    clients.push(await exchange(socketPath, imgRequest(dir, name)));
    await new Promise((wake) => setTimeout(wake, 2)); // arrival order
  }
  await Promise.all(clients.map((client) => client.ended));
  assert.equal(most, 1);
  assert.deepEqual(order, ["a", "b", "c", "d"]);
  for (const [index, client] of clients.entries()) assert.deepEqual(kinds(client.frames), ["started", `stdout:${"abcd"[index]}`, "exit:0"]);
});

test("what the helper will not run is refused before it starts: non-img commands, malformed requests, a missing directory", async (t) => {
  const dir = scratchDir(t);
  let runs = 0;
  const { socketPath } = await startTestHelper(t, dir, {
    run: async () => {
      runs++;
      return 0;
    },
  });
  const vm = await exchange(socketPath, { ...imgRequest(dir), argv: ["vm", "list"] });
  await vm.ended;
  assert.deepEqual(kinds(vm.frames), ["refused:the helper runs 'img' commands only, not 'vm'"]);
  const garbled = Buffer.alloc(8);
  garbled.writeUInt32LE(4);
  garbled.write("zzz\0", 4);
  const bad = await exchange(socketPath, garbled);
  await bad.ended;
  assert.equal(bad.frames.length, 1);
  assert.equal(bad.frames[0].kind, "refused");
  assert.match(bad.frames[0].payload.toString(), /protocol 'zzz'/);
  const gone = await exchange(socketPath, imgRequest(join(dir, "no-such-dir"), "info"));
  await gone.ended;
  assert.equal(gone.frames[0].kind, "refused");
  assert.match(gone.frames[0].payload.toString(), /cannot enter .*no-such-dir/);
  assert.equal(runs, 0);
});

test("a change of the code on disk refuses the next command and stops the helper", async (t) => {
  const dir = scratchDir(t);
  let stamp = "v1";
  const { socketPath, helper } = await startTestHelper(t, dir, { codeStamp: () => stamp });
  const first = await exchange(socketPath, imgRequest(dir, "info"));
  await first.ended;
  assert.equal(first.frames.at(-1)?.kind, "exit");
  stamp = "v2";
  const second = await exchange(socketPath, imgRequest(dir, "info"));
  await second.ended;
  assert.deepEqual(kinds(second.frames), ["refused:the code on disk changed since the helper started"]);
  assert.equal(await helper.stopped, "the code on disk changed since it started");
  assert.throws(() => statSync(socketPath), /ENOENT/, "the socket is gone: new clients run commands themselves");
});

test("a client that goes away while its command runs ends the helper (onClientLost); one that waits in the queue is refused", async (t) => {
  const dir = scratchDir(t);
  let release: () => void = () => {};
  const { socketPath, log, helper } = await startTestHelper(t, dir, {
    run: async () => {
      await new Promise<void>((resolve) => (release = resolve));
      return 0;
    },
    onClientLost: () => {
      log.push("client lost");
      void helper.stop("client lost");
    },
  });
  const running = await exchange(socketPath, imgRequest(dir, "convert"));
  while (running.frames.length === 0) await new Promise((wake) => setTimeout(wake, 5));
  const queued = await exchange(socketPath, imgRequest(dir, "info"));
  await new Promise((wake) => setTimeout(wake, 20));
  running.close();
  await queued.ended;
  assert.ok(log.includes("client lost"), log.join("\n"));
  assert.match(log.join("\n"), /the client of 'img convert' went away while it ran/);
  assert.deepEqual(kinds(queued.frames), ["refused:the helper is stopping (client lost)"]);
  release();
  assert.equal(await helper.stopped, "client lost");
});

test("a command that leaves files open stops the helper after it replied", async (t) => {
  const dir = scratchDir(t);
  let files = 10;
  const { socketPath, helper } = await startTestHelper(t, dir, {
    run: async (argv) => {
      if (argv[1] === "leak") files++;
      return 0;
    },
    openFileCount: () => files,
  });
  const clean = await exchange(socketPath, imgRequest(dir, "info"));
  await clean.ended;
  const leaky = await exchange(socketPath, imgRequest(dir, "leak"));
  await leaky.ended;
  assert.equal(leaky.frames.at(-1)?.payload.toString(), "0", "the command's own result is delivered");
  assert.match(await helper.stopped, /'img leak' left 1 more files open than before it ran/);
});

test("the helper replaces a dead socket, refuses a live one (E_IN_USE) and stops when idle", async (t) => {
  const dir = scratchDir(t);
  const socketPath = join(dir, "h.sock");
  // A socket file nothing listens on: what a killed helper leaves.
  spawnSync(process.execPath, ["-e", `require("net").createServer().listen(${JSON.stringify(socketPath)}, () => process.kill(process.pid, "SIGKILL"))`]);
  assert.ok(lstatSync(socketPath).isSocket(), "a dead socket is left");
  const { helper } = await startTestHelper(t, dir, { idleTimeoutMs: 50 });
  await assert.rejects(
    startHelperServer({ socketPath, idleTimeoutMs: 0, run: async () => 0, codeStamp: () => "", log: () => {} }),
    (error: unknown) => error instanceof SnapstackError && error.code === "E_IN_USE",
  );
  assert.equal(await helper.stopped, "idle for 0.05 s");
});

test("a regular file at the socket path is left alone (E_EXISTS)", async (t) => {
  const dir = scratchDir(t);
  const notes = join(dir, "notes.txt");
  writeFileSync(notes, "keep me");
  await assert.rejects(
    startHelperServer({ socketPath: notes, idleTimeoutMs: 0, run: async () => 0, codeStamp: () => "", log: () => {} }),
    (error: unknown) => error instanceof SnapstackError && error.code === "E_EXISTS" && /is not a socket/.test(error.message),
  );
  assert.equal(readFileSync(notes, "utf8"), "keep me");
});

test("arguments naming the process itself are refused (the client runs them); the client's TZ applies while its command runs", async (t) => {
  const dir = scratchDir(t);
  const zones: Array<string | undefined> = [];
  const zoneBefore = process.env.TZ;
  const { socketPath } = await startTestHelper(t, dir, {
    run: async (_argv, context) => {
      zones.push(process.env.TZ);
      context.out(new Date(0).getHours().toString());
      return 0;
    },
  });
  for (const path of ["/dev/stdin", "/dev/fd/3", "/proc/self/fd/0", "file.filename=/dev/stdin"]) {
    const refused = await exchange(socketPath, imgRequest(dir, "info", path));
    await refused.ended;
    assert.deepEqual(kinds(refused.frames), [`refused:'${path}' names the process that runs the command`]);
  }
  const relative = await exchange(socketPath, imgRequest("/dev", "info", "stdin"));
  await relative.ended;
  assert.deepEqual(kinds(relative.frames), ["refused:'stdin' names the process that runs the command"], "relative to the client's directory");
  const tokyo = await exchange(socketPath, { ...imgRequest(dir, "snapshot", "-l", "/dev/sda"), env: { TZ: "Asia/Tokyo" } });
  await tokyo.ended;
  const utc = await exchange(socketPath, { ...imgRequest(dir, "snapshot", "-l", "x"), env: { TZ: "UTC" } });
  await utc.ended;
  assert.deepEqual(zones, ["Asia/Tokyo", "UTC"]);
  assert.deepEqual(kinds(tokyo.frames), ["started", "stdout:9", "exit:0"], "1970-01-01 00:00 UTC is 09:00 in Tokyo");
  assert.deepEqual(kinds(utc.frames), ["started", "stdout:0", "exit:0"]);
  assert.equal(process.env.TZ, zoneBefore, "the helper's own time zone is back");
});

test("snapstack helper refuses an idle timeout Node's timers cannot hold and a socket path too long for an address", async () => {
  const command = helperCommand(async () => 0);
  const context = captureContext({});
  await assert.rejects(command.run(["--idle-timeout", "3000000"], context), /more than 2147483 seconds/);
  await assert.rejects(command.run(["--idle-timeout", "1.5"], context), /not a whole number of seconds/);
  await assert.rejects(
    command.run(["--socket", `/tmp/${"x".repeat(120)}.sock`], context),
    (error: unknown) => error instanceof SnapstackError && error.code === "E_USAGE" && /longer than a socket address allows/.test(error.message),
  );
});

test("clients connecting while a command runs are not taken for files the command left open (the real /proc count)", async (t) => {
  const dir = scratchDir(t);
  let release: () => void = () => {};
  const { socketPath, helper } = await startTestHelper(t, dir, {
    openFileCount: undefined,
    run: async (argv) => {
      if (argv[1] === "slow") await new Promise<void>((resolve) => (release = resolve));
      return 0;
    },
  });
  const slow = await exchange(socketPath, imgRequest(dir, "slow"));
  while (slow.frames.length === 0) await new Promise((wake) => setTimeout(wake, 5));
  const waiting = await exchange(socketPath, imgRequest(dir, "quick"));
  await new Promise((wake) => setTimeout(wake, 20));
  release();
  await slow.ended;
  await waiting.ended;
  assert.deepEqual(kinds(waiting.frames), ["started", "exit:0"], "the second client's command ran in the helper");
  const after = await exchange(socketPath, imgRequest(dir, "again"));
  await after.ended;
  assert.deepEqual(kinds(after.frames), ["started", "exit:0"], "and the helper goes on");
  let stoppedEarly = false;
  void helper.stopped.then(() => (stoppedEarly = true));
  await new Promise((wake) => setImmediate(wake));
  assert.equal(stoppedEarly, false);
});

test("a stopping helper lets go of its socket at once: a new helper there keeps its socket when the old one's command ends", async (t) => {
  const dir = scratchDir(t);
  let release: () => void = () => {};
  const first = await startTestHelper(t, dir, {
    run: async () => {
      await new Promise<void>((resolve) => (release = resolve));
      return 0;
    },
  });
  const running = await exchange(first.socketPath, imgRequest(dir, "convert"));
  while (running.frames.length === 0) await new Promise((wake) => setTimeout(wake, 5));
  void first.helper.stop("SIGTERM");
  const second = await startHelperServer({ socketPath: first.socketPath, idleTimeoutMs: 0, run: async () => 7, codeStamp: () => "", log: () => {} });
  t.after(() => second.stop("test over"));
  release();
  await running.ended;
  assert.equal(running.frames.at(-1)?.payload.toString(), "0", "the old helper's command completed");
  assert.equal(await first.helper.stopped, "SIGTERM");
  assert.ok(lstatSync(first.socketPath).isSocket(), "the new helper's socket is still there");
  const answered = await exchange(first.socketPath, imgRequest(dir, "info"));
  await answered.ended;
  assert.equal(answered.frames.at(-1)?.payload.toString(), "7", "and the new helper answers");
});
