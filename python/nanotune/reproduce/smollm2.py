"""Shared set-up of the real-model reproductions (`python -m nanotune.reproduce --real`):
SmolLM2-135M-Instruct, an instruction set, and what the model already knows.

Model: the `smollm2-135m` preset of nanotune.models (SmolLM2-135M-Instruct,
134.5M parameters, 30 blocks, tied embeddings, from a Q4_1 GGUF dequantized to
fp32), on the CPU. Its random-init twin (the star's "from scratch") is
LlamaForCausalLM(the same config) under torch.manual_seed(seed).

B (what finetuning teaches): data/instructions.jsonl, 60 instruction/response
pairs written for this (rewriting, short explanations, lists, arithmetic word
problems, definitions, translations of single words, classification), rendered
with the model's chat template (its default system prompt included), loss on
the assistant tokens only (the response and its <|im_end|>). Every 5th pair is
held out (12), the other 48 are trained on, in one seeded order shared by every
run. Why an instruction set and not made-up facts: the same data then serves
the star (finetuning gradients on a real instruction set, as the paper
observes them) and the continual runs, and held-out pairs measure whether the
style generalizes, where made-up facts could only be scored on the facts
trained on (memorization) within the few tens of steps the CPU allows.

A (what the model knew before): (1) held-out LM loss on Moby-Dick, the first
`moby_blocks` rows of 128 tokens of chapters 121-135 (corpora.moby_dick's
held-out split, packed by corpora.blocks with this tokenizer); (2) general
knowledge: data/knowledge.jsonl's questions, asked through the chat template
and answered greedily (`max_new_tokens`); a question counts as known when the
reply contains one of its answers (case-insensitive). Only the questions the
pretrained model gets right are kept (`filter_knowledge`), and their score
after finetuning is the accuracy (still right) and the loss of the pretrained
model's own replies (teacher-forced, assistant tokens), which starts low and
rises as the answers drift (a reply cut at max_new_tokens is scored as written
plus <|im_end|>, before and after finetuning alike). With 27 or so questions
one flipped answer moves the accuracy by about 4 points, and greedy replies
flip on small changes: read the accuracy with that grain.

Finetuning: nanotune.training's create_optimizer / train_step / evaluate at a
constant lr, no warmup, no clipping, batch_size pairs a step (padded to the
longest), `steps` steps; a run whose loss is not finite (train_step raises) or
exceeds `diverge_loss` is stopped and marked diverged. One model object is
reset to the pretrained weights before each run; runs with the same
(optimizer, lr) are computed once (`SmolLab.finetune` caches them), so the
star's finetuning gradients are those of the continual AdamW run at its lr.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from nanotune.data import IGNORE_INDEX
from nanotune.reproduce import corpora
from nanotune.reproduce.lab import Run, l2_distance
from nanotune.training import NonFiniteError, create_optimizer, evaluate, train_step

DATA = Path(__file__).resolve().parent / "data"


@dataclass
class RealConfig:
    preset: str = "smollm2-135m"
    layers: int | None = None  # keep the first N blocks only (quick runs); None: all 30
    batch_size: int = 4  # instruction pairs per step
    steps: int = 20  # finetuning steps per run (20 x 4 = 80 pairs: 1.7 epochs of the 48)
    eval_every: int = 10  # curve resolution
    heldout_every: int = 5  # every 5th instruction pair is held out
    block_len: int = 128  # Moby-Dick rows
    moby_blocks: int = 24  # held-out Moby-Dick rows for the final numbers (3,072 tokens)
    curve_moby_blocks: int = 8  # ... for the curve points
    knowledge_questions: int | None = None  # first N questions (quick runs); None: all
    filter_knowledge: bool = True  # keep only what the pretrained model answers right
    max_new_tokens: int = 24
    density: float = 0.1  # NanoAdam k (the paper's Llama runs: 10%)
    mask_interval: int = 10  # NanoAdam m: two masks in 20 steps
    diverge_loss: float = 20.0
    adamw_lrs: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)  # real_continual.py says why
    nanoadam_lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
    seed: int = 0

    @classmethod
    def quick(cls) -> "RealConfig":
        """Two blocks of the real model and a few steps (tests: seconds). Its numbers mean nothing."""
        return cls(layers=2, batch_size=2, steps=3, eval_every=2, adamw_lrs=(1e-5, 1e-4), nanoadam_lrs=(1e-5, 1e-3), moby_blocks=4,
                   curve_moby_blocks=2, knowledge_questions=6, filter_knowledge=False, max_new_tokens=6,
                   mask_interval=2, diverge_loss=100.0)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class SmolLab:
    def __init__(self, cfg: RealConfig, log: Callable[[str], Any] = print, node_modules: Path = corpora.NODE_MODULES):
        self.cfg, self.log, self.node_modules = cfg, log, node_modules
        self.runs: dict[tuple, Run] = {}
        self.prepared = False

    # ------------------------------------------------------------------ set-up

    def prepare(self) -> "SmolLab":
        if self.prepared:
            return self
        from nanotune.models import load_model

        c = self.cfg
        t0 = time.perf_counter()
        lm = load_model(c.preset, device="cpu")
        self.model, self.tokenizer, self.path = lm.model, lm.tokenizer, lm.path
        if c.layers is not None:  # quick: the first blocks of the real model
            self.model.model.layers = self.model.model.layers[:c.layers]
            self.model.config.num_hidden_layers = c.layers
        self.model.train()
        self.pretrained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        tok = self.tokenizer
        rows = read_jsonl(DATA / "instructions.jsonl")
        self.instructions = {"train": [r for i, r in enumerate(rows) if i % c.heldout_every != c.heldout_every - 1],
                             "heldout": [r for i, r in enumerate(rows) if i % c.heldout_every == c.heldout_every - 1]}
        self.b = {k: [self.encode(r["instruction"], r["response"]) for r in v] for k, v in self.instructions.items()}
        moby = corpora.moby_dick(self.node_modules)
        self.moby = corpora.blocks(moby.heldout, tok, c.block_len, c.moby_blocks)
        self.questions = read_jsonl(DATA / "knowledge.jsonl")[:c.knowledge_questions]
        replies = self.answer(self.model, [q["question"] for q in self.questions])
        for q, reply in zip(self.questions, replies):
            q["pretrained_reply"], q["pretrained_right"] = reply, self.right(q, reply)
        self.known = [q for q in self.questions if q["pretrained_right"] or not c.filter_knowledge]
        self.k_rows = [self.encode(q["question"], q["pretrained_reply"]) for q in self.known]
        self.info = {
            "model": {"preset": c.preset, "path": str(self.path),
                      "parameters": sum(p.numel() for p in self.model.parameters()),
                      "blocks": len(self.model.model.layers)},
            "instructions": {k: len(v) for k, v in self.instructions.items()},
            "assistant_tokens": {k: sum(int((r[1] != IGNORE_INDEX).sum()) for r in v) for k, v in self.b.items()},
            "moby_dick_heldout_tokens": int(self.moby.numel()),
            "knowledge": {"questions": len(self.questions),
                          "right_before": sum(q["pretrained_right"] for q in self.questions),
                          "kept": len(self.known)},
        }
        self.before = self.scores(self.model, final=True)
        self.before_curve_a = self.moby_loss(self.model, c.curve_moby_blocks)  # step 0 of every run's curve
        self.log(f"SmolLM2 ready ({time.perf_counter() - t0:.0f}s): {self.info['model']['parameters']:,} params; "
                 f"knowledge {self.info['knowledge']['right_before']}/{len(self.questions)} right; before finetuning "
                 f"Moby-Dick {self.before['a_loss']:.3f}, B held-out {self.before['b_loss']:.3f}")
        self.prepared = True
        return self

    def encode(self, instruction: str, response: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, labels) of one chat exchange; labels are IGNORE_INDEX on the prompt (system and user turns
        and the assistant header)."""
        tok = self.tokenizer
        prompt = tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)
        full = tok.apply_chat_template([{"role": "user", "content": instruction},
                                        {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(f"the chat template's prompt is not a prefix of the exchange: {prompt!r}")
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(full[len(prompt):].rstrip("\n"), add_special_tokens=False)["input_ids"]  # reply + <|im_end|>
        ids = torch.tensor(p + r, dtype=torch.long)
        labels = ids.clone()
        labels[:len(p)] = IGNORE_INDEX
        return ids, labels

    def collate(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        n = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = x, y, 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def order(self, steps: int) -> list[list[int]]:
        """Row indices of each step's batch: seeded epochs of randperm over the training pairs."""
        n, bs = len(self.b["train"]), self.cfg.batch_size
        g = torch.Generator().manual_seed(self.cfg.seed + 2)
        flat = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-steps * bs // n))])
        return flat[:steps * bs].view(steps, bs).tolist()

    def new_scratch(self) -> torch.nn.Module:
        """The same architecture at a seeded random init (the star's "from scratch")."""
        from transformers import LlamaForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            model = LlamaForCausalLM(self.model.config).to(torch.float32)
        model.train()
        return model

    def reset(self) -> torch.nn.Module:
        """The shared model, back at the pretrained weights."""
        self.model.load_state_dict(self.pretrained)
        self.model.zero_grad(set_to_none=True)
        self.model.train()
        return self.model

    # ------------------------------------------------------------------ measures

    def loss(self, model, rows: list, bs: int = 8) -> float:
        return evaluate(model, (self.collate(rows[i:i + bs]) for i in range(0, len(rows), bs)))["loss"]

    def moby_loss(self, model, blocks: int | None = None) -> float:
        data = self.moby[:blocks]
        return evaluate(model, ({"input_ids": data[i:i + 8], "attention_mask": torch.ones_like(data[i:i + 8]),
                                 "labels": data[i:i + 8]} for i in range(0, len(data), 8)))["loss"]

    @staticmethod
    def right(q: dict, reply: str) -> bool:
        return any(a.lower() in reply.lower() for a in q["answers"])

    @torch.no_grad()
    def answer(self, model, questions: list[str]) -> list[str]:
        """Greedy replies through the chat template, batched with left padding."""
        tok = self.tokenizer
        was = model.training
        model.eval()
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                               add_generation_prompt=True) for q in questions]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        finally:
            tok.padding_side = side
            model.train(was)
        return [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]

    def scores(self, model, final: bool) -> dict[str, float]:
        """a_loss (Moby-Dick held-out), b_loss (held-out pairs), avg_loss; final: also the knowledge
        accuracy and loss on the kept questions."""
        a = self.moby_loss(model, None if final else self.cfg.curve_moby_blocks)
        b = self.loss(model, self.b["heldout"])
        out = {"a_loss": a, "b_loss": b, "avg_loss": (a + b) / 2}
        if final:
            replies = self.answer(model, [q["question"] for q in self.known])
            out["knowledge_acc"] = sum(self.right(q, r) for q, r in zip(self.known, replies)) / max(1, len(self.known))
            out["knowledge_loss"] = self.loss(model, self.k_rows)
        return out

    # ------------------------------------------------------------------ finetuning on B

    def optimizer(self, model, optimizer: str, lr: float):
        if optimizer == "adamw":
            return create_optimizer(model, "adamw", lr=lr)
        return create_optimizer(model, "nanoadam", lr=lr, density=self.cfg.density,
                                mask_interval=self.cfg.mask_interval, criterion="small_weights", seed=self.cfg.seed)

    def train(self, model, opt, lr: float, steps: int, run: Run | None = None,
              observe: Callable[[int], Any] | None = None) -> None:
        """`steps` constant-lr steps on B's training pairs (the fixed order); `observe(step)` runs inside
        train_step while that step's gradients are in .grad (before the update)."""
        c = self.cfg
        order = self.order(steps)
        for step in range(steps + 1):
            if run is not None and step > 0 and (step % c.eval_every == 0 or step == steps):
                s = self.scores(model, final=False)
                run.steps.append(step)
                run.b_loss.append(s["b_loss"])
                run.a_loss.append(s["a_loss"])
            if step == steps:
                break
            batch = self.collate([self.b["train"][i] for i in order[step]])
            try:
                out = train_step(model, opt, [batch], lr,
                                 observe=None if observe is None else (lambda s=step: observe(s)))
            except NonFiniteError:
                out = {"loss": math.nan}
            if run is not None:
                run.train_loss.append(out["loss"])
                if not (math.isfinite(out["loss"]) and out["loss"] < c.diverge_loss):
                    run.diverged_at = step
                    return

    def finetune(self, optimizer: str, lr: float, observe: Callable[[int, torch.nn.Module], Any] | None = None
                 ) -> Run:
        """Finetune the pretrained model on B (cached per (optimizer, lr); `observe(step, model)` only
        on the run that computes it)."""
        key = (optimizer, float(lr))
        if key in self.runs:
            return self.runs[key]
        self.prepare()
        t0 = time.perf_counter()
        model = self.reset()
        opt = self.optimizer(model, optimizer, lr)
        sparse = [g.get("bias_correction") for g in opt.param_groups if g.get("sparse", True)]
        run = Run(optimizer, "small_weights" if optimizer == "nanoadam" else None, float(lr),
                  bool(sparse[0]) if optimizer == "nanoadam" and sparse else None)
        run.steps.append(0)  # step 0: the pretrained model's scores (computed once)
        b0 = self.before
        run.b_loss.append(b0["b_loss"])
        run.a_loss.append(self.before_curve_a)
        self.train(model, opt, lr, self.cfg.steps, run,
                   observe=None if observe is None else (lambda step: observe(step, model)))
        if run.diverged_at is None:
            run.final = self.scores(model, final=True)
        else:
            run.final = {k: math.nan for k in ("a_loss", "b_loss", "avg_loss", "knowledge_acc", "knowledge_loss")}
        run.final.update(l2_distance(model, self.pretrained))
        run.seconds = time.perf_counter() - t0
        del opt
        f = run.final
        state = f"diverged at step {run.diverged_at}" if run.diverged_at is not None else (
            f"B {f['b_loss']:.3f}, Moby-Dick {f['a_loss']:.3f}, knowledge {f['knowledge_acc']:.0%} "
            f"(loss {f['knowledge_loss']:.3f}), l2 {f['l2_all']:.3f}")
        self.log(f"  {optimizer} lr {lr:g}: {state} ({run.seconds:.0f}s)")
        self.runs[key] = run
        return run

    def quant_types(self) -> dict[str, str] | None:
        """{weight kind: quantization type} from the preset's GGUF header; None when it cannot be read."""
        try:
            from nanotune.models import gguf_preset_file
            from nanotune.reproduce.ties import gguf_types

            return gguf_types(gguf_preset_file(self.cfg.preset))
        except Exception as e:  # noqa: BLE001 - a report column, not worth failing the run over
            self.log(f"GGUF quantization types unread: {e}")
            return None

    def config(self) -> dict:
        return asdict(self.cfg)
