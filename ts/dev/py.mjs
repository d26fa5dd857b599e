// `node ts/dev/py.mjs ARGS...` runs the project's Python (see python.mjs) with
// ARGS in the repository root, python/ on PYTHONPATH, and passes its exit code on.
import { delimiter, join } from "node:path";
import { execa } from "execa";
import { pythonExecutable, repoRoot } from "./python.mjs";

const python = pythonExecutable();
const r = await execa(python, process.argv.slice(2), {
  cwd: repoRoot,
  stdio: "inherit",
  env: { PYTHONPATH: [join(repoRoot, "python"), process.env.PYTHONPATH].filter(Boolean).join(delimiter) },
  reject: false,
});
if (r.exitCode === undefined && r.signal === undefined) {
  console.error(`cannot run ${python}: ${r.originalMessage || r.shortMessage}; run \`npm run setup\` first`);
  process.exit(1);
}
process.exit(r.exitCode ?? 1);
