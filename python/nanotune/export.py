"""`nanotune export <checkpointDir> --out DIR [--merge] [--base DIR]`: a checkpoint's model
as a directory of its own.

    python -m nanotune.export CHECKPOINT --out DIR [--merge] [--base DIR]   # prints DIR

Without --merge the checkpoint's model/ is copied as it is: a LoRA run's PEFT adapter
(adapter_config.json, adapter_model.safetensors, the tokenizer), which
peft.PeftModel.from_pretrained(base, DIR) loads, or a full run's HF directory.
With --merge (LoRA runs only) the adapter is merged into its base
(PeftModel.merge_and_unload) and DIR is a plain HF directory (config.json,
model.safetensors, the tokenizer) that AutoModelForCausalLM.from_pretrained(DIR)
loads, without PEFT. The base is the directory adapter_config.json names
(base_model_name_or_path; --base overrides it, e.g. after moving the checkpoint to
another machine). The merge runs on the CPU in float32 and the merged weights are
saved in the base's dtype.

DIR must not exist or be an empty directory: nothing is overwritten. It is written
into a temp sibling and renamed into place, so a failed export leaves no DIR. An
error the user can fix (not a checkpoint, no adapter to merge, a missing base, DIR
in the way) is one line `nanotune: export: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .checkpoint import (ADAPTER_CONFIG, CHECKPOINT_FORMAT, MODEL_DIR, STATE_FILE, CheckpointError, is_checkpoint,
                         read_checkpoint)
from .errors import InvalidParams

__all__ = ["ExportError", "export_checkpoint", "main"]


class ExportError(InvalidParams):
    """A checkpoint that cannot be exported as asked (code INVALID_PARAMS); `path` names it."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message, path=None if path is None else str(path))


def _check_checkpoint(root: Path) -> Path:
    """root/model after checking that root is a complete nanotune checkpoint."""
    if not root.exists():
        raise ExportError(f"checkpoint {str(root)!r} does not exist", root)
    if not is_checkpoint(root):
        if (root / ADAPTER_CONFIG).is_file():
            raise ExportError(f"{str(root)!r} is an adapter directory, not a nanotune checkpoint: give the checkpoint "
                              f"directory (the one that holds {STATE_FILE} and {MODEL_DIR}/)", root)
        raise ExportError(f"{str(root)!r} is not a nanotune checkpoint (no {STATE_FILE} of format "
                          f"{CHECKPOINT_FORMAT!r}); checkpoints are the <runDir>/checkpoints/step-N directories", root)
    try:
        read_checkpoint(root, restore_rng=False)  # load's validation of the state file: format, files, sizes
    except CheckpointError as e:
        raise ExportError(str(e), root) from e
    model_dir = root / MODEL_DIR
    if not model_dir.is_dir():
        raise ExportError(f"checkpoint {str(root)!r} has no {MODEL_DIR}/ directory", model_dir)
    return model_dir


def _check_out(out: Path) -> None:
    if os.path.lexists(out) and not (out.is_dir() and not out.is_symlink() and not any(os.scandir(out))):
        raise ExportError(f"--out {str(out)!r} exists and is not an empty directory; refusing to overwrite it: "
                          "choose a new path or remove it", out)


def _base_dir(model_dir: Path, base: str | os.PathLike | None) -> Path:
    cfg_path = model_dir / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{str(cfg_path)!r} is not readable JSON: {e}", cfg_path) from e
    if base is None:
        named = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
        if not named:
            raise ExportError(f"{str(cfg_path)!r} names no base model (base_model_name_or_path); pass --base DIR",
                              cfg_path)
        path, how = Path(named).expanduser(), f"base_model_name_or_path in {str(cfg_path)!r}"
    else:
        path, how = Path(base).expanduser(), "--base"
    if not (path / "config.json").is_file():
        raise ExportError(f"the base model {str(path)!r} ({how}) is not a Hugging Face model directory (no "
                          "config.json); pass --base DIR with the base the run trained on", path)
    return path


def _merge(model_dir: Path, base: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .models import _dtype_kwarg, peft_quiet

    hf_logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(base, local_files_only=True)
    saved_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, **{_dtype_kwarg(): torch.float32})
    with peft_quiet():
        merged = PeftModel.from_pretrained(model, model_dir).merge_and_unload()
    merged.to(saved_dtype).save_pretrained(out)
    has_tokenizer = any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    AutoTokenizer.from_pretrained(model_dir if has_tokenizer else base, local_files_only=True).save_pretrained(out)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, merge: bool = False,
                      base: str | os.PathLike | None = None) -> dict[str, Any]:
    """Writes the checkpoint's model to `out` (see the module docstring); returns
    {out, checkpoint, kind: "adapter" | "model" | "merged", base: the base merged into or None}."""
    root, dest = Path(checkpoint), Path(out)
    model_dir = _check_checkpoint(root)
    adapter = (model_dir / ADAPTER_CONFIG).is_file()
    if merge and not adapter:
        raise ExportError(f"checkpoint {str(root)!r} has no adapter to merge: its {MODEL_DIR}/ is a full model (a run "
                          f"without model.lora, no {ADAPTER_CONFIG}); export it without --merge to copy it", model_dir)
    if base is not None and not merge:
        raise ExportError("--base is for --merge (the base the adapter is merged into)")
    _check_out(dest)
    base_dir = _base_dir(model_dir, base) if merge else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        if merge:
            _merge(model_dir, base_dir, tmp)
        else:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True, symlinks=False)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _check_out(dest)  # again: something may have appeared meanwhile
        if dest.is_dir():
            os.rmdir(dest)  # empty (checked)
        os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    kind = "merged" if merge else "adapter" if adapter else "model"
    return {"out": str(dest), "checkpoint": str(root), "kind": kind, "base": None if base_dir is None else str(base_dir)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanotune export", description="A checkpoint's model as a directory of its own.")
    p.add_argument("checkpoint", help="a checkpoint directory (<runDir>/checkpoints/step-N)")
    p.add_argument("--out", required=True, help="the directory to write (must not exist, or be empty)")
    p.add_argument("--merge", action="store_true", help="merge the LoRA adapter into its base: a plain HF directory")
    p.add_argument("--base", help="the base model directory to merge into (default: the adapter config's)")
    args = p.parse_args(argv)
    try:
        r = export_checkpoint(args.checkpoint, args.out, merge=args.merge, base=args.base)
    except ExportError as e:
        print(f"nanotune: export: {e}", file=sys.stderr)
        return 2
    what = {"merged": f"the adapter merged into {r['base']}", "adapter": "the LoRA adapter (PEFT format)",
            "model": "the model (an HF directory)"}[r["kind"]]
    print(f"export: {what} -> {r['out']}", file=sys.stderr)
    print(r["out"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
