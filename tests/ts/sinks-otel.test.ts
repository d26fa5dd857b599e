// sinks.otel against a real Trainer and sidecar (tiny Llama) and the real OpenTelemetry SDK:
// what a MetricReader collects equals what the run's events said, and a PrometheusExporter
// built as in the README serves it on /metrics.
import { join } from "node:path";
import { PrometheusExporter } from "@opentelemetry/exporter-prometheus";
import { DataPointType, MeterProvider, MetricReader, type MetricData } from "@opentelemetry/sdk-metrics";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ConfigError, policies, schedules, type Sidecar, sinks, Trainer, type TrainerEvent } from "../../ts/index.ts";
import { freePort } from "./fixtures/servers.ts";
import { collect, startTinyRun, steps, stopTinyRun, sinkRunConfig } from "./fixtures/tiny-run.ts";

let dir: string;
let sc: Sidecar;
let dataPath: string;

beforeAll(async () => ({ dir, dataPath, sc } = await startTinyRun("nanotune-otel-")));
afterAll(() => stopTinyRun({ dir, sc }));

const config = (extra: Record<string, unknown> = {}) => sinkRunConfig(dataPath, extra);

/** A reader collected from explicitly: nothing depends on a timer. */
class Reader extends MetricReader {
  protected override async onShutdown() {}
  protected override async onForceFlush() {}
}

type Attrs = Record<string, unknown>;
type StartEvent = Extract<TrainerEvent, { type: "run:start" }>;

/** Sums `value(ev)` per key(ev) over the events of one type. */
function tally<T extends TrainerEvent["type"]>(evs: TrainerEvent[], type: T, key: (ev: Extract<TrainerEvent, { type: T }>) => string, value: (ev: Extract<TrainerEvent, { type: T }>) => number = () => 1) {
  const out: Record<string, number> = {};
  for (const ev of evs) if (ev.type === type) out[key(ev as Extract<TrainerEvent, { type: T }>)] = (out[key(ev as Extract<TrainerEvent, { type: T }>)] ?? 0) + value(ev as Extract<TrainerEvent, { type: T }>);
  return out;
}

