// Which Python runs the sidecar, tests and benchmarks in a checkout: NANOTUNE_PYTHON
// if set, else the project's .venv (made by setup.mjs). Plain JS: it runs before
// node_modules exist. (Installed packages use ts/paths.ts's findPython, which
// also knows the environment `npx nanotune setup` makes.)
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

/** The checkout: the nearest directory above this file whose package.json is named "nanotune". */
function findRoot(from) {
  for (let dir = from; ; dir = dirname(dir)) {
    const pkg = join(dir, "package.json");
    if (existsSync(pkg) && JSON.parse(readFileSync(pkg, "utf8")).name === "nanotune") return dir;
    if (dirname(dir) === dir) throw new Error(`no package.json named "nanotune" above ${from}`);
  }
}

export const repoRoot = findRoot(dirname(fileURLToPath(import.meta.url)));

export function pythonExecutable() {
  return process.env.NANOTUNE_PYTHON ?? join(repoRoot, ".venv", process.platform === "win32" ? "Scripts" : "bin", process.platform === "win32" ? "python.exe" : "python");
}
