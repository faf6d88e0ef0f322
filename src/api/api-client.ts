/**
 * A client of the daemon's API (api-server.ts) over its Unix socket.
 * Errors from the daemon come back as the SnapstackError they were, with
 * their code; a socket nobody answers on is E_NOT_FOUND with details
 * {daemon: "absent"}, which the CLI takes as "start the daemon".
 */
import http from "node:http";
import { ERROR_CODES, SnapstackError, type ErrorCode } from "../base/errors.ts";
import type { JobProgress } from "../chain/jobs/index.ts";

/** Bound on one request's wait (long operations stream progress, which keeps it alive). */
export const API_REQUEST_TIMEOUT_MS = 30 * 60_000;

function toError(value: { code?: string; message?: string; details?: Record<string, unknown> } | undefined, status: number): SnapstackError {
  const code = value?.code !== undefined && value.code in ERROR_CODES ? (value.code as ErrorCode) : "E_INTERNAL";
  return new SnapstackError(code, value?.message ?? `daemon answered HTTP ${status}`, value?.details ?? {});
}

export class ApiClient {
  readonly socketPath: string;

  constructor(socketPath: string) {
    this.socketPath = socketPath;
  }

  /** One request; with onProgress the answer is streamed (NDJSON) and progress events delivered. */
  request<T>(method: string, path: string, body?: unknown, onProgress?: (progress: JobProgress) => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const payload = body === undefined ? undefined : JSON.stringify(body);
      const headers: Record<string, string> = { accept: onProgress !== undefined ? "application/x-ndjson" : "application/json" };
      if (payload !== undefined) headers["content-type"] = "application/json";
      const request = http.request({ socketPath: this.socketPath, path: `/v1${path}`, method, headers, timeout: API_REQUEST_TIMEOUT_MS }, (response) => {
        let buffered = "";
        let settled = false;
        const handleLine = (line: string): void => {
          if (line.trim() === "" || settled) return;
          let parsed: unknown;
          try {
            parsed = JSON.parse(line);
          } catch {
            settled = true;
            reject(new SnapstackError("E_IO", `unreadable progress line from the daemon: ${JSON.stringify(line.slice(0, 200))}`));
            return;
          }
          const event = parsed as { event: string; result?: T; error?: { code: string; message: string; details: Record<string, unknown> } } & JobProgress;
          if (event.event === "progress") onProgress?.(event);
          else if (event.event === "result") {
            settled = true;
            resolve(event.result as T);
          } else if (event.event === "error") {
            settled = true;
            reject(toError(event.error, 200));
          }
        };
        response.setEncoding("utf8");
        response.on("data", (chunk: string) => {
          buffered += chunk;
          if (response.headers["content-type"] !== "application/x-ndjson") return;
          let newline;
          while ((newline = buffered.indexOf("\n")) >= 0) {
            handleLine(buffered.slice(0, newline));
            buffered = buffered.slice(newline + 1);
          }
        });
        response.on("end", () => {
          try {
            if (response.headers["content-type"] === "application/x-ndjson") {
              handleLine(buffered);
              if (!settled) reject(new SnapstackError("E_IO", "the daemon closed the connection before answering"));
              return;
            }
            const value = JSON.parse(buffered) as { error?: { code: string; message: string; details: Record<string, unknown> } };
            if ((response.statusCode ?? 500) >= 400) reject(toError(value.error, response.statusCode ?? 500));
            else resolve(value as T);
          } catch (error) {
            reject(new SnapstackError("E_IO", `unreadable answer from the daemon: ${(error as Error).message}`));
          }
        });
      });
      request.on("timeout", () => request.destroy(new Error("timed out")));
      request.on("error", (error: NodeJS.ErrnoException) => {
        if (error.code === "ENOENT" || error.code === "ECONNREFUSED") {
          reject(new SnapstackError("E_NOT_FOUND", `no snapstack daemon answers on ${this.socketPath}`, { daemon: "absent", path: this.socketPath }));
        } else reject(new SnapstackError("E_IO", `daemon request ${method} ${path} failed: ${error.message}`, { errno: error.code }));
      });
      request.end(payload);
    });
  }

  /** True when a daemon answers. */
  async alive(): Promise<boolean> {
    try {
      await this.request("GET", "/health");
      return true;
    } catch (error) {
      if (error instanceof SnapstackError && error.details.daemon === "absent") return false;
      throw error;
    }
  }
}
