// Templates and generation (issue 14): TS renders the templates exactly like the
// sidecar's nanotune.templates.render, and trainer.generate with the training
// template reproduces transformers' greedy output for the saved model, token for
// token; stop strings and streaming (Note [generating from a run]).
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ALPACA_PROMPT, NanotuneError, renderTemplate, renderedBySidecar, Sidecar, templates, Trainer, type TrainerEvent } from "../../ts/index.ts";
// @ts-expect-error plain ESM helper without types
import { pythonExecutable, repoRoot } from "../../ts/dev/python.mjs";
import { runProcess } from "./fixtures/run.ts";
import { collect, startTinyRun, stopTinyRun } from "./fixtures/tiny-run.ts";

/** Runs a Python snippet with python/ importable; JSON in on stdin, JSON out on stdout. */
async function python(code: string, input: unknown, env: Record<string, string> = {}): Promise<unknown> {
  const r = await runProcess(pythonExecutable(), ["-c", code], {
    cwd: repoRoot,
    input: JSON.stringify(input),
    env: { ...process.env, ...env, PYTHONPATH: join(repoRoot, "python") },
  });
  if (r.status !== 0) throw new Error(`python failed (${r.status}): ${r.stderr}`);
  return JSON.parse(r.stdout);
}

describe("templates", () => {
  // [template, instruction, input]: the named ones, custom strings, Python's whitespace
  // rules for alpaca's "no input" (U+FEFF is not whitespace there, U+001C is), and
  // strings that are not templates (each side's error, compared by whether it failed).
  const cases: [string, string, string][] = [
    ["alpaca", "Name a fruit.", ""],
    ["alpaca", "Add the numbers.", "12 and 30"],
    ["alpaca", "Say {hi}.", "  \n"],
    ["alpaca", "x", "\x1c\x85\u3000"],
    ["alpaca", "x", "\ufeff"],
    ["raw", "The cat", ""],
    ["raw", "The cat", "sat"],
    ["raw", "The cat", " "],
    ["Q: {instruction}\nA:", "Name a fruit.", ""],
    ["{input} => {instruction} {{literal}} {instruction}", "é ü 😀", "in"],
    ["Q: {instruction}}}", "x", ""],
    ["{{instruction}}", "x", ""],
    ["alpacca", "x", ""],
    ["Q: {instruction} }", "x", ""],
    ["Q: {instruction} {", "x", ""],
    ["Q: {instruction} {input", "x", ""],
    ["Q: {instruction} {output}", "x", ""],
    ["Q: {instruction} {}", "x", ""],
    ["", "x", ""],
  ];

  it("render like the sidecar's nanotune.templates.render, character for character", async () => {
    const py = await python(
      "import json, sys\nfrom nanotune.templates import render\nout = []\n" +
        "for t, i, x in json.load(sys.stdin):\n" +
        "    try: out.append(render(t, i, x))\n" +
        "    except Exception as e: out.append({'error': type(e).__name__, 'field': getattr(e, 'data', {}).get('field')})\n" +
        "print(json.dumps(out))",
      cases,
    ) as (string | { error: string; field: string })[];
    const ts = cases.map(([t, instruction, input]) => {
      try {
        return renderTemplate(t, { instruction, input });
      } catch (e) {
        expect(e).toBeInstanceOf(NanotuneError);
        return { error: "TemplateError", field: (e as NanotuneError).data && ((e as NanotuneError).data as { field: string }).field };
      }
    });
    expect(ts).toEqual(py);
    expect(py.filter((x) => typeof x !== "string")).toHaveLength(7); // the error cases are errors on both sides
    expect(renderTemplate("alpaca", { instruction: "A", input: "B" })).toBe(ALPACA_PROMPT.replace("{instruction}", "A").replace("{input}", "B"));
  });

  it("chat is rendered by the sidecar (it needs the tokenizer)", () => {
    expect(templates.names).toEqual(["alpaca", "chat", "raw"]);
    expect(renderedBySidecar("chat")).toBe(true);
    expect(renderedBySidecar("alpaca")).toBe(false);
    expect(() => renderTemplate("chat", { instruction: "hi" })).toThrow(/rendered by the sidecar/);
    expect(templates.check("Q: {instruction}")).toBe("Q: {instruction}");
    // Note [format strings]: bare fields only (Python's str.format would also take "!r" and ":>9").
    expect(() => templates.check("Q: {instruction} {input!r}")).toThrow(/only \{instruction\} and \{input\}/);
  });
});

