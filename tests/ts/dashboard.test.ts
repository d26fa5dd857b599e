// sinks.dashboard against a real run (tiny Llama, real sidecar) in real headless Chromium
// (@sparticuz/chromium + puppeteer-core): the page replays the run so far, its charts gain
// points, the |w| vs |grad| scatter shows the mask, and its controls steer the run with
// exactly the effect of the Trainer's own calls (policy swap, pause/resume, stop-and-save).
// Every request without the URL's token gets 403. No fixed sleeps: the run is held by
// pause while the page connects, and every wait is for a condition.
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { createServer, request } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import chromium from "@sparticuz/chromium";
import puppeteer, { type Browser, type Page } from "puppeteer-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { EventHistory } from "../../ts/dashboard/history.ts";
import { type DashboardSink, policies, sinks, Trainer, type TrainerEvent } from "../../ts/index.ts";
// @ts-expect-error plain ESM helper without types
import { repoRoot } from "../../ts/dev/python.mjs";
import { cacheEnv, collect, startTinyRun, stopTinyRun, type TinyRun } from "./fixtures/tiny-run.ts";
import { runProcess } from "./fixtures/run.ts";

let run: TinyRun;
let browser: Browser;

beforeAll(async () => {
  [run, browser] = await Promise.all([
    startTinyRun("nanotune-dashboard-"),
    // --lang: a C locale makes Chromium report "en-US@posix", which Intl (and so uPlot) rejects
    chromium.executablePath().then((executablePath) => puppeteer.launch({ executablePath, args: [...chromium.args, "--lang=en-US"], headless: true })),
  ]);
});
afterAll(async () => {
  await browser?.close();
  await stopTinyRun(run ?? {});
});

/** A plain HTTP request (no browser): status and body. */
function http(url: string, init: { method?: string; body?: string; headers?: Record<string, string> } = {}): Promise<{ status: number; body: string; type: string }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method: init.method ?? "GET", headers: init.headers }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (c: string) => {
        body += c;
        if (res.headers["content-type"]?.startsWith("text/event-stream")) res.destroy(); // a stream never ends: its first bytes will do
      });
      const done = () => resolve({ status: res.statusCode!, body, type: String(res.headers["content-type"]) });
      res.on("end", done);
      res.on("close", done);
    });
    req.on("error", reject);
    req.end(init.body);
  });
}
const postJson = (url: string, body: unknown) => http(url, { method: "POST", body: typeof body === "string" ? body : JSON.stringify(body), headers: { "Content-Type": "application/json" } });

