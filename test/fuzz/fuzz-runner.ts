/**
 * Runs probes in a worker thread with a per-case timeout and a heap bound:
 * a case that hangs or exhausts the heap is reported as such and the worker
 * replaced. Failing cases are saved to the corpus (test/fuzz/corpus, gzip:
 * images are mostly zeroes) so every later run replays them; commit them.
 */
import { Worker } from "node:worker_threads";
import { createHash } from "node:crypto";
import { gunzipSync, gzipSync } from "node:zlib";
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import type { FuzzReply, FuzzRequest } from "./fuzz-worker.ts";

export const CORPUS_DIR = new URL("./corpus/", import.meta.url);
/** A case gets this long before it counts as a hang (the probe of a small image takes milliseconds). */
export const CASE_TIMEOUT_MS = 20_000;
/** Heap of the worker: a case needing more counts as unbounded memory. */
export const WORKER_HEAP_MB = 768;

export type CaseOutcome = { kind: "done"; reply: FuzzReply } | { kind: "hang" } | { kind: "crashed"; reason: string };

export class ProbeRunner {
  #worker: Worker | null = null;
  #nextId = 1;
  #pending: { id: number; resolve: (outcome: CaseOutcome) => void } | null = null;

  #start(): Worker {
    const worker = new Worker(new URL("./fuzz-worker.ts", import.meta.url), { resourceLimits: { maxOldGenerationSizeMb: WORKER_HEAP_MB } });
    worker.on("message", (reply: FuzzReply) => {
      const pending = this.#pending;
      if (pending !== null && pending.id === reply.id) {
        this.#pending = null;
        pending.resolve({ kind: "done", reply });
      }
    });
    const fail = (reason: string): void => {
      this.#worker = null;
      const pending = this.#pending;
      this.#pending = null;
      pending?.resolve({ kind: "crashed", reason });
    };
    worker.on("error", (error: Error) => fail(`${error.name}: ${error.message}`));
    worker.on("exit", (code) => fail(`worker exited with ${code}`));
    this.#worker = worker;
    return worker;
  }

  run(bytes: Uint8Array, timeoutMs = CASE_TIMEOUT_MS): Promise<CaseOutcome> {
    const worker = this.#worker ?? this.#start();
    const id = this.#nextId++;
    return new Promise<CaseOutcome>((resolve) => {
      const timer = setTimeout(() => {
        if (this.#pending?.id !== id) return;
        this.#pending = null;
        this.#worker = null;
        void worker.terminate();
        resolve({ kind: "hang" });
      }, timeoutMs);
      this.#pending = {
        id,
        resolve: (outcome) => {
          clearTimeout(timer);
          resolve(outcome);
        },
      };
      worker.postMessage({ id, bytes } satisfies FuzzRequest);
    });
  }

  async close(): Promise<void> {
    const worker = this.#worker;
    this.#worker = null;
    if (worker !== null) {
      worker.removeAllListeners("exit");
      await worker.terminate();
    }
  }
}

/** What went wrong with a case, or null when it ended in data or clean errors. */
export function problemOf(outcome: CaseOutcome): string | null {
  if (outcome.kind === "hang") return "hang (no answer within the timeout)";
  if (outcome.kind === "crashed") return `worker died: ${outcome.reason}`;
  return outcome.reply.problems.length > 0 ? outcome.reply.problems.join("\n") : null;
}

/** Keep a failing case in the corpus; returns its file name. */
export function saveToCorpus(bytes: Uint8Array, label: string): string {
  mkdirSync(CORPUS_DIR, { recursive: true });
  const hash = createHash("sha256").update(bytes).digest("hex").slice(0, 16);
  const slug = label.replace(/[^a-z0-9]+/gi, "-").replace(/^-|-$/g, "").slice(0, 60).toLowerCase();
  const name = `${slug}-${hash}.qcow2.gz`;
  writeFileSync(new URL(name, CORPUS_DIR), gzipSync(bytes, { level: 9 }));
  return name;
}

export function corpusFiles(): { name: string; bytes: Uint8Array }[] {
  let names: string[];
  try {
    names = readdirSync(CORPUS_DIR).filter((name) => name.endsWith(".qcow2.gz")).sort();
  } catch {
    return [];
  }
  return names.map((name) => ({ name, bytes: new Uint8Array(gunzipSync(readFileSync(new URL(name, CORPUS_DIR)))) }));
}
