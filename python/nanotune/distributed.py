"""A sidecar group: one sidecar per rank, launched by torchrun, driven through rank 0.

    python -m torch.distributed.run --nproc-per-node 2 --standalone -m nanotune.sidecar ...

Every rank runs `python -m nanotune.sidecar`; torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) makes it a group member
(:func:`from_env`). Rank 0 binds the socket and speaks the protocol; the other
ranks bind nothing and follow (:func:`follow`).

Note [lockstep calls]: a training method (a Session method) sent to rank 0 runs on
every rank. Rank 0's compute thread broadcasts the call (method, decoded params)
on the control group, a gloo group of its own, so a broadcast never queues behind
the default group's gradient traffic (nccl on CUDA); every rank then runs the same
Session method, whose collectives (DDP's all-reduce, FSDP's gathers, the loss sum,
DCP) meet because every rank makes them in the same order. After the call the
ranks agree on the outcome (an all-gather of "ok" or the error): when any rank
failed, the client gets that rank's error, named ("rank 1: ..."). When some ranks
failed and others did not, their sessions may differ (one loaded a dataset, the
other could not read it), and the next collective could wait forever; so the group
is then marked diverged and refuses every call but load_model, which starts every
rank's run afresh. Results need no merging: a Session in a group returns the same
result on every rank (train_step all-reduces the loss, sums tokens over ranks and
takes the slowest rank's time), and rank 0's goes back to the client.

Other methods (debug.*, the control plane) run on rank 0 alone. Cancellation in a
group is cooperative only: a call that has not started is cancelled on every rank;
a running one finishes (an asynchronous exception on rank 0 alone would leave the
other ranks waiting in a collective).

Note [losing a rank]: rank 0's I/O thread watches the other ranks of its own host
by pid (every PARENT_POLL_S); when one is gone it sends the event rank:lost {rank,
host, pid, reason} and exits, and torchrun takes the rest of the group down. A
rank on another host that dies shows as a failed collective in the running call
(gloo reports the closed connection at once), which is answered as an error naming
the group; and every rank exits when the parent process (--parent-pid) is gone.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .processes import pid_alive

log = logging.getLogger("nanotune.sidecar")

__all__ = ["Group", "Outcome", "from_env", "launched_by_torchrun"]

# How long a collective may wait before the group gives up on a rank (gloo's and
# nccl's own default is 30 minutes, far longer than anyone waits for a step).
COLLECTIVE_TIMEOUT_S = float(os.environ.get("NANOTUNE_COLLECTIVE_TIMEOUT_S", "600"))


# Lockstep methods that leave every rank's session as it was, even when they fail on
# some ranks only: such a failure does not make the group diverge.
READ_ONLY = frozenset({"save_checkpoint", "evaluate", "generate", "get_masks", "sample_weights"})


def launched_by_torchrun() -> bool:
    """Whether this process is a torchrun worker (torchrun sets these for every rank)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


@dataclass
class Outcome:
    """One rank's outcome of a lockstep call: None error = ok."""

    rank: int
    error: dict[str, Any] | None = None  # {code, message, data} of a NanotuneError, or {type, message}


