// sinks.mlflow against a real MLflow tracking server (`mlflow server` from the venv, SQLite
// backend in a temp dir, one server for the file), read back with MLflow's own Python client:
// params, full metric histories, tags and the run's status, a server that stops answering
// mid-run (the sink fails once, training completes), and the non-FINISHED statuses.
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { policies, schedules, type Sidecar, type Sink, sinks, Trainer, type TrainerEvent } from "../../ts/index.ts";
import { packageVersion } from "../../ts/paths.ts";
// @ts-expect-error plain ESM helper without types
import { pythonExecutable, repoRoot } from "../../ts/dev/python.mjs";
import { expectedScalars } from "./fixtures/scalars.ts";
import { type MlflowServer, startMlflowServer, waitFor } from "./fixtures/servers.ts";
import { collect, startTinyRun, steps, stopTinyRun, sinkRunConfig } from "./fixtures/tiny-run.ts";
import { runProcess } from "./fixtures/run.ts";

let dir: string;
let sc: Sidecar;
let dataPath: string;
let server: MlflowServer;
let url: string;
const EXPERIMENT = "nanotune-tests";

type EndEvent = Extract<TrainerEvent, { type: "run:end" }>;
type StartEvent = Extract<TrainerEvent, { type: "run:start" }>;

beforeAll(async () => {
  ({ dir, dataPath, sc } = await startTinyRun("nanotune-mlflow-"));
  server = await startMlflowServer(dir);
  url = server.url;
}, 200_000);
afterAll(async () => {
  await server?.signal("SIGKILL");
  await stopTinyRun({ dir, sc });
});

const config = (extra: Record<string, unknown> = {}) => sinkRunConfig(dataPath, extra);

interface ReadRun {
  count: number;
  info: { run_id: string; status: string; start_time: number; end_time: number | null; run_name: string };
  params: Record<string, string>;
  tags: Record<string, string>;
  /** metric -> [step, value, timestamp], by step then timestamp */
  metrics: Record<string, [number, number, number][]>;
}

/** The runs named `names` in EXPERIMENT, read with MLflow's Python client. */
async function readRuns(...names: string[]): Promise<Record<string, ReadRun>> {
  const script = `
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name(sys.argv[2])
out = {}
for name in sys.argv[3:]:
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    r = runs[0]
    hist = {k: sorted([m.step, m.value, m.timestamp] for m in client.get_metric_history(r.info.run_id, k)) for k in r.data.metrics}
    i = r.info
    out[name] = {"count": len(runs), "info": {"run_id": i.run_id, "status": i.status, "start_time": i.start_time, "end_time": i.end_time, "run_name": i.run_name},
                 "params": r.data.params, "tags": r.data.tags, "metrics": hist}
print(json.dumps(out))
`;
  const r = await runProcess(pythonExecutable(), ["-c", script, url, EXPERIMENT, ...names], { cwd: repoRoot, timeout: 120_000 });
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as Record<string, ReadRun>;
}

/** The config as dotted params, written out independently of the sink: objects walked, arrays as JSON, strings as they are, the rest as JSON. */
function dotted(obj: Record<string, unknown>, prefix = ""): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(obj)) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (typeof v === "object" && v !== null && !Array.isArray(v) && Object.keys(v).length > 0) Object.assign(out, dotted(v as Record<string, unknown>, key));
    else out[key] = typeof v === "string" ? v : JSON.stringify(v);
  }
  return out;
}


/** The last step the server holds for a run's metric (MLflow's REST API, runs/search), or undefined. */
async function latestStep(runName: string, key: string): Promise<number | undefined> {
  const api = `${url}/api/2.0/mlflow`;
  const exp = (await (await fetch(`${api}/experiments/get-by-name?experiment_name=${EXPERIMENT}`, { signal: AbortSignal.timeout(5000) })).json()) as { experiment: { experiment_id: string } };
  const found = await fetch(`${api}/runs/search`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ experiment_ids: [exp.experiment.experiment_id], filter: `attributes.run_name = '${runName}'` }),
    signal: AbortSignal.timeout(5000),
  });
  const runs = ((await found.json()) as { runs?: { data: { metrics?: { key: string; step: number }[] } }[] }).runs ?? [];
  return runs[0]?.data.metrics?.find((m) => m.key === key)?.step;
}

const withoutTime = (m: Record<string, [number, number, number][]>) => Object.fromEntries(Object.entries(m).map(([k, h]) => [k, h.map(([s, v]) => [s, v])]));
const sinkErrors = (evs: TrainerEvent[]) => evs.filter((e): e is Extract<TrainerEvent, { type: "sink:error" }> => e.type === "sink:error");

