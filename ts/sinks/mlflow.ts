// sinks.mlflow({ trackingUri, experiment, runName }): a run logged to an MLflow tracking
// server through its REST API (/api/2.0/mlflow/...), with Node's global fetch: no MLflow
// client library, no Python.
//
// The run. At run:start the experiment is looked up by name (experiments/get-by-name) and
// created when missing (a concurrent creator's RESOURCE_ALREADY_EXISTS is followed by a second
// look-up; a deleted experiment is an error that says so), then runs/create makes the run
// (run_name, start_time). A Sink used for several Trainer runs makes one MLflow run for each
// run:start (one sink per concurrent Trainer).
//   params   the resolved config (run:start's `config`, runDir/config.json's content), flattened
//            to dotted keys: optimizer.density, maskPolicy.type, lr.then.peak, ... Objects are
//            walked; arrays, and objects with a key MLflow cannot take as part of a name (a
//            perTensor pattern such as "*.mlp.*"), are one param holding their JSON; strings as
//            they are, numbers and booleans as JSON, null as "null". MLflow keeps a param's value
//            to 6000 characters and refuses longer ones: a longer value is cut to 6000 characters
//            ending in "...[truncated, N chars]" and its key is listed in the tag
//            nanotune.truncated_params (a key over 250 characters, which no config of ours has,
//            keeps its first 241 and a hash). Params are written once (MLflow's params are
//            immutable); what changes during a run (the mask policy) is a tag.
//   metrics  the names of sinks.tensorboard, with the event's step: train/loss, train/lr,
//            train/density (not with AdamW), train/grad_norm (when reported), train/tokens_per_s
//            (each train:step); eval/loss, eval/perplexity (eval); mask/refreshed = 1
//            (mask:refreshed); policy/swapped = 1 (policy:swapped); train/skipped = 1
//            (step:skipped); checkpoint/time_s (checkpoint:saved). Timestamps are ms since the
//            epoch, taken when the sink receives the event (events carry no wall time). A value
//            MLflow stores as a double: what the event said, exactly. NaN and +-Infinity are sent
//            as "NaN", "Infinity", "-Infinity", as MLflow's protobuf JSON accepts them.
//   tags     the user's `tags` first, then ours (ours win on a clash): policy (the active mask
//            policy's name, "none" with AdamW; updated on policy:swapped), policy.spec (its JSON),
//            policy.last_swap ("step 4: smallWeights -> largeWeights"), optimizer, device, model,
//            model.type, dtype, nanotune.version, mlflow.source.name = "nanotune", mlflow.user,
//            nanotune.resumed_from_step (a resumed run); checkpoint.latest and checkpoint.<step>
//            (each checkpoint:saved, and run:end's checkpoint); at run:end nanotune.end_reason and
//            nanotune.error ("failed": code and message). Tag values are kept to 8000 characters.
//   status   at run:end (runs/update, with end_time): "completed" -> FINISHED; "interrupted"
//            and "aborted" -> KILLED (stopped on purpose); "non-finite" and "failed" -> FAILED.
//            A sink closed without a run:end (its consumer stopped reading the run's events)
//            ends the run KILLED.
//
// Batching. Metrics and tag changes are kept and sent with runs/log-batch every `flushEvery`
// events (default 20), and at once on eval, checkpoint:saved, policy:swapped and run:end, and
// when an event comes `flushIntervalMs` (default 10 s) after the last send (the sink has no
// timer: a value waits at most for the next event). A batch holds at most MLflow's limits:
// 1000 metrics, 100 params, 100 tags, 1000 entries in all and about 1 MB of JSON; more is
// sent as several requests, in order.
//
// The server away. Each request times out after `timeoutMs` (default 10 s). A network error, a
// timeout, HTTP 429 and HTTP 5xx are tried again, up to `retries` more times (default 3),
// after 0.5 s, 1 s, 2 s, ... as long as the request's total time stays within
// `retryBudgetMs` (default 30 s): a request never takes much longer than that, and the first
// that fails ends the sink, so a run's end waits at most about that long for a server that is
// away. A retried batch carries the same timestamps, and MLflow's SQL stores (a server's usual
// backend) ignore a metric they already have (same key, step, timestamp and value), so a
// batch that arrived but whose answer was lost is not counted twice. Any other HTTP status (a 4xx: a bad request, a missing run) fails at once. A
// failure is thrown with the method, URL, HTTP status, MLflow's error_code and message (or the
// network error), and the attempts: the SinkSet reports it once as a `sink:error` and drops the
// sink; training goes on. The sink then sends nothing more, not even at close(): the run stays
// RUNNING on the server (a dead server should not cost the run's end another retry budget).
// A sink used again for another run starts afresh at that run's run:start.
//
// Authentication as MLflow's own clients: MLFLOW_TRACKING_TOKEN (a bearer token), else
// MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic); `headers` adds or replaces headers.
import { createHash } from "node:crypto";
import { userInfo } from "node:os";
import { ConfigError } from "../errors.ts";
import { packageVersion } from "../paths.ts";
import type { TrainerEvent } from "../train/events.ts";
import { scalarsOf } from "./scalars.ts";
import type { Sink } from "./sink.ts";

