"""The ports the kernel defines; plugins provide the adapters.

Each port is a typed Protocol. A plugin registers an adapter through the
matching registration hook (see :mod:`hsu.hookspecs`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs


@attrs.frozen
class LaunchSpec:
    """Everything a launcher needs to start one instance."""

    unit: str
    instance_id: str
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str | None = None
    #: file descriptors for the child's stdout and stderr (None: the launcher's
    #: choice); the kernel passes its per-instance log files
    stdout: int | None = None
    stderr: int | None = None
    #: POSIX rlimits applied in the child before exec, e.g. ``{"nofile": 1024}``
    rlimits: Mapping[str, int] = attrs.field(factory=dict)
    #: SIGKILL the child when the kernel dies (else it may be re-attached)
    die_with_kernel: bool = False


@runtime_checkable
class ProcessHandle(Protocol):
    """A started instance's process, as its launcher sees it."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None:
        """The exit status once it exited (negative: killed by that signal)."""
        ...

    async def wait(self) -> int:
        """Wait for the process to exit and return its status. No zombie is left."""
        ...

    def signal(self, signum: int) -> None:
        """Send a signal to the process and everything it started.

        Does nothing once the process has exited.
        """
        ...


@runtime_checkable
class Launcher(Protocol):
    """Starts instances. Output handling is the launcher's: the subprocess
    launcher sends each line to the kernel's log, bound to unit and instance."""

    async def launch(self, spec: LaunchSpec) -> ProcessHandle:
        """Start the process, or raise :class:`hsu.errors.LaunchError` saying why."""
        ...

    def attach(self, pid: int) -> ProcessHandle:
        """A handle on a process that is already running (started by a kernel
        that ran before this one, or by someone else), or raise
        :class:`hsu.errors.LaunchError` if it is gone."""
        ...


@attrs.frozen
class ProbeTarget:
    """The instance one probe checks."""

    unit: str
    instance_id: str
    #: 0 when the process is not known (an HSU that only registered)
    pid: int
    #: the HSU's gRPC address ("" before it registered, or for a plain process)
    address: str
    #: the unit's ``health.options``, already accepted by ``check_options``
    options: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ProbeResult:
    ok: bool
    #: why it failed (or what it saw), for logs and events
    detail: str = ""


@runtime_checkable
class Probe(Protocol):
    """A health probe: grpc.health.v1, Core.Ping, tcp, http, exec, process, ...

    One probe object serves every unit that names it; it may cache per
    address (a channel, say) and drops the cache in :meth:`forget`.
    """

    def check_options(self, options: Mapping[str, Any]) -> list[str]:
        """Problems with a unit's ``health.options``, each ``"key: what is wrong"``.

        Called when the deployment is loaded; an empty list accepts them.
        """
        ...

    async def check(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        """Probe once. Must return within ``timeout`` seconds and never raise
        for an unhealthy instance: that is ``ProbeResult(False, why)``."""
        ...

    def forget(self, target: ProbeTarget) -> None:
        """The instance is gone: drop anything cached for it."""
        ...
