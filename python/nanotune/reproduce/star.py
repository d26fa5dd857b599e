"""Reproduction 1: the star-shaped |w| vs |grad| scatter (the paper, Observation).

The paper: during finetuning, large gradients sit on small-magnitude weights,
more strongly than in training from scratch. We finetune the Lab's pretrained
model (corpus A) on corpus B, and train the same architecture from its random
init on B, both with AdamW at the same lr and on the same batches, and at a few
steps take the gradient of that step's batch (the mean token loss; before the
update) beside the weights.

Measure: per weight matrix, the overlap of the bottom-10% |w| entries with the
top-10% |grad| entries, |S_w ∩ S_g| / |S_g|. Independent magnitudes give 10%
(chance); the paper's claim predicts well above 10% when finetuning, and more
than from scratch. The plot shows a random subsample of (|w|, |grad|) per
matrix, signed and on linear axes (the "star": a spike along grad at w = 0
and one along w at grad = 0; log axes of magnitudes would hide it), with the
top-10% |grad| entries in red.
"""
from __future__ import annotations

from pathlib import Path

import torch

from nanotune.reproduce.lab import Lab, pyplot, experiment_main, write_report

FRACTION = 0.10  # bottom-10% weights vs top-10% gradients
POINTS = 4000  # scatter points per panel