export interface MlflowOptions {
  /** The tracking server, http(s)://host:port (default $MLFLOW_TRACKING_URI). */
  trackingUri?: string;
  /** The experiment's name; created when missing (default $MLFLOW_EXPERIMENT_NAME, else "Default"). */
  experiment?: string;
  /** The MLflow run's name (default: MLflow picks one). */
  runName?: string;
  /** Extra run tags; nanotune's own tags (policy, optimizer, ...) win on a clash. */
  tags?: Record<string, string>;
  /** Send the waiting metrics and tags every this many events (default 20; eval, checkpoints, swaps and run:end send at once). */
  flushEvery?: number;
  /** Also send when an event comes this long after the last send (default 10000 ms). */
  flushIntervalMs?: number;
  /** One request's timeout (default 10000 ms). */
  timeoutMs?: number;
  /** Tries after the first for a network error, a timeout, HTTP 429 or 5xx (default 3). */
  retries?: number;
  /** The most one request may take with its retries (default 30000 ms). */
  retryBudgetMs?: number;
  /** Extra HTTP headers (authentication for a proxy, ...). */
  headers?: Record<string, string>;
}

// MLflow's limits (mlflow/utils/validation.py).
const MAX_PARAM_VALUE = 6000;
const MAX_TAG_VALUE = 8000;
const MAX_KEY = 250;
const MAX_BATCH_METRICS = 1000;
const MAX_BATCH_PARAMS_TAGS = 100;
const MAX_BATCH_ENTITIES = 1000;
const MAX_BATCH_BYTES = 900_000; // MLflow refuses a log-batch request over 1 MB

/** A key MLflow accepts as a param, metric or tag name (and path-safe: no empty segment, no "." or ".."). */
const NAME = /^[A-Za-z0-9_\-. :/]+$/;
const validName = (k: string) => NAME.test(k) && k.length <= MAX_KEY && !k.startsWith("/") && k.split("/").every((s) => s !== "" && s !== "." && s !== "..");
/** One segment of a dotted param key: no "." or "/" (they would make the dotted key ambiguous). */
const SEGMENT = /^[A-Za-z0-9_\- :]+$/;

interface Metric {
  key: string;
  value: number | string;
  timestamp: number;
  step: number;
}
interface KeyValue {
  key: string;
  value: string;
}

const STATUS: Record<string, "FINISHED" | "KILLED" | "FAILED"> = {
  completed: "FINISHED",
  interrupted: "KILLED",
  aborted: "KILLED",
  "non-finite": "FAILED",
  failed: "FAILED",
};

