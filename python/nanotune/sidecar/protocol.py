"""The wire contract, Python side: mirrors protocol/schema.ts (the source of truth).

tests/python/test_protocol.py checks every Struct here against protocol/schema.json:
method names, field names (camelCase on the wire), required-ness and types.
"""
from __future__ import annotations

from typing import Any, Literal

import msgspec

PROTOCOL_VERSION = 1


class ErrorCode:
    """The error-code table (protocol/schema.ts `errorCodes`); only sidecar-origin codes are raised here."""

    INVALID_REQUEST = "INVALID_REQUEST"
    INVALID_PARAMS = "INVALID_PARAMS"
    UNKNOWN_METHOD = "UNKNOWN_METHOD"
    PROTOCOL_MISMATCH = "PROTOCOL_MISMATCH"
    BUSY = "BUSY"
    CANCELLED = "CANCELLED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    INTERNAL = "INTERNAL"
    # raised by the TS client only, listed so the table is complete on both sides
    TIMEOUT = "TIMEOUT"
    SIDECAR_CRASHED = "SIDECAR_CRASHED"
    START_FAILED = "START_FAILED"
    CLOSED = "CLOSED"


ERROR_CODES = tuple(v for k, v in vars(ErrorCode).items() if k.isupper())

DType = Literal["float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool"]


class Model(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """Base of every params/result/event Struct: camelCase on the wire, unknown fields are errors."""


class TensorRef(Model):
    dtype: DType  # element type (torch name)
    shape: list[int]  # C-contiguous shape; frame length must equal prod(shape) * itemsize
    frame: int  # index of the raw frame after the envelope (0 = first)


# ---- envelope -----------------------------------------------------------------


class Request(msgspec.Struct, forbid_unknown_fields=True):
    v: int  # sender's protocol version
    id: int  # request id; the reply carries it back
    method: str
    params: msgspec.Raw = msgspec.Raw(b"\x80")  # absent means {} (0x80: empty msgpack map)


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    data: Any = None
    traceback: str | None = None


class Result(msgspec.Struct):
    id: int
    result: Any


class Error(msgspec.Struct):
    id: int | None
    error: ErrorBody


class Event(msgspec.Struct):
    event: str
    data: Any


# ---- methods ------------------------------------------------------------------


class Empty(Model):
    pass


class HelloParams(Model):
    protocol: int  # the client's PROTOCOL_VERSION
    client: str | None = None  # free-form client name/version, for logs


class CudaInfo(Model):
    name: str
    total_bytes: int
    free_bytes: int


class HelloResult(Model):
    protocol: int
    sidecar: str  # nanotune package version
    python: str
    torch: str
    pid: int
    device: str  # "cpu" or "cuda:N"
    dtype: str  # default parameter dtype on that device
    cuda: CudaInfo | None
    methods: list[str]


class BusyInfo(Model):
    id: int
    method: str
    running_s: float
    cancelling: bool


class StatusResult(Model):
    pid: int
    uptime_s: float
    ready: bool  # torch imported and method modules loaded
    busy: BusyInfo | None
    served: int  # requests answered so far
    rejected: int  # requests answered with an error so far


class CancelParams(Model):
    id: int | None = None  # cancel only if the running call has this id


class CancelResult(Model):
    cancelled: bool
    id: int | None


class DebugBusyParams(Model):
    seconds: float
    tick_every_s: float | None = None  # emit debug:tick this often (default: never)
    cooperative: bool | None = None  # False: never call check_cancelled (tests the forced cancel)


class DebugBusyResult(Model):
    iterations: int
    seconds: float


class DebugEchoParams(Model):
    value: Any = None
    tensor: TensorRef | None = None


class DebugEchoResult(Model):
    value: Any
    # Result fields typed TensorRef hold a torch.Tensor (or numpy array) when a handler
    # returns them; the encoder sends its bytes as a frame and writes the TensorRef.
    tensor: TensorRef | None


class DebugStoreParams(Model):
    key: str
    value: Any = None


class DebugStoreResult(Model):
    previous: Any


# ---- events -------------------------------------------------------------------


class DebugTick(Model):
    iteration: int
    elapsed_s: float
