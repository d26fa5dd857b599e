// `nanotune plot <runDir>` in-process (main returns the exit code): a real short
// tiny-llama run through the Trainer (NanoAdam, a policy swap, eval) writes
// metrics.jsonl; plot turns it into a PNG. Errors exit 2 with one line naming the path.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { main } from "../../ts/cli/index.ts";
import { policies, type Sidecar, Trainer } from "../../ts/index.ts";
import { collect, startTinyRun, stopTinyRun } from "./fixtures/tiny-run.ts";

let dir: string;
let sc: Sidecar;
let dataPath: string;

beforeAll(async () => ({ dir, dataPath, sc } = await startTinyRun("nanotune-cli-plot-")));
afterAll(() => stopTinyRun({ dir, sc }));
afterEach(() => vi.restoreAllMocks());

/** main(args), recording what it prints through console.log (stdout) and console.error (stderr). */
async function run(args: string[]) {
  const out: string[] = [];
  const err: string[] = [];
  vi.spyOn(console, "log").mockImplementation((...a: unknown[]) => void out.push(a.join(" ")));
  vi.spyOn(console, "error").mockImplementation((...a: unknown[]) => void err.push(a.join(" ")));
  const code = await main(args);
  vi.restoreAllMocks();
  return { code, out, err };
}

const PNG = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

describe("nanotune plot", () => {
  it("draws a real run's metrics.jsonl (NanoAdam, a policy swap, eval) into <runDir>/curves.png", async () => {
    const runDir = join(dir, "run");
    const trainer = new Trainer({
      sidecar: sc,
      model: { path: "tiny-llama", device: "cpu" },
      data: { path: dataPath, cutoff: 64, evalFraction: 0.1 },
      optimizer: { name: "nanoadam", density: 0.1 },
      maskPolicy: policies.smallWeights({ density: 0.1, maskInterval: 1000 }),
      steps: 6,
      microBatch: 4,
      lr: 1e-2,
      evalEvery: 3,
      runDir,
      progress: false,
    });
    const events = await collect(trainer, (ev) => {
      if (ev.type === "train:step" && ev.step === 2) trainer.setMaskPolicy(policies.largeWeights({ density: 0.05, maskInterval: 1000 }));
    });
    expect(events.filter((e) => e.type === "policy:swapped").map((e) => e.step)).toEqual([3]);
    expect(events.filter((e) => e.type === "eval")).toHaveLength(2);

    const r = await run(["plot", runDir]);
    expect(r.code, r.err.join("\n")).toBe(0);
    const png = join(runDir, "curves.png");
    expect(r.out).toEqual([png]);
    expect(readFileSync(png).subarray(0, 8)).toEqual(PNG);
    // the summary line on stderr says what was drawn: 6 steps, 2 evals, the swap, 2 refreshes (step 0, the swap's step 3)
    expect(r.err).toEqual([expect.stringMatching(/^plot: steps 0-5: train loss 6, eval loss 2, lr 6, density 6, grad norm 6, tokens\/s 6; 1 swaps, 2 mask refreshes, 0 skipped$/)]);

    const out = join(dir, "figs", "run.png");
    const r2 = await run(["plot", runDir, "--out", out]);
    expect(r2.code).toBe(0);
    expect(r2.out).toEqual([out]);
    expect(readFileSync(out).subarray(0, 8)).toEqual(PNG);
  });

  it("exits 2 with one line: a missing runDir, no metrics.jsonl, a malformed line (file:line), no steps, --out not a PNG", async () => {
    const missing = join(dir, "no", "such", "run");
    const r = await run(["plot", missing]);
    expect(r.code).toBe(2);
    expect(r.out).toEqual([]);
    expect(r.err).toEqual([`nanotune: plot: run directory ${missing} does not exist`]);

    const empty = join(dir, "empty");
    mkdirSync(empty);
    const noMetrics = await run(["plot", empty]);
    expect(noMetrics.code).toBe(2);
    expect(noMetrics.err).toEqual([`nanotune: plot: ${empty} has no metrics.jsonl (a Trainer with runDir writes one there)`]);

    // the checks Python makes come back as one line too
    const broken = join(dir, "broken");
    mkdirSync(broken);
    writeFileSync(join(broken, "metrics.jsonl"), `${JSON.stringify({ type: "run:start", step: 0 })}\n{"type": "train:step", "step": 0,\n`);
    const bad = await run(["plot", broken]);
    expect(bad.code).toBe(2);
    expect(bad.err).toEqual([expect.stringMatching(new RegExp(`^nanotune: plot: ${join(broken, "metrics.jsonl").replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}:2: malformed line: `))]);

    writeFileSync(join(broken, "metrics.jsonl"), `${JSON.stringify({ type: "run:start", step: 0 })}\n`);
    const noSteps = await run(["plot", broken]);
    expect(noSteps.code).toBe(2);
    expect(noSteps.err).toEqual([`nanotune: plot: ${join(broken, "metrics.jsonl")} has no train:step events (the run took no step)`]);

    const svg = await run(["plot", broken, "--out", join(dir, "x.svg")]);
    expect(svg.code).toBe(2);
    expect(svg.err).toEqual([`nanotune: plot: --out ${join(dir, "x.svg")}: the output must be a .png file`]);

    const noArg = await run(["plot"]);
    expect(noArg.code).toBe(2);
    expect(noArg.err).toEqual([expect.stringMatching(/^nanotune: plot: missing a run directory/)]);
  });
});
