// The training loop, in TypeScript: the Trainer decides the lr of every step,
// when the mask refreshes and with which policy; the sidecar does each step.
// A recipe as torchtune writes one: setup (load model, data, optimizer, maybe
// resume), train (steps, eval, checkpoints), save, cleanup. The Trainer never
// prints: it yields events and hands each to its sinks (ts/sinks/).
//
// Note [one run per sidecar]: a run owns its sidecar's session. load_model and
// create_optimizer return a session generation; every later call of the run
// carries the latest one, so a call made after anything else loaded a model or
// created an optimizer on that sidecar fails with SESSION_CHANGED (the run ends
// with that error) instead of training someone else's model. A second Trainer
// whose run() starts while another Trainer runs on the same Sidecar fails at once
// with BUSY, before it sends anything.
//
// Note [step index]: the Trainer follows the sidecar's step counter. A step the
// sidecar refuses as non-finite (NON_FINITE) leaves its step, weights, moments and
// mask as they were, so with onNonFinite "skip" the Trainer tries the same step
// index again, with the same lr (schedules index by step) and the same mask
// decision; the sidecar feeds it the next batch (the refused batch is consumed).
// A policy swap is committed only once a step with it was accepted.
//
// Note [steering a run]: setMaskPolicy, pause/resume and stop act between steps,
// never inside one: a swap takes effect at the next step (policy:swapped names it),
// pause holds the loop before the next step starts (run:paused, then run:resumed with
// the same step), and stop ends the run as an abort with checkpointOnAbort does (the
// step in flight finishes, a checkpoint is saved with a runDir, run:end "interrupted").
// A sink that steers (the dashboard) gets the same calls through attach(control), so a
// click and a line of code have the same effect. pause() before run() starts the run
// paused (after run:start); stop() applies to the run in progress only.
//
// Note [generating from a run]: generate() asks the run's model (during a run, queued
// between steps like sampleWeights; after it, the trained model) with the prompt
// format it was trained on: a string prompt is the instruction of the run's training
// template by default (instruction rows: the template load_dataset rendered them
// with, alpaca unless data.template says otherwise; chat rows: "chat", one user turn
// through the tokenizer's chat template; text rows: "raw"), so the model sees the ids
// of its training prompts (the sidecar tokenizes both alike). With onToken the call
// streams: the sidecar sends each new piece of text as a generate:token event carrying
// the call's request id, and only this call's pieces reach onToken, in order, all of
// them before generate() resolves (events come before the reply on the socket); they
// concatenate to the result's text.
import { mkdirSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { ConfigError, NanotuneError } from "../errors.ts";
import type { CallOptions, Params, Result, Sidecar } from "../sidecar.ts";
import type { MethodName } from "../../protocol/schema.ts";
import { SinkSet } from "../sinks/buffer.ts";
import { type Sink, sinks as builtinSinks } from "../sinks/index.ts";
import type { SampleWeightsOptions, TrainerControl, WeightSample } from "../sinks/sink.ts";
import type { Tensor } from "../tensor.ts";
import { parseConfig, PolicyJSON, policyFromJSON, type ResolvedTrainerConfig, toPolicy, toScheduleOption, type TrainerOptions } from "./config.ts";
import type { NonFiniteStep, PolicyState, RunEndReason, TrainerEvent } from "./events.ts";
import { type MaskDecision, type MaskPolicy, policySpec } from "./policies.ts";
import { prepareRunDir } from "./rundir.ts";
import type { Schedule } from "./schedules.ts";
import type { Template } from "../templates.ts";

export type { TrainerEvent };

export interface TrainerInit extends TrainerOptions {
  sidecar: Sidecar;
  /** Where events go besides the iterator; default `sinks.defaults(config)` (progress bar on a TTY, runDir/metrics.jsonl). */
  sinks?: Sink[];
}

export interface RunOptions {
  /** Aborting stops the run (see checkpointOnAbort). */
  signal?: AbortSignal;
  /**
   * On abort: false (default) cancels the call in flight and ends with run:end reason
   * "aborted"; true lets the step in flight finish (nothing is cancelled once steps
   * run), skips the eval that would follow, saves a checkpoint of that step when there
   * is a runDir, and ends with reason "interrupted" (what `nanotune train` does on
   * SIGINT/SIGTERM).
   */
  checkpointOnAbort?: boolean;
}

/** trainer.generate's options (Note [generating from a run]). */
export interface GenerateOptions {
  /**
   * How a string prompt becomes the model's prompt: "alpaca", "chat" (the tokenizer's
   * chat template), "raw" (as it is) or a format string with {instruction} and
   * {input} (see ts/templates.ts). Default: the run's training template (`trainer.template`).
   * Chat messages always go through the chat template.
   */
  template?: Template;
  /** The template's {input} (default ""). */
  input?: string;
  /** At most this many new tokens (default 64). */
  maxNewTokens?: number;
  /** 0 (default): greedy; > 0 samples. */
  temperature?: number;
  /** Nucleus sampling's p (default 1). */
  topP?: number;
  /** The sampling seed (default 0); training's RNG is not touched either way. */
  seed?: number;
  /** Generation ends at the first of these strings to appear; the text is cut before it. */
  stop?: string[];
  /** Streams: each new piece of text, in order (index from 0); the pieces concatenate to the result's text. */
  onToken?: (text: string, index: number) => void;
  /** Aborting cancels the generation (CANCELLED). */
  signal?: AbortSignal;
  timeoutMs?: number;
}

/** What trainer.generate returns. */
export interface Generation {
  /** The new text: special tokens removed, cut before a stop string. */
  text: string;
  /** New tokens generated (a final eos included). */
  tokens: number;
  /** "eos": the model ended it; "stop": a stop string; "length": maxNewTokens reached. */
  finishReason: "length" | "eos" | "stop";
  /** The prompt as the template rendered it. */
  prompt: string;
}

/** The Trainer running on each Sidecar (Note [one run per sidecar]). */
const owners = new WeakMap<Sidecar, Trainer>();

export class Trainer {
  readonly config: ResolvedTrainerConfig;
  readonly sidecar: Sidecar;
  private readonly lr: Schedule;
  /** The config's policy: where every run starts (a resumed run then restores the checkpoint's). */
  private readonly initialPolicy: MaskPolicy | null;
  private policy: MaskPolicy | null;
  private activatedAt = 0;
  private pendingPolicy: MaskPolicy | null = null;
  private lastDecision: MaskDecision | null = null;
  private running = false;
  private readonly sinks: Sink[];
  private pauseRequested = false;
  private stopRequested = false;
  /** Wakes a loop waiting while paused (resume, stop). */
  private wake: (() => void) | null = null;
  /** The session generation of the run in progress: every call of the run carries it, and so does sampleWeights (Note [one run per sidecar]). */
  private generation: number | undefined;
  /** The tail of this Trainer's sidecar calls (Note [one call at a time]). */
  private lastCall: Promise<unknown> = Promise.resolve();
  /** What load_dataset said about the run's data (its format and template): generate's default template. */
  private data: Result<"load_dataset"> | null = null;

  constructor({ sidecar, sinks, ...options }: TrainerInit) {
    this.sidecar = sidecar;
    this.config = parseConfig(options, "Trainer options");
    this.sinks = sinks ?? builtinSinks.defaults(this.config);
    this.lr = toScheduleOption(this.config.lr);
    this.initialPolicy = this.config.optimizer.name === "nanoadam" ? toPolicy(this.config.maskPolicy, this.config.optimizer.density ?? 0.01) : null;
    this.policy = this.initialPolicy;
    if (this.config.optimizer.name !== "nanoadam" && this.config.maskPolicy !== undefined) {
      throw new ConfigError("Trainer options", [{ path: "maskPolicy", message: `needs optimizer.name 'nanoadam' (${this.config.optimizer.name} has no mask)` }]);
    }
    // `distributed` is how the sidecar was to be started (`nanotune train` does it): a
    // sidecar of another size would train with another global batch than the config says.
    const d = this.config.distributed;
    const group = sidecar.info?.distributed ?? null;
    if (d && (group?.worldSize ?? 1) !== d.nprocPerNode * (d.nnodes ?? 1)) {
      throw new ConfigError("Trainer options", [
        {
          path: "distributed",
          message: `asks for ${d.nprocPerNode * (d.nnodes ?? 1)} ranks (nprocPerNode ${d.nprocPerNode} x nnodes ${d.nnodes ?? 1}) but the sidecar ${group ? `is a group of ${group.worldSize}` : "is one process"}; start it with Sidecar.start({ distributed })`,
        },
      ]);
    }
  }

  /** The active mask policy (null with AdamW). */
  get maskPolicy(): MaskPolicy | null {
    return this.pendingPolicy ?? this.policy;
  }

  /** Swaps the mask policy; it takes effect at the next step, which refreshes the mask with it (event policy:swapped). */
  setMaskPolicy(policy: MaskPolicy): void {
    if (this.initialPolicy === null) throw new NanotuneError("INVALID_ARGUMENT", `setMaskPolicy: the optimizer is ${this.config.optimizer.name}; mask policies need nanoadam`);
    this.pendingPolicy = policy;
  }

  /** Holds the run before its next step (event run:paused) until resume(); before run(), the run starts paused. */
  pause(): void {
    this.pauseRequested = true;
  }

  /** Lets a paused run go on (event run:resumed). */
  resume(): void {
    this.pauseRequested = false;
    this.wake?.();
  }

  /** Whether the run is paused or will pause before its next step. */
  get paused(): boolean {
    return this.pauseRequested;
  }

  /**
   * Stop-and-save: ends the run in progress as an abort with checkpointOnAbort does:
   * the step in flight finishes, a checkpoint is saved (with a runDir), run:end reason
   * "interrupted". Also wakes a paused run. No effect when no run is in progress.
   */
  stop(): void {
    if (!this.running) return;
    this.stopRequested = true;
    this.wake?.();
  }

  /**
   * |w| and |grad| of one tensor at the last step, at a fixed sample of its entries
   * (the sidecar's sample_weights; the dashboard's scatter). Queued behind the step in
   * flight when called during a run. The first call for a tensor has no gradients yet
   * (step null): the sidecar starts watching it and the next step fills them.
   */
  async sampleWeights(options: SampleWeightsOptions = {}): Promise<WeightSample> {
    const r = await this.call("sample_weights", { generation: this.generation, tensor: options.tensor, count: options.count });
    return { ...r, indices: r.indices as Tensor<"int64">, weights: r.weights as Tensor<"float32">, grads: r.grads as Tensor<"float32"> | null, inMask: r.inMask as Tensor<"uint8"> | null };
  }

  /**
   * The template generate() uses by default: the one the run's prompts were rendered
   * with (Note [generating from a run]). Before the data is loaded, what the config says.
   */
  get template(): Template {
    if (this.data) return this.data.template ?? (this.data.format === "instruction" ? "alpaca" : this.data.format === "chat" ? "chat" : "raw");
    const d = this.config.data;
    const format = typeof d === "string" ? "auto" : (d.format ?? "auto");
    if (typeof d !== "string" && d.template && format !== "text" && format !== "chat") return d.template;
    return ["instruction", "alpaca", "commonsense"].includes(format) ? "alpaca" : format === "chat" ? "chat" : "raw";
  }

  /**
   * The run's model continues `prompt` (Note [generating from a run]): a string is the
   * instruction of `options.template` (default: the run's training template,
   * `trainer.template`), chat messages go through the tokenizer's chat template.
   * Greedy unless `temperature` > 0. Works during a run (queued between steps) and
   * after it; before run() has loaded the model it throws INVALID_ARGUMENT.
   */
  async generate(prompt: Params<"generate">["prompt"], options: GenerateOptions = {}): Promise<Generation> {
    if (this.generation === undefined) {
      throw new NanotuneError("INVALID_ARGUMENT", "Trainer.generate: this trainer has no model yet; generate works once run() has loaded it, during the run and after it");
    }
    const { template, input, maxNewTokens, temperature, topP, seed, stop, onToken, signal, timeoutMs } = options;
    const params: Params<"generate"> = {
      generation: this.generation,
      prompt,
      // chat messages take no template (the sidecar refuses one other than "chat")
      template: typeof prompt === "string" ? (template ?? this.template) : template,
      input,
      maxNewTokens,
      temperature,
      topP,
      seed,
      stop,
      stream: onToken ? true : undefined,
    };
    const result = (r: Result<"generate">): Generation => ({ text: r.text, tokens: r.tokens ?? 0, finishReason: r.finishReason ?? "length", prompt: r.prompt ?? "" });
    if (!onToken) return result(await this.call("generate", params, { signal, timeoutMs }));
    const events = this.sidecar.events(); // subscribed before the call is sent: no piece is missed
    let id: number | null = null;
    let failed: { error: unknown } | null = null;
    const pump = (async () => {
      for await (const ev of events) if (ev.event === "generate:token" && ev.data.id === id) onToken(ev.data.text, ev.data.index);
    })().catch((error: unknown) => void (failed = { error })); // onToken threw: no more calls to it; generate rejects with its error
    let r: Result<"generate">;
    try {
      r = await this.call("generate", params, { signal, timeoutMs, onRequestId: (i) => (id = i) });
    } finally {
      // Every piece of this call arrived before its reply; the pump delivers those still buffered, then ends.
      await events.return?.();
      await pump;
    }
    if (failed) throw (failed as { error: unknown }).error;
    return result(r);
  }

  /** What a sink's attach() receives: this Trainer's own steering calls (Note [steering a run]). */
  private control(): TrainerControl {
    const self = this;
    return {
      setMaskPolicy: (policy) => self.setMaskPolicy(policy),
      pause: () => self.pause(),
      resume: () => self.resume(),
      get paused() {
        return self.paused;
      },
      stop: () => self.stop(),
      sampleWeights: (options) => self.sampleWeights(options),
    };
  }

  /**
   * Runs setup and the loop; yields typed events and ends with run:end (completed,
   * interrupted, aborted or non-finite). Errors reject the iterator: a sidecar that
   * died (SIDECAR_CRASHED), another client taking the sidecar over (SESSION_CHANGED),
   * a second run on the same sidecar (BUSY, at once), a used runDir (INVALID_CONFIG, at once).
   */
  async *run(options: RunOptions = {}): AsyncGenerator<TrainerEvent, void, undefined> {
    if (this.running) throw new NanotuneError("BUSY", "Trainer.run: this trainer is already running; await the first run's end");
    const owner = owners.get(this.sidecar);
    if (owner !== undefined && owner !== this) {
      throw new NanotuneError("BUSY", `Trainer.run: another Trainer is running on this sidecar (pid ${this.sidecar.pid}); wait for its run to end, or start a second Sidecar`, {
        data: { pid: this.sidecar.pid },
      });
    }
    const cfg = this.config;
    prepareRunDir(cfg, "Trainer options", true);
    this.running = true;
    owners.set(this.sidecar, this);

    const { signal, checkpointOnAbort = false } = options;
    const started = performance.now();
    // Setup calls may be cancelled; once steps run, checkpointOnAbort lets the call in flight finish.
    const setupCall = { signal };
    const stepCall = checkpointOnAbort ? {} : { signal };
    this.stopRequested = false;
    const stopping = () => signal?.aborted === true || this.stopRequested;
    // Whether stopping now saves (Note [steering a run]: stop() always does).
    const saveOnStop = () => checkpointOnAbort || this.stopRequested;
    this.policy = this.initialPolicy;
    this.activatedAt = 0;
    this.lastDecision = null;
    let step = 0;
    let lastLoss: number | null = null;
    let saved: { step: number; path: string | null } = { step: 0, path: null }; // the last checkpoint (or the one resumed from)
    this.generation = undefined;
    this.data = null;
    // Sinks get events through per-sink queues (ts/sinks/buffer.ts): a slow sink does not
    // slow the steps and a failing one does not end the run; its sink:error is yielded here.
    // The last event (run:end) waits for every sink to drain and close.
    const sinks = new SinkSet(this.sinks);
    sinks.attach(this.control());
    const emit = async function* (ev: TrainerEvent): AsyncGenerator<TrainerEvent, void, undefined> {
      await sinks.write(ev);
      if (ev.type === "run:end") await sinks.close();
      yield* sinks.takeErrors();
      yield ev;
    };
    const end = (reason: RunEndReason, more: Partial<Extract<TrainerEvent, { type: "run:end" }>> = {}): TrainerEvent => ({
      type: "run:end",
      step,
      reason,
      timeS: (performance.now() - started) / 1000,
      lastLoss,
      ...more,
    });
    const save = async (done: number) => {
      const path = join(resolve(cfg.runDir!), "checkpoints", `step-${String(done).padStart(6, "0")}`);
      const policy = this.policyState();
      const r = await this.call("save_checkpoint", { path, generation: this.generation, extra: { config: jsonConfig(cfg), policy } }, stepCall);
      saved = { step: done, path: r.path };
      return { type: "checkpoint:saved", step: done, path: r.path, timeS: r.timeS } as const;
    };

    try {
      this.writeConfig();
      const model = await this.call("load_model", typeof cfg.model === "string" ? { path: cfg.model } : cfg.model, setupCall);
      this.generation = model.generation;
      const dataParams: Params<"load_dataset"> = typeof cfg.data === "string" ? { path: cfg.data } : cfg.data;
      const data = await this.call("load_dataset", { ...dataParams, generation: this.generation }, setupCall);
      this.data = data;
      const { name, ...optOpts } = cfg.optimizer;
      // NanoAdam without maskInterval refreshes only when told: this loop decides.
      const optimizer = await this.call("create_optimizer", { name, ...optOpts, generation: this.generation }, setupCall);
      this.generation = optimizer.generation;
      if (cfg.resumeFrom) {
        const path = resolve(cfg.resumeFrom);
        const resumed = await this.call("load_checkpoint", { path, generation: this.generation }, setupCall);
        step = resumed.step;
        saved = { step, path: resumed.path };
        this.lastDecision = resumed.extra.mask ?? null;
        this.restorePolicy(resumed.extra.policy, path);
      }
      yield* emit({ type: "run:start", step, totalSteps: cfg.steps, model, data, optimizer, policy: this.policyState(), config: jsonConfig(cfg) });

      let inARow = 0; // refused (non-finite) steps in a row
      while (step < cfg.steps && !stopping()) {
        if (this.pauseRequested) {
          yield* emit({ type: "run:paused", step });
          while (this.pauseRequested && !stopping()) await this.untilWoken(signal);
          if (!stopping()) yield* emit({ type: "run:resumed", step });
          continue;
        }
        const plan = this.plan(step);
        const lr = this.lr(step, cfg.steps);
        let r: Result<"train_step">;
        try {
          r = await this.call(
            "train_step",
            { generation: this.generation, lr, microBatch: cfg.microBatch, gradAccum: cfg.gradAccum, gradClip: cfg.gradClip ?? undefined, mask: plan.mask },
            stepCall,
          );
        } catch (e) {
          if (!(e instanceof NanotuneError && e.code === "NON_FINITE")) throw e;
          const refused = nonFiniteStep(e, step, lr);
          step = refused.step; // Note [step index]: the sidecar did not advance
          if (cfg.onNonFinite === "skip" && inARow < cfg.maxSkips) {
            inARow++;
            yield* emit({ type: "step:skipped", reason: "non-finite", inARow, ...refused });
            continue;
          }
          yield* emit(end("non-finite", { nonFinite: { ...refused, skipped: inARow } }));
          return;
        }
        inARow = 0;
        lastLoss = r.loss;
        if (plan.swapTo) {
          const from = this.policy?.name ?? null;
          this.policy = plan.swapTo;
          this.activatedAt = r.step;
          if (this.pendingPolicy === plan.swapTo) this.pendingPolicy = null; // a newer swap stays pending
          yield* emit({ type: "policy:swapped", step: r.step, from, to: plan.swapTo.name, spec: policySpec(plan.swapTo) });
        }
        if (plan.mask) this.lastDecision = plan.mask;
        step = r.step + 1; // Note [step index]
        yield* emit({ type: "train:step", ...r, policy: this.policy?.name ?? null, mask: plan.mask ?? null, tokensPerS: r.inputTokens / Math.max(r.timeS, 1e-9) });
        if (r.maskRefreshed && plan.mask && this.policy) yield* emit({ type: "mask:refreshed", step: r.step, policy: this.policy.name, decision: plan.mask });
        const done = step;
        if (cfg.evalEvery > 0 && (done % cfg.evalEvery === 0 || done === cfg.steps) && !(saveOnStop() && stopping())) {
          yield* emit({ type: "eval", ...(await this.call("evaluate", { generation: this.generation }, stepCall)) });
        }
        if (cfg.runDir && ((cfg.checkpointEvery > 0 && done % cfg.checkpointEvery === 0) || done === cfg.steps)) {
          yield* emit(await save(done));
        }
      }
      if (step >= cfg.steps) {
        yield* emit(end("completed"));
      } else if (saveOnStop()) {
        if (cfg.runDir && step > saved.step) yield* emit(await save(step));
        yield* emit(end("interrupted", { checkpoint: saved.step === step ? saved.path : null }));
      } else {
        yield* emit(end("aborted"));
      }
    } catch (e) {
      if (stopping() && e instanceof NanotuneError && e.code === "CANCELLED") {
        yield* emit(end(checkpointOnAbort ? "interrupted" : "aborted", checkpointOnAbort ? { checkpoint: null } : {}));
        return;
      }
      // The sinks learn how the run ended (metrics.jsonl's last line); the iterator throws.
      const error = e instanceof NanotuneError ? { code: e.code, message: e.message.split("\n")[0]! } : { code: "INTERNAL", message: String(e) };
      await sinks.write(end("failed", { error }));
      throw e;
    } finally {
      this.running = false;
      this.stopRequested = false;
      if (owners.get(this.sidecar) === this) owners.delete(this.sidecar);
      await sinks.close(); // drains every sink's queue first (idempotent after run:end)
    }
  }

  /**
   * Note [one call at a time]: the sidecar runs one compute call at a time and refuses a
   * second one while the first runs (BUSY). The loop's own calls are sequential, but
   * sampleWeights() comes from elsewhere (a sink, user code) at any moment, so every call
   * this Trainer makes goes through this queue: each starts when the previous one ended,
   * whatever its outcome. A call waiting here is not yet sent, so its signal still
   * cancels it before it starts (Sidecar.call checks it first).
   */
  private call<M extends MethodName>(method: M, params: Params<M>, options?: CallOptions): Promise<Result<M>> {
    const run = () => this.sidecar.call(method, params, options);
    const next = this.lastCall.then(run, run);
    this.lastCall = next.catch(() => undefined);
    return next;
  }

  /** Resolves on resume(), stop() or the signal's abort. */
  private untilWoken(signal: AbortSignal | undefined): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        signal?.removeEventListener("abort", done);
        this.wake = null;
        resolve();
      };
      this.wake = done;
      signal?.addEventListener("abort", done, { once: true });
      if (signal?.aborted) done();
    });
  }

  /** What the next step sends: the mask decision (undefined: the mask stays) and the policy it swaps to, committed once the step is accepted. */
  private plan(step: number): { mask?: MaskDecision; swapTo?: MaskPolicy } {
    const total = this.config.steps;
    if (this.pendingPolicy) return { mask: this.pendingPolicy.decide(step, total), swapTo: this.pendingPolicy }; // a swap always refreshes
    if (!this.policy) return {};
    const ctx = { sinceActivation: step - this.activatedAt, lastDecision: this.lastDecision };
    if (this.lastDecision === null || this.policy.shouldRefresh(step, total, ctx)) return { mask: this.policy.decide(step, total) };
    return {};
  }

  /** The active policy as a checkpoint keeps it (CheckpointExtra.policy): spec null for a custom policy without toJSON. */
  private policyState(): PolicyState | null {
    if (!this.policy) return null;
    return { name: this.policy.name, activatedAt: this.activatedAt, spec: typeof this.policy.toJSON === "function" ? this.policy.toJSON() : null };
  }

  /**
   * Resume: the checkpoint's active policy and its activation step win over the
   * config's policy, so refreshes after the resume fall where the uninterrupted run
   * had them. The config's own policy object is used when it is the same policy (same
   * spec; for a custom one, the same name); a built-in is rebuilt from its spec;
   * anything else (a custom policy, or custom schedules inside a built-in, that this
   * config does not supply) is an INVALID_CONFIG error naming it.
   */
  private restorePolicy(saved: Result<"load_checkpoint">["extra"]["policy"], path: string): void {
    const configured = this.policy;
    if (!saved || !configured) return;
    // No spec (null, or absent: the wire omits a null; also checkpoints written before specs): known by name only.
    const savedSpec = saved.spec ?? null;
    const mine = typeof configured.toJSON === "function" ? configured.toJSON() : null;
    let restored: MaskPolicy | null = null;
    if (savedSpec === null) restored = configured.name === saved.name ? configured : null;
    else if (mine !== null && canonical(mine) === canonical(savedSpec)) restored = configured;
    else {
      const parsed = PolicyJSON.safeParse(savedSpec);
      if (parsed.success) restored = policyFromJSON(parsed.data);
    }
    if (!restored) {
      const what = savedSpec === null ? `the custom policy '${saved.name}'` : `'${saved.name}' ${JSON.stringify(savedSpec)}, which has custom parts`;
      throw new NanotuneError(
        "INVALID_CONFIG",
        `resumeFrom ${path}: the checkpoint's active mask policy is ${what} (active since step ${saved.activatedAt}); ` +
          `pass that policy as maskPolicy to resume it (this run's is '${configured.name}'${mine === null ? "" : ` ${JSON.stringify(mine)}`})`,
        { data: { path, policy: saved } },
      );
    }
    this.policy = restored;
    this.activatedAt = saved.activatedAt;
  }

  /** runDir/config.json: the resolved config, the run's record. */
  private writeConfig(): void {
    const dir = this.config.runDir;
    if (!dir) return;
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, "config.json"), `${JSON.stringify(jsonConfig(this.config), null, 2)}\n`);
  }
}

