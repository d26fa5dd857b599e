// The Trainer's options as data: one zod schema validates both `new Trainer({...})`
// (schedules and policies may be functions there) and `nanotune train config.json`
// (where they are described as JSON). An unknown or wrong field is an error that
// names its path, e.g. `optimizer.densty: unknown field`.
import { z } from "zod";
import { methods } from "../../protocol/schema.ts";
import { DistributedConfig } from "../distributed.ts";
import { ConfigError } from "../errors.ts";
import { type MaskPolicy, policies } from "./policies.ts";
import { type Schedule, type ScheduleLike, type ScheduleSpec, schedules } from "./schedules.ts";

type P<M extends keyof typeof methods> = (typeof methods)[M]["params"];

/** load_model's params: a local HF directory or a preset name, and how to load it. */
export const ModelConfig = z.union([z.string().min(1), (methods.load_model.params as P<"load_model">)]);
/** load_dataset's params (a bare string is the path). */
export const DataConfig = z.union([z.string().min(1), (methods.load_dataset.params as P<"load_dataset">).omit({ generation: true })]);
/** create_optimizer's params (NanoAdam's own interval/schedule options are for Python-only use). */
export const OptimizerConfig = (methods.create_optimizer.params as P<"create_optimizer">).omit({
  maskInterval: true,
  densityInterval: true,
  finalDensity: true,
  totalSteps: true,
  generation: true,
});

// ---- schedules and policies as JSON ---------------------------------------------

const num = z.number().refine(Number.isFinite, "must be a finite number");
/** A schedule as JSON (a built-in's ScheduleSpec; "custom" names a function only a script can supply). */
export type ScheduleJSON =
  | Exclude<ScheduleSpec, { type: "custom" } | { type: "warmup" }>
  | { type: "warmup"; steps: number; then: ScheduleJSON };
export const ScheduleJSON: z.ZodType<ScheduleJSON> = z.union([
  num,
  z.strictObject({ type: z.literal("constant"), value: num }),
  z.strictObject({ type: z.literal("linear"), from: num, to: num, steps: z.number().int().min(1).optional(), every: z.number().int().min(1).optional() }),
  z.strictObject({ type: z.literal("cosine"), peak: num, min: num.optional(), warmupSteps: z.number().int().min(0).optional(), steps: z.number().int().min(1).optional() }),
  z.strictObject({ type: z.literal("warmup"), steps: z.number().int().min(1), then: z.lazy(() => ScheduleJSON) }),
]);

export function scheduleFromJSON(s: ScheduleJSON): Schedule {
  if (typeof s === "number") return schedules.constant(s);
  switch (s.type) {
    case "constant":
      return schedules.constant(s.value);
    case "linear":
      return schedules.linear(s.from, s.to, { steps: s.steps, every: s.every });
    case "cosine":
      return schedules.cosine(s);
    case "warmup":
      return schedules.warmup(s.steps, typeof s.then === "number" ? s.then : scheduleFromJSON(s.then));
  }
}

const policyNames = ["smallWeights", "largeWeights", "random", "largeGrads"] as const;
export const PolicyJSON = z.strictObject({
  type: z.enum(policyNames),
  density: ScheduleJSON,
  maskInterval: z.number().int().min(1).optional(),
  perTensor: z.record(z.string(), ScheduleJSON).optional(),
  include: z.array(z.string()).optional(),
  exclude: z.array(z.string()).optional(),
});
export type PolicyJSON = z.infer<typeof PolicyJSON>;
/** The policy names a JSON config may use (PolicyJSON's `type`). */
export const builtinPolicyNames: readonly string[] = policyNames;

export function policyFromJSON(p: PolicyJSON): MaskPolicy {
  const sched = (v: ScheduleJSON) => (typeof v === "number" ? v : scheduleFromJSON(v)); // a number stays a number in the policy's spec
  const perTensor = p.perTensor && Object.fromEntries(Object.entries(p.perTensor).map(([k, v]) => [k, sched(v)]));
  return policies[p.type]({ ...p, density: sched(p.density), perTensor });
}

