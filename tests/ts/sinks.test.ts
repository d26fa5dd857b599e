// Sinks against a real Trainer and sidecar (tiny Llama): buffered sinks that neither
// block nor kill training, and sinks.tensorboard read back by TensorBoard's own reader.
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { policies, Sidecar, type Sink, sinks, Trainer, type TrainerEvent } from "../../ts/index.ts";
// @ts-expect-error plain ESM helper without types
import { pythonExecutable, repoRoot } from "../../ts/dev/python.mjs";
import { expectedScalars } from "./fixtures/scalars.ts";
import { cacheEnv, startTinyRun, stopTinyRun, sinkRunConfig } from "./fixtures/tiny-run.ts";
import { runProcess } from "./fixtures/run.ts";

let dir: string;
let sc: Sidecar;
let dataPath: string;
const env = () => cacheEnv(dir);

beforeAll(async () => ({ dir, dataPath, sc } = await startTinyRun("nanotune-sinks-")));
afterAll(() => stopTinyRun({ dir, sc }));

const config = (extra: Record<string, unknown> = {}) => sinkRunConfig(dataPath, extra);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Records every event it has finished writing; `delayMs` per event, `failAt` (1-based) throws on that event. */
function recorder(name: string, opts: { delayMs?: number; failAt?: number; closeFails?: boolean } = {}) {
  const done: TrainerEvent[] = [];
  let calls = 0;
  let closed = false;
  const sink: Sink = {
    name,
    async write(ev) {
      calls++;
      if (opts.failAt === calls) throw new Error(`${name} broke on event ${calls}\nsecond line`);
      if (opts.delayMs) await sleep(opts.delayMs);
      done.push(ev);
    },
    async close() {
      closed = true;
      if (opts.closeFails) throw new Error(`${name} could not close`);
    },
  };
  return { sink, done, calls: () => calls, closed: () => closed };
}

describe("buffered sinks", () => {
  it("a sink that takes 200 ms per event does not slow the steps, and still gets every event in order", async () => {
    const timeSteps = async (extra: Sink[]) => {
      const yielded: TrainerEvent[] = [];
      let t0 = 0;
      let stepsS = 0;
      let lagAtLastStep = -1;
      for await (const ev of new Trainer({ sidecar: sc, ...config({ evalEvery: 0 }), sinks: extra }).run()) {
        yielded.push(ev);
        if (ev.type === "run:start") t0 = performance.now();
        if (ev.type === "train:step" && ev.step === 5) {
          stepsS = (performance.now() - t0) / 1000;
          lagAtLastStep = yielded.length - (extra.length ? slow.done.length : yielded.length);
        }
      }
      return { yielded, stepsS, lagAtLastStep };
    };
    const slow = recorder("slow", { delayMs: 200 });
    const base = await timeSteps([]);
    const withSlow = await timeSteps([slow.sink]);
    console.log(`steps 1-5: ${base.stepsS.toFixed(3)} s without the slow sink, ${withSlow.stepsS.toFixed(3)} s with it; it was ${withSlow.lagAtLastStep} events behind at the last step`);
    // Had the Trainer awaited it, every event would have been written when it came out of the
    // iterator; instead the steps finished before it drained (it was still behind at the last step),
    // and the steps did not pay its 200 ms per event (the run:start..last step span would have
    // grown by 200 ms for each of those events; allow half of that for a busy machine).
    expect(withSlow.lagAtLastStep).toBeGreaterThanOrEqual(1);
    const eventsInSpan = withSlow.yielded.findIndex((e) => e.type === "train:step" && e.step === 5);
    expect(withSlow.stepsS).toBeLessThan(base.stepsS + 0.5 * 0.2 * eventsInSpan);
    // By the end of run() it has every event, in order.
    expect(slow.done).toEqual(withSlow.yielded);
    expect(slow.closed()).toBe(true);
    expect(withSlow.yielded.filter((e) => e.type === "train:step")).toHaveLength(6);
  });

  it("a sink that throws at its 3rd event yields one sink:error; training completes; the other sinks see it", async () => {
    const thrower = recorder("thrower", { failAt: 3 });
    const closer = recorder("closer", { closeFails: true });
    const other = recorder("other");
    const lines: string[] = [];
    const events: TrainerEvent[] = [];
    for await (const ev of new Trainer({ sidecar: sc, ...config(), sinks: [thrower.sink, closer.sink, other.sink, sinks.console({ print: (l) => lines.push(l) })] }).run()) {
      events.push(ev);
    }
    const errors = events.filter((e): e is Extract<TrainerEvent, { type: "sink:error" }> => e.type === "sink:error");
    expect(errors.filter((e) => e.sink === "thrower")).toEqual([{ type: "sink:error", sink: "thrower", message: "thrower broke on event 3", step: events.filter((e) => e.type !== "sink:error")[2]!.step }]);
    expect(errors.filter((e) => e.sink === "closer")).toEqual([{ type: "sink:error", sink: "closer", message: "closer could not close", step: 6 }]);
    expect(errors).toHaveLength(2);
    expect(events.at(-1)).toMatchObject({ type: "run:end", reason: "completed", step: 6 });
    expect(events.filter((e) => e.type === "train:step").map((e) => e.step)).toEqual([0, 1, 2, 3, 4, 5]);
    // the failed sink got nothing after its failure; it was still closed
    expect(thrower.calls()).toBe(3);
    expect(thrower.done).toEqual(events.filter((e) => e.type !== "sink:error").slice(0, 2));
    // the others saw every event and the thrower's sink:error (the closer's comes after it closed, for "other" before)
    const notErrors = (evs: TrainerEvent[]) => evs.filter((e) => e.type !== "sink:error");
    expect(notErrors(other.done)).toEqual(notErrors(events));
    expect(other.done.filter((e) => e.type === "sink:error").map((e) => e.type === "sink:error" && e.sink)).toEqual(["thrower", "closer"]);
    expect(closer.done.filter((e) => e.type === "sink:error")).toEqual([errors[0]]);
    expect(lines.filter((l) => l.includes("sink thrower failed"))).toHaveLength(1);
    expect(lines.filter((l) => l.includes("sink closer failed"))).toHaveLength(1);
  });
});