def membership(x: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Per entry of the flat `x`, the chance it is among the k largest (or smallest) when
    ties at the k-th value are broken uniformly at random: 1 strictly inside, (k - inside)
    / (size of the tie group) in the k-th value's tie group, else 0 (float32)."""
    n = x.numel()
    kth = x.kthvalue(n - k + 1 if largest else k).values
    inside = x > kth if largest else x < kth
    tie = x == kth
    p = inside.to(torch.float32)
    p[tie] = (k - int(inside.sum())) / int(tie.sum())
    return p


def overlap(w: torch.Tensor, g: torch.Tensor, fraction: float = FRACTION) -> float:
    """|bottom-k |w| ∩ top-k |g|| / k with k = round(fraction * numel); with ties at either
    threshold (quantized weights have many: real_ties.md), the expectation over uniformly
    random tie breaks, so no position order enters (without ties: the plain count)."""
    w, g = w.detach().reshape(-1).abs().float(), g.detach().reshape(-1).abs().float()
    k = max(1, round(fraction * w.numel()))
    return float((membership(w, k, largest=False) * membership(g, k, largest=True)).double().sum()) / k


def tracked(model) -> list[str]:
    """Every 2-D weight of the transformer blocks, then the tied embedding."""
    names = [n for n, p in model.named_parameters() if n.startswith("model.layers.") and p.dim() == 2]
    return names + ["model.embed_tokens.weight"]


def plotted(num_layers: int) -> list[str]:
    """Three matrices from the first, a middle and the last block."""
    return ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{num_layers // 2}.mlp.up_proj.weight",
            f"model.layers.{num_layers - 1}.self_attn.o_proj.weight"]


def measure(params: dict, names: list[str], shown: list[str], step: int, out: dict) -> None:
    """Into `out` ({"overlap": {}, "points": {}}) at `step`: the overlap of every tensor in `names`
    from its .grad, and a signed scatter sample of the `shown` ones."""
    out["overlap"][step] = {n: overlap(params[n], params[n].grad) for n in names}
    gen = torch.Generator().manual_seed(step)
    out["points"][step] = {}
    for n in shown:
        w, g = params[n].detach().reshape(-1), params[n].grad.reshape(-1)  # signed: the star needs them
        pick = torch.randperm(w.numel(), generator=gen)[:POINTS]
        top = g.abs() >= g.abs().topk(max(1, round(FRACTION * g.numel()))).values[-1]
        out["points"][step][n] = {"w": w[pick].tolist(), "g": g[pick].tolist(), "top": top[pick].tolist()}


def summarize(overlaps: dict, steps: tuple[int, ...]) -> tuple[dict, int]:
    """{kind: {str(step): {mean_blocks, above_chance, <tensor>: overlap}}} from capture's overlaps
    per kind, and the number of block matrices."""
    names = list(next(iter(overlaps.values()))[steps[0]])
    blocks = [n for n in names if n.startswith("model.layers.")]
    summary = {}
    for kind, ov in overlaps.items():
        summary[kind] = {str(s): {"mean_blocks": sum(ov[s][n] for n in blocks) / len(blocks),
                                  "above_chance": sum(ov[s][n] > FRACTION for n in blocks),
                                  **{n: ov[s][n] for n in names}} for s in steps}
    return summary, len(blocks)


def capture(lab: Lab, pretrained: bool, lr: float, steps: tuple[int, ...]) -> dict:
    """Train on B from the pretrained weights (or the init); at each step in `steps`
    record the overlap of every tracked tensor and a scatter sample (signed) of the plotted ones."""
    model = lab.new_model(pretrained=pretrained)
    opt = lab.optimizer(model, "adamw", None, lr)
    names = tracked(model)
    params = dict(model.named_parameters())
    shown = plotted(lab.cfg.num_layers)
    out: dict = {"overlap": {}, "points": {}}

    def before_step(step, model, batch):
        if step not in steps:
            return
        model.zero_grad(set_to_none=True)
        model(**batch, use_cache=False).loss.backward()  # the mean token loss of this step's batch
        measure(params, names, shown, step, out)
        model.zero_grad(set_to_none=True)

    lab.train_on_b(model, opt, lr, max(steps) + 1, before_step=before_step)
    return out


def run(lab: Lab, steps: tuple[int, ...] | None = None, lr: float = 3e-4) -> dict:
    lab.prepare()
    if steps is None:
        last = min(100, lab.cfg.finetune_steps - 1)
        steps = (0, max(1, last // 5), last)
    steps = tuple(sorted(set(steps)))
    lab.log(f"star: AdamW lr {lr:g}, gradients at steps {steps}")
    res = {"finetune": capture(lab, True, lr, steps), "scratch": capture(lab, False, lr, steps)}
    summary, blocks = summarize({k: res[k]["overlap"] for k in res}, steps)
    return {"experiment": "star", "lr": lr, "steps": list(steps), "fraction": FRACTION, "blocks": blocks,
            "plotted": plotted(lab.cfg.num_layers), "overlap": summary,
            "points": {k: {str(s): v for s, v in res[k]["points"].items()} for k in res},
            "lab": lab.info, "config": lab.config()}


def _short(name: str) -> str:
    return name.removeprefix("model.").removesuffix(".weight").replace("self_attn.", "").replace("mlp.", "")


def table(result: dict) -> list[str]:
    """The overlap table: per step of each kind, the block mean, the plotted matrices, the embedding."""
    steps = result["steps"]
    ov = result["overlap"]
    head = " | ".join([f"finetune step {s}" for s in steps] + [f"scratch step {s}" for s in steps])
    lines = [f"| tensor | {head} |", "|---|" + "---|" * (2 * len(steps))]
    rows = [("mean of the %d block matrices" % result["blocks"], "mean_blocks")]
    rows += [(f"`{_short(n)}`", n) for n in result["plotted"]] + [("`embed_tokens` (tied head)",
                                                                   "model.embed_tokens.weight")]
    for label, key in rows:
        cells = [f"{ov[k][str(s)][key]:.1%}" for k in ("finetune", "scratch") for s in steps]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"{ov[k][str(s)]['above_chance']}/{result['blocks']}" for k in ("finetune", "scratch") for s in steps]
    lines.append("| block matrices above chance | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    lines = [
        "# 1. |weight| vs |gradient|: finetuning vs from scratch",
        "",
        f"Overlap of the bottom-{result['fraction']:.0%} |w| entries with the top-{result['fraction']:.0%} |grad| "
        f"entries of each weight matrix (chance = {result['fraction']:.0%}). Gradient of one batch of corpus B "
        f"(SpamAssassin bodies), taken before the update at each step, while training with AdamW at lr "
        f"{result['lr']:g} from the model pretrained on corpus A (Moby-Dick) and from its random init.",
        "",
        *table(result),
        "",
        "Paper (the paper, Observation): a star shape, large gradients on small weights, stronger in "
        "finetuning than from scratch (no overlap figure given).",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    step = str(result["steps"][len(result["steps"]) // 2])
    names = result["plotted"]
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7.4), squeeze=False)
    for row, kind in enumerate(("finetune", "scratch")):
        for col, n in enumerate(names):
            ax = axes[row][col]
            pts = result["points"][kind][step][n]
            w, g, top = torch.tensor(pts["w"]), torch.tensor(pts["g"]), torch.tensor(pts["top"])
            for sel, colour, label in ((~top, "tab:blue", "other"), (top, "tab:red", "top-10% |grad|")):
                ax.scatter(w[sel], g[sel], s=2, alpha=0.35, color=colour, label=label, rasterized=True)
            edge = float(torch.quantile(w.abs(), result["fraction"]))
            for x in (-edge, edge):
                ax.axvline(x, color="k", lw=0.8, ls="--")
            ax.set(xlabel="w", ylabel="grad",
                   title=f"{kind}, step {step}: {_short(n)}\noverlap {result['overlap'][kind][step][n]:.0%} "
                         f"(chance 10%)")
            ax.title.set_fontsize(9)
        axes[row][0].legend(fontsize=7, markerscale=4)
    fig.suptitle("w vs grad, a random sample of entries (dashed: |w| = its 10th percentile; red: top-10% |grad|)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write(result: dict, out: Path) -> None:
    write_report(out, "star", {k: v for k, v in result.items() if k != "points"}, markdown(result), lambda path: plot(result, path),
                 "|w| vs |grad| scatter, finetuning (top) vs from scratch (bottom)")


def main(argv=None, lab: Lab | None = None) -> int:
    return experiment_main("star", __doc__, run, write, argv, lab)


if __name__ == "__main__":
    raise SystemExit(main())
