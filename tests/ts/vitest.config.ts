import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

export default defineConfig({
  // The config lives in tests/ts to keep the top level as the product card fixes it.
  root: fileURLToPath(new URL("../..", import.meta.url)),
  test: {
    include: ["tests/ts/**/*.test.ts"],
    // Integration tests start real sidecar processes (torch import takes seconds).
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
});
