// What `trainer.run()` yields and what sinks receive (ts/sinks/). Kept apart from the
// Trainer so sinks depend on the events, not on the loop.
import type { Result } from "../sidecar.ts";
import type { MaskDecision, PolicySpec } from "./policies.ts";

/** The active mask policy, as a checkpoint keeps it (CheckpointExtra.policy); spec null: a custom policy, known by name. */
export interface PolicyState {
  name: string;
  /** The step at which it became active. */
  activatedAt: number;
  spec: PolicySpec | null;
}

/** A step the sidecar refused (NON_FINITE): nothing changed, the sidecar's step stayed at `step`. */
export interface NonFiniteStep {
  step: number;
  /** NaN and ±Infinity are written as strings by sinks.jsonl ("NaN", "Infinity"). */
  loss: number | null;
  gradNorm: number | null;
  /** The lr the step was tried with. */
  lr: number;
}

/**
 * Why a run ended:
 * - "completed": every step ran;
 * - "interrupted": `run({ signal, checkpointOnAbort: true })` was aborted (the CLI on
 *   SIGINT/SIGTERM): the step in flight finished and a checkpoint was saved (with a runDir);
 * - "aborted": `run({ signal })` was aborted without checkpointOnAbort: the call in flight was cancelled;
 * - "non-finite": a step's loss or gradient norm was not finite (onNonFinite "stop", or more
 *   than maxSkips refused steps in a row with "skip"); `nonFinite` says which;
 * - "failed": an error ended the run; it is only written to the sinks (the iterator throws the error).
 */
export type RunEndReason = "completed" | "interrupted" | "aborted" | "non-finite" | "failed";

/** In order: run:start, then per step train:step (after policy:swapped, before mask:refreshed, eval, checkpoint:saved) or step:skipped, run:paused/run:resumed between steps, then run:end; sink:error wherever a sink failed (before run:end). */
export type TrainerEvent =
  | {
      type: "run:start";
      /** The first step this run takes (> 0 when resumed). */
      step: number;
      /** The step the run ends at (the config's `steps`). */
      totalSteps: number;
      model: Result<"load_model">;
      data: Result<"load_dataset">;
      optimizer: Result<"create_optimizer">;
      /** The active mask policy (restored from the checkpoint when resumed; null with AdamW). */
      policy: PolicyState | null;
      /** The resolved config as JSON (runDir/config.json's content): schedules and policies as their specs. */
      config: Record<string, unknown>;
    }
  | ({
      type: "train:step";
      /** The active mask policy's name (null with AdamW). */
      policy: string | null;
      /** The mask decision sent with this step (it refreshed the mask before the step), or null when the mask stayed. */
      mask: MaskDecision | null;
      tokensPerS: number;
    } & Result<"train_step">)
  | ({
      /** onNonFinite "skip": the sidecar refused this step; the Trainer tries the same step index again. */
      type: "step:skipped";
      reason: "non-finite";
      /** Refused steps in a row so far (the run ends when it would exceed maxSkips). */
      inARow: number;
    } & NonFiniteStep)
  | {
      /** setMaskPolicy took effect: `step` is the first step run with the new policy (it refreshed the mask). */
      type: "policy:swapped";
      step: number;
      from: string | null;
      to: string;
      spec: PolicySpec;
    }
  | { type: "mask:refreshed"; step: number; policy: string; decision: MaskDecision }
  | {
      /** trainer.pause() (or the dashboard's pause) took effect: no step runs until run:resumed; `step` is the next step. */
      type: "run:paused";
      step: number;
    }
  | { type: "run:resumed"; step: number }
  | ({ type: "eval" } & Result<"evaluate">)
  | { type: "checkpoint:saved"; step: number; path: string; timeS: number }
  | {
      /**
       * A sink's write() or close() threw or rejected (reported once; that sink gets no
       * more events, the run goes on). `step`: the step of the event it failed on.
       */
      type: "sink:error";
      sink: string;
      message: string;
      step: number;
    }
  | {
      type: "run:end";
      /** Steps taken (the sidecar's step counter) when the run ended. */
      step: number;
      reason: RunEndReason;
      timeS: number;
      lastLoss: number | null;
      /** "interrupted": the checkpoint saved on the way out (null: no runDir, or no step since the last one). */
      checkpoint?: string | null;
      /** "non-finite": the refused step, and how many were skipped in a row before it. */
      nonFinite?: NonFiniteStep & { skipped: number };
      /** "failed": the error's code and first line. */
      error?: { code: string; message: string };
    };

export type TrainerEventType = TrainerEvent["type"];
