// Mask policies: which entries NanoAdam updates, decided in TypeScript.
// The Trainer asks the active policy before every step whether the mask
// refreshes and at which criterion and densities; the sidecar does the
// selection (chunked bottom-k on the device). Users implement MaskPolicy to
// build their own; the four built-ins are the paper's rule and its ablations.
// A built-in carries its description as JSON (`toJSON()`, its PolicySpec), which
// config.json and checkpoints record; a custom policy is known by its `name`.
import { NanotuneError } from "../errors.ts";
import { type ScheduleLike, type ScheduleSpec, scheduleSpec, toSchedule } from "./schedules.ts";

/** Which entries a refresh selects: the paper's rule, then its ablations. */
export type Criterion = "small_weights" | "large_weights" | "random" | "large_grads";

/** What a refresh applies, sent to the sidecar with the step. */
export interface MaskDecision {
  criterion: Criterion;
  /** Density of every tensor not matched by `perTensor`, in (0, 1]. */
  density: number;
  /** Regular expression on tensor names -> density in [0, 1]; first match wins; 0 freezes. */
  perTensor?: Record<string, number>;
  /** Only tensors matching one of these patterns train (others are frozen). */
  include?: string[];
  /** Tensors matching one of these patterns are frozen. */
  exclude?: string[];
}

export interface RefreshContext {
  /** Steps since this policy became active (0 on its first step). */
  sinceActivation: number;
  /** The decision the current mask was made with (null before the first refresh). */
  lastDecision: MaskDecision | null;
}

/** The built-in policies' names (PolicySpec's `type`). */
export type BuiltinPolicyName = "smallWeights" | "largeWeights" | "random" | "largeGrads";

/**
 * A mask policy as JSON: what a built-in's `toJSON()` returns (a JSON config's
 * `maskPolicy`), or `{type: "custom", name}` for a policy known only by its name.
 */
export type PolicySpec =
  | {
      type: BuiltinPolicyName;
      density: ScheduleSpec;
      maskInterval?: number;
      perTensor?: Record<string, ScheduleSpec>;
      include?: string[];
      exclude?: string[];
    }
  | { type: "custom"; name: string };

export interface MaskPolicy {
  /** Its name in events and checkpoints; a checkpoint of a custom policy is resumed by a policy of the same name. */
  readonly name: string;
  /** The mask to apply if it refreshes before `step`. */
  decide(step: number, totalSteps: number): MaskDecision;
  /** Whether the mask refreshes before `step` (the Trainer always refreshes on a policy's first step). */
  shouldRefresh(step: number, totalSteps: number, ctx: RefreshContext): boolean;
  /** Its description as JSON (the built-ins have one); without it the policy is recorded as `{type: "custom", name}`. */
  toJSON?(): PolicySpec;
}

/** The JSON description of a policy: its `toJSON()`, else `{type: "custom", name}`. */
export function policySpec(p: MaskPolicy): PolicySpec {
  return typeof p.toJSON === "function" ? p.toJSON() : { type: "custom", name: p.name };
}

export interface BuiltinPolicyOptions {
  /** Fraction of each tensor updated: a number or a schedule (e.g. schedules.linear(0.1, 0.04, {every: 409})). */
  density: ScheduleLike;
  /** Refresh every this many steps (the paper's m); a density change also refreshes. Default 100. */
  maskInterval?: number;
  /** Per-tensor densities by name pattern (first match wins; 0 freezes). */
  perTensor?: Record<string, ScheduleLike>;
  include?: string[];
  exclude?: string[];
}

function builtin(name: BuiltinPolicyName, criterion: Criterion) {
  return (opts: BuiltinPolicyOptions): MaskPolicy => {
    const density = toSchedule(opts.density);
    const maskInterval = opts.maskInterval ?? 100;
    if (!Number.isInteger(maskInterval) || maskInterval < 1) {
      throw new NanotuneError("INVALID_ARGUMENT", `policies.${name}: maskInterval must be an integer >= 1, got ${maskInterval}`);
    }
    const perTensor = Object.entries(opts.perTensor ?? {}).map(([p, s]) => [p, toSchedule(s)] as const);
    const decide = (step: number, total: number): MaskDecision => {
      const k = density(step, total);
      if (!(k > 0 && k <= 1)) throw new NanotuneError("INVALID_ARGUMENT", `policies.${name}: density at step ${step} is ${k}; must be in (0, 1]`);
      const d: MaskDecision = { criterion, density: k };
      if (perTensor.length) d.perTensor = Object.fromEntries(perTensor.map(([p, s]) => [p, s(step, total)]));
      if (opts.include) d.include = [...opts.include];
      if (opts.exclude) d.exclude = [...opts.exclude];
      return d;
    };
    const spec: PolicySpec = { type: name, density: scheduleSpec(opts.density), maskInterval };
    if (opts.perTensor) spec.perTensor = Object.fromEntries(Object.entries(opts.perTensor).map(([p, v]) => [p, scheduleSpec(v)]));
    if (opts.include) spec.include = [...opts.include];
    if (opts.exclude) spec.exclude = [...opts.exclude];
    return {
      name,
      decide,
      toJSON: () => spec,
      // Algorithm 1: every m steps, or when the density (any tensor's) changed.
      shouldRefresh: (step, total, ctx) =>
        ctx.sinceActivation % maskInterval === 0 ||
        JSON.stringify(ctx.lastDecision) !== JSON.stringify(decide(step, total)),
    };
  };
}

export const policies = {
  /** The paper's rule: the smallest-|w| entries of each tensor. */
  smallWeights: builtin("smallWeights", "small_weights"),
  /** Ablation: the largest-|w| entries. */
  largeWeights: builtin("largeWeights", "large_weights"),
  /** Ablation: uniformly random entries (seeded in the sidecar). */
  random: builtin("random", "random"),
  /** Ablation: the entries with the largest |gradient| at the refresh step. */
  largeGrads: builtin("largeGrads", "large_grads"),
} as const;
