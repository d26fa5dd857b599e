// `nanotune export <checkpointDir> --out DIR [--merge] [--base DIR]`: a checkpoint's
// model as a directory of its own (python -m nanotune.export, python/nanotune/export.py).
// Without --merge model/ is copied: a LoRA run's PEFT adapter, or a full run's HF
// directory. With --merge a LoRA run's adapter is merged into its base: a plain HF
// directory that transformers loads without PEFT. The obvious mistakes are caught here,
// before Python starts (exit 2, one line naming the path); Python checks again and
// reports the rest the same way (`nanotune: export: ...`, exit 2).
import { existsSync, readdirSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import { NanotuneError } from "../errors.ts";
import { runPython } from "./python.ts";

export interface ExportOptions {
  /** the directory to write: must not exist, or be empty */
  out?: string;
  /** merge the LoRA adapter into its base */
  merge?: boolean;
  /** the base model directory to merge into (default: the one adapter_config.json names) */
  base?: string;
}

const bad = (message: string) => new NanotuneError("INVALID_ARGUMENT", `export: ${message}`);

/** Checks the arguments, then runs python -m nanotune.export; resolves with its exit code. */
export async function exportCommand(checkpoint: string, options: ExportOptions): Promise<number> {
  if (!options.out) throw bad("missing --out DIR (the directory to write; see nanotune export --help)");
  if (options.base !== undefined && !options.merge) throw bad("--base is for --merge (the base the adapter is merged into)");
  const dir = resolve(checkpoint);
  if (!existsSync(dir)) throw bad(`checkpoint ${checkpoint} does not exist`);
  if (!statSync(dir).isDirectory()) throw bad(`${checkpoint} is not a directory (expected a checkpoint: <runDir>/checkpoints/step-N)`);
  if (!existsSync(join(dir, "trainer_state.json"))) {
    if (existsSync(join(dir, "adapter_config.json"))) {
      throw bad(`${checkpoint} is an adapter directory, not a nanotune checkpoint: give the checkpoint directory (the one that holds trainer_state.json and model/)`);
    }
    throw bad(`${checkpoint} is not a nanotune checkpoint (no trainer_state.json); checkpoints are the <runDir>/checkpoints/step-N directories`);
  }
  if (options.merge && !existsSync(join(dir, "model", "adapter_config.json"))) {
    throw bad(`checkpoint ${checkpoint} has no adapter to merge: its model/ is a full model (a run without model.lora, no adapter_config.json); export it without --merge to copy it`);
  }
  const out = resolve(options.out);
  if (existsSync(out) && !(statSync(out).isDirectory() && readdirSync(out).length === 0)) {
    throw bad(`--out ${options.out} exists and is not an empty directory; refusing to overwrite it: choose a new path or remove it`);
  }
  const args = ["-m", "nanotune.export", dir, "--out", out];
  if (options.merge) args.push("--merge");
  if (options.base !== undefined) args.push("--base", resolve(options.base));
  return runPython(args);
}
