"""Default launcher: a local child process in its own process group.

The process is started with fork+exec (never a bare fork of the kernel), in a
new session, so a signal to its group reaches everything it started. Its
stdout and stderr go where the kernel says (its per-instance log files).

Exit detection does not poll (see :class:`hsu.pidfd.PidfdHandle`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Callable

import hsu
from hsu.errors import LaunchError
from hsu.pidfd import PidfdHandle
from hsu.ports import Launcher, LaunchSpec
from hsu.resources import rlimits_preexec

PR_SET_PDEATHSIG = 1


def _preexec(spec: LaunchSpec) -> Callable[[], None] | None:
    limits = rlimits_preexec(spec.rlimits)
    if not spec.die_with_kernel:
        return limits
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    kill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if limits is not None:
            limits()

    return preexec


class SubprocessLauncher:
    async def launch(self, spec: LaunchSpec) -> PidfdHandle:
        where = f"unit {spec.unit!r}"
        # one stat() before a fork+exec; not worth a thread
        if spec.cwd is not None and not os.path.isdir(spec.cwd):  # noqa: ASYNC240
            raise LaunchError(f"{where}: working directory {spec.cwd!r} does not exist")
        try:
            # fork+exec takes a millisecond or two: not worth a thread
            proc = subprocess.Popen(  # noqa: ASYNC220
                list(spec.argv),
                stdin=subprocess.DEVNULL,
                stdout=spec.stdout if spec.stdout is not None else subprocess.DEVNULL,
                stderr=spec.stderr if spec.stderr is not None else subprocess.DEVNULL,
                env=dict(spec.env),
                cwd=spec.cwd,
                start_new_session=True,
                close_fds=True,
                preexec_fn=_preexec(spec),
            )
        except FileNotFoundError:
            raise LaunchError(
                f"{where}: executable {spec.argv[0]!r} not found (command: {' '.join(spec.argv)})"
            ) from None
        except PermissionError:
            raise LaunchError(f"{where}: {spec.argv[0]!r} is not executable") from None
        except (OSError, subprocess.SubprocessError) as exc:
            raise LaunchError(f"{where}: cannot start {spec.argv[0]!r}: {exc}") from None
        return PidfdHandle(proc.pid, child=True, owned=True, popen=proc)

    def attach(self, pid: int) -> PidfdHandle:
        return PidfdHandle.attach(pid, owned=True)


@hsu.hookimpl
def hsu_register_launchers(register: Callable[[str, Launcher], None]) -> None:
    register("subprocess", SubprocessLauncher())
