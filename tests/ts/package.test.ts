// nanotune as an npm package, for real: `npm pack` (which builds dist/), a fresh
// project that installs the tarball with plain npm, `npx nanotune setup` making
// the Python environment under NANOTUNE_HOME, then a plain `node` script (no tsx)
// that imports "nanotune" and trains, and `npx nanotune demo`. No mocks; it
// installs torch into a fresh virtualenv, so it takes a minute or two.
import { existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { packageRoot, packageVersion } from "../../ts/paths.ts";

let work: string;
let project: string;
let home: string;
let tarball: string;

/** Our environment minus what would steer the child: npm's script variables, NANOTUNE_PYTHON. */
function cleanEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (v === undefined || k.startsWith("npm_") || k === "NANOTUNE_PYTHON" || k === "INIT_CWD") continue;
    env[k] = v;
  }
  env.NANOTUNE_HOME = home;
  env.NANOTUNE_CACHE = join(work, "cache");
  return env;
}

async function run(file: string, args: string[], cwd: string) {
  const r = await execa(file, args, { cwd, env: cleanEnv(), extendEnv: false, reject: false, stdin: "ignore", all: true });
  return { code: r.exitCode, stdout: String(r.stdout), stderr: String(r.stderr), all: String(r.all) };
}
/** `npx --no -- nanotune ...`: the project's own bin, never a download; `--` keeps --version etc. away from npx. */
const nanotune = (...args: string[]) => run("npx", ["--no", "--", "nanotune", ...args], project);

beforeAll(() => {
  work = mkdtempSync(join(tmpdir(), "nanotune-package-"));
  project = join(work, "app");
  home = join(work, "home");
  mkdirSync(project);
});
// The test's Python environment holds ~40k files, which Node's recursive rm takes minutes
// to delete on a loaded machine: asynchronously (the worker keeps answering vitest) and
// with room to finish.
afterAll(() => rm(work, { recursive: true, force: true }), 600_000);

