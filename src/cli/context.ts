/**
 * What a command may touch besides the library: its output streams and the
 * environment. Commands write through this so tests can capture output
 * in-process and so nothing else in src/cli talks to `process` directly.
 */

export interface CliContext {
  /** Write to standard output (no newline added). */
  out(text: string): void;
  /** Write to standard error (no newline added). */
  err(text: string): void;
  readonly env: NodeJS.ProcessEnv;
}

/** Streams whose reader went away: what is written to them later is dropped. */
const closedStreams = new Set<NodeJS.WriteStream>();
/** Streams that got the error listener below. */
const watchedStreams = new Set<NodeJS.WriteStream>();

/**
 * Write to a process stream. A reader that went away (`snapstack img map
 * ... | head -1`): the rest of that stream's output is dropped, and the
 * command runs to its end and exits with its own status, as qemu-img and
 * qemu-io 7.2 do (they ignore SIGPIPE and do not check their writes:
 * `qemu-img map IMG | head -1` and `qemu-io -c 'read -v 0 4M' -c 'write 0
 * 64k' IMG | head -1` exit 0, the write done). Node ignores SIGPIPE too, so
 * a write fails with EPIPE instead (a later write may report
 * ERR_STREAM_DESTROYED). Ending the process there would cut an `io`
 * command list short between two of its writes.
 * The stream is touched only when something is written: creating
 * process.stdout on a pipe loads Node's net and stream modules (~3 ms of
 * the start of a command that prints nothing, such as snapshot -c).
 */
function writeToProcessStream(stream: NodeJS.WriteStream, text: string): void {
  if (!watchedStreams.has(stream)) {
    watchedStreams.add(stream);
    stream.on("error", (error: NodeJS.ErrnoException) => {
      if (error.code !== "EPIPE" && error.code !== "ERR_STREAM_DESTROYED") throw error;
      closedStreams.add(stream);
    });
  }
  if (!closedStreams.has(stream)) stream.write(text);
}

/** The real process streams. */
export function processContext(): CliContext {
  return {
    out: (text) => writeToProcessStream(process.stdout, text),
    err: (text) => writeToProcessStream(process.stderr, text),
    env: process.env,
  };
}

/** A context that records output (for tests). */
export function captureContext(env: NodeJS.ProcessEnv = {}): CliContext & { stdout: string; stderr: string } {
  const captured = {
    stdout: "",
    stderr: "",
    env,
    out(text: string) {
      captured.stdout += text;
    },
    err(text: string) {
      captured.stderr += text;
    },
  };
  return captured;
}

/** One command of `snapstack img` / `snapstack io`. */
export interface CliCommand {
  name: string;
  /** Usage line after the program name, qemu-img style. */
  synopsis: string;
  summary: string;
  /** Lines describing the options, shown by `--help`. */
  optionHelp?: string[];
  /** Runs the command; returns the exit status. Throws SnapstackError for failures. */
  run(argv: string[], context: CliContext): Promise<number>;
}
