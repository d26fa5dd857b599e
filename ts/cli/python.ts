// Running the sidecar's Python for CLI commands (eval, bench, doctor): the same
// interpreter Sidecar.start() would use, with the shipped sources on PYTHONPATH.
import { constants } from "node:os";
import { execa } from "execa";
import { NanotuneError } from "../errors.ts";
import { findPython, noPythonMessage, pythonPathWith, type ResolvedPython } from "../paths.ts";

/** The interpreter to use; START_FAILED (saying to run `npx nanotune setup`) when there is none. */
export function requirePython(): ResolvedPython {
  const found = findPython();
  if (!found) throw new NanotuneError("START_FAILED", noPythonMessage());
  return found;
}

/** Environment for a Python run: ours, with the shipped `nanotune` package first on PYTHONPATH. */
export function pythonEnv(): Record<string, string> {
  return { PYTHONPATH: pythonPathWith(process.env.PYTHONPATH) };
}

function cannotRun(found: ResolvedPython, message: string): NanotuneError {
  return new NanotuneError(
    "START_FAILED",
    `cannot run ${found.python} (from ${found.source}): ${message}; run \`npx nanotune setup\` or set NANOTUNE_PYTHON to a working interpreter`,
  );
}

/** Runs `python ARGS` with our stdio; resolves with its exit code (128 + n when killed by signal n). */
export async function runPython(args: string[], options: { cwd?: string } = {}): Promise<number> {
  const found = requirePython();
  const r = await execa(found.python, args, { stdio: "inherit", env: pythonEnv(), cwd: options.cwd, reject: false });
  if (r.exitCode === undefined && r.signal === undefined) throw cannotRun(found, r.originalMessage || r.shortMessage || "it could not be started");
  if (r.exitCode !== undefined) return r.exitCode;
  return 128 + (r.signal ? signalNumber(r.signal) : 0);
}

/** Runs `python ARGS` and returns what it printed (stderr passes through); for small JSON reports. */
export async function capturePython(found: ResolvedPython, args: string[]): Promise<{ exitCode: number; stdout: string }> {
  const r = await execa(found.python, args, { stdin: "ignore", stdout: "pipe", stderr: "inherit", env: pythonEnv(), reject: false });
  if (r.exitCode === undefined && r.signal === undefined) throw cannotRun(found, r.originalMessage || r.shortMessage || "it could not be started");
  return { exitCode: r.exitCode ?? 1, stdout: String(r.stdout ?? "") };
}

function signalNumber(signal: string): number {
  return (constants.signals as Record<string, number | undefined>)[signal] ?? 0;
}
