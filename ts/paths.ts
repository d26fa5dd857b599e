// Where nanotune is installed and which Python runs its sidecar. Works the same
// from the source checkout (ts/paths.ts) and from the built package
// (dist/ts/paths.js inside node_modules/nanotune): the package root is the nearest
// directory above this file whose package.json is named "nanotune".
import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { homedir } from "node:os";
import { delimiter, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

function findPackageRoot(from: string): string {
  for (let dir = from; ; dir = dirname(dir)) {
    try {
      const pkg = JSON.parse(readFileSync(join(dir, "package.json"), "utf8")) as { name?: unknown };
      if (pkg.name === "nanotune") return dir;
    } catch {
      // no package.json here (or not JSON): keep walking up
    }
    if (dirname(dir) === dir) throw new Error(`nanotune: no package.json named "nanotune" in ${from} or above`);
  }
}

/** The directory of nanotune's package.json: the checkout, or node_modules/nanotune. */
export const packageRoot: string = findPackageRoot(dirname(fileURLToPath(import.meta.url)));
/** The npm package's version (package.json). */
export const packageVersion: string = (JSON.parse(readFileSync(join(packageRoot, "package.json"), "utf8")) as { version: string }).version;
/** What the sidecar needs on PYTHONPATH: the `nanotune` Python package shipped with this one. */
export const pythonSourceDir: string = join(packageRoot, "python");

/** The torch requirement `nanotune setup` installs unless told otherwise: the version we test. */
export const DEFAULT_TORCH = "torch==2.13.0";

type Env = Record<string, string | undefined>;

/** $NANOTUNE_HOME, else ~/.cache/nanotune: where `nanotune setup` puts its virtualenvs. */
export function nanotuneHome(env: Env = process.env): string {
  return env.NANOTUNE_HOME || join(homedir(), ".cache", "nanotune");
}

/** The interpreter of a virtualenv directory. */
export function venvPython(dir: string): string {
  return process.platform === "win32" ? join(dir, "Scripts", "python.exe") : join(dir, "bin", "python");
}

/** What `nanotune setup` records once an environment is complete; rerunning with the same stamp does nothing. */
export interface SetupStamp {
  /** the npm package version the environment was made for */
  version: string;
  /** the torch requirement installed (e.g. torch==2.13.0) */
  torch: string;
  /** the interpreter that created the virtualenv (--python) */
  basePython: string;
  /** sha256 of the shipped pyproject.toml: the sidecar's dependencies */
  pyproject: string;
}

export interface ManagedEnv {
  /** <NANOTUNE_HOME>/python-<version> */
  dir: string;
  python: string;
  stampPath: string;
  /** the stamp of a finished setup for this version; null when setup never finished */
  stamp: SetupStamp | null;
}

/**
 * The virtualenv `nanotune setup` makes for this package version, keyed by the
 * version: <NANOTUNE_HOME>/python-<version>/. Shared by setup (which writes the
 * stamp last) and Sidecar.start (which only uses an environment whose stamp exists).
 */
export function managedEnv(env: Env = process.env): ManagedEnv {
  const dir = join(nanotuneHome(env), `python-${packageVersion}`);
  const stampPath = join(dir, "nanotune-setup.json");
  let stamp: SetupStamp | null = null;
  try {
    const s = JSON.parse(readFileSync(stampPath, "utf8")) as SetupStamp;
    if (s.version === packageVersion) stamp = s;
  } catch {
    // absent or unreadable: not set up
  }
  return { dir, python: venvPython(dir), stampPath, stamp };
}

/** The stamp a setup with these arguments would write (compare with managedEnv().stamp). */
export function setupStamp(torch: string, basePython: string): SetupStamp {
  const pyproject = createHash("sha256").update(readFileSync(join(packageRoot, "pyproject.toml"))).digest("hex");
  return { version: packageVersion, torch, basePython, pyproject };
}

export type PythonSource = "option" | "NANOTUNE_PYTHON" | "checkout .venv" | "nanotune setup";

export interface ResolvedPython {
  python: string;
  /** where it came from: options.python, env NANOTUNE_PYTHON, the checkout's .venv, or the environment of `nanotune setup` */
  source: PythonSource;
}

/**
 * Which Python runs the sidecar, in this order: `explicit` (SidecarOptions.python),
 * env NANOTUNE_PYTHON, <packageRoot>/.venv (a development checkout), the
 * environment `nanotune setup` made for this version. null when there is none.
 * An explicit interpreter or NANOTUNE_PYTHON is returned whether or not it exists
 * (starting it then fails with its own message).
 */
export function findPython(explicit?: string, env: Env = process.env): ResolvedPython | null {
  if (explicit) return { python: explicit, source: "option" };
  if (env.NANOTUNE_PYTHON) return { python: env.NANOTUNE_PYTHON, source: "NANOTUNE_PYTHON" };
  const checkout = venvPython(join(packageRoot, ".venv"));
  if (existsSync(checkout)) return { python: checkout, source: "checkout .venv" };
  const managed = managedEnv(env);
  if (managed.stamp && existsSync(managed.python)) return { python: managed.python, source: "nanotune setup" };
  return null;
}

/** The message when findPython() found nothing. */
export function noPythonMessage(env: Env = process.env): string {
  return (
    `no Python environment for nanotune ${packageVersion} (looked for ${managedEnv(env).dir}): ` +
    "run `npx nanotune setup` to create one, or set NANOTUNE_PYTHON to an interpreter that has torch, transformers, pyzmq and msgspec"
  );
}

/** PYTHONPATH for a Python run: the shipped sources first, then what was there. */
export function pythonPathWith(existing: string | undefined): string {
  return [pythonSourceDir, existing].filter(Boolean).join(delimiter);
}
