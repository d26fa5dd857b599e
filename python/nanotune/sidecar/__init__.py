"""The nanotune sidecar: serves the protocol of protocol/schema.ts over ZeroMQ.

Rooms, each with one job (imports run one way: runtime -> transport, dispatch;
handler modules -> dispatch; nothing imports runtime but __main__):
- transport.py (+ tensors.py): the ROUTER socket, the msgpack codec, tensor
  frames, the envelope Structs.
- dispatch.py: the method registry (`method`), params validation, and the
  `Context` handlers receive.
- runtime.py: the threads, cancellation, warm-up, parent watch, status; main().
- builtin.py: the control-plane and debug.* handlers; nanotune/methods/*: the
  training handlers.

Handler modules need only dispatch: `method`, `Context`, `Cancelled`; the wire
types are in nanotune.wire and the error class in nanotune.errors."""
from ..errors import NanotuneError, SidecarError
from .dispatch import EVENTS, METHODS, Cancelled, Context, State, event, method

__all__ = ["EVENTS", "METHODS", "Cancelled", "Context", "NanotuneError", "SidecarError", "State", "event", "method"]
