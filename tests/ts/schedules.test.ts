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
