"""Checkpoints that resume a run exactly and whose model part is a plain HF directory.

    <dir>/
      model/               save_pretrained: config.json, model.safetensors, tokenizer files;
                           AutoModelForCausalLM.from_pretrained(<dir>/model) loads it.
                           A LoRA run (a PEFT model) saves its adapter here instead, in PEFT's
                           format: adapter_config.json (base_model_name_or_path: the base's
                           local directory) + adapter_model.safetensors, and the tokenizer;
                           PeftModel.from_pretrained(base, <dir>/model) loads it (Note [adapter
                           checkpoints])
      optimizer.pt         optimizer.state_dict() (torch.save, loadable with weights_only=True)
      optimizer/           instead of optimizer.pt in a sidecar group: the same state through
                           torch.distributed.checkpoint (Note [group checkpoints])
      rng.pt               torch CPU/CUDA, Python `random` and numpy generator states
      trainer_state.json   {format, step, data_state, extra, files: {relative path: bytes}}, written last

A directory is a nanotune checkpoint when its trainer_state.json is a JSON object
whose "format" is CHECKPOINT_FORMAT (the format marker and its version).

Note [atomic checkpoints]: save_checkpoint writes everything into a temp directory
next to <dir>, named ".<name>.tmp-<pid>-<random>" and marked as ours by a
TMP_MARKER file created first. Every file and directory is fsynced, the marker is
removed (trainer_state.json, written last, now marks it), and the temp directory
takes <dir>'s place:
- <dir> absent (or an empty directory): one rename(2).
- <dir> an existing nanotune checkpoint: renameat2(RENAME_EXCHANGE) on Linux
  (renamex_np(RENAME_SWAP) on macOS) swaps the two directories in one atomic
  step, so at every moment <dir> holds either the complete old checkpoint or the
  complete new one; the old one, now under the temp name, is then deleted (the
  marker is put back into it first, so a crash mid-delete leaves a marked dir).
  Where the filesystem cannot exchange (EINVAL/ENOTSUP: NFS, some FUSE), it falls
  back to two renames (old aside under a temp name, new in); a crash between
  them leaves no <dir> but the old checkpoint complete under its temp name: the
  next save into that parent renames it back (see below), and load's error
  names it.
- anything else at <dir> (a file, a directory that is not a nanotune checkpoint,
  a symlink) is refused with an INVALID_PARAMS error naming the path, before
  anything is written, and nothing in it is touched.
A kill -9 at any point therefore leaves <dir> as the old or the new complete
checkpoint, plus at most one ".<name>.tmp-*" sibling carrying our marker (the
marker file or our trainer_state.json) or empty. Each save first sweeps its
parent directory: such siblings whose pid (in the name) is no longer alive (or
is this process) are deleted, except a complete checkpoint whose <name> is
missing, which is renamed back to <name>. A ".tmp-*" directory without our
marker (a user's) is never touched.

Note [validated loads]: load_checkpoint = read_checkpoint(...).apply().
read_checkpoint validates everything and changes nothing: trainer_state.json is
decoded into TrainerStateFile (format, step >= 0, data_state, files, extra);
every `files` entry must be a plain relative name that stays inside the
checkpoint directory (no "..", no absolute path, no symlink out; such an entry
is refused by its name alone, so the error says nothing about files outside)
and exist with its recorded size; the model tensors must match the model's
names, shapes and dtypes (floating dtypes may differ: the model's wins); the
optimizer state must fit the optimizer (groups, tensors, moments, masks) and
the RNG states must be loadable (tried on throwaway generators). Only then does
apply() copy weights, optimizer state and RNG states in. Every error is a
CheckpointError (INVALID_PARAMS) whose message and data name the file (`path`)
and, where there is one, the key (`key`).

Note [adapter checkpoints]: a PEFT model (models.add_lora) saves only its adapter:
PeftModel.save_pretrained writes adapter_config.json and adapter_model.safetensors
(the lora_A/lora_B tensors, named without the adapter name: "...q_proj.lora_A.weight")
into model/. The base weights are not copied: they never change, and the adapter
config points at them (base_model_name_or_path, the absolute directory load_model
read, a preset's cache directory for presets). A resume loads the same base with the
same lora settings and then this checkpoint: the adapter's tensors must be exactly
those of the model's adapter (peft.get_peft_model_state_dict: names, shapes, dtypes),
and r, lora_alpha and target_modules must equal the model's (alpha changes the
scale, which no shape shows); dropout may differ (a training setting, like the lr).
A checkpoint with an adapter is refused for a model without one and the other way
round, each error saying which side has the adapter. `nanotune export` copies the
adapter or merges it into the base (nanotune.export).
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import msgspec
import torch

from .errors import InvalidParams, field_of
from .processes import pid_alive

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "CHECKPOINT_FORMAT", "CheckpointError", "CheckpointState",
           "PendingLoad", "TrainerStateFile", "has_adapter", "is_checkpoint", "load_checkpoint", "read_checkpoint",
           "save_checkpoint"]

CHECKPOINT_FORMAT = "nanotune-checkpoint-v1"
MODEL_DIR, OPTIMIZER_FILE, RNG_FILE, STATE_FILE = "model", "optimizer.pt", "rng.pt", "trainer_state.json"
OPTIMIZER_DCP = "optimizer"  # a torch.distributed.checkpoint directory (Note [group checkpoints])

# Note [group checkpoints]: in a sidecar group (nanotune.distributed) the checkpoint
# is still one directory, written atomically by rank 0 as above: the HF model
# directory once and complete (DDP's ranks hold the same weights; rank 0 writes
# them), rng.pt and trainer_state.json from rank 0. The optimizer state goes
# through torch.distributed.checkpoint (DCP) into optimizer/: rank 0 makes the temp
# directory and broadcasts its path, then every rank saves (a collective: DCP plans
# the writes, each rank writes its part, rank 0 writes .metadata), and only then
# does rank 0 write the rest and move the directory into place. The state is laid
# out flat: each tensor of optimizer.state_dict() under "state.<param id>.<key>",
# and its other values with param_groups as one torch.save'd "meta" object. Under
# DDP every rank's state is the same, so DCP keeps one copy (it writes a replicated
# key once), and the checkpoint loads on any world size, one process included (DCP
# reads without a process group). A sharded optimizer's state (FSDP: each rank's
# shard) is kept per rank under "rank<r>." keys and loads on the same world size
# only. Loading checks the state exactly like optimizer.pt's (Note [validated
# loads]) after DCP has read it into tensors allocated from its .metadata.
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's names, in model/
TMP_MARKER = ".nanotune-partial"  # the first file of a temp directory: "this is ours" (Note [atomic checkpoints])
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?:(?P<pid>\d+)-)?[A-Za-z0-9_]+$")


class CheckpointError(InvalidParams):
    """A checkpoint could not be saved or loaded (code INVALID_PARAMS); `path` names the
    file or directory at fault and `key` the entry in it, when there is one."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, key: str | None = None):
        super().__init__(message, path=None if path is None else str(path), key=key)


