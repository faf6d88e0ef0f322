/**
 * The test guest: a Debian cloud kernel and a busybox initramfs, built from
 * Debian packages fetched with `apt-get download` (never installed) and
 * cached, plus GuestConsole to watch and drive it over its serial console.
 *
 * Design notes
 * - Kernel: the package linux-image-cloud-amd64 depends on (apt-cache
 *   depends), unpacked with dpkg-deb -x. Its virtio drivers are modules
 *   (CONFIG_VIRTIO_BLK=m, CONFIG_VIRTIO_PCI=m): the initramfs carries
 *   virtio_blk and virtio_pci with their dependencies, resolved from each
 *   module's own "depends=" field (Debian ships no modules.dep; depmod runs
 *   at install) and loaded dependencies first. Modules built in (=y in the
 *   kernel's config) are skipped.
 * - Userland: bin/busybox from busybox-static (or the host's busybox if it
 *   is static and apt cannot download), /init from guest/init.sh.
 * - The initramfs is written here as cpio "newc" (with /dev/console) and
 *   gzipped: no cpio tool, no root, files owned by root inside.
 * - Cache: ~/.cache/snapstack/guest (SNAPSTACK_GUEST_CACHE overrides). .debs
 *   under debs/, each build under build-<hash of its inputs>/, made in a
 *   temporary directory and renamed into place, so parallel test files
 *   never see half a build. A cached build is returned without touching apt.
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync, openSync, readSync, closeSync, fstatSync } from "node:fs";
import net from "node:net";
import { homedir } from "node:os";
import { basename, join } from "node:path";
import { gzipSync } from "node:zlib";

/** Bump to rebuild every cached guest when the build changes. */
const KIT_VERSION = 1;
const KERNEL_META_PACKAGE = "linux-image-cloud-amd64";
/** How long the resolved kernel package name is trusted before asking apt-cache again. */
const KERNEL_RESOLVE_TTL_MS = 24 * 60 * 60 * 1000;
const BUSYBOX_PACKAGE = "busybox-static";
/** Modules the guest needs, by name; their dependencies are added. */
const WANTED_MODULES = ["virtio_pci", "virtio_blk"];
const INIT_SCRIPT = new URL("./guest/init.sh", import.meta.url);
/**
 * Kernel command line: serial console, few boot messages; init_on_free=1
 * zeroes what boot frees, so a saved state holds little beyond what the
 * guest uses (56 MB instead of 95 MB for a 256 MiB guest).
 */
export const GUEST_APPEND = "console=ttyS0 quiet init_on_free=1";

export interface GuestImage {
  kernelPath: string;
  initrdPath: string;
  append: string;
}

export function defaultGuestCacheDir(): string {
  return process.env.SNAPSTACK_GUEST_CACHE ?? join(homedir(), ".cache", "snapstack", "guest");
}

