"""The built-in service registry, ``memory``: everything in the kernel's process.

It behaves the way an etcd-backed registry would, so that swapping one for the
other changes nothing a caller can see:

* every change (a put that changes something, a delete, a lease that expires)
  gets the next revision of one global counter, and one :class:`RegistryEvent`;
* a ``ttl`` is a lease: the endpoint is deleted (a ``delete`` event) unless
  :meth:`MemoryRegistry.keepalive` or another ``put`` comes within ``ttl``
  seconds. A put that changes nothing (the same endpoint, leased or not as
  before) only refreshes the lease: a keepalive by put makes no event;
* :meth:`~MemoryRegistry.snapshot` then :meth:`~MemoryRegistry.watch` from its
  revision is list-then-watch. The last :data:`HISTORY` events are kept, so a
  watcher that resumes from an older revision gets what it missed; one that
  asks for a revision older than that gets :class:`RegistryCompacted` and
  starts again from a fresh snapshot.

Every endpoint put is checked where it enters (:mod:`hsu.validate`: its
instance id, unit, address, interfaces, state, weight and metadata), and the
registry holds at most ``max_endpoints``: a put that would add one more
raises :class:`hsu.errors.OverLimit`, a malformed one
:class:`hsu.errors.InvalidValue`, and the registry is left as it was.

Lookups go through an index by interface; :meth:`~MemoryRegistry.lookup_now`
returns a cached tuple, rebuilt only when that interface's endpoints change.
Leases expire from one event-loop timer, armed for the earliest deadline.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import weakref
from collections.abc import AsyncIterator, Callable

import hsu
from hsu import validate
from hsu.errors import InvalidValue, OverLimit
from hsu.ports import (
    DRAINING,
    LEASED,
    SERVING,
    UNHEALTHY,
    Endpoint,
    Register,
    Registry,
    RegistryCompacted,
    RegistryEvent,
)

#: how many events the registry keeps for watchers that resume
HISTORY = 10_000
#: how many events one watcher may fall behind before it gets RegistryCompacted
WATCH_QUEUE = 1_000
#: how many endpoints the registry holds at most (a kernel lists at most 4096
#: instances; a registry may be shared)
MAX_ENDPOINTS = 16_384
#: interfaces one endpoint may serve
MAX_INTERFACES = 64
STATES = frozenset({SERVING, DRAINING, UNHEALTHY, LEASED})

PUT = "put"
DELETE = "delete"


class _End:
    """Wakes a watcher waiting on its queue: the watch ended (closed or overflowed)."""


_END = _End()


class MemoryRegistry:
    """A :class:`hsu.ports.Registry` kept in memory, with etcd's semantics.

    May be built outside an event loop; it uses the loop it is first called
    from for its lease timer. Endpoints are listed in ``instance_id`` order
    (etcd lists keys in order too).

    :param history: how many events to keep for watchers that resume.
    :param watch_queue: how many events one watcher may fall behind.
    :param max_endpoints: how many endpoints it holds at most.
    """

    def __init__(
        self,
        *,
        history: int = HISTORY,
        watch_queue: int = WATCH_QUEUE,
        max_endpoints: int = MAX_ENDPOINTS,
    ) -> None:
        if history < 1:
            raise ValueError(f"history: expected >= 1, got {history}")
        if watch_queue < 1:
            raise ValueError(f"watch_queue: expected >= 1, got {watch_queue}")
        if max_endpoints < 1:
            raise ValueError(f"max_endpoints: expected >= 1, got {max_endpoints}")
        self.max_endpoints = max_endpoints
        self._revision = 0
        #: the newest revision no longer in the history (0: none dropped yet)
        self._compacted = 0
        self._history: collections.deque[RegistryEvent] = collections.deque(maxlen=history)
        self._watch_queue = watch_queue
        self._watchers: weakref.WeakSet[_Watch] = weakref.WeakSet()
        self._endpoints: dict[str, Endpoint] = {}
        self._by_interface: dict[str, dict[str, Endpoint]] = {}
        #: lookup_now's answers, by interface; dropped when the interface changes
        self._cache: dict[str, tuple[Endpoint, ...]] = {}
        #: instance_id -> (ttl, deadline in loop time)
        self._leases: dict[str, tuple[float, float]] = {}
        #: (deadline, instance_id); an entry whose lease moved on is skipped
        self._deadlines: list[tuple[float, str]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False

    # -- Registry --------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The revision of the last change (0: none yet)."""
        return self._revision

    @property
    def watching(self) -> int:
        """How many watchers are subscribed (for diagnostics and tests)."""
        return len(self._watchers)

    async def put(self, endpoint: Endpoint, ttl: float | None = None) -> None:
        """Add the endpoint, or replace the one with its ``instance_id``.

        With ``ttl`` (seconds, > 0) the endpoint holds a lease; without, a
        lease it had is removed and it stays until :meth:`delete`. Raises
        :class:`~hsu.errors.InvalidValue` for a malformed endpoint and
        :class:`~hsu.errors.OverLimit` when it would be one too many.
        """
        self._check_open()
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl: expected > 0 seconds, got {ttl!r}")
        _check(endpoint)
        instance_id = endpoint.instance_id
        old = self._endpoints.get(instance_id)
        if old is None and len(self._endpoints) >= self.max_endpoints:
            raise OverLimit(
                f"registry put {instance_id}: the registry holds {len(self._endpoints)}"
                f" endpoints; at most {self.max_endpoints}"
            )
        unchanged = (
            old is not None
            and old == endpoint
            and (ttl is None) == (instance_id not in self._leases)
        )
        if ttl is None:
            self._leases.pop(instance_id, None)
        else:
            self._lease(instance_id, ttl)
        if unchanged:
            return
        self._endpoints[instance_id] = endpoint
        old_interfaces = set(old.interfaces) if old is not None else set()
        new_interfaces = set(endpoint.interfaces)
        for interface in old_interfaces - new_interfaces:
            self._unindex(interface, instance_id)
        for interface in new_interfaces:
            self._by_interface.setdefault(interface, {})[instance_id] = endpoint
            self._cache.pop(interface, None)
        self._emit(PUT, endpoint)

    async def keepalive(self, instance_id: str) -> bool:
        """Restart the endpoint's lease; ``False`` when it is no longer there.

        ``True`` for an endpoint without a lease (there is nothing to restart).
        """
        self._check_open()
        if instance_id not in self._endpoints:
            return False
        lease = self._leases.get(instance_id)
        if lease is not None:
            self._lease(instance_id, lease[0])
        return True

    async def delete(self, instance_id: str) -> bool:
        """Remove the endpoint; ``False`` when it was not there."""
        self._check_open()
        return self._remove(instance_id)

    async def lookup(self, interface: str) -> list[Endpoint]:
        """Every endpoint serving ``interface``, in any state, by ``instance_id``."""
        return list(self.lookup_now(interface))

    def lookup_now(self, interface: str) -> tuple[Endpoint, ...]:
        """:meth:`lookup`, synchronously, for the in-process hot path.

        The tuple is cached until that interface's endpoints change: calling
        this per call costs a dict lookup. Only the memory registry has it (a
        remote registry cannot answer without I/O): callers that may get
        another registry use :meth:`lookup` or :meth:`watch`.
        """
        cached = self._cache.get(interface)
        if cached is not None:
            return cached
        serving = self._by_interface.get(interface)
        if not serving:
            return ()
        found = tuple(serving[key] for key in sorted(serving))
        self._cache[interface] = found
        return found

    async def snapshot(self) -> tuple[list[Endpoint], int]:
        """Every endpoint, by ``instance_id``, and the revision they are as of."""
        return [self._endpoints[key] for key in sorted(self._endpoints)], self._revision

    def watch(self, after: int) -> AsyncIterator[RegistryEvent]:
        """The events with a revision above ``after``, in order, as they happen.

        The watcher is subscribed at once (nothing between this call and the
        first iteration is missed). Iterating raises :class:`RegistryCompacted`
        when ``after`` is older than the history, or once the watcher has
        fallen more than ``watch_queue`` events behind (it is dropped rather
        than let the registry wait for it). It ends when the registry closes,
        on :meth:`aclose`, when the task iterating it is cancelled, or when it
        is no longer referenced (breaking out of ``async for``).
        """
        return _Watch(self, after)

    async def close(self) -> None:
        """End every watcher and stop the lease timer. Idempotent.

        A closed registry refuses changes (``RuntimeError``); it can still be
        read.
        """
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        self._leases.clear()
        for watcher in list(self._watchers):
            watcher._end()
        self._watchers.clear()

    # -- changes ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the memory registry is closed")

    def _emit(self, kind: str, endpoint: Endpoint) -> None:
        self._revision += 1
        event = RegistryEvent(kind, endpoint, self._revision)
        history = self._history
        if len(history) == history.maxlen:
            self._compacted = history[0].revision
        history.append(event)
        for watcher in list(self._watchers):
            watcher._deliver(event)

    def _remove(self, instance_id: str) -> bool:
        endpoint = self._endpoints.pop(instance_id, None)
        if endpoint is None:
            return False
        self._leases.pop(instance_id, None)
        for interface in set(endpoint.interfaces):
            self._unindex(interface, instance_id)
        self._emit(DELETE, endpoint)
        return True

    def _unindex(self, interface: str, instance_id: str) -> None:
        serving = self._by_interface.get(interface)
        if serving is None:
            return
        serving.pop(instance_id, None)
        if not serving:
            del self._by_interface[interface]
        self._cache.pop(interface, None)

    def _replay(self, after: int) -> list[RegistryEvent]:
        """The kept events above ``after``; raises when some are no longer kept."""
        if after < self._compacted:
            raise RegistryCompacted(
                f"revision {after} is compacted: the registry keeps revisions above"
                f" {self._compacted} (now at {self._revision}); take a fresh snapshot"
            )
        history = self._history
        if not history or after >= self._revision:
            return []
        # the history holds consecutive revisions, the oldest at index 0
        start = max(after + 1 - history[0].revision, 0)
        if start == 0:
            return list(history)
        return [history[i] for i in range(start, len(history))]

    # -- leases ------------------------------------------------------------------

    def _lease(self, instance_id: str, ttl: float) -> None:
        loop = self._running_loop()
        deadline = loop.time() + ttl
        self._leases[instance_id] = (ttl, deadline)
        heapq.heappush(self._deadlines, (deadline, instance_id))
        if len(self._deadlines) > 2 * len(self._leases) + 64:
            # keepalives leave superseded entries behind: rebuild from the leases
            self._deadlines = [(d, key) for key, (_, d) in self._leases.items()]
            heapq.heapify(self._deadlines)
        self._arm()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # first use, or the registry moved to another loop: its timer with it
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._loop = loop
        return loop

    def _arm(self) -> None:
        """Have the timer fire at the earliest live deadline (and only then)."""
        deadlines = self._deadlines
        leases = self._leases
        while deadlines:
            deadline, instance_id = deadlines[0]
            lease = leases.get(instance_id)
            if lease is not None and lease[1] == deadline:
                break
            heapq.heappop(deadlines)  # superseded by a keepalive, a put or a delete
        if not deadlines:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        earliest = deadlines[0][0]
        if self._timer is not None:
            if self._timer_at <= earliest:
                return  # fires no later than needed; it re-arms then
            self._timer.cancel()
        assert self._loop is not None
        self._timer = self._loop.call_at(earliest, self._expire)
        self._timer_at = earliest

    def _expire(self) -> None:
        self._timer = None
        if self._closed or self._loop is None:
            return
        now = self._loop.time()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, instance_id = heapq.heappop(deadlines)
            lease = self._leases.get(instance_id)
            if lease is not None and lease[1] == deadline:
                self._remove(instance_id)
        self._arm()


