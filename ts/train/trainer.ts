// The training loop, in TypeScript: the Trainer decides the lr of every step,
// when the mask refreshes and with which policy; the sidecar does each step.
// A recipe as torchtune writes one: setup (load model, data, optimizer, maybe
// resume), train (steps, eval, checkpoints), save, cleanup.
import { appendFileSync, mkdirSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import type { Result, Sidecar } from "../sidecar.ts";
import { parseConfig, type ResolvedTrainerConfig, toPolicy, toScheduleOption, type TrainerOptions } from "./config.ts";
import type { MaskDecision, MaskPolicy } from "./policies.ts";
import { ProgressBar } from "./progress.ts";
import type { Schedule } from "./schedules.ts";

/** What `trainer.run()` yields, in order: run:start, then per step train:step (and mask:refreshed, eval, checkpoint:saved), then run:end. */
export type TrainerEvent =
  | { type: "run:start"; step: number; model: Result<"load_model">; data: Result<"load_dataset">; optimizer: Result<"create_optimizer"> }
  | ({ type: "train:step"; policy: string | null; tokensPerS: number } & Result<"train_step">)
  | { type: "mask:refreshed"; step: number; policy: string; decision: MaskDecision }
  | ({ type: "eval" } & Result<"evaluate">)
  | { type: "checkpoint:saved"; step: number; path: string; timeS: number }
  | { type: "run:end"; step: number; reason: "completed" | "aborted"; timeS: number; lastLoss: number | null };

export interface TrainerInit extends TrainerOptions {
  sidecar: Sidecar;
}

export class Trainer {
  readonly config: ResolvedTrainerConfig;
  readonly sidecar: Sidecar;
  private readonly lr: Schedule;
  private policy: MaskPolicy | null;
  private activatedAt = 0;
  private pendingPolicy: MaskPolicy | null = null;
  private lastDecision: MaskDecision | null = null;
  private running = false;

  constructor({ sidecar, ...options }: TrainerInit) {
    this.sidecar = sidecar;
    this.config = parseConfig(options, "Trainer options");
    this.lr = toScheduleOption(this.config.lr);
    this.policy = this.config.optimizer.name === "nanoadam" ? toPolicy(this.config.maskPolicy, this.config.optimizer.density ?? 0.01) : null;
    if (this.config.optimizer.name === "adamw" && this.config.maskPolicy !== undefined) {
      throw new Error("Trainer options: maskPolicy needs optimizer.name 'nanoadam' (AdamW updates every entry)");
    }
  }

  /** The active mask policy (null with AdamW). */
  get maskPolicy(): MaskPolicy | null {
    return this.pendingPolicy ?? this.policy;
  }

  /** Swaps the mask policy; it takes effect at the next step, which refreshes the mask with it. */
  setMaskPolicy(policy: MaskPolicy): void {
    if (this.policy === null) throw new Error("setMaskPolicy: the optimizer is adamw; mask policies need nanoadam");
    this.pendingPolicy = policy;
  }

  /** Runs setup and the loop; yields typed events and simply ends (aborted or completed). */
  async *run(options: { signal?: AbortSignal } = {}): AsyncGenerator<TrainerEvent, void, undefined> {
    if (this.running) throw new Error("Trainer.run: this trainer is already running");
    this.running = true;
    const { signal } = options;
    const cfg = this.config;
    const started = performance.now();
    const log = this.openLog();
    const bar = new ProgressBar(cfg.steps, cfg.progress ?? Boolean(process.stderr.isTTY));
    let step = 0;
    let lastLoss: number | null = null;
    const emit = (ev: TrainerEvent): TrainerEvent => {
      log?.(ev);
      bar.update(ev);
      return ev;
    };
    try {
      const call = { signal };
      const model = await this.sidecar.call("load_model", typeof cfg.model === "string" ? { path: cfg.model } : cfg.model, call);
      const data = await this.sidecar.call("load_dataset", typeof cfg.data === "string" ? { path: cfg.data } : cfg.data, call);
      const { name, ...optOpts } = cfg.optimizer;
      // NanoAdam without maskInterval refreshes only when told: this loop decides.
      const optimizer = await this.sidecar.call("create_optimizer", { name, ...optOpts }, call);
      if (cfg.resumeFrom) {
        const resumed = await this.sidecar.call("load_checkpoint", { path: resolve(cfg.resumeFrom) }, call);
        step = resumed.step;
        const mask = (resumed.extra as { mask?: MaskDecision | null }).mask;
        this.lastDecision = mask ?? null;
      }
      yield emit({ type: "run:start", step, model, data, optimizer });

      for (; step < cfg.steps; step++) {
        if (signal?.aborted) break;
        const mask = this.decideMask(step);
        const lr = this.lr(step, cfg.steps);
        const r = await this.sidecar.call("train_step", { lr, microBatch: cfg.microBatch, gradAccum: cfg.gradAccum, gradClip: cfg.gradClip ?? undefined, mask }, call);
        lastLoss = r.loss;
        if (mask) this.lastDecision = mask;
        yield emit({ type: "train:step", ...r, policy: this.policy?.name ?? null, tokensPerS: r.inputTokens / Math.max(r.timeS, 1e-9) });
        if (r.maskRefreshed && mask && this.policy) yield emit({ type: "mask:refreshed", step, policy: this.policy.name, decision: mask });
        const done = step + 1;
        if (cfg.evalEvery > 0 && (done % cfg.evalEvery === 0 || done === cfg.steps)) {
          yield emit({ type: "eval", ...(await this.sidecar.call("evaluate", {}, call)) });
        }
        if (cfg.runDir && ((cfg.checkpointEvery > 0 && done % cfg.checkpointEvery === 0) || done === cfg.steps)) {
          const path = join(resolve(cfg.runDir), "checkpoints", `step-${String(done).padStart(6, "0")}`);
          const saved = await this.sidecar.call("save_checkpoint", { path, extra: { config: jsonConfig(cfg) } }, call);
          yield emit({ type: "checkpoint:saved", step: done, path: saved.path, timeS: saved.timeS });
        }
      }
      yield emit({ type: "run:end", step, reason: step >= cfg.steps ? "completed" : "aborted", timeS: (performance.now() - started) / 1000, lastLoss });
    } catch (e) {
      if (signal?.aborted && (e as { code?: string }).code === "CANCELLED") {
        yield emit({ type: "run:end", step, reason: "aborted", timeS: (performance.now() - started) / 1000, lastLoss });
        return;
      }
      throw e;
    } finally {
      bar.done();
      this.running = false;
    }
  }

  /** The mask decision to send with `step`, or undefined when the mask stays. */
  private decideMask(step: number): MaskDecision | undefined {
    if (this.pendingPolicy) {
      this.policy = this.pendingPolicy;
      this.pendingPolicy = null;
      this.activatedAt = step;
      return this.policy.decide(step, this.config.steps); // a swap always refreshes
    }
    if (!this.policy) return undefined;
    const ctx = { sinceActivation: step - this.activatedAt, lastDecision: this.lastDecision };
    if (this.lastDecision === null || this.policy.shouldRefresh(step, this.config.steps, ctx)) {
      return this.policy.decide(step, this.config.steps);
    }
    return undefined;
  }

  private openLog(): ((ev: TrainerEvent) => void) | null {
    const dir = this.config.runDir;
    if (!dir) return null;
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, "config.json"), `${JSON.stringify(jsonConfig(this.config), null, 2)}\n`);
    const metrics = join(dir, "metrics.jsonl");
    return (ev) => appendFileSync(metrics, `${JSON.stringify({ time: new Date().toISOString(), ...ev })}\n`);
  }
}

/** The resolved config as JSON (functions are written as "<function>"). */
function jsonConfig(cfg: ResolvedTrainerConfig): Record<string, unknown> {
  return JSON.parse(
    JSON.stringify(cfg, (_k, v) => {
      if (typeof v === "function") return "<function>";
      if (v && typeof v === "object" && typeof v.decide === "function") return { policy: v.name };
      return v;
    }),
  );
}
