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
import math
import time
from typing import TYPE_CHECKING

from loguru import logger

from hsu._kernel.config.model import Placement, Routing
from hsu._kernel.pool import Grant, Pool
from hsu._kernel.supervision.instances import Instance, InstanceState
from hsu.client.route import Policy, Route
from hsu.errors import HsuError, NoSuchUnit
from hsu.ports import (
    DRAINING,
    LEASED,
    SERVING,
    UNHEALTHY,
    Cluster,
    Endpoint,
    Registry,
    RegistryCompacted,
    RegistryEvent,
)
from hsu.ports import Placement as PlacementPort

if TYPE_CHECKING:
    from hsu._kernel.kernel import Kernel

#: how long a stopping instance stays listed as draining after its calls
#: ended, so callers that watch the registry see it before it goes
DRAIN_SETTLE = 0.05
#: a unit's queue depth is published as an event at most this often (s)
QUEUE_EVENTS_EVERY = 0.25


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
        max_inflight=r.max_inflight or 0,
        cache_methods=r.cache.methods if r.cache is not None else (),
        cache_ttl=r.cache.ttl if r.cache is not None else 0.0,
        cache_key_metadata=r.cache.key_metadata if r.cache is not None else (),
    )


# -- the kernel's side --------------------------------------------------------------


