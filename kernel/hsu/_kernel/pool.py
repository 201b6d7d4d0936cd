"""Worker-pool semantics: slots per instance, each unit's queue, leases.

A unit with ``routing.max_inflight`` runs at most that many calls at a time
on each instance. Every routed caller — the gateway and ``kernel.connect()``
in the kernel's process, ``hsu.connect`` and ``hsu.connect_sync`` in any
other over ``Kernel.Slots`` — takes a slot here before it sends a call and
gives it back when the call ends, so they all share one count. A call that
finds every instance full waits in its unit's queue: by priority (higher
first), FIFO within one, a call older than ``routing.queue.max_age`` before
any younger one; a full queue is :class:`~hsu.errors.QueueFull`, a call
whose time runs out while it waits :class:`~hsu.errors.QueueTimeout`, and it
is never sent.

A lease takes a whole instance (no call in flight, none sent there until it
ends): it waits in the same queue, and ends on release, on expiry without
renewal, or when its instance goes (the holder's next renew says which).

See ``docs/routing.md``, "Concurrency limits, queue and leases".
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
from loguru import logger

from hsu.errors import LeaseEnded, QueueFull, QueueTimeout
from hsu.ports import Endpoint

if TYPE_CHECKING:
    from hsu._kernel.routing import KernelRouting
    from hsu.client.route import Route

#: how many ended leases are remembered, so a late renew learns why
ENDED_KEPT = 1000


@attrs.define(eq=False)
class Grant:
    """One slot (or, for a lease, a whole instance) held on an instance."""

    unit: str
    endpoint: Endpoint
    lease: bool = False
    released: bool = False


@attrs.define(eq=False)
class Waiter:
    interface: str
    key: str | None
    exclude: str
    priority: int
    since: float
    future: asyncio.Future[Grant]
    lease: bool = False


@attrs.define(eq=False)
class Lease:
    lease_id: str
    grant: Grant
    ttl: float
    timer: asyncio.TimerHandle | None = None


class UnitQueue:
    """One unit's slots in use and calls waiting."""

    def __init__(self, unit: str):
        self.unit = unit
        #: slots in use, by instance_id
        self.busy: dict[str, int] = {}
        #: leased instances: instance_id -> lease_id
        self.leased: dict[str, str] = {}
        #: waiting calls, one FIFO per priority
        self.waiting: dict[int, collections.deque[Waiter]] = {}
        self.depth = 0

    def push(self, w: Waiter) -> None:
        self.waiting.setdefault(w.priority, collections.deque()).append(w)
        self.depth += 1

    def head(self, now: float, max_age: float) -> Waiter | None:
        """The next to go: the oldest that waited ``max_age`` or longer, else
        the first of the highest priority."""
        best: Waiter | None = None
        aged: Waiter | None = None
        for prio, fifo in self.waiting.items():
            if not fifo:
                continue
            first = fifo[0]
            if now - first.since >= max_age and (aged is None or first.since < aged.since):
                aged = first
            if best is None or prio > best.priority:
                best = first
        return aged or best

    def remove(self, w: Waiter) -> bool:
        fifo = self.waiting.get(w.priority)
        if fifo is None:
            return False
        try:
            fifo.remove(w)
        except ValueError:
            return False
        if not fifo:
            del self.waiting[w.priority]
        self.depth -= 1
        return True


