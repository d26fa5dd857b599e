"""Shared fixtures: a private preset cache for the whole session, the tiny-llama
preset built once into it, and small helpers to write data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def nanotune_cache(tmp_path_factory) -> Path:
    """Every test (and every sidecar a test spawns, which inherits the environment)
    builds presets into this session's temp dir, never into ~/.cache."""
    path = tmp_path_factory.mktemp("nanotune-cache")
    old = os.environ.get("NANOTUNE_CACHE")
    _link_converted_gguf_presets(path)
    os.environ["NANOTUNE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("NANOTUNE_CACHE", None)
    else:
        os.environ["NANOTUNE_CACHE"] = old


def _link_converted_gguf_presets(cache: Path) -> None:
    """The GGUF presets setup converted into the default cache (SmolLM2-135M: about 17 s), linked
    into the session's cache: read-only directories, the same key. A preset not converted there
    converts in the session's cache as usual. (The conversion itself is tested on small GGUF
    files in test_gguf.py, and setup runs it on the real one.)"""
    from nanotune.models import GGUF_PRESETS, ModelError, gguf_converted, gguf_preset_file

    for name in GGUF_PRESETS:
        try:
            done = gguf_converted(gguf_preset_file(name))  # under the default cache: not switched yet
        except ModelError:  # not installed: its tests say so
            continue
        if done is not None:
            (cache / "gguf").mkdir(exist_ok=True)
            (cache / "gguf" / done.name).symlink_to(done, target_is_directory=True)


@pytest.fixture(scope="session")
def tiny_dir(nanotune_cache) -> Path:
    """The tiny-llama preset's HF directory, built once per session."""
    from nanotune.models import load_model

    return Path(load_model("tiny-llama", device="cpu").path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from nanotune.models import load_model

    return load_model("tiny-llama", device="cpu").tokenizer


@pytest.fixture
def tiny(tiny_dir):
    """A fresh tiny-llama (fp32, CPU) per test, so tests may train it."""
    from nanotune.models import load_model

    return load_model("tiny-llama", device="cpu")


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(rows, name="data.jsonl") -> path; a row that is a str is written verbatim."""

    def write(rows, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path

    return write
