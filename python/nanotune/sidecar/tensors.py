"""Tensor frames, part of the transport: `{dtype, shape, frame}` (a wire.TensorRef) in
the envelope, the bytes in frame number `frame` after it (C-contiguous,
little-endian). Both directions are zero-copy on this side: torch.frombuffer over
the received frame, and the sent frame is the tensor's own memory (pyzmq keeps a
reference until it is sent).

A module of its own because it imports torch: transport.py imports it only when a
tensor travels, so the I/O thread answers hello before torch is loaded."""
from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import torch

from ..errors import ErrorCode, NanotuneError
from ..wire import DTYPES as DTYPE_NAMES
from ..wire import TensorRef

# Received frames are read-only; torch warns once that writing to such a tensor is
# undefined. We document that instead (ctx.tensor: clone before writing).
warnings.filterwarnings("ignore", message="The given buffer is not writable")

assert sys.byteorder == "little", "tensor frames are little-endian; big-endian hosts are not supported"

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the schema's dtypes
NAMES = {v: k for k, v in DTYPES.items()}


def tensor_from_frame(ref: TensorRef, frames: list[Any], where: str) -> torch.Tensor:
    """A zero-copy view of frames[ref.frame] as a tensor of ref.dtype and ref.shape.
    `where` is "method: params.field", for the error messages."""
    field = where.split(": ", 1)[-1]
    if ref.frame >= len(frames):
        raise NanotuneError(
            ErrorCode.INVALID_REQUEST,
            f"{where}.frame: frame {ref.frame} does not exist; the message has {len(frames)} frame(s) after the envelope",
            {"field": f"{field}.frame"},
        )
    buf = frames[ref.frame]
    buf = buf.buffer if hasattr(buf, "buffer") else memoryview(buf)
    dtype = DTYPES[ref.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    want = math.prod(ref.shape) * itemsize
    if buf.nbytes != want:
        raise NanotuneError(
            ErrorCode.INVALID_PARAMS,
            f"{where}.shape: {ref.dtype} {list(ref.shape)} needs {want} bytes but frame {ref.frame} has {buf.nbytes}",
            {"field": f"{field}.shape"},
        )
    # The sizes match. The schema makes every dim >= 0; torch also needs the dims and
    # their product (a zero dim counted as 1: the strides) to fit int64, which the
    # frame's size does not bound when a dim is 0 ([0, 2**63] describes 0 bytes).
    if math.prod(max(d, 1) for d in ref.shape) >= 2**63:
        raise NanotuneError(
            ErrorCode.INVALID_PARAMS,
            f"{where}.shape: {list(ref.shape)} is too large for a tensor (the product of its dims must stay "
            "below 2**63)",
            {"field": f"{field}.shape"},
        )
    if want == 0:
        return torch.empty(ref.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).view(ref.shape)


def tensor_to_frame(t: Any, frames: list[Any]) -> dict[str, Any]:
    """Appends t's bytes to frames (no copy for a contiguous CPU tensor) and returns its TensorRef."""
    if not isinstance(t, torch.Tensor):
        t = torch.from_numpy(t)  # numpy arrays
    if t.dtype not in NAMES:
        raise TypeError(f"tensor dtype {t.dtype} cannot travel; use one of {sorted(DTYPES)}")
    shape = list(t.shape)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    frames.append(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return {"dtype": NAMES[t.dtype], "shape": shape, "frame": len(frames) - 1}
