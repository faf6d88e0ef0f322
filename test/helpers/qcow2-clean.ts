/** Shared assertion for qcow2 engine tests: the image as flushed passes checkQcow2. */
import assert from "node:assert/strict";
import { checkQcow2 } from "../../src/formats/qcow2/check.ts";
import type { Qcow2Image } from "../../src/formats/qcow2/qcow2-image.ts";

/** checkQcow2 on the flushed file: no corruption, no leak, no check error. */
export async function assertClean(image: Qcow2Image, file: Parameters<typeof checkQcow2>[0], what: string): Promise<void> {
  await image.flush();
  const result = await checkQcow2(file);
  assert.deepEqual(
    { corruptions: result.corruptions, leaks: result.leaks, checkErrors: result.checkErrors, failure: result.failure },
    { corruptions: 0, leaks: 0, checkErrors: 0, failure: null },
    `${what}: ${result.messages.join(" | ")}`,
  );
}