def _check(endpoint: Endpoint) -> None:
    """Every field of an endpoint, as :mod:`hsu.validate` accepts it."""
    try:
        validate.instance_id(endpoint.instance_id)
        validate.text(endpoint.unit, field="unit", max_len=validate.MAX_UNIT, required=True)
        validate.address(endpoint.address)
        if not 1 <= len(endpoint.interfaces) <= MAX_INTERFACES:
            raise InvalidValue(
                f"interfaces: {len(endpoint.interfaces)} listed; 1 to {MAX_INTERFACES}"
            )
        for i, name in enumerate(endpoint.interfaces):
            validate.interface_name(name, field=f"interfaces[{i}]")
        if endpoint.state not in STATES:
            raise InvalidValue(
                f"state: {validate.shown(endpoint.state)} is not one of {sorted(STATES)}"
            )
        validate.weight(endpoint.weight)
        validate.labels(endpoint.metadata)
    except InvalidValue as exc:
        raise InvalidValue(f"registry put {validate.shown(endpoint.instance_id)}: {exc}") from None


class _Watch(AsyncIterator[RegistryEvent]):
    """One watcher: the replayed history, then its own queue of live events."""

    def __init__(self, registry: MemoryRegistry, after: int) -> None:
        self._registry: MemoryRegistry | None = registry
        self._after = after
        self._limit = registry._watch_queue
        self._queue: asyncio.Queue[RegistryEvent | _End] = asyncio.Queue()
        self._backlog: collections.deque[RegistryEvent] = collections.deque()
        self._error: RegistryCompacted | None = None
        self._done = False
        if registry._closed:
            self._end()
            return
        try:
            self._backlog.extend(registry._replay(after))
        except RegistryCompacted as exc:
            self._error = exc
            self._registry = None
            return
        registry._watchers.add(self)

    def __aiter__(self) -> _Watch:
        return self

    async def __anext__(self) -> RegistryEvent:
        if self._error is not None:
            error, self._error = self._error, None
            self._finish()
            raise error
        if self._backlog:
            return self._backlog.popleft()
        if self._done and self._queue.empty():
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self._finish()
            raise
        if isinstance(item, _End):
            return await self.__anext__()
        return item

    async def aclose(self) -> None:
        """Stop watching (idempotent); iterating after this ends at once."""
        self._finish()

    def _deliver(self, event: RegistryEvent) -> None:
        if event.revision <= self._after:
            return  # watching from a revision still to come
        if self._queue.qsize() >= self._limit:
            revision = event.revision
            self._finish()
            self._error = RegistryCompacted(
                f"the watcher fell more than {self._limit} events behind (at revision"
                f" {revision}); take a fresh snapshot"
            )
            return
        self._queue.put_nowait(event)

    def _end(self) -> None:
        """The registry closed: deliver what is queued, then stop."""
        self._registry = None
        self._done = True
        self._queue.put_nowait(_END)

    def _finish(self) -> None:
        """Unsubscribe and drop what is queued; a waiting ``__anext__`` stops."""
        if self._registry is not None:
            self._registry._watchers.discard(self)
            self._registry = None
        self._backlog.clear()
        self._done = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_END)


def create(kernel: object = None) -> MemoryRegistry:
    """The registry factory: ``factory(kernel)``; the memory registry has no settings."""
    return MemoryRegistry()


@hsu.hookimpl
def hsu_register_registries(register: Register[Callable[..., Registry]]) -> None:
    register("memory", create, default=True)
