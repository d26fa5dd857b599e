"""Compiled CPU kernels for NanoAdam: the sparse step, the per-chunk selection and
the moment remap (csrc/nano_adam_cpu.cpp; Note [CPU kernels] in optim.py).

Built with torch.utils.cpp_extension (about 20 s with a C++ compiler and ninja) by
`npm start` / `npm test` / `npx nanotune setup`, or else on first use, and cached
where torch caches extensions ($TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), under a name keyed by the source, torch's version and
the flags, so every process and every NANOTUNE_CACHE shares one build. Where no
compiler is found or the build fails, ``cpu()`` returns None and says why once;
NanoAdam then runs its torch-op paths, which give the same bits, slower.

NANOTUNE_KERNELS: ``auto`` (default) builds on first use and falls back quietly
but for one warning; ``0`` never builds (torch-op paths only); ``1`` raises when
the build fails. ``python -m nanotune.kernels`` builds now and reports.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["SOURCE", "built", "cpu", "status"]

SOURCE = Path(__file__).parent / "csrc" / "nano_adam_cpu.cpp"

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None
_tried = False


def _mode() -> str:
    mode = os.environ.get("NANOTUNE_KERNELS", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"Invalid NANOTUNE_KERNELS: {mode!r}; expected auto, 0 or 1")
    return mode


def _flags() -> list[str]:
    # -ffp-contract=off: only the multiply-adds the source writes as std::fma are fused,
    # so the rounding is the torch reference's (Note [CPU kernels]). The instruction sets
    # are those torch itself found on this CPU (AVX2 and AVX-512 machines have FMA and
    # POPCNT), so std::fma is one instruction; the build is cached per flags.
    flags = ["-O3", "-ffp-contract=off"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mfma", "-mpopcnt"]
    if capability == "AVX512":  # the selection's passes run 16 keys at a time
        flags.append("-mavx512f")
    # at::parallel_for is inline OpenMP: without -fopenmp it runs on one thread. The
    # library it links is torch's own libgomp.so.1, already loaded (same soname). Apple's
    # clang has no -fopenmp: there the kernels run on one thread.
    if sys.platform != "darwin":
        flags.append("-fopenmp")
    return flags


def _ensure_ninja() -> None:
    # torch's builder runs `ninja` from PATH; the `ninja` wheel puts it next to the
    # interpreter, which is not on PATH when the sidecar runs .venv/bin/python directly.
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _name(flags: list[str]) -> str:
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(flags).encode())
    return f"nanotune_cpu_{key.hexdigest()[:16]}"


def _build_dir(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory  # where load() builds and looks

    return Path(_get_build_directory(name, verbose=False))


def _load() -> ModuleType:
    from torch.utils.cpp_extension import load

    flags = _flags()
    name = _name(flags)
    build = _build_dir(name)
    # The source is built from a copy in the build directory: the name already keys its
    # content, and one path for every install (a checkout, site-packages) keeps ninja
    # from rebuilding each time another install loads it.
    source = build / SOURCE.name
    text = SOURCE.read_bytes()
    if not source.exists() or source.read_bytes() != text:
        tmp = build / f".{SOURCE.name}.{os.getpid()}"
        tmp.write_bytes(text)
        os.replace(tmp, source)
    _ensure_ninja()
    if not (build / f"{name}.so").exists():  # a pause the user should understand
        print(f"nanotune: building NanoAdam's CPU kernels into {build} (once; about 20 s)", file=sys.stderr, flush=True)
    return load(name=name, sources=[str(source)], extra_cflags=flags, build_directory=str(build),
                extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [], verbose=False)


def built() -> str | None:
    """The cached library when it is built already (nothing is built here), else None."""
    name = _name(_flags())
    try:
        path = _build_dir(name) / f"{name}.so"
    except Exception:  # an unwritable cache: not built
        return None
    return str(path) if path.exists() else None


def _reason(e: BaseException) -> str:
    """One line on why the build failed: the compiler's first error, else the exception's first line."""
    lines = str(e).strip().splitlines() or [""]
    first = next((ln.strip() for ln in lines if "error:" in ln or "not found" in ln.lower()), lines[0].strip())
    return f"{type(e).__name__}: {first[:300]}"


def cpu() -> ModuleType | None:
    """The compiled CPU kernels, built on the first call; None when NANOTUNE_KERNELS=0
    or the build failed (``status()`` says why)."""
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        mode = _mode()
        if mode == "0":
            _error = "NANOTUNE_KERNELS=0"
        else:
            try:
                _module = _load()
            except Exception as e:  # no compiler, no ninja, a compile error: fall back, say why
                _error = _reason(e)
                if mode == "1":
                    _tried = True
                    raise RuntimeError(f"nanotune's CPU kernels did not build ({_error}); "
                                       "install a C++ compiler and ninja, or set NANOTUNE_KERNELS=auto") from e
                warnings.warn(f"nanotune's CPU kernels did not build ({_error}): NanoAdam runs its torch-op "
                              "paths on the CPU (same results, slower). NANOTUNE_KERNELS=0 skips the build.",
                              RuntimeWarning, stacklevel=2)
        _tried = True
    return _module


def status() -> dict[str, object]:
    """Whether the kernels are loaded, and why not: builds them if not tried yet."""
    module = cpu()
    return {"available": module is not None, "reason": _error,
            "path": getattr(module, "__file__", None) if module is not None else None}


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    s = status()
    took = time.perf_counter() - t0
    if s["available"]:
        print(f"nanotune CPU kernels: ready ({s['path']}, {took:.1f} s)")
    else:
        print(f"nanotune CPU kernels: not available ({s['reason']}); NanoAdam uses its torch-op paths")
