// Controller overhead (issue 4): the step time of training driven from TypeScript
// over the bridge vs the same steps replayed in-process by Python (nanotune.plainloop),
// for the tiny preset and the ~30M small-llama preset, in one run, as ratios.
// Targets: <= 1.05 (tiny) and <= 1.01 (~30M).
//
// Then the sinks' cost (issue 12): the same TS-driven run at ~30M with no sinks vs with
// each sink alone and every sink at once (jsonl + tensorboard, mlflow to a real MLflow
// server on this machine, otel with a Prometheus exporter, the dashboard with an event
// stream open as a page would, so it also takes weight samples), rounds interleaved, as
// ratios of median step times. Target: every sink <= 1.02.
//
//   npm run bench:controller  [-- --rounds 2] [--sinks-rounds 2] [--only sinks|bridge]
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
  options: { rounds: { type: "string", default: "2" }, "sinks-rounds": { type: "string", default: "2" }, only: { type: "string" } },
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

/** The sinks of one configuration; close() ends what the sinks do not own (the meter provider, the open stream). */
async function sinkSet(which: SinkConfig, runDir: string, mlflowUri: string, round: number) {
  const has = (s: Exclude<SinkConfig, "none" | "every sink">) => which === s || which === "every sink";
  const list: Sink[] = [];
  const closers: (() => Promise<unknown>)[] = [];
  if (has("jsonl + tensorboard")) list.push(sinks.jsonl(join(runDir, "metrics.jsonl")), sinks.tensorboard(join(runDir, "tb")));
  if (has("mlflow")) list.push(sinks.mlflow({ trackingUri: mlflowUri, experiment: "bench-controller", runName: `${which}-${round}` }));
  if (has("otel + prometheus")) {
    const provider = new MeterProvider({ readers: [new PrometheusExporter({ port: await freePort() })] });
    list.push(sinks.otel({ meter: provider.getMeter("nanotune-bench") }));
    closers.push(() => provider.shutdown());
  }
  if (has("dashboard")) {
    const dash = sinks.dashboard({ port: 0, print: false });
    list.push(dash);
    const stream = dash.listening.then(openStream); // as an open page: events and weight samples
    closers.push(() => stream);
  }
  return { list, close: () => Promise.all(closers.map((c) => c())) };
}

const SINK_CONFIGS = ["none", "jsonl + tensorboard", "mlflow", "otel + prometheus", "dashboard", "every sink"] as const;
type SinkConfig = (typeof SINK_CONFIGS)[number];

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
    const c = { name: "small-llama", steps: 30, warmup: 4, microBatch: 8 };
    const sinksRounds = Number(args["sinks-rounds"]);
    const server = await startMlflowServer(dir);
    try {
      const times = new Map<SinkConfig, number[]>(SINK_CONFIGS.map((s) => [s, []]));
      for (let i = 0; i < sinksRounds; i++) {
        for (const which of SINK_CONFIGS) {
          const runDir = join(dir, `sinks-${i}-${which.replace(/\W+/g, "-")}`);
          const set = await sinkSet(which, runDir, server.url, i);
          times.get(which)!.push(...(await tsDriven(c, runDir, set.list)));
          await set.close();
        }
      }
      const none = median(times.get("none")!);
      console.log(`\n# sinks: the TS-driven run with each sink, and with every sink at once (the dashboard with an event stream open, as a page), vs none; ${c.name}, ${c.steps} steps, median step (refresh steps excluded), ${sinksRounds} rounds interleaved; the MLflow server runs on this machine`);
      console.log("| sinks | median step ms | ratio to none | target |");
      console.log("|---|---|---|---|");
      for (const which of SINK_CONFIGS) {
        const m = median(times.get(which)!);
        const target = which === "every sink" ? `<= 1.02 ${m / none <= 1.02 ? "met" : "NOT met"}` : "";
        console.log(`| ${which} | ${(m * 1e3).toFixed(2)} | ${(m / none).toFixed(3)} | ${target} |`);
      }
    } finally {
      await server.signal("SIGKILL");
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
