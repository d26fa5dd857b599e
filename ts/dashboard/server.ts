// sinks.dashboard(): a live page for one run, served by node:http on the loopback
// interface. The page (page.ts: HTML, CSS and JS as strings, uPlot from node_modules)
// draws the run's metrics from a Server-Sent Events stream of its events, shows a
// |w| vs |grad| scatter of one tensor (the Trainer's sampleWeights), and steers the
// run through the TrainerControl the Trainer attaches: a mask-policy swap, pause and
// resume, stop-and-save. A click has exactly the effect of the same Trainer call.
//
// Security: the server listens on 127.0.0.1 (unless `host` says otherwise) and every
// request (page, assets, stream, samples, controls) must carry the random token of the
// printed URL (`?token=`, 32 random bytes in hex, compared in constant time); anything
// else gets 403. The page sends no Referer, loads nothing from elsewhere, and runs under
// a Content-Security-Policy that allows only its own origin.
//
// Endpoints (all with ?token=...):
//   GET  /                      the page             GET /app.js, /app.css, /uplot.js, /uplot.css
//   GET  /events                text/event-stream: `state` events, every TrainerEvent as a
//                               default message (id: its sequence number; replayed from the
//                               bounded history on connect, after Last-Event-ID on reconnect),
//                               `sample` events (the latest weight sample)
//   GET  /api/state             {attached, paused, ended, step, totalSteps, policy, tensor}
//   GET  /api/sample?tensor=N   a fresh weight sample of tensor N (also pushed to every page)
//   POST /api/policy            a PolicySpec {type, density, maskInterval?, ...} -> setMaskPolicy
//   POST /api/pause | /api/resume | /api/stop
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { createRequire } from "node:module";
import type { AddressInfo } from "node:net";
import { NanotuneError } from "../errors.ts";
import type { Sink, TrainerControl, WeightSample } from "../sinks/sink.ts";
import { builtinPolicyNames, PolicyJSON, policyFromJSON } from "../train/config.ts";
import type { TrainerEvent } from "../train/events.ts";
import type { MaskPolicy } from "../train/policies.ts";
import { EventHistory } from "./history.ts";
import { APP_CSS, APP_JS, pageHtml } from "./page.ts";

export interface DashboardOptions {
  /** TCP port; 0 (default) picks a free one (the URL says which). */
  port?: number;
  /**
   * Interface to listen on; default "127.0.0.1". Another address exposes the page (and
   * its controls) to whoever reaches it and knows the token, over plain HTTP.
   */
  host?: string;
  /** Sample the scatter's tensor after every this many train:step events (default 5), at most one call in flight. */
  sampleEvery?: number;
  /** ... and at most once per this many milliseconds (default 1000). */
  sampleIntervalMs?: number;
  /** Entries per weight sample (default 2000). */
  sampleCount?: number;
  /** train:step events kept for pages opened mid-run (default 4000; beyond that a doubling stride: history.ts). */
  maxSteps?: number;
  /** Where the URL line goes (default: stderr); false prints nothing. */
  print?: ((line: string) => void) | false;
  /** Called with the URL once the server listens. */
  onListening?: (url: string) => void;
}

export interface DashboardSink extends Sink {
  /** The page's URL with its token, once listening (null before). */
  readonly url: string | null;
  /** Resolves with the URL once the server listens; rejects if it cannot (a port in use). */
  readonly listening: Promise<string>;
  attach(control: TrainerControl): void;
  /** Ends the event streams (after run:end was sent) and closes the server. */
  close(): Promise<void>;
}

/** What a page receives for a weight sample: absolute values, rounded to 4 significant digits. */
export interface SamplePayload {
  tensor: string;
  shape: number[];
  step: number | null;
  /** |w| per sampled entry. */
  w: number[];
  /** |grad| per sampled entry (null: no gradients yet). */
  g: number[] | null;
  /** 1: in the mask (null: the tensor is not masked). */
  m: number[] | null;
  tensors: WeightSample["tensors"];
}

const nonFiniteAsString = (_k: string, v: unknown) => (typeof v === "number" && !Number.isFinite(v) ? String(v) : v);
const r4 = (x: number) => (Number.isFinite(x) ? Number(Math.abs(x).toPrecision(4)) : String(Math.abs(x)));

export function samplePayload(s: WeightSample): SamplePayload {
  const w = s.weights.toArray();
  const g = s.grads?.toArray() ?? null;
  const m = s.inMask?.toArray() ?? null;
  return {
    tensor: s.tensor,
    shape: [...s.shape],
    step: s.step,
    w: Array.from(w, r4) as number[],
    g: g && (Array.from(g, r4) as number[]),
    m: m && Array.from(m),
    tensors: s.tensors,
  };
}

