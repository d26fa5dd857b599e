"""The transport room: the ROUTER socket, the msgpack codec and the envelopes.

- `Router`: the one ROUTER socket the TS client's DEALER talks to, bound on an
  ipc:// endpoint in a private (0700) directory, or on tcp://127.0.0.1 as a
  CURVE server that lets in only our client's key (`CurveKeys`, `Router.answer_zap`).
  Note [transport security].
- `Codec`: msgpack encoding of envelopes with tensors sent as raw frames after
  the envelope (tensors.py), and decoding of request envelopes.
- `scan_request_id`: the request id of an envelope that does not decode, read by a
  shallow, non-recursive scan of its top-level map, so that every request whose id
  can be read gets its reply (Note [no lost replies]).
- The envelope Structs (protocol/schema.ts `envelope`): Request, Result, Error,
  ErrorBody, Event. A Request's params stay raw bytes here; dispatch.py decodes
  them with the method's params Struct.

Knows nothing about methods, threads or handlers: it imports neither dispatch nor
runtime."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import zmq
from zmq.utils import z85

from ..errors import ErrorCode, NanotuneError, field_of

log = logging.getLogger("nanotune.sidecar")


# ---- envelope -------------------------------------------------------------------


class Request(msgspec.Struct, forbid_unknown_fields=True):
    v: int  # sender's protocol version
    id: Annotated[int, msgspec.Meta(ge=0)]  # request id (uint, as in the schema); the reply carries it back
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
        (with the request's id whenever the envelope's top-level map holds a valid one,
        however broken the rest is: Note [no lost replies])."""
        try:
            return self._request_decoder.decode(envelope)
        except Exception as e:  # noqa: BLE001  ValidationError, DecodeError, RecursionError, UnicodeDecodeError, ...
            error = e
        top, rid = scan_request_id(envelope)
        if top is None:
            raise InvalidEnvelope(f"the envelope is not valid msgpack ({type(error).__name__}: {error})") from None
        if top != "map":
            raise InvalidEnvelope(f"invalid request: the envelope must be a map {{v, id, method, params}}, got {top}")
        if isinstance(error, RecursionError):
            raise InvalidEnvelope("invalid request: the envelope is nested deeper than the sidecar decodes "
                                  "(Python's recursion limit, about 1000 levels)", rid)
        if isinstance(error, msgspec.ValidationError):
            where, why = field_of(error, "envelope")
            raise InvalidEnvelope(f"invalid request at {where}: {why}", rid)
        raise InvalidEnvelope(
            f"invalid request: the envelope is not valid msgpack ({type(error).__name__}: {error})", rid)


# Note [no lost replies]
# ~~~~~~~~~~~~~~~~~~~~~~
# A request the sidecar cannot decode still gets a reply, and the reply carries the
# request's id whenever the top-level map of the envelope is readable: the client
# pairs replies with calls by id, and a reply with id null pairs with nothing, so the
# call would wait forever. msgspec stops at the first error (a params map nested 10^5
# deep, bad utf-8 in a string, a truncated tail) and a full decode of the same bytes
# fails the same way, so the id is read by `scan_request_id`: it walks the entries of
# the top-level map, reads the key "id" and its integer, and skips every other value
# with a counter of items still to skip (no recursion: depth costs nothing). Each
# item consumes at least one byte, so the scan is O(len(envelope)) whatever the
# headers claim. The TS client covers the rest (docs/protocol.md "No hanging call"):
# it refuses params nested deeper than MAX_PARAMS_DEPTH, and it rejects a compute
# call that `status` says is not running once no reply came for it.

_FIXED = {  # type byte -> bytes that follow it, for fixed-size values
    0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,
    0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,  # fixext 1/2/4/8/16: type byte + data
}
_SIZED = {  # type byte -> (bytes of the length, extra bytes after it)
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),  # bin
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),  # str
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),  # ext: length, type byte, data
}
_NAMES = {0xC0: "nil", 0xC2: "bool", 0xC3: "bool", 0xCA: "float", 0xCB: "float"}


def _uint(b: bytes, i: int, n: int) -> int:
    if i + n > len(b):
        raise IndexError("truncated")
    return int.from_bytes(b[i:i + n], "big")


