"""The sidecar process: a ROUTER socket served by the I/O thread (the main thread),
a compute thread that runs one long call at a time, and a parent watch.

Threads and sockets (ZeroMQ sockets are single-thread objects):
- I/O thread (main): owns the ROUTER and the inproc PULL. Decodes every request,
  answers "io" methods inline (hello, ping, status, cancel, shutdown, ...), hands
  "compute" methods to the compute thread, forwards what other threads send through
  the PULL to the ROUTER.
- compute thread: runs the warm-up (import torch, pick the device, import method
  modules), then one job at a time; replies and events go out through its own
  inproc PUSH (any thread may send; see `_push`).
Note [cancellation]: `cancel` sets the job's ctx.cancelled, which ctx.check_cancelled()
raises as Cancelled at the handler's next check. A handler that never checks is
interrupted by an asynchronous Cancelled exception (PyThreadState_SetAsyncExc) after
FORCE_CANCEL_AFTER_S; that lands between Python bytecodes, so it cannot cut a single
long C call (one huge matmul) short, only what follows it.
"""
from __future__ import annotations

import ctypes
import faulthandler
import importlib
import logging
import os
import pkgutil
import queue
import re
import signal
import sys
import threading
import time
import traceback
from typing import Any

import msgspec
import zmq

from . import builtin  # noqa: F401  (registers hello, ping, ... debug.*; imports no torch)
from . import protocol as P
from .protocol import ErrorCode
from .registry import DEFERRED, METHODS, Cancelled, Context, SidecarError, State

log = logging.getLogger("nanotune.sidecar")

FORCE_CANCEL_AFTER_S = 2.0  # Note [cancellation]
PARENT_POLL_S = 0.2  # how often the I/O thread checks that the parent lives
OUT = "inproc://nanotune-out"

_request_decoder = msgspec.msgpack.Decoder(P.Request)
_any_decoder = msgspec.msgpack.Decoder()


def _field_of(err: msgspec.ValidationError, prefix: str) -> tuple[str, str]:
    """('params.seconds', 'Expected `float`, got `str`') from msgspec's '... - at `$.seconds`'."""
    msg, path = str(err), ""
    m = re.search(r" - at `\$(.*)`$", msg)
    if m:
        msg, path = msg[: m.start()], m.group(1)
    m = re.search(r"(?:required|unknown) field `([^`]+)`", msg)  # reported at the parent object
    if m:
        return f"{prefix}{path}.{m.group(1)}", msg
    return prefix + path, msg


class Job:
    def __init__(self, ctx: Context, method: Any, params: Any):
        self.ctx = ctx
        self.method = method
        self.params = params
        self.lock = threading.Lock()  # guards `finished` against the forced cancel
        self.finished = False
        self.cancel_at: float | None = None  # when the forced cancel fires