const localRequire = createRequire(import.meta.url);
let uplotAssets: { js: string; css: string } | null = null;
function uplot() {
  uplotAssets ??= {
    js: readFileSync(localRequire.resolve("uplot/dist/uPlot.iife.min.js"), "utf8"),
    css: readFileSync(localRequire.resolve("uplot/dist/uPlot.min.css"), "utf8"),
  };
  return uplotAssets;
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly field?: string,
  ) {
    super(message);
  }
}

const SECURITY_HEADERS = {
  "Cache-Control": "no-store",
  "Referrer-Policy": "no-referrer",
  "X-Content-Type-Options": "nosniff",
  "X-Frame-Options": "DENY",
  "Content-Security-Policy":
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
};

/** The dashboard sink; see the file comment. */
export class Dashboard implements DashboardSink {
  readonly name = "dashboard";
  readonly listening: Promise<string>;
  private readonly server: Server;
  private readonly token = randomBytes(32).toString("hex");
  private readonly tokenDigest = createHash("sha256").update(this.token).digest();
  private readonly history: EventHistory;
  private readonly clients = new Set<ServerResponse>();
  private readonly heartbeat: NodeJS.Timeout;
  private readonly print: (line: string) => void;
  private readonly sampleEvery: number;
  private readonly sampleIntervalMs: number;
  private readonly sampleCount: number;
  private address: string | null = null;
  private control: TrainerControl | null = null;
  private started = false;
  private ended = false;
  private closed = false;
  private closing: Promise<void> | null = null;
  private step: number | null = null;
  private totalSteps: number | null = null;
  private policy: string | null = null;
  // weight samples: one call in flight; the periodic ones are skipped while one runs
  private tensor: string | undefined;
  private sampling: Promise<unknown> = Promise.resolve();
  private inFlight = 0;
  private stepsSinceSample = 0;
  private lastSampleAt = -Infinity;
  private samplePending = false;
  private sampleTimer: NodeJS.Timeout | null = null;
  private latestSample: string | null = null;

  constructor(options: DashboardOptions = {}) {
    const host = options.host ?? "127.0.0.1";
    const port = options.port ?? 0;
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new NanotuneError("INVALID_ARGUMENT", `sinks.dashboard: port must be an integer in 0..65535, got ${port}`);
    const positiveInt = (v: number | undefined, d: number, what: string) => {
      const n = v ?? d;
      if (!Number.isInteger(n) || n < 1) throw new NanotuneError("INVALID_ARGUMENT", `sinks.dashboard: ${what} must be an integer >= 1, got ${v}`);
      return n;
    };
    this.sampleEvery = positiveInt(options.sampleEvery, 5, "sampleEvery");
    this.sampleCount = positiveInt(options.sampleCount, 2000, "sampleCount");
    this.sampleIntervalMs = Math.max(0, options.sampleIntervalMs ?? 1000);
    this.history = new EventHistory({ maxSteps: options.maxSteps });
    this.print = options.print === false ? () => {} : (options.print ?? ((line) => void process.stderr.write(`${line}\n`)));

    this.server = createServer((req, res) => this.handle(req, res));
    this.server.unref(); // a dashboard never keeps the process alive by itself
    this.heartbeat = setInterval(() => this.broadcast(": ping\n\n"), 15_000).unref();
    this.listening = new Promise<string>((resolve, reject) => {
      this.server.once("error", (err: NodeJS.ErrnoException) => {
        const why = err.code === "EADDRINUSE" ? "the address is in use" : err.code === "EACCES" ? "permission denied" : err.message;
        reject(new NanotuneError("INVALID_ARGUMENT", `dashboard: cannot listen on ${host}:${port}: ${why}`));
      });
      this.server.listen(port, host, () => {
        const a = this.server.address() as AddressInfo;
        const h = a.family === "IPv6" ? `[${a.address}]` : a.address;
        this.address = `http://${h}:${a.port}/?token=${this.token}`;
        this.print(`dashboard: ${this.address}`);
        options.onListening?.(this.address);
        resolve(this.address);
      });
    });
    this.listening.catch((err: Error) => this.print(err.message));
  }

  get url(): string | null {
    return this.address;
  }

  attach(control: TrainerControl): void {
    if (this.closed) return;
    this.control = control;
    this.started = false;
    this.ended = false;
    this.broadcastState();
  }

