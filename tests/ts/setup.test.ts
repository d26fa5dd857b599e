import { spawnSync } from "node:child_process";
import { describe, expect, it } from "vitest";
// @ts-expect-error plain ESM helper without types
import { pythonExecutable, repoRoot } from "../../ts/dev/python.mjs";

describe("setup", () => {
  it("leaves a Python that imports the sidecar package and torch", () => {
    const r = spawnSync(pythonExecutable(), ["-c", "import nanotune, torch; print(torch.__version__)"], {
      cwd: repoRoot,
      encoding: "utf8",
    });
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^\d+\.\d+/);
  });
});
