"""Processes on this host, seen from outside: the one liveness check that checkpoint
sweeps (a temp directory's writer) and sidecar groups (a rank's pid) share."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["pid_alive"]


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs on this host. A zombie (killed, not reaped yet) is gone; a
    process we may not signal (another user's) runs."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    if sys.platform.startswith("linux"):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    return True