class TrainerStateFile(msgspec.Struct, forbid_unknown_fields=False):
    """trainer_state.json. Unknown keys are allowed (later v1 writers may add some)."""

    format: str
    step: Annotated[int, msgspec.Meta(ge=0)]
    data_state: dict[str, Any] | None  # BatchIterator.state_dict(), or null
    files: dict[str, Annotated[int, msgspec.Meta(ge=0)]]  # relative path -> bytes
    extra: dict[str, Any] = {}


class _Format(msgspec.Struct, forbid_unknown_fields=False):
    format: Any = None


@dataclass
class CheckpointState:
    path: str  # the checkpoint directory
    model_dir: str  # its HF model directory (give it to load_model in a fresh process); a LoRA run's adapter
    step: int  # optimizer steps taken when it was saved
    data_state: dict[str, Any] | None  # BatchIterator.state_dict() at save time
    extra: dict[str, Any] = field(default_factory=dict)  # whatever the caller saved (config, metrics, ...)


# ---------------------------------------------------------------------------
# RNG

def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        pass
    else:  # arrays are not weights_only-loadable: store the key as a tensor
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    return state


def _check_rng_state(state: Any, path: Path) -> None:
    """Raises CheckpointError unless every saved generator state loads (tried on
    throwaway generators: the global ones are not touched)."""

    def bad(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint file {str(path)!r} is corrupt: {key}: {why}", path, key)

    if not isinstance(state, dict) or "torch" not in state or "python" not in state:
        raise bad("torch" if isinstance(state, dict) else "rng", "not an RNG state (needs torch and python)")
    try:
        torch.Generator().set_state(state["torch"])
    except Exception as e:  # noqa: BLE001  TypeError, RuntimeError
        raise bad("torch", str(e)) from None
    try:
        random.Random().setstate(_tuples(state["python"]))
    except Exception as e:  # noqa: BLE001
        raise bad("python", str(e)) from None
    if "cuda" in state:
        cuda = state["cuda"]
        if not isinstance(cuda, (list, tuple)) or not all(
                torch.is_tensor(t) and t.dtype == torch.uint8 and t.dim() == 1 for t in cuda):
            raise bad("cuda", "expected a list of uint8 tensors")
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            return
        try:
            kind, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.RandomState().set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
        except Exception as e:  # noqa: BLE001
            raise bad("numpy", str(e)) from None


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            return
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _tuples(x: Any) -> Any:
    # random.setstate wants tuples; a round trip through some loaders gives lists.
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------
# Recognising checkpoints and our temp directories

def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory (not a symlink) holding a trainer_state.json with
    our format marker. Reads only that file; never raises for what it finds."""
    p = Path(path)
    try:
        if p.is_symlink() or not p.is_dir():
            return False
        f = p / STATE_FILE
        if f.is_symlink() or not f.is_file():
            return False
        return msgspec.json.decode(f.read_bytes(), type=_Format).format == CHECKPOINT_FORMAT
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return False


def _is_ours_tmp(entry: Path) -> bool:
    """A ".<name>.tmp-*" directory that carries our marker (the marker file, or a
    trainer_state.json of ours) or is empty."""
    try:
        if entry.is_symlink() or not entry.is_dir():
            return False
        if (entry / TMP_MARKER).is_file() or is_checkpoint(entry):
            return True
        return not any(os.scandir(entry))
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: saves in one process do not overlap
    return pid_alive(pid)


def _stale_tmps(parent: Path) -> list[tuple[Path, str]]:
    """(directory, checkpoint name) of the temp directories of ours in `parent` whose
    saver is gone (Note [atomic checkpoints])."""
    out = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return out
    for e in entries:
        m = _TMP_NAME.match(e.name)
        if not m:
            continue
        pid = m.group("pid")
        if pid is not None and _pid_alive(int(pid)):
            continue
        if _is_ours_tmp(Path(e.path)):
            out.append((Path(e.path), m.group("name")))
    return out


def _sweep(parent: Path) -> None:
    """Deletes stale temp directories of ours in `parent`; a complete checkpoint whose
    destination is missing (a fallback replace cut between its two renames) goes back
    to its name instead."""
    for tmp, name in _stale_tmps(parent):
        dest = parent / name
        if not os.path.lexists(dest) and is_checkpoint(tmp) and _complete(tmp):
            try:
                os.rename(tmp, dest)
                _fsync_dir(parent)
                continue
            except OSError:
                pass
        _remove_tree(tmp)


def _complete(root: Path) -> bool:
    try:
        _read_state(root)
        return True
    except CheckpointError:
        return False


def _remove_tree(path: Path) -> None:
    """Deletes a temp directory of ours so that a crash at any point leaves it marked:
    the marker goes in first and out last, then the empty directory."""
    try:
        (path / TMP_MARKER).touch()
    except OSError:
        pass
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for e in entries:
        if e.name == TMP_MARKER:
            continue
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            try:
                os.unlink(e.path)
            except OSError:
                pass
    for victim in (path / TMP_MARKER, path):
        try:
            os.unlink(victim) if victim != path else os.rmdir(victim)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Saving

def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps directories a and b atomically; False where the OS or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if sys.platform.startswith("linux"):
        fn = getattr(libc, "renameat2", None)  # glibc >= 2.28
        if fn is None:
            return False
        at_fdcwd, rename_exchange = -100, 2
        rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    elif sys.platform == "darwin":
        fn = getattr(libc, "renamex_np", None)
        if fn is None:
            return False
        rc = fn(os.fsencode(a), os.fsencode(b), 0x2)  # RENAME_SWAP
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _check_destination(final: Path) -> None:
    """Refuses a destination that exists and is not a nanotune checkpoint (an empty
    directory is fine: nothing in it can be lost)."""
    if not os.path.lexists(final):
        return
    if final.is_symlink():
        raise CheckpointError(f"checkpoint path {str(final)!r} is a symbolic link; refusing to replace it: "
                              "give the checkpoint directory itself or a new path", final)
    if final.is_dir():
        if is_checkpoint(final):
            return
        try:
            empty = not any(os.scandir(final))
        except OSError:
            empty = False
        if empty:
            return
    raise CheckpointError(f"checkpoint path {str(final)!r} exists and is not a nanotune checkpoint (no "
                          f"{STATE_FILE} of format {CHECKPOINT_FORMAT!r}); refusing to replace it: choose another "
                          "path or remove it", final)


def _dcp_prefix(group: Any, sharded: bool) -> str:
    return f"rank{group.rank}." if group is not None and sharded else ""


def _save_optimizer_dcp(optimizer: torch.optim.Optimizer, path: Path, prefix: str) -> None:
    """Note [group checkpoints]: optimizer.state_dict() flat, through DCP (a collective in a group)."""
    import io

    import torch.distributed.checkpoint as dcp

    sd = optimizer.state_dict()
    flat: dict[str, Any] = {}
    meta: dict[str, Any] = {"state": {}, "param_groups": sd["param_groups"]}
    for pid, st in sd["state"].items():
        meta["state"][pid] = {k: v for k, v in st.items() if not torch.is_tensor(v)}
        for k, v in st.items():
            if torch.is_tensor(v):  # FSDP2's DTensor moments (AdamW): this rank's shard, under its rank's keys
                flat[f"{prefix}state.{pid}.{k}"] = v.to_local() if hasattr(v, "to_local") else v
    buf = io.BytesIO()
    torch.save(meta, buf)
    buf.seek(0)
    flat[f"{prefix}meta"] = buf
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(flat, checkpoint_id=path)


def _read_optimizer_dcp(root: Path, state: TrainerStateFile, prefix: str) -> dict[str, Any]:
    """The optimizer state_dict saved by _save_optimizer_dcp (read, not yet checked)."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = root / OPTIMIZER_DCP
    _listed(root, state, f"{OPTIMIZER_DCP}/.metadata")
    try:
        md = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {str(path)!r}: its DCP .metadata is corrupt: {e}", path) from e
    keys = {k: m for k, m in md.state_dict_metadata.items() if k.startswith(prefix) or not prefix}
    if f"{prefix}meta" not in keys:
        saved = sorted({k.split(".", 1)[0] for k in md.state_dict_metadata if k.startswith("rank")})
        why = (f"it holds the sharded state of {len(saved)} ranks, not of {prefix.rstrip('.')}" if saved
               else "it holds no optimizer state under the expected keys")
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this sidecar group: {why}", path, "optimizer")
    template = {k: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata)
                else io.BytesIO() for k, m in keys.items()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(template, checkpoint_id=path)
        buf = template.pop(f"{prefix}meta")
        buf.seek(0)
        meta = torch.load(buf, map_location="cpu", weights_only=True)
        st: dict[Any, dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["state"].items()}
        for k, v in template.items():
            pid, name = k[len(prefix):].removeprefix("state.").split(".", 1)
            st.setdefault(int(pid), {})[name] = v
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  DCP and pickle errors come in many types
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {e}", path) from e
    return {"state": st, "param_groups": meta["param_groups"]}


def save_checkpoint(dir: str | os.PathLike, model: torch.nn.Module, tokenizer, optimizer: torch.optim.Optimizer | None,
                    data_state: dict[str, Any] | None, step: int, extra: dict[str, Any] | None = None,
                    group: Any = None, sharded: bool = False, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes a checkpoint to `dir` atomically (Note [atomic checkpoints]); returns `dir`.

    `dir` must not exist, be an empty directory or be a nanotune checkpoint (which
    is replaced); anything else is refused (CheckpointError naming it) untouched.
    data_state and extra must be JSON-serializable (extra: the resolved config,
    metrics, anything the caller wants back from load_checkpoint). optimizer may be
    None for a weights-only export.
    group: this rank's nanotune.distributed.Group in a sidecar group, where every rank
    calls this (Note [group checkpoints]); sharded: the optimizer's state differs per
    rank (FSDP); weights: the model's full state dict when `model` cannot give it by
    itself (FSDP2's sharded parameters, gathered on rank 0 by the caller).
    """
    final = Path(dir)
    if group is not None and group.rank != 0:  # rank 0 prepares and finishes; we add our optimizer part
        tmp_name = group.broadcast()
        if not isinstance(tmp_name, str):
            raise CheckpointError(f"rank 0 could not start checkpoint {str(final)!r}: {tmp_name[1]}", final)
        if optimizer is not None:
            _save_optimizer_dcp(optimizer, Path(tmp_name) / OPTIMIZER_DCP, _dcp_prefix(group, sharded))
        return final
    try:
        try:
            meta = json.dumps({"format": CHECKPOINT_FORMAT, "step": int(step), "data_state": data_state,
                               "extra": extra or {}})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"data_state and extra must be JSON-serializable: {e}", final) from e
        _check_destination(final)
        parent = final.parent
        parent.mkdir(parents=True, exist_ok=True)
        _sweep(parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=parent))
    except BaseException as e:
        if group is not None:
            group.broadcast(("error", str(e)))
        raise
    if group is not None:
        group.broadcast(str(tmp))
    aside: Path | None = None  # the fallback's place for the old checkpoint while the new one moves in
    try:
        (tmp / TMP_MARKER).write_text(json.dumps({"format": CHECKPOINT_FORMAT, "pid": os.getpid()}) + "\n")
        if optimizer is not None and group is not None:  # first: the other ranks wait in it
            _save_optimizer_dcp(optimizer, tmp / OPTIMIZER_DCP, _dcp_prefix(group, sharded))
        model.save_pretrained(tmp / MODEL_DIR, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / MODEL_DIR)
        if optimizer is not None and group is None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save(_rng_state(), tmp / RNG_FILE)
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*"))
                 if p.is_file() and p.name != TMP_MARKER}
        state = json.loads(meta) | {"files": files}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _fsync_tree(tmp)
        os.unlink(tmp / TMP_MARKER)  # from here our trainer_state.json marks it
        _fsync_dir(tmp)
        _check_destination(final)  # again: something may have appeared meanwhile
        if not os.path.lexists(final):
            os.rename(tmp, final)
        elif _exchange(tmp, final):  # one atomic swap: tmp now holds the old checkpoint
            _fsync_dir(parent)
            _remove_tree(tmp)
        else:  # no exchange on this filesystem: two renames (Note [atomic checkpoints])
            aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=parent))
            os.rename(final, aside)  # replaces the empty directory mkdtemp made
            os.rename(tmp, final)
            _fsync_dir(parent)
            old, aside = aside, None
            _remove_tree(old)
        _fsync_dir(parent)
    except BaseException:
        if aside is not None:
            if not os.path.lexists(final) and is_checkpoint(aside):
                try:
                    os.rename(aside, final)  # put the old one back
                except OSError:
                    pass
            if os.path.lexists(aside) and _is_ours_tmp(aside):
                _remove_tree(aside)
        if os.path.lexists(tmp):
            _remove_tree(tmp)  # our partial one, or the old one after a swap
        raise
    return final


# ---------------------------------------------------------------------------
# Loading

def _tmp_hint(root: Path) -> str:
    try:
        found = sorted(t for t, name in _stale_tmps(root.parent) if name == root.name and is_checkpoint(t))
    except OSError:
        found = []
    return f"; an interrupted save left a complete one at {str(found[-1])!r}" if found else ""


def _inside(root: Path, rel: Any) -> Path:
    """root / rel when `rel` is a plain relative name that stays inside root, else a
    CheckpointError that names the entry only (nothing about what it points at)."""
    bad = CheckpointError(f"checkpoint file {str(root / STATE_FILE)!r}: files entry {rel!r} is not a relative path "
                          "inside the checkpoint directory", root / STATE_FILE, f"files.{rel}")
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise bad
    pure = PurePosixPath(rel)
    if pure.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")):
        raise bad
    path = root / pure
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise bad  # a symlink on the way leads out
    return path


def _read_state(root: Path) -> TrainerStateFile:
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist{_tmp_hint(root)}", root)
    path = root / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(root)!r} is incomplete: {STATE_FILE} is missing", path)
    real_root = os.path.realpath(root)
    if os.path.dirname(os.path.realpath(path)) != real_root:
        raise CheckpointError(f"checkpoint file {str(path)!r} is a link out of the checkpoint directory", path)
    raw = path.read_bytes()
    try:
        fmt = msgspec.json.decode(raw, type=_Format).format
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: {e}", path) from None
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint file {str(path)!r} is not a {CHECKPOINT_FORMAT} state "
                              f"(format {fmt!r})", path, "format")
    try:
        state = msgspec.json.decode(raw, type=TrainerStateFile)
    except msgspec.ValidationError as e:
        where, why = field_of(e, "")
        key = where.lstrip(".") or None
        raise CheckpointError(f"checkpoint file {str(path)!r} is invalid at {key}: {why}", path, key) from None
    for rel, size in state.files.items():
        f = _inside(root, rel)
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {str(f)!r} is missing", f)
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint file {str(f)!r} is corrupt: {actual} bytes, {size} were written", f)
    return state


def _listed(root: Path, state: TrainerStateFile, rel: str) -> Path:
    path = root / rel
    if rel not in state.files:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing (not in {STATE_FILE} files)", path)
    return path


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def has_adapter(dir: str | os.PathLike) -> bool:
    """Whether the checkpoint at `dir` saved a PEFT adapter (model/adapter_config.json)."""
    return (Path(dir) / MODEL_DIR / ADAPTER_CONFIG).is_file()


def _check_tensors(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: dict[str, Path],
                   model_dir: Path, partners: dict[str, list[str]] | None = None) -> None:
    """Every tensor of `weights` known to `expected` with its shape and a compatible dtype,
    and every expected tensor present (or, tied, a partner of it)."""
    for key, t in weights.items():
        f = source[key]
        if key not in expected:
            raise CheckpointError(f"checkpoint file {str(f)!r}: tensor {key!r} is not in the model "
                                  f"(another architecture?)", f, key)
        want = expected[key]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"checkpoint file {str(f)!r}: tensor {key!r} has shape {list(t.shape)}, the "
                                  f"model's is {list(want.shape)} (a checkpoint of another model size?)", f, key)
        if t.dtype != want.dtype and not (t.dtype.is_floating_point and want.dtype.is_floating_point):
            raise CheckpointError(f"checkpoint file {str(f)!r}: tensor {key!r} is {t.dtype}, the model's is "
                                  f"{want.dtype}", f, key)
    for key in expected:
        if key not in weights and not any(m in weights for m in (partners or {}).get(key, ())):
            raise CheckpointError(f"checkpoint model directory {str(model_dir)!r} lacks tensor {key!r} of the model",
                                  model_dir, key)


def _load_safetensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {str(f)!r} is corrupt: {e}", f) from e


def _read_adapter(model: torch.nn.Module, root: Path, state: TrainerStateFile) -> dict[str, torch.Tensor]:
    """The adapter tensors of a LoRA checkpoint, checked against the PEFT model's adapter
    (Note [adapter checkpoints]); keys as PEFT saves them."""
    from peft import get_peft_model_state_dict

    model_dir = root / MODEL_DIR
    cfg_path = _listed(root, state, f"{MODEL_DIR}/{ADAPTER_CONFIG}")
    try:
        saved = json.loads(cfg_path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {str(cfg_path)!r} is corrupt: {e}", cfg_path) from e
    live = model.peft_config[model.active_adapter].to_dict()

    def norm(v: Any) -> Any:  # target_modules: a set in memory, a list in JSON; peft_type: an enum in memory
        return sorted(v) if isinstance(v, (list, tuple, set)) else getattr(v, "value", v)

    for key in ("peft_type", "r", "lora_alpha", "target_modules"):
        a, b = norm(saved.get(key)), norm(live.get(key))
        if a != b:
            raise CheckpointError(f"checkpoint file {str(cfg_path)!r}: {key} is {a!r}, the loaded model's adapter "
                                  f"has {b!r} (load_model with the lora settings the run used)", cfg_path, key)
    f = _listed(root, state, f"{MODEL_DIR}/{ADAPTER_WEIGHTS}")
    weights = _load_safetensors(f)
    expected = get_peft_model_state_dict(model)
    _check_tensors(weights, expected, dict.fromkeys(weights, f), model_dir)
    return weights


def _read_weights(model: torch.nn.Module, root: Path, state: TrainerStateFile) -> dict[str, torch.Tensor]:
    """The safetensors weights of the checkpoint, checked against `model`: every name
    known (tied names the files leave out must have their partner), every shape equal,
    dtypes equal or both floating (the model's wins on load). A PEFT model reads the
    adapter instead (Note [adapter checkpoints])."""
    model_dir = root / MODEL_DIR
    adapter = f"{MODEL_DIR}/{ADAPTER_CONFIG}" in state.files
    if adapter and not _is_peft(model):
        raise CheckpointError(f"checkpoint {str(root)!r} holds a LoRA adapter ({MODEL_DIR}/{ADAPTER_CONFIG}) but "
                              "the loaded model has none: load the base model with the run's lora settings",
                              model_dir / ADAPTER_CONFIG, "lora")
    if _is_peft(model):
        if not adapter:
            raise CheckpointError(f"checkpoint {str(root)!r} holds a full model ({MODEL_DIR}/ has no "
                                  f"{ADAPTER_CONFIG}) but the loaded model has a LoRA adapter: load it without "
                                  "lora to resume this checkpoint", model_dir, "lora")
        return _read_adapter(model, root, state)
    rels = sorted(r for r in state.files if r.startswith(MODEL_DIR + "/") and r.endswith(".safetensors")
                  and r.count("/") == 1)
    if not rels:
        raise CheckpointError(f"checkpoint model directory {str(model_dir)!r} has no *.safetensors", model_dir)
    weights: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}
    for rel in rels:
        f = root / rel
        part = _load_safetensors(f)
        weights.update(part)
        source.update(dict.fromkeys(part, f))
    expected = model.state_dict(keep_vars=True)
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    partners = {n: names for names in tied.values() for n in names}
    _check_tensors(weights, expected, source, model_dir, partners)
    return weights


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_optimizer_state(sd: Any, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Raises CheckpointError unless optimizer.load_state_dict(sd) gives a state this
    optimizer can step with: same groups and tensors, options of the right kind,
    and per tensor moments (and NanoAdam masks) of the right shapes, dtypes and range.
    A sharded (FSDP2) tensor is checked against this rank's shard."""
    from .optim import CRITERIA, NanoAdam, _expand, _local, selected_count

    def bad(why: str, key: str | None = None) -> CheckpointError:
        return CheckpointError(f"optimizer state in {str(path)!r} does not fit this optimizer: {why}", path, key)

    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) \
            or not isinstance(sd.get("param_groups"), list):
        raise bad("not an optimizer state_dict (a map with state and param_groups)")
    nano = isinstance(optimizer, NanoAdam)
    saved_groups, groups = sd["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise bad(f"{len(saved_groups)} parameter groups, this optimizer has {len(groups)}", "param_groups")
    params: dict[Any, tuple[torch.Tensor, dict, dict, str]] = {}
    for gi, (sg, g) in enumerate(zip(saved_groups, groups)):
        where = f"param_groups.{gi}"
        if not isinstance(sg, dict) or not isinstance(sg.get("params"), list):
            raise bad("a parameter group without a params list", where)
        if len(sg["params"]) != len(g["params"]):
            raise bad(f"group {gi} has {len(sg['params'])} tensors, this optimizer's has {len(g['params'])}",
                      f"{where}.params")
        for k in ("lr", "eps", "weight_decay"):
            if k in g and not (k in sg and _real(sg[k]) and sg[k] >= 0):
                raise bad(f"group {gi}: {k} is {sg.get(k)!r}", f"{where}.{k}")
        if "betas" in g:
            b = sg.get("betas")
            if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(_real(x) and 0 <= x < 1 for x in b)):
                raise bad(f"group {gi}: betas is {b!r}", f"{where}.betas")
        names = list(g.get("names") or [])
        if nano:
            if bool(sg.get("sparse", True)) != bool(g["sparse"]):
                raise bad(f"group {gi} is {'sparse' if sg.get('sparse', True) else 'dense'} in the checkpoint and "
                          f"{'sparse' if g['sparse'] else 'dense'} here", f"{where}.sparse")
            if "names" in sg and list(sg["names"]) != names:
                diff = next((f"{a!r} != {b!r}" for a, b in zip(sg["names"], names) if a != b), "")
                raise bad(f"group {gi} holds other tensors ({diff})", f"{where}.names")
            if not (_real(sg.get("density")) and 0 < sg["density"] <= 1):
                raise bad(f"group {gi}: density is {sg.get('density')!r}", f"{where}.density")
            if sg.get("criterion") not in CRITERIA:
                raise bad(f"group {gi}: criterion is {sg.get('criterion')!r}", f"{where}.criterion")
            mi = sg.get("mask_interval")
            if mi is not None and not (isinstance(mi, int) and mi >= 1):
                raise bad(f"group {gi}: mask_interval is {mi!r}", f"{where}.mask_interval")
            cs = sg.get("chunk_size")
            if not (isinstance(cs, int) and not isinstance(cs, bool) and cs >= 1):
                raise bad(f"group {gi}: chunk_size is {cs!r}", f"{where}.chunk_size")
            if sg.get("index_dtype", torch.int32) not in (torch.int16, torch.int32):
                raise bad(f"group {gi}: index_dtype is {sg.get('index_dtype')!r}", f"{where}.index_dtype")
        elif "density" in sg or "sparse" in sg:
            raise bad(f"group {gi} is a NanoAdam group; this optimizer is {type(optimizer).__name__}", where)
        for i, (sid, p) in enumerate(zip(sg["params"], g["params"])):
            if sid in params:
                raise bad(f"tensor id {sid!r} appears twice", f"{where}.params")
            name = names[i].split("=")[0] if i < len(names) else f"param {sid}"
            params[sid] = (p, g, sg, name)
    unknown = [k for k in sd["state"] if k not in params]
    if unknown:
        raise bad(f"state for tensor id {unknown[0]!r}, which no group has", f"state.{unknown[0]}")
    for sid, st in sd["state"].items():
        p, g, sg, name = params[sid]
        p = _local(p)
        where = f"state.{sid}"
        if not isinstance(st, dict):
            raise bad(f"{name}: state is not a map", where)
        step = st.get("step")
        if step is not None:
            value = float(step) if torch.is_tensor(step) and step.numel() == 1 else step
            if not (_real(value) and value >= 0):
                raise bad(f"{name}: step is {step!r}", f"{where}.step")
        sparse_nano = nano and g["sparse"]
        if sparse_nano and "idx" in st:
            idx, density = st["idx"], st.get("density")
            if not (torch.is_tensor(idx) and idx.dim() == 1 and idx.dtype in (torch.int16, torch.int32)):
                raise bad(f"{name}: idx is not a 1-d int16/int32 tensor", f"{where}.idx")
            if not (_real(density) and 0 <= density <= 1):
                raise bad(f"{name}: density is {density!r}", f"{where}.density")
            want = 0 if density == 0 else selected_count(p.numel(), density, sg["chunk_size"])
            if idx.numel() != want:
                raise bad(f"{name}: {idx.numel()} mask entries, density {density} of {p.numel()} selects {want}",
                          f"{where}.idx")
            if idx.dtype != sg.get("index_dtype", torch.int32) and idx.numel():
                raise bad(f"{name}: idx is {idx.dtype}, the group stores {sg.get('index_dtype')}", f"{where}.idx")
            flat = _expand(idx, p.numel(), density, sg["chunk_size"]).to(torch.int64)
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= p.numel()
                                 or (flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()))):
                raise bad(f"{name}: mask indices out of range or not ascending", f"{where}.idx")
            for k in ("exp_avg", "exp_avg_sq"):
                m = st.get(k)
                if not (torch.is_tensor(m) and m.is_floating_point() and m.dim() == 1 and m.numel() == idx.numel()):
                    raise bad(f"{name}: {k} is not a float tensor of the mask's {idx.numel()} entries",
                              f"{where}.{k}")
            for k in ("refreshed_at",):
                if k in st and not (isinstance(st[k], int) and st[k] >= 0):
                    raise bad(f"{name}: {k} is {st[k]!r}", f"{where}.{k}")
            age = st.get("age")  # Note [bias correction]: each entry's age at the last refresh
            if age is not None and not (torch.is_tensor(age) and age.dim() == 1 and age.numel() == idx.numel()
                                        and age.dtype in (torch.int16, torch.int32)
                                        and (age.numel() == 0 or int(age.min()) >= 0)):
                raise bad(f"{name}: age is not a non-negative 1-d int16/int32 tensor of the mask's {idx.numel()} "
                          f"entries", f"{where}.age")
        elif sparse_nano:
            if "exp_avg" in st or "exp_avg_sq" in st:
                raise bad(f"{name}: moments without a mask", where)
        else:
            for k, v in st.items():
                if k == "step":
                    continue
                if torch.is_tensor(v):
                    if v.numel() != 1 and tuple(v.shape) != tuple(p.shape):
                        raise bad(f"{name}: {k} has shape {list(v.shape)}, the tensor's is {list(p.shape)}",
                                  f"{where}.{k}")
                    if not v.is_floating_point():
                        raise bad(f"{name}: {k} is {v.dtype}", f"{where}.{k}")
            if any(k not in st for k in ("exp_avg", "exp_avg_sq")) and st.keys() - {"step"}:
                raise bad(f"{name}: state without exp_avg and exp_avg_sq", where)
        if sparse_nano and "density_override" in st:
            v = st["density_override"]
            if v is not None and not (_real(v) and 0 <= v <= 1):
                raise bad(f"{name}: density_override is {v!r}", f"{where}.density_override")


def _is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 shards the model (its parameters are DTensors)."""
    return any(hasattr(p, "to_local") for p in model.parameters())


def _shard_like_params(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict: a torch optimizer (AdamW) over FSDP2's DTensor parameters
    keeps DTensor moments; the checkpoint holds this rank's shards as plain tensors.
    NanoAdam keeps plain shard-local tensors itself (Note [shard-local masks])."""
    from .optim import NanoAdam

    if isinstance(optimizer, NanoAdam):
        return
    from torch.distributed.tensor import DTensor

    for p, st in optimizer.state.items():
        if not isinstance(p, DTensor):
            continue
        for k, v in list(st.items()):
            if torch.is_tensor(v) and not isinstance(v, DTensor) and k != "step" \
                    and tuple(v.shape) == tuple(p.to_local().shape):
                st[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                           shape=p.shape, stride=p.stride())


@dataclass
class PendingLoad:
    """A checkpoint read and validated by read_checkpoint, not applied yet."""

    state: CheckpointState
    weights: dict[str, torch.Tensor] | None
    model: torch.nn.Module | None
    optimizer_state: dict[str, Any] | None
    optimizer: torch.optim.Optimizer | None
    rng: dict[str, Any] | None
    optimizer_path: Path | None = None

    def apply(self) -> CheckpointState:
        """Copies weights, optimizer state and RNG states in. The optimizer goes first and
        comes back as it was if it fails; the rest was validated and cannot fail on input."""
        if self.optimizer is not None and self.optimizer_state is not None:
            opt = self.optimizer
            # load_state_dict builds a new state and new groups and swaps them in at its end
            # (NanoAdam then adds its tensors to the new state): keeping the old objects is
            # keeping the old optimizer.
            old_state, old_groups = opt.state, opt.param_groups
            try:
                opt.load_state_dict(self.optimizer_state)
                _shard_like_params(opt)
            except Exception as e:  # noqa: BLE001  what validation missed: put the optimizer back
                opt.state, opt.param_groups = old_state, old_groups
                raise CheckpointError(f"optimizer state in {str(self.optimizer_path)!r} does not fit this "
                                      f"optimizer: {e}", self.optimizer_path) from e
        if self.model is not None and self.weights is not None:
            with torch.no_grad():
                if _is_sharded(self.model):  # FSDP2: each rank keeps its shard of the full tensors
                    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                    set_model_state_dict(self.model, self.weights,
                                         options=StateDictOptions(full_state_dict=True, strict=False))
                elif _is_peft(self.model):  # adapter tensors, keyed as PEFT saves them
                    from peft import set_peft_model_state_dict

                    set_peft_model_state_dict(self.model, self.weights)
                else:
                    self.model.load_state_dict(self.weights, strict=False)
        if self.rng is not None:
            _set_rng_state(self.rng)
        return self.state


def read_checkpoint(dir: str | os.PathLike, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True,
                    group: Any = None, sharded: bool = False) -> PendingLoad:
    """Reads and validates the checkpoint at `dir` for `model` and `optimizer` (Note
    [validated loads]) without changing anything; .apply() then restores it. In a
    sidecar group every rank calls it (`group`, `sharded`: Note [group checkpoints])."""
    root = Path(dir)
    state = _read_state(root)
    weights = _read_weights(model, root, state) if model is not None else None
    sd, opt_path = None, None
    if optimizer is not None:
        opt_path = root / OPTIMIZER_FILE
        if (root / OPTIMIZER_DCP / ".metadata").is_file() and not opt_path.is_file():
            opt_path = root / OPTIMIZER_DCP
            sd = _read_optimizer_dcp(root, state, _dcp_prefix(group, sharded))
        elif not opt_path.is_file():
            raise CheckpointError(f"checkpoint {str(root)!r} has no {OPTIMIZER_FILE} (saved without an optimizer)",
                                  opt_path)
        elif sharded:
            raise CheckpointError(f"checkpoint {str(root)!r} holds one process's optimizer state ({OPTIMIZER_FILE}); "
                                  "a sharded (FSDP) group resumes only its own sharded checkpoints", opt_path,
                                  "optimizer")
        else:
            _listed(root, state, OPTIMIZER_FILE)
            try:
                sd = torch.load(opt_path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001  pickle/zip errors come in many types
                raise CheckpointError(f"checkpoint file {str(opt_path)!r} is corrupt: {e}", opt_path) from e
        _check_optimizer_state(sd, optimizer, opt_path)
    rng = None
    if restore_rng:
        path = root / RNG_FILE
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {str(path)!r} is missing", path)
        _listed(root, state, RNG_FILE)
        try:
            rng = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: {e}", path) from e
        _check_rng_state(rng, path)
    info = CheckpointState(path=str(root), model_dir=str(root / MODEL_DIR), step=state.step,
                           data_state=state.data_state, extra=state.extra or {})
    return PendingLoad(info, weights, model, sd, optimizer, rng, opt_path)


def load_checkpoint(dir: str | os.PathLike, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True,
                    group: Any = None, sharded: bool = False) -> CheckpointState:
    """Reads the checkpoint at `dir`; returns its step, data position and extra.

    model: weights are copied into it in place (None: leave weights alone, e.g.
        because the caller loaded CheckpointState.model_dir with load_model).
    optimizer: its state is restored (it must have been built the same way).
    restore_rng: set the torch/CUDA/random/numpy RNG states to the saved ones.
    Everything is validated before anything changes (Note [validated loads]): a
    CheckpointError leaves model, optimizer and RNG as they were.
    The caller restores the data position: iterator.load_state_dict(state.data_state).
    """
    return read_checkpoint(dir, model, optimizer, restore_rng, group, sharded).apply()
