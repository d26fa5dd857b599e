// `nanotune eval <config.json>`: per-task accuracy of a model directory on local
// benchmark files (python -m nanotune.evaluation). Paths in the config are
// relative to the config file's directory.
import { existsSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { z } from "zod";
import { ConfigError } from "../errors.ts";
import { readConfigFile, resolveModelPath, resolvePath } from "./config.ts";
import { runPython } from "./python.ts";

export const EvalConfig = z.strictObject({
  /** a save_pretrained directory (model and tokenizer) */
  model: z.string().min(1),
  /** task name -> JSON/JSONL file (piqa, arc_easy, ...) */
  tasks: z.record(z.string(), z.string().min(1)),
  mode: z.enum(["loglikelihood", "generate"]).default("loglikelihood"),
  limit: z.number().int().min(1).optional(),
});

export async function evalCommand(configPath: string): Promise<number> {
  const r = EvalConfig.safeParse(readConfigFile(configPath));
  if (!r.success) throw new ConfigError(configPath, r.error);
  const cfg = r.data;
  const base = dirname(resolve(configPath));
  const model = resolveModelPath(cfg.model, base);
  const issues: { path: string; message: string }[] = [];
  if (!existsSync(model) || !statSync(model).isDirectory()) issues.push({ path: "model", message: `${model} is not a directory` });
  else if (!existsSync(join(model, "config.json"))) issues.push({ path: "model", message: `${model} has no config.json (not a Hugging Face model directory)` });
  const tasks = Object.entries(cfg.tasks).map(([name, file]) => [name, resolvePath(file, base)] as const);
  for (const [name, file] of tasks) if (!existsSync(file)) issues.push({ path: `tasks.${name}`, message: `${file} does not exist` });
  if (issues.length) throw new ConfigError(configPath, issues);
  const args = ["-m", "nanotune.evaluation", "--model", model, "--mode", cfg.mode];
  for (const [name, file] of tasks) args.push("--task", `${name}=${file}`);
  if (cfg.limit) args.push("--limit", String(cfg.limit));
  return runPython(args);
}
