"""Tie density of SmolLM2-135M's quantized weights under NanoAdam's selection (`--real`, part 3).

The preset's weights come from a Q4_1 GGUF (nanotune.models, Note [gguf]): each
32 consecutive weights of a row share a scale d and a minimum m, w = d*q + m
with q in 0..15, so a block holds at most 16 distinct values and blocks with
the same fp16 (d, m) repeat them. Bottom-k selection by |w| then meets ties.

NanoAdam's rule (`nanotune.optim.select_mask`, and the CPU kernel, which gives
the same indices): each tensor is flattened and cut into chunks of CHUNK_SIZE
= 2**15 entries (the tail is one shorter chunk); each chunk takes its
k = round(density * length) smallest |w| by the exact key (|w| float32 bits
<< 32 | offset), so among equal |w| the lower offset in the chunk wins.

Per chunk, with t = the k-th smallest |w| (the threshold):
- below: entries with |w| < t (all selected);
- tie group: entries with |w| == t; `from_tie` = k - below of them are
  selected, the ones with the lowest offsets;
- decided by the tie rule: `from_tie` when the tie group is larger than
  `from_tie` (some equal entries are left out, so position chose), else 0.
below + from_tie = k in every chunk, and the selected entries are exactly the
below ones plus the first `from_tie` of the tie group (tests check both
against select_mask).
"""
from __future__ import annotations

import math

import torch

from nanotune.optim import CHUNK_SIZE, _chunk_count

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens")
QBLOCK = 32  # Q4_1 and Q8_0 block length
# GGUF tensor names (blk.N.<name>.weight, token_embd.weight) -> KINDS
GGUF_KINDS = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
              "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj", "token_embd": "embed_tokens"}


def gguf_types(path) -> dict[str, str]:
    """{kind: quantization type(s) in the GGUF file}, from its header (gguf's GGUFReader, memory-mapped)."""
    from gguf import GGUFReader

    found: dict[str, set] = {}
    for t in GGUFReader(str(path)).tensors:
        parts = t.name.split(".")
        kd = GGUF_KINDS.get(parts[-2] if t.name.startswith("blk.") else parts[0])
        if kd is not None:
            found.setdefault(kd, set()).add(t.tensor_type.name)
    return {k: "/".join(sorted(v)) for k, v in found.items()}


def kind(name: str) -> str | None:
    """The weight kind of a parameter name (one of KINDS), None for the norms."""
    return next((k for k in KINDS if f".{k}." in name or name.startswith(f"model.{k}.")), None)


@torch.no_grad()
def chunk_ties(w: torch.Tensor, density: float, chunk_size: int = CHUNK_SIZE) -> dict[str, torch.Tensor]:
    """Per chunk of select_mask's layout (int64 tensors, one entry per chunk): length, k,
    below, tie (the size of the threshold's tie group), from_tie, decided, and
    tie_offset_sum (the sum of the selected tie entries' offsets in their chunk)."""
    flat = w.detach().reshape(-1).abs().to(torch.float32)
    cols = {c: [] for c in ("length", "k", "below", "tie", "from_tie", "decided", "tie_offset_sum")}
    for start, length, k in _chunk_count(flat.numel(), density, chunk_size):
        width = min(length, chunk_size)
        rows = length // width
        block = flat[start:start + length].view(rows, width)
        t = block.kthvalue(k, dim=1).values[:, None]
        below = (block < t).sum(1)
        tie_mask = block == t
        tie = tie_mask.sum(1)
        from_tie = k - below
        chosen = tie_mask & (tie_mask.cumsum(1) <= from_tie[:, None])  # lowest offsets first
        offsets = torch.arange(width, dtype=torch.int64)
        cols["length"].append(torch.full((rows,), width, dtype=torch.int64))
        cols["k"].append(torch.full((rows,), k, dtype=torch.int64))
        cols["below"].append(below)
        cols["tie"].append(tie)
        cols["from_tie"].append(from_tie)
        cols["decided"].append(torch.where(tie > from_tie, from_tie, torch.zeros_like(from_tie)))
        cols["tie_offset_sum"].append((chosen * offsets).sum(1))
    return {c: torch.cat(v) for c, v in cols.items()}


