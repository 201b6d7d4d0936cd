"""systemd's readiness protocol (``Type=notify``), for a kernel run as a service.

When the kernel's environment has ``$NOTIFY_SOCKET`` (systemd sets it for a
``Type=notify`` service; so do ``systemd-run`` and container managers that
speak the protocol), this plugin sends datagrams to it:

- ``READY=1`` once the kernel runs (its ``at-start`` units up, the other
  plugins' started hooks done: this one runs last), with a ``STATUS=`` line;
- ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` (``WatchdogSec=``) from the
  kernel's event loop, for as long as the kernel lives: a loop that hangs
  stops the pings, and systemd restarts the service;
- ``STOPPING=1`` when the kernel starts to drain.

The socket is a path or, starting with ``@``, an abstract socket. Without
``$NOTIFY_SOCKET`` the plugin does nothing. ``$WATCHDOG_PID``, when set,
must be the kernel's pid (as sd_notify(3) says). A send that fails is
logged once and never stops the kernel. See docs/systemd.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping

from loguru import logger

import hsu
from hsu.ports import KernelAPI

#: the name this plugin's per-kernel state is registered under
NOTIFIER = "systemd.notifier"


def notify_address(environ: Mapping[str, str]) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as an address for ``sendto``: a path, or bytes
    starting with a NUL byte for an abstract socket (``@name``)."""
    raw = environ.get("NOTIFY_SOCKET", "")
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock and relative paths are not for us


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1`` (half of ``$WATCHDOG_USEC``), or None."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    try:
        if not usec or int(usec) <= 0 or (owner and int(owner) != pid):
            return None
        return int(usec) / 1e6 / 2
    except ValueError:
        logger.warning("systemd: WATCHDOG_USEC={!r} is not a number; no watchdog pings", usec)
        return None


class Notifier:
    """One kernel's messages to its service manager."""

    def __init__(self, kernel: KernelAPI, address: str | bytes, interval: float | None):
        self.kernel = kernel
        self.address = address
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._failed = False

    def send(self, *fields: str) -> bool:
        """One datagram of ``KEY=VALUE`` lines; False (logged once) if it failed."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                where = (
                    self.address if isinstance(self.address, str) else "@" + repr(self.address[1:])
                )
                logger.warning("systemd: cannot notify {}: {}", where, exc.strerror or exc)
            return False
        return True

    async def _ping(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.send("WATCHDOG=1")

    @hsu.hookimpl(trylast=True)
    def hsu_kernel_started(self) -> None:
        k = self.kernel
        self.send("READY=1", f"STATUS=running {k.deployment.name} on {k.address or '-'}")
        if self.interval is not None:
            self._task = asyncio.get_running_loop().create_task(self._ping(self.interval))

    @hsu.hookimpl(tryfirst=True)
    def hsu_kernel_stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining")

    @hsu.hookimpl
    async def hsu_kernel_stopped(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


@hsu.hookimpl
def hsu_kernel_configure(kernel: KernelAPI) -> None:
    address = notify_address(os.environ)
    if address is None:
        return
    interval = watchdog_interval(os.environ, os.getpid())
    kernel.register_plugin(Notifier(kernel, address, interval), NOTIFIER)
