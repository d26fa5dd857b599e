"""The dispatch room: the method registry, params validation, and the Context that
handlers receive.

A method is a function `(ctx, params) -> result` registered under its wire name.
Its params Struct, result Struct and thread come from the schema
(protocol/schema.ts, generated into nanotune.wire.METHODS), so a handler cannot
disagree with it:

    from nanotune import wire
    from nanotune.sidecar.dispatch import Context, method

    @method("debug.busy")
    def debug_busy(ctx: Context, p: wire.DebugBusyParams) -> wire.DebugBusyResult:
        for i in range(...):
            ctx.check_cancelled()    # raises Cancelled once cancel/abort arrived
            ctx.emit("debug:tick", wire.DebugTick(iteration=i, elapsed_s=...))
        return wire.DebugBusyResult(...)

Params are decoded and validated against the schema (types, ranges, enums,
required and unknown fields) before the handler runs; a mismatch is an
INVALID_PARAMS error naming the field. A handler reports bad input by raising a
NanotuneError (errors.py); the runtime replies with its code, message and data.

Adding a method: add it to protocol/schema.ts, run `npm run protocol:generate`,
then write its handler in a module of nanotune.methods (every module there is
imported when the sidecar starts, as are the modules named in
NANOTUNE_SIDECAR_MODULES, comma separated). `unhandled()` lists schema methods
without a handler; the sidecar refuses to start while there is one.

Imports: this module knows the wire types and the errors, not the runtime nor the
transport; the runtime builds each Context and passes in what it needs (`emit`,
`control`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import msgspec

from .. import wire
from ..errors import ErrorCode, NanotuneError, field_of

Handler = Callable[["Context", Any], Any]


class Cancelled(BaseException):
    """Raised inside a compute call once it was cancelled. A BaseException so a
    handler's `except Exception` does not swallow it (like KeyboardInterrupt): it is
    control flow, not an error."""


@dataclass(frozen=True)
class Method:
    name: str
    fn: Handler
    params: type[msgspec.Struct]
    result: type[msgspec.Struct] | None
    thread: Literal["io", "compute"]  # "io": answered inline by the I/O thread (must be quick)
    decoder: msgspec.msgpack.Decoder = field(repr=False, compare=False)
    lockstep: bool = False  # in a sidecar group, runs on every rank (Note [lockstep calls] in distributed.py)


METHODS: dict[str, Method] = {}  # the registered handlers
EVENTS: dict[str, type[msgspec.Struct]] = dict(wire.EVENTS)  # event name -> data Struct


def method(
    name: str,
    *,
    params: type[msgspec.Struct] | None = None,
    result: type[msgspec.Struct] | None = None,
    thread: Literal["io", "compute"] | None = None,
    lockstep: bool = False,
) -> Callable[[Handler], Handler]:
    """Registers `fn(ctx, params)` as the handler of wire method `name`.

    For a method of the schema (nanotune.wire.METHODS), params, result and thread
    come from the schema and must not be given. A method outside the schema (an
    extension loaded through NANOTUNE_SIDECAR_MODULES, which clients call untyped)
    must give `params` (a msgspec Struct); its thread defaults to "compute".
    `thread="io"` methods run on the I/O thread and must return in microseconds.
    `lockstep=True` (compute methods): in a sidecar group every rank runs the call
    (Note [lockstep calls] in distributed.py); otherwise rank 0 alone does."""
    spec = wire.METHODS.get(name)
    if spec is not None:
        if params is not None or result is not None or thread is not None:
            raise TypeError(f"sidecar method {name!r} is in protocol/schema.ts: its params, result and thread come "
                            "from there (nanotune.wire.METHODS); do not pass them to @method")
        params, result, thread = spec.params, spec.result, spec.thread
    elif params is None:
        raise TypeError(f"sidecar method {name!r} is not in protocol/schema.ts: add it there (and run "
                        "`npm run protocol:generate`), or pass params= for a method outside the schema")
    resolved_params: type[msgspec.Struct] = params
    resolved_thread: Literal["io", "compute"] = thread or "compute"

    def register(fn: Handler) -> Handler:
        if name in METHODS:
            raise ValueError(f"sidecar method {name!r} has two handlers ({METHODS[name].fn.__module__} and "
                             f"{fn.__module__})")
        if lockstep and resolved_thread != "compute":
            raise TypeError(f"sidecar method {name!r}: only compute methods run in lockstep")
        METHODS[name] = Method(name, fn, resolved_params, result, resolved_thread,
                               msgspec.msgpack.Decoder(resolved_params), lockstep)
        return fn

    return register


def event(name: str) -> Callable[[type[msgspec.Struct]], type[msgspec.Struct]]:
    """Registers the data Struct of an event outside the schema (schema events are in
    EVENTS already, with their wire Struct)."""

    def register(cls: type[msgspec.Struct]) -> type[msgspec.Struct]:
        if name in wire.EVENTS and wire.EVENTS[name] is not cls:
            raise TypeError(f"event {name!r} is in protocol/schema.ts: its data is nanotune.wire.{wire.EVENTS[name].__name__}")
        EVENTS[name] = cls
        return cls

    return register


def unhandled() -> list[str]:
    """Schema methods that no loaded module handles (each has at most one: a second
    registration raises)."""
    return sorted(set(wire.METHODS) - set(METHODS))


# Decoders for every schema method, so a compute call's params are checked when it
# arrives, even before the warm-up has imported its handler's module.
_SCHEMA_DECODERS = {name: msgspec.msgpack.Decoder(spec.params) for name, spec in wire.METHODS.items()}


def decode_params(name: str, raw: bytes) -> Any:
    """The params of a call to `name` decoded with its Struct, or an INVALID_PARAMS
    NanotuneError naming the field ("params.seconds"). KeyError when `name` is neither
    a schema method nor a registered one."""
    m = METHODS.get(name)
    decoder = m.decoder if m is not None else _SCHEMA_DECODERS[name]
    try:
        return decoder.decode(raw)
    except Exception as e:  # noqa: BLE001  ValidationError, DecodeError, UnicodeDecodeError (bad utf-8), ...
        where, why = field_of(e, "params")
        raise NanotuneError(ErrorCode.INVALID_PARAMS, f"{name}: invalid params at {where}: {why}",
                            {"field": where}) from None


def knows(name: str) -> bool:
    """Whether calls to `name` can be decoded now (a schema method or a registered one)."""
    return name in METHODS or name in _SCHEMA_DECODERS


def thread_of(name: str) -> Literal["io", "compute"]:
    m = METHODS.get(name)
    if m is not None:
        return m.thread
    spec = wire.METHODS.get(name)
    return spec.thread if spec is not None else "compute"


# ---- what handlers get ----------------------------------------------------------


class State:
    """What lives between calls: the model, optimizer, data... Attributes are added by
    the methods that own them (`ctx.state.session = ...`); unset ones read as None."""

    def __init__(self, device: str = "cpu", dtype: str = "float32"):
        self.device = device  # torch device string chosen at start ("cpu", "cuda:0")
        self.dtype = dtype  # default parameter dtype on that device
        self.debug: dict[str, Any] = {}  # debug.store's values

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


@dataclass(frozen=True)
class Warmup:
    """What the warm-up found: torch's version and the CUDA device (None on cpu)."""

    torch: str
    cuda: wire.CudaInfo | None


