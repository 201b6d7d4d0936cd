"""Routing: from an interface name to one instance, per call.

Two halves share this module:

- :class:`Route` is what any caller keeps per interface: the routable
  endpoints, a balancer (a plugin), one circuit breaker (a plugin) per
  instance, the calls in flight per instance and a retry budget. The kernel's
  gateway and ``hsu.connect`` both use it.
- :class:`KernelRouting` is the kernel's side: it writes the kernel's
  instances into the registry (a plugin) as they become ready, drain, turn
  unhealthy or go; keeps the kernel's own routes up to date from the
  registry's watch; collects the load HSUs report; waits for an instance's
  calls to finish before it stops (drain); and scales units on load.

See ``docs/routing.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import grpc
from loguru import logger

from hsu._kernel.config.model import Routing
from hsu._kernel.supervision.instances import Instance, InstanceState
from hsu.errors import HsuError, NoSuchUnit
from hsu.ports import (
    DRAINING,
    SERVING,
    UNHEALTHY,
    Balancer,
    CircuitBreaker,
    Endpoint,
    Registry,
    RegistryCompacted,
    RegistryEvent,
)

if TYPE_CHECKING:
    from hsu._kernel.kernel import Kernel
    from hsu._kernel.plugins import PluginManager

#: codes that mean the instance could not take the call: a circuit breaker's
#: failure, and what an idempotent call is retried on
INSTANCE_FAILED = frozenset({grpc.StatusCode.UNAVAILABLE})
#: channels to local HSUs: no proxy, and a short reconnect backoff so a server
#: that comes back is seen at once
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
#: how long a stopping instance stays listed as draining after its calls
#: ended, so callers that watch the registry see it before it goes
DRAIN_SETTLE = 0.05


# -- the caller's side ----------------------------------------------------------


@attrs.frozen
class Policy:
    """How callers route to one unit: its ``routing:`` as the kernel hands it out."""

    unit: str
    balancer: str = "round_robin"
    balancer_options: Mapping[str, Any] = attrs.field(factory=dict)
    breaker: str = "consecutive"
    breaker_options: Mapping[str, Any] = attrs.field(factory=dict)
    hash_key: str = "hsu-key"
    idempotent: tuple[str, ...] = ()
    max_attempts: int = 3
    retry_budget: float = 0.2
    retry_min_per_second: float = 10.0

    @classmethod
    def of(cls, unit: str, r: Routing) -> Policy:
        return cls(
            unit=unit,
            balancer=r.balancer,
            balancer_options=dict(r.balancer_options),
            breaker=r.breaker,
            breaker_options=dict(r.breaker_options),
            hash_key=r.hash_key,
            idempotent=tuple(r.idempotent),
            max_attempts=r.max_attempts,
            retry_budget=r.retry_budget,
            retry_min_per_second=r.retry_min_per_second,
        )

    def to_pb(self, pb: Any) -> Any:
        return pb(
            unit=self.unit,
            balancer=self.balancer,
            balancer_options_json=json.dumps(dict(self.balancer_options)),
            breaker=self.breaker,
            breaker_options_json=json.dumps(dict(self.breaker_options)),
            hash_key=self.hash_key,
            idempotent=list(self.idempotent),
            max_attempts=self.max_attempts,
            retry_budget=self.retry_budget,
            retry_min_per_second=self.retry_min_per_second,
        )

    @classmethod
    def from_pb(cls, msg: Any) -> Policy:
        return cls(
            unit=msg.unit,
            balancer=msg.balancer or "round_robin",
            balancer_options=json.loads(msg.balancer_options_json or "{}"),
            breaker=msg.breaker or "consecutive",
            breaker_options=json.loads(msg.breaker_options_json or "{}"),
            hash_key=msg.hash_key,
            idempotent=tuple(msg.idempotent),
            max_attempts=max(1, msg.max_attempts),
            retry_budget=msg.retry_budget,
            retry_min_per_second=msg.retry_min_per_second,
        )

    def is_idempotent(self, method: str) -> bool:
        """``method`` is the full path, ``/pkg.Service/Method``."""
        service_method = method.lstrip("/")
        short = service_method.rpartition("/")[2]
        return any(
            pat == "*" or pat in (short, service_method) or fnmatch.fnmatchcase(service_method, pat)
            for pat in self.idempotent
        )


def endpoint_pb(ep: Endpoint, pb: Any) -> Any:
    return pb(
        instance_id=ep.instance_id,
        unit=ep.unit,
        address=ep.address,
        interfaces=list(ep.interfaces),
        state=ep.state,
        weight=ep.weight,
        metadata=dict(ep.metadata),
    )


def endpoint_from_pb(msg: Any) -> Endpoint:
    return Endpoint(
        instance_id=msg.instance_id,
        unit=msg.unit,
        address=msg.address,
        interfaces=tuple(msg.interfaces),
        state=msg.state or SERVING,
        weight=max(1, msg.weight),
        metadata=dict(msg.metadata),
    )


class RetryBudget:
    """Retries allowed as a share of calls, like Envoy's retry budget and
    gRPC's retry throttling: a retry storm cannot multiply the load.

    Every call deposits ``ratio`` tokens (up to a cap); a retry takes one.
    ``min_per_second`` tokens also trickle in, so a caller with little
    traffic may still retry.
    """

    def __init__(
        self, ratio: float, min_per_second: float, clock: Callable[[], float] = time.monotonic
    ):
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.cap = max(10.0, min_per_second)
        self.tokens = self.cap
        self._clock = clock
        self._last = clock()

    def deposit(self) -> None:
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def withdraw(self) -> bool:
        now = self._clock()
        self.tokens = min(self.cap, self.tokens + (now - self._last) * self.min_per_second)
        self._last = now
        if self.tokens >= 1.0 - 1e-9:  # 10 deposits of 0.1 make one retry
            self.tokens -= 1.0
            return True
        return False


class Route:
    """One caller's view of one interface: pick, count, break, budget.

    Single-threaded: use it from one event loop (or under one lock).
    """

    def __init__(self, interface: str, policy: Policy, plugins: PluginManager):
        self.interface = interface
        self.policy = policy
        self._plugins = plugins
        self.balancer: Balancer = _make(
            plugins, "balancer", policy.balancer, policy.balancer_options
        )
        self.breakers: dict[str, CircuitBreaker] = {}
        #: every endpoint the registry lists, routable or not, by instance_id
        self.endpoints: dict[str, Endpoint] = {}
        #: the ones handed to the balancer
        self.available: tuple[Endpoint, ...] = ()
        #: calls in flight, by instance_id
        self.inflight: dict[str, int] = {}
        self.budget = RetryBudget(policy.retry_budget, policy.retry_min_per_second)
        self._open: set[str] = set()
        self._changed = asyncio.Event() if _has_loop() else None
        self.version = 0

    # -- endpoints ----------------------------------------------------------

    def set_policy(self, policy: Policy) -> None:
        if policy == self.policy:
            return
        old = self.policy
        self.policy = policy
        if (policy.balancer, policy.balancer_options) != (old.balancer, old.balancer_options):
            self.balancer = _make(
                self._plugins, "balancer", policy.balancer, policy.balancer_options
            )
        if (policy.breaker, policy.breaker_options) != (old.breaker, old.breaker_options):
            self.breakers.clear()
        self.budget = RetryBudget(policy.retry_budget, policy.retry_min_per_second)
        self._refresh()

    def replace(self, endpoints: Iterable[Endpoint]) -> None:
        self.endpoints = {e.instance_id: e for e in endpoints}
        self._refresh()

    def put(self, ep: Endpoint) -> None:
        self.endpoints[ep.instance_id] = ep
        self._refresh()

    def delete(self, instance_id: str) -> None:
        if self.endpoints.pop(instance_id, None) is not None:
            self.breakers.pop(instance_id, None)
            self._refresh()

    def breaker(self, instance_id: str) -> CircuitBreaker:
        b = self.breakers.get(instance_id)
        if b is None:
            p = self.policy
            b = self.breakers[instance_id] = _make(
                self._plugins, "breaker", p.breaker, p.breaker_options
            )
        return b

    def _refresh(self) -> None:
        """Hand the balancer the routable endpoints whose breaker is not open."""
        self._open = {i for i, b in self.breakers.items() if b.state == "open"}
        self.available = tuple(
            e for i, e in sorted(self.endpoints.items()) if e.routable and i not in self._open
        )
        self.balancer.update(self.available)
        self.version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    @property
    def routable(self) -> bool:
        return any(e.routable for e in self.endpoints.values())

    async def changed(self) -> None:
        """Wait for the next change of the endpoints."""
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    # -- calls --------------------------------------------------------------

    def pick(self, key: str | None = None, exclude: str = "") -> Endpoint | None:
        """The endpoint for a call, or ``None`` when none is routable now.

        ``exclude``: an instance the call just failed on (a retry goes
        elsewhere when there is elsewhere).
        """
        if self._open and any(self.breakers[i].state != "open" for i in self._open):
            self._refresh()  # a cooldown passed: half-open instances take trials
        for _ in range(3):
            ep = self.balancer.pick(self.inflight, key)
            if ep is None:
                return None
            if ep.instance_id == exclude and len(self.available) > 1:
                continue
            if self.breaker(ep.instance_id).allow():
                return ep
            self._refresh()  # it opened (or is half-open with its trials taken)
        # every try was refused: any endpoint whose breaker lets a call through
        for ep in self.available:
            if ep.instance_id != exclude and self.breaker(ep.instance_id).allow():
                return ep
        return None

    def may_retry(self, method: str, attempts: int) -> bool:
        """After ``attempts`` tries of ``method`` (a full path) that instances
        could not take: may the call try another one? Idempotent methods may,
        up to ``max_attempts``, while the retry budget lasts (a yes takes a
        retry from it). The caller checks the rest: its deadline, and that no
        reply came yet."""
        return (
            attempts < self.policy.max_attempts
            and self.policy.is_idempotent(method)
            and self.budget.withdraw()
        )

    def begin(self, ep: Endpoint) -> None:
        self.inflight[ep.instance_id] = self.inflight.get(ep.instance_id, 0) + 1
        self.budget.deposit()

    def end(self, ep: Endpoint, ok: bool) -> None:
        """A call on ``ep`` ended; ``ok`` is False when the instance failed it
        (UNAVAILABLE, or a deadline it did not meet), not for errors it returned."""
        n = self.inflight.get(ep.instance_id, 1) - 1
        if n > 0:
            self.inflight[ep.instance_id] = n
        else:
            self.inflight.pop(ep.instance_id, None)
        b = self.breakers.get(ep.instance_id)
        if b is not None:
            before = b.state
            b.record(ok)
            if b.state != before and (b.state == "open" or before == "open"):
                self._refresh()


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _make(plugins: PluginManager, what: str, name: str, options: Mapping[str, Any]) -> Any:
    factory = plugins.balancer(name) if what == "balancer" else plugins.breaker(name)
    problems = factory.check_options(options)
    if problems:
        raise HsuError(f"{what} {name!r}: " + "; ".join(problems))
    return factory.create(options)


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
        #: called with each endpoint that leaves the registry (the gateway
        #: closes its channel)
        self.on_delete: list[Callable[[Endpoint], None]] = []
        #: awaited with the instance id of each instance being drained, after
        #: its draining state is written and before its calls are counted
        #: down: a data plane outside the kernel (hsu_plugins.gateway.nginx)
        #: returns once it sends the instance no new call
        self.drain_barriers: list[Callable[[str], Awaitable[None]]] = []
        self._load_changed: dict[str, asyncio.Event] = {}
        self._last_scaled: dict[str, float] = {}
        self._quiet_since: dict[str, float] = {}

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        name = self.kernel.kernel_settings.registry
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
                for listener in self.on_delete:
                    listener(ep)
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
        return Policy.of(units[0], self.kernel.deployment.units[units[0]].routing)

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
        inst = await self.kernel.instance_for(interface)
        self.update(inst)
        await self.flush()

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
        for barrier in list(self.drain_barriers):
            try:
                await asyncio.wait_for(
                    barrier(inst.instance_id), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                logger.bind(instance=inst.instance_id).warning(
                    "drain: {} did not confirm within the drain timeout", _name_of(barrier)
                )
            except Exception as exc:  # a plugin's bug must not stop the stop
                logger.bind(instance=inst.instance_id).opt(exception=exc).error(
                    "drain: {} failed", _name_of(barrier)
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


def _name_of(fn: Callable[..., object]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
