import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

export default defineConfig({
  // The config lives in tests/ts to keep the top level as the product card fixes it.
  root: fileURLToPath(new URL("../..", import.meta.url)),
  test: {
    include: ["tests/ts/**/*.test.ts"],
    // Integration tests start real sidecar processes (torch import takes seconds) and
    // train for real; on a 2-core machine files run one at a time so the latency
    // checks of the bridge tests do not compete with another file's training.
    testTimeout: 180_000,
    hookTimeout: 120_000,
    fileParallelism: false,
  },
});
