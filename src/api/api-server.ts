/**
 * The daemon's JSON HTTP API, on a Unix socket under SNAPSTACK_HOME (mode
 * 0600: only its user can connect) and, when asked, on 127.0.0.1 with a
 * bearer token. The `snapstack vm` CLI and the dashboard are its clients.
 *
 * Routes (all under /v1; bodies and answers are JSON):
 *   GET    /health
 *   GET    /machines                          list with status
 *   POST   /machines                          create {name, memoryBytes, cpus, diskSizeBytes | diskFrom, extraDiskSizesBytes, kernel, initrd, append, cdrom, extraArgs}
 *   GET    /machines/NAME                     status
 *   DELETE /machines/NAME?wipe=1              remove
 *   POST   /machines/NAME/start | /stop {force}
 *   GET    /machines/NAME/log?bytes=N         serial console output (text/plain)
 *   GET    /machines/NAME/snapshots           the tree
 *   POST   /machines/NAME/snapshots           {snapshot, description, diskOnly}
 *   DELETE /machines/NAME/snapshots/SNAP?wipe=1
 *   POST   /machines/NAME/snapshots/SNAP/revert {wipe}
 *   POST   /machines/NAME/snapshots/SNAP/clone {name}
 *   GET    /machines/NAME/diff?from=A&to=B[&disk=N]
 *   POST   /machines/NAME/snapshots/SNAP/export {path, format, from, backing, disk}   (absolute paths)
 *
 * Long operations report progress: a client sending
 * `Accept: application/x-ndjson` gets one JSON object per line,
 * {"event":"progress",job,phase,doneBytes,totalBytes,fraction} while the
 * job runs (at most one per job phase and whole percent), then
 * {"event":"result","result":...} or {"event":"error","error":{code,
 * message,details}}.
 * Errors otherwise answer {"error":{code,message,details}} with the HTTP
 * status from HTTP_STATUS (one table for the boundary).
 */
import http from "node:http";
import { rmSync } from "node:fs";
import { timingSafeEqual } from "node:crypto";
import { SnapstackError, isSnapstackError, type ErrorCode } from "../base/errors.ts";
import type { JobProgress } from "../chain/jobs/index.ts";
import { listenUnixSocket } from "../io/unix-listen.ts";
import type { MachineManager } from "../vm/manager/machine-manager.ts";

/** Largest request body accepted. */
export const REQUEST_BODY_BYTES_MAX = 1024 * 1024;

/** Error code -> HTTP status; codes not listed are 500. */
export const HTTP_STATUS: Partial<Record<ErrorCode, number>> = {
  E_USAGE: 400,
  E_INVALID_SIZE: 400,
  E_INVALID_OPTION: 400,
  E_NOT_FOUND: 404,
  E_SNAPSHOT_NOT_FOUND: 404,
  E_EXISTS: 409,
  E_SNAPSHOT_EXISTS: 409,
  E_IN_USE: 409,
  E_ACCESS: 403,
  E_QEMU: 502,
  E_QMP: 502,
  E_TIMEOUT: 504,
  E_ABORTED: 499,
};

export interface ApiServerOptions {
  /** Bearer token required on TCP (and accepted on the Unix socket). */
  token?: string;
  log?: (line: string) => void;
}

type Handler = (request: ApiRequest) => Promise<unknown>;

interface ApiRequest {
  params: string[];
  query: URLSearchParams;
  body: Record<string, unknown>;
  onProgress: (progress: JobProgress) => void;
}

function bad(message: string): SnapstackError {
  return new SnapstackError("E_USAGE", message);
}

function bodyString(body: Record<string, unknown>, key: string, required = false): string | undefined {
  const value = body[key];
  if (value === undefined || value === null) {
    if (required) throw bad(`missing '${key}' in the request body`);
    return undefined;
  }
  if (typeof value !== "string") throw bad(`'${key}' must be a string`);
  return value;
}

function bodyNumber(body: Record<string, unknown>, key: string): number | undefined {
  const value = body[key];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "number") throw bad(`'${key}' must be a number`);
  return value;
}

