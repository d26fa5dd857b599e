// What a sink is (kept apart from index.ts so buffer.ts and tensorboard.ts need not import it).
import type { Tensor } from "../tensor.ts";
import type { TrainerEvent } from "../train/events.ts";
import type { MaskPolicy } from "../train/policies.ts";

export interface Sink {
  /** A name for messages ("progress", "jsonl", ...). */
  readonly name: string;
  /** Called with every event, in order (from the sink's own queue: the Trainer does not wait for it). */
  write(event: TrainerEvent): void | Promise<void>;
  /** Called once when the run ends (also after an error), after every queued event was written. */
  close?(): void | Promise<void>;
  /**
   * Called once per run, before run:start is written, with the running Trainer's
   * controls: a sink that steers the run (the dashboard) keeps it. Most sinks only listen.
   */
  attach?(control: TrainerControl): void;
}

/**
 * What a sink may do to the run it receives events from: the same calls as the
 * Trainer's own methods, so a click on the dashboard and a line of user code have
 * exactly the same effect (and the event log shows the step each took effect at).
 */
export interface TrainerControl {
  /** trainer.setMaskPolicy(): the next step refreshes the mask with it (policy:swapped). */
  setMaskPolicy(policy: MaskPolicy): void;
  /** trainer.pause(): no step starts until resume() (run:paused once the step in flight has ended). */
  pause(): void;
  /** trainer.resume() (run:resumed). */
  resume(): void;
  readonly paused: boolean;
  /**
   * trainer.stop(): stop-and-save, as an abort with checkpointOnAbort: the step in flight
   * finishes, a checkpoint is saved (with a runDir), run:end reason "interrupted".
   */
  stop(): void;
  /** trainer.sampleWeights(): |w| and |grad| pairs of one tensor at the last step (the sidecar's sample_weights). */
  sampleWeights(options?: SampleWeightsOptions): Promise<WeightSample>;
}

export interface SampleWeightsOptions {
  /** The parameter's name (one of WeightSample.tensors); default: the sidecar's choice (the first masked tensor). */
  tensor?: string;
  /** How many entries to sample (default 2000). */
  count?: number;
}

/** A sample of one tensor's entries (the same entries on every call for the same tensor and count). */
export interface WeightSample {
  tensor: string;
  shape: number[];
  /** The sidecar's step counter when the gradients were taken (they are the gradients of step `step - 1`); null: no step since the tensor was chosen. */
  step: number | null;
  /** The sampled flat indices. */
  indices: Tensor<"int64">;
  /** The weights at those entries before the update of that step (float32). */
  weights: Tensor<"float32">;
  /** The gradients at those entries in that step (float32); null before a step, or with sparse gradients (never dense). */
  grads: Tensor<"float32"> | null;
  /** 1 where the entry is in the tensor's current mask (uint8); null for AdamW or a dense tensor. */
  inMask: Tensor<"uint8"> | null;
  /** The tensors one may choose: name, shape, and whether NanoAdam masks it. */
  tensors: { name: string; shape: number[]; masked: boolean }[];
}