const isFn = (v: unknown): v is (...a: never[]) => unknown => typeof v === "function";
const ScheduleOption = z.union([ScheduleJSON, z.custom<Schedule>(isFn, "expected a number, a schedule object or a function")]);
const PolicyOption = z.union([
  PolicyJSON,
  z.custom<MaskPolicy>(
    (v) => typeof v === "object" && v !== null && isFn((v as MaskPolicy).decide) && isFn((v as MaskPolicy).shouldRefresh),
    "expected a policy object ({type, density, ...}) or a MaskPolicy",
  ),
]);

/** Everything a run needs; defaults in one place. */
export const TrainerConfig = z.strictObject({
  model: ModelConfig,
  data: DataConfig,
  optimizer: OptimizerConfig.default({ name: "nanoadam" }),
  /** Optimizer steps to run. */
  steps: z.number().int().min(1),
  /** Examples per micro-batch (default 1). */
  microBatch: z.number().int().min(1).default(1),
  /** Micro-batches per optimizer step (default 1). */
  gradAccum: z.number().int().min(1).default(1),
  /** Learning rate: a number, a schedule object or a Schedule function. */
  lr: ScheduleOption,
  /** Max global gradient norm (null: no clipping). */
  gradClip: z.number().positive().nullable().default(null),
  /** NanoAdam's mask policy (default: smallWeights at the optimizer's density, maskInterval 100). */
  maskPolicy: PolicyOption.optional(),
  /** Evaluate on the held-out set every this many steps (0: never; needs data.evalFraction or evalPath). */
  evalEvery: z.number().int().min(0).default(0),
  /** Save a checkpoint every this many steps (0: never; the last step is saved when runDir is set). */
  checkpointEvery: z.number().int().min(0).default(0),
  /** Directory for config.json, metrics.jsonl and checkpoints/ (null: write nothing). */
  runDir: z.string().nullable().default(null),
  /**
   * Resume from this checkpoint directory: its weights, optimizer state, data position
   * and step win, and so do its active mask policy and the step that policy became
   * active (a live swap survives a resume); this config wins for everything else
   * (lr schedule, steps, eval and checkpoint cadence). Without it, a runDir that
   * already holds files is an error unless `overwrite` is set.
   */
  resumeFrom: z.string().nullable().default(null),
  /** Start afresh in a runDir that already holds a run: its config.json, metrics.jsonl and checkpoints/ are deleted first (other files stay). */
  overwrite: z.boolean().default(false),
  /**
   * What a step the sidecar refuses because its loss or gradient norm is not finite
   * (NON_FINITE; weights, moments, mask and step stay as they were) does: "stop"
   * (default) ends the run with run:end reason "non-finite"; "skip" yields
   * step:skipped and tries the same step index again with the next batch, up to
   * `maxSkips` refused steps in a row.
   */
  onNonFinite: z.enum(["stop", "skip"]).default("stop"),
  /** With onNonFinite "skip": how many refused steps in a row are skipped; the next one ends the run (reason "non-finite"). Default 3. */
  maxSkips: z.number().int().min(0).default(3),
  /** Progress bar on stderr (default: when stderr is a TTY). */
  progress: z.boolean().optional(),
  /**
   * A sidecar group (docs/distributed.md): what `nanotune train` passes to
   * Sidecar.start({ distributed }); a Trainer given a sidecar checks that its group has
   * nprocPerNode x nnodes ranks. microBatch is per rank. `model.parallel` picks ddp
   * (default) or fsdp.
   */
  distributed: DistributedConfig.optional(),
});
export type TrainerOptions = z.input<typeof TrainerConfig>;
export type ResolvedTrainerConfig = z.output<typeof TrainerConfig>;

export { ConfigError };

/** Parses options or a JSON config; throws a ConfigError naming every wrong field. */
export function parseConfig(input: unknown, source = "options"): ResolvedTrainerConfig {
  const r = TrainerConfig.safeParse(input);
  if (!r.success) throw new ConfigError(source, r.error);
  return r.data;
}

export function toScheduleOption(s: ResolvedTrainerConfig["lr"]): Schedule {
  return typeof s === "function" ? s : scheduleFromJSON(s as ScheduleJSON);
}

export function toPolicy(p: ResolvedTrainerConfig["maskPolicy"], defaultDensity: ScheduleLike): MaskPolicy {
  if (p === undefined) return policies.smallWeights({ density: defaultDensity });
  return "decide" in p ? (p as MaskPolicy) : policyFromJSON(p as PolicyJSON);
}
