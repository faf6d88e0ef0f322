/**
 * Child process for the SIGKILL test: works on a real qcow2 chain
 * (TOP over BASE) through the library until it is killed, announcing every
 * step on stdout (a pipe: synchronous on Linux, so a line printed before a
 * step is with the parent even if the kill comes next).
 *
 *   node crash-kill-child.ts TOP SEED FIRST_ID
 *
 * Lines: "W id guestOffset lengthBytes" before a write; "F" after a flush
 * returned; "SC name" / "SC! name" before / after a snapshot create,
 * "SD name" / "SD! name" around a delete; "C" / "C!" around a commit of TOP
 * into BASE (the image is closed around it; only while TOP has no internal
 * snapshot, whose view of BASE a commit would change); "READY" once open.
 */
import { openImage } from "../../src/chain/open-image.ts";
import { commitImage } from "../../src/chain/jobs/commit-image.ts";
import type { Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";
import { createRandom } from "./random.ts";
import { patternBytes, SECTOR_BYTES } from "./crash-workload.ts";

const [topPath, seedText, firstIdText] = process.argv.slice(2);
const random = createRandom(Number(seedText));
let nextId = Number(firstIdText);
const say = (line: string): void => {
  process.stdout.write(`${line}\n`);
};

const open = async (): Promise<Qcow2Image> => (await openImage(topPath)) as Qcow2Image;
let image = await open();
const sectors = image.sizeBytes / SECTOR_BYTES;
const live: string[] = image.snapshots.map((s) => s.name);
let made = 0;
say("READY");
for (;;) {
  const roll = random.next();
  if (roll < 0.7) {
    const count = 1 + random.int((1024 * 1024) / SECTOR_BYTES);
    const first = random.int(sectors - count);
    const id = nextId++;
    say(`W ${id} ${first * SECTOR_BYTES} ${count * SECTOR_BYTES}`);
    await image.write(first * SECTOR_BYTES, patternBytes(first, count, id));
  } else if (roll < 0.85) {
    await image.flush();
    say("F");
  } else if (roll < 0.9) {
    if (live.length === 0 || (live.length < 3 && random.next() < 0.4)) {
      const name = `${firstIdText}-${made++}`;
      say(`SC ${name}`);
      await image.createSnapshot(name);
      live.push(name);
      say(`SC! ${name}`);
    } else {
      const name = live.splice(random.int(live.length), 1)[0];
      say(`SD ${name}`);
      await image.deleteSnapshot(name);
      say(`SD! ${name}`);
    }
  } else if (live.length === 0) {
    // Commit only without internal snapshots: a snapshot of an overlay reads its unallocated
    // ranges from the backing file, so committing into that file changes what it shows.
    await image.close();
    say("C");
    await commitImage(topPath);
    say("C!");
    image = await open();
  }
}
