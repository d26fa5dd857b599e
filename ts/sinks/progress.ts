// The progress sink's bar (sinks.progress()): one line on stderr with step, loss,
// lr, density, tokens/s and ETA, redrawn at most every 100 ms.
import chalk from "chalk";
import type { TrainerEvent } from "../train/events.ts";
import { describeEnd, describeNonFinite } from "./describe.ts";

export class ProgressBar {
  private readonly t0 = performance.now();
  private lastDraw = 0;
  private line = "";

  /** `first`: the step the run starts at (resumed runs), so the ETA counts only this run's steps. */
  constructor(
    private readonly total: number,
    private readonly first: number,
    private readonly out: NodeJS.WriteStream,
  ) {}

  update(ev: TrainerEvent): void {
    if (ev.type === "eval") this.print(chalk.cyan(`eval @${ev.step}: loss ${ev.loss.toFixed(4)}, ppl ${ev.perplexity.toFixed(2)}`));
    if (ev.type === "mask:refreshed") this.print(chalk.magenta(`mask refreshed @${ev.step}: ${ev.policy} ${ev.decision.criterion} k=${ev.decision.density.toFixed(4)}`));
    if (ev.type === "checkpoint:saved") this.print(chalk.green(`checkpoint @${ev.step}: ${ev.path}`));
    if (ev.type === "policy:swapped") this.print(chalk.magenta(`mask policy @${ev.step}: ${ev.from ?? "-"} -> ${ev.to}`));
    if (ev.type === "step:skipped") this.print(chalk.yellow(`step ${ev.step} skipped: ${describeNonFinite(ev)} (${ev.inARow} in a row)`));
    if (ev.type === "run:paused") this.print(chalk.yellow(`paused before step ${ev.step}`));
    if (ev.type === "run:resumed") this.print(chalk.yellow(`resumed at step ${ev.step}`));
    if (ev.type === "sink:error") this.print(chalk.red(`sink ${ev.sink} failed @${ev.step}: ${ev.message} (it gets no more events)`));
    if (ev.type === "run:end" && ev.reason !== "completed") this.print(describeEnd(ev));
    if (ev.type !== "train:step") return;
    const now = performance.now();
    const done = ev.step + 1;
    if (now - this.lastDraw < 100 && done < this.total) return;
    this.lastDraw = now;
    const width = 24;
    const filled = Math.round((done / this.total) * width);
    const elapsed = (now - this.t0) / 1000;
    const eta = (elapsed / Math.max(1, done - this.first)) * (this.total - done);
    this.line = [
      chalk.bold(`${"█".repeat(filled)}${"░".repeat(width - filled)}`),
      `${done}/${this.total}`,
      `loss ${chalk.yellow(ev.loss.toFixed(4))}`,
      `lr ${ev.lr.toExponential(2)}`,
      ev.density === null ? "" : `k ${ev.density.toFixed(3)}`,
      `${Math.round(ev.tokensPerS)} tok/s`,
      `ETA ${formatSeconds(eta)}`,
    ]
      .filter(Boolean)
      .join("  ");
    this.out.write(`\r\x1b[2K${this.line}`);
  }

  private print(message: string): void {
    this.out.write(`\r\x1b[2K${message}\n${this.line}`);
  }

  done(): void {
    if (this.line) this.out.write("\n");
  }
}

export function formatSeconds(s: number): string {
  if (!Number.isFinite(s)) return "?";
  const m = Math.floor(s / 60);
  return m > 0 ? `${m}m${String(Math.round(s % 60)).padStart(2, "0")}s` : `${s.toFixed(1)}s`;
}