def _skip(b: bytes, i: int) -> int:
    """The index just after the msgpack value at b[i], found without recursion.
    IndexError when the bytes end first, ValueError on the unused type byte 0xc1."""
    todo = 1
    while todo:
        todo -= 1
        t = b[i]
        i += 1
        if t <= 0x7F or t >= 0xE0 or t in (0xC0, 0xC2, 0xC3):  # fixints, nil, bools
            continue
        if t <= 0x8F:  # fixmap
            todo += 2 * (t & 0x0F)
        elif t <= 0x9F:  # fixarray
            todo += t & 0x0F
        elif t <= 0xBF:  # fixstr
            i += t & 0x1F
        elif t in _FIXED:
            i += _FIXED[t]
        elif t in _SIZED:
            width, extra = _SIZED[t]
            i += width + extra + _uint(b, i, width)
        elif t in (0xDC, 0xDD):  # array 16/32
            width = 2 if t == 0xDC else 4
            todo += _uint(b, i, width)
            i += width
        elif t in (0xDE, 0xDF):  # map 16/32
            width = 2 if t == 0xDE else 4
            todo += 2 * _uint(b, i, width)
            i += width
        else:  # 0xc1: never used
            raise ValueError(f"invalid msgpack type byte 0x{t:02x}")
        if i > len(b):
            raise IndexError("truncated")
    return i


def _int_at(b: bytes, i: int) -> int | None:
    """The msgpack integer at b[i], or None when the value there is not an integer."""
    t = b[i]
    if t <= 0x7F:
        return t
    if t >= 0xE0:
        return t - 0x100
    sizes = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
    if t not in sizes:
        return None
    n = sizes[t]
    if i + 1 + n > len(b):
        raise IndexError("truncated")
    return int.from_bytes(b[i + 1:i + 1 + n], "big", signed=t >= 0xD0)


def _type_name(t: int) -> str:
    if t <= 0x7F or t >= 0xE0 or 0xCC <= t <= 0xD3:
        return "int"
    if 0x90 <= t <= 0x9F or t in (0xDC, 0xDD):
        return "array"
    if 0xA0 <= t <= 0xBF or 0xD9 <= t <= 0xDB:
        return "str"
    if 0xC4 <= t <= 0xC6:
        return "bytes"
    if 0xC7 <= t <= 0xC9 or 0xD4 <= t <= 0xD8:
        return "ext"
    return _NAMES.get(t, "invalid")


def scan_request_id(envelope: bytes) -> tuple[str | None, int | None]:
    """(type of the top-level value: "map", "int", "array", ...; None when there is no
    readable value), and the request id: the non-negative integer under the key "id"
    of the top-level map, None when there is none. Only the top-level map is read;
    nested values are skipped without recursion (Note [no lost replies])."""
    b = bytes(envelope)
    if not b:
        return None, None
    t = b[0]
    if 0x80 <= t <= 0x8F:
        count, i = t & 0x0F, 1
    elif t in (0xDE, 0xDF):
        width = 2 if t == 0xDE else 4
        try:
            count, i = _uint(b, 1, width), 1 + width
        except IndexError:
            return None, None
    else:
        name = _type_name(t)
        return (None if name == "invalid" else name), None
    try:
        for _ in range(count):
            k = b[i]
            key = None
            if 0xA0 <= k <= 0xBF:
                n, start = k & 0x1F, i + 1
                key, i = b[start:start + n], start + n
            elif k in (0xD9, 0xDA, 0xDB):
                width = {0xD9: 1, 0xDA: 2, 0xDB: 4}[k]
                n, start = _uint(b, i + 1, width), i + 1 + width
                key, i = b[start:start + n], start + n
            else:
                i = _skip(b, i)
            if i >= len(b):
                break
            if key == b"id":
                rid = _int_at(b, i)
                return "map", rid if rid is not None and rid >= 0 else None
            i = _skip(b, i)
    except (IndexError, ValueError):
        pass
    return "map", None


# ---- socket ---------------------------------------------------------------------


