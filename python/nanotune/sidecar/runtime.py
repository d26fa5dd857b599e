"""The runtime room: the sidecar process's threads, cancellation, warm-up, parent
watch and status; `main()` runs it.

Threads and sockets (ZeroMQ sockets are single-thread objects):
- I/O thread (main): owns the ROUTER (transport.Router), its ZAP handler on tcp
  (Note [transport security] in transport.py) and the inproc PULL. Decodes every
  request, answers "io" methods inline (hello, ping, status, cancel, shutdown,
  ...), hands "compute" methods to the compute thread, forwards what other threads
  send through the PULL to the ROUTER. It never blocks on a handler, so it answers
  the client's heartbeat (`status`) even during a long compute step.
- compute thread: runs the warm-up (import torch, pick the device, import method
  modules), then one job at a time; replies and events go out through its own
  inproc PUSH (any thread may send; see `_push`).
- helper threads: an "io" handler that returned dispatch.Deferred (hello before
  the warm-up is done) is finished on one, which replies through its own PUSH.
Note [cancellation]: `cancel` sets the job's ctx.cancelled, which ctx.check_cancelled()
raises as Cancelled at the handler's next check. A handler that never checks is
interrupted by an asynchronous Cancelled exception (PyThreadState_SetAsyncExc) after
FORCE_CANCEL_AFTER_S; that lands between Python bytecodes, so it cannot cut a single
long C call (one huge matmul) short, only what follows it.

The runtime is the dispatch.Control the control-plane handlers (builtin.py) see.
Imports: transport and dispatch; handler modules are loaded by name (HANDLER_MODULES,
then nanotune.methods.* in the warm-up), never imported here.
"""
from __future__ import annotations

import ctypes
import faulthandler
import functools
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

from .. import wire
from ..errors import ErrorCode, NanotuneError
from . import dispatch
from .dispatch import Cancelled, Context, Deferred, State, Warmup
from .transport import Codec, CurveKeys, ErrorBody, InvalidEnvelope, Router, scan_request_id

log = logging.getLogger("nanotune.sidecar")


def _wire_field(data: Any) -> Any:
    """Python names fields in snake_case (``data_state.batch_size``); the client wrote
    them in the wire's camelCase (``dataState.batchSize``), so a reply names them so."""
    if isinstance(data, dict) and isinstance(data.get("field"), str):
        camel = re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), data["field"])
        return {**data, "field": camel}
    return data

FORCE_CANCEL_AFTER_S = 2.0  # Note [cancellation]
PARENT_POLL_S = 0.2  # how often the I/O thread checks that the parent lives
OUT = "inproc://nanotune-out"
HANDLER_MODULES = ("nanotune.sidecar.builtin",)  # loaded at start: no torch, answer hello at once


class Job:
    """A compute call: its context, and its params (decoded, or still raw when the
    method's handler was not loaded when it arrived)."""

    def __init__(self, ctx: Context, identity: Any, params: Any, raw: bytes | None):
        self.ctx = ctx
        self.identity = identity  # the ZeroMQ routing id of the caller
        self.params = params
        self.raw = raw
        self.started = time.monotonic()
        self.lock = threading.Lock()  # guards `finished` against the forced cancel
        self.finished = False
        self.cancel_at: float | None = None  # when the forced cancel fires


