"""The kernel's record of the instances it runs, kept on disk.

Written (atomically: a temporary file, then a rename) whenever an instance
gets a new pid or address. A kernel that was SIGKILLed and is started again
reads it to re-attach to the HSUs still running rather than start duplicates
or leave orphans. A pid is trusted only if the process's start time matches
too, so a reused pid is never taken for an old instance.

The file decides which processes a kernel signals, so it is trusted only if
this user wrote it: in a 0700 directory this user owns, mode 0600 whatever
the umask, and when read, owned by this user and writable by no one else
(a regular file, not a symlink). Any other is ignored with a warning naming
it: nothing in it is re-attached to or stopped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import attrs
import cattrs
import psutil
from loguru import logger

from hsu._kernel.control import secure_dir
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
    #: the process's secret, so a re-attached HSU still proves itself (the
    #: file is 0600 in the 0700 state dir, and trusted only if the kernel's)
    token: str = attrs.field(default="", repr=False)


@attrs.frozen
class SavedState:
    kernel_pid: int
    kernel_create_time: float
    deployment: str
    instances: tuple[SavedInstance, ...] = ()
    format: int = FORMAT


_conv = cattrs.Converter()


#: read /proc/<pid>/stat directly (else psutil, off Linux)
_PROCFS = sys.platform.startswith("linux") and os.path.isfile("/proc/self/stat")


@functools.cache
def _boot_and_ticks() -> tuple[float, int]:
    """(boot time, clock ticks per second), read once per process: psutil
    reads /proc/stat again for every ``create_time()``."""
    return psutil.boot_time(), os.sysconf("SC_CLK_TCK")


def create_time(pid: int) -> float | None:
    """The process's start time as psutil's ``create_time()`` gives it, or
    None if there is no such live process. On Linux one read of
    /proc/<pid>/stat (a launch of 1,000 asks for each new pid once; through
    psutil each cost three reads, one of them /proc/stat)."""
    if not _PROCFS:
        return _create_time_psutil(pid)
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)  # one line, well under a page
        finally:
            os.close(fd)
        # after "pid (comm) ", where comm may hold spaces and parentheses
        fields = data[data.rindex(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            return None
        boot, ticks = _boot_and_ticks()
        return float(fields[19]) / ticks + boot
    except (OSError, ValueError, IndexError):
        return None


def _create_time_psutil(pid: int) -> float | None:
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


def untrusted(st: os.stat_result) -> str | None:
    """Why a state file with this stat is not to be trusted (None: it is)."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this kernel's user ({os.geteuid()})"
    if st.st_mode & 0o022:
        return f"mode {stat.S_IMODE(st.st_mode):04o}: writable by others than its owner"
    return None


def _ignored(path: Path, why: str) -> None:
    logger.warning(
        "ignoring the state file {}: {}; re-attaching to or stopping nothing in it", path, why
    )


def load(path: Path) -> SavedState | None:
    """The state a kernel left, or None if there is none or it is not trusted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            _ignored(path, "a symlink")
            return None
        raise HsuError(f"{path}: cannot read the kernel state file: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        why = untrusted(os.fstat(f.fileno()))
        if why is not None:
            _ignored(path, why)
            return None
        try:
            raw = json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise HsuError(f"{path}: cannot read the kernel state file: {exc}") from None
    try:
        return _conv.structure(raw, SavedState)
    except Exception as exc:
        raise HsuError(f"{path}: not a kernel state file this version reads: {exc}") from None


def save(path: Path, state: SavedState) -> None:
    """Write the state atomically: mode 0600 in a 0700 directory, whatever the umask."""
    try:
        secure_dir(path.parent)
    except HsuError as exc:  # another user's directory: as if not writable
        raise PermissionError(str(exc)) from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data: Any = _conv.unstructure(state)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:  # left by a kernel of this pid that died writing
        tmp.unlink()
        fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # a umask may take bits off, never add them
            f.write(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
