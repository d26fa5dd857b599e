"""Shared set-up of reproductions 1-3: corpora, tokenizer, the "pretrained"
model, and finetuning runs with the project's own train_step / evaluate.

When these were written no pretrained weights shipped offline (reports/README.md's
survey), so the pretrained model here is ours (the real one, SmolLM2-135M, has its
own mode: `--real`, smollm2.py): a small Llama (tied embeddings, GQA, SwiGLU, like
the presets of nanotune.models) pretrained with AdamW on corpus A (Moby-Dick)
for `pretrain_steps`, then finetuned on corpus B (SpamAssassin bodies). One
Lab pretrains once; every experiment of the same process reuses it, and
finetuning runs with the same settings are computed once (`Lab.finetune`
caches them), so the ablation's small-weights run at lr x is the continual
experiment's NanoAdam run at lr x (with the same bias correction).

NanoAdam runs name their sparse groups' `bias_correction` explicitly (both
values are reproduced, so a change of the optimizer's default does not move a
row); the dense group (the norms; the head is tied to the embedding and
sparse) keeps the optimizer's default, bias-corrected torch Adam.

Every finetuning run sees the same batches in the same order (one seeded
order for the whole Lab), at a constant lr, without gradient clipping (a
diverging run shows as such; it is stopped when its loss is not finite or
exceeds `diverge_loss`).
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from nanotune.reproduce import corpora
from nanotune.training import create_optimizer, evaluate, train_step


@dataclass
class LabConfig:
    vocab_size: int = 4096  # BPE trained on A+B training text
    hidden_size: int = 128
    intermediate_size: int = 352  # ~8/3 hidden, SwiGLU
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    block_len: int = 128  # tokens per training row
    pretrain_batch_size: int = 16  # rows per pretraining step (2,048 tokens)
    batch_size: int = 8  # rows per finetuning step (1,024 tokens)
    pretrain_steps: int = 600  # AdamW on A; about 4 epochs of chapters 1-120
    pretrain_lr: float = 3e-3  # peak; linear warmup then cosine to 10%
    pretrain_warmup: int = 30
    finetune_steps: int = 300  # on B, for every finetuning run
    eval_every: int = 25  # curve resolution (held-out loss of A and B)
    curve_eval_blocks: int = 48  # held-out rows per curve point
    final_eval_blocks: int = 192  # held-out rows for the final numbers
    density: float = 0.05  # NanoAdam k: fraction of each sparse tensor
    mask_interval: int = 50  # NanoAdam m
    diverge_loss: float = 20.0  # a finetuning run stops here (log(4096) = 8.3 is a uniform guess)
    limit_docs: int | None = None  # quick runs: first N documents per split / spam group
    tokenizer_chars: int = 4_000_000  # cap on B's text fed to the BPE trainer (A is used whole)
    seed: int = 0

    @classmethod
    def quick(cls) -> "LabConfig":
        """A tiny set-up for tests: seconds, not minutes. Its numbers mean nothing."""
        return cls(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                   block_len=32, pretrain_batch_size=4, batch_size=4, pretrain_steps=8, pretrain_warmup=2, finetune_steps=6, eval_every=3,
                   curve_eval_blocks=4, final_eval_blocks=8, mask_interval=3, limit_docs=6,
                   tokenizer_chars=200_000)


@dataclass
class Run:
    """One finetuning run on B from the pretrained weights."""

    optimizer: str  # "adamw" or "nanoadam"
    criterion: str | None  # NanoAdam's criterion; None for AdamW
    lr: float
    bias_correction: bool | None = None  # NanoAdam's sparse groups (Note [bias correction]); None for AdamW
    steps: list[int] = field(default_factory=list)  # curve steps
    b_loss: list[float] = field(default_factory=list)  # held-out B loss at those steps
    a_loss: list[float] = field(default_factory=list)  # held-out A loss at those steps
    train_loss: list[float] = field(default_factory=list)  # every step
    final: dict[str, float] = field(default_factory=dict)  # a_loss, b_loss, avg_loss, l2_all, l2_blocks
    diverged_at: int | None = None  # step where the loss left [0, diverge_loss], else None
    seconds: float = 0.0

    @property
    def label(self) -> str:
        name = "AdamW" if self.optimizer == "adamw" else \
            f"NanoAdam {self.criterion} (bias correction {'on' if self.bias_correction else 'off'})"
        return f"{name}, lr {self.lr:g}"


def l2_distance(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """||theta - theta_ref||_2 over all unique tensors (the tied embedding/head once),
    and over the transformer blocks only (model.layers.*: no embedding, head or final norm)."""
    total = blocks = 0.0
    for name, p in model.named_parameters():  # remove_duplicate=True: a tied tensor once
        d = float((p.detach().double() - reference[name].double()).pow(2).sum())
        total += d
        if name.startswith("model.layers."):
            blocks += d
    return {"l2_all": math.sqrt(total), "l2_blocks": math.sqrt(blocks)}


class Lab:
    def __init__(self, cfg: LabConfig, cache: Path | None = None, log: Callable[[str], Any] = print,
                 node_modules: Path = corpora.NODE_MODULES, reuse: bool = False):
        """cache: where the pretrained model is saved (a HF directory, `cache/pretrained`).
        reuse: load it from there instead of pretraining when its lab.json matches `cfg`
        (for development; `npm run reproduce` always pretrains)."""
        self.cfg, self.cache, self.log, self.node_modules, self.reuse = cfg, cache, log, node_modules, reuse
        self.runs: dict[tuple, Run] = {}
        self.prepared = False

    # ------------------------------------------------------------------ set-up

    def prepare(self) -> "Lab":
        """Read the corpora, train the tokenizer, pretrain on A. Idempotent."""
        if self.prepared:
            return self
        c = self.cfg
        t0 = time.perf_counter()
        self.a = corpora.moby_dick(self.node_modules, limit=c.limit_docs)
        self.b = corpora.spam_assassin(self.node_modules, limit=c.limit_docs)
        b_text, n = [], 0
        for doc in self.b.train:
            if n >= c.tokenizer_chars:
                break
            b_text.append(doc)
            n += len(doc)
        self.tokenizer = corpora.train_tokenizer(self.a.train + b_text, c.vocab_size)
        L = c.block_len
        self.data = {
            "a_train": corpora.blocks(self.a.train, self.tokenizer, L),
            "a_heldout": corpora.blocks(self.a.heldout, self.tokenizer, L, c.final_eval_blocks),
            "b_train": corpora.blocks(self.b.train, self.tokenizer, L),
            "b_heldout": corpora.blocks(self.b.heldout, self.tokenizer, L, c.final_eval_blocks),
        }
        self.info = {
            "corpora": {"A": {**self.a.info, "documents": [len(self.a.train), len(self.a.heldout)]},
                        "B": {**self.b.info, "documents": [len(self.b.train), len(self.b.heldout)]}},
            "tokens": {k: int(v.numel()) for k, v in self.data.items()},
            "tokenizer_vocab": len(self.tokenizer),
        }
        self.log(f"corpora and tokenizer: {self.info['tokens']} ({time.perf_counter() - t0:.0f}s)")
        t0 = time.perf_counter()
        model = self.new_model(pretrained=False)
        self.init_state = copy.deepcopy(model.state_dict())
        saved = None if self.cache is None else self.cache / "pretrained"
        if self.reuse and saved is not None and (saved / "lab.json").is_file():
            meta = json.loads((saved / "lab.json").read_text())
            if meta["config"] == self.config():
                from safetensors.torch import load_file

                model.load_state_dict(load_file(saved / "model.safetensors"), strict=False)  # tied head: one tensor
                self.pretrained = copy.deepcopy(model.state_dict())
                self.info["pretrain"], self.info["init"] = meta["pretrain"], meta["init"]
                self.log(f"reused the pretrained model in {saved}")
                self.prepared = True
                return self
        opt = create_optimizer(model, "adamw", betas=(0.9, 0.95), weight_decay=0.1)
        order = self.order(len(self.data["a_train"]), c.pretrain_steps, c.pretrain_batch_size, seed=c.seed + 1)
        losses = []
        for step in range(c.pretrain_steps):
            warm = (step + 1) / c.pretrain_warmup
            progress = (step - c.pretrain_warmup) / max(1, c.pretrain_steps - c.pretrain_warmup)
            cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
            lr = c.pretrain_lr * (warm if step < c.pretrain_warmup else cosine)
            out = train_step(model, opt, [self.batch(self.data["a_train"][order[step]])], lr, grad_clip=1.0)
            losses.append(out["loss"])
            if (step + 1) % max(1, c.pretrain_steps // 6) == 0:
                self.log(f"  pretrain step {step + 1}/{c.pretrain_steps}: train loss {out['loss']:.3f}")
        self.pretrained = copy.deepcopy(model.state_dict())
        self.info["pretrain"] = {
            "steps": c.pretrain_steps, "seconds": round(time.perf_counter() - t0, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_loss_last": sum(losses[-20:]) / len(losses[-20:]),
            "a_heldout_loss": self.loss(model, "a_heldout"), "b_heldout_loss": self.loss(model, "b_heldout"),
        }
        scratch = self.new_model(pretrained=False)
        self.info["init"] = {"a_heldout_loss": self.loss(scratch, "a_heldout"),
                             "b_heldout_loss": self.loss(scratch, "b_heldout")}
        self.log(f"pretrained {self.info['pretrain']['parameters']:,} params on A in "
                 f"{self.info['pretrain']['seconds']:.0f}s: held-out A {self.info['pretrain']['a_heldout_loss']:.3f}, "
                 f"B {self.info['pretrain']['b_heldout_loss']:.3f}")
        if saved is not None:  # for inspection: loads with nanotune.models.load_model
            model.save_pretrained(saved)
            self.tokenizer.save_pretrained(saved)
            (saved / "lab.json").write_text(json.dumps({"config": self.config(), "pretrain": self.info["pretrain"],
                                                        "init": self.info["init"]}, indent=1))
        self.prepared = True
        return self

    def new_model(self, pretrained: bool = True) -> torch.nn.Module:
        """A fresh model: the pretrained weights, or (pretrained=False) the same seeded init."""
        from transformers import LlamaConfig, LlamaForCausalLM

        c = self.cfg
        tok = self.tokenizer
        config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                             intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                             num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                             max_position_embeddings=c.block_len, tie_word_embeddings=True, rope_theta=10000.0,
                             rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            model = LlamaForCausalLM(config).to(torch.float32)
        if pretrained:
            model.load_state_dict(self.pretrained)
        elif hasattr(self, "init_state"):
            model.load_state_dict(self.init_state)
        model.train()
        return model

    @staticmethod
    def batch(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": rows}

    @staticmethod
    def order(n_rows: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
        """Row indices of each step's batch: seeded epochs of randperm(n_rows)."""
        g = torch.Generator().manual_seed(seed)
        need = steps * batch_size
        flat = torch.cat([torch.randperm(n_rows, generator=g) for _ in range(-(-need // n_rows))])
        return list(flat[:need].view(steps, batch_size))

    def loss(self, model: torch.nn.Module, split: str, rows: int | None = None) -> float:
        data = self.data[split][:rows]
        bs = 32
        return evaluate(model, (self.batch(data[i:i + bs]) for i in range(0, len(data), bs)))["loss"]

    # ------------------------------------------------------------------ finetuning on B

    def optimizer(self, model, optimizer: str, criterion: str | None, lr: float, bias_correction: bool = False):
        """AdamW, or NanoAdam with `bias_correction` in its sparse groups (the dense group: the default)."""
        if optimizer == "adamw":
            return create_optimizer(model, "adamw", lr=lr)
        return create_optimizer(model, "nanoadam", lr=lr, density=self.cfg.density,
                                mask_interval=self.cfg.mask_interval, criterion=criterion, seed=self.cfg.seed,
                                bias_correction=bool(bias_correction))

    def train_on_b(self, model, opt, lr: float, steps: int, run: Run | None = None,
                   before_step: Callable[[int, torch.nn.Module, dict], Any] | None = None) -> None:
        """`steps` constant-lr steps on B's training rows (the Lab's fixed order); fills `run`'s curves."""
        c = self.cfg
        order = self.order(len(self.data["b_train"]), steps, c.batch_size, seed=c.seed + 2)
        for step in range(steps + 1):
            if run is not None and (step % c.eval_every == 0 or step == steps):
                run.steps.append(step)
                run.b_loss.append(self.loss(model, "b_heldout", c.curve_eval_blocks))
                run.a_loss.append(self.loss(model, "a_heldout", c.curve_eval_blocks))
            if step == steps:
                break
            batch = self.batch(self.data["b_train"][order[step]])
            if before_step is not None:
                before_step(step, model, batch)
            out = train_step(model, opt, [batch], lr)
            if run is not None:
                run.train_loss.append(out["loss"])
                if not (math.isfinite(out["loss"]) and out["loss"] < c.diverge_loss):
                    run.diverged_at = step
                    return

    def finetune(self, optimizer: str, lr: float, criterion: str | None = None,
                 bias_correction: bool = False) -> Run:
        """Finetune the pretrained model on B (cached per (optimizer, criterion, lr, bias_correction));
        criterion and bias_correction are NanoAdam's (ignored for AdamW)."""
        nano = optimizer == "nanoadam"
        key = (optimizer, criterion if nano else None, float(lr), bool(bias_correction) if nano else None)
        if key in self.runs:
            return self.runs[key]
        self.prepare()
        t0 = time.perf_counter()
        run = Run(optimizer, key[1], float(lr), key[3])
        model = self.new_model()
        opt = self.optimizer(model, optimizer, key[1], lr, bool(key[3]))
        self.train_on_b(model, opt, lr, self.cfg.finetune_steps, run)
        if run.diverged_at is None:
            a, b = self.loss(model, "a_heldout"), self.loss(model, "b_heldout")
            run.final = {"a_loss": a, "b_loss": b, "avg_loss": (a + b) / 2, **l2_distance(model, self.pretrained)}
        else:
            run.final = {"a_loss": math.nan, "b_loss": math.nan, "avg_loss": math.nan,
                         **l2_distance(model, self.pretrained)}
        run.seconds = time.perf_counter() - t0
        state = "diverged at step %d" % run.diverged_at if run.diverged_at is not None else (
            f"held-out B {run.final['b_loss']:.3f}, A {run.final['a_loss']:.3f}, l2 {run.final['l2_all']:.2f}")
        self.log(f"  {run.label}: {state} ({run.seconds:.0f}s)")
        self.runs[key] = run
        return run

    def config(self) -> dict:
        return asdict(self.cfg)


def fmt(x: float, digits: int = 3) -> str:
    """A table cell: 'diverged' for NaN."""
    return "diverged" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_report(out: Path, name: str, data: dict, md: str, plot: Callable[[Path], bool], caption: str) -> None:
    """Writes <name>.json, <name>.md and, where matplotlib is there, <name>.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    md += f"\n![{caption}]({name}.png)\n" if plot(out / f"{name}.png") else \
        "\n(No plot: matplotlib is missing; `pip install matplotlib`.)\n"
    (out / f"{name}.md").write_text(md)


def experiment_main(name: str, doc: str, run: Callable, write: Callable, argv=None, lab: "Lab | None" = None) -> int:
    """The command line of one experiment module: `python -m nanotune.reproduce.<name> [--out DIR] [--quick]`."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (tests)")
    args = p.parse_args(argv)
    lab = lab or Lab(LabConfig.quick() if args.quick else LabConfig())
    write(run(lab), args.out)
    print(f"wrote {args.out / (name + '.md')}")
    return 0
