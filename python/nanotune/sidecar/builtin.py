"""The built-in methods: the control plane (hello, ping, status, cancel, shutdown),
answered by the I/O thread, and diagnostics (debug.*) used by tests and bench/bridge.

A handler module like any other: it sees the runtime only through `ctx.control`
(dispatch.Control). Imports no torch at module level, so the runtime loads it
before the warm-up and answers hello at once."""
from __future__ import annotations

import os
import platform
import time

import msgspec

from .. import __version__, wire
from ..errors import ErrorCode, NanotuneError
from .dispatch import METHODS, Context, Deferred, method


@method("hello")
def hello(ctx: Context, p: wire.HelloParams):
    if p.protocol != wire.PROTOCOL_VERSION:
        raise NanotuneError(
            ErrorCode.PROTOCOL_MISMATCH,
            f"hello: the client speaks protocol v{p.protocol} but this sidecar (nanotune {__version__}) speaks "
            f"v{wire.PROTOCOL_VERSION}; install matching versions of the nanotune npm and Python packages",
            {"client": p.protocol, "sidecar": wire.PROTOCOL_VERSION},
        )

    def answer() -> wire.HelloResult:
        w = ctx.control.warmup()
        transport, security = ctx.control.transport()
        return wire.HelloResult(
            protocol=wire.PROTOCOL_VERSION,
            sidecar=__version__,
            python=platform.python_version(),
            torch=w.torch,
            pid=os.getpid(),
            device=ctx.state.device,
            dtype=ctx.state.dtype,
            cuda=w.cuda,
            methods=sorted(METHODS),
            transport=transport,
            security=security,
            distributed=None if ctx.state.group is None else msgspec.convert(ctx.state.group.info(),
                                                                             wire.DistributedInfo),
        )

    return answer() if ctx.control.is_ready() else Deferred(answer)


@method("ping")
def ping(ctx: Context, p: wire.PingParams):
    return wire.PingResult()


@method("status")
def status(ctx: Context, p: wire.StatusParams):
    return ctx.control.status()


@method("cancel")
def cancel(ctx: Context, p: wire.CancelParams):
    return ctx.control.cancel(p.id)


@method("shutdown")
def shutdown(ctx: Context, p: wire.ShutdownParams):
    ctx.control.shutdown()  # the I/O loop sends this reply, then exits
    return wire.ShutdownResult()


@method("debug.busy")
def debug_busy(ctx: Context, p: wire.DebugBusyParams):
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
            ctx.emit("debug:tick", wire.DebugTick(iteration=i, elapsed_s=now - t0))
            next_tick += p.tick_every_s
    return wire.DebugBusyResult(iterations=i, seconds=time.monotonic() - t0)


@method("debug.echo")
def debug_echo(ctx: Context, p: wire.DebugEchoParams):
    def answer() -> wire.DebugEchoResult:
        # A result field typed TensorRef may hold a torch.Tensor: the codec sends its
        # bytes as a frame and writes the TensorRef.
        tensor = ctx.tensor(p.tensor) if p.tensor is not None else None
        return wire.DebugEchoResult(value=p.value, tensor=tensor)

    if p.tensor is not None and not ctx.control.is_ready():
        # torch is still being imported by the warm-up; do not block the I/O thread on it
        return Deferred(lambda: (ctx.control.warmup(), answer())[1])
    return answer()


@method("debug.store")
def debug_store(ctx: Context, p: wire.DebugStoreParams):
    previous = ctx.state.debug.get(p.key)
    ctx.state.debug[p.key] = p.value
    return wire.DebugStoreResult(previous=previous)
