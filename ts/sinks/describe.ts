// One-line descriptions of events that the console and progress sinks share.
import type { TrainerEvent } from "../train/events.ts";

/** "loss NaN, gradNorm Infinity at lr 1.00e+10" */
export function describeNonFinite(d: { loss: number | null; gradNorm: number | null; lr: number }): string {
  const n = (v: number | null) => (v === null ? "-" : Number.isFinite(v) ? v.toFixed(4) : String(v));
  return `loss ${n(d.loss)}, gradNorm ${n(d.gradNorm)} at lr ${d.lr.toExponential(2)}`;
}

/** One line for run:end: the reason, the steps, and what ended it. */
export function describeEnd(ev: Extract<TrainerEvent, { type: "run:end" }>): string {
  const head = `${ev.reason} after ${ev.step} steps in ${ev.timeS.toFixed(1)} s; last loss ${ev.lastLoss?.toFixed(4) ?? "-"}`;
  switch (ev.reason) {
    case "interrupted":
      return `${head}; ${ev.checkpoint ? `checkpoint ${ev.checkpoint}` : "no checkpoint saved"}`;
    case "non-finite":
      return ev.nonFinite
        ? `${head}; step ${ev.nonFinite.step} refused: ${describeNonFinite(ev.nonFinite)}` + (ev.nonFinite.skipped ? ` after ${ev.nonFinite.skipped} skipped in a row` : "")
        : head;
    case "failed":
      return ev.error ? `${head}; ${ev.error.code}: ${ev.error.message}` : head;
    default:
      return head;
  }
}
