"""``idle_timeout``: an instance no call (or lease) used for that long is
stopped and its slot dropped, as long as the unit keeps ``min_instances``;
the next call starts one on demand again. The timeout in effect is the
spec's ``idle_after`` (``idle_timeout`` as written, else the default for an
HSU started on demand; docs/configuration.md, "Idle timeout").

The check runs every quarter of the timeout (at least 0.1 s, at most 5 s),
so an instance stops between ``idle_timeout`` and 1.25 x ``idle_timeout``
after its last call. One instance stops per check: the most idle one.
"""

from __future__ import annotations

import asyncio
import time

from loguru import logger

import hsu
from hsu.ports import KernelAPI, Register, UnitSpec, Watcher


class Idle:
    settings: tuple[str, ...] = ("idle_timeout",)

    def wants(self, unit: str, spec: UnitSpec) -> bool:
        return bool(spec.idle_after)

    async def watch(self, kernel: KernelAPI, unit: str) -> None:
        while True:
            spec = kernel.deployment.units.get(unit)
            timeout = (spec.idle_after if spec is not None else None) or 0.0
            if timeout <= 0:
                return
            await asyncio.sleep(min(max(timeout / 4, 0.1), 5.0))
            now = time.monotonic()
            idle = [
                i
                for i in kernel.instances.values()
                if i.unit == unit
                and i.managed
                and i.state == "ready"
                and not i.leased
                and now - i.last_used > timeout
            ]
            if not idle:
                continue
            victim = min(idle, key=lambda i: i.last_used)
            reason = f"idle for {timeout:g}s"
            try:
                if await kernel.retire(victim.instance_id, reason):
                    logger.bind(unit=unit).info(
                        "instance {} idle for {:g}s; stopped it", victim.instance_id, timeout
                    )
            except hsu.HsuError:
                continue  # it went meanwhile


@hsu.hookimpl
def hsu_register_watchers(register: Register[Watcher]) -> None:
    register("idle", Idle())
