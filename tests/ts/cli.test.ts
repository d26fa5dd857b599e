// The `nanotune` command line through the real executable (ts/cli/bin.ts under
// tsx): help and version, usage errors (exit 2, one line), config paths relative
// to the config file, eval, train and doctor in the checkout.
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { resolveModelPath, resolveTrainConfigPaths } from "../../ts/cli/config.ts";
import { packageVersion } from "../../ts/paths.ts";
// @ts-expect-error plain ESM helper without types
import { pythonExecutable, repoRoot } from "../../ts/dev/python.mjs";
import { runProcess } from "./fixtures/run.ts";

let dir: string;
const env = () => ({ ...process.env, NANOTUNE_CACHE: join(dir, "cache") });
const tsx = pathToFileURL(join(repoRoot, "node_modules", "tsx", "dist", "loader.mjs")).href;
/** `nanotune ARGS` in `cwd` (default: the temp dir). */
const nanotune = (args: string[], cwd = dir) =>
  runProcess(process.execPath, ["--import", tsx, join(repoRoot, "ts", "cli", "bin.ts"), ...args], { cwd, env: env() });
const lines = (s: string) => s.trim().split("\n").filter(Boolean);

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "nanotune-cli-"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("nanotune CLI: help, version and usage errors", () => {
  it("--help lists every command; --version prints the package version", async () => {
    const help = await nanotune(["--help"]);
    expect(help.status).toBe(0);
    for (const c of ["train", "eval", "demo", "setup", "doctor", "bench"]) expect(help.stdout).toMatch(new RegExp(`^  ${c}\\b`, "m"));
    const version = await nanotune(["--version"]);
    expect(version.status).toBe(0);
    expect(version.stdout).toBe(`${packageVersion}\n`);
    expect(packageVersion).toBe(JSON.parse(readFileSync(join(repoRoot, "package.json"), "utf8")).version);
  });

  it.each(["train", "eval", "demo", "setup", "doctor", "bench"])("%s --help and `help <command>` exit 0 with its usage", async (cmd) => {
    const r = await nanotune([cmd, "--help"]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`^usage: nanotune ${cmd}\\b`));
    const h = await nanotune(["help", cmd]);
    expect(h.status).toBe(0);
    expect(h.stdout).toBe(r.stdout);
  });

  it("exits 2 with one line for an unknown command, an unknown option, a missing argument", async () => {
    const cases: [string[], RegExp][] = [
      [["fly"], /^nanotune: unknown command 'fly'/],
      [["train", "--fast", "x.json"], /^nanotune: train: unknown option '--fast'/],
      [["train"], /^nanotune: train: missing a config file/],
      [["eval", "a.json", "b.json"], /^nanotune: eval: unexpected argument 'b.json'/],
      [["setup", "--python"], /^nanotune: setup: option '--python <value>' argument missing/],
      [[], /^nanotune: missing command/],
    ];
    for (const [args, message] of cases) {
      const r = await nanotune(args);
      expect(r.status, args.join(" ")).toBe(2);
      expect(lines(r.stderr), args.join(" ")).toHaveLength(1);
      expect(r.stderr).toMatch(message);
    }
  });

  it("a config with a wrong field exits 2 with one line naming the field; a missing config file names the path", async () => {
    writeFileSync(join(dir, "bad-train.json"), JSON.stringify({ model: "tiny-llama", data: "d.jsonl", steps: 2, lr: 1e-3, optimizer: { name: "nanoadam", densty: 0.1 } }));
    const bad = await nanotune(["train", "bad-train.json"]);
    expect(bad.status).toBe(2);
    expect(lines(bad.stderr)).toEqual([expect.stringMatching(/^nanotune: bad-train\.json: optimizer: unknown field 'densty'$/)]);
    writeFileSync(join(dir, "bad-eval.json"), JSON.stringify({ model: "m", taks: {} }));
    const badEval = await nanotune(["eval", "bad-eval.json"]);
    expect(badEval.status).toBe(2);
    expect(lines(badEval.stderr)).toHaveLength(1);
    expect(badEval.stderr).toMatch(/tasks: /);
    expect(badEval.stderr).toMatch(/unknown field 'taks'/);
    const missing = await nanotune(["train", join("no", "such", "config.json")]);
    expect(missing.status).toBe(2);
    expect(lines(missing.stderr)).toEqual(["nanotune: config file no/such/config.json does not exist"]);
    writeFileSync(join(dir, "broken.json"), "{ not json");
    const broken = await nanotune(["eval", "broken.json"]);
    expect(broken.status).toBe(2);
    expect(broken.stderr).toMatch(/^nanotune: config file broken\.json is not valid JSON/);
  });

  it("--verbose adds the stack trace", async () => {
    const r = await nanotune(["train", "absent.json", "--verbose"]);
    expect(r.status).toBe(2);
    expect(lines(r.stderr)[0]).toBe("nanotune: config file absent.json does not exist");
    expect(r.stderr).toMatch(/\n\s+at /);
  });
});

