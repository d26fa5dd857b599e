// Config files of the CLI: reading them (a missing file or bad JSON names the
// path) and resolving the paths inside them against the file's directory, so
// `nanotune train sub/config.json` means the same from any working directory.
import { existsSync, readFileSync, statSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, isAbsolute, resolve } from "node:path";
import { NanotuneError } from "../errors.ts";

/** Reads a JSON config file; INVALID_ARGUMENT when it does not exist, INVALID_CONFIG when it is not JSON. */
export function readConfigFile(path: string): unknown {
  const abs = resolve(path);
  if (!existsSync(abs)) throw new NanotuneError("INVALID_ARGUMENT", `config file ${path} does not exist`, { data: { path: abs } });
  if (statSync(abs).isDirectory()) throw new NanotuneError("INVALID_ARGUMENT", `config file ${path} is a directory, not a JSON file`, { data: { path: abs } });
  try {
    return JSON.parse(readFileSync(abs, "utf8"));
  } catch (e) {
    throw new NanotuneError("INVALID_CONFIG", `config file ${path} is not valid JSON: ${(e as Error).message}`, { data: { path: abs }, cause: e });
  }
}

function expandHome(p: string): string {
  return p === "~" || p.startsWith("~/") ? homedir() + p.slice(1) : p;
}

/** A file or directory path in a config file: absolute as is, else relative to the config's directory. */
export function resolvePath(p: string, baseDir: string): string {
  const e = expandHome(p);
  return isAbsolute(e) ? e : resolve(baseDir, e);
}

/**
 * Whether a config value reads as a Hugging Face Hub id ("org/name": one slash, plain
 * name characters, no file extension) rather than a relative path. Used only when
 * nothing exists at the path it would resolve to.
 */
export function looksLikeHubId(p: string): boolean {
  return /^[A-Za-z0-9][\w.-]*\/[\w.-]+$/.test(p) && !/\.(jsonl?|csv|parquet|arrow|txt|gguf|safetensors|bin)$/i.test(p);
}

/**
 * A model in a config file: a local directory path (resolved like resolvePath), a
 * preset name ("tiny-llama") or a Hub id ("org/name", resolved by the sidecar through
 * the HF cache, docs/models.md); the last two stay as they are when nothing exists at
 * the path they would name relative to the config's directory.
 */
export function resolveModelPath(p: string, baseDir: string): string {
  const e = expandHome(p);
  if (isAbsolute(e)) return e;
  const candidate = resolve(baseDir, e);
  if (existsSync(candidate)) return candidate;
  return (e.includes("/") || e.includes("\\")) && !looksLikeHubId(e) ? candidate : p;
}

/** data.path / data.evalPath: a file or folder resolved like resolvePath, or a Hub dataset id kept as it is (docs/data.md). */
export function resolveDataPath(p: string, baseDir: string): string {
  const candidate = resolvePath(p, baseDir);
  return !existsSync(candidate) && looksLikeHubId(p) ? p : candidate;
}

const isRecord = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);

/**
 * The paths of a Trainer config (model, data.path, data.evalPath, runDir,
 * resumeFrom) resolved against `baseDir`. Works on the raw JSON, before
 * validation: anything of the wrong type is left for parseConfig to name.
 */
export function resolveTrainConfigPaths(raw: unknown, baseDir: string): unknown {
  if (!isRecord(raw)) return raw;
  const out: Record<string, unknown> = { ...raw };
  if (typeof out.model === "string") out.model = resolveModelPath(out.model, baseDir);
  else if (isRecord(out.model) && typeof out.model.path === "string") out.model = { ...out.model, path: resolveModelPath(out.model.path, baseDir) };
  if (typeof out.data === "string") out.data = resolveDataPath(out.data, baseDir);
  else if (isRecord(out.data)) {
    const data: Record<string, unknown> = { ...out.data };
    if (typeof data.path === "string") data.path = resolveDataPath(data.path, baseDir);
    if (typeof data.evalPath === "string") data.evalPath = resolveDataPath(data.evalPath, baseDir);
    out.data = data;
  }
  for (const key of ["runDir", "resumeFrom"] as const) {
    if (typeof out[key] === "string") out[key] = resolvePath(out[key], baseDir);
  }
  return out;
}

/** readConfigFile + resolveTrainConfigPaths against the file's directory. */
export function loadTrainConfig(path: string): unknown {
  return resolveTrainConfigPaths(readConfigFile(path), dirname(resolve(path)));
}
