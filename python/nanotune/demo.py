"""A short NanoAdam finetune of a tiny random Llama, from Python (`python -m nanotune.demo`).

Pretrains briefly on one synthetic task with AdamW, then finetunes on another
with NanoAdam at 10% density and prints the loss falling. Runs in seconds on a CPU.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nanotune.optim import NanoAdam, nanoadam_param_groups


def task_batch(kind: str, gen: torch.Generator, vocab: int = 64, bsz: int = 8, seq: int = 24) -> torch.Tensor:
    start = torch.randint(0, vocab, (bsz, 1), generator=gen)
    step = 1 if kind == "count" else 3
    return (start + step * torch.arange(seq)) % vocab  # (B, T) arithmetic sequences


def run(model, opt, kind: str, steps: int, gen) -> list[float]:
    losses = []
    for _ in range(steps):
        x = task_batch(kind, gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=True))
    pre = run(model, torch.optim.AdamW(model.parameters(), lr=3e-3), "count", 60, gen)
    print(f"pretrain (AdamW, task 'count by 1'): loss {pre[0]:.3f} -> {pre[-1]:.3f}")
    opt = NanoAdam(nanoadam_param_groups(model), lr=1e-2, density=0.1, mask_interval=20)
    fine = run(model, opt, "skip", 60, gen)
    print(f"finetune (NanoAdam k=10%, m=20, task 'count by 3'): loss {fine[0]:.3f} -> {fine[-1]:.3f}")
    print(f"optimizer state: {opt.state_bytes() / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
