import { describe, expect, it } from "vitest";
import { policies } from "../../ts/train/policies.ts";
import { schedules } from "../../ts/train/schedules.ts";

describe("schedules", () => {
  it("linear decays every `every` steps like NanoAdam's density schedule", () => {
    const s = schedules.linear(0.1, 0.04, { every: 5 });
    const T = 20;
    for (let t = 0; t < 25; t++) {
      const expected = 0.1 + (0.04 - 0.1) * Math.min(1, (Math.floor(t / 5) * 5) / T);
      expect(s(t, T)).toBeCloseTo(expected, 12);
    }
    expect(s(4, T)).toBe(0.1);
    expect(s(5, T)).toBeCloseTo(0.085, 12);
  });

  it("cosine warms up, peaks, and ends at min", () => {
    const s = schedules.cosine({ peak: 1e-3, min: 1e-4, warmupSteps: 10 });
    expect(s(0, 110)).toBeCloseTo(1e-4, 12);
    expect(s(9, 110)).toBeCloseTo(1e-3, 12);
    expect(s(10, 110)).toBeCloseTo(1e-3, 12);
    expect(s(60, 110)).toBeCloseTo(5.5e-4, 12);
    expect(s(110, 110)).toBeCloseTo(1e-4, 12);
  });

  it("warmup and constant compose", () => {
    const s = schedules.warmup(4, schedules.constant(2));
    expect([0, 1, 2, 3, 4, 9].map((t) => s(t, 10))).toEqual([0.5, 1, 1.5, 2, 2, 2]);
  });

  it("rejects bad arguments naming them", () => {
    expect(() => schedules.linear(0.1, 0.01, { every: 0 })).toThrow(/every/);
    expect(() => schedules.cosine({ peak: Number.NaN })).toThrow(/peak/);
    expect(() => schedules.warmup(0, 1)).toThrow(/steps/);
  });
});

describe("policies", () => {
  it("refresh every maskInterval steps from activation, and when the density changes", () => {
    const p = policies.smallWeights({ density: schedules.linear(0.1, 0.04, { every: 7 }), maskInterval: 5 });
    const T = 21;
    let last = null as ReturnType<typeof p.decide> | null;
    const refreshed: number[] = [];
    for (let t = 0; t < T; t++) {
      if (p.shouldRefresh(t, T, { sinceActivation: t, lastDecision: last })) {
        refreshed.push(t);
        last = p.decide(t, T);
      }
    }
    expect(refreshed).toEqual([0, 5, 7, 10, 14, 15, 20]);
    expect(p.decide(0, T)).toEqual({ criterion: "small_weights", density: 0.1 });
  });

  it("carry criterion, per-tensor densities and patterns into the decision", () => {
    const p = policies.largeGrads({ density: 0.05, perTensor: { "mlp\\.": 0.2 }, exclude: ["embed"] });
    expect(p.decide(3, 10)).toEqual({
      criterion: "large_grads",
      density: 0.05,
      perTensor: { "mlp\\.": 0.2 },
      exclude: ["embed"],
    });
    expect(() => policies.random({ density: 0 }).decide(0, 10)).toThrow(/density at step 0 is 0/);
    expect(() => policies.random({ density: 0.1, maskInterval: 0 })).toThrow(/maskInterval/);
  });
});

describe("schedules and policies as JSON (what config.json and checkpoints record)", () => {
  it("every built-in schedule carries its spec, and the spec rebuilds the same schedule", async () => {
    const { scheduleFromJSON, ScheduleJSON } = await import("../../ts/train/config.ts");
    const built = [
      schedules.constant(2e-3),
      schedules.linear(0.1, 0.04, { every: 5 }),
      schedules.linear(1, 0, { steps: 7 }),
      schedules.cosine({ peak: 1e-2, min: 1e-3, warmupSteps: 3 }),
      schedules.warmup(4, schedules.cosine({ peak: 1e-2 })),
      schedules.warmup(2, 0.5),
    ];
    for (const s of built) {
      const spec = JSON.parse(JSON.stringify(s));
      expect(ScheduleJSON.safeParse(spec).success, JSON.stringify(spec)).toBe(true);
      const again = scheduleFromJSON(spec);
      for (const t of [0, 1, 3, 5, 9, 20]) expect(again(t, 20)).toBe(s(t, 20));
      expect(JSON.parse(JSON.stringify(again))).toEqual(spec);
    }
    expect(JSON.parse(JSON.stringify(schedules.warmup(4, schedules.constant(2))))).toEqual({ type: "warmup", steps: 4, then: { type: "constant", value: 2 } });
  });

  it("a custom schedule is recorded by name, never as <function>", () => {
    const spike = schedules.fn((t) => (t === 3 ? 1e10 : 1e-2), "spike");
    expect(spike(3, 10)).toBe(1e10);
    expect(JSON.stringify(spike)).toBe('{"type":"custom","name":"spike"}');
    function named() {
      return 1;
    }
    expect(JSON.parse(JSON.stringify(schedules.fn(named)))).toEqual({ type: "custom", name: "named" });
    expect(JSON.parse(JSON.stringify(schedules.warmup(2, spike)))).toEqual({ type: "warmup", steps: 2, then: { type: "custom", name: "spike" } });
  });

  it("built-in policies carry their spec; a JSON policy round-trips", async () => {
    const { PolicyJSON, policyFromJSON } = await import("../../ts/train/config.ts");
    const p = policies.largeGrads({ density: schedules.linear(0.1, 0.05, { every: 3 }), maskInterval: 7, perTensor: { "mlp\\.": 0.2 }, exclude: ["embed"] });
    const spec = JSON.parse(JSON.stringify(p));
    expect(spec).toEqual({ type: "largeGrads", density: { type: "linear", from: 0.1, to: 0.05, every: 3 }, maskInterval: 7, perTensor: { "mlp\\.": 0.2 }, exclude: ["embed"] });
    const again = policyFromJSON(PolicyJSON.parse(spec));
    expect(JSON.parse(JSON.stringify(again))).toEqual(spec);
    for (const t of [0, 3, 6, 9]) expect(again.decide(t, 10)).toEqual(p.decide(t, 10));
    expect(JSON.parse(JSON.stringify(policies.smallWeights({ density: 0.1 })))).toEqual({ type: "smallWeights", density: 0.1, maskInterval: 100 });
  });
});
