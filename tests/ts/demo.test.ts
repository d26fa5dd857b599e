// `nanotune demo` (what `npm start` runs): the real-weights demo end to end, with few steps.
// The model is the smollm2-135m preset from the cache setup converted it into (the default
// NANOTUNE_CACHE, not a per-test one: a fresh conversion would add 20 s).
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import type { RealDemoResult } from "../../ts/demo-real.ts";
import { KNOWN, NEW_FACTS } from "../../ts/demo-real.ts";
// @ts-expect-error plain ESM helper without types
import { repoRoot } from "../../ts/dev/python.mjs";
import { runProcess } from "./fixtures/run.ts";

const tsx = pathToFileURL(join(repoRoot, "node_modules", "tsx", "dist", "loader.mjs")).href;

const dir = mkdtempSync(join(tmpdir(), "nanotune-demo-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("the real-weights demo", () => {
  it("asks SmolLM2 before and after NanoAdam and AdamW and prints the forgetting probe", async () => {
    const r = await runProcess(process.execPath, ["--import", tsx, join(repoRoot, "ts", "cli", "bin.ts"), "demo", "--steps", "4", "--run-dir", dir], { cwd: dir });
    expect(r.status, r.stdout + r.stderr).toBe(0);
    const out = r.stdout;
    expect(out).toContain("the made-up facts, before -> after");
    expect(out).toContain("the forgetting probe");
    expect(out).toMatch(/\| optimizer \| lr +\| mask policy +\| steps \|.*\| new facts right \| known answers kept \| loss on known answers \|/);
    expect(out).toMatch(/swapping the mask policy to smallWeights k=5%, effective at step 2/);
    for (const f of NEW_FACTS) expect(out).toContain(f.q);

    const demo = JSON.parse(readFileSync(join(dir, "demo.json"), "utf8")) as RealDemoResult;
    // A pretrained model: it knows most of the general questions, and none of the made-up facts.
    expect(demo.before.knownRight).toBeGreaterThanOrEqual(KNOWN.length / 2);
    expect(demo.before.learned).toBeLessThanOrEqual(1);
    expect(Number.isFinite(demo.before.knownLoss)).toBe(true);
    expect(demo.rows.map((x) => x.optimizer)).toEqual(["NanoAdam", "AdamW"]);
    const [nano, adamw] = demo.rows as [RealDemoResult["rows"][number], RealDemoResult["rows"][number]];
    expect(nano.policy).toBe("smallWeights k=10% -> smallWeights k=5%");
    for (const row of demo.rows) {
      expect(row.steps).toBe(4);
      expect(row.known).toBe(demo.before.knownRight);
      expect(row.kept).toBeLessThanOrEqual(row.known);
      expect(Number.isFinite(row.knownLoss)).toBe(true);
      expect(row.lastLoss).toBeLessThan(row.firstLoss); // four steps on the same eight facts
      expect(demo.answers[row.optimizer]!.facts).toHaveLength(NEW_FACTS.length);
    }
    expect(nano.stateBytes).toBeLessThan(adamw.stateBytes / 5); // k = 10% then 5% vs two dense moments
    // NanoAdam's run keeps its model; AdamW's writes its metrics only
    expect(readFileSync(join(dir, "nanoadam", "checkpoints", "step-000004", "model", "config.json"), "utf8")).toContain("llama");
    expect(readFileSync(join(dir, "adamw", "metrics.jsonl"), "utf8")).toContain('"type":"train:step"');
  }, 420_000);
});