@dataclass(frozen=True)
class CurveKeys:
    """The CURVE keys of one start, made by the TS client and handed over on stdin
    (never argv, which every local user can read with ps): the server's keypair and
    the one client public key the ROUTER lets in. Z85 text, 40 characters each."""

    server_public: str
    server_secret: str
    client_public: str

    @classmethod
    def from_json(cls, line: str) -> CurveKeys:
        """From `{"curve": {"serverPublicKey", "serverSecretKey", "clientPublicKey"}}`."""
        try:
            c = json.loads(line)["curve"]
            keys = cls(c["serverPublicKey"], c["serverSecretKey"], c["clientPublicKey"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"the keys line on stdin is not {{\"curve\": {{serverPublicKey, serverSecretKey, "
                             f"clientPublicKey}}}} ({type(e).__name__}: {e})") from None
        for name, key in (("serverPublicKey", keys.server_public), ("serverSecretKey", keys.server_secret),
                          ("clientPublicKey", keys.client_public)):
            if not isinstance(key, str) or len(key) != 40:
                raise ValueError(f"the keys line on stdin: {name} must be a 40-character Z85 key")
        return keys


# Note [transport security]
# ~~~~~~~~~~~~~~~~~~~~~~~~~
# Nobody but our client may talk to the sidecar: it runs code on its user's behalf
# (load_model reads any path; a checkpoint is a pickle).
# - ipc (the default): the socket file lives in a directory the client made with
#   mkdtemp (mode 0700), and it is bound under umask 077, so only our user can reach it.
# - tcp (asked for, or the fallback when ipc cannot bind): always ZeroMQ CURVE. The
#   ROUTER is a CURVE server with the keypair the client made for this start, and a
#   ZAP handler (`answer_zap`, answered on the I/O thread) admits only the client
#   public key handed over with it. A peer without the keys, or with other keys, never
#   completes the handshake: its messages are dropped and it gets no answer. Without
#   keys the sidecar refuses tcp (there is no unauthenticated tcp, no silent fallback).
# The ZAP handler is bound before the ROUTER: libzmq admits every CURVE client when no
# handler is there.

ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class Router:
    """The ROUTER socket. Its ZeroMQ context is its own, so that close() can term() it,
    which is what waits for the last replies (shutdown's) to leave; a context shared
    with other threads' sockets could not be term()ed while they hold them. A ZeroMQ
    socket is a single-thread object: only the I/O thread calls recv/send and
    answer_zap. Note [transport security]."""

    def __init__(self, endpoint: str, keys: CurveKeys | None = None):
        # Two ZeroMQ I/O threads: each connection is served by the less loaded one, so the
        # client's heartbeat connection (made after the main one) is not stuck behind a big
        # message on the main one (CURVE encrypts a whole message at once on its I/O
        # thread: ~1 s for 128 MB). Note [heartbeat] in ts/sidecar.ts.
        self._ctx = zmq.Context(io_threads=2)
        self._keys = keys
        self.zap: zmq.Socket | None = None  # the ZAP handler's REP socket, on tcp
        self.socket = self._ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 1000)
        # A ROUTER drops what it cannot queue for a peer, silently, once the peer's pipe
        # holds SNDHWM messages (default 1000): a client that sends 2000 calls before
        # reading would lose replies. No limit: every reply waits until it is read.
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.endpoint = self._bind(endpoint)
        self.transport = "ipc" if self.endpoint.startswith("ipc://") else "tcp"
        self.security = "ipc-private-dir" if self.transport == "ipc" else "curve"
        self.denied = 0  # peers the ZAP handler turned away
        self._next_denied_log = 0.0

    def _bind(self, endpoint: str) -> str:
        if endpoint.startswith("ipc://"):
            old = os.umask(0o077)  # the socket file: rw for our user only
            try:
                self.socket.bind(endpoint)
                return self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
            except zmq.ZMQError as e:
                if self._keys is None:
                    raise RuntimeError(f"cannot bind {endpoint} ({e}), and there is no tcp fallback without CURVE "
                                       "keys (--keys-from-stdin)") from e
                log.warning("cannot bind %s (%s); falling back to tcp://127.0.0.1 with CURVE", endpoint, e)
                endpoint = "tcp://127.0.0.1:*"
            finally:
                os.umask(old)
        if self._keys is None:
            raise RuntimeError(f"refusing to serve {endpoint} without CURVE keys: tcp is always authenticated; "
                               "pass --keys-from-stdin and write the keys line, or use an ipc:// endpoint")
        self._serve_curve(self._keys)
        self.socket.bind(endpoint)
        return self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()

    def _serve_curve(self, keys: CurveKeys) -> None:
        self._client_key = z85.decode(keys.client_public.encode())
        self.zap = self._ctx.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)  # before the ROUTER binds: see Note [transport security]
        self.socket.setsockopt(zmq.ZAP_DOMAIN, b"nanotune")
        self.socket.setsockopt(zmq.CURVE_SERVER, 1)
        self.socket.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret.encode())
        self.socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.server_public.encode())

    def answer_zap(self) -> None:
        """Answers the ZAP requests waiting (one per connecting peer): 200 for our
        client's public key over CURVE, 400 for anything else."""
        assert self.zap is not None
        while self.zap.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self.zap.recv_multipart()
            request_id = frames[1] if len(frames) > 1 else b""
            ok = (len(frames) >= 7 and frames[0] == b"1.0" and frames[5] == b"CURVE"
                  and frames[6] == self._client_key)
            if not ok:
                self.denied += 1
                now = time.monotonic()
                if now >= self._next_denied_log:  # a stranger may retry every 100 ms: log at most every 10 s
                    self._next_denied_log = now + 10.0
                    log.warning("refused a connection without our client's CURVE key (from %s; %d so far)",
                                frames[3].decode(errors="replace") if len(frames) > 3 else "?", self.denied)
            self.zap.send_multipart([b"1.0", request_id, b"200" if ok else b"400",
                                     b"OK" if ok else b"not the client key of this sidecar",
                                     b"nanotune-client" if ok else b"", b""])

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
        if self.zap is not None:
            self.zap.close()
        self._ctx.term()
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except OSError:
                pass
