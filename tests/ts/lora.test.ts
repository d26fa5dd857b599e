// LoRA from TypeScript (model.lora): a LoRA+NanoAdam run through the Trainer saves its
// adapter in PEFT's format; peft.PeftModel.from_pretrained loads it onto the base and
// greedy-generates what the sidecar generates, and so does `nanotune export --merge`'s
// plain HF directory (docs/lora.md).
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { isAbsolute, join } from "node:path";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { ConfigError, parseConfig, policies, type Sidecar, Trainer } from "../../ts/index.ts";
import { main as cli } from "../../ts/cli/index.ts";
// @ts-expect-error plain ESM helper without types
import { pythonExecutable, repoRoot } from "../../ts/dev/python.mjs";
import { collect, startTinyRun, steps, stopTinyRun } from "./fixtures/tiny-run.ts";

let dir: string;
let sc: Sidecar;
let dataPath: string;

beforeAll(async () => ({ dir, dataPath, sc } = await startTinyRun("nanotune-lora-")));
afterAll(() => stopTinyRun({ dir, sc }));

const PROMPT = "Double 4.";

/** Greedy continuations of PROMPT (bos + text, as the sidecar's generate builds it) by the adapter on its base, the base alone and a merged directory; how far the adapter moved the logits. */
const GENERATE_PY = `
import json, sys, warnings
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
warnings.simplefilter("ignore")
base, adapter, merged, prompt = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(adapter)
ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids])
def gen(model):
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
@torch.no_grad()
def logits(model):
    model.eval()
    return model(input_ids=ids).logits
peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
base_model = AutoModelForCausalLM.from_pretrained(base)
print(json.dumps({"peft": gen(peft_model), "base": gen(base_model),
                  "merged": gen(AutoModelForCausalLM.from_pretrained(merged)),
                  "logitShift": float((logits(peft_model) - logits(base_model)).abs().max()),
                  "loraTensors": sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n)}))
`;
import { runProcess } from "./fixtures/run.ts";

