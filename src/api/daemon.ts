/**
 * `snapstack serve`: one daemon per store. It replays interrupted
 * operations, kills QEMUs orphaned by a previous daemon, then answers the
 * API on $SNAPSTACK_HOME/daemon.sock (0600) and, if asked, on
 * 127.0.0.1:PORT with a bearer token (read from $SNAPSTACK_HOME/api-token,
 * created with mode 0600 when absent). SIGTERM/SIGINT quit the VMs and
 * stop. A second daemon on the same store refuses to start (E_IN_USE).
 *
 * Design notes
 * - One daemon per store: daemon.lock (daemon-lock.ts). Checking that a
 *   daemon answers is not enough: two daemons started together (two CLIs
 *   finding none) would both replay journals, and the second would take
 *   over the socket.
 * - The store directory must be this user's and writable by nobody else:
 *   whoever can write it can put their own daemon.sock in place and see
 *   every request (E_ACCESS otherwise, with the chmod to run).
 * - QEMUs of a killed daemon: the next daemon kills them at start
 *   (MachineManager.init); their disks were served by the dead daemon and
 *   cannot continue, and adopting them would mean trusting a process
 *   whose disk I/O already failed. `snapstack vm` starts a daemon when
 *   none answers, so the next command cleans up.
 */
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { SnapstackError } from "../base/errors.ts";
import { acquireDaemonLock, checkStorePermissions, daemonSocketPath } from "./daemon-lock.ts";
import { MachineStore } from "../vm/store/machine-store.ts";
import { writeFileAtomic } from "../vm/store/atomic-file.ts";
import { MachineManager } from "../vm/manager/machine-manager.ts";
import { ApiServer } from "./api-server.ts";
import { ApiClient } from "./api-client.ts";

export interface DaemonOptions {
  home: string;
  /** Also listen on 127.0.0.1:port (0 = any free port). */
  tcpPort?: number;
  log?: (line: string) => void;
}

export interface Daemon {
  manager: MachineManager;
  socketPath: string;
  tcpPort: number | null;
  token: string | null;
  close(): Promise<void>;
}

/** The bearer token for TCP clients, created on first use. */
export function loadOrCreateToken(home: string): string {
  const path = join(home, "api-token");
  if (existsSync(path)) return readFileSync(path, "utf8").trim();
  const token = randomBytes(24).toString("hex");
  writeFileAtomic(path, token + "\n");
  return token;
}

export async function startDaemon(options: DaemonOptions): Promise<Daemon> {
  const log = options.log ?? (() => {});
  const store = new MachineStore(options.home);
  checkStorePermissions(store.home);
  const socketPath = daemonSocketPath(store.home);
  if (await new ApiClient(socketPath).alive()) {
    throw new SnapstackError("E_IN_USE", `a snapstack daemon already serves ${store.home}`, { home: store.home });
  }
  const releaseLock = await acquireDaemonLock(store.home);
  const pidPath = join(store.home, "daemon.pid");
  let api: ApiServer | null = null;
  let manager: MachineManager | null = null;
  try {
    manager = new MachineManager(store, { log });
    await manager.init();
    const token = options.tcpPort !== undefined ? loadOrCreateToken(store.home) : null;
    api = new ApiServer(manager, { token: token ?? undefined, log });
    await api.listenUnix(socketPath);
    const tcpPort = options.tcpPort !== undefined ? await api.listenTcp(options.tcpPort) : null;
    writeFileAtomic(pidPath, `${process.pid}\n`);
    log(`snapstack daemon ${process.pid} serving ${store.home} on ${socketPath}${tcpPort !== null ? ` and 127.0.0.1:${tcpPort}` : ""}`);
    const [server, machines] = [api, manager];
    return {
      manager: machines,
      socketPath,
      tcpPort,
      token,
      async close() {
        await server.close();
        await machines.shutdown();
        rmSync(pidPath, { force: true });
        releaseLock();
      },
    };
  } catch (error) {
    await api?.close();
    await manager?.shutdown();
    releaseLock();
    throw error;
  }
}
