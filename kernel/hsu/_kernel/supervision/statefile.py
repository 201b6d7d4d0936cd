"""The kernel's record of the instances it runs, kept on disk.

Written (atomically: a temporary file, then a rename) whenever an instance
gets a new pid or address. A kernel that was SIGKILLed and is started again
reads it to re-attach to the HSUs still running rather than start duplicates
or leave orphans. A pid is trusted only if the process's start time matches
too, so a reused pid is never taken for an old instance.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import attrs
import cattrs
import psutil

from hsu.errors import HsuError

FORMAT = 1


@attrs.frozen
class SavedInstance:
    instance_id: str
    unit: str
    pid: int
    #: psutil's create_time of the pid, to tell it from a reused pid
    create_time: float
    address: str = ""
    interfaces: tuple[str, ...] = ()
    started_at: float = 0.0
    restarts: int = 0


@attrs.frozen
class SavedState:
    kernel_pid: int
    kernel_create_time: float
    deployment: str
    instances: tuple[SavedInstance, ...] = ()
    format: int = FORMAT


_conv = cattrs.Converter()


def create_time(pid: int) -> float | None:
    """The process's start time, or None if there is no such live process."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_running(pid: int, created: float) -> bool:
    """The very process recorded (not another one that got its pid since)."""
    now = create_time(pid)
    return now is not None and abs(now - created) < 0.05


def load(path: Path) -> SavedState | None:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise HsuError(f"{path}: cannot read the kernel state file: {exc}") from None
    try:
        return _conv.structure(raw, SavedState)
    except Exception as exc:
        raise HsuError(f"{path}: not a kernel state file this version reads: {exc}") from None


def save(path: Path, state: SavedState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data: Any = _conv.unstructure(state)
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