describe("sinks.tensorboard", () => {
  it("writes event files that TensorBoard's EventAccumulator reads back exactly", async () => {
    const logdir = join(dir, "tb");
    const trainer = new Trainer({ sidecar: sc, ...config(), sinks: [sinks.tensorboard(logdir)] });
    const events: TrainerEvent[] = [];
    for await (const ev of trainer.run()) {
      events.push(ev);
      if (ev.type === "train:step" && ev.step === 3) trainer.setMaskPolicy(policies.largeWeights({ density: 0.05, maskInterval: 1000 }));
    }
    const files = readdirSync(logdir);
    expect(files).toHaveLength(1);
    expect(files[0]).toMatch(/^events\.out\.tfevents\.\d+\..+\.\d+\.nanotune$/);

    const script = `
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
ea = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
ea.Reload()
tags = ea.Tags()
out = {"scalars": {t: [[e.step, e.value] for e in ea.Scalars(t)] for t in tags["scalars"]}, "text": {}}
for t in tags["tensors"]:
    out["text"][t] = [[e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()] for e in ea.Tensors(t)]
out["plugins"] = {t: m.plugin_data.plugin_name for t, m in ea.summary_metadata.items()}
print(json.dumps(out))
`;
    const r = await runProcess(pythonExecutable(), ["-c", script, logdir], { cwd: repoRoot, env: { ...process.env, ...env() } });
    expect(r.status, r.stderr).toBe(0);
    const read = JSON.parse(r.stdout) as { scalars: Record<string, [number, number][]>; text: Record<string, [number, string][]>; plugins: Record<string, string> };

    // What the Trainer's events said, as float32.
    const want = expectedScalars(events, Math.fround);
    expect(Object.keys(want).sort()).toEqual(
      ["train/loss", "train/lr", "train/density", "train/grad_norm", "train/tokens_per_s", "eval/loss", "eval/perplexity", "mask/refreshed", "policy/swapped"].sort(),
    );
    expect(want["eval/loss"]!.map(([s]) => s)).toEqual([3, 6]);
    expect(want["policy/swapped"]).toEqual([[4, 1]]);
    expect(want["train/loss"]).toHaveLength(6);
    expect(read.scalars).toEqual(want);

    const start = events[0] as Extract<TrainerEvent, { type: "run:start" }>;
    expect(read.plugins.config).toBe("text");
    expect(read.text.config).toHaveLength(1);
    expect(read.text.config![0]![0]).toBe(0);
    expect(JSON.parse(read.text.config![0]![1])).toEqual(start.config);
    expect(start.config).toMatchObject({ steps: 6, evalEvery: 3, optimizer: { name: "nanoadam", density: 0.1 } });
  });
});
