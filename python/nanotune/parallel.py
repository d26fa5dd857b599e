"""Data parallel training in a sidecar group: DDP with a gradient all-reduce that, for
NanoAdam, sends only the selected entries; and each rank's slice of a global batch.

Note [sparse all-reduce]: under DDP every rank holds the same weights (DDP
broadcasts rank 0's at wrap time, and every update after is the same on every
rank), so every rank selects the same masks: selection is a deterministic function
of the weights (and, for "random", of seeded generators). NanoAdam reads a sparse
tensor's gradient at its mask only, so only those k entries need summing across
ranks. DDP lets a communication hook replace its all-reduce (`register_comm_hook`,
the mechanism of torch's PowerSGD and fp16 compression hooks); ours packs, per
bucket, each sparse tensor's gradient at its mask and every dense tensor's whole
gradient into one vector, all-reduces that (about k of the dense bytes), and writes
the sums back, zeros elsewhere (so a gradient norm reads the entries that count).
The masks must be known before backward: NanoAdam.prepare_step() refreshes the
masks due at the coming step from the weights beforehand (the same selection its
step() would make, since the weights do not change in between). A step that
refreshes with "large_grads" needs the summed dense gradient to select from, so
its tensors travel dense on that step. The hook is also the byte counter: the dense
hook sums whole buckets (what torch's default hook does), and each step's
all-reduced bytes go back to the client (train_step's allReducedBytes).

Gradients are summed, not averaged: each rank's loss is its rows' token-loss sum
divided by the target tokens of the whole global batch (Note [loss over accumulated
micro-batches] in training.py), so the sum over ranks is the gradient of the one
big batch, whatever the world size.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["CommState", "rank_slice", "wrap_ddp"]


class CommState:
    """What the DDP communication hook needs, and what it counted."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.optimizer: Any = None  # NanoAdam with sparse all-reduce, else None (dense)
        self.bytes = 0  # all-reduced this step

    @property
    def sparse(self) -> bool:
        return self.optimizer is not None


def _hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:  # noqa: D103
    buf = bucket.buffer()
    masks = getattr(state.optimizer, "comm_masks", None) if state.sparse else None
    if masks is None:
        state.bytes += buf.numel() * buf.element_size()
        return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])
    grads = [g.view(-1) for g in bucket.gradients()]
    idxs = [masks.get(p) for p in bucket.parameters()]  # None: the whole tensor travels
    packed = torch.cat([g if i is None else g[i] for g, i in zip(grads, idxs)])
    state.bytes += packed.numel() * packed.element_size()

    def unpack(f):
        sums, at = f.value()[0], 0
        for g, i in zip(grads, idxs):
            n = g.numel() if i is None else i.numel()
            if i is None:
                g.copy_(sums[at:at + n])
            else:
                g.zero_()
                g[i] = sums[at:at + n]
            at += n
        return buf

    return dist.all_reduce(packed, async_op=True).get_future().then(unpack)


def wrap_ddp(model: torch.nn.Module, world_size: int) -> "tuple[torch.nn.Module, CommState]":
    """`model` in DistributedDataParallel with the summing, counting hook of Note
    [sparse all-reduce]; the optimizer is attached to the returned state later."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = next(model.parameters()).device
    ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    state = CommState(world_size)
    ddp.register_comm_hook(state, _hook)
    return ddp, state


def rank_slice(batch: "dict[str, torch.Tensor]", rank: int, world_size: int) -> "dict[str, torch.Tensor]":
    """This rank's rows of a global micro-batch (torch.tensor_split: as even as the rows
    allow, in rank order). A rank left without rows gets one row whose labels are all
    ignored, so it still takes part in the all-reduce while adding nothing."""
    rows = batch["input_ids"].shape[0]
    if rows >= world_size:
        return {k: torch.tensor_split(v, world_size)[rank] for k, v in batch.items()}
    if rank < rows:
        return {k: v[rank:rank + 1] for k, v in batch.items()}
    out = {k: v[:1].clone() for k, v in batch.items()}
    out["labels"].fill_(-100)
    return out


def shard_fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 (`fully_shard`) over each decoder layer, then the rest (embeddings, final
    norm, head) at the root: every parameter becomes a DTensor sharded on dim 0 across
    the ranks, and NanoAdam works on each rank's shard (Note [shard-local masks] in
    optim.py). Gradients are summed over the ranks, not averaged, as under DDP (Note
    [sparse all-reduce]: each rank's loss is already divided by the global tokens)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for m in model.modules():
        if type(m).__name__.endswith("DecoderLayer"):
            fully_shard(m)
    fully_shard(model)
    for m in model.modules():  # each module's own parameter group
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model
