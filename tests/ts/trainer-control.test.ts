// Steering a run (Note [steering a run] in ts/train/trainer.ts): pause/resume, stop-and-save,
// the sidecar's sample_weights, and a sink's attach(control), against a real sidecar.
import { existsSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { policies, type Sidecar, type Sink, Trainer, type TrainerControl, type TrainerEvent } from "../../ts/index.ts";
import { collect, startTinyRun, steps, stopTinyRun } from "./fixtures/tiny-run.ts";

let dir: string;
let sc: Sidecar;
let dataPath: string;

beforeAll(async () => ({ dir, dataPath, sc } = await startTinyRun("nanotune-control-")));
afterAll(() => stopTinyRun({ dir, sc }));

const config = (extra: Record<string, unknown> = {}) => ({
  model: { path: "tiny-llama", device: "cpu" },
  data: { path: dataPath, cutoff: 64, seed: 1 },
  optimizer: { name: "nanoadam" as const, density: 0.1 },
  steps: 8,
  microBatch: 2,
  lr: 1e-2,
  maskPolicy: policies.smallWeights({ density: 0.1, maskInterval: 3 }),
  progress: false,
  ...extra,
});

/** The run's events as type@step, without mask:refreshed (it follows the policy's own rhythm). */
const types = (evs: TrainerEvent[]) => evs.filter((e) => e.type !== "mask:refreshed").map((e) => `${e.type}@${e.step}`);

describe("steering a run", () => {
  it("pause() before run() holds the run after run:start until resume(); sampleWeights answers meanwhile", async () => {
    const trainer = new Trainer({ sidecar: sc, ...config({ steps: 3, sinks: [] }) });
    trainer.pause();
    const samples: Awaited<ReturnType<Trainer["sampleWeights"]>>[] = [];
    const evs = await collect(trainer, async (ev) => {
      if (ev.type !== "run:paused") return;
      // Paused: no step runs while the sidecar answers (two round trips), then resume.
      samples.push(await trainer.sampleWeights({ count: 300 }));
      samples.push(await trainer.sampleWeights({ count: 300 }));
      expect(trainer.paused).toBe(true);
      trainer.resume();
    });
    expect(types(evs)).toEqual(["run:start@0", "run:paused@0", "run:resumed@0", "train:step@0", "train:step@1", "train:step@2", "run:end@3"]);
    expect(samples.map((s) => s.step)).toEqual([null, null]); // no step ran while paused
    expect(samples[0]!.weights.numel).toBe(300);
  });

  it("sampleWeights gives the last step's weights, gradients and mask membership of a tensor over the wire", async () => {
    const trainer = new Trainer({ sidecar: sc, ...config({ steps: 4, sinks: [] }) });
    const got: { at: number; s: Awaited<ReturnType<Trainer["sampleWeights"]>> }[] = [];
    await collect(trainer, async (ev) => {
      if (ev.type === "train:step") got.push({ at: ev.step, s: await trainer.sampleWeights({ count: 400 }) });
    });
    const [first, second, third] = got.map((g) => g.s);
    expect(first!.step).toBeNull(); // the watch starts with the first call
    expect(second!.step).toBe(2); // the step after train:step 1 (the counter after it)
    expect(third!.step).toBe(3);
    const s = second!;
    expect(s.tensors.find((t) => t.name === s.tensor)?.masked).toBe(true);
    expect([s.indices.dtype, s.weights.dtype, s.grads?.dtype, s.inMask?.dtype]).toEqual(["int64", "float32", "float32", "uint8"]);
    expect(Array.from(s.indices.toArray(), Number)).toEqual(Array.from(first!.indices.toArray(), Number)); // the same entries
    const inMask = s.inMask!.toArray();
    const chosen = inMask.reduce((a, b) => a + b, 0);
    expect(chosen).toBeGreaterThan(0);
    expect(chosen).toBeLessThan(400);
    const grads = s.grads!.toArray();
    expect(grads.some((g) => g !== 0)).toBe(true);
  });

  it("stop() is stop-and-save: the step in flight finishes, a checkpoint is saved, run:end 'interrupted'; also from paused", async () => {
    const runDir = join(dir, "stop");
    const trainer = new Trainer({ sidecar: sc, ...config({ runDir, evalEvery: 1, data: { path: dataPath, cutoff: 64, seed: 1, evalFraction: 0.1 }, sinks: [] }) });
    const evs = await collect(trainer, (ev) => {
      if (ev.type === "train:step" && ev.step === 2) trainer.stop();
    });
    const path = join(runDir, "checkpoints", "step-000003");
    expect(types(evs).slice(1)).toEqual(["train:step@0", "eval@1", "train:step@1", "eval@2", "train:step@2", "checkpoint:saved@3", "run:end@3"]);
    expect(evs.at(-1)).toMatchObject({ reason: "interrupted", checkpoint: path });
    expect(existsSync(join(path, "trainer_state.json"))).toBe(true);

    const paused = new Trainer({ sidecar: sc, ...config({ runDir: join(dir, "stop-paused"), sinks: [] }) });
    const evs2 = await collect(paused, (ev) => {
      if (ev.type === "train:step" && ev.step === 1) paused.pause();
      if (ev.type === "run:paused") paused.stop();
    });
    expect(types(evs2).slice(1)).toEqual(["train:step@0", "train:step@1", "run:paused@2", "checkpoint:saved@2", "run:end@2"]);
    expect(evs2.at(-1)).toMatchObject({ reason: "interrupted" });
    const notRunning = new Trainer({ sidecar: sc, ...config({ steps: 2, sinks: [] }) });
    notRunning.stop(); // no run in progress: nothing to stop, and the next run is not stopped
    expect(steps(await collect(notRunning)).map((s) => s.step)).toEqual([0, 1]);
  });

  it("a sink's attach(control) steers exactly like the Trainer's own calls; a throwing attach is one sink:error", async () => {
    let control: TrainerControl | null = null;
    const sampled: (number | null)[] = [];
    // It samples on every step from its own queue, so its calls meet the Trainer's train_step
    // in flight: the Trainer queues them (Note [one call at a time]) instead of the sidecar refusing one (BUSY).
    const steering: Sink = {
      name: "steering",
      async write(ev) {
        if (ev.type === "train:step") sampled.push((await control!.sampleWeights({ count: 50 })).step);
      },
      attach: (c) => void (control = c),
    };
    const broken: Sink = { name: "broken", write() {}, attach: () => { throw new Error("cannot attach"); } };
    const trainer = new Trainer({ sidecar: sc, ...config({ sinks: [steering, broken] }) });
    const evs = await collect(trainer, (ev) => {
      if (ev.type === "train:step" && ev.step === 4) control!.setMaskPolicy(policies.random({ density: 0.05, maskInterval: 100 }));
    });
    const swapped = evs.find((e) => e.type === "policy:swapped");
    expect(swapped).toMatchObject({ step: 5, from: "smallWeights", to: "random" });
    const refreshed = evs.filter((e) => e.type === "mask:refreshed").map((e) => e.type === "mask:refreshed" && [e.step, e.policy]);
    expect(refreshed).toEqual([[0, "smallWeights"], [3, "smallWeights"], [5, "random"]]);
    expect(evs.filter((e) => e.type === "sink:error")).toEqual([{ type: "sink:error", sink: "broken", message: "cannot attach", step: 0 }]);
    expect(sampled.length).toBe(8);
    expect(sampled.filter((s) => s !== null).length).toBeGreaterThan(0);
  });
});
