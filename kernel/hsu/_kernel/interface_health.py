"""grpc.health.v1 for interface names on the kernel's data plane.

A client that asks the kernel about ``hsu.echo.v1.Echo`` asks whether a call
to it can be served, which is a question about the units that serve it, not
about one process: SERVING while a unit can take the call (a ready instance;
or none yet but one can be started or is starting or backing off, as an
on-demand unit with no instance), NOT_SERVING when the kernel is not running
or every unit serving it has an instance whose crash-loop breaker opened
(``fatal``) and none ready. An interface no unit serves is unknown
(NOT_FOUND to Check, SERVICE_UNKNOWN to Watch), and one a reload removed
turns SERVICE_UNKNOWN.

The statuses are computed again after every instance transition, reload and
kernel transition (the event bus), once per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from grpc_health.v1 import health, health_pb2

from hsu._kernel.lifecycle import KernelState
from hsu._kernel.supervision.instances import InstanceState

if TYPE_CHECKING:
    from hsu._kernel.kernel import Kernel
    from hsu.ports import Event

#: a HealthCheckResponse.ServingStatus value
Status = int
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def interface_statuses(kernel: Kernel) -> dict[str, Status]:
    """Every interface a unit serves, and whether a call to it can be served."""
    running = kernel.state is KernelState.RUNNING
    can: dict[str, bool] = {}
    for name, spec in kernel.deployment.units.items():
        sup = kernel.units.get(name)
        slots = list(sup.wanted) if sup is not None else []
        ready = any(i.state is InstanceState.READY for i in slots)
        broken = any(i.state is InstanceState.FATAL for i in slots)
        for interface in spec.interfaces:
            can[interface] = can.get(interface, False) or ready or not broken
    # registered on their own (not a unit of this deployment's): while ready
    for inst in kernel.instances.values():
        if inst.unit not in kernel.deployment.units:
            for interface in inst.interfaces:
                ok = inst.state is InstanceState.READY
                can[interface] = can.get(interface, False) or ok
    return {i: SERVING if ok and running else NOT_SERVING for i, ok in can.items()}


class InterfaceHealth:
    """Keeps a health servicer's interface statuses up to date."""

    def __init__(self, kernel: Kernel, servicer: health.aio.HealthServicer):
        self._kernel = kernel
        self._servicer = servicer
        self._set: dict[str, Status] = {}
        self._pending = False
        self._tasks: set[asyncio.Task[None]] = set()

    def on_event(self, event: Event) -> None:
        if event.kind not in ("instance", "kernel", "reload") or self._pending:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to serve
            loop = asyncio.get_running_loop()
            self._pending = True
            loop.call_soon(self._schedule)

    def _schedule(self) -> None:
        task = asyncio.ensure_future(self.refresh())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def refresh(self) -> None:
        self._pending = False
        now = interface_statuses(self._kernel)
        for interface in set(self._set) - set(now):
            await self._servicer.set(interface, UNKNOWN)
        for interface, status in now.items():
            if self._set.get(interface) != status:
                await self._servicer.set(interface, status)
        self._set = now

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
