"""The sidecar process over a raw pyzmq DEALER: handshake, control calls during a
compute call, cancellation, validation errors that name the field, malformed
requests (each answered, with its id whenever it can be read), tcp with CURVE only
for our client's key, tensors, exits. Nothing here sleeps a fixed time to let
something happen: tests wait for the state they need, with generous deadlines."""
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


def start(tmp_path, *extra, endpoint=None, keys=None, stderr=None):
    """A sidecar on ipc in tmp_path (or `endpoint`); `keys`: the CURVE keys line is
    written on its stdin (--keys-from-stdin)."""
    cmd = [sys.executable, "-m", "nanotune.sidecar", "--endpoint", endpoint or f"ipc://{tmp_path}/s.sock", "--device", "cpu", *extra]
    if keys is not None:
        cmd.append("--keys-from-stdin")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE if keys else None, stderr=stderr, env=env())
    if keys is not None:
        proc.stdin.write(json.dumps({"curve": {"serverPublicKey": keys["server"][0].decode(), "serverSecretKey": keys["server"][1].decode(),
                                               "clientPublicKey": keys["client"][0].decode()}}).encode() + b"\n")
        proc.stdin.close()
    line = proc.stdout.readline()
    if not line:
        return proc, None
    ready = json.loads(line)
    assert ready["pid"] == proc.pid
    return proc, ready["ready"]


def curve_keys():
    return {"server": zmq.curve_keypair(), "client": zmq.curve_keypair()}


class Client:
    def __init__(self, endpoint, server_key=None, client_keys=None, timeout_ms=30_000):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.sock.setsockopt(zmq.SNDTIMEO, timeout_ms)  # a peer whose handshake failed has no pipe to send on
        if server_key is not None:
            self.sock.curve_serverkey = server_key
            self.sock.curve_publickey, self.sock.curve_secretkey = client_keys or zmq.curve_keypair()
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
    assert r["transport"] == "ipc" and r["security"] == "ipc-private-dir"
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
    # A field our code names in snake_case comes back in the wire's camelCase, as the client wrote it.
    rows = tmp_path / "three.jsonl"
    rows.write_text("".join(f'{{"text": "row {i}"}}\n' for i in range(3)))
    err = c.call("load_dataset", {"path": str(rows), "evalFraction": 0.99})[0]["error"]
    assert err["code"] == "INVALID_PARAMS" and err["data"]["field"] == "evalFraction", err


def test_control_calls_are_answered_during_a_compute_call_which_cancel_ends(sidecar):
    _, c = sidecar
    busy = c.send("debug.busy", {"seconds": 60, "tickEveryS": 0.05})  # cancelled below
    while c.call("status")[0]["result"]["busy"] is None:
        time.sleep(0.01)
    assert c.call("ping")[0] == {"id": c.next_id, "result": {}}
    deadline = time.monotonic() + 30
    while not any(e["event"] == "debug:tick" for e in c.events):  # events arrive while it runs
        assert time.monotonic() < deadline, "no debug:tick within 30 s"
        c.events.append(msgspec.msgpack.decode(c.sock.recv_multipart()[0]))
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


def test_random_and_malformed_frames_each_get_a_reply_and_the_sidecar_keeps_serving(sidecar):
    """Random bytes, and malformed requests whose id is readable (deep nesting, bad
    fields, bad tensor refs, extra frames): every one gets exactly one reply, those
    with a readable id get it back; the sidecar keeps serving."""
    _, c = sidecar
    c.call("hello", {"protocol": 1})  # after the warm-up: an unknown method is UNKNOWN_METHOD, not a job that may load
    rng = np.random.default_rng(1)
    enc = msgspec.msgpack.encode
    malformed = [
        lambda rid: [_deep(rid, 1000, bool(rng.integers(0, 2)))],
        lambda rid: [enc({"id": rid, "v": 1, "method": "ping", "params": [1]})],
        lambda rid: [enc({"id": rid, "v": "1", "method": "ping"})],
        lambda rid: [enc({"id": rid, "v": 1, "method": "debug.busy", "params": {"seconds": -1}})],
        lambda rid: [enc({"id": rid, "v": 1, "method": "debug.echo", "params": {"tensor": {"dtype": "int8", "shape": [3], "frame": 0}}}), b"xy"],
        lambda rid: [enc({"id": rid, "v": 1, "method": "ping"}), *[b"extra"] * int(rng.integers(1, 4))],
        lambda rid: [enc({"id": rid, "v": 1, "method": "no.such"})],
        lambda rid: [enc({"id": rid, "v": 1, "method": "ping", "params": {"x": 1}})[:-1]],  # truncated after the id
    ]
    n, expected = 2000, set()
    for i in range(n):
        if i % 2:
            rid = 10_000 + i
            expected.add(rid)
            c.sock.send_multipart(malformed[int(rng.integers(0, len(malformed)))](rid))
        else:
            c.sock.send_multipart([rng.bytes(int(rng.integers(0, 80))) for _ in range(int(rng.integers(1, 3)))])
    replies = [msgspec.msgpack.decode(c.sock.recv_multipart()[0]) for _ in range(n)]
    codes = {r["error"]["code"] for r in replies if "error" in r}
    assert codes <= {"INVALID_REQUEST", "INVALID_PARAMS", "UNKNOWN_METHOD", "PROTOCOL_MISMATCH"}
    assert expected <= {r["id"] for r in replies}
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


