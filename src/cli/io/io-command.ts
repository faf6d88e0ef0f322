/**
 * `snapstack io [-f fmt] [-r] [-U] [-t cache] -c COMMAND [-c COMMAND]... FILE`, like qemu-io.
 *
 * Design notes
 * - The image is opened once; the -c commands run in order. As in qemu-io, a
 *   failing command does not stop the ones after it; the exit status is 1 if
 *   any failed. Each failure prints the usual one-line coded error on
 *   stderr, and the line qemu-io prints for it on stdout ("read failed:
 *   Input/output error", "Pattern verification failed at offset N, M
 *   bytes"), so scripts comparing stdout still match.
 * - Command words are split on blanks, as qemu-io does (no quoting).
 */
import { SnapstackError } from "../../base/errors.ts";
import type { BlockDevice } from "../../device/block-device.ts";
import { optionFlag, optionList, optionString, parseArgs } from "../args.ts";
import type { CliCommand, CliContext } from "../context.ts";
import { checkCacheOptions, refuseForceShareForWriting } from "../command-helpers.ts";
import { formatErrorLine, toSnapstackError } from "../error-report.ts";
import { openImage } from "../engine.ts";
import { IO_SUBCOMMANDS, IoCommandError, IoUsageError, expectArgumentCount, type IoSession } from "./io-subcommands.ts";

/** The aio requests of one session (aio_read, aio_write): failures go to `report` as they end. */
function aioSession(report: (error: unknown) => void): IoSession {
  const pending = new Set<Promise<void>>();
  return {
    start(request) {
      const tracked: Promise<void> = request.catch(report).finally(() => pending.delete(tracked));
      pending.add(tracked);
    },
    async drain() {
      while (pending.size > 0) await Promise.all([...pending]);
    },
  };
}

async function runOne(device: BlockDevice, line: string, context: CliContext, session: IoSession): Promise<void> {
  const words = line.split(/[ \t]+/).filter((word) => word !== "");
  if (words.length === 0) return;
  const [name, ...args] = words;
  const subcommand = IO_SUBCOMMANDS.find((candidate) => candidate.name === name || candidate.aliases?.includes(name));
  if (subcommand === undefined) throw new SnapstackError("E_USAGE", `command "${name}" not found`, { command: name });
  // qemu-io's command(): the word count first, then init_check_command (the image's permissions,
  // nothing on stdout), then the command parses its options.
  if (subcommand.wordsMin !== undefined) expectArgumentCount(name, args, subcommand.wordsMin, subcommand.wordsMax ?? Infinity);
  if (subcommand.writes === true && device.readOnly) throw new SnapstackError("E_READ_ONLY", "Block node is read-only", { command: name });
  try {
    await subcommand.run(device, args, context, session);
  } catch (error) {
    if (error instanceof IoUsageError && subcommand.qemuUsage !== undefined) throw new IoCommandError(error.code, subcommand.qemuUsage, error.message);
    throw error;
  }
}

export const ioCommand: CliCommand = {
  name: "io",
  synopsis: "io [-f fmt] [-r] [-U] [-t cache] -c COMMAND [-c COMMAND]... FILE",
  summary: "Run qemu-io style commands on an image (read, write, aio_*, discard, flush, truncate, length, info, alloc, map, ...).",
  optionHelp: [
    "  -f fmt      image format (qcow2, raw); detected when omitted",
    "  -r          open read-only",
    "  -U          share the image with other writers (read-only only, with -r)",
    "  -t cache, -n, -i aio, -d unmap",
    "              accepted as qemu-io takes them (-t unsafe makes flushes do nothing)",
    "  -c COMMAND  a command to run; repeat for several:",
    ...IO_SUBCOMMANDS.map((subcommand) => `                ${subcommand.synopsis}`),
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "format", short: "f", long: "format", value: true },
      { name: "readOnly", short: "r", long: "read-only" },
      { name: "forceShare", short: "U", long: "force-share" },
      { name: "command", short: "c", long: "cmd", value: true, repeat: "list" },
      // Accepted as qemu-io takes them; they change how QEMU does I/O, not what the commands do.
      { name: "cache", short: "t", long: "cache", value: true },
      { name: "nocache", short: "n", long: "nocache" },
      { name: "aio", short: "i", long: "aio", value: true },
      { name: "discard", short: "d", long: "discard", value: true },
    ]);
    checkCacheOptions(parsed);
    const aio = optionString(parsed, "aio");
    if (aio !== undefined && !["threads", "native", "io_uring"].includes(aio)) throw new SnapstackError("E_INVALID_OPTION", `Invalid aio option: ${aio}`, { value: aio });
    const discard = optionString(parsed, "discard");
    if (discard !== undefined && !["ignore", "off", "unmap", "on"].includes(discard)) throw new SnapstackError("E_INVALID_OPTION", `Invalid discard option: ${discard}`, { value: discard });
    // qemu-io unmaps by default; ignoring discards would change what discard and write -z -u do.
    if (discard === "ignore" || discard === "off") throw new SnapstackError("E_UNSUPPORTED_FEATURE", `-d ${discard} is not supported (discards always unmap)`, { value: discard });
    const commands = optionList(parsed, "command");
    if (parsed.positionals.length !== 1) {
      throw new SnapstackError("E_USAGE", parsed.positionals.length === 0 ? "Expecting an image file name" : `Unexpected argument: ${parsed.positionals[1]}`);
    }
    if (commands.length === 0) throw new SnapstackError("E_USAGE", "no -c command given (interactive mode is not supported)");
    refuseForceShareForWriting(parsed, !optionFlag(parsed, "readOnly"));
    const device = await openImage(parsed.positionals[0], {
      format: optionString(parsed, "format"),
      readOnly: optionFlag(parsed, "readOnly"),
      forceShare: optionFlag(parsed, "forceShare"),
      // -t unsafe: flushes do nothing, as in qemu.
      cache: optionString(parsed, "cache") === "unsafe" ? "unsafe" : undefined,
    });
    let failed = false;
    const report = (error: unknown): void => {
      if (error instanceof IoCommandError) context.out(`${error.stdoutLine}\n`);
      context.err(formatErrorLine(toSnapstackError(error)));
    };
    // An aio request that fails is reported but leaves the exit status as it is (qemu-io's completion callbacks).
    const session = aioSession(report);
    try {
      for (const line of commands) {
        try {
          await runOne(device, line, context, session);
        } catch (error) {
          failed = true;
          report(error);
        }
      }
    } finally {
      // qemu-io drains at exit: aio requests still running complete (and report) first.
      await session.drain();
      await device.close();
    }
    return failed ? 1 : 0;
  },
};