  write(ev: TrainerEvent): void {
    if (this.closed) return;
    const json = JSON.stringify({ time: new Date().toISOString(), ...ev }, nonFiniteAsString);
    const entry = this.history.add(ev.type, json);
    this.broadcast(`id: ${entry.seq}\ndata: ${json}\n\n`);
    switch (ev.type) {
      case "run:start":
        this.started = true;
        this.totalSteps = ev.totalSteps;
        this.step = ev.step;
        this.policy = ev.policy?.name ?? null;
        this.requestSample(); // fills the page's tensor list
        break;
      case "train:step":
        this.step = ev.step + 1;
        this.policy = ev.policy;
        if (++this.stepsSinceSample >= this.sampleEvery) this.requestSample();
        break;
      case "run:end":
        this.ended = true;
        this.step = ev.step;
        this.broadcastState();
        break;
      case "run:paused":
        this.requestSample(); // the scatter shows where the run stands
        break;
    }
  }

  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  // ---- HTTP -------------------------------------------------------------------

  private tokenOk(given: string | null): boolean {
    if (given === null) return false;
    const digest = createHash("sha256").update(given).digest(); // equal lengths for timingSafeEqual
    return timingSafeEqual(digest, this.tokenDigest);
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const url = new URL(req.url ?? "/", "http://dashboard");
    if (!this.tokenOk(url.searchParams.get("token"))) {
      res.writeHead(403, { ...SECURITY_HEADERS, "Content-Type": "text/plain; charset=utf-8" });
      res.end("403 forbidden: open the dashboard with the URL it printed (it carries the token)\n");
      req.resume();
      return;
    }
    this.route(req, res, url).catch((e: unknown) => {
      const err = e instanceof HttpError ? e : new HttpError(500, e instanceof Error ? e.message.split("\n")[0]! : String(e));
      if (!res.headersSent) sendJson(res, err.status, { error: err.message, ...(err.field ? { field: err.field } : {}) });
      else res.end();
    });
  }

  private async route(req: IncomingMessage, res: ServerResponse, url: URL): Promise<void> {
    const path = url.pathname;
    const method = req.method ?? "GET";
    const get = method === "GET" || method === "HEAD";
    const assets: Record<string, () => [string, string]> = {
      "/": () => ["text/html; charset=utf-8", pageHtml(this.token, { policies: builtinPolicyNames, sampleEvery: this.sampleEvery })],
      "/index.html": () => assets["/"]!(),
      "/app.js": () => ["text/javascript; charset=utf-8", APP_JS],
      "/app.css": () => ["text/css; charset=utf-8", APP_CSS],
      "/uplot.js": () => ["text/javascript; charset=utf-8", uplot().js],
      "/uplot.css": () => ["text/css; charset=utf-8", uplot().css],
    };
    if (Object.hasOwn(assets, path)) {
      if (!get) throw new HttpError(405, `${method} ${path}: use GET`);
      const [type, body] = assets[path]!();
      res.writeHead(200, { ...SECURITY_HEADERS, "Content-Type": type, "Content-Length": Buffer.byteLength(body) });
      res.end(method === "HEAD" ? undefined : body);
      return;
    }
    if (path === "/events") {
      if (!get) throw new HttpError(405, `${method} ${path}: use GET`);
      return this.stream(req, res);
    }
    if (path === "/api/state") {
      if (!get) throw new HttpError(405, `${method} ${path}: use GET`);
      return sendJson(res, 200, this.state());
    }
    if (path === "/api/sample") {
      if (!get) throw new HttpError(405, `${method} ${path}: use GET`);
      const tensor = url.searchParams.get("tensor") || undefined;
      const payload = await this.sample(tensor, true);
      res.writeHead(200, { ...SECURITY_HEADERS, "Content-Type": "application/json" });
      res.end(payload);
      return;
    }
    const controls: Record<string, (body: unknown, control: TrainerControl) => Record<string, unknown>> = {
      "/api/policy": (body, control) => {
        const policy = this.parsePolicy(body);
        control.setMaskPolicy(policy);
        return { ok: true, policy: policy.toJSON?.() ?? { type: "custom", name: policy.name }, effective: "at the next step (policy:swapped)" };
      },
      "/api/pause": (_b, control) => {
        control.pause();
        return { ok: true, paused: true };
      },
      "/api/resume": (_b, control) => {
        control.resume();
        return { ok: true, paused: false };
      },
      "/api/stop": (_b, control) => {
        control.stop();
        return { ok: true, stopping: true };
      },
    };
    if (Object.hasOwn(controls, path)) {
      if (method !== "POST") throw new HttpError(405, `${method} ${path}: use POST`);
      const body = await readJson(req);
      const control = this.control;
      if (!control || !this.started || this.ended || this.closed) {
        throw new HttpError(409, this.ended || this.closed ? "the run has ended" : "no run is attached yet (it has not started)");
      }
      let out: Record<string, unknown>;
      try {
        out = controls[path]!(body, control);
      } catch (e) {
        if (e instanceof HttpError) throw e;
        throw new HttpError(409, e instanceof Error ? e.message.split("\n")[0]! : String(e));
      }
      this.broadcastState();
      return sendJson(res, 200, out);
    }
    throw new HttpError(404, `${path}: no such page`);
  }

