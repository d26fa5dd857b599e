"""Reproduction 1 on a real model: |w| vs |grad| for SmolLM2-135M (`--real`).

As star.py (the measure, the tensors, the scatter), on SmolLM2-135M-Instruct:
finetuning gradients of the instruction set (smollm2.py's B, assistant-token
loss) for the pretrained model and for the same architecture at a seeded
random init, both trained with AdamW at STAR_LR (the paper's AdamW lr for its
Llama runs) on the same batches; at `steps` the gradient of that step's batch
(the mean assistant-token loss, before the update, read inside train_step) is
set beside the weights. The pretrained run is the continual sweep's AdamW run
at STAR_LR (computed once). The overlap counts ties at either 10% threshold
as uniformly random tie breaks (star.overlap): the quantized weights have many
(real_ties.md), and topk's own tie order would otherwise decide part of the set.
"""
from __future__ import annotations

from pathlib import Path

from nanotune.reproduce import star
from nanotune.reproduce.lab import write_report
from nanotune.reproduce.smollm2 import SmolLab

STAR_LR = 1e-5


def run(lab: SmolLab, steps: tuple[int, ...] | None = None, lr: float = STAR_LR) -> dict:
    lab.prepare()
    n = lab.cfg.steps
    steps = tuple(sorted(set(steps or (0, n // 4, n - 1))))
    lab.log(f"real star: AdamW lr {lr:g}, gradients at steps {steps}")
    layers = len(lab.model.model.layers)
    res = {}
    for kind in ("finetune", "scratch"):
        out: dict = {"overlap": {}, "points": {}}

        def observe(step, model, out=out):
            if step in steps:
                params = dict(model.named_parameters())
                star.measure(params, star.tracked(model), star.plotted(layers), step, out)

        if kind == "finetune":
            lab.runs.pop(("adamw", float(lr)), None)  # recomputed with the capture if the sweep ran first
            lab.finetune("adamw", lr, observe=observe)
        else:
            model = lab.new_scratch()
            lab.train(model, lab.optimizer(model, "adamw", lr), lr, max(steps) + 1,
                      observe=lambda step, model=model: observe(step, model))
            del model
        res[kind] = out
    summary, blocks = star.summarize({k: res[k]["overlap"] for k in res}, steps)
    return {"experiment": "real_star", "lr": lr, "steps": list(steps), "fraction": star.FRACTION, "blocks": blocks,
            "plotted": star.plotted(layers), "overlap": summary,
            "points": {k: {str(s): v for s, v in res[k]["points"].items()} for k in res},
            "lab": lab.info, "config": lab.config()}


def markdown(result: dict) -> str:
    info = result["lab"]
    lines = [
        "# 1 on SmolLM2-135M: |weight| vs |gradient|, finetuning vs from scratch",
        "",
        f"SmolLM2-135M-Instruct (the `smollm2-135m` preset: {info['model']['parameters']:,} parameters, "
        f"{info['model']['blocks']} blocks, Q4_1 weights dequantized to fp32) and the same architecture at a seeded "
        f"random init. Gradient of one batch of the instruction set (4 chat-formatted pairs, loss on the assistant "
        f"tokens), taken before the update at each step while training with AdamW at lr {result['lr']:g}. Overlap "
        f"of the bottom-{result['fraction']:.0%} |w| entries with the top-{result['fraction']:.0%} |grad| entries of "
        f"each weight matrix (chance = {result['fraction']:.0%}); ties at either threshold count as random tie "
        "breaks (their expected share), since the quantized weights have many (real_ties.md).",
        "",
        *star.table(result),
        "",
        "Paper (Observation): a star shape, large gradients on small weights, stronger in finetuning than "
        "from scratch (no overlap figure given). Ours on the tiny model: [star.md](star.md).",
    ]
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> None:
    write_report(out, "real_star", {k: v for k, v in result.items() if k != "points"}, markdown(result),
                 lambda path: star.plot(result, path),
                 "SmolLM2-135M: w vs grad, finetuning (top) vs from scratch (bottom)")
