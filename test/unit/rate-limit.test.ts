/**
 * RateLimit (convert -r, commit -r) on a fake clock: the average rate, the
 * first chunk at once, the waits cut into slices with a checkpoint after
 * each, and a cancel noticed within one slice.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { RateLimit, WAIT_SLICE_MS, type RateClock } from "../../src/chain/rate-limit.ts";

function fakeClock(): RateClock & { now: number; sleeps: number[] } {
  const clock = {
    now: 1000,
    sleeps: [] as number[],
    nowMs: () => clock.now,
    sleep: async (ms: number) => {
      clock.sleeps.push(ms);
      clock.now += ms;
    },
  };
  return clock;
}

test("rate limit: 10 chunks of 1 MiB at 4 MiB/s take 9/4 s; the first is admitted at once; no sleep exceeds a slice", async () => {
  const clock = fakeClock();
  const limit = new RateLimit(4 * 1024 * 1024, clock);
  let checkpoints = 0;
  const admittedAt: number[] = [];
  for (let i = 0; i < 10; i++) {
    await limit.admit(1024 * 1024, () => checkpoints++);
    admittedAt.push(clock.now - 1000);
  }
  assert.deepEqual(admittedAt, [0, 250, 500, 750, 1000, 1250, 1500, 1750, 2000, 2250]);
  assert.ok(clock.sleeps.every((ms) => ms > 0 && ms <= WAIT_SLICE_MS), `sleeps ${clock.sleeps.join(",")}`);
  assert.equal(checkpoints, clock.sleeps.length, "a checkpoint after every slice of waiting");
});

test("rate limit: time spent elsewhere counts (no wait when the copy is slower than the rate)", async () => {
  const clock = fakeClock();
  const limit = new RateLimit(1024 * 1024, clock);
  await limit.admit(512 * 1024);
  clock.now += 2000; // the chunk took 2 s to copy
  await limit.admit(512 * 1024);
  await limit.admit(512 * 1024);
  assert.deepEqual(clock.sleeps, []);
});

test("rate limit: a checkpoint that throws ends the wait within one slice", async () => {
  const clock = fakeClock();
  const limit = new RateLimit(1, clock); // one byte per second: the second chunk would wait ~12 days
  await limit.admit(1024 * 1024);
  let calls = 0;
  await assert.rejects(
    limit.admit(1, () => {
      if (++calls === 3) throw new Error("cancelled");
    }),
    /cancelled/,
  );
  assert.equal(clock.sleeps.length, 3);
  assert.ok(clock.now - 1000 <= 3 * WAIT_SLICE_MS);
});
