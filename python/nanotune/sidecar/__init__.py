"""The nanotune sidecar: serves the protocol in protocol/ over ZeroMQ (see server.py).

Public names for method modules: `method`, `event`, `Context`, `Model`, `TensorRef`,
`SidecarError`, `ErrorCode`, `Cancelled`, `PROTOCOL_VERSION` (see registry.py)."""
from .protocol import PROTOCOL_VERSION, ErrorCode, Model, TensorRef
from .registry import EVENTS, METHODS, Cancelled, Context, SidecarError, State, event, method

__all__ = ["PROTOCOL_VERSION", "ErrorCode", "Model", "TensorRef", "EVENTS", "METHODS", "Cancelled", "Context",
           "SidecarError", "State", "event", "method"]