describe("sinks.otel", () => {
  it("records the run's gauges, counters and step-time histogram with the run's attributes and the active policy", async () => {
    const reader = new Reader();
    const provider = new MeterProvider({ readers: [reader] });
    const meter = provider.getMeter("nanotune-test");
    const trainer = new Trainer({
      sidecar: sc,
      ...config({ runDir: join(dir, "otel-run"), checkpointEvery: 3 }),
      sinks: [sinks.otel({ meter, attributes: { run: "otel-a" } }), sinks.otel({ meter, prefix: "ft", attributes: { run: "otel-b", seed: 1 } })],
    });
    const events = await collect(trainer, (ev) => {
      if (ev.type === "train:step" && ev.step === 3) trainer.setMaskPolicy(policies.largeWeights({ density: 0.05, maskInterval: 1000 }));
    });
    const { resourceMetrics, errors } = await reader.collect();
    await provider.shutdown();
    expect(errors).toEqual([]);

    // The run did what the assertions below rely on.
    const start = events[0] as StartEvent;
    const stepEvs = steps(events);
    const swap = events.find((e) => e.type === "policy:swapped") as Extract<TrainerEvent, { type: "policy:swapped" }>;
    const evals = events.filter((e) => e.type === "eval");
    expect(events.at(-1)).toMatchObject({ type: "run:end", reason: "completed" });
    expect(stepEvs).toHaveLength(6);
    expect(swap).toMatchObject({ step: 4, from: "smallWeights", to: "largeWeights" });
    expect(evals.map((e) => e.step)).toEqual([3, 6]);
    const refreshed = tally(events, "mask:refreshed", (e) => e.policy);
    expect(Object.keys(refreshed).sort()).toEqual(["largeWeights", "smallWeights"]);
    const saved = events.filter((e) => e.type === "checkpoint:saved").length;
    expect(saved).toBeGreaterThanOrEqual(2);
    expect(start.optimizer.name).toBe("nanoadam");

    expect(resourceMetrics.scopeMetrics.map((s) => s.scope.name)).toEqual(["nanotune-test"]);
    const metrics = resourceMetrics.scopeMetrics[0]!.metrics;
    const metric = (name: string): MetricData => {
      const m = metrics.find((x) => x.descriptor.name === name);
      if (!m) throw new Error(`no metric ${name} in ${metrics.map((x) => x.descriptor.name).join(", ")}`);
      return m;
    };
    /** The data points of `name`, keyed by "run/policy"; each must carry exactly the expected attributes. */
    const points = (name: string, run = "otel-a") => {
      const m = metric(name);
      const out: Record<string, unknown> = {};
      for (const p of m.dataPoints) {
        const a = p.attributes as Attrs;
        if (a.run !== run) continue;
        expect(a).toEqual({ run, ...(run === "otel-b" ? { seed: 1 } : {}), "nanotune.optimizer": "nanoadam", "nanotune.policy": a["nanotune.policy"] });
        out[String(a["nanotune.policy"])] = p.value;
      }
      return out;
    };

    // Gauges: the last value of each policy (cumulative temporality keeps the swapped-out one).
    const last = stepEvs.at(-1)!;
    const lastSmall = stepEvs.filter((e) => e.policy === "smallWeights").at(-1)!;
    expect(last.policy).toBe("largeWeights");
    expect(lastSmall.step).toBe(3);
    const gauges: [string, (e: (typeof stepEvs)[number]) => number | null][] = [
      ["train.loss", (e) => e.loss],
      ["train.lr", (e) => e.lr],
      ["train.density", (e) => e.density],
      ["train.grad_norm", (e) => e.gradNorm],
      ["train.tokens_per_second", (e) => e.tokensPerS],
      ["train.step", (e) => e.step],
    ];
    for (const [name, of] of gauges) {
      expect(metric(`nanotune.${name}`).dataPointType, name).toBe(DataPointType.GAUGE);
      expect(points(`nanotune.${name}`), name).toEqual({ largeWeights: of(last), smallWeights: of(lastSmall) });
      expect(points(`ft.${name}`, "otel-b"), name).toEqual({ largeWeights: of(last), smallWeights: of(lastSmall) });
    }
    expect(last.density).toBe(0.05);
    expect(points("nanotune.train.loss").largeWeights).toBe(last.loss);
    const lastEval = evals.at(-1) as Extract<TrainerEvent, { type: "eval" }>;
    const firstEval = evals[0] as Extract<TrainerEvent, { type: "eval" }>;
    expect(points("nanotune.eval.loss")).toEqual({ largeWeights: lastEval.loss, smallWeights: firstEval.loss });
    expect(points("nanotune.eval.perplexity")).toEqual({ largeWeights: lastEval.perplexity, smallWeights: firstEval.perplexity });

    // Counters: what the events add up to, per policy.
    for (const name of ["train.steps", "train.tokens", "mask.refreshes", "policy.swaps", "checkpoints"]) {
      expect(metric(`nanotune.${name}`), name).toMatchObject({ dataPointType: DataPointType.SUM, isMonotonic: true });
    }
    expect(points("nanotune.train.steps")).toEqual({ smallWeights: 4, largeWeights: 2 });
    expect(points("nanotune.train.tokens")).toEqual(tally(events, "train:step", (e) => e.policy!, (e) => e.inputTokens));
    expect(points("nanotune.train.target_tokens")).toEqual(tally(events, "train:step", (e) => e.policy!, (e) => e.tokens));
    expect(points("nanotune.mask.refreshes")).toEqual(refreshed);
    expect(points("nanotune.policy.swaps")).toEqual({ largeWeights: 1 });
    const ckpts = points("nanotune.checkpoints") as Record<string, number>;
    expect(Object.values(ckpts).reduce((a, b) => a + b, 0)).toBe(saved);
    expect(metrics.find((m) => m.descriptor.name === "nanotune.train.skipped_steps")).toBeUndefined(); // nothing skipped, nothing recorded

    // The step-time histogram: seconds, one observation per step, buckets for seconds.
    const hist = metric("nanotune.train.step_duration");
    expect(hist.descriptor.unit).toBe("s");
    expect(hist.dataPointType).toBe(DataPointType.HISTOGRAM);
    for (const p of hist.dataPoints.filter((x) => (x.attributes as Attrs).run === "otel-a")) {
      const policy = (p.attributes as Attrs)["nanotune.policy"];
      const mine = stepEvs.filter((e) => e.policy === policy);
      const h = p.value as { count: number; sum: number; buckets: { boundaries: number[]; counts: number[] } };
      expect(h.count).toBe(mine.length);
      expect(h.sum).toBeCloseTo(mine.reduce((a, e) => a + e.timeS, 0), 9);
      expect(h.buckets.boundaries).toEqual([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100]);
    }
    expect(hist.dataPoints.filter((x) => (x.attributes as Attrs).run === "otel-a")).toHaveLength(2);

    // Units as documented.
    expect(metric("nanotune.train.loss").descriptor.unit).toBe("");
    expect(metric("nanotune.train.tokens").descriptor.unit).toBe("{token}");
    expect(metric("nanotune.train.tokens_per_second").descriptor.unit).toBe("{token}/s");
    expect(metric("nanotune.train.steps").descriptor.unit).toBe("{step}");
  });

  it("rejects a prefix that is no instrument name, and a meter without createGauge (API < 1.9)", () => {
    const meter = new MeterProvider().getMeter("x");
    expect(() => sinks.otel({ meter, prefix: "9lives" })).toThrow(ConfigError);
    expect(() => sinks.otel({ meter, prefix: "a b" })).toThrow(/prefix: 'a b' is not an OpenTelemetry instrument name/);
    const before19 = { createCounter: meter.createCounter.bind(meter), createHistogram: meter.createHistogram.bind(meter) }; // no createGauge
    expect(() => sinks.otel({ meter: before19 as never })).toThrow(/meter: expected an @opentelemetry\/api Meter with createGauge \(API >= 1\.9\)/);
    expect(sinks.otel({ meter, prefix: "my-app.ft" }).name).toBe("otel");
  });
});