/** Build (or reuse) the guest kernel and initramfs. */
export async function buildGuest(cacheDir = defaultGuestCacheDir()): Promise<GuestImage> {
  const debDir = join(cacheDir, "debs");
  mkdirSync(debDir, { recursive: true });
  const kernelDeb = await fetchPackage(await resolveKernelPackage(debDir), debDir);
  const busyboxDeb = await fetchPackage(BUSYBOX_PACKAGE, debDir).catch(() => null);
  const initScript = readFileSync(INIT_SCRIPT, "utf8");
  const key = createHash("sha256")
    .update(JSON.stringify([KIT_VERSION, basename(kernelDeb), busyboxDeb === null ? "host" : basename(busyboxDeb), WANTED_MODULES, initScript, GUEST_APPEND]))
    .digest("hex")
    .slice(0, 16);
  const buildDir = join(cacheDir, `build-${key}`);
  const image = { kernelPath: join(buildDir, "vmlinuz"), initrdPath: join(buildDir, "initrd.gz"), append: GUEST_APPEND };
  if (existsSync(image.kernelPath) && existsSync(image.initrdPath)) return image;

  const work = mkdtempSync(join(cacheDir, "tmp-"));
  try {
    const kernelRoot = join(work, "kernel");
    await runTool("dpkg-deb", ["-x", kernelDeb, kernelRoot]);
    const busybox = busyboxDeb !== null ? await extractBusybox(busyboxDeb, join(work, "busybox")) : hostStaticBusybox();
    const { vmlinuzPath, modules } = collectKernel(kernelRoot);
    const files: CpioEntry[] = [
      ...["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules", "sbin", "usr", "usr/bin", "usr/sbin"].map((name) => ({ name, kind: "dir" as const })),
      { name: "dev/console", kind: "char" as const, major: 5, minor: 1 },
      { name: "bin/busybox", kind: "file" as const, data: readFileSync(busybox), executable: true },
      { name: "init", kind: "file" as const, data: Buffer.from(initScript), executable: true },
      ...modules.map((module) => ({ name: `lib/modules/${module.name}.ko`, kind: "file" as const, data: readFileSync(module.path) })),
      { name: "lib/modules/load-order", kind: "file" as const, data: Buffer.from(modules.map((module) => module.name).join("\n") + "\n") },
    ];
    const out = join(work, "out");
    mkdirSync(out);
    writeFileSync(join(out, "vmlinuz"), readFileSync(vmlinuzPath));
    writeFileSync(join(out, "initrd.gz"), gzipSync(encodeCpioNewc(files)));
    try {
      renameSync(out, buildDir);
    } catch (error) {
      // Another test file finished the same build first.
      if (!existsSync(image.initrdPath)) throw error;
    }
    return image;
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/**
 * The kernel package linux-image-cloud-amd64 points at. apt-cache takes
 * seconds on a busy host, so its answer is remembered for a day; offline,
 * the newest kernel already cached is used.
 */
async function resolveKernelPackage(debDir: string): Promise<string> {
  const remembered = join(debDir, "kernel-package");
  if (existsSync(remembered) && Date.now() - statSync(remembered).mtimeMs < KERNEL_RESOLVE_TTL_MS) {
    const name = readFileSync(remembered, "utf8").trim();
    if (name.startsWith("linux-image-")) return name;
  }
  try {
    const { stdout } = await runTool("apt-cache", ["depends", KERNEL_META_PACKAGE]);
    const match = /Depends:\s*(linux-image-[^\s<>]+)/.exec(stdout);
    if (match) {
      writeFileSync(remembered, match[1] + "\n");
      return match[1];
    }
  } catch {
    // fall through to the cache
  }
  const cached = readdirSync(debDir).filter((name) => name.startsWith("linux-image-") && name.endsWith(".deb")).sort();
  if (cached.length > 0) return cached[cached.length - 1].split("_")[0];
  throw new Error(`cannot resolve the kernel package of ${KERNEL_META_PACKAGE} (apt-cache depends failed and nothing is cached in ${debDir})`);
}

/**
 * The .deb of `pkg` in debDir, downloading it with apt-get when absent: into
 * a private directory first, then renamed, so a concurrent build never
 * opens a half-downloaded file.
 */
async function fetchPackage(pkg: string, debDir: string): Promise<string> {
  const find = (dir: string): string | undefined => readdirSync(dir).find((name) => name.startsWith(`${pkg}_`) && name.endsWith(".deb"));
  const cached = find(debDir);
  if (cached !== undefined) return join(debDir, cached);
  const download = mkdtempSync(join(debDir, ".download-"));
  try {
    await runTool("apt-get", ["download", "-q", pkg], { cwd: download });
    const fetched = find(download);
    if (fetched === undefined) throw new Error(`apt-get download ${pkg} left no .deb in ${download}`);
    renameSync(join(download, fetched), join(debDir, fetched));
    return join(debDir, fetched);
  } finally {
    rmSync(download, { recursive: true, force: true });
  }
}

async function extractBusybox(deb: string, root: string): Promise<string> {
  await runTool("dpkg-deb", ["-x", deb, root]);
  for (const candidate of ["bin/busybox", "usr/bin/busybox"]) {
    if (existsSync(join(root, candidate))) return join(root, candidate);
  }
  throw new Error(`${deb} holds no bin/busybox`);
}

/** The host's busybox, if it is a static ELF (no PT_INTERP program header). */
function hostStaticBusybox(): string {
  for (const dir of (process.env.PATH ?? "").split(":")) {
    const path = join(dir, "busybox");
    if (existsSync(path) && isStaticElf(path)) return path;
  }
  throw new Error(`apt-get download ${BUSYBOX_PACKAGE} failed and no static busybox is on PATH`);
}

function isStaticElf(path: string): boolean {
  const fd = openSync(path, "r");
  try {
    const header = Buffer.alloc(64);
    readSync(fd, header, 0, 64, 0);
    if (header.readUInt32BE(0) !== 0x7f454c46 || header[4] !== 2) return false;
    const programHeaderOffset = Number(header.readBigUInt64LE(32));
    const entrySize = header.readUInt16LE(54);
    const count = header.readUInt16LE(56);
    const table = Buffer.alloc(entrySize * count);
    if (programHeaderOffset + table.length > fstatSync(fd).size) return false;
    readSync(fd, table, 0, table.length, programHeaderOffset);
    for (let index = 0; index < count; index++) {
      if (table.readUInt32LE(index * entrySize) === 3 /* PT_INTERP */) return false;
    }
    return true;
  } finally {
    closeSync(fd);
  }
}

interface KernelModule {
  name: string;
  path: string;
}

/** vmlinuz and the wanted modules with their dependencies, dependencies first. */
function collectKernel(root: string): { vmlinuzPath: string; modules: KernelModule[] } {
  const bootFiles = readdirSync(join(root, "boot"));
  const vmlinuz = bootFiles.find((name) => name.startsWith("vmlinuz-"));
  if (vmlinuz === undefined) throw new Error(`no boot/vmlinuz-* in the kernel package`);
  const release = vmlinuz.slice("vmlinuz-".length);
  const config = readFileSync(join(root, "boot", `config-${release}`), "utf8");
  const builtIn = (name: string): boolean => new RegExp(`^CONFIG_${name.toUpperCase()}=y$`, "m").test(config);
  const byName = new Map<string, string>();
  const pending = [join(root, "lib", "modules", release)];
  while (pending.length > 0) {
    const dir = pending.pop()!;
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      if (entry.isDirectory()) pending.push(join(dir, entry.name));
      else if (entry.name.endsWith(".ko")) byName.set(normalizeModuleName(entry.name.slice(0, -3)), join(dir, entry.name));
    }
  }
  // Depth-first post-order without recursion: a module after all it depends on.
  const ordered: KernelModule[] = [];
  const state = new Map<string, "visiting" | "done">();
  const stack: Array<{ name: string; expanded: boolean }> = WANTED_MODULES.map((name) => ({ name: normalizeModuleName(name), expanded: false })).reverse();
  while (stack.length > 0) {
    const top = stack.pop()!;
    if (state.get(top.name) === "done") continue;
    const path = byName.get(top.name);
    if (path === undefined) {
      if (builtIn(top.name)) continue;
      throw new Error(`kernel module ${top.name} is neither built in nor shipped in the kernel package`);
    }
    if (top.expanded) {
      state.set(top.name, "done");
      ordered.push({ name: top.name, path });
      continue;
    }
    if (state.get(top.name) === "visiting") throw new Error(`kernel module dependency loop at ${top.name}`);
    state.set(top.name, "visiting");
    stack.push({ name: top.name, expanded: true });
    for (const dependency of moduleDependencies(path)) {
      if (state.get(dependency) !== "done") stack.push({ name: dependency, expanded: false });
    }
  }
  return { vmlinuzPath: join(root, "boot", vmlinuz), modules: ordered };
}

function normalizeModuleName(name: string): string {
  return name.replaceAll("-", "_");
}

/** The "depends=" entry of a module's .modinfo section. */
function moduleDependencies(path: string): string[] {
  const bytes = readFileSync(path);
  const marker = Buffer.from("\0depends=");
  const start = bytes.indexOf(marker);
  if (start < 0) return [];
  const valueStart = start + marker.length;
  const end = bytes.indexOf(0, valueStart);
  const value = bytes.subarray(valueStart, end).toString("latin1");
  return value === "" ? [] : value.split(",").map(normalizeModuleName);
}

type CpioEntry =
  | { name: string; kind: "dir" }
  | { name: string; kind: "char"; major: number; minor: number }
  | { name: string; kind: "file"; data: Buffer; executable?: boolean };

/** A cpio archive in the "newc" format the kernel unpacks as initramfs; everything owned by root. */
export function encodeCpioNewc(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let length = 0;
  const push = (buffer: Buffer): void => {
    parts.push(buffer);
    length += buffer.length;
  };
  const pad = (): void => {
    if (length % 4 !== 0) push(Buffer.alloc(4 - (length % 4)));
  };
  const header = (ino: number, mode: number, fileBytes: number, rdevMajor: number, rdevMinor: number, name: string): void => {
    const nameBytes = Buffer.from(name + "\0", "utf8");
    const fields = [ino, mode, 0, 0, 1, 0, fileBytes, 0, 0, rdevMajor, rdevMinor, nameBytes.length, 0];
    push(Buffer.from("070701" + fields.map((field) => field.toString(16).padStart(8, "0")).join(""), "ascii"));
    push(nameBytes);
    pad();
  };
  entries.forEach((entry, index) => {
    const ino = index + 1;
    if (entry.kind === "dir") header(ino, 0o040755, 0, 0, 0, entry.name);
    else if (entry.kind === "char") header(ino, 0o020600, 0, entry.major, entry.minor, entry.name);
    else {
      header(ino, entry.executable ? 0o100755 : 0o100644, entry.data.length, 0, 0, entry.name);
      push(entry.data);
      pad();
    }
  });
  header(0, 0, 0, 0, 0, "TRAILER!!!");
  return Buffer.concat(parts, length);
}

function runTool(command: string, args: string[], options: { cwd?: string } = {}): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(command, args, { cwd: options.cwd, encoding: "utf8", maxBuffer: 64 * 1024 * 1024, timeout: 300_000 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${command} ${args.join(" ")} failed: ${stderr.trim() || error.message}`));
      else resolve({ stdout, stderr });
    });
  });
}

/** Poll interval while waiting for serial output. */
const CONSOLE_POLL_MS = 25;

export interface CommandResult {
  exitCode: number;
  /** Output lines (stdout and stderr), without the "OUT <id> " prefix. */
  output: string[];
}

/**
 * The guest's serial console: its output from the log file QEMU appends to
 * (offsets into that file mark points in time), its input through QEMU's
 * serial socket (one client at a time: connect() after each new QEMU).
 */
export class GuestConsole {
  readonly logPath: string;
  readonly serialSocketPath: string;
  #socket: net.Socket | null = null;
  #nextId = 1;
  #idPrefix = Math.random().toString(36).slice(2, 6);

  constructor(logPath: string, serialSocketPath: string) {
    this.logPath = logPath;
    this.serialSocketPath = serialSocketPath;
  }

  /** Current end of the log: pass as `since` to look only at later output. */
  mark(): number {
    return existsSync(this.logPath) ? statSync(this.logPath).size : 0;
  }

  /** The log from byte `since` on. */
  text(since = 0): string {
    if (!existsSync(this.logPath)) return "";
    const fd = openSync(this.logPath, "r");
    try {
      const size = fstatSync(fd).size;
      if (size <= since) return "";
      const buffer = Buffer.alloc(size - since);
      const read = readSync(fd, buffer, 0, buffer.length, since);
      return buffer.subarray(0, read).toString("utf8").replaceAll("\r", "");
    } finally {
      closeSync(fd);
    }
  }

  /** Wait until the log after `since` matches; rejects with the log's tail on timeout. */
  async waitFor(pattern: RegExp, options: { since?: number; timeoutMs?: number } = {}): Promise<RegExpExecArray> {
    const deadline = Date.now() + (options.timeoutMs ?? 30_000);
    for (;;) {
      const text = this.text(options.since ?? 0);
      const match = pattern.exec(text);
      if (match) return match;
      if (Date.now() > deadline) throw new Error(`serial console: ${pattern} did not appear within ${options.timeoutMs ?? 30_000} ms; last output:\n${text.slice(-2000)}`);
      await new Promise((resolve) => setTimeout(resolve, CONSOLE_POLL_MS));
    }
  }

  /** The last "COUNTER n" after `since`, or null. */
  lastCounter(since = 0): number | null {
    const matches = [...this.text(since).matchAll(/^COUNTER (\d+)$/gm)];
    return matches.length === 0 ? null : Number(matches[matches.length - 1][1]);
  }

  /** The first counter value printed after `since`. */
  async nextCounter(options: { since?: number; timeoutMs?: number } = {}): Promise<number> {
    const match = await this.waitFor(/^COUNTER (\d+)$/m, options);
    return Number(match[1]);
  }

  /** Connect (or reconnect) to the serial socket. */
  async connect(timeoutMs = 10_000): Promise<void> {
    this.#socket?.destroy();
    this.#socket = null;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        this.#socket = await new Promise<net.Socket>((resolve, reject) => {
          const socket = net.createConnection({ path: this.serialSocketPath });
          socket.once("connect", () => {
            socket.removeAllListeners("error");
            socket.on("error", () => {});
            socket.on("data", () => {}); // output is read from the log file
            resolve(socket);
          });
          socket.once("error", reject);
        });
        return;
      } catch (error) {
        if (Date.now() > deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
  }

  /** Run a shell command in the guest; resolves with its exit status and output lines. */
  async runCommand(command: string, options: { timeoutMs?: number } = {}): Promise<CommandResult> {
    if ([...command].some((char) => char < " " || char === "\x7f")) throw new Error(`guest commands are one line without control characters: ${JSON.stringify(command)}`);
    if (this.#socket === null || this.#socket.destroyed) await this.connect();
    const id = `${this.#idPrefix}${this.#nextId++}`;
    const since = this.mark();
    this.#socket!.write(`CMD ${id} ${command}\n`);
    const done = await this.waitFor(new RegExp(`^DONE ${id} (\\d+)$`, "m"), { since, timeoutMs: options.timeoutMs ?? 30_000 });
    const output = [...this.text(since).matchAll(new RegExp(`^OUT ${id} (.*)$`, "gm"))].map((match) => match[1]);
    return { exitCode: Number(done[1]), output };
  }

  close(): void {
    this.#socket?.destroy();
    this.#socket = null;
  }
}
