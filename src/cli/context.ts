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

let closedOutputHandled = false;

/**
 * A reader that went away (`snapstack io ... | head -1`) ends the command
 * quietly with status 1 instead of a stack trace: Node ignores SIGPIPE, so
 * the write fails with EPIPE where C tools like qemu-io die of the signal.
 */
function exitQuietlyOnClosedOutput(): void {
  if (closedOutputHandled) return;
  closedOutputHandled = true;
  for (const stream of [process.stdout, process.stderr]) {
    stream.on("error", (error: NodeJS.ErrnoException) => {
      if (error.code !== "EPIPE") throw error;
      process.exit(1);
    });
  }
}

/** The real process streams. */
export function processContext(): CliContext {
  exitQuietlyOnClosedOutput();
  return {
    out: (text) => void process.stdout.write(text),
    err: (text) => void process.stderr.write(text),
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
