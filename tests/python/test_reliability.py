"""Nothing lost, nobody in: refused non-finite steps, session generations, checkpoints
that are replaced atomically (also under kill -9) and loads that validate everything
before they change anything; in process and through the real sidecar."""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import random
import re
import subprocess
import sys
import threading

import msgspec
import pytest
import torch

import nanotune
from nanotune import wire
from nanotune.checkpoint import TMP_MARKER, CheckpointError, is_checkpoint, load_checkpoint, save_checkpoint
from nanotune.errors import NanotuneError
from nanotune.session import Session

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(40)]
MASK = {"criterion": "small_weights", "density": 0.1}
PYTHON_DIR = pathlib.Path(os.path.abspath(nanotune.__file__)).parent.parent  # the nanotune these tests import


def make_session(data_path, optimizer=None, **load) -> Session:
    s = Session(device="cpu")
    s.load_model(path="tiny-llama", **load)
    s.load_dataset(path=str(data_path), eval_fraction=0.1, seed=3)
    s.create_optimizer(**(optimizer or {"name": "nanoadam", "lr": 1e-3, "density": 0.1}))
    return s


@pytest.fixture
def data_path(write_jsonl):
    return write_jsonl(ROWS)


def bits(x):
    """A value with every tensor replaced by its bytes: == is then bit-identity (NaN too)."""
    if torch.is_tensor(x):
        t = x.detach().cpu().contiguous()
        return (str(t.dtype), tuple(t.shape), bytes(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    if isinstance(x, dict):
        return {k: bits(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(bits(v) for v in x)
    return x


def snapshot(s: Session) -> dict:
    """Everything a refused step or a failed load must leave as it was."""
    return {
        "weights": bits(dict(s.loaded.model.state_dict())),
        "optimizer": bits(copy.deepcopy(s.optimizer.state_dict())),
        "data": None if s.batches is None else s.batches.state_dict(),
        "step": s.step,
        "mask": s.mask,
        "generation": s.generation,
        "rng": bits(torch.get_rng_state()),
        "eval": bits(torch.tensor(s.evaluate(batch_size=4).loss, dtype=torch.float64)),
    }


# --------------------------------------------------------------------------- non-finite steps

@pytest.mark.parametrize("optimizer", [
    {"name": "nanoadam", "density": 0.1},
    {"name": "nanoadam", "density": 0.1, "sparse_gradients": True},
    {"name": "adamw"},
], ids=["nanoadam", "nanoadam-sparse-gradients", "adamw"])
def test_a_non_finite_step_is_not_applied_and_an_earlier_checkpoint_recovers(tiny_dir, data_path, tmp_path,
                                                                                optimizer):
    s = make_session(data_path, optimizer)
    nano = optimizer["name"] == "nanoadam"
    s.train_step(lr=1e-2, micro_batch=2, mask=MASK if nano else None)
    s.train_step(lr=1e-2, micro_batch=2)
    s.save_checkpoint(path=str(tmp_path / "good"))
    good_eval = s.evaluate(batch_size=4).loss
    s.train_step(lr=1e10, micro_batch=2)  # finite loss and gradients; the update ruins the weights
    refused = None
    for _ in range(3):  # the first step whose loss or gradient is non-finite is refused
        before = snapshot(s)
        try:
            # with a mask decision: it must not stay pending after a refused step
            s.train_step(lr=1e-3, micro_batch=2, mask={"criterion": "random", "density": 0.05} if nano else None)
        except NanotuneError as e:
            refused = e
        else:
            continue
        assert refused.code == "NON_FINITE", refused
        assert set(refused.data) == {"step", "loss", "gradNorm"} and refused.data["step"] == before["step"] == 3
        loss, norm = refused.data["loss"], refused.data["gradNorm"]
        assert isinstance(loss, float) and isinstance(norm, float)
        assert not (math.isfinite(loss) and math.isfinite(norm))
        after = snapshot(s)
        assert after.pop("data") != before.pop("data")  # the bad batch is consumed: a skip moves on
        assert after == before  # weights, moments, masks, step counters, pending refresh, mask, step
        assert all(p.grad is None for p in s.loaded.model.parameters())
        break
    assert refused is not None, "lr 1e10 never led to a non-finite step"
    with pytest.raises(NanotuneError, match="NON_FINITE|not finite"):  # and again: still refused, still step 3
        s.train_step(lr=1e-3, micro_batch=2)
    assert s.step == 3

    out = s.load_checkpoint(path=str(tmp_path / "good"))
    assert out.step == s.step == 2 and s.evaluate(batch_size=4).loss == good_eval
    losses = [s.train_step(lr=1e-2, micro_batch=2).loss for _ in range(4)]
    assert all(math.isfinite(x) for x in losses)
    assert s.evaluate(batch_size=4).loss < good_eval  # it trains again
    assert s.step == 6


# --------------------------------------------------------------------------- session generations

def test_a_call_of_an_older_generation_changes_nothing_and_the_new_one_works(tiny_dir, data_path, tmp_path):
    s = Session(device="cpu")
    g1 = s.load_model(path="tiny-llama").generation
    s.load_dataset(path=str(data_path), eval_fraction=0.1, seed=3, generation=g1)
    g2 = s.create_optimizer(name="nanoadam", density=0.1, generation=g1).generation
    assert g2 == g1 + 1 == s.generation
    s.train_step(lr=1e-2, micro_batch=2, mask=MASK, generation=g2)
    s.train_step(lr=1e-2, micro_batch=2)  # no generation: the current one
    s.save_checkpoint(path=str(tmp_path / "c"), generation=g2)
    g3 = s.load_model(path="tiny-llama", seed=1).generation  # "another client" starts a new run
    assert g3 == g2 + 1
    s.create_optimizer(name="nanoadam", density=0.1)
    g4 = s.generation
    before = snapshot(s)
    stale = {
        "train_step": lambda: s.train_step(lr=1e-2, micro_batch=2, generation=g2),
        "evaluate": lambda: s.evaluate(generation=g2),
        "generate": lambda: s.generate(prompt="Add", max_new_tokens=2, generation=g2),
        "save_checkpoint": lambda: s.save_checkpoint(path=str(tmp_path / "stale"), generation=g2),
        "load_checkpoint": lambda: s.load_checkpoint(path=str(tmp_path / "c"), generation=g2),
        "load_dataset": lambda: s.load_dataset(path=str(data_path), generation=g2),
        "create_optimizer": lambda: s.create_optimizer(name="adamw", generation=g2),
        "set_mask_policy": lambda: s.set_mask_policy(wire.SetMaskPolicyParams(criterion="random", density=0.2,
                                                                              generation=g2)),
        "refresh_mask": lambda: s.refresh_mask(mask=wire.MaskDecision(**MASK), generation=g2),
        "get_masks": lambda: s.get_masks(generation=g2),
    }
    for method, call in stale.items():
        with pytest.raises(NanotuneError) as e:
            call()
        assert e.value.code == "SESSION_CHANGED", (method, e.value)
        assert e.value.data == {"expected": g4, "got": g2}, method
        assert e.value.message.startswith(f"{method}:") and str(g2) in e.value.message and str(g4) in e.value.message
    assert snapshot(s) == before and not (tmp_path / "stale").exists()
    assert s.optimizer_params.name == "nanoadam"
    out = s.train_step(lr=1e-2, micro_batch=2, mask=MASK, generation=g4)
    assert out.step == 0 and math.isfinite(out.loss)
    assert s.evaluate(generation=g4).step == 1


# --------------------------------------------------------------------------- saving

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_save_refuses_a_path_that_is_not_a_checkpoint_and_touches_nothing(tiny, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_bytes(b"\x00precious\xff" * 100)
    for target in (user, user / "thesis.tex"):
        with pytest.raises(CheckpointError) as e:
            save_checkpoint(target, tiny.model, tiny.tokenizer, None, None, step=1)
        assert e.value.code == "INVALID_PARAMS" and e.value.data == {"path": str(target)}
        assert str(target) in e.value.message and "not a nanotune checkpoint" in e.value.message
    assert sorted(p.name for p in user.iterdir()) == ["thesis.tex"]
    assert (user / "thesis.tex").read_bytes() == b"\x00precious\xff" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp dir left either
    (tmp_path / "empty").mkdir()  # an empty directory holds nothing to lose
    save_checkpoint(tmp_path / "empty", tiny.model, tiny.tokenizer, None, None, step=1)
    assert is_checkpoint(tmp_path / "empty")


def test_replacing_a_checkpoint_is_atomic(tiny, tmp_path, monkeypatch):
    """The path holds a complete checkpoint at every moment of a replacing save: a
    watcher thread never sees it without trainer_state.json, and no rename the save
    makes happens while the path is empty (two renames would leave a gap)."""
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, tiny.model, tiny.tokenizer, None, {"epoch": 0, "index": 0}, step=0)
    gaps, stop = [], threading.Event()
    real_rename = os.rename

    def rename(a, b, *args, **kw):
        if not is_checkpoint(ckpt):
            gaps.append(("rename", a, b))
        return real_rename(a, b, *args, **kw)

    def watch():
        while not stop.is_set():
            if not (ckpt / "trainer_state.json").is_file():
                gaps.append("watcher")

    monkeypatch.setattr(os, "rename", rename)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for step in range(1, 9):
            save_checkpoint(ckpt, tiny.model, tiny.tokenizer, None, {"epoch": 0, "index": step}, step=step)
    finally:
        stop.set()
        watcher.join()
    assert gaps == []
    state = load_checkpoint(ckpt)
    assert (state.step, state.data_state) == (8, {"epoch": 0, "index": 8})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_stale_temp_dirs_of_ours_go_at_the_next_save_and_a_users_stay(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, tiny.model, tiny.tokenizer, None, None, step=1)
    pid = dead_pid()
    partial = tmp_path / f".ckpt.tmp-{pid}-aaaa"  # killed while writing: our marker, half the files
    (partial / "model").mkdir(parents=True)
    (partial / TMP_MARKER).write_text("{}")
    (partial / "model" / "config.json").write_text("{")
    swapped = tmp_path / f".ckpt.tmp-{pid}-bbbb"  # killed after the swap: the old checkpoint, complete
    save_checkpoint(swapped, tiny.model, tiny.tokenizer, None, None, step=0)
    empty = tmp_path / f".other.tmp-{pid}-cccc"  # killed right after mkdtemp
    empty.mkdir()
    users = [tmp_path / ".tmp-foo", tmp_path / f".ckpt.tmp-{pid}-dddd"]  # no marker of ours
    for u in users:
        u.mkdir()
        (u / "notes.txt").write_text("mine")
    alive = tmp_path / f".ckpt.tmp-{os.getppid()}-eeee"  # a save in progress in a live process
    alive.mkdir()
    (alive / TMP_MARKER).write_text("{}")
    save_checkpoint(ckpt, tiny.model, tiny.tokenizer, None, None, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", alive.name, *(u.name for u in users)])
    assert all((u / "notes.txt").read_text() == "mine" for u in users)
    assert load_checkpoint(ckpt).step == 2


def test_a_complete_checkpoint_left_aside_goes_back_to_its_name(tiny, tmp_path):
    """The fallback replace (no RENAME_EXCHANGE) cut between its two renames: the old
    checkpoint sits complete under a temp name and <name> is missing. Loading says
    where it is; the next save into the parent puts it back."""
    save_checkpoint(tmp_path / "ckpt", tiny.model, tiny.tokenizer, None, None, step=4)
    aside = tmp_path / f".ckpt.tmp-{dead_pid()}-ffff"
    os.rename(tmp_path / "ckpt", aside)
    with pytest.raises(CheckpointError, match=f"does not exist; an interrupted save left a complete one at "
                                              f"'{aside}'"):
        load_checkpoint(tmp_path / "ckpt")
    save_checkpoint(tmp_path / "other", tiny.model, tiny.tokenizer, None, None, step=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "other"]
    assert load_checkpoint(tmp_path / "ckpt").step == 4


KILLER = r"""
import itertools, json, os, signal, sys, time
import torch
torch.set_num_threads(1)
from nanotune.checkpoint import save_checkpoint
from nanotune.models import load_model
from nanotune.training import create_optimizer

root, delays = sys.argv[1], json.loads(sys.argv[2])
lm = load_model("tiny-llama", device="cpu")
opt = create_optimizer(lm.model, "adamw")
for p in lm.model.parameters():
    p.grad = torch.ones_like(p)
opt.step()  # some optimizer state to write
for i, delay in enumerate(delays):
    path = os.path.join(root, f"run{i}", "ckpt")
    save_checkpoint(path, lm.model, lm.tokenizer, opt, {"epoch": 0, "index": 0}, step=0)  # the old one
    pid = os.fork()
    if pid == 0:  # the child saves over it until it is killed
        try:
            for n in itertools.count(1):
                save_checkpoint(path, lm.model, lm.tokenizer, opt, {"epoch": 0, "index": n}, step=n)
        finally:
            os._exit(0)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print("done", flush=True)
"""


def test_kill_9_during_saves_leaves_a_complete_checkpoint(tiny, tmp_path):
    delays = [0.05, 0.11, 0.2, 0.33, 0.5, 0.77, 1.1, 1.5]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PYTHON_DIR), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path), json.dumps(delays)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr[-3000:]
    opt = torch.optim.AdamW([p for p in tiny.model.parameters()])
    for p in tiny.model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    steps = []
    for i in range(len(delays)):
        parent = tmp_path / f"run{i}"
        state = load_checkpoint(parent / "ckpt", model=tiny.model, optimizer=opt)  # complete: old or new
        assert state.data_state["index"] == state.step
        steps.append(state.step)
        assert len([p for p in parent.iterdir() if ".tmp-" in p.name]) <= 1
        save_checkpoint(parent / "ckpt", tiny.model, tiny.tokenizer, opt, None, step=99)
        assert sorted(p.name for p in parent.iterdir()) == ["ckpt"]
        assert load_checkpoint(parent / "ckpt").step == 99
    assert max(steps) > 0  # the kills did land during replacing saves


# --------------------------------------------------------------------------- failed loads

def state_json(ckpt):
    return json.loads((ckpt / "trainer_state.json").read_text())


def write_state(ckpt, state):
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def fix_sizes(ckpt):
    """Records the current sizes, as if the checkpoint had been written like this."""
    state = state_json(ckpt)
    state["files"] = {rel: (ckpt / rel).stat().st_size if (ckpt / rel).is_file() else size
                      for rel, size in state["files"].items()}
    write_state(ckpt, state)


def edit_state(fn):
    def corrupt(ckpt, _):
        state = state_json(ckpt)
        fn(state)
        write_state(ckpt, state)
    return corrupt


def garbage_optimizer(ckpt, _):
    path = ckpt / "optimizer.pt"
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def adamw_optimizer(ckpt, _):
    from nanotune.models import load_model

    model = load_model("tiny-llama", device="cpu").model
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    fix_sizes(ckpt)


def short_moments(ckpt, _):
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    st = next(st for st in sd["state"].values() if "idx" in st)
    st["exp_avg"] = st["exp_avg"][:-1]
    torch.save(sd, ckpt / "optimizer.pt")
    fix_sizes(ckpt)


def missing_tensor(ckpt, _):
    from safetensors.torch import load_file, save_file

    path = ckpt / "model" / "model.safetensors"
    weights = load_file(path)
    del weights["model.norm.weight"]
    save_file(weights, path, metadata={"format": "pt"})
    fix_sizes(ckpt)


def link_out(ckpt, _):
    os.symlink("/etc/hostname", ckpt / "model" / "evil")
    edit_state(lambda s: s["files"].__setitem__("model/evil", 5))(ckpt, None)


def bad_rng(ckpt, _):
    torch.save({"torch": torch.zeros(3, dtype=torch.uint8), "python": (3, (1, 2), None)}, ckpt / "rng.pt")
    fix_sizes(ckpt)


def other_model_size(ckpt, tmp_path):
    """Replaces the checkpoint by one of a narrower tiny llama (hidden 32)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from nanotune.models import load_model

    tok = load_model("tiny-llama", device="cpu").tokenizer
    src = tmp_path / "narrow"
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(src)
    tok.save_pretrained(src)
    other = Session(device="cpu")
    other.load_model(path=str(src))
    other.create_optimizer(name="nanoadam", density=0.1)
    shutil.rmtree(ckpt)
    other.save_checkpoint(path=str(ckpt))


BAD_CHECKPOINTS = {
    "garbage optimizer.pt": (garbage_optimizer, r"optimizer.pt' is corrupt"),
    "optimizer.pt of adamw": (adamw_optimizer, r"optimizer.pt' does not fit this optimizer: 1 parameter groups, this optimizer has 2"),
    "moments of the wrong length": (short_moments, r"does not fit this optimizer: .*exp_avg"),
    "data of another dataset": (edit_state(lambda s: s["data_state"].__setitem__("num_examples", 99)),
                                r"num_examples=99 in the checkpoint but 36 here"),
    "data tokenized differently": (edit_state(lambda s: s["data_state"].__setitem__("fingerprint", "0" * 32)),
                                   r"tokenized examples differ"),
    "data batch size 0": (edit_state(lambda s: s["data_state"].__setitem__("batch_size", 0)), r"batch_size is 0"),
    "step -7": (edit_state(lambda s: s.__setitem__("step", -7)), r"invalid at step: Expected `int` >= 0"),
    "step missing": (edit_state(lambda s: s.pop("step")), r"missing required field `step`"),
    "another format": (edit_state(lambda s: s.__setitem__("format", "other-v9")), r"is not a nanotune-checkpoint-v1"),
    "files entry ../../../etc/shadow": (edit_state(lambda s: s["files"].__setitem__("../../../etc/shadow", 1)),
                                        r"files entry '../../../etc/shadow' is not a relative path inside"),
    "absolute files entry": (edit_state(lambda s: s["files"].__setitem__("/etc/passwd", 1)),
                             r"files entry '/etc/passwd' is not a relative path inside"),
    "files entry that links out": (link_out, r"files entry 'model/evil' is not a relative path inside"),
    "a tensor missing": (missing_tensor, r"lacks tensor 'model.norm.weight'"),
    "another model size": (other_model_size, r"tensor '[\w.]+' has shape \[.*\], the model's is \[.*\]"),
    "garbage rng.pt": (bad_rng, r"rng.pt' is corrupt: torch"),
    "bad extra": (edit_state(lambda s: s["extra"].__setitem__("mask", {"criterion": "big"})), r"extra.mask"),
}


@pytest.fixture
def trained(tiny_dir, data_path, tmp_path):
    """A session two steps past its checkpoint at step 2."""
    s = make_session(data_path)
    s.train_step(lr=1e-2, micro_batch=2, mask=MASK)
    s.train_step(lr=1e-2, micro_batch=2)
    s.save_checkpoint(path=str(tmp_path / "good"))
    s.train_step(lr=1e-2, micro_batch=3, mask={"criterion": "random", "density": 0.2})
    s.train_step(lr=1e-2, micro_batch=3)
    return s


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_failed_load_changes_nothing(trained, tmp_path, case):
    import shutil

    corrupt, message = BAD_CHECKPOINTS[case]
    ckpt = tmp_path / "bad"
    shutil.copytree(tmp_path / "good", ckpt)
    corrupt(ckpt, tmp_path)
    before = snapshot(trained)
    with pytest.raises(NanotuneError) as e:
        trained.load_checkpoint(path=str(ckpt))
    assert e.value.code == "INVALID_PARAMS", e.value
    assert str(ckpt) in e.value.message and e.value.data["path"].startswith(str(ckpt)), e.value.data
    assert msgspec.json.decode(msgspec.json.encode(e.value.data))  # plain data
    assert re.search(message, e.value.message), e.value.message
    assert snapshot(trained) == before
    trained.load_checkpoint(path=str(tmp_path / "good"))  # and the session still loads a good one
    assert trained.step == 2


def test_an_entry_pointing_outside_reveals_nothing_about_the_target(trained, tmp_path):
    import shutil

    messages = []
    for target in ("../../../etc/shadow", "../../../etc/no-such-file-here", "../../../" + "x" * 9):
        ckpt = tmp_path / "bad"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(tmp_path / "good", ckpt)
        edit_state(lambda s: s["files"].__setitem__(target, 1234))(ckpt, None)
        with pytest.raises(CheckpointError) as e:
            trained.load_checkpoint(path=str(ckpt))
        messages.append((e.value.message.replace(target, "<entry>"),
                         json.dumps(e.value.data).replace(target, "<entry>")))
    assert len(set(messages)) == 1, messages  # the same words whether the file exists or not
    assert not re.search(r"bytes|missing|exist|size|denied", messages[0][0])



# --------------------------------------------------------------------------- through the real sidecar

class Sidecar:
    def __init__(self, tmp_path):
        import zmq

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PYTHON_DIR),
                                                                         os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-m", "nanotune.sidecar", "--endpoint",
                                      f"ipc://{tmp_path}/s.sock", "--device", "cpu"], stdout=subprocess.PIPE, env=env)
        ready = json.loads(self.proc.stdout.readline())
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 60_000)
        self.sock.connect(ready["ready"])
        self.next_id = 0

    def call(self, method, params=None, frames=()):
        self.next_id += 1
        self.sock.send_multipart([msgspec.msgpack.encode({"v": wire.PROTOCOL_VERSION, "id": self.next_id,
                                                          "method": method, "params": params or {}}), *frames])
        while True:
            env, *_ = self.sock.recv_multipart()
            msg = msgspec.msgpack.decode(env)
            if "event" not in msg:
                assert msg["id"] == self.next_id, msg
                return msg

    def ok(self, method, params=None):
        msg = self.call(method, params)
        assert "result" in msg, msg
        return msg["result"]

    def close(self):
        try:
            self.call("shutdown")
            self.proc.wait(10)
        finally:
            self.sock.close()
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, nanotune_cache):
    s = Sidecar(tmp_path_factory.mktemp("sidecar"))
    yield s
    s.close()


def test_the_sidecar_refuses_non_finite_steps_and_stale_generations(sidecar, tiny_dir, data_path, tmp_path):
    c = sidecar
    g1 = c.ok("load_model", {"path": "tiny-llama"})["generation"]
    c.ok("load_dataset", {"path": str(data_path), "evalFraction": 0.1, "seed": 3, "generation": g1})
    g2 = c.ok("create_optimizer", {"name": "nanoadam", "density": 0.1, "generation": g1})["generation"]
    assert g2 == g1 + 1
    first = c.ok("train_step", {"lr": 1e-2, "microBatch": 2, "mask": MASK, "generation": g2})
    c.ok("save_checkpoint", {"path": str(tmp_path / "good"), "generation": g2})
    c.ok("train_step", {"lr": 1e10, "microBatch": 2, "generation": g2})
    err = c.call("train_step", {"lr": 1e-3, "microBatch": 2, "generation": g2})["error"]
    assert err["code"] == "NON_FINITE" and err["message"].startswith("train_step: step 2: "), err
    assert err["data"]["step"] == 2 and set(err["data"]) == {"step", "loss", "gradNorm"}
    assert not (math.isfinite(err["data"]["loss"]) and math.isfinite(err["data"]["gradNorm"]))
    assert c.ok("evaluate", {"generation": g2})["step"] == 2  # not counted

    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(tmp_path / "good", bad)
    edit_state(lambda s: s.__setitem__("step", -7))(bad, None)
    err = c.call("load_checkpoint", {"path": str(bad), "generation": g2})["error"]
    assert err["code"] == "INVALID_PARAMS" and "step" in err["message"], err
    resumed = c.ok("load_checkpoint", {"path": str(tmp_path / "good"), "generation": g2})
    assert resumed["step"] == 1
    again = c.ok("train_step", {"lr": 1e-2, "microBatch": 2, "generation": g2})
    assert math.isfinite(again["loss"]) and again["loss"] < first["loss"] and again["step"] == 1

    g3 = c.ok("load_model", {"path": "tiny-llama"})["generation"]  # another client's run
    for method, params in (("train_step", {"lr": 1e-3}), ("create_optimizer", {"name": "adamw"}),
                           ("save_checkpoint", {"path": str(tmp_path / "stale")})):
        err = c.call(method, {**params, "generation": g2})["error"]
        assert err["code"] == "SESSION_CHANGED" and err["data"] == {"expected": g3, "got": g2}, err
        assert err["message"].startswith(f"{method}: ") and str(g2) in err["message"] and str(g3) in err["message"]
    assert not (tmp_path / "stale").exists()
    g4 = c.ok("create_optimizer", {"name": "nanoadam", "density": 0.1, "generation": g3})["generation"]
    assert g4 == g3 + 1
    assert math.isfinite(c.ok("train_step", {"lr": 1e-2, "microBatch": 2, "mask": MASK, "generation": g4})["loss"])


@pytest.mark.parametrize("ref, frame, why", [
    ({"dtype": "float32", "shape": [-1], "frame": 0}, b"", "params.tensor.shape"),
    ({"dtype": "float32", "shape": [2], "frame": -1}, b"\0" * 8, "params.tensor.frame"),
    ({"dtype": "float32", "shape": [3], "frame": 0}, b"\0" * 8, "needs 12 bytes but frame 0 has 8"),
    ({"dtype": "int64", "shape": [2, 2**61], "frame": 0}, b"\0" * 16, "needs"),
    ({"dtype": "float32", "shape": [0, 2**63], "frame": 0}, b"", "too large for a tensor"),
    ({"dtype": "float32", "shape": [2**62, 2**62, 0], "frame": 0}, b"", "too large for a tensor"),
    ({"dtype": "float32", "shape": [0, 2**64 - 1], "frame": 0}, b"", "too large for a tensor"),
    ({"dtype": "complex64", "shape": [1], "frame": 0}, b"\0" * 8, "params.tensor.dtype"),
])
def test_bad_tensor_refs_are_invalid_params_through_the_sidecar(sidecar, ref, frame, why):
    err = sidecar.call("debug.echo", {"tensor": ref}, [frame])["error"]
    assert err["code"] == "INVALID_PARAMS" and why in err["message"], err
    assert "traceback" not in err
    assert sidecar.ok("ping") == {}