describe("LoRA (model.lora)", () => {
  it("a LoRA+NanoAdam run saves an adapter that PeftModel.from_pretrained loads and that generates the sidecar's tokens; export --merge too; resume continues it", async () => {
    const runDir = join(dir, "run");
    const lora = { r: 8, alpha: 16, dropout: 0.05, targetModules: ["q_proj", "v_proj", "up_proj", "down_proj"] };
    const config = {
      model: { path: "tiny-llama", device: "cpu", lora },
      data: { path: dataPath, cutoff: 64 },
      optimizer: { name: "nanoadam" as const, density: 0.25 },
      maskPolicy: policies.smallWeights({ density: 0.25, maskInterval: 4 }),
      steps: 8,
      microBatch: 4,
      lr: 1e-2,
      progress: false,
    };
    const events = await collect(new Trainer({ sidecar: sc, ...config, checkpointEvery: 4, runDir }));
    const start = events.find((e) => e.type === "run:start");
    if (start?.type !== "run:start") throw new Error("no run:start");
    // only the adapter trains: A (r x in) and B (out x r) of q, v (64x64, 64x32), up, down (64x176) in 2 layers
    expect(start.model.trainableParameters).toBe(2 * 8 * (64 + 64 + 64 + 32 + 64 + 176 + 176 + 64));
    expect(start.model.lora).toEqual(lora);
    expect(start.optimizer.groups).toEqual([{ sparse: true, tensors: 2 * 4 * 2, entries: start.model.trainableParameters }]);
    expect(start.optimizer.stateBytes).toBe(0); // made at the first step
    const losses = steps(events).map((s) => s.loss);
    expect(losses[7]!).toBeLessThan(losses[0]!);
    expect(steps(events).at(-1)!.stateBytes).toBeGreaterThan(0);

    const ckpt = join(runDir, "checkpoints", "step-000008");
    const modelDir = join(ckpt, "model");
    const files = readdirSync(modelDir);
    expect(files).toEqual(expect.arrayContaining(["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]));
    expect(files.filter((f) => f.startsWith("model") && f.endsWith(".safetensors"))).toEqual([]); // the base is not copied
    const adapterConfig = JSON.parse(readFileSync(join(modelDir, "adapter_config.json"), "utf8"));
    const base: string = adapterConfig.base_model_name_or_path;
    expect(isAbsolute(base) && base.startsWith(join(dir, "cache"))).toBe(true); // the preset's directory in this test's cache
    expect([adapterConfig.peft_type, adapterConfig.r, adapterConfig.lora_alpha, [...adapterConfig.target_modules].sort()]).toEqual([
      "LORA", 8, 16, [...lora.targetModules].sort(),
    ]);

    const sidecar = await sc.call("generate", { prompt: PROMPT, maxNewTokens: 8 });
    const merged = join(dir, "merged");
    const log = vi.spyOn(console, "error").mockImplementation(() => {});
    try {
      expect(await cli(["export", ckpt, "--merge", "--out", merged])).toBe(0);
      expect(await cli(["export", ckpt, "--out", join(dir, "adapter")])).toBe(0); // a copy of the adapter
      expect(readdirSync(join(dir, "adapter")).sort()).toEqual(files.sort());

      // errors: exit 2 and one line naming what is wrong
      const fake = join(dir, "full-checkpoint");
      mkdirSync(join(fake, "model"), { recursive: true });
      writeFileSync(join(fake, "trainer_state.json"), "{}");
      const cases: [string[], RegExp][] = [
        [["export", runDir, "--out", join(dir, "x")], /^export: .*run is not a nanotune checkpoint \(no trainer_state\.json\)/],
        [["export", modelDir, "--out", join(dir, "x")], /^export: .*model is an adapter directory, not a nanotune checkpoint/],
        [["export", fake, "--merge", "--out", join(dir, "x")], /^export: checkpoint .* has no adapter to merge: its model\/ is a full model/],
        [["export", ckpt, "--merge", "--out", merged], /^export: --out .*merged exists and is not an empty directory/],
        [["export", ckpt, "--out", join(dir, "x"), "--base", base], /^export: --base is for --merge/],
        [["export", ckpt, "--merge"], /^export: missing --out DIR/],
      ];
      for (const [args, message] of cases) {
        log.mockClear();
        expect(await cli(args), args.join(" ")).toBe(2);
        expect(String(log.mock.calls[0]?.[0]).replace(/^nanotune: /, "")).toMatch(message);
      }
      // one Python finds (the base does not exist): also exit 2, and nothing written
      expect(await cli(["export", ckpt, "--merge", "--base", join(dir, "nowhere"), "--out", join(dir, "x")])).toBe(2);
      expect(readdirSync(dir)).not.toContain("x");
    } finally {
      log.mockRestore();
    }

    const r = await runProcess(pythonExecutable(), ["-c", GENERATE_PY, base, modelDir, merged, PROMPT], {
      cwd: repoRoot,
      env: { ...process.env, PYTHONPATH: join(repoRoot, "python") },
    });
    expect(r.status, r.stderr).toBe(0);
    const got = JSON.parse(r.stdout.trim().split("\n").at(-1)!);
    expect(got.loraTensors).toBe(2 * 4 * 2);
    expect(got.peft).toBe(sidecar.text);
    expect(got.merged).toBe(sidecar.text);
    // The adapter changed the model: its logits on the prompt moved off the base's. (Its greedy text
    // after 8 small steps may or may not differ from the base's: a knife-edge, so not asserted.)
    expect(got.logitShift).toBeGreaterThan(1e-3);

    // Resuming from the step-4 checkpoint continues with the same losses as the run itself.
    const resumed = steps(await collect(new Trainer({ sidecar: sc, ...config, resumeFrom: join(runDir, "checkpoints", "step-000004") })));
    expect(resumed.map((s) => s.step)).toEqual([4, 5, 6, 7]);
    expect(resumed.map((s) => s.loss)).toEqual(losses.slice(4));
  });

  it("validates model.lora and names a wrong field", () => {
    const base = { data: "d.jsonl", steps: 1, lr: 1e-3 };
    const issues = (lora: unknown) => {
      try {
        parseConfig({ ...base, model: { path: "tiny-llama", lora } });
      } catch (e) {
        if (e instanceof ConfigError) return e.issues;
        throw e;
      }
      return [];
    };
    expect(issues({ rank: 4 })).toEqual([{ path: "model.lora", message: "unknown field 'rank'" }]);
    expect(issues({ r: 0 }).map((i) => i.path)).toEqual(["model.lora.r"]);
    expect(issues({ dropout: 1 }).map((i) => i.path)).toEqual(["model.lora.dropout"]);
    expect(issues({ targetModules: "q_proj" })).toEqual([
      { path: "model.lora.targetModules", message: 'Invalid input: expected "all-linear"; or expected array, received string' },
    ]);
    expect(issues({ targetModules: [] }).map((i) => i.path)).toEqual(["model.lora.targetModules"]);
    expect(issues({})).toEqual([]);
    expect(parseConfig({ ...base, model: { path: "m", lora: { targetModules: "all-linear", alpha: 32 } } }).model).toEqual({
      path: "m",
      lora: { targetModules: "all-linear", alpha: 32 },
    });
  });
});
