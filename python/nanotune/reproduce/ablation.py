"""Reproduction 2: which entries to update, under equal budgets (the paper, Ablations).

The paper (BERT-base on SST-2, k0 = 1%, m = 131): small weights > random >
large weights; small weights converge faster than largest-gradient selection
and tolerate lr 1e-3 where largest-gradient selection diverges.

Here: NanoAdam finetuning the Lab's pretrained model (corpus A) on corpus B
with criterion small_weights / large_weights / random / large_grads, all at the
same density, mask interval, lr, steps and batches; then small_weights and
large_grads again at 3x and 10x that lr (the paper's large_grads diverges at a
higher lr). All of it twice: NanoAdam's sparse groups without Adam's bias
correction (Algorithm 1 literally) and with it, counted per entry from when it
entered the mask (Note [bias correction] in nanotune/optim.py). Scores:
held-out loss on B (learned) and on A (retained), and the l2 distance from the
pretrained weights. The head is tied to the embedding and stays sparse
(nanoadam_param_groups' default); only the norms are dense (bias-corrected
Adam, the optimizer's default, in both settings).
"""
from __future__ import annotations

from pathlib import Path

from nanotune.optim import CRITERIA
from nanotune.reproduce.lab import Lab, fmt, pyplot, experiment_main, write_report

# Every lr here is in continual.NANOADAM_LRS, so the small_weights runs are the continual sweep's.
LR = 1e-3
HIGH_LRS = (3e-3, 1e-2)  # 3x and 10x: where the paper's large_grads diverges (at 5-10x its lr)
HIGH_CRITERIA = ("small_weights", "large_grads")
BIAS_CORRECTION = (False, True)  # NanoAdam's sparse groups: Algorithm 1 literally, then per-entry correction


def run(lab: Lab, lr: float = LR, high_lrs: tuple[float, ...] = HIGH_LRS,
        bias_corrections: tuple[bool, ...] = BIAS_CORRECTION) -> dict:
    lab.prepare()
    lab.log(f"ablation: NanoAdam density {lab.cfg.density:g}, mask every {lab.cfg.mask_interval} steps, "
            f"lr {lr:g} (and {', '.join(f'{h:g}' for h in high_lrs)} for {', '.join(HIGH_CRITERIA)}), "
            f"bias correction {bias_corrections}")
    runs = []
    for bc in bias_corrections:
        runs += [lab.finetune("nanoadam", lr, c, bc) for c in CRITERIA]
        runs += [lab.finetune("nanoadam", h, c, bc) for h in high_lrs for c in HIGH_CRITERIA]
    return {"experiment": "ablation", "lr": lr, "high_lrs": list(high_lrs), "bias_correction": list(bias_corrections),
            "density": lab.cfg.density, "mask_interval": lab.cfg.mask_interval, "steps": lab.cfg.finetune_steps,
            "pretrained": lab.info["pretrain"], "runs": [vars(r) | {"label": r.label} for r in runs],
            "lab": lab.info, "config": lab.config()}


def _bc(on) -> str:
    return "on" if on else "off"


def _at(r: dict, step: int) -> float:
    """Held-out B loss at the curve point nearest `step`, NaN when the run stopped before it."""
    if r["diverged_at"] is not None and r["diverged_at"] < step:
        return float("nan")
    i = min(range(len(r["steps"])), key=lambda j: abs(r["steps"][j] - step))
    return r["b_loss"][i]


def markdown(result: dict) -> str:
    early = result["steps"] // 3
    pre = result["pretrained"]
    lines = [
        "# 2. Ablation: which entries NanoAdam updates, equal budgets",
        "",
        f"Finetuning the model pretrained on corpus A (Moby-Dick) on corpus B (SpamAssassin bodies), "
        f"{result['steps']} steps, density {result['density']:.0%} of every sparse tensor, mask refreshed every "
        f"{result['mask_interval']} steps, same batches for every run. Held-out loss (nats/token; lower is better). "
        f"Before finetuning: B {pre['b_heldout_loss']:.3f}, A {pre['a_heldout_loss']:.3f}. "
        "Bias correction: Adam's, in NanoAdam's sparse groups, per entry from when it entered the mask "
        "(off = Algorithm 1 literally); the dense norms are bias-corrected in both.",
        "",
        f"| criterion | bias correction | lr | B loss at step ~{early} | B learned (final) | A retained (final) "
        "| l2 from pretrained |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        f = r["final"]
        note = f" (diverged at step {r['diverged_at']})" if r["diverged_at"] is not None else ""
        lines.append(f"| {r['criterion']}{note} | {_bc(r['bias_correction'])} | {r['lr']:g} | {fmt(_at(r, early))} | "
                     f"{fmt(f['b_loss'])} | {fmt(f['a_loss'])} | {f['l2_all']:.2f} |")
    lines.append("")
    for bc in result["bias_correction"]:
        base = {r["criterion"]: r["final"]["b_loss"] for r in result["runs"]
                if r["lr"] == result["lr"] and r["bias_correction"] == bc}
        order = sorted(base, key=lambda c: (base[c] != base[c], base[c]))  # NaN (diverged) last
        lines.append(f"Order at lr {result['lr']:g}, bias correction {_bc(bc)}, by B learned (best first): "
                     + " > ".join(order) + ".")
    lines += ["", "Paper (BERT-base SST-2, k0 = 1%): small_weights > random > large_weights; small_weights "
              "converges faster than large_grads and tolerates lr 1e-3 where large_grads diverges."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    colours = {"small_weights": "tab:blue", "large_weights": "tab:orange", "random": "tab:green",
               "large_grads": "tab:red"}
    lrs = [result["lr"]] + list(result["high_lrs"])
    fig, axes = plt.subplots(len(lrs), 2, figsize=(10, 3.6 * len(lrs)), squeeze=False)
    for i, lr in enumerate(lrs):
        for j, (key, name) in enumerate((("b_loss", "B learned (held-out B)"), ("a_loss", "A retained (held-out A)"))):
            ax = axes[i][j]
            for r in result["runs"]:
                if r["lr"] == lr:
                    gone = f" (diverged at step {r['diverged_at']})" if r["diverged_at"] is not None else ""
                    ax.plot(r["steps"], r[key], color=colours[r["criterion"]], lw=1.3,
                            ls="--" if r["bias_correction"] else "-",
                            label=f"{r['criterion']}, bias corr. {_bc(r['bias_correction'])}{gone}")
            ax.set(xlabel="finetuning step", ylabel="loss (nats/token)", title=f"{name}, lr {lr:g}")
            ax.legend(fontsize=6)
    fig.suptitle("NanoAdam per criterion; solid: bias correction off (Algorithm 1), dashed: on (per entry)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write(result: dict, out: Path) -> None:
    write_report(out, "ablation", result, markdown(result), lambda path: plot(result, path),
                 "held-out loss curves per criterion")


def main(argv=None, lab: Lab | None = None) -> int:
    return experiment_main("ablation", __doc__, run, write, argv, lab)


if __name__ == "__main__":
    raise SystemExit(main())
