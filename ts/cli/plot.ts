// `nanotune plot <runDir> [--out FILE.png]`: PNG curves of a run (loss and eval
// loss, lr, density, gradient norm, tokens/s; policy swaps, mask refreshes,
// skipped steps and resumes marked) from <runDir>/metrics.jsonl, without a
// browser. Matplotlib draws it in the sidecar's Python (python -m nanotune.plot,
// python/nanotune/plot.py; docs/plot.md says why and what is drawn).
import { existsSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import { execa } from "execa";
import { NanotuneError } from "../errors.ts";
import { pythonEnv, requirePython } from "./python.ts";

/** What python -m nanotune.plot prints: the series drawn with their point counts and the markers. */
export interface PlotSummary {
  out: string;
  runDir: string;
  title: string;
  series: Record<string, number>;
  steps: [number, number];
  swaps: number;
  refreshes: number;
  skipped: number;
  resumes: number;
  size: [number, number];
}

/** How nanotune.plot reports an error it was given (and argparse's): one line, exit code 2. */
const ERROR_LINE = /^nanotune\.plot: error: (.*)$/;

/** Writes the PNG (default <runDir>/curves.png), prints its path on stdout and a one-line summary on stderr; resolves with the summary. */
export async function plotRun(runDir: string, options: { out?: string } = {}): Promise<PlotSummary> {
  const dir = resolve(runDir);
  if (!existsSync(dir)) throw new NanotuneError("INVALID_ARGUMENT", `plot: run directory ${runDir} does not exist`);
  if (!statSync(dir).isDirectory()) throw new NanotuneError("INVALID_ARGUMENT", `plot: ${runDir} is not a directory (expected a runDir)`);
  if (!existsSync(join(dir, "metrics.jsonl"))) {
    throw new NanotuneError("INVALID_ARGUMENT", `plot: ${runDir} has no metrics.jsonl (a Trainer with runDir writes one there)`);
  }
  const out = resolve(options.out ?? join(dir, "curves.png"));
  const found = requirePython();
  const r = await execa(found.python, ["-m", "nanotune.plot", dir, "--out", out], {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    env: pythonEnv(),
    reject: false,
  });
  const stderr = String(r.stderr ?? "");
  if (r.exitCode === undefined && r.signal === undefined) {
    throw new NanotuneError("START_FAILED", `cannot run ${found.python} (from ${found.source}): ${r.originalMessage || r.shortMessage}`);
  }
  if (r.exitCode === 2) {
    const line = stderr.split("\n").map((l) => ERROR_LINE.exec(l.trim())).filter((m) => m !== null).at(-1);
    if (line) throw new NanotuneError("INVALID_ARGUMENT", `plot: ${line[1]}`);
  }
  if (r.exitCode !== 0) {
    if (stderr.trim()) process.stderr.write(stderr.endsWith("\n") ? stderr : `${stderr}\n`);
    throw new NanotuneError("INTERNAL", `plot: python -m nanotune.plot failed (${r.signal ?? `exit code ${r.exitCode}`}); last stderr:`);
  }
  if (stderr.trim()) process.stderr.write(stderr.endsWith("\n") ? stderr : `${stderr}\n`); // matplotlib's warnings
  const summary = JSON.parse(String(r.stdout)) as PlotSummary;
  const drawn = Object.entries(summary.series)
    .filter(([, n]) => n > 0)
    .map(([name, n]) => `${name} ${n}`)
    .join(", ");
  const marks = [`${summary.swaps} swaps`, `${summary.refreshes} mask refreshes`, `${summary.skipped} skipped`, ...(summary.resumes ? [`${summary.resumes} resumes`] : [])];
  console.error(`plot: steps ${summary.steps[0]}-${summary.steps[1]}: ${drawn}; ${marks.join(", ")}`);
  console.log(summary.out);
  return summary;
}

export async function plotCommand(runDir: string, options: { out?: string } = {}): Promise<number> {
  await plotRun(runDir, options);
  return 0;
}