@dataclass
class Group:
    """This process's place in the group, and the collectives the runtime uses."""

    rank: int
    world_size: int
    local_rank: int
    nnodes: int
    backend: str
    device: str  # this rank's device: "cpu" or "cuda:<local rank>"
    control: Any = None  # the gloo process group of Note [lockstep calls]
    ranks: list[dict[str, Any]] = field(default_factory=list)  # every rank's {rank, localRank, host, pid, device}
    diverged: str | None = None  # why the ranks' sessions may differ (Note [lockstep calls])

    # ---- collectives on the control group ---------------------------------

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (pickled through the gloo control group)."""
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.control)

    def refuse_if_diverged(self, method: str) -> None:
        """Note [lockstep calls]: after ranks disagreed, only load_model runs."""
        if self.diverged is not None and method != "load_model":
            from .errors import ErrorCode, NanotuneError

            raise NanotuneError(ErrorCode.INVALID_PARAMS,
                                f"{method}: the sidecar group's ranks no longer hold the same run ({self.diverged}); "
                                "call load_model to start afresh on every rank", {"field": "model"})

    def agree(self, error: BaseException | None) -> list[Outcome]:
        """Every rank's outcome of the call just run (Note [lockstep calls])."""
        return self.all_gather(Outcome(self.rank, None if error is None else describe(error)))

    # ---- data parallel helpers ---------------------------------------------

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums floats over the ranks (fp64 on the CPU, through the control group)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.control)
        return t.tolist()

    def all_reduce_max(self, value: float) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return float(t.item())

    def info(self) -> dict[str, Any]:
        return {"worldSize": self.world_size, "nnodes": self.nnodes, "backend": self.backend, "ranks": self.ranks}


def settle(group: Group, method: str, outcomes: list[Outcome], error: BaseException | None) -> BaseException | None:
    """The error of a lockstep call as the client should see it (this rank's own, else
    the first failed rank's, named), and the group's divergence state after it. The
    same on every rank: it depends on the outcomes alone (and this rank's own error)."""
    from .errors import ErrorCode, NanotuneError

    failed = [o for o in outcomes if o.error is not None]
    if failed and len(failed) < len(outcomes) and method not in READ_ONLY:
        group.diverged = f"{method} failed on rank {failed[0].rank} only"
    elif not failed and method == "load_model":
        group.diverged = None
    if error is not None or not failed:
        return error
    first = failed[0]
    e = first.error
    code = e.get("code") or ErrorCode.INTERNAL
    message = e["message"] if "code" in e else f"{e['type']}: {e['message']}"
    message = message.removeprefix(f"{method}: ")
    return NanotuneError(code, f"{method}: rank {first.rank}: {message}",
                         e.get("data") if isinstance(e.get("data"), dict) else {"rank": first.rank})


def describe(e: BaseException) -> dict[str, Any]:
    from .errors import NanotuneError

    if isinstance(e, NanotuneError):
        return {"code": str(e.code), "message": e.message, "data": e.data}
    return {"type": type(e).__name__, "message": str(e)}


def from_env(device_request: str = "auto", backend: str | None = None) -> Group:
    """Joins the torchrun group this process was launched into: the default process
    group (gloo on CPU, nccl on CUDA unless `backend` says otherwise) and a gloo
    control group; every rank learns every rank's host, pid and device."""
    import torch
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    want_cuda = device_request.startswith("cuda") or (device_request == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device_request}: torch sees no CUDA device on rank {rank}")
        device = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    else:
        device = "cpu"
    backend = backend or ("nccl" if want_cuda else "gloo")
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    kwargs = {"device_id": torch.device(device)} if want_cuda and backend == "nccl" else {}
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    group = Group(rank=rank, world_size=world, local_rank=local, nnodes=max(1, world // max(1, local_world)),
                  backend=backend, device=device, control=control)
    me = {"rank": rank, "localRank": local, "host": socket.gethostname(), "pid": os.getpid(), "device": device}
    group.ranks = sorted(group.all_gather(me), key=lambda r: r["rank"])
    return group


def watch_parent(parent_pid: int | None) -> None:
    """A follower's main thread sits in a collective; this thread ends the process
    when the parent (the client, --parent-pid) is gone."""
    if parent_pid is None:
        return

    def run() -> None:
        while True:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                log.warning("rank follower: parent process %d is gone; exiting", parent_pid)
                sys.stderr.flush()
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(0.2)

    threading.Thread(target=run, name="nanotune-parent-watch", daemon=True).start()


def lost_local_rank(group: Group) -> dict[str, Any] | None:
    """The first rank of this host whose process is gone (Note [losing a rank])."""
    host = socket.gethostname()
    for r in group.ranks:
        if r["rank"] != group.rank and r["host"] == host and not pid_alive(r["pid"]):
            return r
    return None