/** Rejects as soon as the run fails, so a wait does not outlast a dead run; never resolves otherwise. */
let runFailed: Promise<never> = new Promise(() => {});
/** Polls `cond` until it holds (no fixed sleep decides anything); fails with `what` after `timeoutMs`. */
async function until(what: string, cond: () => boolean, timeoutMs = 60_000): Promise<void> {
  const t0 = Date.now();
  let failure: unknown = null;
  runFailed.catch((e: unknown) => (failure = e));
  while (!cond()) {
    if (failure) throw failure;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function untilAsync(what: string, cond: () => Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const waitPage = (page: Page, fn: string, timeout = 60_000) => Promise.race([page.waitForFunction(fn, { timeout, polling: 50 }), runFailed]);
const D = "window.nanotuneDashboard";

describe("sinks.dashboard", () => {
  it("shows a real run live in Chromium and steers it; every request needs the token", async () => {
    const printed: string[] = [];
    const dash: DashboardSink = sinks.dashboard({ port: 0, sampleEvery: 2, sampleIntervalMs: 100, print: (l) => printed.push(l) });
    const runDir = join(run.dir, "run");
    const trainer = new Trainer({
      sidecar: run.sc,
      model: { path: "tiny-llama", device: "cpu" },
      data: { path: run.dataPath, cutoff: 64, seed: 1, evalFraction: 0.1 },
      optimizer: { name: "nanoadam", density: 0.1 },
      steps: 1_000_000, // it ends by the page's stop-and-save
      microBatch: 2,
      lr: 1e-3,
      maskPolicy: policies.smallWeights({ density: 0.1, maskInterval: 4 }),
      evalEvery: 10,
      runDir,
      progress: false,
      sinks: [dash],
    });
    const events: TrainerEvent[] = [];
    const has = (type: string, from = 0) => events.slice(from).some((e) => e.type === type);
    trainer.pause(); // the run starts paused: nothing moves while the page connects
    const running = collect(trainer, (ev) => void events.push(ev));
    runFailed = running.then(() => new Promise<never>(() => {}));
    runFailed.catch(() => {}); // awaited (and reported) below
    const pages: Page[] = [];
    try {
      const url = await dash.listening;
      expect(url).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/\?token=[0-9a-f]{64}$/);
      expect(dash.url).toBe(url);
      expect(printed).toEqual([`dashboard: ${url}`]);
      const base = url.slice(0, url.indexOf("/?"));
      const token = new URL(url).searchParams.get("token")!;
      const wrong = token.replace(/^./, (c) => (c === "0" ? "1" : "0")); // same length, one character off
      await until("run:paused", () => has("run:paused"));

      // ---- the token: 403 for the page, an asset, the stream and a control without it (and nothing happens) ----
      for (const u of [`${base}/`, `${base}/?token=${wrong}`, `${base}/app.js`, `${base}/uplot.js?token=`, `${base}/events`, `${base}/events?token=${wrong}`, `${base}/api/sample?token=${wrong}`]) {
        const r = await http(u);
        expect([u, r.status]).toEqual([u, 403]);
        expect(r.body).not.toContain("<html");
      }
      for (const u of [`${base}/api/resume`, `${base}/api/resume?token=${wrong}`, `${base}/api/stop?token=${token.slice(0, 32)}`]) {
        expect((await postJson(u, {})).status).toBe(403);
      }
      expect(trainer.paused).toBe(true); // the refused resume did nothing
      // with the token: the page, uPlot from node_modules, the stream (replaying run:start)
      const page0 = await http(url);
      expect([page0.status, page0.type]).toEqual([200, "text/html; charset=utf-8"]);
      expect(page0.body).toContain(`/app.js?token=${token}`);
      expect((await http(`${base}/uplot.js?token=${token}`)).body).toContain("uPlot");
      const stream = await http(`${base}/events?token=${token}`);
      expect(stream.type).toBe("text/event-stream; charset=utf-8");
      expect(stream.body).toMatch(/^retry: \d+\n\nevent: state\ndata: \{.*"paused":true/);
      expect(stream.body).toContain('"type":"run:start"');

      // ---- a bad policy is a 400 naming the field (and is not applied) ----
      const apiPolicy = `${base}/api/policy?token=${token}`;
      for (const [body, field] of [
        [{ type: "random", density: 2 }, "density"],
        [{ type: "random", density: 0 }, "density"],
        [{ type: "sideways", density: 0.1 }, "type"],
        [{ type: "random", density: 0.1, maskInterval: 0 }, "maskInterval"],
        [{ type: "random", density: 0.1, colour: "red" }, "colour"],
        ["{not json", "body"],
      ] as const) {
        const r = await postJson(apiPolicy, body);
        expect([JSON.stringify(body), r.status]).toEqual([JSON.stringify(body), 400]);
        const j = JSON.parse(r.body) as { error: string; field: string };
        expect(j.field).toBe(field);
        expect(j.error.startsWith(`${field}:`)).toBe(true);
      }
      expect(trainer.maskPolicy?.name).toBe("smallWeights");

      // ---- the page, opened on the paused run ----
      const page = await browser.newPage();
      pages.push(page);
      await page.setViewport({ width: 1440, height: 1000 });
      const pageErrors: string[] = [];
      page.on("pageerror", (e) => pageErrors.push(String(e)));
      page.on("dialog", (d) => void d.accept()); // stop-and-save asks first
      await page.goto(url);
      await waitPage(page, `document.body.dataset.state === "paused"`);
      expect(await page.$eval("#st-step", (el) => el.textContent)).toBe("step 0 / 1000000");
      expect(await page.$eval("#st-policy", (el) => el.textContent)).toContain("smallWeights");
      expect(await page.$$eval("#policy-type option", (os) => os.map((o) => (o as HTMLOptionElement).value))).toEqual(["smallWeights", "largeWeights", "random", "largeGrads"]);

      // ---- resume from the page: the charts gain points, the scatter shows the mask ----
      let from = events.length;
      await page.click("#resume");
      await until("run:resumed", () => has("run:resumed", from));
      await waitPage(page, `${D}.points() >= 12`);
      const lengths = () => page.evaluate(`Object.values(${D}.charts).map((u) => u.data[0].length)`) as Promise<number[]>;
      const before = await lengths();
      expect(before).toHaveLength(5);
      await waitPage(page, `Object.values(${D}.charts).every((u) => u.data[0].length > ${Math.max(...before)})`);
      // every chart plots finite values: loss, grad norm, tokens/s, lr, density
      const finite = (await page.evaluate(`Object.values(${D}.charts).map((u) => u.data.slice(1).map((s) => s.filter((v) => Number.isFinite(v)).length))`)) as number[][];
      for (const counts of finite) expect(counts[0]).toBeGreaterThan(10);
      expect(finite[0]![1]).toBeGreaterThanOrEqual(1); // an eval loss point (evalEvery 10)
      // the scatter: points, some in the mask (smallWeights: small |w|)
      await waitPage(page, `${D}.scatter().points > 0 && ${D}.scatter().inMask > 0 && ${D}.state.sample.g !== null`);
      // (one evaluate: a new sample may arrive between two)
      const sc = (await page.evaluate(`(() => {
        const s = ${D}.state.sample, c = document.querySelector("#scatter");
        return { n: s.w.length, w: s.w, m: s.m, tensors: s.tensors.map((t) => t.name), tensor: s.tensor, drawn: [+c.dataset.points, +c.dataset.inMask] };
      })()`)) as { n: number; w: number[]; m: number[]; tensors: string[]; tensor: string; drawn: number[] };
      const inMask = sc.m.filter((v) => v === 1).length;
      expect(inMask).toBeGreaterThan(0);
      expect(inMask).toBeLessThan(sc.n);
      expect(sc.drawn).toEqual([sc.n, inMask]);
      const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
      expect(median(sc.w.filter((_, i) => sc.m[i] === 1))).toBeLessThan(median(sc.w.filter((_, i) => sc.m[i] !== 1)));
      // another tensor from the <select>: the page asks for it, the next samples follow it
      const other = sc.tensors.find((t) => t !== sc.tensor && t.includes("q_proj"))!;
      expect(other).toBeDefined();
      expect(await page.$$eval("#tensor option", (os) => os.length)).toBe(sc.tensors.length);
      await page.select("#tensor", other);
      await waitPage(page, `${D}.scatter().tensor === ${JSON.stringify(other)} && ${D}.scatter().points > 0 && ${D}.scatter().inMask > 0`);

      // ---- pause from the page, switch the policy there, resume: the swap lands at the next step ----
      from = events.length;
      await page.click("#pause");
      await until("run:paused", () => has("run:paused", from));
      const paused = events.slice(from).find((e) => e.type === "run:paused")!;
      const lastStep = events.filter((e) => e.type === "train:step").at(-1)!;
      expect(paused.step).toBe(lastStep.step + 1);
      await waitPage(page, `document.body.dataset.state === "paused" && document.querySelector('#events li[data-type="run:paused"]') !== null`);
      // a second page opened now replays the run so far: the same points as the first
      const page2 = await browser.newPage();
      pages.push(page2);
      await page2.goto(url);
      const shown = (await page.evaluate(`${D}.points()`)) as number;
      await waitPage(page2, `document.body.dataset.state === "paused" && ${D}.points() === ${shown}`);
      await page2.close();

      await page.select("#policy-type", "random");
      await page.$eval("#policy-density", (el) => ((el as HTMLInputElement).value = "0.05"));
      await page.$eval("#policy-interval", (el) => ((el as HTMLInputElement).value = "3"));
      await page.click("#policy-apply");
      await waitPage(page, `${D}.lastResponse !== null && ${D}.lastResponse.body.policy !== undefined`);
      expect(await page.evaluate(`${D}.lastResponse.status`)).toBe(200);
      expect(trainer.maskPolicy?.toJSON?.()).toEqual({ type: "random", density: 0.05, maskInterval: 3 });
      expect(has("policy:swapped")).toBe(false); // paused: no step has run since
      from = events.length;
      await page.click("#resume");
      await until("two refreshes after the swap", () => events.slice(from).filter((e) => e.type === "mask:refreshed").length >= 2);
      const after = events.slice(from);
      const swapped = after.find((e) => e.type === "policy:swapped")!;
      expect(swapped).toEqual({ type: "policy:swapped", step: paused.step, from: "smallWeights", to: "random", spec: { type: "random", density: 0.05, maskInterval: 3 } });
      const refreshes = after.filter((e): e is Extract<TrainerEvent, { type: "mask:refreshed" }> => e.type === "mask:refreshed");
      // the next refresh is the swap's own step, with the new policy; the one after, 3 steps later
      expect(refreshes[0]).toEqual({ type: "mask:refreshed", step: swapped.step, policy: "random", decision: { criterion: "random", density: 0.05 } });
      expect(refreshes[1]).toMatchObject({ step: swapped.step + 3, policy: "random" });
      const earlier = events.slice(0, from).filter((e) => e.type === "mask:refreshed");
      expect(earlier.length).toBeGreaterThan(1);
      expect(earlier.every((e) => e.type === "mask:refreshed" && e.policy === "smallWeights" && e.decision.criterion === "small_weights")).toBe(true);
      await waitPage(page, `[...document.querySelectorAll('#events li[data-type="policy:swapped"]')].some((li) => li.textContent.includes("smallWeights → random"))`);
      await waitPage(page, `document.querySelector("#st-policy").textContent.includes("random")`);
      await waitPage(page, `${D}.state.marks.some((m) => m.kind === "swap" && m.x === ${swapped.step})`);

      const shot = join(run.dir, "dashboard.png");
      await page.screenshot({ path: shot as `${string}.png` });
      expect(statSync(shot).size).toBeGreaterThan(20_000);

      // ---- stop-and-save from the page ----
      await page.click("#stop");
      const all = await running;
      const end = all.at(-1)!;
      expect(end).toMatchObject({ type: "run:end", reason: "interrupted" });
      const checkpoint = end.type === "run:end" ? end.checkpoint : null;
      expect(checkpoint).toBe(join(runDir, "checkpoints", `step-${String(end.step).padStart(6, "0")}`));
      expect(existsSync(join(checkpoint!, "model", "config.json"))).toBe(true);
      await waitPage(page, `document.body.dataset.state === "ended" && document.querySelector("#st-end").textContent.includes("interrupted")`);
      expect(await page.$eval('#events li[data-type="run:end"]', (li) => li.textContent)).toContain("interrupted");
      expect(await page.$eval("#stop", (b) => (b as HTMLButtonElement).disabled)).toBe(true);
      expect(pageErrors).toEqual([]);
      // the sink closed with the run: the server is gone
      await expect(http(url)).rejects.toThrow(/ECONNREFUSED/);
    } finally {
      trainer.stop();
      await running.catch(() => {});
      runFailed = new Promise(() => {});
      for (const p of pages) await p.close().catch(() => {});
    }
  });
});

describe("nanotune train --dashboard", () => {
  const tsx = pathToFileURL(join(repoRoot, "node_modules", "tsx", "dist", "loader.mjs")).href;
  const argv = (args: string[]) => ["--import", tsx, join(repoRoot, "ts", "cli", "bin.ts"), ...args];
  const env = () => ({ ...process.env, ...cacheEnv(run.dir) });
  const cfgDir = () => join(run.dir, "cli");
  const writeConfig = () => {
    mkdirSync(cfgDir(), { recursive: true });
    const config = { model: { path: "tiny-llama", device: "cpu" }, data: { path: run.dataPath, cutoff: 64 }, steps: 1_000_000, microBatch: 2, lr: 1e-3, runDir: "run", overwrite: true };
    writeFileSync(join(cfgDir(), "train.json"), JSON.stringify(config));
    return join(cfgDir(), "train.json");
  };

  it("prints the URL; the page's stop-and-save ends the run with a checkpoint and exit code 0", async () => {
    const child = spawn(process.execPath, argv(["train", writeConfig(), "--dashboard", "--port", "0"]), { cwd: cfgDir(), env: env(), stdio: ["ignore", "pipe", "pipe"] });
    let stderr = "";
    child.stderr.setEncoding("utf8").on("data", (c: string) => (stderr += c));
    child.stdout.resume();
    const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
    try {
      await until("the dashboard URL on stderr", () => /dashboard at http:\/\/127\.0\.0\.1:\d+\/\?token=[0-9a-f]{64}\n/.test(stderr));
      const url = /dashboard at (\S+)\n/.exec(stderr)![1]!;
      const api = (path: string) => url.replace("/?", `${path}?`);
      // wait (by polling the state endpoint) until a few steps ran
      let state = { started: false, step: 0 };
      await untilAsync("3 steps", async () => {
        state = JSON.parse((await http(api("/api/state"))).body) as typeof state;
        return state.started && state.step >= 3;
      });
      expect((await http(api("/api/stop").replace(/token=[0-9a-f]+/, "token=nope"), { method: "POST" })).status).toBe(403);
      const r = await postJson(api("/api/stop"), {});
      expect([r.status, JSON.parse(r.body)]).toEqual([200, { ok: true, stopping: true }]);
      expect(await exited).toBe(0);
      const metrics = readFileSync(join(cfgDir(), "run", "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l) as TrainerEvent);
      const end = metrics.at(-1)!;
      expect(end).toMatchObject({ type: "run:end", reason: "interrupted" });
      expect(end.type === "run:end" && end.checkpoint && existsSync(join(end.checkpoint, "model"))).toBe(true);
      await expect(http(url)).rejects.toThrow(/ECONNREFUSED/);
    } finally {
      child.kill("SIGKILL");
      await exited;
    }
  });

  it("--port without --dashboard, a bad port, or a port in use: exit 2 before the sidecar starts", async () => {
    const config = writeConfig();
    const busy = createServer();
    await new Promise<void>((resolve) => busy.listen(0, "127.0.0.1", resolve));
    try {
      const port = (busy.address() as AddressInfo).port;
      for (const [args, message] of [
        [["--port", "8080"], "train: --port needs --dashboard"],
        [["--dashboard", "--port", "http"], "train: --port must be an integer in 0..65535, got 'http'"],
        [["--dashboard", "--port", String(port)], `dashboard: cannot listen on 127.0.0.1:${port}: the address is in use`],
      ] as const) {
        const r = await runProcess(process.execPath, argv(["train", config, ...args]), { cwd: cfgDir(), env: env() });
        expect([args, r.status, r.stderr.trim()]).toEqual([args, 2, `nanotune: ${message}`]);
      }
    } finally {
      busy.close();
    }
  });
});

describe("the dashboard's event history", () => {
  const step = (i: number) => JSON.stringify({ type: "train:step", step: i });
  it("keeps at most maxSteps train:step events at a doubling stride, every rare event, and the latest step", () => {
    const h = new EventHistory({ maxSteps: 100, maxMarks: 10 });
    h.add("run:start", "{}");
    for (let i = 0; i < 1000; i++) {
      h.add("train:step", step(i));
      if (i % 100 === 0) h.add("eval", `{"eval":${i}}`);
      h.add("mask:refreshed", `{"refresh":${i}}`);
    }
    h.add("train:step", step(1000));
    const replay = h.replay();
    const steps = replay.filter((e) => e.json.includes("train:step")).map((e) => (JSON.parse(e.json) as { step: number }).step);
    expect(h.stepStats.every).toBe(16);
    expect(steps.length).toBeLessThanOrEqual(101);
    // a uniform grid from step 0 (1000 = the latest, always replayed)
    expect(steps.slice(0, -1)).toEqual(Array.from({ length: steps.length - 1 }, (_, i) => i * 16));
    expect(steps.at(-1)).toBe(1000);
    expect(replay.filter((e) => e.json.includes("eval"))).toHaveLength(10);
    expect(replay.filter((e) => e.json.includes("refresh")).length).toBeLessThanOrEqual(10);
    expect(replay[0]!.json).toBe("{}"); // run:start first
    const seqs = replay.map((e) => e.seq);
    expect(seqs).toEqual([...seqs].sort((a, b) => a - b));
    // Last-Event-ID: only what came after
    const tail = h.replay(seqs.at(-3)!);
    expect(tail.map((e) => e.seq)).toEqual(seqs.slice(-2));
  });
});