describe("nanotune CLI: paths in a config file are relative to the file", () => {
  it("resolves model directories, data, evalPath, runDir and resumeFrom; presets stay presets", async () => {
    const base = join(dir, "cfg");
    mkdirSync(join(base, "local-model"), { recursive: true });
    expect(resolveModelPath("tiny-llama", base)).toBe("tiny-llama");
    expect(resolveModelPath("local-model", base)).toBe(join(base, "local-model"));
    expect(resolveModelPath("../models/llama", base)).toBe(join(dir, "models", "llama"));
    expect(resolveModelPath("/abs/llama", base)).toBe("/abs/llama");
    const raw = {
      model: { path: "./local-model", device: "cpu" },
      data: { path: "data/train.jsonl", evalPath: "/abs/eval.jsonl" },
      runDir: "runs/a",
      resumeFrom: "runs/a/checkpoints/step-000010",
      steps: 3,
    };
    expect(resolveTrainConfigPaths(raw, base)).toEqual({
      model: { path: join(base, "local-model"), device: "cpu" },
      data: { path: join(base, "data", "train.jsonl"), evalPath: "/abs/eval.jsonl" },
      runDir: join(base, "runs", "a"),
      resumeFrom: join(base, "runs", "a", "checkpoints", "step-000010"),
      steps: 3,
    });
    expect(resolveTrainConfigPaths({ model: "tiny-llama", data: "d.jsonl", runDir: null }, base)).toEqual({ model: "tiny-llama", data: join(base, "d.jsonl"), runDir: null });
    expect(resolveTrainConfigPaths([1], base)).toEqual([1]); // wrong types are left for validation to name
    // Hub ids stay ids when nothing of that name is next to the config (docs/models.md, docs/data.md)
    expect(resolveModelPath("HuggingFaceTB/SmolLM2-135M", base)).toBe("HuggingFaceTB/SmolLM2-135M");
    mkdirSync(join(base, "org", "local"), { recursive: true });
    expect(resolveModelPath("org/local", base)).toBe(join(base, "org", "local")); // a directory that exists wins
    expect(resolveTrainConfigPaths({ model: "tiny-llama", data: { path: "tatsu-lab/alpaca", evalPath: "data/eval.jsonl" } }, base)).toEqual({
      model: "tiny-llama",
      data: { path: "tatsu-lab/alpaca", evalPath: join(base, "data", "eval.jsonl") }, // a file name is a path even when missing
    });
  });

  it("eval, run from another directory, finds the model and task files next to its config", async () => {
    const built = await runProcess(pythonExecutable(), ["-c", "from nanotune.models import load_model; print(load_model('tiny-llama', device='cpu').path)"], {
      env: { ...env(), PYTHONPATH: join(repoRoot, "python") },
    });
    expect(built.status, built.stderr).toBe(0);
    const modelDir = built.stdout.trim().split("\n").at(-1)!;
    const cfgDir = join(dir, "evalcfg");
    const elsewhere = join(dir, "elsewhere");
    mkdirSync(cfgDir, { recursive: true });
    mkdirSync(elsewhere, { recursive: true });
    const piqa = [
      { goal: "Open a jar.", sol1: "Twist the lid.", sol2: "Paint the lid.", label: 0 },
      { goal: "Dry hair.", sol1: "Use a towel.", sol2: "Use a spoon.", label: 0 },
      { goal: "Boil water.", sol1: "Freeze it.", sol2: "Heat it in a pot.", label: 1 },
    ];
    writeFileSync(join(cfgDir, "piqa.jsonl"), piqa.map((r) => JSON.stringify(r)).join("\n") + "\n");
    writeFileSync(join(cfgDir, "eval.json"), JSON.stringify({ model: relative(cfgDir, modelDir), tasks: { piqa: "piqa.jsonl" } }));
    const r = await nanotune(["eval", join("..", "evalcfg", "eval.json")], elsewhere);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/piqa/);
    expect(r.stdout).toMatch(/\b3\b/); // n = 3 examples
    // a task file that is not there is named by its field and resolved path
    writeFileSync(join(cfgDir, "eval-missing.json"), JSON.stringify({ model: modelDir, tasks: { piqa: "nope.jsonl" } }));
    const missing = await nanotune(["eval", join("..", "evalcfg", "eval-missing.json")], elsewhere);
    expect(missing.status).toBe(2);
    expect(lines(missing.stderr)).toEqual([`nanotune: ../evalcfg/eval-missing.json: tasks.piqa: ${join(cfgDir, "nope.jsonl")} does not exist`]);
  });

  it("train, run from another directory, reads data and writes runDir next to its config", async () => {
    const cfgDir = join(dir, "traincfg");
    mkdirSync(cfgDir, { recursive: true });
    const rows = Array.from({ length: 32 }, (_, i) => ({ instruction: `Double ${i}.`, input: "", output: String(2 * i) }));
    writeFileSync(join(cfgDir, "data.jsonl"), rows.map((r) => JSON.stringify(r)).join("\n") + "\n");
    writeFileSync(
      join(cfgDir, "train.json"),
      JSON.stringify({ model: { path: "tiny-llama", device: "cpu" }, data: { path: "data.jsonl", cutoff: 64 }, steps: 2, microBatch: 2, lr: 1e-3, runDir: "run" }),
    );
    mkdirSync(join(dir, "elsewhere"), { recursive: true });
    const r = await nanotune(["train", join(cfgDir, "train.json")], join(dir, "elsewhere"));
    expect(r.status, r.stderr).toBe(0);
    expect(existsSync(join(cfgDir, "run", "metrics.jsonl"))).toBe(true);
    expect(existsSync(join(dir, "elsewhere", "run"))).toBe(false);
  });
});

