// Which Python runs the sidecar, tests and benchmarks: NANOTUNE_PYTHON if set,
// else the project's .venv (made by setup.mjs).
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");

export function pythonExecutable() {
  return process.env.NANOTUNE_PYTHON ?? join(repoRoot, ".venv", "bin", "python");
}