describe("trainer.generate", () => {
  let dir: string;
  let sc: Sidecar;
  let trainer: Trainer;
  let events: TrainerEvent[];
  const data = join(repoRoot, "examples", "finetune", "data.jsonl");
  const instruction = "Add 24 and 26."; // a row of the training file

  beforeAll(async () => {
    ({ dir, sc } = await startTinyRun("nanotune-generate-"));
    trainer = new Trainer({
      sidecar: sc,
      model: { path: "tiny-llama", device: "cpu" },
      data: { path: data, cutoff: 128 },
      optimizer: { name: "nanoadam", density: 0.2 },
      steps: 40,
      microBatch: 8,
      lr: 1e-2,
      runDir: join(dir, "run"),
      progress: false,
    });
    await expect(trainer.generate("x")).rejects.toThrow(/no model yet/);
    events = await collect(trainer);
  });
  afterAll(() => stopTinyRun({ dir, sc }));

  it("with the training template reproduces transformers' greedy output for the saved model, token for token", async () => {
    expect(trainer.template).toBe("alpaca"); // instruction rows, rendered with alpaca
    // [instruction, input, template, temperature]: the training prompts (the default
    // template, no input: like every row of the file), other templates, and seeded
    // sampling (greedy answers are short: a number and eos).
    const custom = "Q: {instruction} ({input})\nA:";
    const cases: [string, string, string | undefined, number][] = [
      [instruction, "", undefined, 0],
      ["Add 7 and 5.", "", undefined, 0],
      ["Add the numbers.", "24 and 26", "alpaca", 0],
      ["The", "", "raw", 0],
      ["Add 2 and 2.", "x", custom, 0],
      [instruction, "", undefined, 3],
      ["The", "", "raw", 3],
    ];
    const ours = [];
    for (const [instr, input, template, temperature] of cases) ours.push(await trainer.generate(instr, { input, template, temperature, seed: 7, maxNewTokens: 16 }));
    const saved = events.filter((e) => e.type === "checkpoint:saved").at(-1);
    expect(saved?.type).toBe("checkpoint:saved");
    const model = join(saved!.type === "checkpoint:saved" ? saved!.path : "", "model");
    // transformers on its own: from_pretrained, the tokenizer's usual encoding (bos in
    // front), model.generate greedy (or sampling from the same seed); the prompt from
    // the sidecar's templates module.
    const theirs = await python(
      "import json, sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n" +
        "from nanotune.templates import render\n" +
        "path, cases = json.load(sys.stdin)\n" +
        "model = AutoModelForCausalLM.from_pretrained(path); tok = AutoTokenizer.from_pretrained(path)\n" +
        "out = []\n" +
        "for instruction, input, template, temperature in cases:\n" +
        "    prompt = render(template or 'alpaca', instruction, input)\n" +
        "    ids = tok(prompt, return_tensors='pt').input_ids\n" +
        "    torch.manual_seed(7)\n" +
        "    how = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) if temperature else dict(do_sample=False)\n" +
        "    new = model.generate(ids, max_new_tokens=16, **how)[0, ids.shape[1]:].tolist()\n" +
        "    out.append({'prompt': prompt, 'ids': new, 'text': tok.decode(new, skip_special_tokens=True),\n" +
        "                'eos': new[-1] == tok.eos_token_id})\n" +
        "print(json.dumps(out))",
      [model, cases],
    ) as { prompt: string; ids: number[]; text: string; eos: boolean }[];
    expect(ours.map((r) => r.prompt)).toEqual(theirs.map((r) => r.prompt));
    expect(ours.map((r) => r.text)).toEqual(theirs.map((r) => r.text));
    expect(ours.map((r) => r.tokens)).toEqual(theirs.map((r) => r.ids.length));
    expect(ours.map((r) => r.finishReason)).toEqual(theirs.map((r) => (r.eos ? "eos" : "length")));
    expect(theirs.reduce((n, r) => n + r.ids.length, 0)).toBeGreaterThan(30); // enough tokens compared
    expect(ours[0]!.prompt).toBe(renderTemplate("alpaca", { instruction })); // TS renders it alike
    expect(ours[0]!.text.trim()).not.toBe(""); // the symptom: an empty answer without the template
    // The raw prompt built by hand gets the same answer.
    expect((await trainer.generate(ours[0]!.prompt, { maxNewTokens: 16, template: "raw" })).text).toBe(ours[0]!.text);
  });

  it("stop strings cut the text and end generation early", async () => {
    const opts = { maxNewTokens: 32, temperature: 3, seed: 5, template: "raw" as const };
    const full = await trainer.generate("The", opts);
    expect(full.text.length).toBeGreaterThan(12);
    const stop = full.text.slice(8, 10);
    const cut = await trainer.generate("The", { ...opts, stop: [stop, "never there"] });
    expect(cut.finishReason).toBe("stop");
    expect(cut.text).toBe(full.text.slice(0, full.text.indexOf(stop)));
    expect(cut.tokens).toBeLessThan(full.tokens);
  });

  it("streams pieces through onToken that concatenate to the text, stop strings included", async () => {
    const opts = { maxNewTokens: 32, temperature: 3, seed: 5, template: "raw" as const };
    const pieces: [string, number][] = [];
    const r = await trainer.generate("The", { ...opts, onToken: (text, index) => void pieces.push([text, index]) });
    expect(pieces.length).toBeGreaterThanOrEqual(2);
    expect(pieces.map(([, i]) => i)).toEqual(pieces.map((_, i) => i));
    expect(pieces.map(([t]) => t).join("")).toBe(r.text);
    expect(await trainer.generate("The", opts)).toEqual(r); // streaming changes nothing else

    const stop = r.text.slice(6, 9);
    const streamed: string[] = [];
    const cut = await trainer.generate("The", { ...opts, stop: [stop], onToken: (t) => void streamed.push(t) });
    expect(cut.finishReason).toBe("stop");
    expect(streamed.join("")).toBe(cut.text);
    expect(cut.text).toBe(r.text.slice(0, r.text.indexOf(stop)));

    // The answer to the training prompt streams too; an onToken that throws fails the call.
    const answer: string[] = [];
    const greedy = await trainer.generate(instruction, { maxNewTokens: 16, onToken: (t) => void answer.push(t) });
    expect(answer.join("")).toBe(greedy.text);
    await expect(trainer.generate("The", { ...opts, onToken: () => { throw new Error("sink full"); } })).rejects.toThrow("sink full");
  });

  it("chat messages go through the tokenizer's chat template; a wrong template is the sidecar's INVALID_PARAMS", async () => {
    const r = await trainer.generate([{ role: "user", content: instruction }], { maxNewTokens: 4 });
    expect(r.prompt).toContain(`<|user|>\n${instruction}`);
    expect((await trainer.generate(instruction, { template: "chat", maxNewTokens: 4 })).prompt).toBe(r.prompt);
    const err = await trainer.generate(instruction, { template: "alpacca" }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NanotuneError);
    expect((err as NanotuneError).code).toBe("INVALID_PARAMS");
    expect((err as NanotuneError).data).toMatchObject({ field: "template" });
  });

  it("streams only its own call's events (generate:token carries the request id)", async () => {
    // A plain sidecar call with stream: the events name its id; trainer.generate ignores them.
    const seen: number[] = [];
    const it = sc.events();
    const pump = (async () => {
      for await (const ev of it) if (ev.event === "generate:token") seen.push(ev.data.id);
    })();
    let id = -1;
    const direct = await sc.call("generate", { prompt: "The", maxNewTokens: 8, temperature: 3, seed: 1, stream: true }, { onRequestId: (i) => (id = i) });
    await it.return?.();
    await pump;
    expect(seen.length).toBeGreaterThan(0);
    expect(new Set(seen)).toEqual(new Set([id]));
    expect(direct.prompt).toBe("The"); // raw: the prompt as it is (the old behaviour)
  });
});
