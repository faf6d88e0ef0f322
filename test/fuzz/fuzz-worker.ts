/**
 * Worker thread running probeImage on the images it is sent, one at a
 * time, so the parent can bound each case's time (terminate on a hang) and
 * the heap (resourceLimits).
 */
import { parentPort } from "node:worker_threads";
import { probeImage } from "./probe-image.ts";

export interface FuzzRequest {
  id: number;
  bytes: Uint8Array;
}

export interface FuzzReply {
  id: number;
  steps: Record<string, string>;
  problems: string[];
}

const port = parentPort;
if (port === null) throw new Error("fuzz-worker.ts runs as a worker thread");
port.on("message", (request: FuzzRequest) => {
  probeImage(request.bytes).then(
    (result) => port.postMessage({ id: request.id, ...result } satisfies FuzzReply),
    (error: unknown) => port.postMessage({ id: request.id, steps: {}, problems: [`probe itself failed: ${String(error)}`] } satisfies FuzzReply),
  );
});
