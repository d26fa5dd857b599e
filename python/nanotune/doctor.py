"""`python -m nanotune.doctor`: what this Python has for the nanotune sidecar, as
one JSON object on stdout (read by `npx nanotune doctor`, which prints it for
people).

It never fails because something is missing: a module that cannot be imported is
reported under "missing" with the pip requirement that provides it. Keep this
file importable on any Python 3 (no third-party imports at module level)."""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import sys

MIN_PYTHON = (3, 10)

# (import name, pip requirement): what the sidecar imports.
REQUIRED = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("safetensors", "safetensors"),
    ("tokenizers", "tokenizers"),
    ("zmq", "pyzmq"),
    ("msgspec", "msgspec"),
)


def _dist_version(dist: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(dist)
    except Exception:
        return None


def _module(name: str, dist: str) -> dict:
    """{"version", "error"}: the imported module's version, or why it cannot be imported."""
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken install raising anything else
        return {"version": None, "error": f"{type(e).__name__}: {e}".strip()}
    version = getattr(mod, "__version__", None) or _dist_version(dist)
    return {"version": str(version) if version is not None else "unknown", "error": None}


def _torch_info() -> dict | None:
    """torch's build and devices; None when torch cannot be imported."""
    try:
        import torch
    except Exception:
        return None
    info: dict = {"version": str(torch.__version__), "cuda": {"available": False, "version": None, "devices": []}, "mps": False}
    try:
        info["cuda"]["version"] = getattr(torch.version, "cuda", None)
        if torch.cuda.is_available():
            info["cuda"]["available"] = True
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                info["cuda"]["devices"].append(
                    {
                        "index": i,
                        "name": p.name,
                        "memory_bytes": int(p.total_memory),
                        "capability": f"{p.major}.{p.minor}",
                        "bf16": bool(torch.cuda.is_bf16_supported()) if i == 0 else None,
                    }
                )
    except Exception as e:  # a driver problem: say so instead of failing
        info["cuda"]["error"] = f"{type(e).__name__}: {e}"
    try:
        info["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    except Exception:
        pass
    return info


def _kernels() -> dict | None:
    """NanoAdam's compiled CPU kernels: built already (the library's path), the compiler
    a build would use, whether NANOTUNE_KERNELS turns them off. Nothing is built here."""
    try:
        from nanotune import kernels
    except Exception:  # torch missing: reported elsewhere
        return None
    import shutil

    try:
        path = kernels.built()
    except Exception:
        path = None
    return {
        "built": path,
        "compiler": shutil.which(os.environ.get("CXX", "c++")),
        "mode": os.environ.get("NANOTUNE_KERNELS", "auto"),
    }


def _gguf() -> dict | None:
    """GGUF loading (the gguf and accelerate packages: nanotune[gguf]) and the GGUF presets:
    {preset: {"file": the .gguf or None, "converted": its cached HF directory or None,
    "requirement", "error"}}. Nothing is converted here."""
    try:
        from nanotune import models
    except Exception:  # torch missing: reported elsewhere
        return None
    packages = {name: _module(name, name) for name in ("gguf", "accelerate")}
    presets = {}
    for name, spec in models.GGUF_PRESETS.items():
        try:
            file = models.gguf_preset_file(name)
            presets[name] = {"file": str(file), "converted": None, "requirement": spec["requirement"], "error": None}
            converted = models.gguf_converted(file)
            presets[name]["converted"] = None if converted is None else str(converted)
        except Exception as e:
            presets[name] = {"file": None, "converted": None, "requirement": spec["requirement"],
                             "error": f"{type(e).__name__}: {e}"}
    return {"packages": packages, "presets": presets, "extra": models.GGUF_EXTRA}


def _protocol_version() -> int | None:
    """The sidecar's PROTOCOL_VERSION, read without importing its dependencies if need be."""
    try:
        v = getattr(importlib.import_module("nanotune.wire"), "PROTOCOL_VERSION", None)
        if isinstance(v, int):
            return v
    except Exception:
        pass
    # msgspec missing: find the constant in the generated source
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "wire.py"), encoding="utf-8") as f:
            m = re.search(r"^PROTOCOL_VERSION\s*=\s*(\d+)", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def report() -> dict:
    modules = {name: _module(name, dist) for name, dist in REQUIRED}
    missing = [
        {"module": name, "requirement": dist, "error": modules[name]["error"]}
        for name, dist in REQUIRED
        if modules[name]["error"] is not None
    ]
    try:
        import nanotune

        package = {"version": getattr(nanotune, "__version__", None), "path": os.path.dirname(os.path.abspath(nanotune.__file__))}
    except Exception as e:
        package = {"version": None, "path": None, "error": f"{type(e).__name__}: {e}"}
    return {
        "python": {
            "executable": sys.executable,
            "version": platform.python_version(),
            "ok": sys.version_info[:2] >= MIN_PYTHON,
            "minimum": ".".join(map(str, MIN_PYTHON)),
        },
        "platform": platform.platform(),
        "nanotune": package,
        "protocol": _protocol_version(),
        "torch": _torch_info() if modules["torch"]["error"] is None else None,
        "transformers": modules["transformers"]["version"],
        "kernels": _kernels() if modules["torch"]["error"] is None else None,
        "gguf": _gguf() if modules["torch"]["error"] is None else None,
        "modules": modules,
        "missing": missing,
    }


def main() -> int:
    json.dump(report(), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
