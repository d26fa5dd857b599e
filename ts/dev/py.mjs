// `node ts/dev/py.mjs ARGS...` runs the project's Python (see python.mjs) with
// ARGS in the repository root, python/ on PYTHONPATH, and passes its exit code on.
import { spawnSync } from "node:child_process";
import { delimiter, join } from "node:path";
import { pythonExecutable, repoRoot } from "./python.mjs";

const pythonPath = [join(repoRoot, "python"), process.env.PYTHONPATH].filter(Boolean).join(delimiter);
const r = spawnSync(pythonExecutable(), process.argv.slice(2), {
  cwd: repoRoot,
  stdio: "inherit",
  env: { ...process.env, PYTHONPATH: pythonPath },
});
if (r.error) {
  console.error(`cannot run ${pythonExecutable()}: ${r.error.message}; run \`npm run setup\` first`);
  process.exit(1);
}
process.exit(r.status ?? 1);
