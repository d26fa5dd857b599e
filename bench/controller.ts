// Controller overhead (issue 4): the step time of training driven from TypeScript
// over the bridge vs the same steps replayed in-process by Python (nanotune.plainloop),
// for the tiny preset and the ~30M small-llama preset, in one run, as ratios.
// Targets: <= 1.05 (tiny) and <= 1.01 (~30M).
//
// Then the sinks' cost (issue 12): the same TS-driven run at ~30M with no sinks vs with
// every sink at once (jsonl, tensorboard, mlflow to a real local MLflow server, otel
// with a Prometheus exporter, the dashboard with an event stream open and its weight
// samples), rounds interleaved, as the ratio of median step times. Target: <= 1.02.
//
//   npm run bench:controller  [-- --rounds 2] [--sinks-rounds 3] [--only sinks|bridge]
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import { parseArgs } from "node:util";
import { demoTasks } from "../ts/demo.ts";
// @ts-expect-error plain ESM helper without types
import { pythonExecutable, repoRoot } from "../ts/dev/python.mjs";
import { PrometheusExporter } from "@opentelemetry/exporter-prometheus";
import { MeterProvider } from "@opentelemetry/sdk-metrics";
import { Sidecar, type Sink, sinks, Trainer } from "../ts/index.ts";
import { freePort, startMlflowServer } from "../tests/ts/fixtures/servers.ts";

const { values: args } = parseArgs({
  options: { rounds: { type: "string", default: "2" }, "sinks-rounds": { type: "string", default: "3" }, only: { type: "string" } },
});
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

/**
 * Runs the Trainer into a fresh runDir (which pythonDriven then replays); returns its step times.
 * Without `withSinks`: the default sinks (metrics.jsonl in runDir, as any run with a runDir writes it).
 */
async function tsDriven(c: (typeof cases)[number], runDir: string, withSinks?: Sink[]): Promise<number[]> {
  const sidecar = await Sidecar.start({ device: "cpu" });
  try {
    const times: number[] = [];
    let last = 0;
    for await (const ev of new Trainer({ sidecar, ...configFor(c), runDir, progress: false, ...(withSinks ? { sinks: withSinks } : {}) }).run()) {
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

/** Reads a dashboard's event stream (as an open page would) until the server ends it. */
async function openStream(url: string): Promise<number> {
  const u = new URL(url);
  const res = await fetch(`${u.origin}/events?token=${u.searchParams.get("token")}`);
  let bytes = 0;
  for await (const chunk of res.body!) bytes += (chunk as Uint8Array).byteLength;
  return bytes;
}

/** Every sink at once; close() ends what the sinks do not own (the meter provider). */
async function everySink(runDir: string, mlflowUri: string, round: number) {
  const provider = new MeterProvider({ readers: [new PrometheusExporter({ port: await freePort() })] });
  const dash = sinks.dashboard({ port: 0, print: false });
  const list: Sink[] = [
    sinks.jsonl(join(runDir, "metrics.jsonl")),
    sinks.tensorboard(join(runDir, "tb")),
    sinks.mlflow({ trackingUri: mlflowUri, experiment: "bench-controller", runName: `all-sinks-${round}` }),
    sinks.otel({ meter: provider.getMeter("nanotune-bench") }),
    dash,
  ];
  const stream = dash.listening.then(openStream);
  return { list, close: async () => ((await stream), await provider.shutdown()) };
}

try {
  if (args.only !== "sinks") {
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
  }
  if (args.only !== "bridge") {
    const c = { name: "small-llama", steps: 40, warmup: 4, microBatch: 8 };
    const sinksRounds = Number(args["sinks-rounds"]);
    const server = await startMlflowServer(dir);
    try {
      const none: number[] = [];
      const all: number[] = [];
      for (let i = 0; i < sinksRounds; i++) {
        none.push(...(await tsDriven(c, join(dir, `none-${i}`), [])));
        const every = await everySink(join(dir, `all-${i}`), server.url, i);
        all.push(...(await tsDriven(c, join(dir, `all-${i}`), every.list)));
        await every.close();
      }
      const ratio = median(all) / median(none);
      console.log(`\n# sinks: the TS-driven run with every sink (jsonl, tensorboard, mlflow, otel + Prometheus, dashboard with a stream open) vs none, ${c.name}, median step (refresh steps excluded), ${sinksRounds} rounds interleaved`);
      console.log("| model | params | no sinks ms | every sink ms | ratio | target |");
      console.log("|---|---|---|---|---|---|");
      console.log(`| ${c.name} | 29M | ${(median(none) * 1e3).toFixed(2)} | ${(median(all) * 1e3).toFixed(2)} | ${ratio.toFixed(3)} | <= 1.02 ${ratio <= 1.02 ? "met" : "NOT met"} |`);
    } finally {
      await server.signal("SIGKILL");
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