/** run:end's reason as an MLflow RunStatus (an unknown reason is FAILED). */
export function mlflowStatus(reason: string): "FINISHED" | "KILLED" | "FAILED" {
  return STATUS[reason] ?? "FAILED";
}

const truncated = (value: string, limit: number) => {
  if (value.length <= limit) return value;
  const marker = `...[truncated, ${value.length} chars]`;
  return value.slice(0, limit - marker.length) + marker;
};

const paramValue = (v: unknown): string => (typeof v === "string" ? v : (JSON.stringify(v) ?? String(v)));

const isPlainObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);

/** The resolved config as MLflow params: dotted keys, values as described in the header. */
export function flattenParams(config: Record<string, unknown>): { params: KeyValue[]; truncatedKeys: string[] } {
  const params: KeyValue[] = [];
  const truncatedKeys: string[] = [];
  const walk = (obj: Record<string, unknown>, prefix: string) => {
    for (const [k, v] of Object.entries(obj)) {
      if (v === undefined || typeof v === "function") continue;
      const key = prefix ? `${prefix}.${k}` : k;
      if (isPlainObject(v) && Object.keys(v).length > 0 && Object.keys(v).every((s) => SEGMENT.test(s))) {
        walk(v, key);
        continue;
      }
      const value = paramValue(v);
      if (value.length > MAX_PARAM_VALUE) truncatedKeys.push(key);
      params.push({ key: safeKey(key), value: truncated(value, MAX_PARAM_VALUE) });
    }
  };
  walk(config, "");
  return { params, truncatedKeys };
}

/** A key over MLflow's 250 characters keeps its start and a hash of the whole (unique, stable). */
function safeKey(key: string): string {
  if (key.length <= MAX_KEY) return key;
  return `${key.slice(0, MAX_KEY - 9)}~${createHash("sha1").update(key).digest("hex").slice(0, 8)}`;
}

/** A JSON number for MLflow, or its protobuf-JSON string for NaN and +-Infinity. */
const metricValue = (x: number): number | string => (Number.isFinite(x) ? x : Number.isNaN(x) ? "NaN" : x > 0 ? "Infinity" : "-Infinity");

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Packs params, tags and metrics into log-batch bodies within MLflow's limits, keeping their order. */
function batches(params: KeyValue[], tags: KeyValue[], metrics: Metric[]): { params: KeyValue[]; tags: KeyValue[]; metrics: Metric[] }[] {
  const out: { params: KeyValue[]; tags: KeyValue[]; metrics: Metric[] }[] = [];
  let cur = { params: [] as KeyValue[], tags: [] as KeyValue[], metrics: [] as Metric[] };
  let bytes = 0;
  const count = () => cur.params.length + cur.tags.length + cur.metrics.length;
  const add = (kind: "params" | "tags" | "metrics", item: KeyValue | Metric) => {
    const size = JSON.stringify(item).length + 1;
    const full =
      count() >= MAX_BATCH_ENTITIES ||
      bytes + size > MAX_BATCH_BYTES ||
      (kind === "metrics" ? cur.metrics.length >= MAX_BATCH_METRICS : cur[kind].length >= MAX_BATCH_PARAMS_TAGS);
    if (full && count() > 0) {
      out.push(cur);
      cur = { params: [], tags: [], metrics: [] };
      bytes = 0;
    }
    (cur[kind] as (KeyValue | Metric)[]).push(item);
    bytes += size;
  };
  for (const p of params) add("params", p);
  for (const t of tags) add("tags", t);
  for (const m of metrics) add("metrics", m);
  if (count() > 0) out.push(cur);
  return out;
}

