/**
 * Micro-benchmark for the file layer: random 4 KiB and sequential 1 MiB
 * reads on a page-cached file, comparing fs.promises FileHandle.read,
 * callback fs.read, fs.readSync, and NodeFile in both io modes.
 *
 *   node bench/file-read.ts [sizeMiB=1024] [path]
 */
import fs from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openNodeFile } from "../src/io/node-file.ts";

type ReadFn = (buffer: Uint8Array, position: number) => Promise<unknown>;

const sizeMiB = Number(process.argv[2] ?? 1024);
const path = process.argv[3] ?? join(tmpdir(), "snapstack-bench-read.bin");
const sizeBytes = sizeMiB << 20;

if (!fs.existsSync(path) || fs.statSync(path).size !== sizeBytes) {
  const fd = fs.openSync(path, "w");
  const chunk = Buffer.alloc(1 << 20);
  for (let i = 0; i < sizeMiB; i++) {
    for (let j = 0; j < chunk.length; j += 4) chunk.writeUInt32LE((i * 7919 + j) >>> 0, j);
    fs.writeSync(fd, chunk, 0, chunk.length, i << 20);
  }
  fs.closeSync(fd);
}
// Warm the page cache.
{
  const fd = fs.openSync(path, "r");
  const chunk = Buffer.allocUnsafe(1 << 20);
  for (let offset = 0; offset < sizeBytes; offset += chunk.length) fs.readSync(fd, chunk, 0, chunk.length, offset);
  fs.closeSync(fd);
}

async function measure(name: string, read: ReadFn, count: number, blockBytes: number, sequential: boolean, inFlight: number): Promise<void> {
  const buffers = Array.from({ length: inFlight }, () => Buffer.allocUnsafe(blockBytes));
  const blocks = Math.floor(sizeBytes / blockBytes);
  let issued = 0;
  let next = 0;
  const started = performance.now();
  await Promise.all(
    buffers.map(async (buffer) => {
      while (issued < count) {
        issued++;
        const block = sequential ? next++ % blocks : Math.floor(Math.random() * blocks);
        await read(buffer, block * blockBytes);
      }
    }),
  );
  const seconds = (performance.now() - started) / 1000;
  const kind = sequential ? "seq" : "rand";
  console.log(
    `${name.padEnd(16)} ${kind} ${String(blockBytes >> 10).padStart(5)} KiB x${inFlight}: ${Math.round(count / seconds).toString().padStart(8)} ops/s ${(count * blockBytes / seconds / 1e9).toFixed(2)} GB/s`,
  );
}

const fd = fs.openSync(path, "r");
const handle = await fs.promises.open(path, "r");
const syncFile = await openNodeFile(path, { readOnly: true, ioMode: "sync" });
const asyncFile = await openNodeFile(path, { readOnly: true, ioMode: "async" });
const autoFile = await openNodeFile(path, { readOnly: true });
const candidates: Record<string, ReadFn> = {
  "FileHandle.read": (b, p) => handle.read(b, 0, b.length, p),
  "fs.read (cb)": (b, p) => new Promise((resolve, reject) => fs.read(fd, b, 0, b.length, p, (e, n) => (e ? reject(e) : resolve(n)))),
  "fs.readSync": (b, p) => Promise.resolve(fs.readSync(fd, b, 0, b.length, p)),
  "NodeFile sync": (b, p) => syncFile.read(p, b),
  "NodeFile async": (b, p) => asyncFile.read(p, b),
  "NodeFile auto": (b, p) => autoFile.read(p, b),
};
for (const inFlight of [1, 8]) {
  for (const [name, read] of Object.entries(candidates)) await measure(name, read, 100_000, 4096, false, inFlight);
  for (const [name, read] of Object.entries(candidates)) await measure(name, read, 3000, 1 << 20, true, inFlight);
}
await handle.close();
fs.closeSync(fd);
await syncFile.close();
await asyncFile.close();
await autoFile.close();
