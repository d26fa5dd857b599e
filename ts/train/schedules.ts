// Schedules for the learning rate and the mask density. A schedule is a plain
// function of the optimizer step (0-based) and the run's total steps, so users
// can pass their own (`schedules.fn`) and the Trainer can evaluate it anywhere.
//
// Every schedule made here carries its description as JSON (`toJSON()`, its
// ScheduleSpec), so a run's config.json and checkpoints record what ran:
// `schedules.cosine({peak: 1e-2})` is `{type: "cosine", peak: 0.01}`, and a
// custom one is known by its name, `schedules.fn(f, "spike")` -> `{type: "custom", name: "spike"}`.
import { NanotuneError } from "../errors.ts";

/** Maps an optimizer step (0-based) and the run's total steps to a value. */
export type Schedule = ((step: number, totalSteps: number) => number) & { toJSON?(): ScheduleSpec };
/** A number means a constant schedule. */
export type ScheduleLike = number | Schedule;

/**
 * A schedule as JSON: what `toJSON()` of a built-in returns, and what a JSON config
 * may say (all but "custom", which names a function only a script can supply).
 */
export type ScheduleSpec =
  | number
  | { type: "constant"; value: number }
  | { type: "linear"; from: number; to: number; steps?: number; every?: number }
  | { type: "cosine"; peak: number; min?: number; warmupSteps?: number; steps?: number }
  | { type: "warmup"; steps: number; then: ScheduleSpec }
  | { type: "custom"; name: string };

export function toSchedule(s: ScheduleLike): Schedule {
  return typeof s === "number" ? withSpec(() => s, s) : s;
}

/** The JSON description of a schedule: its `toJSON()`, a number as itself, else `{type: "custom", name}` (the function's name). */
export function scheduleSpec(s: ScheduleLike): ScheduleSpec {
  if (typeof s === "number") return s;
  if (typeof s.toJSON === "function") return s.toJSON();
  return { type: "custom", name: s.name || "anonymous" };
}

function check(name: string, ok: boolean, what: string): void {
  if (!ok) throw new NanotuneError("INVALID_ARGUMENT", `schedules.${name}: ${what}`);
}

function withSpec(f: (step: number, totalSteps: number) => number, spec: ScheduleSpec): Schedule {
  return Object.assign(f, { toJSON: () => spec });
}

/** Drops the undefined fields, so a spec equals its JSON round trip. */
function defined<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}

export const schedules = {
  /** Always `value`. */
  constant(value: number): Schedule {
    check("constant", Number.isFinite(value), `value must be a finite number, got ${value}`);
    return withSpec(() => value, { type: "constant", value });
  },

  /**
   * Linear from `from` to `to` over `steps` steps (default: the whole run), held
   * for `every` steps between changes (the paper's density interval d; default 1).
   * `schedules.linear(0.1, 0.04, { every: 409 })` is the paper's density decay:
   * k(t) = k0 + (kf - k0) * min(1, floor(t / d) * d / T), as NanoAdam computes it alone.
   */
  linear(from: number, to: number, opts: { steps?: number; every?: number } = {}): Schedule {
    const every = opts.every ?? 1;
    check("linear", Number.isFinite(from) && Number.isFinite(to), "from and to must be finite numbers");
    check("linear", Number.isInteger(every) && every >= 1, `every must be an integer >= 1, got ${every}`);
    check("linear", opts.steps === undefined || opts.steps >= 1, `steps must be >= 1, got ${opts.steps}`);
    return withSpec(
      (t, total) => {
        const span = opts.steps ?? total;
        const held = Math.floor(t / every) * every;
        return from + (to - from) * Math.min(1, held / span);
      },
      defined({ type: "linear" as const, from, to, steps: opts.steps, every: opts.every }),
    );
  },

  /**
   * Cosine decay from `peak` to `min` (default 0) over `steps` (default: the whole
   * run), after `warmupSteps` (default 0) of linear warm-up from peak / warmupSteps.
   */
  cosine(opts: { peak: number; min?: number; warmupSteps?: number; steps?: number }): Schedule {
    const { peak, min = 0, warmupSteps = 0 } = opts;
    check("cosine", Number.isFinite(peak) && Number.isFinite(min), "peak and min must be finite numbers");
    check("cosine", Number.isInteger(warmupSteps) && warmupSteps >= 0, `warmupSteps must be an integer >= 0`);
    return withSpec(
      (t, total) => {
        if (t < warmupSteps) return (peak * (t + 1)) / warmupSteps;
        const span = Math.max(1, (opts.steps ?? total) - warmupSteps);
        const progress = Math.min(1, (t - warmupSteps) / span);
        return min + 0.5 * (peak - min) * (1 + Math.cos(Math.PI * progress));
      },
      defined({ type: "cosine" as const, peak, min: opts.min, warmupSteps: opts.warmupSteps, steps: opts.steps }),
    );
  },

  /** Linear warm-up over `steps` steps (from then(steps)/steps up), then `then`. */
  warmup(steps: number, then: ScheduleLike): Schedule {
    check("warmup", Number.isInteger(steps) && steps >= 1, `steps must be an integer >= 1, got ${steps}`);
    const inner = toSchedule(then);
    return withSpec((t, total) => (t < steps ? (inner(steps, total) * (t + 1)) / steps : inner(t, total)), {
      type: "warmup",
      steps,
      then: scheduleSpec(then),
    });
  },

  /**
   * Any function of the step and the total steps. `name` (default: the function's
   * name) is how config.json and checkpoints record it: `{type: "custom", name}`.
   */
  fn(f: (step: number, totalSteps: number) => number, name?: string): Schedule {
    check("fn", typeof f === "function", "expects a function of (step, totalSteps)");
    const spec: ScheduleSpec = { type: "custom", name: name ?? (f.name || "anonymous") };
    return withSpec((t, total) => f(t, total), spec);
  },
} as const;
