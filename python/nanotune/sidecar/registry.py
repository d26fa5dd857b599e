"""The method registry and the per-call context that handlers receive.

A method is a function `(ctx, params) -> result` registered under its wire name:

    from nanotune.sidecar import Model, method, event, SidecarError, ErrorCode

    class TrainStep(Model):          # an event's data; name it in protocol/schema.ts too
        step: int
        loss: float

    event("train:step")(TrainStep)

    class TrainParams(Model):
        steps: int
        lr: float | None = None

    class TrainResult(Model):
        steps: int

    @method("train", params=TrainParams, result=TrainResult)   # thread="compute" by default
    def train(ctx, p: TrainParams) -> TrainResult:
        model = ctx.state.model      # shared between calls; None until someone sets it
        for i in range(p.steps):
            ctx.check_cancelled()    # raises Cancelled once cancel/abort arrived
            ...
            ctx.emit("train:step", TrainStep(step=i, loss=0.0))
        return TrainResult(steps=p.steps)

Modules that register methods are imported when the sidecar starts: every module
of the package `nanotune.methods` (python/nanotune/methods/*.py) if it exists, and
the modules named in NANOTUNE_SIDECAR_MODULES (comma separated).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

import msgspec

from .protocol import ErrorCode, Model

if TYPE_CHECKING:
    from .server import Server


class SidecarError(Exception):
    """An error with a protocol code; the reply carries code, message and data."""

    def __init__(self, code: str, message: str, data: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class Cancelled(BaseException):
    """Raised inside a compute call once it was cancelled. A BaseException so a
    handler's `except Exception` does not swallow it (like KeyboardInterrupt)."""


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[["Context", Any], Any]
    params: type[msgspec.Struct]
    result: type[msgspec.Struct] | None
    thread: Literal["io", "compute"]  # "io": answered inline by the I/O thread (must be quick)
    decoder: msgspec.msgpack.Decoder = field(repr=False, compare=False)


METHODS: dict[str, Method] = {}
DEFERRED = object()  # an "io" handler's return value when another thread replies (Server.defer)
EVENTS: dict[str, type[msgspec.Struct]] = {}


def method(
    name: str,
    *,
    params: type[msgspec.Struct],
    result: type[msgspec.Struct] | None = None,
    thread: Literal["io", "compute"] = "compute",
) -> Callable[[Callable[["Context", Any], Any]], Callable[["Context", Any], Any]]:
    """Registers `fn(ctx, params)` as the wire method `name`. Params are decoded and
    validated against `params` (a msgspec Struct) before fn runs; a mismatch is an
    INVALID_PARAMS error naming the field. `thread="io"` methods run on the I/O thread
    and must return in microseconds; everything else runs on the compute thread."""

    def register(fn: Callable[["Context", Any], Any]) -> Callable[["Context", Any], Any]:
        if name in METHODS:
            raise ValueError(f"sidecar method {name!r} is registered twice ({METHODS[name].fn.__module__} and {fn.__module__})")
        METHODS[name] = Method(name, fn, params, result, thread, msgspec.msgpack.Decoder(params))
        return fn

    return register


def event(name: str) -> Callable[[type[msgspec.Struct]], type[msgspec.Struct]]:
    """Registers the data Struct of event `name` (used by ctx.emit to check the data)."""

    def register(cls: type[msgspec.Struct]) -> type[msgspec.Struct]:
        EVENTS[name] = cls
        return cls

    return register


class State:
    """What lives between calls: the model, optimizer, data... Attributes are added by
    the methods that own them (`ctx.state.model = ...`); unset ones read as None."""

    def __init__(self, device: str = "cpu", dtype: str = "float32"):
        self.device = device  # torch device string chosen at start ("cpu", "cuda:0")
        self.dtype = dtype  # default parameter dtype on that device
        self.debug: dict[str, Any] = {}  # debug.store's values

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class Context:
    """Handed to every handler: the shared state, cancellation, events, tensor frames."""

    def __init__(self, server: "Server", request_id: int, method: str, identity: bytes, frames: list[Any]):
        self.server = server
        self.state: State = server.state
        self.id = request_id
        self.method = method
        self.identity = identity  # the ZeroMQ routing id of the caller (events go there)
        self.frames = frames  # raw frames after the envelope (zmq.Frame)
        self.started = time.monotonic()
        # Set by `cancel` (the client's cancel call, AbortSignal or timeout) on the I/O
        # thread, read here: a plain bool, as an Event per request costs 1.5 us on ping.
        self.cancelled = False

    def check_cancelled(self) -> None:
        """Raises Cancelled if this call was cancelled. Call it between units of work
        (each step, each batch); it costs one Event.is_set()."""
        if self.cancelled:
            raise Cancelled()

    def emit(self, name: str, data: msgspec.Struct | dict[str, Any]) -> None:
        """Sends the event `{event: name, data}` to the caller now (not after the call)."""
        cls = EVENTS.get(name)
        if cls is None:
            raise ValueError(f"event {name!r} is not registered; add it to protocol/schema.ts and register its Struct with @event")
        if not isinstance(data, cls):
            data = msgspec.convert(data, cls)
        self.server.send_event(self.identity, name, data)

    def tensor(self, ref: Any, field: str = "tensor"):
        """The torch tensor that `ref` (a TensorRef from params) describes, a zero-copy,
        read-only view of its frame. Clone it before writing to it."""
        from .tensors import tensor_from_frame

        return tensor_from_frame(ref, self.frames, f"{self.method}: params.{field}")


def invalid_params(method: str, field: str, message: str) -> SidecarError:
    return SidecarError(ErrorCode.INVALID_PARAMS, f"{method}: invalid params at {field}: {message}", {"field": field})
