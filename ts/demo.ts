// `nanotune demo --tiny`: a tiny random Llama learns one task with AdamW, then NanoAdam
// finetunes it on a second task, with a live mask-policy swap halfway, and a summary
// table at the end. Seconds on a CPU; the fast tests use it. `nanotune demo` (and
// `npm start`) is the real-weights demo, ts/demo-real.ts.
import { mkdirSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import chalk from "chalk";
import { Sidecar } from "./sidecar.ts";
import { policies } from "./train/policies.ts";
import { schedules } from "./train/schedules.ts";
import { Trainer, type TrainerEvent } from "./train/trainer.ts";

/** Deterministic tiny tasks: number facts the tiny tokenizer can spell. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function demoTasks(n = 400, seed = 0) {
  const rnd = mulberry32(seed);
  const int = (k: number) => Math.floor(rnd() * k);
  const count = Array.from({ length: n }, () => {
    const a = int(50);
    return { instruction: `Count on from ${a}.`, input: "", output: [1, 2, 3, 4].map((d) => a + d).join(" ") };
  });
  const double = Array.from({ length: n }, () => {
    const a = int(50);
    return { instruction: `Double ${a}.`, input: "", output: `${2 * a}` };
  });
  return { count, double };
}

interface Row {
  stage: string;
  optimizer: string;
  policy: string;
  steps: number;
  firstLoss: number;
  lastLoss: number;
  evalLoss: number | null;
  stateBytes: number;
}

export async function runTinyDemo(opts: { runDir?: string; steps?: number; progress?: boolean } = {}): Promise<Row[]> {
  const runDir = resolve(opts.runDir ?? "runs/demo-tiny");
  const steps = opts.steps ?? 300;
  mkdirSync(runDir, { recursive: true });
  const tasks = demoTasks();
  const files: Record<string, string> = {};
  for (const [name, rows] of Object.entries(tasks)) {
    files[name] = join(runDir, `${name}.jsonl`);
    writeFileSync(files[name], rows.map((r) => JSON.stringify(r)).join("\n") + "\n");
  }
  const say = (s: string) => console.log(s);
  say(chalk.bold("nanotune demo: a tiny Llama, two tasks, AdamW then NanoAdam with a live mask-policy swap"));
  const sidecar = await Sidecar.start({ device: "auto" });
  const rows: Row[] = [];
  try {
    say(`sidecar: torch ${sidecar.info.torch} on ${sidecar.info.device}`);
    const stage = async (name: string, trainer: Trainer, swapAt?: { step: number; policy: () => ReturnType<typeof policies.random> }) => {
      const losses: number[] = [];
      let evalLoss: number | null = null;
      let stateBytes = 0;
      let optimizer = "";
      const policyNames = new Set<string>();
      for await (const ev of trainer.run()) {
        if (ev.type === "run:start") optimizer = ev.optimizer.name;
        if (ev.type === "train:step") {
          losses.push(ev.loss);
          stateBytes = ev.stateBytes;
          if (ev.policy) policyNames.add(ev.policy);
          if (swapAt && ev.step === swapAt.step) {
            const next = swapAt.policy();
            trainer.setMaskPolicy(next);
            say(chalk.magenta(`  step ${ev.step}: swapping the mask policy to ${next.name}, effective at step ${ev.step + 1}`));
          }
        }
        if (ev.type === "mask:refreshed") say(chalk.gray(`  step ${ev.step}: mask refreshed (${ev.policy}, ${ev.decision.criterion}, k=${ev.decision.density.toFixed(3)})`));
        if (ev.type === "eval") evalLoss = ev.loss;
        report(ev, say);
      }
      const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
      rows.push({
        stage: name,
        optimizer,
        policy: [...policyNames].join(" -> ") || "-",
        steps: losses.length,
        firstLoss: mean(losses.slice(0, 10)),
        lastLoss: mean(losses.slice(-10)),
        evalLoss,
        stateBytes,
      });
    };

    say(chalk.bold("\n1. train the tiny Llama on 'count on' with AdamW"));
    await stage(
      "count (AdamW)",
      new Trainer({
        sidecar,
        model: { path: "tiny-llama", device: "auto" },
        data: { path: files.count!, evalFraction: 0.1, cutoff: 64 },
        optimizer: { name: "adamw" },
        steps,
        microBatch: 8,
        lr: schedules.warmup(10, schedules.cosine({ peak: 3e-3, min: 3e-4 })),
        evalEvery: steps,
        runDir: join(runDir, "stage1"),
        overwrite: true, // the demo starts over each time it runs
        progress: opts.progress,
      }),
    );
    const base = join(runDir, "stage1", "checkpoints", `step-${String(steps).padStart(6, "0")}`, "model");

    say(chalk.bold("\n2. finetune it on 'double' with NanoAdam (k=10%), swapping smallWeights -> random halfway"));
    const double = new Trainer({
      sidecar,
      model: base,
      data: { path: files.double!, evalFraction: 0.1, cutoff: 64 },
      optimizer: { name: "nanoadam", density: 0.1 },
      steps,
      microBatch: 8,
      lr: schedules.constant(1e-2),
      maskPolicy: policies.smallWeights({ density: 0.1, maskInterval: 50 }),
      evalEvery: steps,
      runDir: join(runDir, "stage2"),
      overwrite: true,
      progress: opts.progress,
    });
    await stage("double (NanoAdam)", double, { step: Math.floor(steps / 2) - 1, policy: () => policies.random({ density: 0.1, maskInterval: 50 }) });
    // Asked the way it was trained: the instruction under the run's template (alpaca).
    const sample = await double.generate("Double 21.", { maxNewTokens: 8 });
    say(`\nsample after finetuning: "Double 21." -> ${JSON.stringify(sample.text.trim())} (expected "42"; the model has 125k parameters)`);
  } finally {
    await sidecar.close();
  }
  printRows(rows, say);
  return rows;
}

export function report(ev: TrainerEvent, say: (s: string) => void): void {
  if (ev.type === "run:start") {
    say(`  model ${ev.model.path} (${ev.model.parameters.toLocaleString()} params, ${ev.model.dtype} on ${ev.model.device}); ` +
      `data ${ev.data.trainExamples} train / ${ev.data.evalExamples} eval examples; optimizer ${ev.optimizer.name}`);
  }
  if (ev.type === "train:step" && (ev.step % 50 === 0)) {
    say(`  step ${String(ev.step).padStart(4)}  loss ${ev.loss.toFixed(4)}  lr ${ev.lr.toExponential(2)}` +
      (ev.density === null ? "" : `  k ${ev.density.toFixed(3)}`) + `  ${Math.round(ev.tokensPerS)} tok/s`);
  }
  if (ev.type === "eval") say(chalk.cyan(`  eval: loss ${ev.loss.toFixed(4)}, perplexity ${ev.perplexity.toFixed(2)}`));
}

function printRows(rows: Row[], say: (s: string) => void): void {
  const header = ["stage", "optimizer", "policy", "steps", "loss first 10", "loss last 10", "eval loss", "optimizer state"];
  const body = rows.map((r) => [
    r.stage,
    r.optimizer,
    r.policy,
    String(r.steps),
    r.firstLoss.toFixed(3),
    r.lastLoss.toFixed(3),
    r.evalLoss === null ? "-" : r.evalLoss.toFixed(3),
    `${(r.stateBytes / 1024).toFixed(1)} KiB`,
  ]);
  printTable(header, body, say);
}

/** A markdown-style table under a "summary" heading, each column as wide as its widest cell. */
export function printTable(header: string[], body: string[][], say: (s: string) => void): void {
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(" | ")} |`;
  say(chalk.bold("\nsummary"));
  say(line(header));
  say(`|${widths.map((w) => "-".repeat(w + 2)).join("|")}|`);
  for (const b of body) say(line(b));
}
