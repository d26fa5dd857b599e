// Sinks: where a Trainer's events go. The Trainer only emits events; a sink turns
// them into a progress bar, log lines, a metrics file, or a tracker's records.
//
//   new Trainer({ sidecar, ...config, sinks: [sinks.progress(), sinks.jsonl("runs/a/metrics.jsonl")] })
//
// Without `sinks` the Trainer uses `sinks.defaults(config)`: a progress bar when
// stderr is a TTY (or `progress: true`) and metrics.jsonl in `runDir` when set.
// A sink's write() may return a promise. Each sink gets its own queue, drained in
// order (buffer.ts): a slow sink does not slow the steps, and the Trainer waits for
// every queue to drain and every close() at the end of the run, so nothing is lost.
// A sink that throws or rejects does not end the run: it is reported once as a
// `sink:error` event (yielded by the Trainer and given to the other sinks) and gets
// no more events.
import { closeSync, mkdirSync, openSync, writeSync } from "node:fs";
import { dirname, join } from "node:path";
import chalk from "chalk";
import type { TrainerEvent } from "../train/events.ts";
import { describeEnd, describeNonFinite } from "./describe.ts";
import { ProgressBar } from "./progress.ts";
import { tensorboard } from "./tensorboard.ts";
import { mlflow } from "./mlflow.ts";
export type { MlflowOptions } from "./mlflow.ts";
import { otel } from "./otel.ts";
import { dashboard } from "../dashboard/server.ts";
export type { DashboardOptions, DashboardSink } from "../dashboard/server.ts";
export type { OtelOptions } from "./otel.ts";

import type { Sink } from "./sink.ts";

export type { Sink };

export interface ProgressOptions {
  /** Draw at all; default: when `out` is a TTY. */
  enabled?: boolean;
  /** Default process.stderr. */
  out?: NodeJS.WriteStream;
}

export interface ConsoleOptions {
  /** Print a train:step line every this many steps (and the last one). Default 10. */
  every?: number;
  /** Where lines go; default console.log. */
  print?: (line: string) => void;
}

/** A one-line progress bar (step, loss, lr, density, tokens/s, ETA) with eval, mask and checkpoint lines above it. */
function progress(options: ProgressOptions = {}): Sink {
  const out = options.out ?? process.stderr;
  const enabled = options.enabled ?? Boolean(out.isTTY);
  let bar: ProgressBar | null = null;
  return {
    name: "progress",
    write(ev) {
      if (!enabled) return;
      if (ev.type === "run:start") bar = new ProgressBar(ev.totalSteps, ev.step, out);
      bar?.update(ev);
    },
    close() {
      bar?.done();
    },
  };
}

/** Plain log lines for logs and CI: the run's start, every `every`-th step, eval, checkpoints, the end. */
function consoleLines(options: ConsoleOptions = {}): Sink {
  const every = options.every ?? 10;
  const print = options.print ?? ((line: string) => console.log(line));
  let total = 0;
  return {
    name: "console",
    write(ev) {
      switch (ev.type) {
        case "run:start":
          total = ev.totalSteps;
          return print(
            `model ${ev.model.path}: ${ev.model.parameters.toLocaleString("en-US")} params on ${ev.model.device}` +
              (ev.model.parallel ? ` x ${ev.model.worldSize} ranks (${ev.model.parallel})` : "") +
              `; ${ev.data.trainExamples} examples`,
          );
        case "train:step":
          if (ev.step % every === 0 || ev.step + 1 === total) {
            print(`step ${ev.step}: loss ${ev.loss.toFixed(4)} lr ${ev.lr.toExponential(2)}${ev.density === null ? "" : ` k ${ev.density.toFixed(4)}`}`);
          }
          return;
        case "mask:refreshed":
          return;
        case "step:skipped":
          return print(chalk.yellow(`step ${ev.step}: skipped, ${describeNonFinite(ev)} (${ev.inARow} in a row)`));
        case "run:paused":
          return print(chalk.yellow(`step ${ev.step}: paused`));
        case "run:resumed":
          return print(chalk.yellow(`step ${ev.step}: resumed`));
        case "policy:swapped":
          return print(chalk.magenta(`step ${ev.step}: mask policy ${ev.from ?? "-"} -> ${ev.to}`));
        case "eval":
          return print(chalk.cyan(`eval @${ev.step}: loss ${ev.loss.toFixed(4)} ppl ${ev.perplexity.toFixed(2)}`));
        case "checkpoint:saved":
          return print(chalk.green(`checkpoint @${ev.step}: ${ev.path}`));
        case "sink:error":
          return print(chalk.red(`sink ${ev.sink} failed @${ev.step}: ${ev.message} (it gets no more events)`));
        case "run:end":
          return print(describeEnd(ev));
      }
    },
  };
}

/** NaN and ±Infinity as strings: JSON has no such numbers (JSON.stringify would write null). */
const nonFiniteAsString = (_k: string, v: unknown) => (typeof v === "number" && !Number.isFinite(v) ? String(v) : v);

/** Every event as one JSON line `{time, type, ...}` appended to `path` (its directory is created); NaN and ±Infinity are written as "NaN", "Infinity", "-Infinity". */
function jsonl(path: string): Sink {
  let fd: number | null = null;
  return {
    name: "jsonl",
    write(ev) {
      if (fd === null) {
        mkdirSync(dirname(path), { recursive: true });
        fd = openSync(path, "a");
      }
      writeSync(fd, `${JSON.stringify({ time: new Date().toISOString(), ...ev }, nonFiniteAsString)}\n`);
    },
    close() {
      if (fd !== null) closeSync(fd);
      fd = null;
    },
  };
}

/** What a Trainer uses when given no `sinks`: a progress bar (when `progress`, default: stderr is a TTY) and `runDir`/metrics.jsonl. */
function defaults(config: { runDir?: string | null; progress?: boolean }): Sink[] {
  const out: Sink[] = [progress({ enabled: config.progress })];
  if (config.runDir) out.push(jsonl(join(config.runDir, "metrics.jsonl")));
  return out;
}

export const sinks = { progress, console: consoleLines, jsonl, tensorboard, otel, mlflow, dashboard, defaults } as const;