describe("nanotune train: run directories and non-finite steps", () => {
  const rows = Array.from({ length: 32 }, (_, i) => ({ instruction: `Double ${i}.`, input: "", output: String(2 * i) }));
  const config = (over: object) => ({ model: { path: "tiny-llama", device: "cpu" }, data: { path: "data.jsonl", cutoff: 64 }, steps: 4, microBatch: 2, lr: 1e-3, ...over });

  it("a runDir that already holds files exits 2 before the sidecar starts, naming it and the fix", async () => {
    const cfgDir = join(dir, "usedcfg");
    mkdirSync(join(cfgDir, "run"), { recursive: true });
    writeFileSync(join(cfgDir, "run", "metrics.jsonl"), "{}\n");
    writeFileSync(join(cfgDir, "train.json"), JSON.stringify(config({ runDir: "run" })));
    const t0 = performance.now();
    const r = await nanotune(["train", join(cfgDir, "train.json")]);
    expect(r.status, r.stderr).toBe(2);
    expect(performance.now() - t0).toBeLessThan(5000); // no sidecar (torch) was started
    expect(lines(r.stderr)).toHaveLength(1);
    expect(r.stderr).toContain(`runDir: ${join(cfgDir, "run")} already holds files (metrics.jsonl)`);
    expect(r.stderr).toMatch(/set resumeFrom .* overwrite: true/);
  });

  it("a non-finite step (lr 1e10) stops the run: exit 1, run:end reason non-finite in metrics.jsonl", async () => {
    const cfgDir = join(dir, "nancfg");
    mkdirSync(cfgDir, { recursive: true });
    writeFileSync(join(cfgDir, "data.jsonl"), rows.map((r) => JSON.stringify(r)).join("\n") + "\n");
    writeFileSync(join(cfgDir, "train.json"), JSON.stringify(config({ lr: 1e10, runDir: "run" })));
    const r = await nanotune(["train", join(cfgDir, "train.json")]);
    expect(r.status, r.stderr).toBe(1);
    expect(r.stderr).toMatch(/nanotune: stopped at step \d+: a non-finite loss or gradient norm/);
    expect(r.stdout).toMatch(/^non-finite after \d+ steps/m);
    const end = JSON.parse(readFileSync(join(cfgDir, "run", "metrics.jsonl"), "utf8").trim().split("\n").at(-1)!);
    expect(end).toMatchObject({ type: "run:end", reason: "non-finite", nonFinite: { lr: 1e10 } });
  });
});

describe("nanotune doctor", () => {
  it("reports the checkout's Python, torch and both protocol versions, and exits 0", async () => {
    const r = await nanotune(["doctor"]);
    expect(r.status, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^python\s+\S+ \(\d+\.\d+\.\d+; from (checkout \.venv|NANOTUNE_PYTHON)\)$/m);
    expect(r.stdout).toMatch(/^torch\s+\d+\.\d+/m);
    expect(r.stdout).toMatch(/^CUDA\s+/m);
    expect(r.stdout).toMatch(/^transformers\s+\d+\.\d+/m);
    expect(r.stdout).toMatch(/^protocol\s+TypeScript v(\d+), Python v\1$/m);
    expect(r.stdout).toMatch(/^GGUF models\s+gguf \d+\.\d+\.\d+, accelerate \d+\./m);
    // setup installed the demo's model; this test's NANOTUNE_CACHE is empty, so not converted there
    expect(r.stdout).toMatch(/^smollm2-135m\s+installed \(.*SmolLM2-135M-Instruct\.Q4_1\.gguf\), not converted yet/m);
    expect(r.stdout).toContain("all good");
  });
});
