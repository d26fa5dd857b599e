// "Nothing lost, nobody in": the Trainer under faults, with real sidecars and real
// processes. Signals to `nanotune train` itself, kill -9 of the sidecar mid-step and
// mid-save, resumes that equal the uninterrupted run bit for bit (after a live policy
// swap too), non-finite steps, used run directories, and one run per sidecar.
import { spawn } from "node:child_process";
import { existsSync, type FSWatcher, mkdirSync, readdirSync, readFileSync, statSync, watch, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type MaskPolicy, NanotuneError, policies, schedules, Sidecar, Trainer, type TrainerEvent, type TrainerOptions } from "../../ts/index.ts";
// @ts-expect-error plain ESM helper without types
import { repoRoot } from "../../ts/dev/python.mjs";
import { cacheEnv, collect, startTinyRun, type StepEvent, steps, stopTinyRun } from "./fixtures/tiny-run.ts";

let dir: string;
let sc: Sidecar;
let dataPath: string;
const env = () => cacheEnv(dir);
const quiet = { onStderr: () => {} };
const sidecar = () => Sidecar.start({ device: "cpu", env: env(), ...quiet });

type EndEvent = Extract<TrainerEvent, { type: "run:end" }>;
const losses = (evs: TrainerEvent[]) => steps(evs).map((s) => s.loss);
const endOf = (evs: TrainerEvent[]) => evs.at(-1) as EndEvent;

/** Per-step values do not depend on the run's length (explicit spans), so a 12-step run is the 40-step run's prefix. */
const TOTAL = 40;
const base = (over: Partial<TrainerOptions> = {}): TrainerOptions => ({
  model: { path: "tiny-llama", device: "cpu" },
  data: { path: dataPath, cutoff: 64, seed: 1 },
  optimizer: { name: "nanoadam", density: 0.1 },
  steps: TOTAL,
  microBatch: 4,
  lr: { type: "warmup", steps: 3, then: { type: "cosine", peak: 1e-2, min: 1e-3, steps: TOTAL } },
  maskPolicy: { type: "smallWeights", density: { type: "linear", from: 0.1, to: 0.05, every: 5, steps: TOTAL }, maskInterval: 3 },
  checkpointEvery: 4,
  progress: false,
  ...over,
});
/** The uninterrupted run of base() (all 40 steps). */
let ref: StepEvent[];

const ckpt = (runDir: string, step: number) => join(runDir, "checkpoints", `step-${String(step).padStart(6, "0")}`);

/** A checkpoint directory is complete: trainer_state.json lists every file with its size. */
function complete(path: string): boolean {
  const statePath = join(path, "trainer_state.json");
  if (!existsSync(statePath)) return false;
  const state = JSON.parse(readFileSync(statePath, "utf8")) as { files: Record<string, number> };
  return Object.entries(state.files).every(([rel, size]) => existsSync(join(path, rel)) && statSync(join(path, rel)).size === size);
}

/** Every visible checkpoint in runDir is complete; returns their steps, ascending. */
function checkpointSteps(runDir: string): number[] {
  const root = join(runDir, "checkpoints");
  if (!existsSync(root)) return [];
  const found = readdirSync(root).filter((n) => /^step-\d+$/.test(n));
  for (const n of found) expect(complete(join(root, n)), `${n} is torn`).toBe(true);
  return found.map((n) => Number(n.slice(5))).sort((a, b) => a - b);
}

const metricsOf = (runDir: string) =>
  readFileSync(join(runDir, "metrics.jsonl"), "utf8")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as TrainerEvent & { time: string });

/** Resumes base(over) from `from` on the shared sidecar; returns its events. */
const resume = (from: string, over: Partial<TrainerOptions> = {}) => collect(new Trainer({ sidecar: sc, ...base(over), resumeFrom: from }));

beforeAll(async () => {
  ({ dir, dataPath, sc } = await startTinyRun("nanotune-faults-", quiet));
  ref = steps(await collect(new Trainer({ sidecar: sc, ...base() })));
  expect(ref).toHaveLength(TOTAL);
});
afterAll(() => stopTinyRun({ dir, sc }));

// ---- `nanotune train` and signals -------------------------------------------------

const tsx = pathToFileURL(join(repoRoot, "node_modules", "tsx", "dist", "loader.mjs")).href;

