// The training loop, in TypeScript: the Trainer decides the lr of every step,
// when the mask refreshes and with which policy; the sidecar does each step.
// A recipe as torchtune writes one: setup (load model, data, optimizer, maybe
// resume), train (steps, eval, checkpoints), save, cleanup. The Trainer never
// prints: it yields events and hands each to its sinks (ts/sinks/).
import { mkdirSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { ConfigError, NanotuneError } from "../errors.ts";
import type { Sidecar } from "../sidecar.ts";
import { type Sink, sinks as builtinSinks } from "../sinks/index.ts";
import { parseConfig, type ResolvedTrainerConfig, toPolicy, toScheduleOption, type TrainerOptions } from "./config.ts";
import type { TrainerEvent } from "./events.ts";
import type { MaskDecision, MaskPolicy } from "./policies.ts";
import type { Schedule } from "./schedules.ts";

export type { TrainerEvent };

export interface TrainerInit extends TrainerOptions {
  sidecar: Sidecar;
  /** Where events go besides the iterator; default `sinks.defaults(config)` (progress bar on a TTY, runDir/metrics.jsonl). */
  sinks?: Sink[];
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
  private readonly sinks: Sink[];

  constructor({ sidecar, sinks, ...options }: TrainerInit) {
    this.sidecar = sidecar;
    this.config = parseConfig(options, "Trainer options");
    this.sinks = sinks ?? builtinSinks.defaults(this.config);
    this.lr = toScheduleOption(this.config.lr);
    this.policy = this.config.optimizer.name === "nanoadam" ? toPolicy(this.config.maskPolicy, this.config.optimizer.density ?? 0.01) : null;
    if (this.config.optimizer.name === "adamw" && this.config.maskPolicy !== undefined) {
      throw new ConfigError("Trainer options", [{ path: "maskPolicy", message: "needs optimizer.name 'nanoadam' (AdamW updates every entry)" }]);
    }
  }

  /** The active mask policy (null with AdamW). */
  get maskPolicy(): MaskPolicy | null {
    return this.pendingPolicy ?? this.policy;
  }

  /** Swaps the mask policy; it takes effect at the next step, which refreshes the mask with it. */
  setMaskPolicy(policy: MaskPolicy): void {
    if (this.policy === null) throw new NanotuneError("INVALID_ARGUMENT", "setMaskPolicy: the optimizer is adamw; mask policies need nanoadam");
    this.pendingPolicy = policy;
  }

  /** Runs setup and the loop; yields typed events and simply ends (aborted or completed). */
  async *run(options: { signal?: AbortSignal } = {}): AsyncGenerator<TrainerEvent, void, undefined> {
    if (this.running) throw new NanotuneError("BUSY", "Trainer.run: this trainer is already running; await the first run's end");
    this.running = true;
    const { signal } = options;
    const cfg = this.config;
    const started = performance.now();
    this.writeConfig();
    let step = 0;
    let lastLoss: number | null = null;
    const emit = async (ev: TrainerEvent): Promise<TrainerEvent> => {
      for (const sink of this.sinks) await sink.write(ev);
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
        this.lastDecision = resumed.extra.mask ?? null;
      }
      yield await emit({ type: "run:start", step, totalSteps: cfg.steps, model, data, optimizer });

      for (; step < cfg.steps; step++) {
        if (signal?.aborted) break;
        const mask = this.decideMask(step);
        const lr = this.lr(step, cfg.steps);
        const r = await this.sidecar.call("train_step", { lr, microBatch: cfg.microBatch, gradAccum: cfg.gradAccum, gradClip: cfg.gradClip ?? undefined, mask }, call);
        lastLoss = r.loss;
        if (mask) this.lastDecision = mask;
        yield await emit({ type: "train:step", ...r, policy: this.policy?.name ?? null, mask: mask ?? null, tokensPerS: r.inputTokens / Math.max(r.timeS, 1e-9) });
        if (r.maskRefreshed && mask && this.policy) yield await emit({ type: "mask:refreshed", step, policy: this.policy.name, decision: mask });
        const done = step + 1;
        if (cfg.evalEvery > 0 && (done % cfg.evalEvery === 0 || done === cfg.steps)) {
          yield await emit({ type: "eval", ...(await this.sidecar.call("evaluate", {}, call)) });
        }
        if (cfg.runDir && ((cfg.checkpointEvery > 0 && done % cfg.checkpointEvery === 0) || done === cfg.steps)) {
          const path = join(resolve(cfg.runDir), "checkpoints", `step-${String(done).padStart(6, "0")}`);
          const policy = this.policy ? { name: this.policy.name, activatedAt: this.activatedAt } : null;
          const saved = await this.sidecar.call("save_checkpoint", { path, extra: { config: jsonConfig(cfg), policy } }, call);
          yield await emit({ type: "checkpoint:saved", step: done, path: saved.path, timeS: saved.timeS });
        }
      }
      yield await emit({ type: "run:end", step, reason: step >= cfg.steps ? "completed" : "aborted", timeS: (performance.now() - started) / 1000, lastLoss });
    } catch (e) {
      if (signal?.aborted && (e as { code?: string }).code === "CANCELLED") {
        yield await emit({ type: "run:end", step, reason: "aborted", timeS: (performance.now() - started) / 1000, lastLoss });
        return;
      }
      throw e;
    } finally {
      this.running = false;
      for (const sink of this.sinks) await sink.close?.();
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

  /** runDir/config.json: the resolved config, the run's record. */
  private writeConfig(): void {
    const dir = this.config.runDir;
    if (!dir) return;
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, "config.json"), `${JSON.stringify(jsonConfig(this.config), null, 2)}\n`);
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
