"""The kernel's routing: it writes the kernel's instances into the registry
(a plugin) as they become ready, drain, turn unhealthy or go; keeps the
kernel's own routes (the gateway's, ``Kernel.connect``'s) up to date from the
registry's watch; collects the load HSUs report; waits for an instance's
calls to finish before it stops (drain); and scales units on load.

What every caller keeps per interface (:class:`~hsu.client.route.Route`) and
the call loop are the caller's side, in the public :mod:`hsu.client.route`.
See ``docs/routing.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from loguru import logger

from hsu._kernel.config.model import Placement, Routing
from hsu._kernel.supervision.instances import Instance, InstanceState
from hsu.client.route import Policy, Route
from hsu.errors import HsuError, NoSuchUnit
from hsu.ports import (
    DRAINING,
    SERVING,
    UNHEALTHY,
    Endpoint,
    Registry,
    RegistryCompacted,
    RegistryEvent,
)

if TYPE_CHECKING:
    from hsu._kernel.kernel import Kernel

#: how long a stopping instance stays listed as draining after its calls
#: ended, so callers that watch the registry see it before it goes
DRAIN_SETTLE = 0.05


def policy_of(unit: str, r: Routing) -> Policy:
    """How callers route to ``unit``: its ``routing:``, as the kernel hands it
    out (a name left unset, for a unit with no interfaces: "")."""
    return Policy(
        unit=unit,
        balancer=r.balancer or "",
        balancer_options=dict(r.balancer_options),
        breaker=r.breaker or "",
        breaker_options=dict(r.breaker_options),
        hash_key=r.hash_key,
        idempotent=tuple(r.idempotent),
        max_attempts=r.max_attempts,
        retry_budget=r.retry_budget,
        retry_min_per_second=r.retry_min_per_second,
    )


# -- the kernel's side --------------------------------------------------------------


def endpoint_of(inst: Instance) -> Endpoint | None:
    """The registry entry for a kernel's instance, or None when it is not listed."""
    if not inst.address or not inst.interfaces:
        return None
    if inst.state is InstanceState.READY:
        state = {"draining": DRAINING, "unhealthy": UNHEALTHY}.get(inst.health, SERVING)
    elif inst.state is InstanceState.STOPPING:
        state = DRAINING
    else:
        return None
    try:
        weight = max(1, int(inst.metadata.get("weight", "1")))
    except ValueError:
        weight = 1
    return Endpoint(
        instance_id=inst.instance_id,
        unit=inst.unit,
        address=inst.address,
        interfaces=tuple(inst.interfaces),
        state=state,
        weight=weight,
        metadata=dict(inst.metadata),
    )


