// Reads through a read-only qcow2 chain whose layers differ (cluster size,
// extended L2, compressed clusters, zero clusters, shorter backing files)
// return what a model of the writes says, on the first (resolving) read of
// each cluster and on later reads served from the backing resolution cache.
import { test } from "node:test";
import assert from "node:assert/strict";
import { MemoryFile } from "../../src/io/memory-file.ts";
import { createQcow2, type Qcow2CreateOptions } from "../../src/formats/qcow2/create-qcow2.ts";
import { openQcow2, type Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { createRandom, testSeed } from "../helpers/random.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

type Random = ReturnType<typeof createRandom>;

interface LayerSpec {
  sizeBytes: number;
  options: Partial<Qcow2CreateOptions>;
}

/** Random writes, zero writes and (for whole clusters) compressed writes, applied to the image and the model. */
async function scribble(image: Qcow2Image, model: Uint8Array, random: Random): Promise<void> {
  const cs = image.clusterSizeBytes;
  for (let i = 0; i < 40; i++) {
    const choice = random.int(10);
    if (choice < 2) {
      const clusterStart = random.int(Math.floor(model.length / cs)) * cs;
      const data = random.int(2) === 0 ? new Uint8Array(cs).fill(1 + random.int(255)) : random.bytes(cs);
      try {
        await image.writeCompressed(clusterStart, data);
        model.set(data, clusterStart);
      } catch {
        // The cluster is allocated already: qemu refuses compressed writes there too.
      }
      continue;
    }
    const length = 1 + random.int(random.int(3) === 0 ? 3 * cs : 8 * KiB);
    const guestOffset = random.int(model.length - length);
    if (choice < 4) {
      await image.writeZeroes(guestOffset, length);
      model.fill(0, guestOffset, guestOffset + length);
    } else {
      const data = random.bytes(length);
      await image.write(guestOffset, data);
      model.set(data, guestOffset);
    }
  }
}

/** Build the chain bottom-up with each layer written over the one below; return the files and the model of the top. */
async function buildChain(layers: LayerSpec[], random: Random): Promise<{ files: MemoryFile[]; model: Uint8Array }> {
  const files: MemoryFile[] = [];
  let model = new Uint8Array(0);
  // The layers written so far, read-only, each owning the one below: the backing of the next.
  let below: Qcow2Image | null = null;
  for (const spec of layers) {
    const file = new MemoryFile({ name: `layer-${files.length}.qcow2` });
    await createQcow2(file, { sizeBytes: spec.sizeBytes, ...spec.options });
    const image = await openQcow2(file, { readOnly: false, backing: below, closeBacking: false });
    const grown = new Uint8Array(spec.sizeBytes);
    grown.set(model.subarray(0, Math.min(model.length, spec.sizeBytes)));
    model = grown;
    await scribble(image, model, random);
    // Data up to the layer's end: an upper layer's cluster can straddle the end of a shorter backing file.
    const tail = random.bytes(KiB);
    await image.write(spec.sizeBytes - KiB, tail);
    model.set(tail, spec.sizeBytes - KiB);
    await image.close();
    below = await openQcow2(new MemoryFile({ name: file.name, contents: file.contents(), readOnly: true }), { readOnly: true, backing: below });
    files.push(file);
  }
  await below?.close();
  return { files, model };
}

/** Open the chain read-only, bottom-up, each layer owning the one below. */
async function openChain(files: MemoryFile[]): Promise<Qcow2Image> {
  let image: Qcow2Image | null = null;
  for (const file of files) {
    image = await openQcow2(new MemoryFile({ name: file.name, contents: file.contents(), readOnly: true }), { readOnly: true, backing: image, cacheBytesMax: 64 * KiB });
  }
  assert.ok(image !== null);
  return image;
}

const CHAINS: Array<{ label: string; layers: LayerSpec[] }> = [
  {
    label: "4 KiB-cluster base under 64 KiB layers, extended L2 middle, shorter backing files",
    layers: [
      { sizeBytes: 3 * MiB + 4 * KiB, options: { clusterSizeBytes: 4 * KiB } },
      { sizeBytes: 4 * MiB, options: { extendedL2: true } },
      { sizeBytes: 5 * MiB, options: {} },
    ],
  },
  {
    label: "ten equal 64 KiB-cluster layers",
    layers: Array.from({ length: 10 }, () => ({ sizeBytes: 4 * MiB, options: {} })),
  },
  {
    label: "64 KiB-cluster base under a 4 KiB-cluster top",
    layers: [
      { sizeBytes: 4 * MiB, options: {} },
      { sizeBytes: 4 * MiB, options: { clusterSizeBytes: 4 * KiB } },
    ],
  },
];

for (const chain of CHAINS) {
  test(`chain reads match the model, cold and cached: ${chain.label}`, async (t) => {
    const seed = testSeed();
    t.diagnostic(`seed ${seed}`);
    const random = createRandom(seed);
    const { files, model } = await buildChain(chain.layers, random);
    const top = await openChain(files);
    const reads: Array<[number, number]> = [];
    for (let i = 0; i < 400; i++) {
      const length = 1 + random.int(random.int(4) === 0 ? 300 * KiB : 4 * KiB);
      reads.push([random.int(model.length - length), length]);
    }
    for (const pass of ["cold", "cached"]) {
      for (const [guestOffset, length] of reads) {
        const buffer = new Uint8Array(length).fill(0xee);
        await top.read(guestOffset, buffer);
        if (!Buffer.from(buffer).equals(Buffer.from(model.subarray(guestOffset, guestOffset + length)))) {
          assert.fail(`${pass} read at guest offset ${guestOffset} length ${length} differs from the model`);
        }
      }
    }
    const whole = new Uint8Array(model.length);
    await top.read(0, whole);
    assert.ok(Buffer.from(whole).equals(Buffer.from(model)), "whole disk matches the model");
    await top.close();
  });
}

test("a cluster straddling the end of a shorter backing file reads its data, then zeroes", async () => {
  const base = new MemoryFile({ name: "base.qcow2" });
  await createQcow2(base, { sizeBytes: 68 * KiB, clusterSizeBytes: 4 * KiB });
  const writer = await openQcow2(base, { readOnly: false, backing: null });
  // The last cluster first: in the file it is followed by other data, which a read past its end would return.
  await writer.write(64 * KiB, new Uint8Array(4 * KiB).fill(0x5a));
  await writer.write(0, new Uint8Array(64 * KiB).fill(0x33));
  await writer.close();
  const top = new MemoryFile({ name: "top.qcow2" });
  await createQcow2(top, { sizeBytes: 192 * KiB });
  const below = await openQcow2(new MemoryFile({ name: "base.qcow2", contents: base.contents(), readOnly: true }), { readOnly: true, backing: null });
  const image = await openQcow2(new MemoryFile({ name: "top.qcow2", contents: top.contents(), readOnly: true }), { readOnly: true, backing: below });
  for (const pass of ["cold", "cached"]) {
    for (let guestOffset = 64 * KiB; guestOffset < 128 * KiB; guestOffset += 4 * KiB) {
      const buffer = new Uint8Array(4 * KiB).fill(0xee);
      await image.read(guestOffset, buffer);
      const expected = guestOffset < 68 * KiB ? 0x5a : 0;
      assert.ok(buffer.every((b) => b === expected), `${pass} read at ${guestOffset} holds ${expected}`);
    }
    const cluster = new Uint8Array(64 * KiB);
    await image.read(64 * KiB, cluster);
    assert.ok(cluster.subarray(0, 4 * KiB).every((b) => b === 0x5a) && cluster.subarray(4 * KiB).every((b) => b === 0), `${pass} whole-cluster read`);
  }
  await image.close();
});
