"""Checkpoints that resume a run exactly and whose model part is a plain HF directory.

    <dir>/
      model/               save_pretrained: config.json, model.safetensors, tokenizer files;
                           AutoModelForCausalLM.from_pretrained(<dir>/model) loads it
      optimizer.pt         optimizer.state_dict() (torch.save, loadable with weights_only=True)
      rng.pt               torch CPU/CUDA, Python `random` and numpy generator states
      trainer_state.json   {format, step, data_state, extra, files: {relative path: bytes}}, written last

Note [atomic checkpoints]: everything is written into a temp directory next to
<dir>, every file and directory is fsynced, then the temp directory is renamed
to <dir> (one atomic rename on POSIX). A crash mid-save leaves only a
".<name>.tmp-*" directory behind, never a half-written <dir>. Saving over an
existing <dir> first renames the old one to ".<name>.old-*", renames the new one
in, then deletes the old one; a crash between those two renames leaves the
previous checkpoint intact under the .old name (the error on load says so).
On load, each file listed in trainer_state.json must exist with its recorded
size, so a truncated or missing file is named instead of failing deep in torch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidParams

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "CheckpointState", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "nanotune-checkpoint-v1"
MODEL_DIR, OPTIMIZER_FILE, RNG_FILE, STATE_FILE = "model", "optimizer.pt", "rng.pt", "trainer_state.json"


class CheckpointError(InvalidParams):
    """A checkpoint could not be saved or loaded (code INVALID_PARAMS); `path` names the
    file or directory at fault."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message, path=None if path is None else str(path))


@dataclass
class CheckpointState:
    path: str  # the checkpoint directory
    model_dir: str  # its HF model directory (give it to load_model in a fresh process)
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


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _tuples(x: Any) -> Any:
    # random.setstate wants tuples; a round trip through some loaders gives lists.
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


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


def save_checkpoint(dir: str | os.PathLike, model: torch.nn.Module, tokenizer, optimizer: torch.optim.Optimizer | None,
                    data_state: dict[str, Any] | None, step: int, extra: dict[str, Any] | None = None) -> Path:
    """Writes a checkpoint to `dir` atomically (Note [atomic checkpoints]); returns `dir`.

    data_state and extra must be JSON-serializable (extra: the resolved config,
    metrics, anything the caller wants back from load_checkpoint). optimizer may be
    None for a weights-only export.
    """
    final = Path(dir)
    try:
        meta = json.dumps({"format": CHECKPOINT_FORMAT, "step": int(step), "data_state": data_state,
                           "extra": extra or {}})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"data_state and extra must be JSON-serializable: {e}", final) from e
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        model.save_pretrained(tmp / MODEL_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / MODEL_DIR)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save(_rng_state(), tmp / RNG_FILE)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        state = json.loads(meta) | {"files": files}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _fsync_tree(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, old / final.name)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------------------
# Loading

def _read_state(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        olds = sorted(root.parent.glob(f".{root.name}.old-*/{root.name}")) if root.parent.is_dir() else []
        hint = f"; an interrupted overwrite left the previous one at {str(olds[-1])!r}" if olds else ""
        raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist{hint}", root)
    path = root / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(root)!r} is incomplete: {STATE_FILE} is missing", path)
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: {e}", path) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint file {str(path)!r} is not a {CHECKPOINT_FORMAT} state", path)
    for rel, size in state.get("files", {}).items():
        f = root / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {str(f)!r} is missing", f)
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {str(f)!r} is corrupt: {f.stat().st_size} bytes, "
                                  f"{size} were written", f)
    return state


def _load_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Copies the safetensors weights of `model_dir` into `model` in place (dtype and
    device of the model win). Tied names the files leave out must have their partner."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint model directory {str(model_dir)!r} has no *.safetensors", model_dir)
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint file {str(f)!r} is corrupt: {e}", f) from e
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    partners = {n: names for names in tied.values() for n in names}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [n for n in missing if not any(m in weights for m in partners.get(n, ()))]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint weights in {str(model_dir)!r} do not fit the model: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}", model_dir)


def load_checkpoint(dir: str | os.PathLike, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True) -> CheckpointState:
    """Reads the checkpoint at `dir`; returns its step, data position and extra.

    model: weights are copied into it in place (None: leave weights alone, e.g.
        because the caller loaded CheckpointState.model_dir with load_model).
    optimizer: its state is restored (it must have been built the same way).
    restore_rng: set the torch/CUDA/random/numpy RNG states to the saved ones.
    The caller restores the data position: iterator.load_state_dict(state.data_state).
    """
    root = Path(dir)
    state = _read_state(root)
    model_dir = root / MODEL_DIR
    if model is not None:
        _load_weights(model, model_dir)
    if optimizer is not None:
        path = root / OPTIMIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(root)!r} has no {OPTIMIZER_FILE} (saved without an optimizer)",
                                  path)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors come in many types
            raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: {e}", path) from e
        try:
            optimizer.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"optimizer state in {str(path)!r} does not fit this optimizer: {e}", path) from e
    if restore_rng:
        path = root / RNG_FILE
        try:
            rng = torch.load(path, map_location="cpu", weights_only=True)
            _set_rng_state(rng)
        except FileNotFoundError as e:
            raise CheckpointError(f"checkpoint file {str(path)!r} is missing", path) from e
        except Exception as e:
            raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: {e}", path) from e
    return CheckpointState(path=str(root), model_dir=str(model_dir), step=int(state["step"]),
                           data_state=state.get("data_state"), extra=state.get("extra") or {})