/** NON_FINITE's data ({step, loss, gradNorm}) with the lr the step was tried with. */
function nonFiniteStep(e: NanotuneError, step: number, lr: number): NonFiniteStep {
  const d = (e.data ?? {}) as { step?: unknown; loss?: unknown; gradNorm?: unknown };
  const num = (v: unknown) => (typeof v === "number" ? v : v === null || v === undefined ? null : Number(v));
  return { step: typeof d.step === "number" ? d.step : step, loss: num(d.loss), gradNorm: num(d.gradNorm), lr };
}

/** JSON with sorted keys, to compare specs that travelled through a checkpoint. */
function canonical(v: unknown): string {
  return JSON.stringify(v, (_k, x) =>
    x && typeof x === "object" && !Array.isArray(x) ? Object.fromEntries(Object.entries(x as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : 1))) : x,
  );
}

/**
 * The resolved config as JSON: schedules and policies as their specs (their
 * toJSON()); a function or policy without one as `{type: "custom", name}`.
 */
export function jsonConfig(cfg: ResolvedTrainerConfig): Record<string, unknown> {
  return JSON.parse(
    JSON.stringify(cfg, (_k, v) => {
      if (typeof v === "function") return { type: "custom", name: v.name || "anonymous" };
      if (v && typeof v === "object" && typeof v.decide === "function") return { type: "custom", name: String(v.name) };
      return v;
    }),
  );
}