export function mlflow(options: MlflowOptions = {}): Sink {
  const trackingUri = options.trackingUri ?? process.env.MLFLOW_TRACKING_URI ?? "";
  const experiment = options.experiment ?? process.env.MLFLOW_EXPERIMENT_NAME ?? "Default";
  const flushEvery = options.flushEvery ?? 20;
  const flushIntervalMs = options.flushIntervalMs ?? 10_000;
  const timeoutMs = options.timeoutMs ?? 10_000;
  const retries = options.retries ?? 3;
  const retryBudgetMs = options.retryBudgetMs ?? 30_000;
  const userTags = options.tags ?? {};

  const issues: { path: string; message: string }[] = [];
  let base = "";
  try {
    const url = new URL(trackingUri);
    if (url.protocol !== "http:" && url.protocol !== "https:") throw new Error();
    base = trackingUri.replace(/\/+$/, "");
  } catch {
    issues.push({
      path: "trackingUri",
      message: trackingUri ? `'${trackingUri}' is not an http(s) URL of an MLflow tracking server` : "expected the tracking server's http(s) URL (or set MLFLOW_TRACKING_URI)",
    });
  }
  if (experiment.length === 0 || experiment.length > 500) issues.push({ path: "experiment", message: "expected a name of 1 to 500 characters" });
  const posInt = (path: string, v: number, min: number) => {
    if (!Number.isInteger(v) || v < min) issues.push({ path, message: `expected an integer >= ${min}, got ${v}` });
  };
  posInt("flushEvery", flushEvery, 1);
  posInt("retries", retries, 0);
  for (const [path, v] of [["flushIntervalMs", flushIntervalMs], ["timeoutMs", timeoutMs], ["retryBudgetMs", retryBudgetMs]] as const) {
    if (!(typeof v === "number" && v > 0)) issues.push({ path, message: `expected a positive number of milliseconds, got ${v}` });
  }
  for (const [k, v] of Object.entries(userTags)) {
    if (!validName(k)) issues.push({ path: `tags.${k}`, message: "MLflow tag keys have at most 250 letters, digits, _ - . : / and spaces" });
    if (typeof v !== "string") issues.push({ path: `tags.${k}`, message: "expected a string" });
  }
  if (issues.length > 0) throw new ConfigError("sinks.mlflow options", issues);

  const headers: Record<string, string> = { "content-type": "application/json" };
  if (process.env.MLFLOW_TRACKING_TOKEN) headers.authorization = `Bearer ${process.env.MLFLOW_TRACKING_TOKEN}`;
  else if (process.env.MLFLOW_TRACKING_USERNAME) {
    headers.authorization = `Basic ${Buffer.from(`${process.env.MLFLOW_TRACKING_USERNAME}:${process.env.MLFLOW_TRACKING_PASSWORD ?? ""}`).toString("base64")}`;
  }
  Object.assign(headers, options.headers);

  /** One REST call with the retries described in the header; resolves to the parsed JSON answer. */
  async function call(method: "GET" | "POST", endpoint: string, body?: unknown, query?: Record<string, string>): Promise<Record<string, unknown>> {
    const url = `${base}/api/2.0/mlflow/${endpoint}${query ? `?${new URLSearchParams(query)}` : ""}`;
    const what = `MLflow ${method} ${url}`;
    const t0 = performance.now();
    let lastProblem = "";
    for (let attempt = 0; ; attempt++) {
      const left = retryBudgetMs - (performance.now() - t0);
      let res: Response | null = null;
      let text = "";
      try {
        res = await fetch(url, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
          signal: AbortSignal.timeout(Math.max(1, Math.min(timeoutMs, left))),
        });
        text = await res.text();
      } catch (err) {
        // fetch's own failure: refused, reset, DNS, or our timeout
        const e = err as Error & { cause?: { code?: string; message?: string } };
        const timedOut = e.name === "TimeoutError" || e.name === "AbortError";
        lastProblem = timedOut ? `no answer in ${Math.round(Math.min(timeoutMs, left))} ms` : `${e.cause?.code ?? e.cause?.message ?? e.message}`;
        res = null;
      }
      if (res?.ok) {
        try {
          return text ? (JSON.parse(text) as Record<string, unknown>) : {};
        } catch {
          throw new MlflowRequestError(`${what} answered HTTP ${res.status} with something that is not JSON (is ${base} an MLflow tracking server?): ${text.slice(0, 100)}`, "");
        }
      }
      if (res) {
        let code = "";
        let message = text;
        try {
          const j = JSON.parse(text) as { error_code?: string; message?: string };
          code = j.error_code ?? "";
          message = j.message ?? text;
        } catch {
          // not MLflow's JSON error (a proxy's page, a server error page)
        }
        // MLflow's message: its first line (a database error follows); another page: its text
        message = (code ? (message.split("\n")[0] ?? "") : message.replace(/<[^>]*>/g, " ")).replace(/\s+/g, " ").trim().slice(0, 300);
        lastProblem = `HTTP ${res.status}${code ? ` ${code}` : ""}${message ? `: ${message}` : ""}`;
        if (!(res.status === 429 || res.status >= 500)) throw new MlflowRequestError(`${what} failed: ${lastProblem}`, code);
      }
      const elapsed = performance.now() - t0;
      const delay = 500 * 2 ** attempt;
      if (attempt >= retries || elapsed + delay >= retryBudgetMs) {
        throw new MlflowRequestError(`${what} failed after ${attempt + 1} attempt${attempt ? "s" : ""} in ${(elapsed / 1000).toFixed(1)} s: ${lastProblem}`, "");
      }
      await sleep(delay);
    }
  }

  // One MLflow run's state (reset at each run:start).
  let runId: string | null = null;
  let ended = true;
  let broken = false;
  let metrics: Metric[] = [];
  let tags = new Map<string, string>();
  let waiting = 0; // events since the last send
  let lastSend = 0;
  let policy: string | null = null; // the active mask policy's name, as last tagged

  const tag = (key: string, value: string) => tags.set(key, truncated(value, MAX_TAG_VALUE));
  const metric = (key: string, value: number | null | undefined, step: number, now: number) => {
    if (value === null || value === undefined) return;
    metrics.push({ key, value: metricValue(value), timestamp: now, step });
  };

  async function send(params: KeyValue[] = []): Promise<void> {
    const t = [...tags].map(([key, value]) => ({ key, value }));
    const m = metrics;
    for (const b of batches(params, t, m)) await call("POST", "runs/log-batch", { run_id: runId, ...b });
    // a failure has thrown above (and drops the sink): what was not sent is not kept for later
    tags = new Map();
    metrics = [];
    waiting = 0;
    lastSend = performance.now();
  }

  async function experimentId(): Promise<string> {
    const byName = async () => {
      try {
        const r = (await call("GET", "experiments/get-by-name", undefined, { experiment_name: experiment })) as { experiment: { experiment_id: string; lifecycle_stage?: string } };
        if (r.experiment.lifecycle_stage === "deleted") {
          throw new Error(`MLflow experiment '${experiment}' at ${base} is deleted: restore it (mlflow experiments restore) or choose another name`);
        }
        return r.experiment.experiment_id;
      } catch (err) {
        if (err instanceof MlflowRequestError && err.code === "RESOURCE_DOES_NOT_EXIST") return null;
        throw err;
      }
    };
    const found = await byName();
    if (found !== null) return found;
    try {
      const r = (await call("POST", "experiments/create", { name: experiment })) as { experiment_id: string };
      return r.experiment_id;
    } catch (err) {
      if (!(err instanceof MlflowRequestError && err.code === "RESOURCE_ALREADY_EXISTS")) throw err;
      const again = await byName(); // someone else created it in between
      if (again === null) throw err;
      return again;
    }
  }

  async function start(ev: Extract<TrainerEvent, { type: "run:start" }>): Promise<void> {
    runId = null;
    ended = false;
    broken = false; // a new run gets a new try
    metrics = [];
    tags = new Map();
    const experimentIdValue = await experimentId();
    const r = (await call("POST", "runs/create", {
      experiment_id: experimentIdValue,
      start_time: Date.now(),
      ...(options.runName ? { run_name: options.runName } : {}),
    })) as { run: { info: { run_id: string } } };
    runId = r.run.info.run_id;

    for (const [k, v] of Object.entries(userTags)) tag(k, v);
    tag("mlflow.source.name", "nanotune");
    try {
      tag("mlflow.user", userInfo().username);
    } catch {
      // no user name (a container without an /etc/passwd entry)
    }
    tag("nanotune.version", packageVersion);
    policy = ev.policy?.name ?? null;
    tag("policy", policy ?? "none");
    if (ev.policy?.spec) tag("policy.spec", JSON.stringify(ev.policy.spec));
    tag("optimizer", ev.optimizer.name);
    tag("device", ev.model.device);
    tag("model", ev.model.path);
    tag("model.type", ev.model.modelType);
    tag("dtype", ev.model.dtype);
    if (ev.step > 0) tag("nanotune.resumed_from_step", String(ev.step));
    const { params, truncatedKeys } = flattenParams(ev.config);
    if (truncatedKeys.length > 0) tag("nanotune.truncated_params", truncatedKeys.join(","));
    await send(params);
  }

  async function end(ev: Extract<TrainerEvent, { type: "run:end" }>): Promise<void> {
    tag("nanotune.end_reason", ev.reason);
    if (ev.checkpoint) {
      tag("checkpoint.latest", ev.checkpoint);
      tag(`checkpoint.${ev.step}`, ev.checkpoint);
    }
    if (ev.error) tag("nanotune.error", `${ev.error.code}: ${ev.error.message}`);
    await send();
    await call("POST", "runs/update", { run_id: runId, status: mlflowStatus(ev.reason), end_time: Date.now() });
    ended = true;
  }

  return {
    name: "mlflow",
    async write(ev) {
      if (broken && ev.type !== "run:start") throw new Error("sinks.mlflow: an earlier request failed; nothing more is sent");
      try {
        if (ev.type === "run:start") return await start(ev);
        if (runId === null || ended) return; // no run (its start failed, or it has ended)
        const now = Date.now();
        let sendNow = false;
        for (const [key, value] of scalarsOf(ev)) metric(key, value, ev.step, now); // the same curves as sinks.tensorboard
        switch (ev.type) {
          case "train:step":
            if (ev.policy !== null && ev.policy !== policy) tag("policy", (policy = ev.policy));
            break;
          case "eval":
            sendNow = true;
            break;
          case "policy:swapped":
            tag("policy", (policy = ev.to));
            tag("policy.spec", JSON.stringify(ev.spec));
            tag("policy.last_swap", `step ${ev.step}: ${ev.from ?? "none"} -> ${ev.to}`);
            sendNow = true;
            break;
          case "checkpoint:saved":
            tag("checkpoint.latest", ev.path);
            tag(`checkpoint.${ev.step}`, ev.path);
            sendNow = true;
            break;
          case "run:end":
            return await end(ev);
          default:
            break; // sink:error and events this sink does not log
        }
        waiting++;
        if (sendNow || waiting >= flushEvery || performance.now() - lastSend >= flushIntervalMs) await send();
      } catch (err) {
        broken = true;
        throw err;
      }
    },
    async close() {
      if (broken || runId === null || ended) return;
      try {
        // the run's consumer stopped reading its events before run:end
        tag("nanotune.end_reason", "closed before run:end");
        await send();
        await call("POST", "runs/update", { run_id: runId, status: "KILLED", end_time: Date.now() });
        ended = true;
      } catch (err) {
        broken = true;
        throw err;
      }
    },
  };
}

/** A failed MLflow request; `code` is MLflow's error_code when it sent one. */
class MlflowRequestError extends Error {
  override name = "MlflowRequestError";
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
  }
}