  /** A PolicySpec body -> the built-in policy; a 400 naming the field when it is wrong, or when its decision at the next step would be refused. */
  private parsePolicy(body: unknown): MaskPolicy {
    const parsed = PolicyJSON.safeParse(body);
    if (!parsed.success) {
      const issue = parsed.error.issues[0]!;
      const keys = (issue as { keys?: string[] }).keys;
      const field = issue.path.length ? issue.path.join(".") : keys?.length ? keys.join(", ") : "body";
      const message = issue.code === "unrecognized_keys" ? "unknown field" : issue.message;
      throw new HttpError(400, `${field}: ${message}${field === "type" ? ` (one of ${builtinPolicyNames.join(", ")})` : ""}`, field);
    }
    let policy: MaskPolicy;
    try {
      policy = policyFromJSON(parsed.data);
    } catch (e) {
      throw new HttpError(400, e instanceof Error ? e.message : String(e), "body");
    }
    // What the Trainer will ask of it at the next step: a density outside (0, 1] would end the run there.
    const step = this.step ?? 0;
    const total = this.totalSteps ?? step + 1;
    let d;
    try {
      d = policy.decide(step, total);
    } catch (e) {
      throw new HttpError(400, `density: ${e instanceof Error ? e.message : String(e)}`, "density");
    }
    for (const [pattern, k] of Object.entries(d.perTensor ?? {})) {
      if (!(k >= 0 && k <= 1)) throw new HttpError(400, `perTensor.${pattern}: density at step ${step} is ${k}; must be in [0, 1]`, `perTensor.${pattern}`);
    }
    for (const key of ["include", "exclude"] as const) {
      for (const p of [...Object.keys(d.perTensor ?? {}), ...(key === "include" ? (d.include ?? []) : (d.exclude ?? []))]) {
        try {
          new RegExp(p);
        } catch {
          throw new HttpError(400, `${key}: '${p}' is not a regular expression`, key);
        }
      }
    }
    return policy;
  }

  private state() {
    return {
      attached: this.control !== null && !this.closed,
      started: this.started,
      paused: this.control?.paused ?? false,
      ended: this.ended,
      step: this.step,
      totalSteps: this.totalSteps,
      policy: this.policy,
      tensor: this.tensor ?? null,
      history: this.history.stepStats,
    };
  }

  private stream(req: IncomingMessage, res: ServerResponse): void {
    res.writeHead(200, {
      ...SECURITY_HEADERS,
      "Content-Type": "text/event-stream; charset=utf-8",
      Connection: "keep-alive",
      "X-Accel-Buffering": "no",
    });
    const after = Number(req.headers["last-event-id"]) || 0;
    let out = `retry: 2000\n\nevent: state\ndata: ${JSON.stringify(this.state())}\n\n`;
    for (const e of this.history.replay(after)) out += `id: ${e.seq}\ndata: ${e.json}\n\n`;
    if (this.latestSample) out += `event: sample\ndata: ${this.latestSample}\n\n`;
    res.write(out);
    if (this.closed) {
      res.end();
      return;
    }
    this.clients.add(res);
    res.on("close", () => this.clients.delete(res));
    if (!this.latestSample) this.requestSample(); // the first page of a run gets a scatter (and the tensor list) at once
  }

  private broadcast(chunk: string): void {
    for (const res of this.clients) {
      // a page that stopped reading does not grow our memory without bound
      if (res.writableLength > 16 * 1024 * 1024) {
        res.destroy();
        this.clients.delete(res);
        continue;
      }
      res.write(chunk);
    }
  }

  private broadcastState(): void {
    this.broadcast(`event: state\ndata: ${JSON.stringify(this.state())}\n\n`);
  }

  // ---- weight samples ---------------------------------------------------------

  /** After every sampleEvery steps (and on run:start, run:paused): a sample, unless one is in flight; at most one per sampleIntervalMs. */
  private requestSample(): void {
    this.samplePending = true;
    this.pumpSamples();
  }

