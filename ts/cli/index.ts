// The `nanotune` command line (bin: dist/ts/cli/bin.js; from a checkout:
// `npx tsx ts/cli/bin.ts`). `main(argv)` returns the exit code and never exits
// the process itself, so tests call it in-process.
//
// Exit codes: 0 ok; 2 a user error (wrong config field, missing file, bad
// argument, no Python set up: one line `nanotune: ...` on stderr); 1 anything
// else (one line, plus the stack trace with --verbose), including a training run
// stopped by a non-finite step; 130 / 143 `train` interrupted by SIGINT / SIGTERM
// (a second signal makes `train` exit the process at once: ts/cli/train.ts).
import { existsSync } from "node:fs";
import { join } from "node:path";
import { parseArgs, type ParseArgsConfig } from "node:util";
import { runTinyDemo } from "../demo.ts";
import { runRealDemo } from "../demo-real.ts";
import { isUserError, NanotuneError } from "../errors.ts";
import { packageRoot, packageVersion } from "../paths.ts";
import { doctorCommand } from "./doctor.ts";
import { evalCommand } from "./eval.ts";
import { exportCommand } from "./export.ts";
import { nodeCommand } from "./node.ts";
import { plotCommand } from "./plot.ts";
import { runPython } from "./python.ts";
import { setupCommand } from "./setup.ts";
import { trainCommand } from "./train.ts";

type Options = NonNullable<ParseArgsConfig["options"]>;
type Values = Record<string, string | boolean | undefined>;

interface Command {
  /** one line for the command list */
  summary: string;
  /** `nanotune <cmd> --help` */
  usage: string;
  options: Options;
  /** how many positionals it takes (min, max) and what they are called in errors */
  positionals: [number, number, string];
  run(positionals: string[], values: Values, verbose: boolean): Promise<number>;
}

const GLOBAL_OPTIONS = {
  help: { type: "boolean", short: "h" },
  version: { type: "boolean" },
  verbose: { type: "boolean" },
} satisfies Options;

const COMMON = `
options:
  -h, --help     show this help
  --verbose      print stack traces of errors`;

