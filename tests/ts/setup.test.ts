// The development setup (.venv made by ts/dev/setup.mjs) and how the sidecar's
// Python is found (ts/paths.ts), which `npx nanotune setup` shares.
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { DEFAULT_TORCH, findPython, managedEnv, noPythonMessage, packageRoot, packageVersion, setupStamp } from "../../ts/paths.ts";
// @ts-expect-error plain ESM helper without types
import { pythonExecutable, repoRoot } from "../../ts/dev/python.mjs";
import { runProcess } from "./fixtures/run.ts";

describe("setup", () => {
  it("leaves a Python that imports the sidecar package and torch", async () => {
    const r = await runProcess(pythonExecutable(), ["-c", "import nanotune, torch; print(torch.__version__)"], {
      cwd: repoRoot,
    });
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^\d+\.\d+/);
  });
});

describe("finding the sidecar's Python", () => {
  it("finds the package root from the sources", () => {
    expect(packageRoot).toBe(repoRoot);
  });

  it("prefers options.python, then NANOTUNE_PYTHON, then the checkout's .venv", () => {
    expect(findPython("/opt/py/bin/python", { NANOTUNE_PYTHON: "/other/python" })).toEqual({ python: "/opt/py/bin/python", source: "option" });
    expect(findPython(undefined, { NANOTUNE_PYTHON: "/other/python" })).toEqual({ python: "/other/python", source: "NANOTUNE_PYTHON" });
    const venv = join(repoRoot, ".venv", "bin", "python");
    const home = { NANOTUNE_HOME: join(tmpdir(), "nanotune-no-such-home") };
    // (with NANOTUNE_PYTHON, ts/dev/setup.mjs makes no .venv)
    expect(findPython(undefined, home)).toEqual(existsSync(venv) ? { python: venv, source: "checkout .venv" } : null);
  });

  it("keys `nanotune setup`'s environment by version under NANOTUNE_HOME and trusts it only once its stamp is written", () => {
    const home = mkdtempSync(join(tmpdir(), "nanotune-home-"));
    try {
      const env = { NANOTUNE_HOME: home };
      const m = managedEnv(env);
      expect(m.dir).toBe(join(home, `python-${packageVersion}`));
      expect(m.python).toBe(join(m.dir, "bin", "python"));
      expect(m.stamp).toBeNull();
      mkdirSync(m.dir, { recursive: true });
      writeFileSync(m.stampPath, JSON.stringify({ ...setupStamp(DEFAULT_TORCH, "python3"), version: "0.0.0-other" }));
      expect(managedEnv(env).stamp).toBeNull(); // another version's stamp does not count
      const stamp = setupStamp(DEFAULT_TORCH, "python3");
      writeFileSync(m.stampPath, JSON.stringify(stamp));
      expect(managedEnv(env).stamp).toEqual(stamp);
      expect(stamp).toMatchObject({ version: packageVersion, torch: "torch==2.13.0", basePython: "python3" });
      expect(stamp.pyproject).toMatch(/^[0-9a-f]{64}$/);
      expect(noPythonMessage(env)).toContain("npx nanotune setup");
      expect(noPythonMessage(env)).toContain(m.dir);
    } finally {
      rmSync(home, { recursive: true, force: true });
    }
  });
});
