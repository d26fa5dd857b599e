// A run directory holds one run: config.json, metrics.jsonl, checkpoints/. A fresh
// run into a directory that already holds files fails before anything is loaded,
// so two runs never mix their metrics and checkpoints; `resumeFrom` continues a
// run there, `overwrite: true` replaces it.
import { existsSync, readdirSync, rmSync, statSync } from "node:fs";
import { join, relative, resolve } from "node:path";
import { ConfigError } from "../errors.ts";

/** What a Trainer writes into its runDir; `overwrite` deletes these and nothing else. */
export const RUN_FILES = ["config.json", "metrics.jsonl", "checkpoints"] as const;

/**
 * Checks `runDir` for a fresh run (no resumeFrom): it must be absent or empty unless
 * `overwrite` is set; with `apply`, overwrite deletes its config.json, metrics.jsonl
 * and checkpoints/. Throws a ConfigError (INVALID_CONFIG) naming the runDir and the fix.
 * `source` says where the config came from ("Trainer options", a file path).
 */
export function prepareRunDir(
  cfg: { runDir: string | null; resumeFrom: string | null; overwrite: boolean },
  source: string,
  apply: boolean,
): void {
  if (!cfg.runDir) return;
  const dir = resolve(cfg.runDir);
  if (!existsSync(dir)) return;
  if (!statSync(dir).isDirectory()) throw new ConfigError(source, [{ path: "runDir", message: `${dir} is a file, not a directory` }]);
  if (cfg.overwrite) {
    if (cfg.resumeFrom) {
      const rel = relative(dir, resolve(cfg.resumeFrom));
      if (!rel.startsWith("..") && rel !== resolve(cfg.resumeFrom)) {
        throw new ConfigError(source, [
          { path: "overwrite", message: `would delete the checkpoint resumeFrom names (${resolve(cfg.resumeFrom)} is inside runDir ${dir}); drop overwrite to continue that run` },
        ]);
      }
    }
    if (apply) for (const f of RUN_FILES) rmSync(join(dir, f), { recursive: true, force: true });
    return;
  }
  if (cfg.resumeFrom) return;
  const entries = readdirSync(dir);
  if (entries.length === 0) return;
  const shown = entries.slice(0, 4).join(", ") + (entries.length > 4 ? `, ... (${entries.length} entries)` : "");
  throw new ConfigError(source, [
    {
      path: "runDir",
      message:
        `${dir} already holds files (${shown}); a fresh run needs an empty runDir: ` +
        `set resumeFrom to a checkpoint to continue that run, overwrite: true to replace it (deletes its ${RUN_FILES.join(", ")}), or choose another runDir`,
    },
  ]);
}