# ---- malformed requests: each gets a reply, with its id whenever it can be read ----


def _deep(rid, depth, id_last):
    """{id, v, method: debug.echo, params: {value: [[...]]}}, `depth` msgpack levels in all."""
    id_part = b"\xa2id" + b"\xce" + rid.to_bytes(4, "big")
    body = b"\xa1v\x01\xa6method\xaadebug.echo\xa6params\x81\xa5value" + b"\x91" * (depth - 2) + b"\xc0"
    return b"\x84" + (body + id_part if id_last else id_part + body)


@pytest.mark.parametrize("depth", [100, 1000, 100_000])
@pytest.mark.parametrize("id_last", [False, True])
def test_deeply_nested_requests_are_answered_with_their_id(sidecar, depth, id_last):
    _, c = sidecar
    c.sock.send_multipart([_deep(4242, depth, id_last)])
    msg = msgspec.msgpack.decode(c.sock.recv_multipart()[0])
    assert msg["id"] == 4242, msg
    if depth == 100:  # within what msgspec decodes: echoed back
        assert "result" in msg
    else:
        assert msg["error"]["code"] == "INVALID_REQUEST"
        assert "nested deeper than the sidecar decodes" in msg["error"]["message"]
    assert c.call("ping")[0]["result"] == {}


@pytest.mark.parametrize(
    "envelope, frames, rid, code, message",
    [
        ({"v": 1, "id": 2**64 - 1, "method": "ping"}, [], 2**64 - 1, None, None),
        ({"v": 1, "id": -5, "method": "ping"}, [], None, "INVALID_REQUEST", "envelope.id: Expected `int` >= 0"),
        ({"v": 1, "id": "x", "method": "ping"}, [], None, "INVALID_REQUEST", "envelope.id: Expected `int`"),
        ({"id": 31, "v": 1, "method": 7, "params": {"a": [[[["deep"]]]]}}, [], 31, "INVALID_REQUEST", "envelope.method"),
        ({"v": 1, "id": 32, "method": "ping", "extra": True}, [], 32, "INVALID_REQUEST", "unknown field `extra`"),
        ({"v": 1, "id": 33, "method": "ping"}, [b"x", b"y"], 33, None, None),  # extra frames are ignored
        ({"v": 1, "id": 34, "method": "debug.echo", "params": {"tensor": {"dtype": "uint8", "shape": [-1], "frame": 0}}}, [b"x"],
         34, "INVALID_PARAMS", "params.tensor.shape[0]: Expected `int` >= 0"),
        ({"v": 1, "id": 35, "method": "debug.echo", "params": {"tensor": {"dtype": "uint8", "shape": [1], "frame": -1}}}, [b"x"],
         35, "INVALID_PARAMS", "params.tensor.frame: Expected `int` >= 0"),
        ({"v": 1, "id": 36, "method": "debug.echo", "params": {"tensor": {"dtype": "float32", "shape": [2**40, 2**40], "frame": 0}}},
         [b"abcd"], 36, "INVALID_PARAMS", "needs 4835703278458516698824704 bytes but frame 0 has 4"),
        ({"v": 1, "id": 37, "method": "debug.echo", "params": {"tensor": {"dtype": "float32", "shape": [2], "frame": 1}}}, [b"12345678"],
         37, "INVALID_REQUEST", "frame 1 does not exist"),
    ],
)
def test_malformed_envelopes_and_frames_get_a_reply_with_their_id(sidecar, envelope, frames, rid, code, message):
    _, c = sidecar
    c.sock.send_multipart([msgspec.msgpack.encode(envelope), *frames])
    msg = msgspec.msgpack.decode(c.sock.recv_multipart()[0])
    assert msg["id"] == rid, msg
    if code is None:
        assert msg["result"] == {}
    else:
        assert msg["error"]["code"] == code and message in msg["error"]["message"], msg
    assert c.call("ping")[0]["result"] == {}