@torch.no_grad()
def tensor_ties(w: torch.Tensor, density: float, chunk_size: int = CHUNK_SIZE) -> dict:
    """One tensor's figures: distinct |w|, the largest number of distinct values in a QBLOCK run
    of a row, and the per-chunk tie counts summed (plus the chunk count and the largest tie group)."""
    a = w.detach().abs().to(torch.float32)
    c = chunk_ties(w, density, chunk_size)
    out = {"numel": a.numel(), "distinct_abs": int(torch.unique(a).numel()), "chunks": int(c["k"].numel())}
    if a.dim() == 2 and a.shape[1] % QBLOCK == 0:  # signed values per 32-entry block of a row
        blocks = w.detach().to(torch.float32).reshape(-1, QBLOCK).sort(dim=1).values
        out["max_distinct_per_block"] = int((1 + (blocks.diff(dim=1) != 0).sum(1)).max())
    for col in ("k", "below", "tie", "from_tie", "decided"):
        out[col] = int(c[col].sum())
    out["max_tie_group"] = int(c["tie"].max())
    out["chunks_with_decided"] = int((c["decided"] > 0).sum())
    # Where the tie rule's picks sit: mean offset / chunk length (0.5 = no position preference).
    chosen = int(c["from_tie"][c["decided"] > 0].sum())
    out["tie_pick_mean_position"] = (float((c["tie_offset_sum"][c["decided"] > 0].double()
                                           / c["length"][c["decided"] > 0].double()).sum()) / chosen
                                     if chosen else math.nan)
    return out


