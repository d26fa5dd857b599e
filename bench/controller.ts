// Controller overhead (issue 4): the step time of training driven from TypeScript
// over the bridge vs the same steps replayed in-process by Python (nanotune.plainloop),
// for the tiny preset and the ~30M small-llama preset, in one run, as ratios.
// Targets: <= 1.05 (tiny) and <= 1.01 (~30M).
//
//   npm run bench:controller  [-- --rounds 2]
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import { parseArgs } from "node:util";
import { demoTasks } from "../ts/demo.ts";
// @ts-expect-error plain ESM helper without types
import { pythonExecutable, repoRoot } from "../ts/dev/python.mjs";
import { Sidecar, Trainer } from "../ts/index.ts";

const { values: args } = parseArgs({ options: { rounds: { type: "string", default: "2" } } });
const rounds = Number(args.rounds);
const dir = mkdtempSync(join(tmpdir(), "nanotune-bench-controller-"));
const data = join(dir, "double.jsonl");
writeFileSync(data, demoTasks(400).double.map((r) => JSON.stringify(r)).join("\n") + "\n");

const cases = [
  { name: "tiny-llama", steps: 150, warmup: 20, microBatch: 8 },
  { name: "small-llama", steps: 24, warmup: 4, microBatch: 8 },
];

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

function configFor(c: (typeof cases)[number]) {
  return {
    model: { path: c.name, device: "cpu" },
    data: { path: data, cutoff: 64 },
    optimizer: { name: "nanoadam" as const, density: 0.1 },
    steps: c.steps,
    microBatch: c.microBatch,
    lr: 1e-3,
    maskPolicy: { type: "smallWeights" as const, density: 0.1, maskInterval: 50 },
  };
}

/** Runs the Trainer into a fresh runDir (which pythonDriven then replays); returns its step times. */
async function tsDriven(c: (typeof cases)[number], runDir: string): Promise<number[]> {
  const sidecar = await Sidecar.start({ device: "cpu" });
  try {
    const times: number[] = [];
    let last = 0;
    // the default sinks: metrics.jsonl in runDir, as any run with a runDir writes it
    for await (const ev of new Trainer({ sidecar, ...configFor(c), runDir, progress: false }).run()) {
      const now = performance.now();
      if (ev.type === "train:step") {
        if (ev.step >= c.warmup && !ev.maskRefreshed) times.push((now - last) / 1000);
        last = now;
      } else last = now; // run:start, eval...: the next step's clock starts here
    }
    return times;
  } finally {
    await sidecar.close();
  }
}

/** Replays the TS run's recorded lr and mask decisions in process (nanotune.plainloop); returns its step times. */
function pythonDriven(c: (typeof cases)[number], runDir: string): number[] {
  const r = spawnSync(pythonExecutable(), ["-m", "nanotune.plainloop", runDir], {
    encoding: "utf8",
    maxBuffer: 64 << 20,
    env: { ...process.env, PYTHONPATH: [join(repoRoot, "python"), process.env.PYTHONPATH].filter(Boolean).join(delimiter) },
  });
  if (r.status !== 0) throw new Error(`plainloop failed: ${r.stderr}`);
  const steps = JSON.parse(r.stdout) as { step: number; wall_s: number; mask_refreshed: boolean }[];
  return steps.filter((s) => s.step >= c.warmup && !s.mask_refreshed).map((s) => s.wall_s);
}

try {
  console.log(`# controller overhead: TS Trainer over the bridge vs in-process Python loop, CPU, median step (refresh steps excluded), ${rounds} rounds interleaved`);
  console.log("| model | params | TS-driven ms | Python ms | ratio | target |");
  console.log("|---|---|---|---|---|---|");
  for (const c of cases) {
    const ts: number[] = [];
    const py: number[] = [];
    for (let i = 0; i < rounds; i++) {
      const runDir = join(dir, `${c.name}-${i}`);
      ts.push(...(await tsDriven(c, runDir)));
      py.push(...pythonDriven(c, runDir));
    }
    const ratio = median(ts) / median(py);
    const target = c.name === "tiny-llama" ? 1.05 : 1.01;
    const params = c.name === "tiny-llama" ? "0.13M" : "29M";
    console.log(`| ${c.name} | ${params} | ${(median(ts) * 1e3).toFixed(2)} | ${(median(py) * 1e3).toFixed(2)} | ${ratio.toFixed(3)} | <= ${target} ${ratio <= target ? "met" : "NOT met"} |`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