/** `nanotune train <config>` as its own process (node + tsx's loader, not npx: npx does not forward SIGTERM); TMPDIR is private to it. */
function train(name: string, config: object) {
  const home = join(dir, name);
  const tmp = join(home, "tmp");
  mkdirSync(tmp, { recursive: true });
  const cfgPath = join(home, "config.json");
  writeFileSync(cfgPath, JSON.stringify(config));
  const child = spawn(process.execPath, ["--import", tsx, join(repoRoot, "ts", "cli", "bin.ts"), "train", cfgPath], {
    cwd: home,
    env: { ...process.env, ...env(), TMPDIR: tmp },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (d) => (stdout += d));
  child.stderr.on("data", (d) => (stderr += d));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; at: number }>((r) =>
    child.once("exit", (code, signal) => r({ code, signal, at: performance.now() })),
  );
  return { child, tmp, exited, out: () => stdout + stderr };
}

async function until(what: string, ok: () => boolean, timeoutMs = 60_000, everyMs = 20): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

const hasStep = (runDir: string) => existsSync(join(runDir, "metrics.jsonl")) && readFileSync(join(runDir, "metrics.jsonl"), "utf8").includes('"type":"train:step"');

/** No process still runs with `path` on its command line (the sidecar's endpoint lives under the private TMPDIR). */
function noProcessWith(path: string): boolean {
  for (const pid of readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
    try {
      if (readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(path)) return false;
    } catch {
      // gone meanwhile
    }
  }
  return true;
}

describe("nanotune train: SIGINT and SIGTERM", () => {
  it.each([
    ["SIGTERM", 143],
    ["SIGINT", 130],
  ] as const)("%s finishes the step, saves a checkpoint, ends 'interrupted', exits %i; the resume equals the uninterrupted run", async (sig, code) => {
    const runDir = join(dir, `cli-${sig}`, "run");
    const p = train(`cli-${sig}`, { ...base({ checkpointEvery: 0 }), runDir });
    await until("a train:step in metrics.jsonl", () => hasStep(runDir));
    p.child.kill(sig);
    const exit = await p.exited;
    expect(exit.code, p.out()).toBe(code);
    const metrics = metricsOf(runDir);
    const end = metrics.at(-1) as EndEvent;
    expect(end).toMatchObject({ type: "run:end", reason: "interrupted" });
    const at = end.step;
    expect(at).toBeGreaterThan(0);
    expect(at).toBeLessThan(TOTAL);
    expect(end.checkpoint).toBe(ckpt(runDir, at));
    expect(checkpointSteps(runDir)).toEqual([at]);
    expect(metrics.filter((m) => m.type === "checkpoint:saved").map((m) => (m as { step: number }).step)).toEqual([at]);
    expect(noProcessWith(p.tmp)).toBe(true);
    expect(readdirSync(p.tmp).filter((n) => n.startsWith("nanotune-"))).toEqual([]); // the sidecar's socket directory is gone
    // the interrupted process trained what the uninterrupted run trained, and the resume goes on bit for bit
    expect(losses(metrics)).toEqual(ref.slice(0, at).map((s) => s.loss));
    const resumed = await resume(ckpt(runDir, at));
    expect(steps(resumed)[0]!.step).toBe(at);
    expect(losses(resumed)).toEqual(ref.slice(at).map((s) => s.loss));
    expect(steps(resumed).map((s) => s.maskRefreshed)).toEqual(ref.slice(at).map((s) => s.maskRefreshed));
  });

  it("a second signal during the checkpoint save exits at once; the checkpoint is complete or absent, no temp dir left", async () => {
    const runDir = join(dir, "cli-twice", "run");
    const p = train("cli-twice", { ...base({ checkpointEvery: 0 }), runDir });
    await until("a train:step in metrics.jsonl", () => hasStep(runDir));
    p.child.kill("SIGTERM");
    // the save writes into a hidden temp directory beside the checkpoint, then renames it in
    const saving = () => existsSync(join(runDir, "checkpoints")) && readdirSync(join(runDir, "checkpoints")).some((n) => n.includes(".tmp-"));
    await until("the checkpoint save", saving, 30_000, 1).catch(() => undefined);
    const sent = performance.now();
    p.child.kill("SIGTERM");
    const exit = await p.exited;
    expect(exit.code, p.out()).toBe(143);
    expect(exit.at - sent).toBeLessThan(1000);
    checkpointSteps(runDir); // each one there is complete
    await until("the sidecar to be gone", () => noProcessWith(p.tmp), 2000);
    expect(readdirSync(p.tmp).filter((n) => n.startsWith("nanotune-"))).toEqual([]);
  });
});

