"""One error class for everything nanotune raises on purpose: `NanotuneError`.

Its `code` is a code of the protocol's error table (`nanotune.wire.ErrorCode`,
generated from protocol/schema.ts), `message` says what was wrong and `data`
holds the machine-readable details (`path`, `line`, `field`, ...). The sidecar
answers a call that raised one with exactly that `{code, message, data}`, so a
handler never translates errors; the TS client raises the same code as its own
NanotuneError.

The domain errors (ModelError in models.py, DatasetError in data.py,
SessionError in session.py, CheckpointError in checkpoint.py, OptimizerError in
training.py, TaskFormatError in evaluation.py) are subclasses whose code defaults
to INVALID_PARAMS: bad input the caller can fix. They are ValueErrors too, so
code that caught ValueError keeps working.

`Cancelled` (nanotune.sidecar.dispatch) is not one of these: it is control flow
(a BaseException), not an error.
"""

from __future__ import annotations

import re
from typing import Any

from .wire import ERROR_CODES, ErrorCode

__all__ = ["ErrorCode", "InvalidParams", "NanotuneError", "SidecarError", "field_of"]


class NanotuneError(Exception):
    """An error with a protocol error code; the sidecar replies with code, message and data."""

    code: str = ErrorCode.INTERNAL  # subclasses set their default

    def __init__(self, code: str | None, message: str, data: Any = None):
        super().__init__(message)
        if code is not None:
            if code not in ERROR_CODES:
                raise ValueError(f"{code!r} is not a code of the protocol's error table ({', '.join(ERROR_CODES)})")
            self.code = code
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return self.message


SidecarError = NanotuneError  # the older name, same class


class InvalidParams(NanotuneError, ValueError):
    """Base of the domain errors: bad input that the caller can fix (code INVALID_PARAMS).
    The keyword attributes that are not None (`path`, `line`, `field`, ...) are set on
    the error and collected in `data`, which the sidecar sends back."""

    code = ErrorCode.INVALID_PARAMS

    def __init__(self, message: str, **where: Any):
        for k, v in where.items():
            setattr(self, k, v)
        super().__init__(None, message, {k: v for k, v in where.items() if v is not None} or None)


def field_of(err: Exception, prefix: str) -> tuple[str, str]:
    """Where a msgspec ValidationError points, and why: ('params.seconds', 'Expected
    `float`, got `str`') from msgspec's 'Expected `float`, got `str` - at `$.seconds`'.
    A missing or unknown field is reported at its parent object; this names the field."""
    msg, path = str(err), ""
    m = re.search(r" - at `\$(.*)`$", msg)
    if m:
        msg, path = msg[: m.start()], m.group(1)
    m = re.search(r"(?:required|unknown) field `([^`]+)`", msg)
    if m:
        return f"{prefix}{path}.{m.group(1)}", msg
    return prefix + path, msg