describe("sinks.mlflow", () => {
  it("logs params, every metric with its step, tags, checkpoints and FINISHED; MLflow's Python client reads back exactly the events", async () => {
    const runDir = join(dir, "run-full");
    // 150 extra tags: more than one log-batch may carry (100), so the sink must split them
    const extra = Object.fromEntries(Array.from({ length: 150 }, (_, i) => [`extra.${i}`, `value ${i}`]));
    const sink = sinks.mlflow({ trackingUri: url, experiment: EXPERIMENT, runName: "full", tags: { team: "nano", "ticket/id": "42", ...extra }, flushEvery: 4 });
    const trainer = new Trainer({ sidecar: sc, ...config({ runDir, checkpointEvery: 3 }), sinks: [sink] });
    const t0 = Date.now();
    const events = await collect(trainer, (ev) => {
      if (ev.type === "train:step" && ev.step === 2) trainer.setMaskPolicy(policies.largeWeights({ density: 0.05, maskInterval: 1000 }));
    });
    const t1 = Date.now();
    expect(sinkErrors(events)).toEqual([]);
    expect(events.at(-1)).toMatchObject({ type: "run:end", reason: "completed", step: 6 });

    const run = (await readRuns("full")).full!;
    expect(run.count).toBe(1);
    expect(run.info.status).toBe("FINISHED");
    expect(run.info.start_time).toBeGreaterThanOrEqual(t0);
    expect(run.info.end_time).toBeGreaterThanOrEqual(run.info.start_time);
    expect(run.info.end_time).toBeLessThanOrEqual(t1);

    // params: the resolved config, flattened
    const start = events[0] as StartEvent;
    expect(run.params).toEqual(dotted(start.config));
    expect(run.params).toMatchObject({ "optimizer.name": "nanoadam", "optimizer.density": "0.1", steps: "6", evalEvery: "3", "maskPolicy.type": "smallWeights", "maskPolicy.maskInterval": "2" });

    // metrics: each full history equals the events, as doubles (JSON carries a double
    // exactly, MLflow's SQL store keeps it as one, and Python's json writes it back exactly)
    const want = expectedScalars(events);
    expect(Object.keys(want).sort()).toEqual(
      ["train/loss", "train/lr", "train/density", "train/grad_norm", "train/tokens_per_s", "eval/loss", "eval/perplexity", "mask/refreshed", "policy/swapped", "checkpoint/time_s"].sort(),
    );
    expect(want["train/loss"]!.map(([s]) => s)).toEqual([0, 1, 2, 3, 4, 5]);
    expect(want["policy/swapped"]).toEqual([[3, 1]]);
    expect(withoutTime(run.metrics)).toEqual(want);
    expect(run.metrics["train/loss"]!.map(([, v]) => v)).toEqual(steps(events).map((s) => s.loss));
    for (const h of Object.values(run.metrics)) for (const [, , ts] of h) expect(ts >= t0 && ts <= t1 && Number.isInteger(ts)).toBe(true);

    // tags
    const swap = events.find((e) => e.type === "policy:swapped") as Extract<TrainerEvent, { type: "policy:swapped" }>;
    const checkpoints = events.filter((e): e is Extract<TrainerEvent, { type: "checkpoint:saved" }> => e.type === "checkpoint:saved");
    expect(checkpoints.map((c) => c.step)).toEqual([3, 6]);
    expect(run.tags).toMatchObject({
      "mlflow.runName": "full",
      team: "nano",
      "ticket/id": "42",
      policy: "largeWeights",
      "policy.last_swap": `step 3: ${swap.from} -> largeWeights`,
      optimizer: "nanoadam",
      device: "cpu",
      model: start.model.path,
      "nanotune.version": packageVersion,
      "nanotune.end_reason": "completed",
      "checkpoint.latest": checkpoints[1]!.path,
      "checkpoint.3": checkpoints[0]!.path,
      "checkpoint.6": checkpoints[1]!.path,
    });
    expect(run.tags).toMatchObject(extra);
    expect(swap.from).toBe("smallWeights");
    expect(JSON.parse(run.tags["policy.spec"]!)).toEqual(swap.spec);
    expect(checkpoints[1]!.path).toBe(join(runDir, "checkpoints", "step-000006"));
  });

  it("ends KILLED when interrupted (its stop-and-save checkpoint tagged) and FAILED on a non-finite step", async () => {
    // interrupted: abort while step 3 runs, with checkpointOnAbort
    const ac = new AbortController();
    const runDir = join(dir, "run-interrupted");
    const stopped = new Trainer({ sidecar: sc, ...config({ steps: 20, evalEvery: 0, runDir }), sinks: [sinks.mlflow({ trackingUri: url, experiment: EXPERIMENT, runName: "interrupted" })] });
    const interrupted = await collect(
      stopped,
      (ev) => ev.type === "train:step" && ev.step === 2 && setTimeout(() => ac.abort(), 0),
      stopped.run({ signal: ac.signal, checkpointOnAbort: true }),
    );
    const end = interrupted.at(-1) as EndEvent;
    expect(end).toMatchObject({ type: "run:end", reason: "interrupted" });
    expect(end.checkpoint).toBe(join(runDir, "checkpoints", `step-${String(end.step).padStart(6, "0")}`));

    // non-finite: lr 1e10 at step 2 (onNonFinite "stop"); its policy has a perTensor pattern
    // (not a name MLflow takes: one JSON param) and an exclude list longer than a param may be
    const spike = schedules.fn((t) => (t === 2 ? 1e10 : 1e-2), "spike");
    const exclude = Array.from({ length: 400 }, (_, i) => `^no_such_tensor_${i}$`);
    const maskPolicy = policies.smallWeights({ density: 0.1, maskInterval: 2, perTensor: { "mlp\\.down_proj": 0.05 }, exclude });
    const nonFinite = await collect(
      new Trainer({ sidecar: sc, ...config({ steps: 5, evalEvery: 0, lr: spike, maskPolicy }), sinks: [sinks.mlflow({ trackingUri: url, experiment: EXPERIMENT, runName: "non-finite" })] }),
    );
    expect(nonFinite.at(-1)).toMatchObject({ type: "run:end", reason: "non-finite" });

    for (const evs of [interrupted, nonFinite]) expect(sinkErrors(evs)).toEqual([]);
    const runs = await readRuns("interrupted", "non-finite");
    const killed = runs.interrupted!;
    expect(killed.count).toBe(1);
    expect(killed.info.status).toBe("KILLED");
    expect(killed.info.end_time).toBeGreaterThanOrEqual(killed.info.start_time);
    expect(killed.tags).toMatchObject({ "nanotune.end_reason": "interrupted", "checkpoint.latest": end.checkpoint, [`checkpoint.${end.step}`]: end.checkpoint });
    expect(withoutTime(killed.metrics)).toEqual(expectedScalars(interrupted));

    const failed = runs["non-finite"]!;
    expect(failed.count).toBe(1);
    expect(failed.info.status).toBe("FAILED");
    expect(failed.info.end_time).toBeGreaterThanOrEqual(failed.info.start_time);
    expect(failed.tags["nanotune.end_reason"]).toBe("non-finite");
    expect(withoutTime(failed.metrics)).toEqual(expectedScalars(nonFinite));
    expect(failed.metrics["train/loss"]!.map(([s]) => s)).toEqual(steps(nonFinite).map((s) => s.step));
    expect(failed.params).toMatchObject({ "lr.type": "custom", "lr.name": "spike", "maskPolicy.perTensor": '{"mlp\\\\.down_proj":0.05}' });
    const full = JSON.stringify(exclude);
    const cut = failed.params["maskPolicy.exclude"]!;
    expect(full.length).toBeGreaterThan(6000);
    expect(cut).toHaveLength(6000);
    expect(cut.endsWith(`...[truncated, ${full.length} chars]`)).toBe(true);
    expect(full.startsWith(cut.slice(0, cut.indexOf("...[truncated")))).toBe(true);
    expect(failed.tags["nanotune.truncated_params"]).toBe("maskPolicy.exclude");
  });

  it("a server that stops answering mid-run: one sink:error naming the URL after the retries, training completes; the dropped sink stays dropped when the server is back", async () => {
    const opts = { trackingUri: url, experiment: EXPERIMENT, runName: "hang", flushEvery: 1, timeoutMs: 1000, retries: 2, retryBudgetMs: 20_000 };
    // a second sink sees the sink:error as soon as the SinkSet reports it (the Trainer yields it later)
    const seen: TrainerEvent[] = [];
    const watcher: Sink = { name: "watcher", write: (ev) => void seen.push(ev) };
    const trainer = new Trainer({ sidecar: sc, ...config({ evalEvery: 0 }), sinks: [sinks.mlflow(opts), watcher] });
    let stoppedAt = 0;
    let failedAt = 0;
    const events = await collect(trainer, async (ev) => {
      // (the Trainer waits for these callbacks)
      if (ev.type === "train:step" && ev.step === 1) {
        // once step 1 is on the server, the server stops answering (SIGSTOP); step 2 is then sent to it
        await waitFor("step 1 on the server", 60_000, async () => ((await latestStep("hang", "train/loss")) === 1 ? true : undefined));
        await server.signal("SIGSTOP");
        stoppedAt = performance.now();
      }
      if (ev.type === "train:step" && ev.step === 2) {
        await waitFor("the mlflow sink's failure", 120_000, async () => (seen.some((e) => e.type === "sink:error") ? true : undefined));
        failedAt = performance.now();
        await server.signal("SIGCONT"); // back before the run ends: the sink must not send its close-time status
      }
    });
    await server.signal("SIGCONT");

    expect(events.at(-1)).toMatchObject({ type: "run:end", reason: "completed", step: 6 });
    expect(steps(events).map((s) => s.step)).toEqual([0, 1, 2, 3, 4, 5]);
    const errors = sinkErrors(events);
    expect(errors).toHaveLength(1);
    expect(errors[0]!.sink).toBe("mlflow");
    expect(errors[0]!.message).toContain(`MLflow POST ${url}/api/2.0/mlflow/runs/log-batch failed after 3 attempts`);
    expect(errors[0]!.message).toContain("no answer in 1000 ms");
    expect(errors[0]!.step).toBeGreaterThanOrEqual(1);
    expect(seen.filter((e) => e.type === "sink:error")).toEqual(errors);
    // bounded: the sink gave up within its retry budget (plus slack for a loaded machine)
    expect(failedAt - stoppedAt).toBeLessThan(opts.retryBudgetMs + 20_000);

    // After the failure the sink sent nothing more, not even at close() with the server back:
    // the run is still RUNNING, and what it holds is a prefix of the events (the server may
    // also take the batch that timed out, which it received before it stopped).
    const run = (await readRuns("hang")).hang!;
    expect(run.info.status).toBe("RUNNING");
    expect(run.info.end_time).toBeNull();
    const loss = withoutTime(run.metrics)["train/loss"]!;
    const want = expectedScalars(events)["train/loss"]!;
    expect(loss.length).toBeGreaterThanOrEqual(2);
    expect(loss.length).toBeLessThan(want.length);
    expect(loss).toEqual(want.slice(0, loss.length));
  });

  // Kills the file's server: keep it last.
  it("a server that is gone mid-run (killed): one sink:error naming the URL and the refused connection, training completes", async () => {
    const seen: TrainerEvent[] = [];
    const watcher: Sink = { name: "watcher", write: (ev) => void seen.push(ev) };
    const sink = sinks.mlflow({ trackingUri: url, experiment: EXPERIMENT, runName: "gone", flushEvery: 1, retries: 2 });
    const trainer = new Trainer({ sidecar: sc, ...config({ evalEvery: 0 }), sinks: [sink, watcher] });
    let killedAt = 0;
    let failedAt = 0;
    const events = await collect(trainer, async (ev) => {
      if (ev.type === "train:step" && ev.step === 1) {
        await waitFor("step 1 on the server", 60_000, async () => ((await latestStep("gone", "train/loss")) === 1 ? true : undefined));
        await server.signal("SIGKILL");
        killedAt = performance.now();
      }
      if (ev.type === "train:step" && ev.step === 2) {
        await waitFor("the mlflow sink's failure", 120_000, async () => (seen.some((e) => e.type === "sink:error") ? true : undefined));
        failedAt = performance.now();
      }
    });
    expect(events.at(-1)).toMatchObject({ type: "run:end", reason: "completed", step: 6 });
    expect(steps(events).map((s) => s.step)).toEqual([0, 1, 2, 3, 4, 5]);
    const errors = sinkErrors(events);
    expect(errors).toHaveLength(1);
    expect(errors[0]!.sink).toBe("mlflow");
    expect(errors[0]!.message).toMatch(new RegExp(`^MLflow POST ${url.replace(/\./g, "\\.")}/api/2\\.0/mlflow/runs/log-batch failed after 3 attempts in [\\d.]+ s: ECONNREFUSED$`));
    expect(failedAt - killedAt).toBeLessThan(30_000 + 20_000); // the default retry budget, plus slack
  });
});