class Runtime:
    def __init__(self, endpoint: str, device: str = "auto", parent_pid: int | None = None,
                 keys: CurveKeys | None = None, group: Any = None):
        for name in HANDLER_MODULES:
            importlib.import_module(name)
        self.device_request = device
        self.parent_pid = parent_pid
        self.initial_ppid = os.getppid()
        self.state = State()
        # A sidecar group's rank 0 (nanotune.distributed.Group), or None: one process.
        self.group = group
        self.state.group = group
        self.clients: dict[Any, None] = {}  # routing ids of recent callers (oldest first): where rank:lost goes
        self.lost_told = False  # rank:lost was sent
        self.followers_released = threading.Event()  # the other ranks were told to exit
        self.started = time.monotonic()
        self.served = 0
        self.rejected = 0
        self.ready = threading.Event()  # warm-up done (torch imported, methods loaded)
        self.warmup_error: BaseException | None = None
        self.warmup_info = Warmup(torch="", cuda=None)
        self.current: Job | None = None  # the running compute job (I/O thread's view)
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.stopping = False
        self.codec = Codec()
        self.router = Router(endpoint, keys)
        self.endpoint = self.router.endpoint
        self.zctx = zmq.Context.instance()  # inproc sockets between our threads
        self.pull = self.zctx.socket(zmq.PULL)
        self.pull.bind(OUT)
        self._local = threading.local()
        self._compute_tid = 0

    # ---- replies -------------------------------------------------------------

    def _push(self, parts: list[Any]) -> None:
        """Sends [identity, kind, envelope, *frames] to the I/O thread from any thread."""
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._local.push = self.zctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(OUT)
        sock.send_multipart(parts, copy=False)

    def send_event(self, identity: Any, name: str, data: Any) -> None:
        parts = self.codec.event(name, data)
        if threading.current_thread() is threading.main_thread():
            self.router.send(identity, parts)
        else:
            self._push([identity, b"E", *parts])

    def _reply_parts(self, rid: int | None, result: Any = None, error: BaseException | None = None,
                     method: str | None = None) -> list[Any]:
        """The reply to call `rid`: its result, or the error body of `error` (whose message
        gets "method: " in front unless it has it; None: a rejection, sent as it is)."""
        if error is None:
            try:
                return self.codec.result(rid, result)
            except Exception as e:  # a handler returned something the wire cannot carry
                error = e
        self.rejected += 1
        return self.codec.error(rid, self._error_body(error, method))

    def _error_body(self, e: BaseException, method: str | None) -> ErrorBody:
        if isinstance(e, NanotuneError):
            # Every message names the method; our loaders' errors do not know it.
            prefix = "" if method is None or e.message.startswith(f"{method}:") else f"{method}: "
            return ErrorBody(e.code, prefix + e.message, _wire_field(e.data))
        method = method or "?"
        if isinstance(e, Cancelled):
            return ErrorBody(ErrorCode.CANCELLED, f"{method}: cancelled")
        tb = "".join(traceback.format_exception(e))
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return ErrorBody(ErrorCode.OUT_OF_MEMORY, f"{method}: out of memory: {e}", {"type": type(e).__name__}, tb)
        log.error("%s failed:\n%s", method, tb)
        return ErrorBody(ErrorCode.INTERNAL, f"{method}: {type(e).__name__}: {e}", {"type": type(e).__name__}, tb)

    # ---- I/O thread ----------------------------------------------------------

    def serve(self) -> None:
        threading.Thread(target=self._compute_loop, name="nanotune-compute", daemon=True).start()
        poller = zmq.Poller()
        poller.register(self.router.socket, zmq.POLLIN)
        poller.register(self.pull, zmq.POLLIN)
        if self.router.zap is not None:
            poller.register(self.router.zap, zmq.POLLIN)
        next_parent_check = 0.0
        while not self.stopping:
            ready = dict(poller.poll(100))
            if self.router.zap is not None and self.router.zap in ready:
                self.router.answer_zap()
            if self.pull in ready:
                self._drain_pull()
            if self.router.socket in ready:
                # up to 1000 messages, then let the PULL side have a turn
                for _ in range(1000):
                    parts = self.router.recv()
                    try:
                        self._handle(parts)
                    except Exception as e:  # noqa: BLE001  a bug of ours must not take the sidecar down
                        self._answer_bug(parts, e)
                    if self.stopping or not self.router.has_more():
                        break
            now = time.monotonic()
            if self.group is not None and now >= next_parent_check:
                self._check_ranks()
            job = self.current
            if job is not None and job.cancel_at is not None and now >= job.cancel_at:
                job.cancel_at = None
                self._force_cancel(job)
            if now >= next_parent_check:
                next_parent_check = now + PARENT_POLL_S
                if self._parent_gone():
                    log.warning("parent process is gone; exiting")
                    self.stopping = True
        if self.group is not None:  # torchrun's SIGTERM may have come first, for a rank that died
            self._check_ranks()
        self._drain_pull()

    def _check_ranks(self) -> bool:
        """Note [losing a rank] (distributed.py): a rank of this host is gone: tell the
        client (rank:lost) and stop; torchrun takes the rest of the group down."""
        from ..distributed import lost_local_rank

        lost = lost_local_rank(self.group)
        if lost is None or self.lost_told:
            return lost is not None
        log.error("rank %d (pid %d on %s) is gone; the sidecar group stops", lost["rank"], lost["pid"], lost["host"])
        event = wire.RankLost(rank=lost["rank"], host=lost["host"], pid=lost["pid"],
                              reason=f"rank {lost['rank']}'s process (pid {lost['pid']}) is gone")
        for identity in list(self.clients):  # every recent caller: the client's heartbeat socket may be another
            self.send_event(identity, "rank:lost", event)
        self.lost_told = True
        self.stopping = True
        return True

    def _answer_bug(self, parts: list[Any], e: Exception) -> None:
        """A request whose handling raised where it must not (a bug of ours) still gets
        an INTERNAL reply with its id when the id can be read: no call may wait forever."""
        log.error("request failed outside its handler (%d frames):\n%s", len(parts),
                  "".join(traceback.format_exception(e)))
        try:
            rid = scan_request_id(parts[1].bytes)[1] if len(parts) > 1 else None
            self._send(parts[0], self._reply_parts(rid, error=e))
        except Exception:  # noqa: BLE001
            log.exception("could not answer it either")

    def _drain_pull(self) -> None:
        while self.pull.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            identity, kind, *rest = self.pull.recv_multipart(copy=False)
            if kind.bytes != b"E":  # a reply: from the compute thread (R) or a deferred one (D)
                self.served += 1
                if kind.bytes == b"R" and self.current is not None and self.current.finished:
                    self.current = None
            self.router.send(identity, rest)

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
        self.router.send(identity, parts)

    def _reject(self, identity: Any, rid: int | None, error: NanotuneError) -> None:
        log.debug("rejected request %s: %s %s", rid, error.code, error.message)
        self._send(identity, self._reply_parts(rid, error=error))

    def _handle(self, parts: list[Any]) -> None:
        identity, *rest = parts
        if not rest:
            self._reject(identity, None, InvalidEnvelope("empty message: expected a msgpack envelope frame"))
            return
        envelope, frames = rest[0].bytes, rest[1:]
        try:
            req = self.codec.decode_request(envelope)
        except InvalidEnvelope as e:
            self._reject(identity, e.request_id, e)
            return
        name = req.method
        if req.v != wire.PROTOCOL_VERSION and name != "hello":
            self._reject(identity, req.id, NanotuneError(
                ErrorCode.PROTOCOL_MISMATCH,
                f"{name}: request speaks protocol v{req.v} but the sidecar speaks v{wire.PROTOCOL_VERSION}",
                {"client": req.v, "sidecar": wire.PROTOCOL_VERSION},
            ))
            return
        params, raw = None, None
        if dispatch.knows(name):
            try:
                params = dispatch.decode_params(name, req.params)
            except NanotuneError as e:
                self._reject(identity, req.id, e)
                return
        elif self.ready.is_set():
            self._reject(identity, req.id, NanotuneError(
                ErrorCode.UNKNOWN_METHOD, f"unknown method {name!r}; known: {', '.join(sorted(dispatch.METHODS))}",
                {"method": name},
            ))
            return
        else:  # maybe a method of a module the warm-up has yet to load: decoded then
            raw = bytes(req.params)
        self.clients.pop(identity, None)
        self.clients[identity] = None
        while len(self.clients) > 16:
            del self.clients[next(iter(self.clients))]
        ctx = Context(self.state, req.id, name, frames, functools.partial(self.send_event, identity), self)
        if dispatch.thread_of(name) == "io" and name in dispatch.METHODS:
            try:
                result = dispatch.METHODS[name].fn(ctx, params)
            except BaseException as e:  # noqa: BLE001 (reported to the caller)
                self._send(identity, self._reply_parts(req.id, error=e, method=name))
                return
            if isinstance(result, Deferred):
                self._defer(identity, ctx, result.fn)
            else:
                self._send(identity, self._reply_parts(req.id, result, method=name))
            return
        if self.current is not None:
            cur = self.current
            self._reject(identity, req.id, NanotuneError(
                ErrorCode.BUSY,
                f"{name}: the sidecar is busy with {cur.ctx.method} (id {cur.ctx.id}) for "
                f"{time.monotonic() - cur.started:.1f} s; wait for it or cancel it",
                {"busy": {"id": cur.ctx.id, "method": cur.ctx.method}},
            ))
            return
        self.current = Job(ctx, identity, params, raw)
        self.jobs.put(self.current)

    def _defer(self, identity: Any, ctx: Context, fn: Any) -> None:
        """Finishes an "io" call on a helper thread, which replies when fn returns."""

        def run() -> None:
            result, error = None, None
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001
                error = e
            self._push([identity, b"D", *self._reply_parts(ctx.id, result, error, ctx.method)])

        threading.Thread(target=run, name=f"nanotune-{ctx.method}", daemon=True).start()

    # ---- dispatch.Control (called on the I/O thread by builtin methods) --------

    def is_ready(self) -> bool:
        return self.ready.is_set()

    def warmup(self) -> Warmup:
        self.ready.wait()
        if self.warmup_error is not None:
            raise NanotuneError(ErrorCode.INTERNAL, f"the sidecar failed to start: {self.warmup_error}")
        return self.warmup_info

    def shutdown(self) -> None:
        self.stopping = True

    def transport(self) -> tuple[str, str]:
        return self.router.transport, self.router.security

    def cancel(self, request_id: int | None) -> wire.CancelResult:
        job = self.current
        if job is None or (request_id is not None and job.ctx.id != request_id):
            return wire.CancelResult(cancelled=False, id=None)
        if not job.ctx.cancelled:
            job.ctx.cancelled = True
            m = dispatch.METHODS.get(job.ctx.method)
            if self.group is None or m is None or not m.lockstep:  # a group's running call finishes
                job.cancel_at = time.monotonic() + FORCE_CANCEL_AFTER_S
        return wire.CancelResult(cancelled=True, id=job.ctx.id)

    def status(self) -> wire.StatusResult:
        job = self.current
        busy = None
        if job is not None:
            busy = wire.BusyInfo(id=job.ctx.id, method=job.ctx.method, running_s=time.monotonic() - job.started,
                                 cancelling=job.ctx.cancelled)
        return wire.StatusResult(pid=os.getpid(), uptime_s=time.monotonic() - self.started,
                                 ready=self.ready.is_set(), busy=busy, served=self.served, rejected=self.rejected)

    def _force_cancel(self, job: Job) -> None:
        with job.lock:
            if job.finished:
                return
            log.warning("%s (id %d) ignored cancel for %.1f s; interrupting it", job.ctx.method, job.ctx.id,
                        FORCE_CANCEL_AFTER_S)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._compute_tid), ctypes.py_object(Cancelled))

    # ---- compute thread ------------------------------------------------------

    def _warmup(self) -> None:
        import torch

        from ..models import default_dtype, resolve_device  # the one device resolver, shared with load_model

        dev = resolve_device(self.group.device if self.group is not None else self.device_request)
        cuda = None
        if dev.type == "cuda":
            free, total = torch.cuda.mem_get_info(dev)
            cuda = wire.CudaInfo(name=torch.cuda.get_device_name(dev), total_bytes=int(total), free_bytes=int(free))
        self.state.device = str(dev)
        self.state.dtype = str(default_dtype(dev)).removeprefix("torch.")
        self.warmup_info = Warmup(torch=str(torch.__version__), cuda=cuda)
        for name in method_modules():
            importlib.import_module(name)
        missing = dispatch.unhandled()
        if missing:
            raise RuntimeError(f"methods of protocol/schema.ts without a handler: {', '.join(missing)}")

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
                if job is None:  # stopping: release the other ranks of a group
                    self._release_followers()
                    continue
                self._run(job)
            except Cancelled:  # a forced cancel that landed after the job ended (see _run)
                continue

    def _run(self, job: Job) -> None:
        ctx, rid = job.ctx, job.ctx.id
        result, error = None, None
        try:
            if self.warmup_error is not None:
                raise NanotuneError(ErrorCode.INTERNAL, f"the sidecar failed to start: {self.warmup_error}")
            m = dispatch.METHODS.get(ctx.method)
            if m is None:
                raise NanotuneError(ErrorCode.UNKNOWN_METHOD, f"unknown method {ctx.method!r}; known: "
                                    f"{', '.join(sorted(dispatch.METHODS))}", {"method": ctx.method})
            params = job.params if job.raw is None else dispatch.decode_params(ctx.method, job.raw)
            ctx.check_cancelled()
            if self.group is not None and m.lockstep:
                result, error = self._run_lockstep(ctx, m, params)
            else:
                result = m.fn(ctx, params)
        except BaseException as e:  # noqa: BLE001 (reported to the caller)
            error = e
        if error is not None and self.group is not None and self._check_ranks():
            return  # the client hears rank:lost; this reply would only blur it
        while True:  # a forced Cancelled may land here, before `finished` is set
            try:
                with job.lock:
                    job.finished = True
                break
            except Cancelled as e:
                error, result = e, None
        self._push([job.identity, b"R", *self._reply_parts(rid, result, error, ctx.method)])


    def _run_lockstep(self, ctx: Context, m: dispatch.Method, params: Any) -> tuple[Any, BaseException | None]:
        """Note [lockstep calls] (distributed.py): every rank runs the call; the error of
        any rank that failed is the reply."""
        from ..distributed import settle

        group = self.group
        group.refuse_if_diverged(ctx.method)
        group.broadcast(("call", ctx.method, params))
        result, error = None, None
        try:
            result = m.fn(ctx, params)
        except BaseException as e:  # noqa: BLE001
            error = e
        return result, settle(group, ctx.method, group.agree(error), error)

    def _release_followers(self) -> None:
        try:
            if self.group is not None:
                self.group.broadcast(("shutdown",))
        except Exception as e:  # noqa: BLE001  a rank already gone
            log.warning("could not tell the other ranks to stop: %s", e)
        finally:
            self.followers_released.set()


