// The scalars a Trainer event becomes in the trackers (sinks.tensorboard, sinks.mlflow):
// one table, so a run's curves have the same names and values in both.
import type { TrainerEvent } from "../train/events.ts";

/**
 * [name, value] pairs of one event (none for most; null values left out):
 *   train:step        train/loss, train/lr, train/density (NanoAdam), train/grad_norm (when
 *                     reported), train/tokens_per_s
 *   eval              eval/loss, eval/perplexity
 *   mask:refreshed    mask/refreshed = 1;  policy:swapped  policy/swapped = 1
 *   step:skipped      train/skipped = 1;   checkpoint:saved  checkpoint/time_s
 */
export function scalarsOf(ev: TrainerEvent): [string, number][] {
  const pairs = (xs: [string, number | null][]) => xs.filter((p): p is [string, number] => p[1] !== null);
  switch (ev.type) {
    case "train:step":
      return pairs([
        ["train/loss", ev.loss],
        ["train/lr", ev.lr],
        ["train/density", ev.density],
        ["train/grad_norm", ev.gradNorm],
        ["train/tokens_per_s", ev.tokensPerS],
      ]);
    case "eval":
      return pairs([
        ["eval/loss", ev.loss],
        ["eval/perplexity", ev.perplexity],
      ]);
    case "mask:refreshed":
      return [["mask/refreshed", 1]];
    case "policy:swapped":
      return [["policy/swapped", 1]];
    case "step:skipped":
      return [["train/skipped", 1]];
    case "checkpoint:saved":
      return [["checkpoint/time_s", ev.timeS]];
    default:
      return [];
  }
}