def run(model, density: float, log=print, quant: dict[str, str] | None = None) -> dict:
    """Every sparse weight (blocks' projections and the tied embedding) of `model`, then totals per kind;
    quant: {kind: GGUF quantization type} (gguf_types) for the table."""
    per_tensor = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and kind(name) is not None:
            per_tensor[name] = tensor_ties(p, density)
    per_kind = {}
    for kd in KINDS:
        rows = [v for n, v in per_tensor.items() if kind(n) == kd]
        if not rows:
            continue
        agg = {"tensors": len(rows), "numel": sum(r["numel"] for r in rows)}
        ds = [r["distinct_abs"] for r in rows]
        agg.update({"distinct_abs_min": min(ds), "distinct_abs_median": sorted(ds)[len(ds) // 2],
                    "distinct_abs_max": max(ds)})
        if all("max_distinct_per_block" in r for r in rows):
            agg["max_distinct_per_block"] = max(r["max_distinct_per_block"] for r in rows)
        for col in ("chunks", "k", "below", "tie", "from_tie", "decided", "chunks_with_decided"):
            agg[col] = sum(r[col] for r in rows)
        agg["max_tie_group"] = max(r["max_tie_group"] for r in rows)
        picks = [(r["tie_pick_mean_position"], r["from_tie"]) for r in rows
                 if not math.isnan(r["tie_pick_mean_position"])]
        agg["tie_pick_mean_position"] = (sum(p * n for p, n in picks) / sum(n for _, n in picks)
                                         if picks else math.nan)
        agg["quant"] = (quant or {}).get(kd, "-")
        per_kind[kd] = agg
    total = {col: sum(v[col] for v in per_kind.values()) for col in ("numel", "k", "tie", "from_tie", "decided")}
    log(f"ties: {len(per_tensor)} tensors, {total['decided']:,} of {total['k']:,} mask entries "
        f"({total['decided'] / total['k']:.1%}) decided by the tie rule at density {density:g}")
    return {"density": density, "chunk_size": CHUNK_SIZE, "per_kind": per_kind, "total": total,
            "per_tensor": per_tensor}


def markdown(result: dict) -> str:
    d = result["density"]
    t = result["total"]
    lines = [
        f"### Ties in the quantized weights at k = {d:.0%}",
        "",
        f"Per chunk of {result['chunk_size']:,} entries NanoAdam selects its k = round({d:g} x length) smallest "
        "|w|; the threshold t is the k-th smallest |w| of the chunk. Tie group = the chunk's entries with "
        "|w| = t; of them k - #(|w| < t) are selected. Decided by the tie rule = the selected tie entries in "
        "chunks where the tie group is larger than that (equal |w| left out: position chose). Sums over "
        "the tensors of each kind; distinct |w| per tensor min / median / max.",
        "",
        "| kind | GGUF type | tensors | entries | distinct \\|w\\| per tensor | max distinct values per 32-block | "
        "mask entries (k) | tie groups at threshold | selected from them | decided by the tie rule | "
        "share of the mask decided | mean position of tie picks in the chunk |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kd, a in result["per_kind"].items():
        pos = a["tie_pick_mean_position"]
        lines.append(
            f"| {kd} | {a['quant']} | {a['tensors']} | {a['numel']:,} | {a['distinct_abs_min']:,} / "
            f"{a['distinct_abs_median']:,} / {a['distinct_abs_max']:,} | {a.get('max_distinct_per_block', '-')} | {a['k']:,} | {a['tie']:,} | "
            f"{a['from_tie']:,} | {a['decided']:,} | {a['decided'] / a['k']:.1%} | "
            f"{'-' if math.isnan(pos) else f'{pos:.2f}'} |")
    lines.append(f"| **all** | | | {t['numel']:,} | | | {t['k']:,} | {t['tie']:,} | {t['from_tie']:,} | "
                 f"{t['decided']:,} | {t['decided'] / t['k']:.1%} | |")
    chunks = sum(a["chunks"] for a in result["per_kind"].values())
    biggest = max(a["max_tie_group"] for a in result["per_kind"].values())
    decided = [a for a in result["per_kind"].values() if not math.isnan(a["tie_pick_mean_position"])]
    pos = (sum(a["tie_pick_mean_position"] * a["from_tie"] for a in decided) / sum(a["from_tie"] for a in decided)
           if decided else math.nan)
    lines += [
        "",
        f"Over all {chunks:,} chunks the threshold's tie group holds {t['tie'] / chunks:.1f} entries on average "
        f"(the largest {biggest:,}) against about {t['k'] / chunks:,.0f} selected per chunk; "
        f"{t['decided']:,} mask entries ({t['decided'] / t['k']:.2%}) are chosen by position, at a mean position "
        f"of {pos:.2f} of their chunk.",
        "",
        "How ties are broken: `nanotune.optim.select_mask` (python/nanotune/optim.py; the compiled CPU kernel "
        "gives the same indices) sorts on the exact key (|w| float32 bits << 32 | offset in the chunk), so "
        "among equal |w| the lowest offset in the chunk wins. A chunk is 2**15 consecutive entries of the "
        "flattened (row-major) tensor, so the lowest offsets are the chunk's first rows. The position column "
        "is the mean offset of the tie rule's picks divided by the chunk length: 0.5 would be no preference, "
        "below 0.5 means the picks sit in the chunk's first rows.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> bool:
    from nanotune.reproduce.lab import pyplot

    plt = pyplot()
    if plt is None:
        return False
    kinds = list(result["per_kind"])
    a = result["per_kind"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    x = range(len(kinds))
    axes[0].bar([i - 0.2 for i in x], [a[k]["tie"] / a[k]["k"] for k in kinds], width=0.4,
                label="tie groups at the threshold / k")
    axes[0].bar([i + 0.2 for i in x], [a[k]["decided"] / a[k]["k"] for k in kinds], width=0.4,
                label="decided by the tie rule / k")
    axes[0].set_xticks(list(x), kinds, rotation=30, fontsize=8)
    axes[0].set(title=f"ties at k = {result['density']:.0%}, per weight kind", ylabel="share of the mask")
    axes[0].legend(fontsize=7)
    axes[1].bar(list(x), [a[k]["distinct_abs_median"] / a[k]["numel"] * a[k]["tensors"] for k in kinds])
    axes[1].set_xticks(list(x), kinds, rotation=30, fontsize=8)
    axes[1].set(title="distinct |w| per tensor / entries per tensor (median tensor)", yscale="log")
    axes[1].title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write(result: dict, out, header: str = "") -> None:
    from nanotune.reproduce.lab import write_report

    md = (header or "# Ties in SmolLM2-135M's quantized weights under NanoAdam's bottom-k selection\n\n") + \
        markdown(result)
    write_report(out, "real_ties", result, md, lambda path: plot(result, path),
                 "share of the mask in tie groups and decided by the tie rule, per weight kind")