// ---- Prometheus, as the README shows it ----------------------------------------------

/** A PrometheusExporter whose server is listening (its constructor's callback), retried if the port was taken meanwhile. */
async function startExporter(): Promise<{ exporter: PrometheusExporter; port: number }> {
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    let exporter!: PrometheusExporter;
    const error = await new Promise<Error | void>((resolve) => (exporter = new PrometheusExporter({ host: "127.0.0.1", port }, resolve)));
    if (!error) return { exporter, port };
    if (attempt === 5) throw error;
  }
}

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** The samples of a Prometheus text exposition (comments skipped). */
function parseExposition(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$/.exec(line);
    if (!m) throw new Error(`not an exposition line: ${line}`);
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]!] = l[2]!.replace(/\\(.)/g, (_, c: string) => (c === "n" ? "\n" : c));
    const v = m[3]!;
    out.push({ name: m[1]!, labels, value: v === "+Inf" ? Infinity : v === "-Inf" ? -Infinity : Number(v) });
  }
  return out;
}

describe("sinks.otel with a PrometheusExporter", () => {
  it("GET /metrics after a run shows nanotune_train_loss at the last step's loss and the step and skip counters", async () => {
    const { exporter, port } = await startExporter();
    // The README's construction (there with { port: 9464 }).
    const provider = new MeterProvider({ readers: [exporter] });
    const meter = provider.getMeter("nanotune");
    try {
      // lr 1e10 at step 2: non-finite steps are skipped (twice), then the run stops.
      const spike = schedules.fn((t) => (t === 2 ? 1e10 : 1e-2), "spike");
      const trainer = new Trainer({ sidecar: sc, ...config({ steps: 5, evalEvery: 0, lr: spike, onNonFinite: "skip", maxSkips: 2 }), sinks: [sinks.otel({ meter, attributes: { run: "prom" } })] });
      const events = await collect(trainer);
      const stepEvs = steps(events);
      const skips = events.filter((e) => e.type === "step:skipped");
      expect(stepEvs.length).toBeGreaterThanOrEqual(2);
      expect(skips).toHaveLength(2);
      expect(events.at(-1)).toMatchObject({ type: "run:end", reason: "non-finite" });

      const res = await fetch(`http://127.0.0.1:${port}/metrics`);
      expect(res.status).toBe(200);
      const text = await res.text();
      const samples = parseExposition(text);
      const one = (name: string) => {
        const found = samples.filter((s) => s.name === name);
        expect(found, `${name} in\n${text}`).toHaveLength(1);
        expect(found[0]!.labels).toMatchObject({ run: "prom", nanotune_optimizer: "nanoadam", nanotune_policy: "smallWeights", otel_scope_name: "nanotune" });
        return found[0]!.value;
      };
      expect(text).toContain("# TYPE nanotune_train_loss gauge");
      expect(one("nanotune_train_loss")).toBe(stepEvs.at(-1)!.loss);
      expect(one("nanotune_train_step")).toBe(stepEvs.at(-1)!.step);
      expect(text).toContain("# TYPE nanotune_train_steps_total counter");
      expect(one("nanotune_train_steps_total")).toBe(stepEvs.length);
      expect(one("nanotune_train_skipped_steps_total")).toBe(skips.length);
      expect(one("nanotune_train_tokens_total")).toBe(stepEvs.reduce((a, e) => a + e.inputTokens, 0));
      expect(one("nanotune_train_step_duration_count")).toBe(stepEvs.length);
      expect(samples.filter((s) => s.name === "nanotune_train_step_duration_bucket" && s.labels.le === "+Inf").map((s) => s.value)).toEqual([stepEvs.length]);
    } finally {
      await provider.shutdown(); // stops the exporter's server
    }
  });
});