def endpoint_of(inst: Instance, leased: bool = False) -> Endpoint | None:
    """The registry entry for a kernel's instance, or None when it is not listed."""
    if not inst.address or not inst.interfaces:
        return None
    if inst.state is InstanceState.READY:
        state = {"draining": DRAINING, "unhealthy": UNHEALTHY}.get(inst.health, SERVING)
        if leased and state == SERVING:
            state = LEASED
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
        #: picks the kernel an on-demand start goes to (``kernel.placement``)
        self.placement: PlacementPort | None = None
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
        #: instances held by a lease, listed as LEASED (no caller picks them)
        self.leased: set[str] = set()
        self.pool = Pool(self)
        self._background: set[asyncio.Task[None]] = set()
        self._scale_wake: dict[str, asyncio.Event] = {}
        self._queue_depth: dict[str, int] = {}
        self._queue_published: dict[str, int] = {}
        self._queue_timer: dict[str, asyncio.TimerHandle] = {}
        self.pool.depth_changed.append(self.queue_changed)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        name = self.kernel.kernel_settings.registry or self.kernel.plugins.default("registry")
        if name is None:
            # no registry plugin, and (the config check made sure) no unit
            # serves an interface: there is nothing to route
            logger.info("no registry: routing is off (no unit serves an interface)")
            return
        self.registry = self.kernel.plugins.registry(name)(self.kernel)
        placement = self.kernel.kernel_settings.placement
        if placement is not None or self.kernel.plugins.default("placement") is not None:
            self.placement = self.kernel.plugins.placement(placement)
        self._writes = asyncio.Queue()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._tasks.append(asyncio.ensure_future(self._writer()))
        self._tasks.append(asyncio.ensure_future(self._follow()))
        self.start_autoscale()

    async def close(self) -> None:
        for timer in self._queue_timer.values():
            timer.cancel()
        self._queue_timer.clear()
        self.pool.close()
        for t in self._background:
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
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
        ep = endpoint_of(inst, inst.instance_id in self.leased)
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
            route.listeners.append(lambda: self.pool.poke(route.policy.unit))
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
        sup = self.kernel.units.get(route.policy.unit)
        if sup is not None and not sup.wanted and sup.spec.placement is not Placement.SINGLETON:
            self.kernel.events.publish(
                "scale",
                unit=route.policy.unit,
                reason=f"up: from zero: a call for {interface} and no instance is up",
            )
        began = time.monotonic()
        try:
            return await self._ensure(route, interface, timeout)
        finally:
            self.kernel.metrics_hub.cold_start(route.policy.unit, began)

    async def _ensure(self, route: Route, interface: str, timeout: float | None) -> Route:
        spec = self.kernel.deployment.units[route.policy.unit]
        if spec.placement is not Placement.SINGLETON:
            node = await self._place(route.policy.unit)
            if node is None:
                inst = await self.kernel.instance_for(interface)
                self.update(inst)
                await self.flush()
            else:
                assert isinstance(self.registry, Cluster)
                logger.bind(unit=route.policy.unit).info(
                    "on demand: {} starts an instance (placement)", node
                )
                await self.registry.request_start(node, route.policy.unit, interface)
        # a singleton is never started here: wait for its leader's instance

        async def listed() -> None:
            while not route.routable:
                await route.changed()

        if timeout is None:
            timeout = self.kernel.deployment.units[route.policy.unit].startup_timeout
        await asyncio.wait_for(listed(), timeout)
        return route

    async def _place(self, unit: str) -> str | None:
        """The other kernel that starts ``unit`` on demand, as the placement
        picks it among the kernels that can (None: this one)."""
        registry = self.registry
        if self.placement is None or not isinstance(registry, Cluster):
            return None
        try:
            nodes = sorted(
                (n for n in await registry.nodes() if unit in n.units or n.local),
                key=lambda n: n.name,
            )
        except Exception as exc:
            logger.bind(unit=unit).warning("placement: the kernels unknown ({!r}); here", exc)
            return None
        if len(nodes) < 2:
            return None
        name = self.placement.pick(unit, nodes)
        chosen = next((n for n in nodes if n.name == name), None)
        if chosen is None:
            raise HsuError(
                f"placement {self.kernel.kernel_settings.placement or 'default'!r} picked"
                f" {name!r} for unit {unit!r}, not one of {', '.join(n.name for n in nodes)}"
            )
        return None if chosen.local else chosen.name

    async def lookup(self, interface: str, ensure: bool) -> tuple[Policy, list[Endpoint]]:
        policy = self.policy(interface)
        if ensure:
            await self.ensure(interface)
        await self.flush()
        assert self.registry is not None
        return policy, await self.registry.lookup(interface)

    def endpoint_count(self) -> int:
        """Endpoints the registry lists (this kernel's and others')."""
        return len(self._all)

    # -- slots and leases (hsu._kernel.pool) ----------------------------------------

    async def acquire(
        self,
        interface: str,
        key: str | None = None,
        exclude: str = "",
        priority: int = 0,
        timeout: float | None = None,
    ) -> Grant:
        return await self.pool.acquire(interface, key, exclude, priority, timeout)

    def release(self, grant: Grant) -> None:
        self.pool.release(grant)

    def set_leased(self, instance_id: str, leased: bool) -> None:
        """List a kernel's instance as LEASED (or SERVING again)."""
        if leased:
            self.leased.add(instance_id)
        else:
            self.leased.discard(instance_id)
        inst = self.kernel.instances.get(instance_id)
        if inst is not None:
            inst.leased = leased
            if leased:
                inst.last_used = time.monotonic()
            self.update(inst)

    def gone(self, ep: Endpoint) -> str:
        """Why the leased instance at ``ep`` can serve its lease no more ("":
        it still can)."""
        now = self._all.get(ep.instance_id)
        inst = self.kernel.instances.get(ep.instance_id)
        if now is None or now.address != ep.address:
            last = f" ({inst.last_exit})" if inst is not None and inst.last_exit else ""
            return f"its instance {ep.instance_id} at {ep.address} died or stopped{last}"
        if now.state not in (SERVING, LEASED):
            return f"its instance {ep.instance_id} is {now.state}"
        return ""

    def touch(self, instance_id: str) -> None:
        """A slot on the instance was taken: it is not idle."""
        inst = self.kernel.instances.get(instance_id)
        if inst is not None:
            inst.last_used = time.monotonic()

    def background(self, task: asyncio.Task[None]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
        else:
            self.pool.poke(inst.unit)
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
        self.pool.poke(ep.unit)  # a lease may wait for the instance to be idle

    async def drain(self, inst: Instance, timeout: float) -> int:
        """Wait until the (draining) instance has no call in flight, up to
        ``timeout`` seconds; return how many were still in flight."""
        if self._writes is None or inst.instance_id not in self._published:
            return 0
        deadline = time.monotonic() + timeout
        self.update(inst)
        # the draining state published, within the drain's time: a registry
        # that cannot be reached (etcd cut off) must not hold the stop past
        # drain_timeout, least of all a singleton's leader that has to stop
        # before its lease expires (the write goes on in the background)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)
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

    def autoscaled(self, unit: str) -> bool:
        """Whether ``unit`` is autoscaled: ``routing.autoscale.above`` is set, or
        it has ``max_inflight`` and room to grow (``max_instances`` above its
        floor), when it scales on its queue."""
        spec = self.kernel.deployment.units.get(unit)
        if spec is None:
            return False
        r = spec.routing
        floor = max(spec.min_instances, 1)
        return r.autoscale.above is not None or (
            r.max_inflight is not None and spec.max_instances > floor
        )

    def start_autoscale(self) -> None:
        """(Re)start one autoscaler per autoscaled unit."""
        for t in self._tasks[2:]:
            t.cancel()
        del self._tasks[2:]
        for name in self.kernel.deployment.units:
            if self.autoscaled(name):
                self._tasks.append(asyncio.ensure_future(self._autoscale(name)))

    async def _autoscale(self, unit: str) -> None:
        wake = self._scale_wake.setdefault(unit, asyncio.Event())
        try:
            while True:
                spec = self.kernel.deployment.units.get(unit)
                if spec is None or not self.autoscaled(unit):
                    return
                # every interval, and at once when calls start to queue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), spec.routing.autoscale.interval)
                wake.clear()
                try:
                    await self.autoscale_once(unit)
                except HsuError as exc:
                    logger.bind(unit=unit).warning("autoscale: {}", exc)
        finally:
            self._scale_wake.pop(unit, None)

    def queue_changed(self, unit: str, depth: int) -> None:
        """The pool's queue of ``unit`` changed: wake its autoscaler when calls
        wait, and publish the depth as an event (at most every
        :data:`QUEUE_EVENTS_EVERY` seconds, the last one always)."""
        if depth:
            wake = self._scale_wake.get(unit)
            if wake is not None:
                wake.set()
        self._queue_depth[unit] = depth
        if unit in self._queue_timer:
            return
        last = self._queue_published.get(unit)
        if last == depth:
            return
        loop = asyncio.get_running_loop()
        self._queue_timer[unit] = loop.call_later(
            QUEUE_EVENTS_EVERY if last is not None else 0, self._publish_queue, unit
        )

    def _publish_queue(self, unit: str) -> None:
        self._queue_timer.pop(unit, None)
        depth = self._queue_depth.get(unit, 0)
        if self._queue_published.get(unit) == depth:
            return
        self._queue_published[unit] = depth
        pool = self.pool
        self.kernel.events.publish(
            "queue",
            unit=unit,
            reason=f"depth {depth}; {pool.held(unit)} slots held, {pool.leased(unit)} leased",
        )
        # a later change within the period is published at its end
        self._queue_timer[unit] = asyncio.get_running_loop().call_later(
            QUEUE_EVENTS_EVERY, self._publish_queue, unit
        )

    def demand(self, unit: str, ready: list[Instance]) -> tuple[float, str]:
        """Calls per ready instance: in flight, queued and leased (a leased
        instance counts as one full instance); and how it was counted."""
        spec = self.kernel.deployment.units[unit]
        full = spec.routing.max_inflight or 1
        leased = sum(1 for i in ready if i.instance_id in self.leased)
        inflight = sum(self.load(i.instance_id) for i in ready if i.instance_id not in self.leased)
        queued = self.pool.depth(unit)
        total = inflight + queued + leased * full
        how = f"{inflight} in flight, {queued} queued, {leased} leased"
        return total / max(1, len(ready)), how

    async def autoscale_once(self, unit: str, now: float | None = None) -> int:
        """Look at the unit's load once and scale if it calls for it.

        Returns the change in instances (0: none).
        """
        spec = self.kernel.deployment.units[unit]
        a = spec.routing.autoscale
        sup = self.kernel.units.get(unit)
        if sup is None:
            return 0
        now = time.monotonic() if now is None else now
        wanted = sup.wanted
        ready = [i for i in wanted if i.state is InstanceState.READY]
        if not ready or len(ready) < len(wanted):
            return 0  # starting or stopping: look again once settled
        # the load per instance it aims at: `above`, else (a queue) full slots
        target = a.above if a.above is not None else float(spec.routing.max_inflight or 1)
        avg, how = self.demand(unit, ready)
        queued = self.pool.depth(unit)
        cooling = now - self._last_scaled.get(unit, -1e9) < a.cooldown
        log = logger.bind(unit=unit)
        if avg >= target and len(wanted) < spec.max_instances and (queued or not cooling):
            # calls waiting do not wait for the cooldown; the unit grows to
            # what the demand asks for at once (Ray Serve's way), else by one
            want = math.ceil(avg * len(ready) / target) if queued else len(wanted) + 1
            count = max(len(wanted) + 1, min(want, spec.max_instances))
            self._last_scaled[unit] = now
            self._quiet_since.pop(unit, None)
            why = f"{avg:.1f} calls per instance ({how}); {len(wanted)} -> {count}"
            log.info("autoscale: {}", why)
            self.kernel.events.publish("scale", unit=unit, reason=f"up: {why}")
            await sup.scale(count, reason="autoscaled up")
            return count - len(wanted)
        floor = max(spec.min_instances, 1)
        if avg <= a.below and len(wanted) > floor and not queued and not cooling:
            since = self._quiet_since.setdefault(unit, now)
            if now - since >= a.cooldown:
                idle = [i for i in ready if i.instance_id not in self.leased]
                if not idle:
                    return 0
                victim = min(idle, key=lambda i: (self.load(i.instance_id), -i.started_at))
                self._last_scaled[unit] = now
                self._quiet_since.pop(unit, None)
                why = f"{avg:.1f} calls per instance ({how}); {len(wanted)} -> {len(wanted) - 1}"
                log.info("autoscale: {}", why)
                self.kernel.events.publish(
                    "scale", unit=unit, instance_id=victim.instance_id, reason=f"down: {why}"
                )
                await sup.remove(victim, reason="autoscaled down")
                return -1
        elif avg > a.below:
            self._quiet_since.pop(unit, None)
        return 0
