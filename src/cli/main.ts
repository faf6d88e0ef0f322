/**
 * `snapstack` entry: dispatch to `img <command>` (qemu-img), `io` (qemu-io),
 * and later `nbd`, `serve`, `vm`.
 *
 * Every failure ends here: it is printed as one line (error-report.ts) and
 * turned into an exit status through the one table in exit-codes.ts.
 */
import { readFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { SnapstackError } from "../base/errors.ts";
import { formatDebugDetails, formatErrorLine, toSnapstackError } from "./error-report.ts";
import { exitCodeFor } from "./exit-codes.ts";
import { processContext, type CliCommand, type CliContext } from "./context.ts";
import { IMG_COMMANDS, loadAllImgCommands } from "./img-commands.ts";
// Every command module is loaded only when used (img-commands.ts; io, nbd,
// serve and vm below, which pull in the NBD server, TLS, HTTP and the VM
// manager), so a command starts by parsing little more than what it runs.

/** Commands reserved for later issues: recognised, but not available yet. */
const PLANNED_COMMANDS: string[] = [];

export function snapstackVersion(): string {
  const packageJson = JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as { version: string };
  return packageJson.version;
}

async function topHelp(): Promise<string> {
  const imgCommands = await loadAllImgCommands();
  const lines = [
    `snapstack ${snapstackVersion()}: copy-on-write disk images (qcow2, raw) with a qemu-img compatible CLI`,
    "",
    "usage: snapstack img <command> [command options]   (like qemu-img)",
    "       snapstack io [-f fmt] [-r] -c COMMAND... FILE  (like qemu-io)",
    "       snapstack nbd [options] FILE                   (like qemu-nbd; 'snapstack nbd --help')",
    "       snapstack helper [--socket PATH] [--idle-timeout SECONDS]  (runs img commands for native/build/snapstack-img)",
    "       snapstack --help | --version",
    "",
    "img commands:",
    ...imgCommands.map((command) => `  ${command.synopsis}`),
    "",
    "Sizes accept the suffixes k, M, G, T, P, E (powers of 1024) as qemu-img does.",
    "Errors print one line 'snapstack: error <CODE>: <message>' on stderr (codes: docs/errors.md).",
    "Run 'snapstack img <command> --help' for a command's options.",
  ];
  return lines.join("\n") + "\n";
}

export function commandHelp(command: CliCommand, prefix: string): string {
  const lines = [`usage: ${prefix} ${command.synopsis}`, "", command.summary];
  if (command.optionHelp !== undefined && command.optionHelp.length > 0) lines.push("", ...command.optionHelp);
  return lines.join("\n") + "\n";
}

function usage(message: string, hint: string): SnapstackError {
  return new SnapstackError("E_USAGE", `${message}; try '${hint}'`);
}

function wantsHelp(argv: readonly string[]): boolean {
  const end = argv.indexOf("--");
  const options = end >= 0 ? argv.slice(0, end) : argv;
  return options.includes("--help") || options.includes("-h");
}

/** Print a failure as one line and map it to the exit status of `commandName`. */
function reportFailure(error: unknown, commandName: string, context: CliContext): number {
  const coded = toSnapstackError(error);
  context.err(formatErrorLine(coded));
  context.err(formatDebugDetails(error, context.env));
  return exitCodeFor(commandName, coded.code, coded.details.stage);
}

async function runCommand(command: CliCommand, prefix: string, argv: string[], context: CliContext): Promise<number> {
  if (wantsHelp(argv)) {
    context.out(commandHelp(command, prefix));
    return 0;
  }
  try {
    return await command.run(argv, context);
  } catch (error) {
    const withHint =
      error instanceof SnapstackError && error.code === "E_USAGE" && !error.message.includes("; try '")
        ? new SnapstackError("E_USAGE", `${error.message}; try '${prefix} ${command.name} --help'`, { ...error.details })
        : error;
    return reportFailure(withHint, command.name, context);
  }
}

/** `--help` / `--version` at the top level or after `img`: prints and returns true. */
async function printedBuiltin(word: string, context: CliContext): Promise<boolean> {
  if (word === "--help" || word === "-h" || word === "help") {
    context.out(await topHelp());
    return true;
  }
  if (word === "--version" || word === "-V") {
    context.out(`snapstack version ${snapstackVersion()}\n`);
    return true;
  }
  return false;
}

async function dispatch(argv: string[], context: CliContext): Promise<number> {
  const [first, ...rest] = argv;
  if (first === undefined) throw usage("missing command", "snapstack --help");
  if (await printedBuiltin(first, context)) return 0;
  if (first === "io") return runCommand((await import("./io/io-command.ts")).ioCommand, "snapstack", rest, context);
  if (first === "nbd") return runCommand((await import("./commands/nbd.ts")).nbdCommand, "snapstack", rest, context);
  if (first === "serve") return runCommand((await import("./commands/serve.ts")).serveCommand, "snapstack", rest, context);
  if (first === "vm") return runCommand((await import("./commands/vm.ts")).vmCommand, "snapstack", rest, context);
  if (first === "helper") return runCommand((await import("./commands/helper.ts")).helperCommand(runCli), "snapstack", rest, context);
  if (first === "img") {
    const [name, ...commandArgs] = rest;
    if (name === undefined) throw usage("Not enough arguments", "snapstack img --help");
    if (await printedBuiltin(name, context)) return 0;
    const entry = IMG_COMMANDS.find((candidate) => candidate.name === name);
    if (entry === undefined) throw usage(`Command not found: ${name}`, "snapstack img --help");
    return runCommand(await entry.load(), "snapstack img", commandArgs, context);
  }
  if (PLANNED_COMMANDS.includes(first)) throw usage(`command '${first}' is not available in this version`, "snapstack --help");
  throw usage(`unknown command '${first}'`, "snapstack --help");
}

/** Most threads sizeThreadPoolFor gives the pool: libuv's own default. */
const THREAD_POOL_SIZE_MAX = 4;

/**
 * Size libuv's thread pool for the command in `argv` (without node and the
 * script), before it runs: for the one-shot commands (`img`, `io`) and the
 * helper that runs `img` commands (`helper`), as many
 * threads as the machine has cores, at least 2 (a read and a write overlap)
 * and at most libuv's default of 4; unless UV_THREADPOOL_SIZE is set.
 *
 * Why: a copy (convert, commit, restore, ...) keeps a few reads and writes
 * in flight on the pool, and on cached data each is a memory copy by the
 * kernel, CPU work: threads beyond the cores only take turns with the main
 * thread and with each other (two writes to one file also contend for its
 * inode lock). Measured on the 2-core development VM, alternating: convert
 * of 1 GiB into a new qcow2 image 0.46 -> 0.43 s and into raw 0.42 -> 0.38 s
 * (medians of 9), each 1 MiB data write 385 -> 342 us (qemu-img: 334). The
 * servers (nbd, serve, vm) keep libuv's default: their reads from cold, slow
 * media want more of them in flight.
 *
 * libuv reads the variable once, when the pool starts (the first
 * asynchronous file call); loading the modules starts no pool, so the entry
 * (bin/snapstack) calls this between loading the CLI and running it.
 */
export function sizeThreadPoolFor(argv: readonly string[], env: NodeJS.ProcessEnv = process.env): void {
  if (env.UV_THREADPOOL_SIZE !== undefined || (argv[0] !== "img" && argv[0] !== "io" && argv[0] !== "helper")) return;
  env.UV_THREADPOOL_SIZE = String(Math.min(THREAD_POOL_SIZE_MAX, Math.max(2, availableParallelism())));
}

/** Run the CLI with `argv` (without node and the script); resolves to the exit status. */
export async function runCli(argv: string[], context: CliContext = processContext()): Promise<number> {
  try {
    return await dispatch(argv, context);
  } catch (error) {
    return reportFailure(error, "", context);
  }
}
