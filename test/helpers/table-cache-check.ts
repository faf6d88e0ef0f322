/**
 * The invariant chunked write-back rests on (src/formats/qcow2/table-cache.ts):
 * a cached table's bytes outside its dirty chunks equal the file's. A change
 * to a cached table that its writer forgot to record with markDirty breaks
 * it (the byte differs from the file in a chunk still marked clean), and
 * would be lost at the next write-back; this check finds it the moment the
 * operation that made it returns, instead of after a crash or an eviction.
 */
import assert from "node:assert/strict";
import type { Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { dirtyChunkBytes, type TableCache } from "../../src/formats/qcow2/table-cache.ts";

/** Assert that every clean chunk of every cached L2 table and refcount block equals the file's bytes. */
export async function assertCachedTablesMatchFile(image: Qcow2Image, where: string): Promise<void> {
  const meta = image.metadata;
  const caches: [string, TableCache][] = [
    ["L2 table", meta.l2Cache],
    ["refcount block", meta.refblockCache],
  ];
  for (const [kind, cache] of caches) {
    for (const table of [...cache.tables()]) {
      const onFile = new Uint8Array(table.bytes.length);
      await meta.file.read(table.hostOffset, onFile);
      const chunkBytes = dirtyChunkBytes(table.bytes.length);
      for (let chunk = 0; chunk * chunkBytes < table.bytes.length; chunk++) {
        if ((table.dirtyChunks & (1 << chunk)) !== 0) continue;
        const start = chunk * chunkBytes;
        const cached = table.bytes.subarray(start, start + chunkBytes);
        if (Buffer.compare(cached, onFile.subarray(start, start + chunkBytes)) === 0) continue;
        let at = 0;
        while (cached[at] === onFile[start + at]) at++;
        assert.fail(`${where}: the cached ${kind} at 0x${table.hostOffset.toString(16)} differs from the file at byte ${start + at} (chunk ${chunk}, marked clean): a change made without markDirty`);
      }
    }
  }
}