const COMMANDS: Record<string, Command> = {
  train: {
    summary: "train <config.json>    finetune as a JSON config says (see examples/finetune/config.json)",
    usage: `usage: nanotune train <config.json> [--dashboard [--port N]]

Finetunes with the Trainer as the config says: the Trainer's options as JSON
({model, data, optimizer, steps, microBatch, gradAccum, lr, gradClip, maskPolicy,
evalEvery, checkpointEvery, runDir, resumeFrom, overwrite, onNonFinite, maxSkips,
distributed}). A wrong or unknown field is an error that names it.
"distributed": {"nprocPerNode": N} trains on a sidecar group of N ranks
(torchrun; microBatch is per rank; see docs/distributed.md and nanotune node).
Relative paths in the file (a model directory, data.path, data.evalPath, runDir,
resumeFrom) are relative to the file's directory; a preset name such as
"tiny-llama" stays a preset.

Progress goes to stderr (a bar on a terminal, log lines otherwise); with runDir
every event is also appended to <runDir>/metrics.jsonl. A runDir that already
holds files is an error unless the config resumes (resumeFrom) or sets
"overwrite": true.

Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint (with
runDir) and exits 130 or 143; a second one exits at once. A step whose loss or
gradient norm is not finite ends the run with exit code 1 (onNonFinite "stop",
the default; "skip" skips up to maxSkips such steps in a row).

--dashboard serves a live page of the run on 127.0.0.1 and prints its URL, which
carries a random access token (every request without it gets 403): loss and eval
loss, lr, density, gradient norm and tokens/s, refreshes and policy swaps, a
|w| vs |grad| scatter of a chosen tensor, and controls: switch the mask policy,
pause/resume, stop-and-save (as the first Ctrl-C, but the exit code is 0). The
server closes when the run ends. See docs/dashboard.md.

options:
  --dashboard    serve the live dashboard (its URL goes to stderr)
  --port N       the dashboard's port (default: any free port)
  -h, --help     show this help
  --verbose      print stack traces of errors`,
    options: { dashboard: { type: "boolean" }, port: { type: "string" } },
    positionals: [1, 1, "a config file"],
    run([config], values, verbose) {
      let port: number | undefined;
      if (values.port !== undefined) {
        if (!values.dashboard) throw new NanotuneError("INVALID_ARGUMENT", "train: --port needs --dashboard");
        port = Number(values.port);
        if (!/^\d+$/.test(String(values.port)) || port > 65535) throw new NanotuneError("INVALID_ARGUMENT", `train: --port must be an integer in 0..65535, got '${values.port}'`);
      }
      return trainCommand(config!, { verbose, dashboard: values.dashboard ? { port } : undefined });
    },
  },
  node: {
    summary: "node --nnodes N ...    join a multi-node sidecar group as node 1..N-1 (node 0 runs train or Sidecar.start)",
    usage: `usage: nanotune node --nnodes N --node-rank R --rdzv-endpoint HOST:PORT [--nproc-per-node K] [--device auto|cpu|cuda] [--backend gloo|nccl]

Starts node R (1..N-1) of a sidecar group of N nodes: torchrun runs K sidecar ranks
here, which join node 0 at HOST:PORT (torchrun's static rendezvous: node 0's
address and a free port, the "rdzvEndpoint" of node 0's "distributed" option) and
follow its global rank 0. Node 0 is where \`nanotune train\` (a config with
"distributed": {"nprocPerNode", "nnodes", "rdzvEndpoint"}) or
Sidecar.start({ distributed }) runs; it alone serves the client. Start the other
nodes first or soon after it. This command lasts as long as the group: when node 0
closes, this node's ranks end and it exits with torchrun's exit code. Rank traffic
between nodes (gloo, nccl, torchrun's store) is neither encrypted nor
authenticated: use a trusted network. See docs/distributed.md.

SIGINT or SIGTERM stops this node's ranks, which ends the whole group (node 0's
calls fail with SIDECAR_CRASHED); a second one kills them.

options:
  --nnodes N              nodes in the group (2 or more)
  --node-rank R           this node's rank, 1..N-1
  --rdzv-endpoint H:P     node 0's host and port
  --nproc-per-node K      ranks on this node (default 1; on CUDA one per GPU)
  --device D              auto (default: cuda when torch sees a GPU), cpu or cuda
  --backend B             gloo or nccl (default: nccl on CUDA, gloo on the CPU);
                          the same on every node
  -h, --help              show this help
  --verbose               print stack traces of errors`,
    options: {
      nnodes: { type: "string" },
      "node-rank": { type: "string" },
      "rdzv-endpoint": { type: "string" },
      "nproc-per-node": { type: "string" },
      device: { type: "string" },
      backend: { type: "string" },
    },
    positionals: [0, 0, ""],
    async run(_p, values) {
      const int = (flag: string, fallback?: number): number => {
        const v = values[flag];
        if (v === undefined) {
          if (fallback !== undefined) return fallback;
          throw new NanotuneError("INVALID_ARGUMENT", `node: --${flag} is required (see nanotune node --help)`);
        }
        if (!/^\d+$/.test(String(v))) throw new NanotuneError("INVALID_ARGUMENT", `node: --${flag} must be a non-negative integer, got '${v}'`);
        return Number(v);
      };
      const nnodes = int("nnodes");
      const nodeRank = int("node-rank");
      const rdzvEndpoint = values["rdzv-endpoint"];
      if (rdzvEndpoint === undefined) throw new NanotuneError("INVALID_ARGUMENT", "node: --rdzv-endpoint is required: node 0's HOST:PORT (see nanotune node --help)");
      const device = values.device ?? "auto";
      if (device !== "auto" && device !== "cpu" && device !== "cuda") throw new NanotuneError("INVALID_ARGUMENT", `node: --device must be auto, cpu or cuda, got '${device}'`);
      const backend = values.backend;
      if (backend !== undefined && backend !== "gloo" && backend !== "nccl") throw new NanotuneError("INVALID_ARGUMENT", `node: --backend must be gloo or nccl, got '${backend}'`);
      const flags: Record<string, string> = { nprocPerNode: "--nproc-per-node", nnodes: "--nnodes", nodeRank: "--node-rank", rdzvEndpoint: "--rdzv-endpoint" };
      try {
        return await nodeCommand({ nnodes, nodeRank, rdzvEndpoint: String(rdzvEndpoint), nprocPerNode: int("nproc-per-node", 1), device, backend });
      } catch (e) {
        // parseDistributed names the option's field (distributed.nnodes): say the flag instead
        const field = e instanceof NanotuneError && e.code === "INVALID_PARAMS" ? (e.data as { field?: string } | undefined)?.field : undefined;
        const flag = field && flags[field.replace(/^distributed\./, "")];
        if (!flag) throw e;
        throw new NanotuneError("INVALID_ARGUMENT", `node: ${flag}: ${e instanceof Error ? e.message.replace(/^.*?: distributed\.\w+: /, "") : e}`, { cause: e });
      }
    },
  },
  eval: {
    summary: "eval <config.json>     per-task accuracy on local benchmark files",
    usage: `usage: nanotune eval <config.json>

Scores a model directory on local benchmark files and prints a per-task table.
The config:
  {"model": "path/to/model",                 (a save_pretrained directory)
   "tasks": {"piqa": "piqa.jsonl", ...},      (task name -> JSON/JSONL file)
   "mode": "loglikelihood" | "generate",      (default loglikelihood)
   "limit": 100}                              (first N examples of each task)
Relative paths are relative to the config file's directory.
${COMMON}`,
    options: {},
    positionals: [1, 1, "a config file"],
    run: ([config]) => evalCommand(config!),
  },
  plot: {
    summary: "plot <runDir>          PNG curves of a run (loss, eval, lr, density; swaps and refreshes marked)",
    usage: `usage: nanotune plot <runDir> [--out FILE.png]

Draws the curves of a run from <runDir>/metrics.jsonl into a PNG, no browser
needed: train and eval loss, lr, density, gradient norm and tokens/s against the
step, with mask-policy swaps (labelled with the new policy), mask refreshes,
skipped steps and resumes marked; the title names the model and optimizer.
Matplotlib draws it in the sidecar's Python (see docs/plot.md). A run resumed
into the same runDir shows its latest timeline: points of steps taken again
after the resume replace the earlier ones. Prints the PNG's path.

options:
  --out FILE.png  where the PNG goes (default <runDir>/curves.png)
  -h, --help      show this help
  --verbose       print stack traces of errors`,
    options: { out: { type: "string" } },
    positionals: [1, 1, "a run directory"],
    run: ([runDir], values) => plotCommand(runDir!, { out: values.out as string | undefined }),
  },
  export: {
    summary: "export <checkpoint>    a checkpoint's model as its own directory; --merge folds a LoRA adapter into its base",
    usage: `usage: nanotune export <checkpointDir> --out DIR [--merge [--base DIR]]

Writes the model of a checkpoint (<runDir>/checkpoints/step-N) to DIR. Without
--merge model/ is copied as it is: for a LoRA run (model.lora) the adapter in
PEFT's format (adapter_config.json, adapter_model.safetensors, the tokenizer),
which peft.PeftModel.from_pretrained(base, DIR) loads; for a full run the HF
model directory. With --merge the LoRA adapter is merged into its base model
(merge_and_unload, on the CPU in float32, saved in the base's dtype): DIR is a
plain HF directory that AutoModelForCausalLM.from_pretrained(DIR) loads without
PEFT. The base is the directory the adapter config names (base_model_name_or_path,
the model the run loaded); --base DIR gives another copy of it. DIR must not
exist or be empty: nothing is overwritten. Prints DIR. See docs/lora.md.

options:
  --out DIR      the directory to write (required)
  --merge        merge the LoRA adapter into its base (a plain HF directory)
  --base DIR     with --merge: the base model directory (default: the adapter's)
  -h, --help     show this help
  --verbose      print stack traces of errors`,
    options: { out: { type: "string" }, merge: { type: "boolean" }, base: { type: "string" } },
    positionals: [1, 1, "a checkpoint directory"],
    run: ([checkpoint], values) =>
      exportCommand(checkpoint!, { out: values.out as string | undefined, merge: values.merge === true, base: values.base as string | undefined }),
  },
  demo: {
    summary: "demo                   SmolLM2-135M learns made-up facts: NanoAdam vs AdamW, and what it forgets (what `npm start` runs)",
    usage: `usage: nanotune demo [--steps N] [--run-dir DIR] [--tiny]

A real pretrained Llama (SmolLM2-135M-Instruct, the smollm2-135m preset) learns
eight made-up facts with NanoAdam (a live mask-policy swap halfway) and with AdamW,
each at its own learning rate; prints its answers before and after, and how many
general-knowledge answers each run kept. About two minutes on a CPU.

options:
  --steps N      steps per optimizer (default 24; --tiny: per stage, default 300)
  --run-dir DIR  where the data and metrics go (default runs/demo; --tiny: runs/demo-tiny)
  --tiny         the seconds-long demo on a tiny random Llama instead: AdamW on one
                 task, then NanoAdam on a second with a live mask-policy swap
  -h, --help     show this help
  --verbose      print stack traces of errors`,
    options: { steps: { type: "string" }, "run-dir": { type: "string" }, tiny: { type: "boolean" } },
    positionals: [0, 0, ""],
    async run(_p, values) {
      let steps: number | undefined;
      if (values.steps !== undefined) {
        steps = Number(values.steps);
        if (!Number.isInteger(steps) || steps < 1) throw new NanotuneError("INVALID_ARGUMENT", `demo: --steps must be a positive integer, got '${values.steps}'`);
      }
      const runDir = values["run-dir"] as string | undefined;
      if (values.tiny === true) await runTinyDemo({ progress: false, steps, runDir });
      else await runRealDemo({ progress: false, steps, runDir });
      return 0;
    },
  },
  setup: {
    summary: "setup                  create the Python environment the sidecar runs in (torch, transformers)",
    usage: `usage: nanotune setup [--python PATH] [--torch SPEC] [--force]

Creates a virtualenv for this nanotune version in
$NANOTUNE_HOME/python-${packageVersion}/ (NANOTUNE_HOME defaults to ~/.cache/nanotune)
and installs torch and the sidecar's Python package into it. Sidecar.start() and
the CLI use it unless NANOTUNE_PYTHON names another interpreter. Rerunning with
the same arguments does nothing.

options:
  --python PATH  the Python (3.10+) that creates the virtualenv (default python3)
  --torch SPEC   the torch requirement, with pip options if needed
                 (default torch==2.13.0, the version nanotune is tested with), e.g.
                 --torch "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
  --force        recreate the environment even when it is up to date
  -h, --help     show this help
  --verbose      print stack traces of errors`,
    options: { python: { type: "string" }, torch: { type: "string" }, force: { type: "boolean" } },
    positionals: [0, 0, ""],
    async run(_p, values) {
      await setupCommand({ python: values.python as string | undefined, torch: values.torch as string | undefined, force: values.force === true });
      return 0;
    },
  },
  doctor: {
    summary: "doctor                 check Python, torch, CUDA devices, transformers and the protocol version",
    usage: `usage: nanotune doctor

Prints the Python the sidecar would run (and where it was found), its torch,
CUDA availability and devices, transformers, and the protocol versions of both
sides; lists what is missing with the command that fixes it. Exits 0 when all is
well, 2 when something is missing.
${COMMON}`,
    options: {},
    positionals: [0, 0, ""],
    run: () => doctorCommand(),
  },
  bench: {
    summary: "bench gpu [args]       peak memory and step time of AdamW vs NanoAdam (bench/gpu.py)",
    usage: `usage: nanotune bench gpu [args...]

Runs bench/gpu.py (peak memory and step time of AdamW vs NanoAdam on the Llama 3.2
3B architecture; --small for a smaller one) with the sidecar's Python; the args
go to it as they are (after \`--\` even --help: nanotune bench gpu -- --help). The
benchmarks ship with the source checkout, not with the npm package.
${COMMON}`,
    options: {},
    positionals: [1, Infinity, "a benchmark name (gpu)"],
    async run([name, ...args]) {
      if (name !== "gpu") throw new NanotuneError("INVALID_ARGUMENT", `bench: unknown benchmark '${name}' (there is one: gpu)`);
      const script = join(packageRoot, "bench", "gpu.py");
      if (!existsSync(script)) {
        throw new NanotuneError("INVALID_ARGUMENT", `bench: ${script} is not here: the benchmarks ship with the source checkout, not the npm package`);
      }
      return runPython([script, ...args]);
    },
  },
};

