/**
 * `snapstack serve [--home DIR] [--listen-tcp PORT]`: run the daemon in the
 * foreground (src/api/daemon.ts) until SIGTERM or SIGINT.
 */
import { NOT_QEMU, optionString, parseArgs } from "../args.ts";
import { expectPositionals } from "../command-helpers.ts";
import type { CliCommand } from "../context.ts";
import { SnapstackError } from "../../base/errors.ts";
import { resolveHome } from "../../vm/store/machine-store.ts";
import { startDaemon } from "../../api/daemon.ts";

export const serveCommand: CliCommand = {
  name: "serve",
  synopsis: "serve [--home DIR] [--listen-tcp PORT]",
  summary: "Run the snapstack daemon: machines, QEMU processes, NBD exports and the JSON API on $SNAPSTACK_HOME/daemon.sock.",
  optionHelp: [
    "  --home DIR         the store (default $SNAPSTACK_HOME or ~/.local/share/snapstack)",
    "  --listen-tcp PORT  also serve the API on 127.0.0.1:PORT; clients send 'Authorization: Bearer TOKEN' (TOKEN in $SNAPSTACK_HOME/api-token)",
  ],
  async run(argv, context) {
    const parsed = parseArgs(argv, [
      { name: "home", long: "home", value: true },
      { name: "tcp", long: "listen-tcp", value: true },
    ], NOT_QEMU);
    expectPositionals(parsed.positionals, 0, 0, "");
    const tcpText = optionString(parsed, "tcp");
    const tcpPort = tcpText === undefined ? undefined : Number(tcpText);
    if (tcpPort !== undefined && (!/^[0-9]+$/.test(tcpText!) || !Number.isSafeInteger(tcpPort) || tcpPort > 65535)) {
      throw new SnapstackError("E_USAGE", `--listen-tcp ${tcpText}: not a port number`);
    }
    const log = (line: string): void => context.err(`${new Date().toISOString()} ${line}\n`);
    // The handlers go in before the daemon starts: once its socket exists a supervisor may signal at
    // once, and must get the clean stop, not the default action. A signal during the start stops
    // the daemon as soon as it is up; a second one while it closes takes the default action.
    let stop = (): void => {};
    const stopped = new Promise<void>((resolve) => (stop = resolve));
    const unlisten = (): void => {
      process.off("SIGTERM", stop);
      process.off("SIGINT", stop);
    };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
    let daemon: Awaited<ReturnType<typeof startDaemon>>;
    try {
      daemon = await startDaemon({ home: resolveHome(optionString(parsed, "home"), context.env), tcpPort, log });
      await stopped;
    } finally {
      unlisten();
    }
    log("stopping");
    await daemon.close();
    return 0;
  },
};