class Control(Protocol):
    """The runtime as the control-plane handlers (builtin.py) see it."""

    def is_ready(self) -> bool:
        """Whether the warm-up (import torch, pick the device, load method modules) is done."""

    def warmup(self) -> Warmup:
        """Blocks until the warm-up is done; raises an INTERNAL NanotuneError if it failed."""

    def status(self) -> wire.StatusResult: ...

    def cancel(self, request_id: int | None) -> wire.CancelResult:
        """Cancels the running compute call (only if its id is request_id, when given)."""

    def shutdown(self) -> None:
        """Exit after this reply is sent."""

    def transport(self) -> tuple[Literal["ipc", "tcp"], Literal["ipc-private-dir", "curve"]]:
        """What the ROUTER is bound on and what keeps strangers out (hello reports it)."""


@dataclass(frozen=True)
class Deferred:
    """What an "io" handler returns when its answer must wait (hello before the
    warm-up is done): the runtime runs fn() on a helper thread, which replies with
    its result (or error), and the I/O thread goes on serving meanwhile."""

    fn: Callable[[], Any]


class Context:
    """Handed to every handler: the shared state, cancellation, events, tensor frames,
    and (for the control plane) the runtime's narrow `control` interface."""

    __slots__ = ("state", "id", "method", "frames", "cancelled", "control", "_emit")

    def __init__(self, state: State, request_id: int, method: str, frames: list[Any],
                 emit: Callable[[str, Any], None], control: Control):
        self.state = state
        self.id = request_id
        self.method = method
        self.frames = frames  # raw frames after the envelope (zmq.Frame)
        # Set by the runtime's cancel (the client's cancel call, AbortSignal or timeout)
        # on the I/O thread, read here: a plain bool, as an Event per request costs
        # 1.5 us on ping.
        self.cancelled = False
        self.control = control
        self._emit = emit

    def check_cancelled(self) -> None:
        """Raises Cancelled if this call was cancelled. Call it between units of work
        (each step, each batch); it costs one attribute read."""
        if self.cancelled:
            raise Cancelled()

    def emit(self, name: str, data: msgspec.Struct | dict[str, Any]) -> None:
        """Sends the event `{event: name, data}` to the caller now (not after the call)."""
        cls = EVENTS.get(name)
        if cls is None:
            raise ValueError(f"event {name!r} is not in protocol/schema.ts (nor registered with @event)")
        if not isinstance(data, cls):
            data = msgspec.convert(data, cls)
        self._emit(name, data)

    def tensor(self, ref: wire.TensorRef, field: str = "tensor") -> Any:
        """The torch tensor that `ref` (a TensorRef from params) describes, a zero-copy,
        read-only view of its frame. Clone it before writing to it."""
        from .tensors import tensor_from_frame  # torch: only once a tensor travels

        return tensor_from_frame(ref, self.frames, f"{self.method}: params.{field}")