class Server:
    def __init__(self, endpoint: str, device: str = "auto", parent_pid: int | None = None):
        self.device_request = device
        self.parent_pid = parent_pid
        self.initial_ppid = os.getppid()
        self.state = State()
        self.started = time.monotonic()
        self.served = 0
        self.rejected = 0
        self.ready = threading.Event()  # warm-up done (torch imported, methods loaded)
        self.warmup_error: BaseException | None = None
        self.torch_version = ""
        self.cuda_info: P.CudaInfo | None = None
        self.current: Job | None = None  # the running compute job (I/O thread's view)
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.stopping = False
        self.zctx = zmq.Context.instance()  # inproc sockets between our threads
        # The ROUTER gets a context of its own so that exiting can term() it, which is
        # what waits for the last replies (shutdown's) to leave; the shared context
        # cannot be term()ed while the compute thread holds its PUSH socket.
        self.router_ctx = zmq.Context()
        self.router = self.router_ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 1000)
        self.endpoint = self._bind(endpoint)
        self.pull = self.zctx.socket(zmq.PULL)
        self.pull.bind(OUT)
        self._local = threading.local()
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)

    def _bind(self, endpoint: str) -> str:
        try:
            self.router.bind(endpoint)
        except zmq.ZMQError as e:
            if not endpoint.startswith("ipc://"):
                raise
            log.warning("cannot bind %s (%s); falling back to tcp://127.0.0.1", endpoint, e)
            endpoint = "tcp://127.0.0.1:*"
            self.router.bind(endpoint)
        return self.router.getsockopt(zmq.LAST_ENDPOINT).decode()

    # ---- encoding ------------------------------------------------------------

    def _enc_hook(self, obj: Any) -> Any:
        from .tensors import tensor_to_frame

        frames = getattr(self._local, "frames", None)
        if frames is not None and type(obj).__module__.split(".")[0] in ("torch", "numpy"):
            if hasattr(obj, "shape") and hasattr(obj, "dtype"):
                return tensor_to_frame(obj, frames)
        raise TypeError(f"cannot encode {type(obj).__name__} for the wire")

    def _encode(self, msg: Any) -> list[Any]:
        self._local.frames = frames = []
        try:
            return [self._encoder.encode(msg), *frames]
        finally:
            self._local.frames = None

    def _push(self, parts: list[Any]) -> None:
        """Sends [identity, kind, envelope, *frames] to the I/O thread from any thread."""
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._local.push = self.zctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(OUT)
        sock.send_multipart(parts, copy=False)

    def send_event(self, identity: bytes, name: str, data: Any) -> None:
        parts = self._encode(P.Event(name, data))
        if threading.current_thread() is threading.main_thread():
            self.router.send_multipart([identity, *parts], copy=False)
        else:
            self._push([identity, b"E", *parts])

    def _reply_parts(self, rid: int | None, result: Any = None, error: BaseException | None = None, method: str = "?") -> list[Any]:
        if error is None:
            try:
                return self._encode(P.Result(rid, result))
            except Exception as e:  # a handler returned something the wire cannot carry
                error = e
        self.rejected += 1
        return [msgspec.msgpack.encode(P.Error(rid, self._error_body(error, method)))]

    def _error_body(self, e: BaseException, method: str) -> P.ErrorBody:
        if isinstance(e, SidecarError):
            return P.ErrorBody(e.code, e.message, e.data)
        if isinstance(e, Cancelled):
            return P.ErrorBody(ErrorCode.CANCELLED, f"{method}: cancelled")
        tb = "".join(traceback.format_exception(e))
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return P.ErrorBody(ErrorCode.OUT_OF_MEMORY, f"{method}: out of memory: {e}", {"type": type(e).__name__}, tb)
        log.error("%s failed:\n%s", method, tb)
        return P.ErrorBody(ErrorCode.INTERNAL, f"{method}: {type(e).__name__}: {e}", {"type": type(e).__name__}, tb)

    # ---- I/O thread ----------------------------------------------------------

    def serve(self) -> None:
        threading.Thread(target=self._compute_loop, name="nanotune-compute", daemon=True).start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.pull, zmq.POLLIN)
        next_parent_check = 0.0
        while not self.stopping:
            ready = dict(poller.poll(100))
            if self.pull in ready:
                self._drain_pull()
            if self.router in ready:
                # up to 1000 messages, then let the PULL side have a turn; ZMQ_EVENTS is
                # cheaper than a NOBLOCK recv that raises zmq.Again (several us on ping)
                for _ in range(1000):
                    parts = self.router.recv_multipart(copy=False)
                    try:
                        self._handle(parts)
                    except Exception:  # noqa: BLE001  a bug of ours must not take the sidecar down
                        log.exception("dropped a request that could not be answered (%d frames)", len(parts))
                    if self.stopping or not self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        break
            now = time.monotonic()
            job = self.current
            if job is not None and job.cancel_at is not None and now >= job.cancel_at:
                job.cancel_at = None
                self._force_cancel(job)
            if now >= next_parent_check:
                next_parent_check = now + PARENT_POLL_S
                if self._parent_gone():
                    log.warning("parent process is gone; exiting")
                    self.stopping = True
        self._drain_pull()

    def _drain_pull(self) -> None:
        while self.pull.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            parts = self.pull.recv_multipart(copy=False)
            identity, kind, *rest = parts
            if kind.bytes != b"E":  # a reply: from the compute thread (R) or a deferred one (D)
                self.served += 1
                if kind.bytes == b"R" and self.current is not None and self.current.finished:
                    self.current = None
            self.router.send_multipart([identity, *rest], copy=False)

    def _parent_gone(self) -> bool:
        if os.getppid() != self.initial_ppid:
            return True
        if self.parent_pid is None:
            return False
        try:
            os.kill(self.parent_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    def _send(self, identity: Any, parts: list[Any]) -> None:
        self.served += 1
        self.router.send_multipart([identity, *parts], copy=False)

    def _reject(self, identity: Any, rid: int | None, code: str, message: str, data: Any = None) -> None:
        log.debug("rejected request %s: %s %s", rid, code, message)
        self._send(identity, self._reply_parts(rid, error=SidecarError(code, message, data)))

    def _handle(self, parts: list[Any]) -> None:
        identity, *rest = parts
        if not rest:
            self._reject(identity, None, ErrorCode.INVALID_REQUEST, "empty message: expected a msgpack envelope frame")
            return
        envelope, frames = rest[0].bytes, rest[1:]
        try:
            req = _request_decoder.decode(envelope)
        except Exception as e:  # noqa: BLE001  ValidationError, DecodeError, UnicodeDecodeError (bad utf-8), ...
            self._reject_envelope(identity, envelope, e)
            return
        if req.v != P.PROTOCOL_VERSION and req.method != "hello":
            self._reject(
                identity, req.id, ErrorCode.PROTOCOL_MISMATCH,
                f"{req.method}: request speaks protocol v{req.v} but the sidecar speaks v{P.PROTOCOL_VERSION}",
                {"client": req.v, "sidecar": P.PROTOCOL_VERSION},
            )
            return
        m = METHODS.get(req.method)
        if m is None and self.ready.is_set():
            self._reject(
                identity, req.id, ErrorCode.UNKNOWN_METHOD,
                f"unknown method {req.method!r}; known: {', '.join(sorted(METHODS))}", {"method": req.method},
            )
            return
        params = None
        if m is not None:
            try:
                params = m.decoder.decode(req.params)
            except Exception as e:  # noqa: BLE001  as above
                field, why = _field_of(e, "params")
                self._reject(identity, req.id, ErrorCode.INVALID_PARAMS, f"{req.method}: invalid params at {field}: {why}", {"field": field})
                return
        ctx = Context(self, req.id, req.method, identity, frames)
        if m is not None and m.thread == "io":
            try:
                result = m.fn(ctx, params)
            except BaseException as e:  # noqa: BLE001 (reported to the caller)
                self._send(identity, self._reply_parts(req.id, error=e, method=req.method))
                return
            if result is not DEFERRED:
                self._send(identity, self._reply_parts(req.id, result, method=req.method))
            return
        if self.current is not None:
            cur = self.current
            self._reject(
                identity, req.id, ErrorCode.BUSY,
                f"{req.method}: the sidecar is busy with {cur.ctx.method} (id {cur.ctx.id}) for "
                f"{time.monotonic() - cur.ctx.started:.1f} s; wait for it or cancel it",
                {"busy": {"id": cur.ctx.id, "method": cur.ctx.method}},
            )
            return
        self.current = Job(ctx, m, params)
        self.jobs.put(self.current)

    def _reject_envelope(self, identity: Any, envelope: bytes, e: Exception) -> None:
        """A request whose envelope is not a valid Request: reply with its id if it has one."""
        rid = None
        try:
            raw = _any_decoder.decode(envelope)
        except Exception:  # noqa: BLE001
            raw = None
            why = f"the envelope is not valid msgpack ({type(e).__name__}: {e})"
        else:
            if isinstance(raw, dict):
                if isinstance(raw.get("id"), int) and not isinstance(raw.get("id"), bool) and raw["id"] >= 0:
                    rid = raw["id"]
                field, msg = _field_of(e, "envelope") if isinstance(e, msgspec.ValidationError) else ("envelope", str(e))
                why = f"invalid request at {field}: {msg}"
            else:
                why = f"invalid request: the envelope must be a map {{v, id, method, params}}, got {type(raw).__name__}"
        self._reject(identity, rid, ErrorCode.INVALID_REQUEST, why)

    # ---- control (called on the I/O thread by builtin methods) ----------------

    def cancel(self, rid: int | None) -> P.CancelResult:
        job = self.current
        if job is None or (rid is not None and job.ctx.id != rid):
            return P.CancelResult(cancelled=False, id=None)
        if not job.ctx.cancelled:
            job.ctx.cancelled = True
            job.cancel_at = time.monotonic() + FORCE_CANCEL_AFTER_S
        return P.CancelResult(cancelled=True, id=job.ctx.id)

    def _force_cancel(self, job: Job) -> None:
        with job.lock:
            if job.finished:
                return
            tid = self._compute_tid
            log.warning("%s (id %d) ignored cancel for %.1f s; interrupting it", job.ctx.method, job.ctx.id, FORCE_CANCEL_AFTER_S)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(Cancelled))

    def defer(self, ctx: Context, fn: Any) -> Any:
        """For an "io" method that must wait (hello before warm-up): runs fn() on a helper
        thread, which replies when it returns; the handler returns what this returns."""

        def run() -> None:
            result, error = None, None
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001
                error = e
            self._push([ctx.identity, b"D", *self._reply_parts(ctx.id, result, error, ctx.method)])

        threading.Thread(target=run, name=f"nanotune-{ctx.method}", daemon=True).start()
        return DEFERRED

    def status(self) -> P.StatusResult:
        job = self.current
        busy = None
        if job is not None:
            busy = P.BusyInfo(job.ctx.id, job.ctx.method, time.monotonic() - job.ctx.started, job.ctx.cancelled)
        return P.StatusResult(os.getpid(), time.monotonic() - self.started, self.ready.is_set(), busy, self.served, self.rejected)

    # ---- compute thread ------------------------------------------------------

    def _warmup(self) -> None:
        import torch

        self.torch_version = str(torch.__version__)
        want = self.device_request
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("device 'cuda' was asked for but torch.cuda.is_available() is False "
                                   f"(torch {torch.__version__}); use device 'auto' or 'cpu'")
            idx = torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(idx)
            self.cuda_info = P.CudaInfo(torch.cuda.get_device_name(idx), int(total), int(free))
            self.state.device, self.state.dtype = f"cuda:{idx}", "bfloat16"
        elif want == "cpu":
            self.state.device, self.state.dtype = "cpu", "float32"
        else:
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {want!r}")
        for name in _method_modules():
            importlib.import_module(name)

    def _compute_loop(self) -> None:
        self._compute_tid = threading.get_ident()
        try:
            self._warmup()
        except BaseException as e:  # noqa: BLE001 (reported by hello and every compute call)
            self.warmup_error = e
            log.error("warm-up failed:\n%s", "".join(traceback.format_exception(e)))
        self.ready.set()
        while True:
            try:
                job = self.jobs.get()
                self._run(job)
            except Cancelled:  # a forced cancel that landed after the job ended (see _run)
                continue

    def _run(self, job: Job) -> None:
        ctx, rid = job.ctx, job.ctx.id
        result, error = None, None
        try:
            if self.warmup_error is not None:
                raise SidecarError(ErrorCode.INTERNAL, f"{ctx.method}: the sidecar failed to start: {self.warmup_error}")
            m = job.method or METHODS.get(ctx.method)
            if m is None:
                raise SidecarError(ErrorCode.UNKNOWN_METHOD, f"unknown method {ctx.method!r}; known: {', '.join(sorted(METHODS))}", {"method": ctx.method})
            params = job.params
            if params is None:
                raise SidecarError(ErrorCode.INVALID_REQUEST, f"{ctx.method}: request arrived before the method was loaded; retry")
            ctx.check_cancelled()
            result = m.fn(ctx, params)
        except BaseException as e:  # noqa: BLE001 (reported to the caller)
            error = e
        while True:  # a forced Cancelled may land here, before `finished` is set
            try:
                with job.lock:
                    job.finished = True
                break
            except Cancelled as e:
                error, result = e, None
        self._push([ctx.identity, b"R", *self._reply_parts(rid, result, error, ctx.method)])


