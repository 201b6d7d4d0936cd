"""The ports the kernel defines; plugins provide the adapters.

Each port is a typed Protocol. A plugin registers an adapter through the
matching registration hook (see :mod:`hsu.hookspecs`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import attrs


@attrs.frozen
class LaunchSpec:
    """Everything a launcher needs to start one instance."""

    unit: str
    instance_id: str
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str | None = None


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
