"""Watch a process through a pidfd: exit detection without polling.

A pidfd (Linux 5.3+) becomes readable when its process exits; the event loop
learns it through ``add_reader`` and a child is reaped at once with
``waitpid(pid, WNOHANG)``, so no zombie is left. The same works for a process
this kernel did not start (one it re-attached to), whose exit status is then
unknown. The pidfd pins the process: a signal never reaches a reused pid.

For launchers, the exec wrappers that set a process up before its command
runs, keeping its pid: :func:`cgroup_argv` (join the instance's cgroup,
``LaunchSpec.cgroup``) and :func:`rlimits_argv` (``LaunchSpec.rlimits``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
from collections.abc import Mapping

from hsu.errors import LaunchError

#: the status reported for a process that was not our child (unknown)
UNKNOWN_STATUS = -256


class PidfdHandle:
    """A process watched through a pidfd."""

    def __init__(
        self,
        pid: int,
        *,
        child: bool,
        owned: bool,
        popen: subprocess.Popen[bytes] | None = None,
    ):
        """``child``: ours to reap; ``owned``: leads its own process group, which
        is ours to signal (and to SIGKILL once the leader is gone)."""
        self._pid = pid
        self._child = child
        self._owned = owned
        self._popen = popen
        self._returncode: int | None = None
        #: what :meth:`exited` handed out, resolved at the exit
        self._waiters: list[asyncio.Future[int]] = []
        loop = asyncio.get_running_loop()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None
            self._finish(self._reap() if child else UNKNOWN_STATUS)
            return
        loop.add_reader(self._pidfd, self._on_exit)

    def _reap(self) -> int:
        try:
            _, status = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            return UNKNOWN_STATUS
        return os.waitstatus_to_exitcode(status)

    def _on_exit(self) -> None:
        self._finish(self._reap() if self._child else UNKNOWN_STATUS)

    def _finish(self, code: int) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._owned:
            # what the leader started dies with it: its group gets SIGKILL (a
            # group id is not reused while any member is alive)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pid, signal.SIGKILL)
        self._returncode = code
        if self._popen is not None:
            self._popen.returncode = code  # so Popen never waits or warns
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(code)

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def wait(self) -> int:
        return await self.exited()

    def exited(self) -> asyncio.Future[int]:
        """A new future of the exit status; cancelling it does not stop the
        handle's own watch. (Cheaper than a task running :meth:`wait`, or
        than ``asyncio.shield``, which adds a future and two closures.)"""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self._returncode is not None:
            fut.set_result(self._returncode)
        else:
            self._waiters = [w for w in self._waiters if not w.done()]
            self._waiters.append(fut)
        return fut

    def signal(self, signum: int) -> None:
        if self._returncode is not None or self._pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self._owned:
                # the leader is alive or unreaped, so its group id is still its own
                os.killpg(self._pid, signum)
            else:
                signal.pidfd_send_signal(self._pidfd, signum)

    @classmethod
    def attach(cls, pid: int, *, owned: bool) -> PidfdHandle:
        """Watch a running process that is not our child."""
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise LaunchError(f"pid {pid} is not running") from None
        except PermissionError:
            raise LaunchError(f"pid {pid} belongs to another user") from None
        return cls(pid, child=False, owned=owned)


# -- a cgroup at spawn ---------------------------------------------------------
#
# Python cannot clone3(CLONE_INTO_CGROUP), and a preexec_fn is ruled out (see
# below), so the process joins its cgroup itself: a POSIX shell writes its own
# pid into ``cgroup.procs`` and then execs the rest of the command line, which
# keeps that pid. Whatever the command starts is in the cgroup from its first
# instruction: no window in which a fork escapes it.

#: the shell that joins the cgroup (POSIX guarantees ``/bin/sh``)
SHELL = "/bin/sh"
#: ``$1`` is the cgroup's ``cgroup.procs``; the rest is the command to exec
CGROUP_SCRIPT = (
    '{ echo $$ > "$1"; } 2>/dev/null || '
    '{ echo "hsu: cannot join the cgroup of $1" >&2; exit 126; }; shift; exec "$@"'
)
#: the same, and ``$2`` the soft limit of open files to set before the exec (one
#: exec wrapper less than ``prlimit`` after the shell)
CGROUP_NOFILE_SCRIPT = (
    '{ echo $$ > "$1"; } 2>/dev/null || '
    '{ echo "hsu: cannot join the cgroup of $1" >&2; exit 126; }; '
    'ulimit -S -n "$2" 2>/dev/null || '
    '{ echo "hsu: cannot set the soft limit of open files to $2" >&2; exit 126; }; '
    'shift 2; exec "$@"'
)


def cgroup_argv(cgroup: str, nofile_soft: int | None = None) -> list[str]:
    """An exec wrapper that moves itself into the cgroup v2 directory
    ``cgroup`` and then execs what follows it, keeping its pid:
    ``[*cgroup_argv(path), *argv]``. If it cannot join, it exits 126 with one
    line on stderr and never runs the command.

    With ``nofile_soft``, it also sets its soft limit of open files to that
    (``ulimit -S -n``, the hard limit untouched) before the exec, as
    ``prlimit --nofile=N:`` would, and exits 126 the same way if it cannot."""
    procs = os.path.join(cgroup, "cgroup.procs")
    if nofile_soft is None:
        return [SHELL, "-c", CGROUP_SCRIPT, "hsu-cgroup", procs]
    limit = "unlimited" if nofile_soft in (-1, resource.RLIM_INFINITY) else str(nofile_soft)
    return [SHELL, "-c", CGROUP_NOFILE_SCRIPT, "hsu-cgroup", procs, limit]


# -- rlimits at spawn ---------------------------------------------------------
#
# A launcher sets POSIX rlimits with util-linux's prlimit in front of the
# command, which then execs it: no preexec_fn, as that makes subprocess.Popen
# fork() a kernel whose gRPC threads make fork unsafe.

#: rlimit names as a unit spells them (``RLIMIT_NOFILE`` -> ``nofile``)
RESOURCES: Mapping[str, int] = {
    name.removeprefix("RLIMIT_").lower(): getattr(resource, name)
    for name in sorted(dir(resource))
    if name.startswith("RLIMIT_")
}
UNLIMITED = -1
RLIM_MAX = 2**63 - 1

#: prlimit(1)'s option for each resource: its name (``ofile`` is ``nofile``
#: under its old name, the same resource)
PRLIMIT_OPTIONS: Mapping[int, str] = {
    getattr(resource, f"RLIMIT_{name.upper()}"): name
    for name in (
        "as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
        "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack",
    )
    if hasattr(resource, f"RLIMIT_{name.upper()}")
}  # fmt: skip


def rlimits_argv(rlimits: Mapping[str, int]) -> list[str]:
    """The options of util-linux's ``prlimit`` that set ``rlimits`` (empty if none).

    ``[prlimit, *rlimits_argv(rlimits), "--", *argv]`` sets the limits on
    itself and execs ``argv``, which keeps its pid and holds them from its
    first instruction. Each value becomes both the soft and the hard limit
    (``--nofile=256:256``; -1 is ``unlimited``). Raises ``ValueError`` for an
    unknown name or a bad value (see :func:`check_rlimits`).
    """
    options: list[str] = []
    for name, value in rlimits.items():
        res = RESOURCES.get(name)
        option = PRLIMIT_OPTIONS.get(res) if res is not None else None
        if (
            option is None
            or isinstance(value, bool)
            or not isinstance(value, int)
            or not UNLIMITED <= value <= RLIM_MAX
        ):
            raise ValueError(f"rlimits.{name}: cannot set {value!r}")
        limit = "unlimited" if value == UNLIMITED else str(value)
        options.append(f"--{option}={limit}:{limit}")
    return options