function queryCount(query: URLSearchParams, key: string): number | undefined {
  const text = query.get(key);
  if (text === null) return undefined;
  const value = Number(text);
  if (text.trim() === "" || !Number.isSafeInteger(value) || value < 0) throw bad(`'${key}' must be a non-negative integer, not ${JSON.stringify(text)}`);
  return value;
}

/**
 * Refuse a request path with a "." or ".." segment (also percent-encoded or
 * after a backslash): the URL parser resolves them, so
 * `/machines/web/snapshots/..` would reach `DELETE /machines/web` and remove
 * the machine. No machine or snapshot may carry those names (names.ts).
 */
function refuseDotSegments(rawUrl: string): void {
  const rawPath = rawUrl.split(/[?#]/, 1)[0];
  for (const segment of rawPath.split(/[/\\]/)) {
    const decoded = segment.replace(/%2e/gi, ".");
    if (decoded === "." || decoded === "..") throw bad(`the path has a '${decoded}' segment: ${JSON.stringify(rawPath)}`);
  }
}

function decodePathPart(part: string): string {
  try {
    return decodeURIComponent(part);
  } catch {
    throw bad(`malformed percent-encoding in the path: ${JSON.stringify(part)}`);
  }
}

/** Progress events worth a line: a new job or phase, a new whole percent, the end. */
function progressFilter(emit: (progress: JobProgress) => void): (progress: JobProgress) => void {
  let last = "";
  return (progress) => {
    const key = `${progress.job}\0${progress.phase}\0${Math.floor(progress.fraction * 100)}`;
    if (key === last) return;
    last = key;
    emit(progress);
  };
}

function flag(value: unknown): boolean {
  return value === true || value === "1" || value === "true";
}

export function createRoutes(manager: MachineManager): Array<{ method: string; pattern: RegExp; handler: Handler }> {
  const routes: Array<{ method: string; pattern: RegExp; handler: Handler }> = [];
  const add = (method: string, path: string, handler: Handler): void => {
    routes.push({ method, pattern: new RegExp(`^/v1${path.replaceAll(":p", "([^/]+)")}$`), handler });
  };
  add("GET", "/health", async () => ({ ok: true, home: manager.store.home, pid: process.pid }));
  add("GET", "/machines", async () => manager.list());
  add("POST", "/machines", async ({ body }) => {
    const extraArgs = body.extraArgs;
    if (extraArgs !== undefined && (!Array.isArray(extraArgs) || !extraArgs.every((arg) => typeof arg === "string"))) throw bad("'extraArgs' must be a list of strings");
    const extraDisks = body.extraDiskSizesBytes;
    if (extraDisks !== undefined && (!Array.isArray(extraDisks) || !extraDisks.every((size) => typeof size === "number"))) throw bad("'extraDiskSizesBytes' must be a list of numbers");
    return manager.create({
      name: bodyString(body, "name", true)!,
      memoryBytes: bodyNumber(body, "memoryBytes"),
      cpus: bodyNumber(body, "cpus"),
      diskSizeBytes: bodyNumber(body, "diskSizeBytes"),
      diskFrom: bodyString(body, "diskFrom"),
      extraDiskSizesBytes: extraDisks as number[] | undefined,
      kernel: bodyString(body, "kernel"),
      initrd: bodyString(body, "initrd"),
      append: bodyString(body, "append"),
      cdrom: bodyString(body, "cdrom"),
      extraArgs: extraArgs as string[] | undefined,
    });
  });
  add("GET", "/machines/:p", async ({ params }) => manager.status(params[0]));
  add("DELETE", "/machines/:p", async ({ params, query, onProgress }) => manager.remove(params[0], { wipe: flag(query.get("wipe")), onProgress }));
  add("POST", "/machines/:p/start", async ({ params }) => manager.start(params[0]));
  add("POST", "/machines/:p/stop", async ({ params, body }) => manager.stop(params[0], { force: flag(body.force) }));
  add("GET", "/machines/:p/log", async ({ params, query }) => ({ text: manager.log(params[0], queryCount(query, "bytes")) }));
  add("GET", "/machines/:p/snapshots", async ({ params }) => manager.snapshots(params[0]));
  add("POST", "/machines/:p/snapshots", async ({ params, body }) =>
    manager.snapshot(params[0], { snapshot: bodyString(body, "snapshot", true)!, description: bodyString(body, "description"), diskOnly: flag(body.diskOnly) }),
  );
  add("DELETE", "/machines/:p/snapshots/:p", async ({ params, query, onProgress }) => manager.deleteSnapshot(params[0], params[1], { wipe: flag(query.get("wipe")), onProgress }));
  add("POST", "/machines/:p/snapshots/:p/revert", async ({ params, body, onProgress }) => manager.revert(params[0], params[1], { wipe: flag(body.wipe), onProgress }));
  add("POST", "/machines/:p/snapshots/:p/clone", async ({ params, body }) => manager.clone(params[0], params[1], bodyString(body, "name", true)!));
  add("GET", "/machines/:p/diff", async ({ params, query, onProgress }) => {
    const from = query.get("from");
    const to = query.get("to");
    if (from === null || to === null) throw bad("diff needs ?from=SNAPSHOT&to=SNAPSHOT");
    const diskText = query.get("disk");
    if (diskText !== null && !/^[1-9][0-9]{0,2}$/.test(diskText)) throw bad(`diff: disk ${JSON.stringify(diskText)} is not a disk number (1 for the first)`);
    return manager.diff(params[0], from, to, { onProgress, disk: diskText === null ? undefined : Number(diskText) });
  });
  add("POST", "/machines/:p/snapshots/:p/export", async ({ params, body, onProgress }) => {
    const disk = bodyNumber(body, "disk");
    return manager.export(params[0], params[1], bodyString(body, "path", true)!, {
      format: bodyString(body, "format"),
      from: bodyString(body, "from"),
      backing: bodyString(body, "backing"),
      disk,
      onProgress,
    });
  });
  return routes;
}

export function errorBody(error: unknown): { code: string; message: string; details: Record<string, unknown> } {
  if (isSnapstackError(error)) return { code: error.code, message: error.message, details: { ...error.details } };
  return { code: "E_INTERNAL", message: error instanceof Error ? error.message : String(error), details: {} };
}

async function readBody(request: http.IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let length = 0;
  for await (const chunk of request) {
    length += (chunk as Buffer).length;
    if (length > REQUEST_BODY_BYTES_MAX) throw bad(`request body larger than ${REQUEST_BODY_BYTES_MAX} bytes`);
    chunks.push(chunk as Buffer);
  }
  if (length === 0) return {};
  try {
    const value = JSON.parse(Buffer.concat(chunks).toString("utf8")) as unknown;
    if (typeof value !== "object" || value === null || Array.isArray(value)) throw new Error("not an object");
    return value as Record<string, unknown>;
  } catch (error) {
    throw bad(`request body is not a JSON object: ${(error as Error).message}`);
  }
}

function tokenMatches(header: string | undefined, token: string): boolean {
  if (header === undefined || !header.startsWith("Bearer ")) return false;
  const given = Buffer.from(header.slice(7));
  const expected = Buffer.from(token);
  return given.length === expected.length && timingSafeEqual(given, expected);
}

export class ApiServer {
  readonly #routes: ReturnType<typeof createRoutes>;
  readonly #options: ApiServerOptions;
  #servers: Array<{ server: http.Server; path: string | null }> = [];

  constructor(manager: MachineManager, options: ApiServerOptions = {}) {
    this.#routes = createRoutes(manager);
    this.#options = options;
  }

  async #handle(request: http.IncomingMessage, response: http.ServerResponse, needsToken: boolean): Promise<void> {
    const streaming = (request.headers.accept ?? "").includes("application/x-ndjson");
    const send = (status: number, value: unknown): void => {
      if (response.headersSent) return;
      response.writeHead(status, { "content-type": "application/json" });
      response.end(JSON.stringify(value) + "\n");
    };
    try {
      if (needsToken && (this.#options.token === undefined || !tokenMatches(request.headers.authorization, this.#options.token))) {
        send(401, { error: { code: "E_ACCESS", message: "missing or wrong bearer token", details: {} } });
        return;
      }
      refuseDotSegments(request.url ?? "/");
      const url = new URL(request.url ?? "/", "http://snapstack");
      const path = url.pathname.replace(/\/+$/, "");
      const matches = this.#routes.filter((route) => route.pattern.test(path));
      if (matches.length === 0) throw new SnapstackError("E_NOT_FOUND", `no API route ${path}`, { path });
      const route = matches.find((candidate) => candidate.method === request.method);
      if (route === undefined) {
        send(405, { error: { code: "E_USAGE", message: `${request.method} is not allowed on ${path}`, details: {} } });
        return;
      }
      const params = route.pattern.exec(path)!.slice(1).map(decodePathPart);
      const body = request.method === "GET" ? {} : await readBody(request);
      if (streaming) {
        response.writeHead(200, { "content-type": "application/x-ndjson" });
        const line = (value: unknown): void => void response.write(JSON.stringify(value) + "\n");
        try {
          const result = await route.handler({ params, query: url.searchParams, body, onProgress: progressFilter((progress) => line({ event: "progress", ...progress })) });
          line({ event: "result", result });
        } catch (error) {
          line({ event: "error", error: errorBody(error) });
        }
        response.end();
        return;
      }
      const result = await route.handler({ params, query: url.searchParams, body, onProgress: () => {} });
      send(200, result);
    } catch (error) {
      const body = errorBody(error);
      if (body.code === "E_INTERNAL") this.#options.log?.(`API ${request.method} ${request.url}: ${(error as Error)?.stack ?? String(error)}`);
      send(HTTP_STATUS[body.code as ErrorCode] ?? 500, { error: body });
    }
  }

  #createServer(needsToken: boolean): http.Server {
    return http.createServer((request, response) => void this.#handle(request, response, needsToken));
  }

  /** Listen on a Unix socket only this user may connect to (a dead daemon's socket file is replaced). */
  async listenUnix(path: string): Promise<void> {
    const server = this.#createServer(false);
    await listenUnixSocket(server, path, {
      ownerOnly: true,
      probeByConnecting: true,
      refusal: (failure, error) => {
        if (failure === "in-use") return new SnapstackError("E_IN_USE", `a snapstack daemon already listens on ${path}`, { path });
        if (failure === "not-socket") return new SnapstackError("E_EXISTS", `${path} exists and is not a socket`, { path });
        return new SnapstackError("E_IO", `cannot listen on ${path}: ${error.message}`, { path });
      },
    });
    this.#servers.push({ server, path });
  }

  /** Listen on 127.0.0.1:port (a token is required); resolves to the port. */
  async listenTcp(port: number): Promise<number> {
    if (this.#options.token === undefined || this.#options.token === "") throw bad("listening on TCP needs a bearer token");
    const server = this.#createServer(true);
    await new Promise<void>((resolve, reject) => {
      server.once("error", (error: NodeJS.ErrnoException) => {
        if (error.code === "EADDRINUSE") reject(new SnapstackError("E_IN_USE", `127.0.0.1:${port} is already in use`, { port }));
        else if (error.code === "EACCES") reject(new SnapstackError("E_ACCESS", `127.0.0.1:${port}: permission denied (ports below 1024 need privileges)`, { port }));
        else reject(error);
      });
      server.listen({ host: "127.0.0.1", port }, () => resolve());
    });
    this.#servers.push({ server, path: null });
    return (server.address() as { port: number }).port;
  }

  async close(): Promise<void> {
    for (const { server, path } of this.#servers) {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      server.closeAllConnections();
      if (path !== null) rmSync(path, { force: true });
    }
    this.#servers = [];
  }
}