const USAGE = `usage: nanotune <command> [options]

commands:
${Object.values(COMMANDS)
  .map((c) => `  ${c.summary}`)
  .join("\n")}

options:
  -h, --help     show help; nanotune help <command> (or <command> --help) for a command
  --version      print nanotune's version
  --verbose      print stack traces of errors

Paths inside config files are relative to the config file's directory.`;

const commandList = Object.keys(COMMANDS).join(", ");

/** Exit 2 for these even where the code table does not mark them as user errors. */
const USER_CODES = new Set(["INVALID_CONFIG", "INVALID_ARGUMENT", "INVALID_PARAMS", "START_FAILED"]);

function usageError(message: string): NanotuneError {
  return new NanotuneError("INVALID_ARGUMENT", message);
}

/** parseArgs with our messages: `train: unknown option '--x' (see nanotune train --help)`; `command` "" for the global options. */
function parse(args: string[], options: Options, command: string, allowPositionals: boolean) {
  try {
    return parseArgs({ args, options, allowPositionals, strict: true });
  } catch (e) {
    const err = e as Error & { code?: string };
    if (!err.code?.startsWith("ERR_PARSE_ARGS")) throw e;
    const first = err.message.split(/\. /)[0]!.replace(/\.$/, "");
    const what = first.charAt(0).toLowerCase() + first.slice(1);
    throw usageError(command ? `${command}: ${what} (see nanotune ${command} --help)` : `${what} (see nanotune --help)`);
  }
}