// ---- kill -9 of the sidecar ----------------------------------------------------------

describe("kill -9 of the sidecar", () => {
  // [the call running, ms after it began (train_step: after the train:step 5 event; save_checkpoint: after its temp directory appeared)]
  const cases = [
    ["train_step", 0],
    ["train_step", 8],
    ["save_checkpoint", 0],
    ["save_checkpoint", 2],
    ["save_checkpoint", 5],
  ] as const;
  it.each(cases)("during %s (+%i ms): the run rejects with SIDECAR_CRASHED within 1 s; the last complete checkpoint resumes bit for bit", async (what, ms) => {
    const runDir = join(dir, `kill-${what}-${ms}`);
    const victim = await sidecar();
    let killedAt = 0;
    const kill = () => {
      if (killedAt) return;
      killedAt = performance.now();
      process.kill(victim.pid, "SIGKILL");
    };
    let watcher: FSWatcher | undefined;
    const trainer = new Trainer({ sidecar: victim, ...base({ steps: 12, runDir }) });
    const error = await collect(trainer, (ev) => {
      if (ev.type !== "train:step") return;
      if (what === "train_step" && ev.step === 5) setTimeout(kill, ms); // the next call is step 6's train_step
      if (what === "save_checkpoint" && ev.step === 7) {
        // the next call saves step-000008: it writes a hidden temp directory, then renames it in
        watcher = watch(join(runDir, "checkpoints"), (_e, name) => {
          if (!String(name).startsWith(".step-000008.tmp-")) return;
          if (ms === 0) kill();
          else setTimeout(kill, ms);
        });
      }
    }).catch((e: unknown) => e);
    const rejectedAt = performance.now();
    watcher?.close();
    await victim.close();
    expect(error).toBeInstanceOf(NanotuneError);
    expect((error as NanotuneError).code).toBe("SIDECAR_CRASHED");
    if (ms === 0) expect((error as Error).message).toContain(`while ${what} was pending`);
    expect(killedAt).toBeGreaterThan(0);
    expect(rejectedAt - killedAt).toBeLessThan(1000);
    const ends = metricsOf(runDir).filter((m) => m.type === "run:end");
    expect(ends).toMatchObject([{ reason: "failed", error: { code: "SIDECAR_CRASHED" } }]);
    const saved = checkpointSteps(runDir); // each one there is complete
    expect(saved[0]).toBe(4);
    const last = saved.at(-1)!;
    const resumed = await resume(ckpt(runDir, last), { steps: 12 });
    expect(steps(resumed).map((s) => s.step)).toEqual(ref.slice(last, 12).map((s) => s.step));
    expect(losses(resumed)).toEqual(ref.slice(last, 12).map((s) => s.loss));
  });
});

// ---- resume after a live policy swap -------------------------------------------------