  /** Periodic samples run only while a page is open: with no one watching, the run pays nothing. */
  private pumpSamples(): void {
    if (!this.samplePending || this.inFlight > 0 || this.sampleTimer || !this.canSample() || this.clients.size === 0) return;
    const wait = this.lastSampleAt + this.sampleIntervalMs - performance.now();
    if (wait > 0) {
      this.sampleTimer = setTimeout(() => {
        this.sampleTimer = null;
        this.pumpSamples();
      }, wait);
      this.sampleTimer.unref();
      return;
    }
    this.samplePending = false;
    this.stepsSinceSample = 0;
    this.sample(this.tensor, false).catch(() => {}); // reported to the pages as a sample-error event
  }

  private canSample(): boolean {
    return this.control !== null && this.started && !this.ended && !this.closed;
  }

  /** One sampleWeights call at a time (queued behind the one in flight); the JSON is pushed to every page. */
  private sample(tensor: string | undefined, requested: boolean): Promise<string> {
    const run = this.sampling.then(async () => {
      if (!this.canSample()) throw new HttpError(409, this.ended || this.closed ? "the run has ended" : "no run is attached yet (it has not started)");
      const control = this.control!;
      this.inFlight++;
      this.lastSampleAt = performance.now();
      try {
        const s = await control.sampleWeights({ tensor, count: this.sampleCount });
        const json = JSON.stringify(samplePayload(s), nonFiniteAsString);
        if (requested || tensor === this.tensor || this.tensor === undefined) {
          this.tensor = s.tensor; // the periodic samples follow the latest choice
          this.latestSample = json;
          this.broadcast(`event: sample\ndata: ${json}\n\n`);
        }
        return json;
      } catch (e) {
        if (e instanceof HttpError) throw e;
        const message = e instanceof Error ? e.message.split("\n")[0]! : String(e);
        this.broadcast(`event: sample-error\ndata: ${JSON.stringify({ tensor: tensor ?? null, message })}\n\n`);
        throw new HttpError(e instanceof NanotuneError && /INVALID/.test(e.code) ? 400 : 500, `sampleWeights: ${message}`, "tensor");
      } finally {
        this.inFlight--;
        setImmediate(() => this.pumpSamples());
      }
    });
    this.sampling = run.catch(() => {});
    return run;
  }

  // ---- shutdown -------------------------------------------------------------------

  private async shutdown(): Promise<void> {
    this.closed = true;
    this.control = null;
    clearInterval(this.heartbeat);
    if (this.sampleTimer) clearTimeout(this.sampleTimer);
    // no sampleWeights call outlives the run (a stuck sidecar is the Trainer's to report)
    await Promise.race([this.sampling, new Promise((r) => setTimeout(r, 5000).unref())]);
    this.broadcastState();
    // end the streams (the pages have run:end), wait for the bytes to leave, then close
    const ends = [...this.clients].map((res) => new Promise<void>((resolve) => {
      res.once("close", resolve);
      res.end();
    }));
    await Promise.race([Promise.all(ends), new Promise((r) => setTimeout(r, 2000).unref())]);
    this.clients.clear();
    await new Promise<void>((resolve) => {
      if (!this.server.listening) return resolve();
      this.server.close(() => resolve());
      this.server.closeIdleConnections();
      setTimeout(() => {
        this.server.closeAllConnections();
      }, 1000).unref();
    });
  }
}

async function readJson(req: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of req as AsyncIterable<Buffer>) {
    size += c.length;
    if (size > 64 * 1024) throw new HttpError(413, "body: larger than 64 KiB", "body");
    chunks.push(c);
  }
  const text = Buffer.concat(chunks).toString("utf8").trim();
  if (text === "") return {};
  const type = String(req.headers["content-type"] ?? "");
  if (!type.startsWith("application/json")) throw new HttpError(415, "body: send JSON with Content-Type: application/json", "body");
  try {
    return JSON.parse(text);
  } catch {
    throw new HttpError(400, "body: not valid JSON", "body");
  }
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body, nonFiniteAsString);
  res.writeHead(status, { ...SECURITY_HEADERS, "Content-Type": "application/json", "Content-Length": Buffer.byteLength(text) });
  res.end(text);
}

/** A live dashboard for the run (see docs/dashboard.md): `sinks.dashboard({ port: 0 })`; its `listening` resolves with the URL. */
export function dashboard(options: DashboardOptions = {}): DashboardSink {
  return new Dashboard(options);
}
