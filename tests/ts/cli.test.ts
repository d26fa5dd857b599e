// `nanotune eval` and the CLI's usage errors, through the real executable.
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
// @ts-expect-error plain ESM helper without types
import { pythonExecutable, repoRoot } from "../../ts/dev/python.mjs";

let dir: string;
const env = () => ({ ...process.env, NANOTUNE_CACHE: join(dir, "cache") });
const nanotune = (...args: string[]) =>
  spawnSync(process.execPath, [join(repoRoot, "ts", "bin.mjs"), ...args], { cwd: dir, encoding: "utf8", env: env() });

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "nanotune-cli-"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("nanotune CLI", () => {
  it("eval prints a per-task table for local benchmark files", () => {
    const built = spawnSync(pythonExecutable(), ["-c", "from nanotune.models import load_model; print(load_model('tiny-llama', device='cpu').path)"], {
      encoding: "utf8",
      env: { ...env(), PYTHONPATH: join(repoRoot, "python") },
    });
    expect(built.status, built.stderr).toBe(0);
    const piqa = [
      { goal: "Open a jar.", sol1: "Twist the lid.", sol2: "Paint the lid.", label: 0 },
      { goal: "Dry hair.", sol1: "Use a towel.", sol2: "Use a spoon.", label: 0 },
      { goal: "Boil water.", sol1: "Freeze it.", sol2: "Heat it in a pot.", label: 1 },
    ];
    writeFileSync(join(dir, "piqa.jsonl"), piqa.map((r) => JSON.stringify(r)).join("\n") + "\n");
    writeFileSync(join(dir, "eval.json"), JSON.stringify({ model: built.stdout.trim(), tasks: { piqa: "piqa.jsonl" } }));
    const r = nanotune("eval", "eval.json");
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/piqa/);
    expect(r.stdout).toMatch(/\b3\b/); // n = 3 examples
  });

  it("exits 2 with the wrong field named, or the usage", () => {
    writeFileSync(join(dir, "bad-eval.json"), JSON.stringify({ model: "m", taks: {} }));
    const bad = nanotune("eval", "bad-eval.json");
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/tasks: /);
    expect(bad.stderr).toMatch(/unknown field 'taks'/);
    const unknown = nanotune("fly");
    expect(unknown.status).toBe(2);
    expect(unknown.stderr).toMatch(/unknown command 'fly'/);
  });
});
