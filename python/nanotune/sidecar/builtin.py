"""The built-in methods: the control plane (hello, ping, status, cancel, shutdown),
answered by the I/O thread, and diagnostics (debug.*) used by tests and bench/bridge."""
from __future__ import annotations

import os
import platform
import time

from .. import __version__
from . import protocol as P
from .protocol import ErrorCode
from .registry import METHODS, Context, SidecarError, event, method

event("debug:tick")(P.DebugTick)


@method("hello", params=P.HelloParams, result=P.HelloResult, thread="io")
def hello(ctx: Context, p: P.HelloParams):
    if p.protocol != P.PROTOCOL_VERSION:
        raise SidecarError(
            ErrorCode.PROTOCOL_MISMATCH,
            f"hello: the client speaks protocol v{p.protocol} but this sidecar (nanotune {__version__}) speaks "
            f"v{P.PROTOCOL_VERSION}; install matching versions of the nanotune npm and Python packages",
            {"client": p.protocol, "sidecar": P.PROTOCOL_VERSION},
        )
    server = ctx.server

    def answer() -> P.HelloResult:
        server.ready.wait()
        if server.warmup_error is not None:
            raise SidecarError(ErrorCode.INTERNAL, f"hello: the sidecar failed to start: {server.warmup_error}")
        return P.HelloResult(
            protocol=P.PROTOCOL_VERSION,
            sidecar=__version__,
            python=platform.python_version(),
            torch=server.torch_version,
            pid=os.getpid(),
            device=ctx.state.device,
            dtype=ctx.state.dtype,
            cuda=server.cuda_info,
            methods=sorted(METHODS),
        )

    return answer() if server.ready.is_set() else server.defer(ctx, answer)


@method("ping", params=P.Empty, result=P.Empty, thread="io")
def ping(ctx: Context, p: P.Empty):
    return P.Empty()


@method("status", params=P.Empty, result=P.StatusResult, thread="io")
def status(ctx: Context, p: P.Empty):
    return ctx.server.status()


@method("cancel", params=P.CancelParams, result=P.CancelResult, thread="io")
def cancel(ctx: Context, p: P.CancelParams):
    return ctx.server.cancel(p.id)


@method("shutdown", params=P.Empty, result=P.Empty, thread="io")
def shutdown(ctx: Context, p: P.Empty):
    ctx.server.stopping = True  # the I/O loop sends this reply, then exits
    return P.Empty()


@method("debug.busy", params=P.DebugBusyParams, result=P.DebugBusyResult)
def debug_busy(ctx: Context, p: P.DebugBusyParams):
    """Diagnostic: small matmuls for p.seconds, the shape of a training loop."""
    import torch

    a = torch.randn(64, 64)
    t0 = time.monotonic()
    next_tick = t0 + p.tick_every_s if p.tick_every_s else float("inf")
    i = 0
    while (now := time.monotonic()) - t0 < p.seconds:
        if p.cooperative is not False:
            ctx.check_cancelled()
        a = torch.tanh(a @ a)
        i += 1
        if now >= next_tick:
            ctx.emit("debug:tick", P.DebugTick(iteration=i, elapsed_s=now - t0))
            next_tick += p.tick_every_s
    return P.DebugBusyResult(iterations=i, seconds=time.monotonic() - t0)


@method("debug.echo", params=P.DebugEchoParams, result=P.DebugEchoResult, thread="io")
def debug_echo(ctx: Context, p: P.DebugEchoParams):
    def answer() -> P.DebugEchoResult:
        tensor = ctx.tensor(p.tensor) if p.tensor is not None else None
        return P.DebugEchoResult(value=p.value, tensor=tensor)

    if p.tensor is not None and not ctx.server.ready.is_set():
        # torch is still being imported by the warm-up; do not block the I/O thread on it
        return ctx.server.defer(ctx, lambda: (ctx.server.ready.wait(), answer())[1])
    return answer()


@method("debug.store", params=P.DebugStoreParams, result=P.DebugStoreResult)
def debug_store(ctx: Context, p: P.DebugStoreParams):
    previous = ctx.state.debug.get(p.key)
    ctx.state.debug[p.key] = p.value
    return P.DebugStoreResult(previous=previous)
