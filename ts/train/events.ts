// What `trainer.run()` yields and what sinks receive (ts/sinks/). Kept apart from the
// Trainer so sinks depend on the events, not on the loop.
import type { Result } from "../sidecar.ts";
import type { MaskDecision } from "./policies.ts";

/** In order: run:start, then per step train:step (and mask:refreshed, eval, checkpoint:saved), then run:end. */
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
    }
  | ({
      type: "train:step";
      /** The active mask policy's name (null with AdamW). */
      policy: string | null;
      /** The mask decision sent with this step (it refreshed the mask before the step), or null when the mask stayed. */
      mask: MaskDecision | null;
      tokensPerS: number;
    } & Result<"train_step">)
  | { type: "mask:refreshed"; step: number; policy: string; decision: MaskDecision }
  | ({ type: "eval" } & Result<"evaluate">)
  | { type: "checkpoint:saved"; step: number; path: string; timeS: number }
  | { type: "run:end"; step: number; reason: "completed" | "aborted"; timeS: number; lastLoss: number | null };

export type TrainerEventType = TrainerEvent["type"];