def _method_modules() -> list[str]:
    names = []
    try:
        pkg = importlib.import_module("nanotune.methods")
    except ModuleNotFoundError as e:
        if e.name != "nanotune.methods":
            raise
    else:
        names += [f"nanotune.methods.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    names += [n.strip() for n in os.environ.get("NANOTUNE_SIDECAR_MODULES", "").split(",") if n.strip()]
    return names


def _die_with_parent() -> None:
    """Linux: SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG); the parent-pid
    poll in the I/O loop covers other systems and a parent that died before this ran."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError) as e:
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable (%s); relying on the parent poll", e)


def main(endpoint: str, device: str, parent_pid: int | None) -> None:
    logging.basicConfig(level=os.environ.get("NANOTUNE_LOG", "WARNING").upper(), stream=sys.stderr,
                        format="[sidecar %(process)d] %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which closes us
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack on stderr
    _die_with_parent()
    server = Server(endpoint, device, parent_pid)

    def on_term(signum, frame):  # noqa: ARG001
        server.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    # The one line on stdout: the TS client waits for it, then connects.
    sys.stdout.write(msgspec.json.encode({"ready": server.endpoint, "pid": os.getpid()}).decode() + "\n")
    sys.stdout.flush()
    try:
        server.serve()
    except BaseException:
        log.exception("the I/O loop failed; exiting")
        raise
    finally:
        server.router.close(linger=1000)
        server.router_ctx.term()  # returns once the last replies are sent, or after 1 s
        if server.endpoint.startswith("ipc://"):
            try:
                os.unlink(server.endpoint[len("ipc://"):])
            except OSError:
                pass
        sys.stderr.flush()
        os._exit(0)  # the compute thread may be inside torch; do not wait for it