class Pool:
    """Every unit's queue, in the kernel (``KernelRouting.pool``)."""

    def __init__(self, routing: KernelRouting):
        self.routing = routing
        self.queues: dict[str, UnitQueue] = {}
        self.leases: dict[str, Lease] = {}
        #: why recent leases ended, by lease_id
        self.ended: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._poked: set[str] = set()
        #: told when a unit's queue depth changes (the autoscaler, events)
        self.depth_changed: list[Callable[[str, int], None]] = []

    # -- settings -------------------------------------------------------------------

    def _settings(self, unit: str) -> tuple[float, int, float, float]:
        """(max_inflight or inf, queue.max, queue.max_age, queue.timeout)."""
        spec = self.routing.kernel.deployment.units.get(unit)
        if spec is None:
            return math.inf, 0, 10.0, 30.0
        r = spec.routing
        limit = math.inf if r.max_inflight is None else r.max_inflight
        return limit, r.queue.max, r.queue.max_age, r.queue.timeout

    def queue(self, unit: str) -> UnitQueue:
        q = self.queues.get(unit)
        if q is None:
            q = self.queues[unit] = UnitQueue(unit)
        return q

    def depth(self, unit: str) -> int:
        """Calls and leases waiting for a slot of ``unit``."""
        q = self.queues.get(unit)
        return 0 if q is None else q.depth

    def leased(self, unit: str) -> int:
        """Instances of ``unit`` held by a lease."""
        q = self.queues.get(unit)
        return 0 if q is None else len(q.leased)

    def held(self, unit: str) -> int:
        """Slots in use on ``unit``'s instances (leases not counted)."""
        q = self.queues.get(unit)
        return 0 if q is None else sum(q.busy.values())

    # -- slots ----------------------------------------------------------------------

    async def acquire(
        self,
        interface: str,
        key: str | None = None,
        exclude: str = "",
        priority: int = 0,
        timeout: float | None = None,
        *,
        lease: bool = False,
    ) -> Grant:
        """A slot on an instance serving ``interface`` (a whole one for a
        ``lease``): at once when one is free and nobody waits, else after
        waiting in the unit's queue up to ``timeout`` (default
        ``routing.queue.timeout``). Raises ``NoSuchUnit``, ``QueueFull`` or
        ``QueueTimeout``."""
        grant = self.try_acquire(interface, key, exclude, lease=lease)
        if grant is not None:
            return grant
        route = self.routing.route(interface)
        unit = route.policy.unit
        limit, qmax, _, default_timeout = self._settings(unit)
        q = self.queue(unit)
        if q.depth >= qmax:
            raise QueueFull(self._why(unit, q, limit, f"its queue is full ({qmax} waiting)"))
        loop = asyncio.get_running_loop()
        w = Waiter(interface, key, exclude, priority, time.monotonic(), loop.create_future(), lease)
        q.push(w)
        self._depth_changed(unit, q.depth)
        if not route.routable:
            self._start(interface)
        else:
            self.poke(unit)  # an instance may have freed meanwhile
        wait = default_timeout if timeout is None else timeout
        try:
            done, _ = await asyncio.wait((w.future,), timeout=max(0.0, wait))
        except asyncio.CancelledError:
            self._abandon(q, w)
            raise
        if not done:
            self._abandon(q, w)
            what = "lease" if lease else "call"
            raise QueueTimeout(
                self._why(unit, q, limit, f"the {what} waited {wait:.3g} s in its queue")
            )
        return w.future.result()

    def try_acquire(
        self, interface: str, key: str | None = None, exclude: str = "", *, lease: bool = False
    ) -> Grant | None:
        """A slot at once, when one is free and nobody waits; else None."""
        route = self.routing.route(interface)
        unit = route.policy.unit
        q = self.queue(unit)
        if q.depth:
            return None
        return self._place(route, q, self._settings(unit)[0], key, exclude, lease)

    def release(self, grant: Grant) -> None:
        """Give a slot back (once; again is a no-op); the next waiter takes it."""
        if grant.released:
            return
        grant.released = True
        q = self.queue(grant.unit)
        iid = grant.endpoint.instance_id
        if grant.lease:
            if q.leased.get(iid) is not None:
                del q.leased[iid]
                self.routing.set_leased(iid, False)
        else:
            n = q.busy.get(iid, 1) - 1
            if n > 0:
                q.busy[iid] = n
            else:
                q.busy.pop(iid, None)
        self.dispatch(grant.unit)

    def _place(
        self,
        route: Route,
        q: UnitQueue,
        limit: float,
        key: str | None,
        exclude: str,
        lease: bool,
    ) -> Grant | None:
        busy = q.busy
        leased = q.leased

        load = self.routing.load

        def free(iid: str) -> bool:
            if iid in leased:
                return False
            n = busy.get(iid, 0)
            if not lease:
                return n < limit
            # a lease waits for an idle instance: with no limit, calls are
            # not counted here, but the kernel's load sees them
            return n == 0 and (limit != math.inf or load(iid) == 0)

        ep = route.pick_free(busy, free, key, exclude)
        if ep is None:
            return None
        grant = Grant(q.unit, ep, lease)
        self.routing.touch(ep.instance_id)
        if lease:
            leased[ep.instance_id] = ""
            self.routing.set_leased(ep.instance_id, True)
        else:
            busy[ep.instance_id] = busy.get(ep.instance_id, 0) + 1
        return grant

    def poke(self, unit: str) -> None:
        """Something changed (an instance listed, a breaker closed): look at
        the queue once the current step is done."""
        q = self.queues.get(unit)
        if q is None or (not q.depth and not q.leased) or unit in self._poked:
            return
        self._poked.add(unit)
        asyncio.get_running_loop().call_soon(self._poke, unit)

    def _poke(self, unit: str) -> None:
        self._poked.discard(unit)
        self._check_leases(unit)
        self.dispatch(unit)

    def dispatch(self, unit: str) -> None:
        """Hand free slots to waiters, in queue order; stop at the first that
        cannot be placed (the order holds: nobody overtakes it)."""
        q = self.queues.get(unit)
        if q is None or not q.depth:
            return
        limit, _, max_age, _ = self._settings(unit)
        now = time.monotonic()
        moved = False
        while q.depth:
            w = q.head(now, max_age)
            assert w is not None
            if w.future.done():  # cancelled meanwhile
                q.remove(w)
                moved = True
                continue
            try:
                route = self.routing.route(w.interface)
            except Exception:
                grant = None
            else:
                grant = self._place(route, q, limit, w.key, w.exclude, w.lease)
            if grant is None:
                break
            q.remove(w)
            moved = True
            w.future.set_result(grant)
        if moved:
            self._depth_changed(unit, q.depth)

    def _abandon(self, q: UnitQueue, w: Waiter) -> None:
        """A waiter gave up (its time, or cancelled): out of the queue, and a
        slot it was granted meanwhile goes back."""
        if w.future.done() and not w.future.cancelled():
            self.release(w.future.result())
            return
        w.future.cancel()
        if q.remove(w):
            self._depth_changed(q.unit, q.depth)

    def _start(self, interface: str) -> None:
        """No instance is listed: start one on demand (the queue waits for it)."""

        async def start() -> None:
            try:
                await self.routing.ensure(interface)
            except Exception as exc:
                logger.warning("queue of {}: no instance could be started: {}", interface, exc)

        task = asyncio.ensure_future(start())
        self.routing.background(task)

    def _why(self, unit: str, q: UnitQueue, limit: float, what: str) -> str:
        shown = "unlimited" if limit == math.inf else str(int(limit))
        return (
            f"unit {unit!r}: every instance is at its limit (routing.max_inflight {shown};"
            f" {sum(q.busy.values())} calls in flight, {len(q.leased)} leased) and {what};"
            f" queue depth {q.depth}"
        )

    def _depth_changed(self, unit: str, depth: int) -> None:
        for listener in self.depth_changed:
            listener(unit, depth)

    # -- leases ---------------------------------------------------------------------

    async def lease(
        self, interface: str, ttl: float, timeout: float | None = None, priority: int = 0
    ) -> Lease:
        """An instance of ``interface`` for the caller alone, for ``ttl`` s
        unless renewed."""
        grant = await self.acquire(interface, None, "", priority, timeout, lease=True)
        lease_id = os.urandom(16).hex()
        lease = Lease(lease_id, grant, ttl)
        self.queue(grant.unit).leased[grant.endpoint.instance_id] = lease_id
        self.leases[lease_id] = lease
        self._arm(lease)
        logger.bind(unit=grant.unit, instance=grant.endpoint.instance_id).info(
            "lease {} of {} for {:.3g} s", lease_id[:8], grant.endpoint.instance_id, ttl
        )
        return lease

    def renew(self, lease_id: str) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise LeaseEnded(self._ended_why(lease_id))
        self._arm(lease)
        self.routing.touch(lease.grant.endpoint.instance_id)
        return lease

    def release_lease(self, lease_id: str) -> None:
        if lease_id in self.leases:
            self.end_lease(lease_id, "released by its holder")

    def end_lease(self, lease_id: str, why: str) -> None:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return
        if lease.timer is not None:
            lease.timer.cancel()
        self.ended[lease_id] = why
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)
        logger.bind(unit=lease.grant.unit, instance=lease.grant.endpoint.instance_id).info(
            "lease {} ended: {}", lease_id[:8], why
        )
        self.release(lease.grant)

    def _ended_why(self, lease_id: str) -> str:
        why = self.ended.get(lease_id)
        if why is None:
            return f"no lease {lease_id[:8]}... (unknown, or ended long ago)"
        return f"lease {lease_id[:8]}... ended: {why}"

    def _arm(self, lease: Lease) -> None:
        if lease.timer is not None:
            lease.timer.cancel()
        ttl = lease.ttl
        lease.timer = asyncio.get_running_loop().call_later(
            ttl, self.end_lease, lease.lease_id, f"expired: not renewed within its ttl of {ttl:g} s"
        )

    def _check_leases(self, unit: str) -> None:
        """End the leases of ``unit`` whose instance is gone or going."""
        q = self.queues.get(unit)
        if q is None or not q.leased:
            return
        for lease_id in list(q.leased.values()):
            lease = self.leases.get(lease_id)
            if lease is None:
                continue
            why = self.routing.gone(lease.grant.endpoint)
            if why:
                self.end_lease(lease_id, why)

    def close(self) -> None:
        for lease_id in list(self.leases):
            self.end_lease(lease_id, "the kernel is stopping")
        for q in self.queues.values():
            for fifo in q.waiting.values():
                for w in fifo:
                    w.future.cancel()
            q.waiting.clear()
            q.depth = 0
