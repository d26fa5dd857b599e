// docs/dashboard.png: the live dashboard of a real run (tiny Llama on the CPU), taken
// mid-run in headless Chromium after a policy swap clicked on the page.
//
//   npx tsx bench/dashboard-screenshot.ts [--out docs/dashboard.png] [--steps 400] [--tensor q_proj]
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";
import { demoTasks } from "../ts/demo.ts";
import { policies, schedules, Sidecar, sinks, Trainer, type TrainerEvent } from "../ts/index.ts";

const { values: args } = parseArgs({ options: { out: { type: "string", default: "docs/dashboard.png" }, steps: { type: "string", default: "400" }, tensor: { type: "string", default: "layers.1.self_attn.q_proj" } } });
const total = Number(args.steps);
const dir = mkdtempSync(join(tmpdir(), "nanotune-dashboard-shot-"));
const data = join(dir, "double.jsonl");
writeFileSync(data, demoTasks(400).double.map((r) => JSON.stringify(r)).join("\n") + "\n");

const sidecar = await Sidecar.start({ device: "cpu" });
const dash = sinks.dashboard({ port: 0, sampleEvery: 5, sampleIntervalMs: 500 });
const trainer = new Trainer({
  sidecar,
  model: { path: "tiny-llama", device: "cpu" },
  data: { path: data, cutoff: 64, seed: 0, evalFraction: 0.1 },
  optimizer: { name: "nanoadam", density: 0.1 },
  steps: total,
  microBatch: 8,
  lr: schedules.warmup(20, schedules.cosine({ peak: 1e-2, min: 1e-3 })),
  maskPolicy: policies.smallWeights({ density: schedules.linear(0.2, 0.05, { every: 50 }), maskInterval: 20 }),
  evalEvery: 25,
  runDir: join(dir, "run"),
  sinks: [dash],
});
const events: TrainerEvent[] = [];
trainer.pause(); // hold the run until the page is connected
const running = (async () => {
  for await (const ev of trainer.run()) events.push(ev);
})();

const browser = await puppeteer.launch({ executablePath: await chromium.executablePath(), args: [...chromium.args, "--lang=en-US"], headless: true });
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 1480, height: 930, deviceScaleFactor: 1 });
  page.on("dialog", (d) => void d.accept());
  page.on("pageerror", (e) => console.error(`page error: ${e}`));
  page.on("console", (m) => m.type() === "error" && console.error(`page console: ${m.text()}`));
  await page.goto(await dash.listening);
  const waitFor = (fn: string, timeout = 120_000) => page.waitForFunction(fn, { timeout, polling: 100 });
  await waitFor(`document.body.dataset.state === "paused"`).catch(async (e) => {
    console.error(await page.evaluate(`JSON.stringify({ state: document.body.dataset.state, events: window.nanotuneDashboard && window.nanotuneDashboard.state.events.map((e) => e.type) })`), events.map((e) => e.type));
    throw e;
  });
  await page.click("#resume");
  // the scatter's tensor: the first one whose name contains --tensor
  await waitFor(`document.querySelectorAll("#tensor option").length > 1`);
  const tensor = await page.$$eval("#tensor option", (os, part) => os.map((o) => (o as HTMLOptionElement).value).find((v) => v.includes(part)), args.tensor!);
  if (tensor) await page.select("#tensor", tensor);
  await waitFor(`window.nanotuneDashboard.points() >= ${Math.round(total * 0.45)}`);
  // two swaps clicked on the page: to random, then back to the paper's rule (the scatter then shows its mask)
  const swap = async (type: string, density: string, swaps: number) => {
    await page.select("#policy-type", type);
    await page.$eval("#policy-density", (el, v) => ((el as HTMLInputElement).value = v), density);
    await page.click("#policy-apply");
    await waitFor(`window.nanotuneDashboard.state.events.filter((e) => e.type === "policy:swapped").length === ${swaps}`);
  };
  await swap("random", "0.05", 1);
  await waitFor(`window.nanotuneDashboard.points() >= ${Math.round(total * 0.65)}`);
  await swap("smallWeights", "0.1", 2);
  await waitFor(`window.nanotuneDashboard.points() >= ${Math.round(total * 0.85)}`);
  await page.click("#pause");
  await waitFor(`document.body.dataset.state === "paused"`);
  // the scatter of the paused step (sampled on run:paused), then the picture
  await waitFor(`window.nanotuneDashboard.scatter().points > 0 && window.nanotuneDashboard.scatter().step === window.nanotuneDashboard.state.step`);
  await new Promise((r) => setTimeout(r, 300)); // the charts' next redraw (they redraw at most every 120 ms)
  await page.screenshot({ path: resolve(args.out!) as `${string}.png` });
  console.log(`wrote ${args.out} at step ${await page.evaluate(`window.nanotuneDashboard.state.step`)}`);
  await page.click("#stop");
  await running;
  const end = events.at(-1);
  console.log(`run:end ${end?.type === "run:end" ? end.reason : "?"}`);
} finally {
  await browser.close();
  await sidecar.close();
  rmSync(dir, { recursive: true, force: true });
}
