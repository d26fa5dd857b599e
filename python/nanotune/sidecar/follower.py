"""The ranks of a sidecar group other than 0 (Note [lockstep calls] in
nanotune.distributed): no socket, no stdout; each runs the lockstep calls rank 0
broadcasts, with the same handlers and a Session of its own."""

from __future__ import annotations

import importlib

from ..distributed import Group, settle, watch_parent
from . import dispatch
from .dispatch import Context, State

__all__ = ["follow"]


def follow(group: Group, parent_pid: int | None, modules: list[str]) -> None:
    """A rank other than 0: runs each lockstep call rank 0 broadcasts, until told to
    stop (Note [lockstep calls]); exits with the parent or when rank 0 is gone.
    modules: the handler modules to import (the runtime's list, from __main__)."""
    watch_parent(parent_pid)
    for name in modules:
        importlib.import_module(name)
    import torch

    from ..models import default_dtype

    state = State(device=group.device, dtype=str(default_dtype(torch.device(group.device))).removeprefix("torch."))
    state.group = group
    while True:
        cmd = group.broadcast()
        if cmd[0] == "shutdown":
            return
        _, method, params = cmd
        ctx = Context(state, 0, method, [], lambda name, data: None, None)
        error = None
        try:
            group.refuse_if_diverged(method)
            dispatch.METHODS[method].fn(ctx, params)
        except Exception as e:  # noqa: BLE001  reported through agree(), like rank 0's
            error = e
        settle(group, method, group.agree(error), error)
