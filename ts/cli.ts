// The `nanotune` command line.
//   nanotune train <config.json>   finetune as the config says (validated: a wrong field is named)
//   nanotune eval <config.json>    score a model on local commonsense benchmark files
//   nanotune demo                  the quickstart demo (npm start)
//   nanotune bench gpu [args]      bench/gpu.py (peak memory and step time vs AdamW)
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { delimiter, join, resolve } from "node:path";
import chalk from "chalk";
import { z } from "zod";
import { runDemo } from "./demo.ts";
import { repoRoot, Sidecar } from "./sidecar.ts";
import { ConfigError, parseConfig } from "./train/config.ts";
import { Trainer } from "./train/trainer.ts";

const USAGE = `usage: nanotune <command>
  train <config.json>   finetune with the Trainer (see examples/finetune/config.json)
  eval <config.json>    per-task accuracy on local benchmark files ({"model": DIR, "tasks": {"piqa": "path.jsonl"}})
  demo                  a short two-task demo on a tiny Llama
  bench gpu [args]      peak memory and step time of AdamW vs NanoAdam (python bench/gpu.py --help)`;

export class CliError extends Error {}

function readJSON(path: string): unknown {
  if (!existsSync(path)) throw new CliError(`config file ${path} does not exist`);
  try {
    return JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new CliError(`config file ${path} is not valid JSON: ${(e as Error).message}`);
  }
}

async function train(path: string): Promise<void> {
  const config = parseConfig(readJSON(path), path);
  const sidecar = await Sidecar.start({ device: "auto" });
  const abort = new AbortController();
  process.once("SIGINT", () => abort.abort(new Error("SIGINT")));
  try {
    const trainer = new Trainer({ sidecar, ...config, progress: config.progress ?? Boolean(process.stderr.isTTY) });
    for await (const ev of trainer.run({ signal: abort.signal })) {
      if (ev.type === "run:start") console.log(`model ${ev.model.path}: ${ev.model.parameters.toLocaleString()} params on ${ev.model.device}; ${ev.data.trainExamples} examples`);
      if (ev.type === "train:step" && !process.stderr.isTTY && (ev.step % 10 === 0 || ev.step + 1 === config.steps)) {
        console.log(`step ${ev.step}: loss ${ev.loss.toFixed(4)} lr ${ev.lr.toExponential(2)}${ev.density === null ? "" : ` k ${ev.density.toFixed(4)}`}`);
      }
      if (ev.type === "eval") console.log(chalk.cyan(`eval @${ev.step}: loss ${ev.loss.toFixed(4)} ppl ${ev.perplexity.toFixed(2)}`));
      if (ev.type === "checkpoint:saved") console.log(chalk.green(`checkpoint: ${ev.path}`));
      if (ev.type === "run:end") console.log(`${ev.reason} after ${ev.step} steps in ${ev.timeS.toFixed(1)} s; last loss ${ev.lastLoss?.toFixed(4) ?? "-"}`);
    }
  } finally {
    await sidecar.close();
  }
}

const EvalConfig = z.strictObject({
  model: z.string().min(1),
  tasks: z.record(z.string(), z.string()),
  mode: z.enum(["loglikelihood", "generate"]).default("loglikelihood"),
  limit: z.number().int().min(1).optional(),
});

function pythonRun(args: string[]): number {
  const python = process.env.NANOTUNE_PYTHON ?? join(repoRoot, ".venv", "bin", "python");
  const env = { ...process.env, PYTHONPATH: [join(repoRoot, "python"), process.env.PYTHONPATH].filter(Boolean).join(delimiter) };
  const r = spawnSync(python, args, { stdio: "inherit", env, cwd: process.cwd() });
  if (r.error) throw new CliError(`cannot run ${python}: ${r.error.message} (run npm run setup, or set NANOTUNE_PYTHON)`);
  return r.status ?? 1;
}

function evaluate(path: string): number {
  const r = EvalConfig.safeParse(readJSON(path));
  if (!r.success) throw new ConfigError(path, r.error);
  const cfg = r.data;
  const args = ["-m", "nanotune.evaluation", "--model", resolve(cfg.model), "--mode", cfg.mode];
  for (const [name, file] of Object.entries(cfg.tasks)) args.push("--task", `${name}=${resolve(file)}`);
  if (cfg.limit) args.push("--limit", String(cfg.limit));
  return pythonRun(args);
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case "train":
        if (rest.length !== 1) throw new CliError("nanotune train takes one config file");
        await train(rest[0]!);
        return 0;
      case "eval":
        if (rest.length !== 1) throw new CliError("nanotune eval takes one config file");
        return evaluate(rest[0]!);
      case "demo":
        await runDemo({ progress: false });
        return 0;
      case "bench":
        if (rest[0] !== "gpu") throw new CliError("nanotune bench: the benchmark is 'gpu'");
        return pythonRun([join(repoRoot, "bench", "gpu.py"), ...rest.slice(1)]);
      case undefined:
      case "help":
      case "--help":
        console.log(USAGE);
        return command === undefined ? 2 : 0;
      default:
        throw new CliError(`unknown command '${command}'\n${USAGE}`);
    }
  } catch (e) {
    if (e instanceof ConfigError || e instanceof CliError) {
      console.error(chalk.red(`nanotune: ${e.message}`));
      return 2;
    }
    throw e;
  }
}

if (import.meta.url === `file://${process.argv[1]}` || process.argv[1]?.endsWith("cli.ts")) {
  main(process.argv.slice(2)).then((code) => process.exit(code));
}