function isHelp(a: string) {
  return a === "--help" || a === "-h";
}

async function dispatch(argv: string[], setVerbose: (v: boolean) => void): Promise<number> {
  // global options come before the command; the command's own after it
  const at = argv.findIndex((a) => !a.startsWith("-"));
  const leading = at === -1 ? argv : argv.slice(0, at);
  const name = at === -1 ? undefined : argv[at];
  const rest = at === -1 ? [] : argv.slice(at + 1);
  const globals = parse(leading, GLOBAL_OPTIONS, "", false).values;
  if (globals.version) {
    console.log(packageVersion);
    return 0;
  }
  if (name === undefined) {
    if (globals.help) {
      console.log(USAGE);
      return 0;
    }
    throw usageError(`missing command (one of ${commandList}; see nanotune --help)`);
  }
  if (name === "help") {
    const topic = rest.find((a) => !a.startsWith("-"));
    if (topic === undefined) {
      console.log(USAGE);
      return 0;
    }
    const cmd = COMMANDS[topic];
    if (!cmd) throw usageError(`unknown command '${topic}' (one of ${commandList})`);
    console.log(cmd.usage);
    return 0;
  }
  const cmd = Object.hasOwn(COMMANDS, name) ? COMMANDS[name] : undefined;
  if (!cmd) throw usageError(`unknown command '${name}' (one of ${commandList}; see nanotune --help)`);
  if (globals.help) {
    console.log(cmd.usage);
    return 0;
  }

  if (name === "bench") {
    // `bench gpu ARGS`: ARGS belong to the benchmark (all of them after `--`)
    const dashes = rest.indexOf("--");
    const ours = dashes === -1 ? rest : rest.slice(0, dashes);
    if (ours.some(isHelp)) {
      console.log(cmd.usage);
      return 0;
    }
    if (ours.length === 0) throw usageError("bench: missing the benchmark name (gpu; see nanotune bench --help)");
    return cmd.run(dashes === -1 ? rest : [...ours, ...rest.slice(dashes + 1)], {}, Boolean(globals.verbose));
  }

  const { values, positionals } = parse(rest, { ...GLOBAL_OPTIONS, ...cmd.options }, name, true);
  if (values.help) {
    console.log(cmd.usage);
    return 0;
  }
  if (values.version) {
    console.log(packageVersion);
    return 0;
  }
  const verbose = Boolean(globals.verbose || values.verbose);
  setVerbose(verbose);
  const [min, max, what] = cmd.positionals;
  if (positionals.length < min) throw usageError(`${name}: missing ${what} (usage: ${cmd.usage.split("\n")[0]!.replace("usage: ", "")})`);
  if (positionals.length > max) {
    throw usageError(`${name}: unexpected argument '${positionals[max]}' (usage: ${cmd.usage.split("\n")[0]!.replace("usage: ", "")})`);
  }
  return cmd.run(positionals, values as Values, verbose);
}

/** One line for an error: the first line of its message (a sidecar's stderr tail was already printed above). */
function oneLine(e: unknown): string {
  const message = e instanceof Error ? e.message : String(e);
  const first = message.split("\n")[0]!.trim();
  return first.replace(/;? ?last stderr:$/, "") || (e instanceof Error ? e.name : "error");
}

export function exitCodeFor(e: unknown): 1 | 2 {
  return isUserError(e) || (e instanceof NanotuneError && USER_CODES.has(e.code)) ? 2 : 1;
}

/** Runs the CLI with `argv` (without node and the script); resolves with the exit code. */
export async function main(argv: string[]): Promise<number> {
  let verbose = argv.includes("--verbose");
  try {
    return await dispatch(argv, (v) => (verbose = v));
  } catch (e) {
    const code = exitCodeFor(e);
    console.error(`nanotune: ${oneLine(e)}${code === 1 && !verbose ? " (--verbose shows the stack trace)" : ""}`);
    if (verbose) {
      if (e instanceof Error && e.stack) console.error(e.stack);
      if (e instanceof NanotuneError && e.traceback) console.error(`Python traceback:\n${e.traceback}`);
    }
    return code;
  }
}
