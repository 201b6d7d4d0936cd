"""``hsu run`` as PID 1 (a container's first process): a reaper in front of the kernel.

PID 1 inherits every orphan of its PID namespace, also those of processes
that entered it from outside (``docker exec``, ``nsenter``), which share no
session or cgroup with anything the kernel started, so the kernel's own
reaping rules (:mod:`hsu._kernel.supervision.containment`: never take the
status of a process it may have forked) would leave them as zombies. So, as
PID 1, ``hsu run`` starts the kernel as its one child (fork+exec, the same
command line) and stays as the namespace's init, as ``docker run --init``
(tini) does: it forwards the stop and reload signals to the kernel, reaps
every other process that ends up its child, and exits with the kernel's
exit code. The kernel, a child subreaper, reaps what its instances leave.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

#: what the init passes on to the kernel
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def is_init() -> bool:
    return os.getpid() == 1


def run(argv: Sequence[str]) -> int:
    """Start ``argv`` (the kernel) and reap until it exits; its exit code
    (128 + the signal's number if a signal ended it)."""
    child = subprocess.Popen(list(argv))

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):  # gone: the wait below sees it
            os.kill(child.pid, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    while True:
        try:
            pid, status = os.wait()  # any child: the kernel or an orphan
        except ChildProcessError:  # no child at all (cannot happen before the kernel's)
            return 1
        if pid == child.pid:
            child.returncode = code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


def kernel_argv() -> list[str]:
    """This process's command line, run again by the same interpreter."""
    return [sys.executable, "-m", "hsu", *sys.argv[1:]]
