"""A unit's ``limits`` thresholds: every ``limits.interval`` each ready
instance's process tree is sampled (RSS, CPU, open files, threads,
children; :meth:`hsu.ports.KernelAPI.usage`); a breach is logged, published
on the topic ``limits`` (the instance and the breaches as the reason), and,
with ``action: restart`` or ``stop``, acted on.
"""

from __future__ import annotations

import asyncio
from typing import Any

from loguru import logger

import hsu
from hsu.ports import KernelAPI, Register, UnitSpec, Usage, Watcher

MIB = 2**20
#: the thresholds of a unit's ``limits`` (the rest are settings)
THRESHOLDS = ("rss_mb", "cpu_percent", "open_files", "threads", "children")


def breaches(limits: Any, usage: Usage) -> list[str]:
    """One line per threshold of ``limits`` (a unit's ``limits``) that
    ``usage`` exceeds."""
    out: list[str] = []
    rss_mb = usage.rss / MIB
    if limits.rss_mb is not None and rss_mb > limits.rss_mb:
        out.append(f"rss {rss_mb:.1f} MiB > limit {limits.rss_mb:g} MiB")
    if limits.cpu_percent is not None and usage.cpu_percent > limits.cpu_percent:
        out.append(f"cpu {usage.cpu_percent:.1f}% > limit {limits.cpu_percent:g}%")
    counts = (
        ("open files", usage.open_files, limits.open_files),
        ("threads", usage.threads, limits.threads),
        ("children", usage.children, limits.children),
    )
    for label, value, limit in counts:
        if limit is not None and value > limit:
            out.append(f"{label} {value} > limit {limit}")
    return out


class Limits:
    settings: tuple[str, ...] = ("limits",)

    def wants(self, unit: str, spec: UnitSpec) -> bool:
        return any(getattr(spec.limits, t) is not None for t in THRESHOLDS)

    async def watch(self, kernel: KernelAPI, unit: str) -> None:
        log = logger.bind(unit=unit)
        while True:
            spec = kernel.deployment.units.get(unit)
            if spec is None or not self.wants(unit, spec):
                return
            limits = spec.limits
            await asyncio.sleep(limits.interval)
            for inst in list(kernel.instances.values()):
                if inst.unit != unit or not inst.managed or inst.state != "ready":
                    continue
                usage = kernel.usage(inst.instance_id)
                if usage is None:
                    continue
                found = breaches(limits, usage)
                if not found:
                    continue
                what = "; ".join(found)
                action = limits.action.value
                log.bind(instance=inst.instance_id).warning(
                    "resource limits exceeded: {} (action: {})", what, action
                )
                kernel.publish("limits", reason=what, unit=unit, instance_id=inst.instance_id)
                try:
                    if action == "restart":
                        # not awaited: the next instance's sample does not
                        # wait for this one's replacement to be ready
                        restart = kernel.restart_instance(
                            inst.instance_id, f"resource limits: {what}"
                        )
                        task = asyncio.ensure_future(restart)
                        task.add_done_callback(_log_failure)
                    elif action == "stop":
                        await kernel.stop_instance(inst.instance_id, f"resource limits: {what}")
                except hsu.HsuError as exc:
                    log.warning("could not {} {}: {}", action, inst.instance_id, exc)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("limits: a restart failed: {}", task.exception())


@hsu.hookimpl
def hsu_register_watchers(register: Register[Watcher]) -> None:
    register("limits", Limits())
