"""The sidecar process over a raw pyzmq DEALER: handshake, control calls during a
compute call, cancellation, validation errors that name the field, tensors, exits."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import msgspec
import numpy as np
import pytest
import zmq

ROOT = pathlib.Path(__file__).resolve().parents[2]


def env():
    """Read when a sidecar starts, so it gets conftest's private NANOTUNE_CACHE."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python"), os.environ.get("PYTHONPATH")]))}


def alive(pid):
    """Whether pid runs; a zombie (exited, not yet reaped by whoever adopted it) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def start(tmp_path, *extra):
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanotune.sidecar", "--endpoint", f"ipc://{tmp_path}/s.sock", "--device", "cpu", *extra],
        stdout=subprocess.PIPE, env=env(),
    )
    ready = json.loads(proc.stdout.readline())
    assert ready["pid"] == proc.pid
    return proc, ready["ready"]


class Client:
    def __init__(self, endpoint):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 30_000)
        self.sock.connect(endpoint)
        self.next_id = 0
        self.events = []

    def send(self, method, params=None, frames=(), v=1):
        self.next_id += 1
        self.sock.send_multipart([msgspec.msgpack.encode({"v": v, "id": self.next_id, "method": method, "params": params or {}}), *frames])
        return self.next_id

    def recv(self, rid):
        while True:
            env, *frames = self.sock.recv_multipart()
            msg = msgspec.msgpack.decode(env)
            if "event" in msg:
                self.events.append(msg)
                continue
            assert msg["id"] == rid, msg
            return msg, frames

    def call(self, method, params=None, frames=()):
        return self.recv(self.send(method, params, frames))


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    proc, endpoint = start(tmp_path_factory.mktemp("sidecar"))
    client = Client(endpoint)
    yield proc, client
    assert client.call("shutdown")[0]["result"] == {}
    assert proc.wait(10) == 0
    client.sock.close()


def test_hello_reports_the_runtime_and_rejects_another_version(sidecar):
    proc, c = sidecar
    msg, _ = c.call("hello", {"protocol": 1})
    r = msg["result"]
    assert r["protocol"] == 1 and r["pid"] == proc.pid and r["device"] == "cpu" and r["cuda"] is None
    msg, _ = c.call("hello", {"protocol": 7})
    assert msg["error"]["code"] == "PROTOCOL_MISMATCH"
    assert "v7" in msg["error"]["message"] and "v1" in msg["error"]["message"]


def test_load_model_defaults_to_the_device_hello_reports(sidecar):
    """Started with --device cpu: hello says cpu and load_model without a device (or
    "auto") loads there, whatever torch sees (models.resolve_device decides both)."""
    _, c = sidecar
    device = c.call("hello", {"protocol": 1})[0]["result"]["device"]
    for params in ({"path": "tiny-llama"}, {"path": "tiny-llama", "device": "auto"}):
        r = c.call("load_model", params)[0]["result"]
        assert r["device"] == device == "cpu" and r["dtype"] == "float32"


def test_our_errors_become_replies_with_their_code_and_data(sidecar, tmp_path):
    _, c = sidecar
    c.call("load_model", {"path": "tiny-llama"})
    err = c.call("load_dataset", {"path": str(tmp_path / "nope.jsonl")})[0]["error"]
    assert err["code"] == "INVALID_PARAMS" and err["data"] == {"path": str(tmp_path / "nope.jsonl")}
    assert err["message"].startswith(f"load_dataset: {tmp_path / 'nope.jsonl'}: ") and "traceback" not in err
    err = c.call("train_step", {"lr": 1e-3})[0]["error"]  # before create_optimizer: a SessionError
    assert err["code"] == "INVALID_PARAMS" and err["data"] == {"field": "optimizer"}
    err = c.call("train_step", {"lr": 1e-3, "microBatch": 0})[0]["error"]  # the schema's microBatch >= 1
    assert err["code"] == "INVALID_PARAMS" and err["data"] == {"field": "params.microBatch"}
    err = c.call("load_model", {"path": "tiny-llama", "device": "gpu7"})[0]["error"]
    assert err["code"] == "INVALID_PARAMS" and err["data"] == {"field": "device"} and "'gpu7'" in err["message"]


def test_control_calls_are_answered_during_a_compute_call_which_cancel_ends(sidecar):
    _, c = sidecar
    busy = c.send("debug.busy", {"seconds": 5, "tickEveryS": 0.05})
    while c.call("status")[0]["result"]["busy"] is None:
        time.sleep(0.01)
    assert c.call("ping")[0] == {"id": c.next_id, "result": {}}
    time.sleep(0.2)  # let it tick
    assert c.call("debug.busy", {"seconds": 1})[0]["error"]["code"] == "BUSY"
    assert c.call("cancel", {"id": busy})[0]["result"] == {"cancelled": True, "id": busy}
    msg, _ = c.recv(busy)
    assert msg["error"] == {"code": "CANCELLED", "message": "debug.busy: cancelled"}
    assert c.call("cancel")[0]["result"] == {"cancelled": False, "id": None}
    assert c.call("debug.busy", {"seconds": 0.01})[0]["result"]["iterations"] > 0
    assert any(e["event"] == "debug:tick" for e in c.events)


@pytest.mark.parametrize(
    "method, params, code, message",
    [
        ("debug.busy", {"seconds": "x"}, "INVALID_PARAMS", "debug.busy: invalid params at params.seconds: Expected `float`, got `str`"),
        ("debug.busy", {}, "INVALID_PARAMS", "params.seconds: Object missing required field `seconds`"),
        ("ping", {"x": 1}, "INVALID_PARAMS", "params.x: Object contains unknown field `x`"),
        ("debug.echo", {"tensor": {"dtype": "float32", "shape": [2], "frame": 3}}, "INVALID_REQUEST", "frame 3 does not exist"),
        ("no.such", {}, "UNKNOWN_METHOD", "unknown method 'no.such'"),
    ],
)
def test_bad_requests_get_errors_naming_what_was_wrong(sidecar, method, params, code, message):
    _, c = sidecar
    err = c.call(method, params)[0]["error"]
    assert err["code"] == code
    assert message in err["message"]


def test_undecodable_envelopes_are_answered_without_an_id(sidecar):
    _, c = sidecar
    c.sock.send_multipart([b"\xc1garbage"])
    msg = msgspec.msgpack.decode(c.sock.recv_multipart()[0])
    assert msg["id"] is None and msg["error"]["code"] == "INVALID_REQUEST"
    c.sock.send_multipart([msgspec.msgpack.encode({"v": 1, "id": 77, "method": 5})])
    msg = msgspec.msgpack.decode(c.sock.recv_multipart()[0])
    assert msg["id"] == 77 and "envelope.method" in msg["error"]["message"]
    assert c.call("ping")[0]["result"] == {}


def test_random_bytes_each_get_an_error_reply_and_the_sidecar_keeps_serving(sidecar):
    _, c = sidecar
    rng = np.random.default_rng(1)
    n = 2000
    for _ in range(n):
        c.sock.send_multipart([rng.bytes(int(rng.integers(0, 80))) for _ in range(int(rng.integers(1, 3)))])
    codes = [msgspec.msgpack.decode(c.sock.recv_multipart()[0])["error"]["code"] for _ in range(n)]
    assert set(codes) <= {"INVALID_REQUEST", "INVALID_PARAMS", "UNKNOWN_METHOD", "PROTOCOL_MISMATCH"}
    assert c.call("ping")[0]["result"] == {}


def test_a_tensor_round_trips_bit_exact(sidecar):
    _, c = sidecar
    a = np.random.default_rng(0).integers(0, 2**32, size=(1024, 1024), dtype=np.uint32).view(np.float32)
    msg, frames = c.call("debug.echo", {"tensor": {"dtype": "float32", "shape": [1024, 1024], "frame": 0}}, [a.tobytes()])
    assert msg["result"]["tensor"] == {"dtype": "float32", "shape": [1024, 1024], "frame": 0}
    assert frames[0] == a.tobytes()


def test_a_failed_warm_up_is_reported_by_hello_and_every_compute_call(tmp_path):
    proc, endpoint = start(tmp_path, "--device", "gpu7")  # the last --device wins
    c = Client(endpoint)
    try:
        for method, params in (("hello", {"protocol": 1}), ("debug.store", {"key": "k"})):
            err = c.call(method, params)[0]["error"]
            assert err["code"] == "INTERNAL", err
            assert err["message"].startswith(f"{method}: the sidecar failed to start: device: 'gpu7' is not a device")
        assert c.call("status")[0]["result"]["ready"] is True
        assert c.call("shutdown")[0]["result"] == {}
        assert proc.wait(10) == 0
    finally:
        c.sock.close()
        if proc.poll() is None:
            proc.kill()


def test_it_exits_when_the_parent_dies(tmp_path):
    # parent: a Python process that starts the sidecar with itself as parent, then sleeps
    code = (
        "import subprocess, sys, os, time;"
        f"p = subprocess.Popen([sys.executable, '-m', 'nanotune.sidecar', '--endpoint', 'ipc://{tmp_path}/p.sock', '--parent-pid', str(os.getpid())], stdout=subprocess.PIPE);"
        "print(p.pid, flush=True); p.stdout.readline(); print('ready', flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env(), text=True)
    pid = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "ready"
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not alive(pid):
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the sidecar outlived its parent by 5 s")


def test_sigterm_stops_it_and_removes_the_socket(tmp_path):
    proc, endpoint = start(tmp_path)
    path = endpoint[len("ipc://"):]
    assert os.path.exists(path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert not os.path.exists(path)