def test_a_truncated_envelope_is_answered_with_its_id_once_the_id_is_readable(sidecar):
    _, c = sidecar
    full = msgspec.msgpack.encode({"id": 77, "v": 1, "method": "debug.store", "params": {"key": "k", "value": [1, 2, {"x": "y"}]}})
    id_end = len(msgspec.msgpack.encode({"id": 77}))
    for cut in range(len(full)):
        c.sock.send_multipart([full[:cut]])
        msg = msgspec.msgpack.decode(c.sock.recv_multipart()[0])
        assert msg["error"]["code"] == "INVALID_REQUEST"
        assert msg["id"] == (77 if cut >= id_end else None), (cut, msg)
    assert c.call("ping")[0]["result"] == {}


def test_the_id_scan_reads_only_the_top_level_map_and_never_raises():
    from nanotune.sidecar.transport import scan_request_id

    enc = msgspec.msgpack.encode
    assert scan_request_id(enc({"v": 1, "id": 5})) == ("map", 5)
    assert scan_request_id(enc({"params": {"id": 9, "a": [1, {"id": 8}]}, "id": 2**64 - 1})) == ("map", 2**64 - 1)
    assert scan_request_id(enc({"params": {"id": 9}})) == ("map", None)  # a nested "id" is not the request's
    assert scan_request_id(enc({"id": -1})) == ("map", None)
    assert scan_request_id(enc({"id": 1.0})) == ("map", None)
    assert scan_request_id(enc([1, 2])) == ("array", None)
    assert scan_request_id(b"") == (None, None) and scan_request_id(b"\xc1") == (None, None)
    # ext, bin and str of every size class are skipped by their length
    big = {"e": msgspec.msgpack.Ext(1, b"x" * 300), "b": b"y" * 70_000, "s": "z" * 70_000, "f": 1.5, "i": -2**40}
    assert scan_request_id(enc({**big, "id": 3})) == ("map", 3)
    rng = np.random.default_rng(2)
    for _ in range(20_000):  # garbage: never an exception, never a hang
        scan_request_id(rng.bytes(int(rng.integers(0, 60))))


# ---- tcp: ZeroMQ CURVE, only our client's key --------------------------------------


def test_tcp_is_refused_without_curve_keys(tmp_path):
    proc, endpoint = start(tmp_path, endpoint="tcp://127.0.0.1:*", stderr=subprocess.PIPE)
    assert endpoint is None
    assert proc.wait(30) != 0
    assert "refusing to serve tcp://127.0.0.1:* without CURVE keys" in proc.stderr.read().decode()


def test_tcp_serves_only_the_client_whose_key_came_on_stdin(tmp_path):
    keys = curve_keys()
    proc, endpoint = start(tmp_path, endpoint="tcp://127.0.0.1:*", keys=keys)
    ours = Client(endpoint, keys["server"][0], keys["client"])
    strangers = [
        Client(endpoint, timeout_ms=2000),  # no CURVE
        Client(endpoint, keys["server"][0], zmq.curve_keypair(), timeout_ms=2000),  # another client key
        Client(endpoint, zmq.curve_keypair()[0], keys["client"], timeout_ms=2000),  # another server key
    ]
    try:
        r = ours.call("hello", {"protocol": 1})[0]["result"]
        assert r["transport"] == "tcp" and r["security"] == "curve"
        for s in strangers:
            with pytest.raises(zmq.Again):  # nothing within 2 s (the send may time out already)
                s.send("ping")
                s.sock.recv_multipart()
        assert ours.call("ping")[0]["result"] == {}
        assert ours.call("shutdown")[0]["result"] == {}
        assert proc.wait(10) == 0
    finally:
        for s in (ours, *strangers):
            s.sock.close()
        if proc.poll() is None:
            proc.kill()


def test_a_failed_ipc_bind_falls_back_to_tcp_only_with_curve(tmp_path):
    bad = f"ipc://{tmp_path}/no/such/dir/s.sock"
    proc, endpoint = start(tmp_path, endpoint=bad, stderr=subprocess.PIPE)  # no keys: no fallback
    assert endpoint is None and proc.wait(30) != 0
    assert "there is no tcp fallback without CURVE keys" in proc.stderr.read().decode()
    keys = curve_keys()
    proc, endpoint = start(tmp_path, endpoint=bad, keys=keys, stderr=subprocess.PIPE)
    c = Client(endpoint, keys["server"][0], keys["client"])
    try:
        assert endpoint.startswith("tcp://127.0.0.1:")
        r = c.call("hello", {"protocol": 1})[0]["result"]
        assert r["transport"] == "tcp" and r["security"] == "curve"
        assert c.call("shutdown")[0]["result"] == {}
        assert proc.wait(10) == 0
        assert "falling back to tcp://127.0.0.1 with CURVE" in proc.stderr.read().decode()
    finally:
        c.sock.close()
        if proc.poll() is None:
            proc.kill()
