// The Trainer against a real sidecar on the tiny Llama preset (issue 4's acceptance).
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ConfigError, parseConfig, policies, schedules, Sidecar, SidecarError, Trainer, type TrainerEvent } from "../../ts/index.ts";
import { main as cli } from "../../ts/cli/index.ts";
// @ts-expect-error plain ESM helper without types
import { pythonExecutable, repoRoot } from "../../ts/dev/python.mjs";
import { cacheEnv, collect, startTinyRun, steps, stopTinyRun } from "./fixtures/tiny-run.ts";
import { runProcess } from "./fixtures/run.ts";

let dir: string;
let sc: Sidecar;
let dataPath: string;
const env = () => cacheEnv(dir);

beforeAll(async () => ({ dir, dataPath, sc } = await startTinyRun("nanotune-trainer-")));
afterAll(() => stopTinyRun({ dir, sc }));

function python(args: string[], extraEnv: Record<string, string> = {}) {
  return runProcess(pythonExecutable(), args, {
    cwd: repoRoot,
    env: { ...process.env, ...env(), ...extraEnv, PYTHONPATH: join(repoRoot, "python") },
  });
}

describe("Trainer", () => {
  it("loads a model on the device the sidecar started on: Sidecar.start({ device: 'cpu' })", async () => {
    expect(sc.info.device).toBe("cpu");
    const model = await sc.call("load_model", { path: "tiny-llama" }); // no device: the sidecar's
    expect(model.device).toBe("cpu");
    expect((await sc.call("load_model", { path: "tiny-llama", device: "auto" })).device).toBe("cpu");
  });

  it("gives the same losses as a plain Python loop replaying its lr and mask decisions (50 steps)", async () => {
    const runDir = join(dir, "parity");
    const config = {
      model: { path: "tiny-llama", device: "cpu" },
      data: { path: dataPath, cutoff: 64, seed: 1 },
      optimizer: { name: "nanoadam" as const, density: 0.1 },
      steps: 50,
      microBatch: 4,
      gradAccum: 2,
      lr: schedules.warmup(5, schedules.cosine({ peak: 1e-2, min: 1e-3 })), // a function: the replay reads the lr it produced
      maskPolicy: policies.smallWeights({ density: schedules.linear(0.1, 0.05, { every: 20 }), maskInterval: 7 }),
      runDir,
      progress: false,
    };
    const ts = steps(await collect(new Trainer({ sidecar: sc, ...config })));
    // The replay re-implements nothing: it reads runDir's config.json and metrics.jsonl.
    const r = await python(["-m", "nanotune.plainloop", runDir]);
    expect(r.status, r.stderr).toBe(0);
    const py = JSON.parse(r.stdout) as { step: number; loss: number; mask_refreshed: boolean; lr: number; density: number | null }[];
    expect(py).toHaveLength(50);
    expect(ts.map((s) => s.loss)).toEqual(py.map((s) => s.loss));
    expect(ts.map((s) => s.lr)).toEqual(py.map((s) => s.lr));
    expect(ts.map((s) => s.density)).toEqual(py.map((s) => s.density));
    expect(ts.map((s) => s.maskRefreshed)).toEqual(py.map((s) => s.mask_refreshed));
    expect(ts.filter((s) => s.maskRefreshed).map((s) => s.step)).toEqual([0, 7, 14, 20, 21, 28, 35, 40, 42, 49]);
    expect(ts.filter((s) => s.mask !== null).map((s) => s.step)).toEqual([0, 7, 14, 20, 21, 28, 35, 40, 42, 49]);
    expect(ts.at(-1)!.loss).toBeLessThan(ts[0]!.loss);
  });

  it("applies a mask policy swapped at step 25 from step 26 exactly (masks read back)", async () => {
    const trainer = new Trainer({
      sidecar: sc,
      model: { path: "tiny-llama", device: "cpu" },
      data: { path: dataPath, cutoff: 64 },
      optimizer: { name: "nanoadam", density: 0.1 },
      steps: 30,
      microBatch: 4,
      lr: 5e-3,
      maskPolicy: policies.smallWeights({ density: 0.1, maskInterval: 1000 }),
      progress: false,
    });
    const sizes: Record<number, Record<string, number>> = {};
    const masksAt: Record<number, Record<string, Int32Array>> = {};
    const events = await collect(trainer, async (ev) => {
      if (ev.type !== "train:step" || ev.step < 24 || ev.step > 27) return;
      const { masks } = await sc.call("get_masks", {});
      sizes[ev.step] = Object.fromEntries(masks.map((m) => [m.name, m.indices.shape[0]!]));
      masksAt[ev.step] = Object.fromEntries(masks.map((m) => [m.name, Int32Array.from(m.indices.toArray() as Int32Array)]));
      if (ev.step === 25) trainer.setMaskPolicy(policies.largeWeights({ density: 0.05, maskInterval: 1000 }));
    });
    const refreshed = events.filter((e) => e.type === "mask:refreshed").map((e) => [e.step, e.type === "mask:refreshed" && e.policy]);
    expect(refreshed).toEqual([[0, "smallWeights"], [26, "largeWeights"]]);
    const name = "model.layers.0.mlp.up_proj.weight";
    expect(sizes[25]![name]).toBe(sizes[24]![name]);
    expect(masksAt[25]![name]!.length).toBe(sizes[25]![name]);
    expect(masksAt[25]![name]).toEqual(masksAt[24]![name]); // step 25 still on the old mask
    expect(sizes[26]![name]).toBeCloseTo(sizes[25]![name]! / 2, -1); // 5% instead of 10%
    expect(masksAt[27]![name]).toEqual(masksAt[26]![name]);
    const stepEvents = steps(events);
    expect(stepEvents[25]!.policy).toBe("smallWeights");
    expect(stepEvents[26]!.policy).toBe("largeWeights");
    expect(stepEvents[26]!.density).toBeCloseTo(0.05, 3);
  });

  it("writes config, metrics and a checkpoint whose model loads with transformers and generates", async () => {
    const runDir = join(dir, "run");
    const events = await collect(
      new Trainer({
        sidecar: sc,
        model: { path: "tiny-llama", device: "cpu" },
        data: { path: dataPath, cutoff: 64, evalFraction: 0.1 },
        optimizer: { name: "nanoadam", density: 0.2 },
        steps: 6,
        microBatch: 4,
        lr: 1e-2,
        evalEvery: 3,
        checkpointEvery: 3,
        runDir,
        progress: false,
      }),
    );
    expect(events.map((e) => e.type).filter((t) => t !== "train:step" && t !== "mask:refreshed")).toEqual([
      "run:start", "eval", "checkpoint:saved", "eval", "checkpoint:saved", "run:end",
    ]);
    const metrics = readFileSync(join(runDir, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l));
    expect(metrics.filter((m) => m.type === "train:step")).toHaveLength(6);
    expect(JSON.parse(readFileSync(join(runDir, "config.json"), "utf8")).steps).toBe(6);
    const saved = events.filter((e) => e.type === "checkpoint:saved").at(-1);
    const modelDir = join(saved!.type === "checkpoint:saved" ? saved!.path : "", "model");
    const r = await python([
      "-c",
      "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n" +
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n" +
        "ids = t('Double 4.', return_tensors='pt').input_ids\n" +
        "out = m.generate(ids, max_new_tokens=5, do_sample=False)\n" +
        "print(out.shape[1] - ids.shape[1])",
      modelDir,
    ]);
    expect(r.status, r.stderr).toBe(0);
    expect(Number(r.stdout.trim())).toBeGreaterThan(0);

    // Resuming from the step-3 checkpoint continues with the same losses as the run itself.
    const resumed = steps(
      await collect(
        new Trainer({
          sidecar: sc,
          model: { path: "tiny-llama", device: "cpu" },
          data: { path: dataPath, cutoff: 64, evalFraction: 0.1 },
          optimizer: { name: "nanoadam", density: 0.2 },
          steps: 6,
          microBatch: 4,
          lr: 1e-2,
          resumeFrom: join(runDir, "checkpoints", "step-000003"),
          progress: false,
        }),
      ),
    );
    expect(resumed.map((s) => s.step)).toEqual([3, 4, 5]);
    expect(resumed.map((s) => s.loss)).toEqual(steps(events).slice(3).map((s) => s.loss));
  });

  it("run({ signal, checkpointOnAbort: true }) lets the step in flight finish, saves it and ends 'interrupted'; a plain signal cancels ('aborted')", async () => {
    const config = (runDir: string) => ({
      model: { path: "tiny-llama", device: "cpu" },
      data: { path: dataPath, cutoff: 64 },
      optimizer: { name: "nanoadam" as const, density: 0.2 },
      steps: 20,
      microBatch: 4,
      lr: 1e-2,
      checkpointEvery: 10,
      runDir,
      progress: false,
    });
    const abortDuringStep4 = async (runDir: string, checkpointOnAbort: boolean) => {
      const ac = new AbortController();
      let abortedAt = 0;
      const out: { ev: TrainerEvent; at: number }[] = [];
      for await (const ev of new Trainer({ sidecar: sc, ...config(runDir) }).run({ signal: ac.signal, checkpointOnAbort })) {
        out.push({ ev, at: performance.now() });
        if (ev.type === "train:step" && ev.step === 3) setTimeout(() => ((abortedAt = performance.now()), ac.abort()), 0); // step 4 is then in flight
      }
      return { events: out.map((o) => o.ev), stepAt: (k: number) => out.find((o) => o.ev.type === "train:step" && o.ev.step === k)?.at, abortedAt };
    };

    const graceful = await abortDuringStep4(join(dir, "abort-graceful"), true);
    expect(graceful.stepAt(4)).toBeGreaterThan(graceful.abortedAt); // step 4 was in flight when the abort came, and finished
    expect(steps(graceful.events).map((s) => s.step)).toEqual([0, 1, 2, 3, 4]);
    const end = graceful.events.at(-1)!;
    const path = join(dir, "abort-graceful", "checkpoints", "step-000005");
    expect(end).toMatchObject({ type: "run:end", reason: "interrupted", step: 5, checkpoint: path });
    expect(graceful.events.filter((e) => e.type === "checkpoint:saved").map((e) => e.type === "checkpoint:saved" && e.path)).toEqual([path]);
    expect(existsSync(join(path, "trainer_state.json"))).toBe(true);

    const cancelled = await abortDuringStep4(join(dir, "abort-cancel"), false);
    expect(steps(cancelled.events).map((s) => s.step)).toEqual([0, 1, 2, 3]);
    expect(cancelled.events.at(-1)).toMatchObject({ type: "run:end", reason: "aborted" });
    expect(existsSync(join(dir, "abort-cancel", "checkpoints"))).toBe(false);
  });

  it("names a config typo, a missing data file and a malformed JSONL row, and keeps the sidecar's state", async () => {
    const typo = () => parseConfig({ model: "tiny-llama", data: dataPath, steps: 3, lr: 1e-3, optimizer: { name: "nanoadam", densty: 0.1 } }, "cfg.json");
    expect(typo).toThrow(ConfigError);
    expect(typo).toThrow(/optimizer: unknown field 'densty'/);
    expect(() => parseConfig({ model: "tiny-llama", data: dataPath, steps: "3", lr: 1e-3 })).toThrow(/steps: /);

    await sc.call("load_model", { path: "tiny-llama", device: "cpu" });
    await sc.call("load_dataset", { path: dataPath, cutoff: 64 });
    await sc.call("create_optimizer", { name: "adamw", lr: 1e-3 });
    const missing = await sc.call("load_dataset", { path: join(dir, "nope.jsonl") }).catch((e) => e);
    expect(missing).toBeInstanceOf(SidecarError);
    expect(missing.code).toBe("INVALID_PARAMS");
    expect(missing.message).toContain(join(dir, "nope.jsonl"));
    const bad = join(dir, "bad.jsonl");
    writeFileSync(bad, '{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n');
    const malformed = await sc.call("load_dataset", { path: bad }).catch((e) => e);
    expect(malformed.code).toBe("INVALID_PARAMS");
    expect(malformed.message).toMatch(/bad\.jsonl:3/);
    expect(malformed.data).toMatchObject({ path: bad, line: 3 });
    const badOption = await sc.call("create_optimizer", { name: "adamw", density: 0.1 }).catch((e) => e);
    expect(badOption.message).toMatch(/'density' is a NanoAdam option/);
    // Nothing was lost: the earlier model, data and optimizer still train.
    const r = await sc.call("train_step", { lr: 1e-3, microBatch: 2 });
    expect(r.loss).toBeGreaterThan(0);
    expect(r.step).toBe(0);
  });

  it("runs `nanotune train config.json` and exits 2 naming a wrong field", async () => {
    const good = join(dir, "train.json");
    writeFileSync(good, JSON.stringify({ model: { path: "tiny-llama", device: "cpu" }, data: { path: dataPath, cutoff: 64 }, steps: 2, lr: 1e-3, microBatch: 2, progress: false }));
    const bad = join(dir, "bad.json");
    writeFileSync(bad, JSON.stringify({ model: "tiny-llama", data: dataPath, steps: 2, lr: 1e-3, evalEvry: 1 }));
    const errors: string[] = [];
    const original = console.error;
    console.error = (m: string) => errors.push(String(m));
    try {
      expect(await cli(["train", bad])).toBe(2);
      expect(await cli(["train", join(dir, "absent.json")])).toBe(2);
    } finally {
      console.error = original;
    }
    expect(errors[0]).toMatch(/unknown field 'evalEvry'/);
    expect(errors[1]).toMatch(/absent\.json does not exist/);
    process.env.NANOTUNE_CACHE = env().NANOTUNE_CACHE;
    try {
      expect(await cli(["train", good])).toBe(0);
    } finally {
      delete process.env.NANOTUNE_CACHE;
    }
    expect(existsSync(good)).toBe(true);
  });
});