def method_modules() -> list[str]:
    """The handler modules the warm-up imports: every module of nanotune.methods, then
    those named in NANOTUNE_SIDECAR_MODULES (comma separated)."""
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


def main(endpoint: str, device: str, parent_pid: int | None, keys: CurveKeys | None = None,
         on_exit: Any = None, group: Any = None) -> None:
    """Serves until shutdown, SIGTERM or the parent's death, then exits the process
    (os._exit: the compute thread may be inside torch); `on_exit()` runs just before."""
    logging.basicConfig(level=os.environ.get("NANOTUNE_LOG", "WARNING").upper(), stream=sys.stderr,
                        format="[sidecar %(process)d] %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which closes us
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack on stderr
    _die_with_parent()
    runtime = Runtime(endpoint, device, parent_pid, keys, group)

    def on_term(signum, frame):  # noqa: ARG001
        runtime.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    # The one line on stdout: the TS client waits for it, then connects.
    sys.stdout.write(msgspec.json.encode({"ready": runtime.endpoint, "pid": os.getpid()}).decode() + "\n")
    sys.stdout.flush()
    try:
        runtime.serve()
    except BaseException:
        log.exception("the I/O loop failed; exiting")
        raise
    finally:
        if group is not None:  # the other ranks exit when told, or when their collective fails
            runtime.jobs.put(None)
            runtime.followers_released.wait(2.0)
        runtime.router.close()  # returns once the last replies are sent, or after 1 s
        if on_exit is not None:
            on_exit()
        sys.stderr.flush()
        os._exit(0)  # the compute thread may be inside torch; do not wait for it