describe("resume after a live mask-policy swap", () => {
  it("restores the active policy and its activation step: the same refresh steps and losses as the uninterrupted run", async () => {
    const runDir = join(dir, "swap");
    const swapTo = () => policies.largeWeights({ density: 0.05, maskInterval: 4 });
    const trainer = new Trainer({ sidecar: sc, ...base({ steps: 16, runDir }) });
    const full = await collect(trainer, (ev) => {
      if (ev.type === "train:step" && ev.step === 5) trainer.setMaskPolicy(swapTo());
    });
    const swapped = full.filter((e) => e.type === "policy:swapped");
    expect(swapped).toEqual([{ type: "policy:swapped", step: 6, from: "smallWeights", to: "largeWeights", spec: { type: "largeWeights", density: 0.05, maskInterval: 4 } }]);
    expect(full.findIndex((e) => e.type === "policy:swapped")).toBe(full.findIndex((e) => e.type === "train:step" && e.step === 6) - 1);
    const state = JSON.parse(readFileSync(join(ckpt(runDir, 8), "trainer_state.json"), "utf8"));
    expect(state.extra.policy).toEqual({ name: "largeWeights", activatedAt: 6, spec: { type: "largeWeights", density: 0.05, maskInterval: 4 } });

    const resumed = await resume(ckpt(runDir, 8), { steps: 16 }); // the config still names smallWeights
    expect(resumed[0]).toMatchObject({ type: "run:start", step: 8, policy: { name: "largeWeights", activatedAt: 6 } });
    const after = steps(full).slice(8);
    expect(steps(resumed).map((s) => [s.step, s.policy, s.maskRefreshed, s.mask])).toEqual(after.map((s) => [s.step, s.policy, s.maskRefreshed, s.mask]));
    expect(steps(resumed).filter((s) => s.maskRefreshed).map((s) => s.step)).toEqual([10, 14]);
    expect(losses(resumed)).toEqual(after.map((s) => s.loss));
  });

  it("a custom policy resumes by name; without it the resume names the policy", async () => {
    const runDir = join(dir, "custom");
    const everyTwo = (): MaskPolicy => ({
      name: "everyTwo",
      decide: () => ({ criterion: "small_weights", density: 0.2 }),
      shouldRefresh: (_s, _t, ctx) => ctx.sinceActivation % 2 === 0,
    });
    const trainer = new Trainer({ sidecar: sc, ...base({ steps: 6, runDir }) });
    const full = await collect(trainer, (ev) => {
      if (ev.type === "train:step" && ev.step === 0) trainer.setMaskPolicy(everyTwo());
    });
    const kept = JSON.parse(readFileSync(join(ckpt(runDir, 4), "trainer_state.json"), "utf8")).extra.policy;
    expect([kept.name, kept.activatedAt, kept.spec ?? null]).toEqual(["everyTwo", 1, null]); // known by name (the wire omits a null spec)
    const wrong = await resume(ckpt(runDir, 4), { steps: 6 }).catch((e: unknown) => e);
    expect(wrong).toBeInstanceOf(NanotuneError);
    expect((wrong as NanotuneError).code).toBe("INVALID_CONFIG");
    expect((wrong as Error).message).toMatch(/custom policy 'everyTwo' \(active since step 1\)/);
    const resumed = await resume(ckpt(runDir, 4), { steps: 6, maskPolicy: everyTwo() });
    expect(steps(resumed).map((s) => [s.maskRefreshed, s.loss])).toEqual(steps(full).slice(4).map((s) => [s.maskRefreshed, s.loss]));
  });
});

// ---- non-finite steps ---------------------------------------------------------------

describe("a non-finite step (lr 1e10 at step 3)", () => {
  const spike = () => schedules.fn((t) => (t === 3 ? 1e10 : 1e-2), "spike");

  it("onNonFinite 'stop' ends the run with reason non-finite and the step's details; 'skip' skips maxSkips in a row, then stops; a resume with a sane lr trains", async () => {
    const runDir = join(dir, "nan-stop");
    const stopped = await collect(new Trainer({ sidecar: sc, ...base({ steps: 10, runDir, checkpointEvery: 2, lr: spike() }) }));
    const end = endOf(stopped);
    expect(end).toMatchObject({ type: "run:end", reason: "non-finite" });
    const bad = end.nonFinite!;
    expect(bad.step).toBeGreaterThanOrEqual(3);
    expect(end.step).toBe(bad.step);
    expect(Number.isFinite(bad.loss ?? Number.NaN) && Number.isFinite(bad.gradNorm ?? Number.NaN)).toBe(false);
    expect(bad.skipped).toBe(0);
    expect(steps(stopped).map((s) => s.step)).toEqual([...Array(bad.step).keys()]);
    expect(metricsOf(runDir).at(-1)).toMatchObject({ type: "run:end", reason: "non-finite", nonFinite: { step: bad.step } });

    const skipped = await collect(new Trainer({ sidecar: sc, ...base({ steps: 10, lr: spike(), onNonFinite: "skip", maxSkips: 2 }) }));
    const skips = skipped.filter((e) => e.type === "step:skipped");
    expect(skips).toHaveLength(2);
    expect(skips.map((s) => s.type === "step:skipped" && [s.step, s.inARow, s.reason])).toEqual([
      [bad.step, 1, "non-finite"],
      [bad.step, 2, "non-finite"],
    ]);
    expect(endOf(skipped)).toMatchObject({ reason: "non-finite", step: bad.step, nonFinite: { step: bad.step, skipped: 2 } });

    // The checkpoint before the spike, with a sane lr: the run trains to its end.
    const resumed = await resume(ckpt(runDir, 2), { steps: 10, lr: 1e-2 });
    expect(endOf(resumed).reason).toBe("completed");
    expect(steps(resumed).map((s) => s.step)).toEqual([2, 3, 4, 5, 6, 7, 8, 9]);
    expect(losses(resumed).every(Number.isFinite)).toBe(true);
  });
});

