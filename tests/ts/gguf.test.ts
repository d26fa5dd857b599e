// A GGUF model from TypeScript: `model: { path: DIR, ggufFile }` and `model: "x.gguf"` over the
// real wire, through the real sidecar. The file is written from the tiny-llama preset by the
// Python tests' GGUF writer (tests/python/gguf_writer.py), so nothing is downloaded.
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { NanotuneError, Trainer } from "../../ts/index.ts";
// @ts-expect-error plain ESM helper without types
import { pythonExecutable, repoRoot } from "../../ts/dev/python.mjs";
import { runProcess } from "./fixtures/run.ts";
import { cacheEnv, collect, sinkRunConfig, startTinyRun, steps, stopTinyRun, type TinyRun } from "./fixtures/tiny-run.ts";

let run: TinyRun;
const WRITE = `import sys
sys.path.insert(0, "tests/python")
from gguf_writer import write_gguf
from nanotune.models import load_model
write_gguf(load_model("tiny-llama", device="cpu").path, sys.argv[1], sys.argv[2])`;

beforeAll(async () => {
  run = await startTinyRun("nanotune-gguf-");
  for (const [file, type] of [["tiny.gguf", "F32"], ["tiny.q8.gguf", "Q8_0"]]) {
    const r = await runProcess(pythonExecutable(), ["-c", WRITE, join(run.dir, file!), type!], {
      cwd: repoRoot,
      env: { ...process.env, ...cacheEnv(run.dir), PYTHONPATH: join(repoRoot, "python") },
    });
    expect(r.status, r.stderr).toBe(0);
  }
});
afterAll(() => stopTinyRun(run));

describe("GGUF models", () => {
  it("a directory plus ggufFile trains like the preset it was written from; x.gguf alike", async () => {
    const losses: number[][] = [];
    for (const model of [{ path: "tiny-llama", device: "cpu" }, { path: run.dir, ggufFile: "tiny.gguf", device: "cpu" }]) {
      const trainer = new Trainer({ sidecar: run.sc, ...sinkRunConfig(run.dataPath, { model, steps: 3, evalEvery: 0 }) });
      const evs = await collect(trainer);
      const start = evs.find((e) => e.type === "run:start");
      if (model.path !== "tiny-llama") expect(start?.type === "run:start" && start.model.path).toContain(join("cache", "gguf", "tiny-"));
      losses.push(steps(evs).map((e) => e.loss));
    }
    expect(losses[1]).toEqual(losses[0]); // F32 GGUF: the same weights and tokenizer, so the same run
    const q8 = new Trainer({ sidecar: run.sc, ...sinkRunConfig(run.dataPath, { model: join(run.dir, "tiny.q8.gguf"), steps: 2, evalEvery: 0 }) });
    const q8Losses = steps(await collect(q8)).map((e) => e.loss);
    expect(q8Losses).toHaveLength(2);
    expect(q8Losses[0]).not.toBe(losses[0]![0]); // quantized: close, not equal
    expect(Math.abs(q8Losses[0]! - losses[0]![0]!)).toBeLessThan(0.05);
  });

  it("a bad ggufFile is INVALID_PARAMS naming the file, and the sidecar keeps serving", async () => {
    const bad = new Trainer({ sidecar: run.sc, ...sinkRunConfig(run.dataPath, { model: { path: run.dir, ggufFile: "missing.gguf" }, steps: 1 }) });
    const err = await collect(bad).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(NanotuneError);
    expect((err as NanotuneError).code).toBe("INVALID_PARAMS");
    expect((err as NanotuneError).message).toContain(join(run.dir, "missing.gguf"));
    expect((err as NanotuneError).message).toContain("does not exist");
    const ok = new Trainer({ sidecar: run.sc, ...sinkRunConfig(run.dataPath, { steps: 1, evalEvery: 0 }) });
    expect(steps(await collect(ok))).toHaveLength(1);
  });
});