class KernelRouting:
    """The kernel's routing: registry writer, its own routes, load, drain, autoscale."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.registry: Registry | None = None
        #: the kernel's own routes (the gateway, in-process callers)
        self.routes: dict[str, Route] = {}
        #: calls in flight each HSU reported (ReportLoad), by instance_id
        self.reported: dict[str, int] = {}
        #: calls in flight through this kernel (the gateway), by instance_id
        self.through: dict[str, int] = {}
        self._published: dict[str, Endpoint] = {}
        #: every endpoint in the registry (the kernel's and others'), by instance_id
        self._all: dict[str, Endpoint] = {}
        self._writes: asyncio.Queue[tuple[str, Endpoint | str]] | None = None
        self._written = 0
        self._queued = 0
        self._flushed: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._load_changed: dict[str, asyncio.Event] = {}
        self._last_scaled: dict[str, float] = {}
        self._quiet_since: dict[str, float] = {}

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        name = self.kernel.kernel_settings.registry or self.kernel.plugins.default("registry")
        if name is None:
            # no registry plugin, and (the config check made sure) no unit
            # serves an interface: there is nothing to route
            logger.info("no registry: routing is off (no unit serves an interface)")
            return
        self.registry = self.kernel.plugins.registry(name)(self.kernel)
        self._writes = asyncio.Queue()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._tasks.append(asyncio.ensure_future(self._writer()))
        self._tasks.append(asyncio.ensure_future(self._follow()))
        self.start_autoscale()

    def start_autoscale(self) -> None:
        """(Re)start one autoscaler per unit that has ``routing.autoscale.above``."""
        for t in self._tasks[2:]:
            t.cancel()
        del self._tasks[2:]
        for name, spec in self.kernel.deployment.units.items():
            if spec.routing.autoscale.above is not None:
                self._tasks.append(asyncio.ensure_future(self._autoscale(name)))

    async def close(self) -> None:
        # the last deletes reach the registry first (one shared by other kernels
        # must not keep listing instances that are gone)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), 2.0)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.registry is not None:
            await self.registry.close()

    # -- writing the kernel's instances ---------------------------------------------

    def update(self, inst: Instance) -> None:
        """The instance changed (state, health, address): update its entry."""
        if self._writes is None:
            return
        ep = endpoint_of(inst)
        old = self._published.get(inst.instance_id)
        if ep == old:
            return
        if ep is None:
            del self._published[inst.instance_id]
            self._enqueue(("delete", inst.instance_id))
            self.reported.pop(inst.instance_id, None)
        else:
            self._published[inst.instance_id] = ep
            self._enqueue(("put", ep))

    def _enqueue(self, item: tuple[str, Endpoint | str]) -> None:
        assert self._writes is not None and self._flushed is not None
        self._queued += 1
        self._flushed.clear()
        self._writes.put_nowait(item)

    async def flush(self) -> None:
        """Wait until every change so far is in the registry."""
        if self._flushed is not None:
            await self._flushed.wait()

    async def _writer(self) -> None:
        assert self._writes is not None and self._flushed is not None
        while True:
            op, what = await self._writes.get()
            try:
                assert self.registry is not None
                if op == "put":
                    assert isinstance(what, Endpoint)
                    await self.registry.put(what)
                else:
                    assert isinstance(what, str)
                    await self.registry.delete(what)
            except Exception as exc:
                logger.error("registry {}: {} failed: {!r}", op, what, exc)
            self._written += 1
            if self._written == self._queued:
                self._flushed.set()

    async def _follow(self) -> None:
        """Keep the kernel's routes in step with the registry (list, then watch)."""
        assert self.registry is not None
        while True:
            endpoints, revision = await self.registry.snapshot()
            for route in self.routes.values():
                route.replace(e for e in endpoints if route.interface in e.interfaces)
            self._all = {e.instance_id: e for e in endpoints}
            try:
                async for event in self.registry.watch(revision):
                    self._apply(event)
            except RegistryCompacted:
                logger.warning("registry compacted under the kernel's watch; listing again")
                continue
            return

    def _apply(self, event: RegistryEvent) -> None:
        ep = event.endpoint
        if event.kind == "delete":
            self._all.pop(ep.instance_id, None)
            for route in self.routes.values():
                route.delete(ep.instance_id)
            if not any(e.address == ep.address for e in self._all.values()):
                self.kernel.plugins.endpoint_removed(self.kernel, ep)
            return
        self._all[ep.instance_id] = ep
        for route in self.routes.values():
            if route.interface in ep.interfaces:
                route.put(ep)
            else:
                route.delete(ep.instance_id)

    # -- routes ---------------------------------------------------------------------

    def policy(self, interface: str) -> Policy:
        units = self.kernel.units_serving(interface)
        if not units:
            known = {i for s in self.kernel.deployment.units.values() for i in s.interfaces}
            hint = f" (served: {', '.join(sorted(known))})" if known else ""
            raise NoSuchUnit(f"no unit serves interface {interface!r}{hint}")
        return policy_of(units[0], self.kernel.deployment.units[units[0]].routing)

    def route(self, interface: str) -> Route:
        """The kernel's own route for ``interface`` (made on first use)."""
        route = self.routes.get(interface)
        if route is None:
            route = self.routes[interface] = Route(
                interface, self.policy(interface), self.kernel.plugins
            )
            route.replace(e for e in self._all.values() if interface in e.interfaces)
        return route

    def reconfigure(self) -> None:
        """After a reload: routes take their unit's new policy (or go)."""
        for interface, route in list(self.routes.items()):
            try:
                route.set_policy(self.policy(interface))
            except NoSuchUnit:
                del self.routes[interface]
        self.start_autoscale()

    async def ensure(self, interface: str, timeout: float | None = None) -> Route:
        """The route, with at least one routable endpoint: an instance is
        started on demand when there is none, and this waits until it is ready
        and listed (or raises)."""
        route = self.route(interface)
        if route.routable:
            return route
        spec = self.kernel.deployment.units[route.policy.unit]
        if spec.placement is not Placement.SINGLETON:
            inst = await self.kernel.instance_for(interface)
            self.update(inst)
            await self.flush()
        # a singleton is never started here: wait for its leader's instance

        async def listed() -> None:
            while not route.routable:
                await route.changed()

        if timeout is None:
            timeout = self.kernel.deployment.units[route.policy.unit].startup_timeout
        await asyncio.wait_for(listed(), timeout)
        return route

    async def lookup(self, interface: str, ensure: bool) -> tuple[Policy, list[Endpoint]]:
        policy = self.policy(interface)
        if ensure:
            await self.ensure(interface)
        await self.flush()
        assert self.registry is not None
        return policy, await self.registry.lookup(interface)

    # -- load -------------------------------------------------------------------

    def load(self, instance_id: str) -> int:
        """Calls in flight on an instance: what it reported, else what went
        through this kernel."""
        reported = self.reported.get(instance_id)
        return reported if reported is not None else self.through.get(instance_id, 0)

    def report(self, instance_id: str, inflight: int) -> None:
        inst = self.kernel.instances.get(instance_id)
        if inst is None:
            return
        self.reported[instance_id] = inflight
        if inflight:
            inst.last_used = time.monotonic()
        ev = self._load_changed.get(instance_id)
        if ev is not None:
            ev.set()

    def call_began(self, ep: Endpoint) -> None:
        self.through[ep.instance_id] = self.through.get(ep.instance_id, 0) + 1
        inst = self.kernel.instances.get(ep.instance_id)
        if inst is not None:
            inst.last_used = time.monotonic()

    def call_ended(self, ep: Endpoint) -> None:
        n = self.through.get(ep.instance_id, 1) - 1
        if n > 0:
            self.through[ep.instance_id] = n
        else:
            self.through.pop(ep.instance_id, None)
        inst = self.kernel.instances.get(ep.instance_id)
        if inst is not None:
            inst.last_used = time.monotonic()
        ev = self._load_changed.get(ep.instance_id)
        if ev is not None:
            ev.set()

    async def drain(self, inst: Instance, timeout: float) -> int:
        """Wait until the (draining) instance has no call in flight, up to
        ``timeout`` seconds; return how many were still in flight."""
        if self._writes is None or inst.instance_id not in self._published:
            return 0
        self.update(inst)
        await self.flush()
        deadline = time.monotonic() + timeout
        # a data plane outside the kernel (hsu_plugins.gateway.nginx) returns
        # once it sends the instance no new call; a plugin that fails or runs
        # out of the drain's time is logged, and the stop goes on
        with logger.contextualize(instance=inst.instance_id):
            await self.kernel.plugins.call_each(
                "hsu_instance_draining",
                stop_on_error=False,
                timeout=max(0.0, deadline - time.monotonic()),
                kernel=self.kernel,
                instance=inst,
            )
        ev = self._load_changed.setdefault(inst.instance_id, asyncio.Event())
        try:
            while self.load(inst.instance_id) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ev.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), left)
            left = self.load(inst.instance_id)
            if not left:
                await asyncio.sleep(min(DRAIN_SETTLE, timeout))
            return left
        finally:
            self._load_changed.pop(inst.instance_id, None)

    # -- autoscaling ----------------------------------------------------------------

    async def _autoscale(self, unit: str) -> None:
        while True:
            spec = self.kernel.deployment.units.get(unit)
            if spec is None or spec.routing.autoscale.above is None:
                return
            a = spec.routing.autoscale
            await asyncio.sleep(a.interval)
            try:
                await self.autoscale_once(unit)
            except HsuError as exc:
                logger.bind(unit=unit).warning("autoscale: {}", exc)

    async def autoscale_once(self, unit: str, now: float | None = None) -> int:
        """Look at the unit's load once; scale by one if it calls for it.

        Returns +1, -1 or 0.
        """
        spec = self.kernel.deployment.units[unit]
        a = spec.routing.autoscale
        assert a.above is not None
        sup = self.kernel.units.get(unit)
        if sup is None:
            return 0
        now = time.monotonic() if now is None else now
        wanted = sup.wanted
        ready = [i for i in wanted if i.state is InstanceState.READY]
        if not ready or len(ready) < len(wanted):
            return 0  # starting or stopping: look again once settled
        avg = sum(self.load(i.instance_id) for i in ready) / len(ready)
        if now - self._last_scaled.get(unit, -1e9) < a.cooldown:
            return 0
        log = logger.bind(unit=unit)
        if avg >= a.above and len(wanted) < spec.max_instances:
            self._last_scaled[unit] = now
            self._quiet_since.pop(unit, None)
            log.info("autoscale: {:.1f} calls in flight per instance; adding one", avg)
            await sup.scale(len(wanted) + 1, reason="autoscaled up")
            return 1
        floor = max(spec.min_instances, 1)
        if avg <= a.below and len(wanted) > floor:
            since = self._quiet_since.setdefault(unit, now)
            if now - since >= a.cooldown:
                self._last_scaled[unit] = now
                self._quiet_since.pop(unit, None)
                log.info("autoscale: {:.1f} calls in flight per instance; removing one", avg)
                await sup.scale(len(wanted) - 1, reason="autoscaled down")
                return -1
        else:
            self._quiet_since.pop(unit, None)
        return 0