// ---- run directories and config.json ---------------------------------------------------

describe("run directories", () => {
  it("a fresh run into a used runDir fails at once naming it; overwrite: true starts over; config.json records schedules and policies as JSON", async () => {
    const runDir = join(dir, "used");
    const spikeFree = schedules.fn((t) => 1e-2 / (1 + t), "inverse");
    const first = { ...base({ steps: 2, runDir, checkpointEvery: 0 }), lr: schedules.warmup(1, spikeFree), maskPolicy: policies.random({ density: schedules.linear(0.2, 0.1, { every: 2 }), maskInterval: 2 }) };
    await collect(new Trainer({ sidecar: sc, ...first }));
    const config = readFileSync(join(runDir, "config.json"), "utf8");
    expect(config).not.toContain("<function>");
    expect(JSON.parse(config)).toMatchObject({
      lr: { type: "warmup", steps: 1, then: { type: "custom", name: "inverse" } },
      maskPolicy: { type: "random", density: { type: "linear", from: 0.2, to: 0.1, every: 2 }, maskInterval: 2 },
      overwrite: false,
      onNonFinite: "stop",
    });

    const t0 = performance.now();
    const again = await collect(new Trainer({ sidecar: sc, ...first })).catch((e: unknown) => e);
    expect(performance.now() - t0).toBeLessThan(200);
    expect(again).toBeInstanceOf(NanotuneError);
    expect((again as NanotuneError).code).toBe("INVALID_CONFIG");
    expect((again as Error).message).toContain(runDir);
    expect((again as Error).message).toMatch(/resumeFrom/);
    expect((again as Error).message).toMatch(/overwrite: true/);

    const over = await collect(new Trainer({ sidecar: sc, ...first, steps: 3, overwrite: true }));
    expect(endOf(over).reason).toBe("completed");
    const metrics = metricsOf(runDir);
    expect(metrics.filter((m) => m.type === "run:start")).toHaveLength(1);
    expect(metrics.filter((m) => m.type === "train:step")).toHaveLength(3);
    expect(checkpointSteps(runDir)).toEqual([3]);
  });
});

// ---- one run per sidecar ---------------------------------------------------------------

describe("one run per sidecar", () => {
  it("a second Trainer.run() on a sidecar another Trainer runs on fails at once with BUSY; the first run goes on unaffected", async () => {
    let second: unknown = null;
    let took = 0;
    const first = await collect(new Trainer({ sidecar: sc, ...base({ steps: 8 }) }), async (ev) => {
      if (ev.type !== "train:step" || ev.step !== 2) return;
      const t0 = performance.now();
      second = await new Trainer({ sidecar: sc, ...base({ steps: 8 }) }).run().next().catch((e: unknown) => e);
      took = performance.now() - t0;
    });
    expect(second).toBeInstanceOf(NanotuneError);
    expect((second as NanotuneError).code).toBe("BUSY");
    expect((second as Error).message).toMatch(/another Trainer is running on this sidecar/);
    expect(took).toBeLessThan(100);
    expect(endOf(first).reason).toBe("completed");
    expect(losses(first)).toEqual(ref.slice(0, 8).map((s) => s.loss));
    // once the first run ended, the sidecar is free again
    expect(endOf(await collect(new Trainer({ sidecar: sc, ...base({ steps: 1 }) }))).reason).toBe("completed");
  });

  it("a run whose sidecar was taken over by another client (a new model loaded) ends with SESSION_CHANGED", async () => {
    const error = await collect(new Trainer({ sidecar: sc, ...base({ steps: 8 }) }), async (ev) => {
      if (ev.type === "train:step" && ev.step === 2) await sc.call("load_model", { path: "tiny-llama", device: "cpu" });
    }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(NanotuneError);
    expect((error as NanotuneError).code).toBe("SESSION_CHANGED");
  });
});