describe("the npm package", () => {
  it("packs dist/, the Python sources and the license, without tests, bench or TypeScript sources", async () => {
    const r = await run("npm", ["pack", "--json", "--pack-destination", work], packageRoot);
    expect(r.code, r.all).toBe(0);
    const [info] = JSON.parse(r.stdout.slice(r.stdout.indexOf("["))) as { filename: string; files: { path: string }[] }[];
    tarball = join(work, info!.filename);
    expect(existsSync(tarball)).toBe(true);
    const files = info!.files.map((f) => f.path);
    for (const f of ["dist/ts/index.js", "dist/ts/index.d.ts", "dist/ts/cli/bin.js", "dist/protocol/schema.js", "python/nanotune/sidecar/__main__.py", "python/nanotune/doctor.py", "pyproject.toml", "protocol/schema.json", "README.md", "LICENSE", "package.json"]) {
      expect(files, f).toContain(f);
    }
    expect(files.filter((f) => /^(tests|bench|reports|examples|ts)\//.test(f) || f.includes("__pycache__") || f.endsWith(".pyc"))).toEqual([]);
    expect(readFileSync(join(packageRoot, "dist", "ts", "cli", "bin.js"), "utf8")).toMatch(/^#!\/usr\/bin\/env node\n/);
  }, 120_000);

  it("installs into a fresh project with plain npm", async () => {
    expect((await run("npm", ["init", "-y"], project)).code).toBe(0);
    const pkg = JSON.parse(readFileSync(join(project, "package.json"), "utf8")) as Record<string, unknown>;
    writeFileSync(join(project, "package.json"), JSON.stringify({ ...pkg, type: "module" }, null, 2));
    const r = await run("npm", ["install", tarball, "--prefer-offline", "--no-audit", "--no-fund"], project);
    expect(r.code, r.all).toBe(0);
    expect(existsSync(join(project, "node_modules", "nanotune", "dist", "ts", "index.js"))).toBe(true);
    expect(existsSync(join(project, "node_modules", "nanotune", ".venv"))).toBe(false);
    const v = await nanotune("--version");
    expect(v.code, v.all).toBe(0);
    expect(v.stdout.trim()).toBe(packageVersion);
  }, 180_000);

  it("Sidecar.start() and doctor say to run `npx nanotune setup` while there is no Python", async () => {
    writeFileSync(
      join(project, "no-python.mjs"),
      `import { Sidecar } from "nanotune";
const out = {};
for (const [name, options] of [["none", {}], ["nonexistent", { python: "/nonexistent/python3" }]]) {
  try {
    const sc = await Sidecar.start({ device: "cpu", ...options });
    await sc.close();
    out[name] = "started";
  } catch (e) {
    out[name] = { name: e.name, code: e.code, message: e.message };
  }
}
console.log(JSON.stringify(out));
`,
    );
    const r = await run(process.execPath, ["no-python.mjs"], project);
    expect(r.code, r.all).toBe(0);
    const out = JSON.parse(r.stdout) as Record<string, { code: string; message: string }>;
    expect(out.none!.code).toBe("START_FAILED");
    expect(out.none!.message).toContain("npx nanotune setup");
    expect(out.none!.message).toContain("NANOTUNE_PYTHON");
    expect(out.nonexistent!.code).toBe("START_FAILED");
    expect(out.nonexistent!.message).toContain("/nonexistent/python3");
    expect(out.nonexistent!.message).toContain("npx nanotune setup");
    const doctor = await nanotune("doctor");
    expect(doctor.code, doctor.all).toBe(2);
    expect(doctor.stdout).toContain("npx nanotune setup");
  }, 60_000);

  it("`npx nanotune setup` makes the Python environment under NANOTUNE_HOME; a second run is quick", async () => {
    const t0 = Date.now();
    const r = await nanotune("setup");
    expect(r.code, r.all).toBe(0);
    expect(r.stdout).toMatch(/\[1\/3\].*\n[\s\S]*\[2\/3\] installing torch==2\.13\.0[\s\S]*\[3\/3\]/);
    const dir = join(home, `python-${packageVersion}`);
    const stamp = JSON.parse(readFileSync(join(dir, "nanotune-setup.json"), "utf8")) as { version: string; torch: string };
    expect(stamp).toMatchObject({ version: packageVersion, torch: "torch==2.13.0" });
    console.log(`setup took ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    const t1 = Date.now();
    const again = await nanotune("setup");
    expect(again.code, again.all).toBe(0);
    expect(again.stdout).toContain("up to date");
    expect(Date.now() - t1).toBeLessThan(5000);
    const doctor = await nanotune("doctor");
    expect(doctor.code, doctor.all).toBe(0);
    expect(doctor.stdout).toMatch(/torch\s+2\.13\.0/);
    expect(doctor.stdout).toContain(dir);
  }, 240_000);

  it("a plain node script imports nanotune and trains tiny-llama for 5 steps with NanoAdam", async () => {
    const rows = Array.from({ length: 64 }, (_, i) => ({ instruction: `Double ${i}.`, input: "", output: String(2 * i) }));
    writeFileSync(join(project, "data.jsonl"), rows.map((r) => JSON.stringify(r)).join("\n") + "\n");
    writeFileSync(
      join(project, "train.mjs"),
      `import { Sidecar, Trainer, policies, schedules, sinks } from "nanotune";
const sidecar = await Sidecar.start({ device: "cpu" });
try {
  const trainer = new Trainer({
    sidecar,
    model: { path: "tiny-llama", device: "cpu" },
    data: { path: "data.jsonl", cutoff: 64 },
    optimizer: { name: "nanoadam", density: 0.1 },
    steps: 5,
    microBatch: 4,
    lr: schedules.warmup(1, schedules.constant(1e-2)),
    maskPolicy: policies.smallWeights({ density: 0.1, maskInterval: 2 }),
    sinks: [sinks.jsonl("run/metrics.jsonl")],
  });
  const losses = [];
  for await (const ev of trainer.run()) if (ev.type === "train:step") losses.push(ev.loss);
  console.log(JSON.stringify({ losses }));
} finally {
  await sidecar.close();
}
`,
    );
    const r = await run(process.execPath, ["train.mjs"], project);
    expect(r.code, r.all).toBe(0);
    const { losses } = JSON.parse(r.stdout.trim().split("\n").at(-1)!) as { losses: number[] };
    console.log(`losses: ${losses.map((l) => l.toFixed(4)).join(" ")}`);
    expect(losses).toHaveLength(5);
    for (const l of losses) expect(Number.isFinite(l)).toBe(true);
    expect(readFileSync(join(project, "run", "metrics.jsonl"), "utf8")).toContain('"type":"train:step"');
  }, 120_000);

  it("`npx nanotune demo --tiny` runs", async () => {
    // fewer steps than the default 300 a stage: the same code path, and the file
    // stays well inside its time budget when other tests load the two CPUs
    const r = await nanotune("demo", "--tiny", "--steps", "40");
    expect(r.code, r.all).toBe(0);
    expect(r.stdout).toMatch(/NanoAdam/);
  }, 180_000);
});
