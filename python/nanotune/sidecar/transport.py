"""The transport room: the ROUTER socket, the msgpack codec and the envelopes.

- `Router`: the one ROUTER socket the TS client's DEALER talks to, bound on an
  ipc:// endpoint (tcp://127.0.0.1 as a fallback where ipc is unavailable).
- `Codec`: msgpack encoding of envelopes with tensors sent as raw frames after
  the envelope (tensors.py), and decoding of request envelopes.
- The envelope Structs (protocol/schema.ts `envelope`): Request, Result, Error,
  ErrorBody, Event. A Request's params stay raw bytes here; dispatch.py decodes
  them with the method's params Struct.

Knows nothing about methods, threads or handlers: it imports neither dispatch nor
runtime."""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

import msgspec
import zmq

from ..errors import ErrorCode, NanotuneError, field_of

log = logging.getLogger("nanotune.sidecar")


# ---- envelope -------------------------------------------------------------------


class Request(msgspec.Struct, forbid_unknown_fields=True):
    v: int  # sender's protocol version
    id: int  # request id; the reply carries it back
    method: str
    params: msgspec.Raw = msgspec.Raw(b"\x80")  # absent means {} (0x80: empty msgpack map)


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    data: Any = None
    traceback: str | None = None


class Result(msgspec.Struct):
    id: int
    result: Any


class Error(msgspec.Struct):
    id: int | None
    error: ErrorBody


class Event(msgspec.Struct):
    event: str
    data: Any


class InvalidEnvelope(NanotuneError):
    """A message that is not a valid Request; `request_id` is its id when that could be read."""

    def __init__(self, message: str, request_id: int | None = None):
        super().__init__(ErrorCode.INVALID_REQUEST, message)
        self.request_id = request_id


# ---- codec ----------------------------------------------------------------------


class Codec:
    """msgpack with tensors as frames. Thread-safe: each encode collects its frames in
    a thread-local list, so the I/O, compute and deferred-reply threads share one."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._request_decoder = msgspec.msgpack.Decoder(Request)
        self._any_decoder = msgspec.msgpack.Decoder()

    def _enc_hook(self, obj: Any) -> Any:
        frames = getattr(self._local, "frames", None)
        if frames is not None and type(obj).__module__.split(".")[0] in ("torch", "numpy"):
            if hasattr(obj, "shape") and hasattr(obj, "dtype"):
                from .tensors import tensor_to_frame  # torch: only once a tensor travels

                return tensor_to_frame(obj, frames)
        raise TypeError(f"cannot encode {type(obj).__name__} for the wire")

    def encode(self, msg: Any) -> list[Any]:
        """[envelope, *frames]: torch tensors and numpy arrays in msg (a field typed
        TensorRef) become TensorRefs in the envelope and raw frames after it."""
        self._local.frames = frames = []
        try:
            return [self._encoder.encode(msg), *frames]
        finally:
            self._local.frames = None

    def result(self, rid: int | None, result: Any) -> list[Any]:
        return self.encode(Result(rid, result))

    def error(self, rid: int | None, body: ErrorBody) -> list[Any]:
        return [msgspec.msgpack.encode(Error(rid, body))]

    def event(self, name: str, data: Any) -> list[Any]:
        return self.encode(Event(name, data))

    def decode_request(self, envelope: bytes) -> Request:
        """The Request in `envelope`, or InvalidEnvelope saying what is wrong with it
        (with the request's id when the envelope is a map with a valid id)."""
        try:
            return self._request_decoder.decode(envelope)
        except Exception as e:  # noqa: BLE001  ValidationError, DecodeError, UnicodeDecodeError (bad utf-8), ...
            error = e
        try:
            raw = self._any_decoder.decode(envelope)
        except Exception:  # noqa: BLE001
            raise InvalidEnvelope(f"the envelope is not valid msgpack ({type(error).__name__}: {error})") from None
        if not isinstance(raw, dict):
            raise InvalidEnvelope(
                f"invalid request: the envelope must be a map {{v, id, method, params}}, got {type(raw).__name__}")
        rid = raw.get("id")
        rid = rid if isinstance(rid, int) and not isinstance(rid, bool) and rid >= 0 else None
        where, why = field_of(error, "envelope") if isinstance(error, msgspec.ValidationError) else ("envelope", str(error))
        raise InvalidEnvelope(f"invalid request at {where}: {why}", rid)


# ---- socket ---------------------------------------------------------------------


class Router:
    """The ROUTER socket. Its ZeroMQ context is its own, so that close() can term() it,
    which is what waits for the last replies (shutdown's) to leave; a context shared
    with other threads' sockets could not be term()ed while they hold them. A ZeroMQ
    socket is a single-thread object: only the I/O thread calls recv/send."""

    def __init__(self, endpoint: str):
        self._ctx = zmq.Context()
        self.socket = self._ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 1000)
        # A ROUTER drops what it cannot queue for a peer, silently, once the peer's pipe
        # holds SNDHWM messages (default 1000): a client that sends 2000 calls before
        # reading would lose replies. No limit: every reply waits until it is read.
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.endpoint = self._bind(endpoint)

    def _bind(self, endpoint: str) -> str:
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError as e:
            if not endpoint.startswith("ipc://"):
                raise
            log.warning("cannot bind %s (%s); falling back to tcp://127.0.0.1", endpoint, e)
            endpoint = "tcp://127.0.0.1:*"
            self.socket.bind(endpoint)
        return self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()

    def recv(self) -> list[Any]:
        """[identity, envelope, *frames] as zmq.Frames (no copy)."""
        return self.socket.recv_multipart(copy=False)

    def has_more(self) -> bool:
        # ZMQ_EVENTS is cheaper than a NOBLOCK recv that raises zmq.Again (several us on ping)
        return bool(self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def send(self, identity: Any, parts: list[Any]) -> None:
        self.socket.send_multipart([identity, *parts], copy=False)

    def close(self) -> None:
        """Closes the socket, waits up to 1 s for queued replies, removes the ipc socket file."""
        self.socket.close(linger=1000)
        self._ctx.term()
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except OSError:
                pass
