"""A caller's routing: per interface a :class:`Route`, per call :class:`Tries`.

- :class:`Route` is what any caller keeps per interface: the routable
  endpoints, a balancer (a plugin), one circuit breaker (a plugin) per
  instance, the calls in flight per instance and a retry budget.
- :class:`Tries` is the one call loop every routed caller runs: pick an
  instance (starting one on demand when none is routable, waiting for one
  when every routable one refuses), count the call, run the attempt, end it
  with its outcome and, when the instance failed an idempotent call before
  any reply, try another one within the call's deadline and the retry
  budget. An instance the caller could not reach is ejected (taken out of
  the rotation) at once, until its channel connects again or the registry
  replaces it. ``hsu.connect`` (:mod:`hsu.client.aio`),
  ``hsu.connect_sync`` (:mod:`hsu.client.sync`) and the kernel's gateway all
  step through it: the decisions are made here, once; the waiting (awaiting
  or blocking) is each caller's.

The kernel's side (its registry writer, drain, autoscaling) is private to it.
See ``docs/routing.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import math
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

import attrs
import grpc
from loguru import logger

from hsu.errors import HsuError, NoSuchUnit, QueueFull, QueueTimeout
from hsu.metrics import code_of
from hsu.peer import PeerSigner
from hsu.ports import SERVING, Balancer, CircuitBreaker, Endpoint, Factory
from hsu.tracecontext import COLD_START, CallTrace

T = TypeVar("T")

#: codes that mean the instance could not take the call: a circuit breaker's
#: failure, and what an idempotent call is retried on
INSTANCE_FAILED = frozenset({grpc.StatusCode.UNAVAILABLE})
#: channels to local HSUs: no proxy, and a short reconnect backoff so a server
#: that comes back is seen at once
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    # C-core takes this as the connect timeout too (min_connect_timeout): at
    # 100 ms a loaded machine's HSU, up but slow to send its HTTP/2 SETTINGS,
    # failed the call ("connection attempt timed out before receiving
    # SETTINGS frame"). A dead instance refuses at once whatever it is.
    ("grpc.min_reconnect_backoff_ms", 2000),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
#: the kinds of call whose request a retry can send again (a request stream
#: is gone once sent, unless the caller kept it: see ``Tries``'s ``replayable``)
RETRIED = frozenset({"unary_unary", "unary_stream"})
#: how long an instance the caller could not reach stays ejected when the
#: caller does not watch its channel (a caller that does lets it back as soon
#: as the channel connects again; see ``Caller.watch``)
EJECT_FOR = 5.0
#: how long a call without a deadline waits for an instance that can take it
#: (every routable one refused it: breakers open, instances ejected)
WAIT_WITHOUT_DEADLINE = 10.0
#: a waiting call looks again at least this often (a change of the route, an
#: ejection ended or a breaker's cooldown known to end sooner wake it earlier)
RECHECK = 0.25
#: what grpc's own UNAVAILABLE says when a connection was refused or lost
#: (lowercased), unlike one an instance answered; the channel's state says
#: the same, but may say it a moment after the call has failed
TRANSPORT_ERRORS = (
    "failed to connect",
    "connection refused",
    "connection reset",
    "socket closed",
    "stream removed",
    "broken pipe",
    "goaway",
    "transport closed",
    "endpoint closing",
    "keepalive watchdog",
)
#: the metadata key of a call's priority in its unit's queue (an integer;
#: higher goes first, default 0)
PRIORITY_KEY = "hsu-priority"
#: priorities are clamped to this range
PRIORITY_RANGE = (-1000, 1000)
#: tries of one call that could not reach their instance, on top of
#: ``max_attempts``; they take nothing from the retry budget either (the
#: instance is gone: trying elsewhere adds no load)
UNREACHABLE_TRIES = 10


class Factories(Protocol):
    """Where balancers and breakers come from (the kernel's plugin manager)."""

    def balancer(self, name: str) -> Factory: ...

    def breaker(self, name: str) -> Factory: ...

    def balancer_names(self) -> list[str]: ...

    def breaker_names(self) -> list[str]: ...

    def default(self, kind: str) -> str | None: ...


def load_plugins() -> Factories:
    """Every installed hsu plugin, for a caller outside the kernel's process."""
    from hsu._kernel.plugins import PluginManager  # the plugin manager is the kernel's

    return PluginManager.load([])


# -- policy and endpoints ---------------------------------------------------------


@attrs.frozen
class Policy:
    """How callers route to one unit: its ``routing:`` as the kernel hands it out."""

    unit: str
    #: "" (and a name not installed here): the default this process's plugins
    #: declare (see :func:`installed`)
    balancer: str = ""
    balancer_options: Mapping[str, Any] = attrs.field(factory=dict)
    breaker: str = ""
    breaker_options: Mapping[str, Any] = attrs.field(factory=dict)
    hash_key: str = "hsu-key"
    idempotent: tuple[str, ...] = ()
    max_attempts: int = 3
    retry_budget: float = 0.2
    retry_min_per_second: float = 10.0
    #: calls at a time on one instance (0: unlimited); when set, a call takes
    #: a slot from the kernel before it is sent (:attr:`Caller.acquire`)
    max_inflight: int = 0
    #: unary methods whose OK replies are kept ``cache_ttl`` seconds, keyed
    #: by method, request bytes and ``cache_key_metadata`` (``routing.cache``)
    cache_methods: tuple[str, ...] = ()
    cache_ttl: float = 0.0
    cache_key_metadata: tuple[str, ...] = ()

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
            max_inflight=self.max_inflight,
            cache_methods=list(self.cache_methods),
            cache_ttl=self.cache_ttl,
            cache_key_metadata=list(self.cache_key_metadata),
        )

    @classmethod
    def from_pb(cls, msg: Any) -> Policy:
        return cls(
            unit=msg.unit,
            balancer=msg.balancer,
            balancer_options=json.loads(msg.balancer_options_json or "{}"),
            breaker=msg.breaker,
            breaker_options=json.loads(msg.breaker_options_json or "{}"),
            hash_key=msg.hash_key,
            idempotent=tuple(msg.idempotent),
            max_attempts=max(1, msg.max_attempts),
            retry_budget=msg.retry_budget,
            retry_min_per_second=msg.retry_min_per_second,
            max_inflight=msg.max_inflight,
            cache_methods=tuple(msg.cache_methods),
            cache_ttl=msg.cache_ttl,
            cache_key_metadata=tuple(msg.cache_key_metadata),
        )

    def is_idempotent(self, method: str) -> bool:
        """``method`` is the full path, ``/pkg.Service/Method``."""
        return method_matches(self.idempotent, method)

    def cache_ttl_for(self, method: str) -> float | None:
        """Seconds a reply of ``method`` (the full path) is kept, or None
        when the unit does not cache it."""
        if self.cache_ttl > 0 and method_matches(self.cache_methods, method):
            return self.cache_ttl
        return None


def method_matches(patterns: tuple[str, ...], method: str) -> bool:
    """``method`` (``/pkg.Service/Method``) is one of ``patterns``: ``Method``,
    ``pkg.Service/Method``, a glob of the latter, or ``"*"``."""
    if not patterns:
        return False
    service_method = method.lstrip("/")
    short = service_method.rpartition("/")[2]
    return any(
        pat == "*" or pat in (short, service_method) or fnmatch.fnmatchcase(service_method, pat)
        for pat in patterns
    )


def installed(policy: Policy, plugins: Factories) -> Policy:
    """The policy, with a balancer or breaker that is unset, or not installed in
    this process, replaced by the default its plugins declare (with a warning
    for one not installed)."""
    changes: dict[str, Any] = {}
    for kind, names in (
        ("balancer", plugins.balancer_names()),
        ("breaker", plugins.breaker_names()),
    ):
        name = getattr(policy, kind)
        if name in names:
            continue
        default = plugins.default(kind)
        if default is None:
            raise HsuError(
                f"unit {policy.unit!r}: no {kind} {name or '(default)'} in this process,"
                f" and no installed plugin declares a default {kind}"
            )
        if name:
            logger.warning(
                "hsu: {} {!r} of unit {!r} is not installed here; using {}",
                kind,
                name,
                policy.unit,
                default,
            )
        changes.update({kind: default, f"{kind}_options": {}})
    return attrs.evolve(policy, **changes) if changes else policy


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


def apply_update(route: Route, update: Any) -> None:
    """One ``Kernel.WatchEndpoints`` update, onto the route."""
    if update.snapshot:
        route.replace(endpoint_from_pb(e) for e in update.endpoints)
    elif update.kind == "put":
        route.put(endpoint_from_pb(update.endpoints[0]))
    else:
        route.delete(update.endpoints[0].instance_id)


# -- the route ------------------------------------------------------------------


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
    """One caller's view of one interface: pick, count, break, eject, budget.

    Single-threaded: use it from one event loop (or under one lock).
    """

    def __init__(self, interface: str, policy: Policy, plugins: Factories):
        self.interface = interface
        self.policy = policy
        self._plugins = plugins
        self.balancer: Balancer = _make(
            plugins, "balancer", policy.balancer, policy.balancer_options
        )
        #: by instance_id; dropped when the registry removes the instance or
        #: lists it at another address (a replacement starts with a fresh one)
        self.breakers: dict[str, CircuitBreaker] = {}
        #: every endpoint the registry lists, routable or not, by instance_id
        self.endpoints: dict[str, Endpoint] = {}
        #: the ones handed to the balancer
        self.available: tuple[Endpoint, ...] = ()
        #: calls in flight, by instance_id
        self.inflight: dict[str, int] = {}
        #: instances the caller could not reach, by instance_id: (the address
        #: it could not reach, until when on :func:`time.monotonic`'s clock)
        self.ejected: dict[str, tuple[str, float]] = {}
        self.budget = RetryBudget(policy.retry_budget, policy.retry_min_per_second)
        #: told of every change (a caller on threads wakes its waiting calls)
        self.listeners: list[Callable[[], None]] = []
        self._open: set[str] = set()
        self._eject_ends = math.inf
        self._changed: asyncio.Event | None = None
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
        old = self.endpoints
        new: dict[str, Endpoint] = {}
        for e in endpoints:
            known = old.get(e.instance_id)
            new[e.instance_id] = known if known is not None and known == e else e
        for instance_id, known in old.items():
            now = new.get(instance_id)
            if now is None or now.address != known.address:
                self._forget(instance_id)
        self.endpoints = new
        self._refresh()

    def put(self, ep: Endpoint) -> None:
        known = self.endpoints.get(ep.instance_id)
        if known == ep:
            return
        if known is not None and known.address != ep.address:
            self._forget(ep.instance_id)  # another process in the slot
        self.endpoints[ep.instance_id] = ep
        self._refresh()

    def delete(self, instance_id: str) -> None:
        if self.endpoints.pop(instance_id, None) is not None:
            self._forget(instance_id)
            self._refresh()

    def _forget(self, instance_id: str) -> None:
        """The instance left (or another took its slot): its history goes."""
        self.breakers.pop(instance_id, None)
        self.ejected.pop(instance_id, None)

    def breaker(self, instance_id: str) -> CircuitBreaker:
        b = self.breakers.get(instance_id)
        if b is None:
            p = self.policy
            b = self.breakers[instance_id] = _make(
                self._plugins, "breaker", p.breaker, p.breaker_options
            )
        return b

    def _refresh(self) -> None:
        """Hand the balancer the routable endpoints whose breaker is not open
        and that are not ejected; wake whoever waits for a change."""
        out = self._open = {i for i, b in self.breakers.items() if b.state == "open"}
        self._eject_ends = math.inf
        if self.ejected:
            now = time.monotonic()
            for i, (_, until) in list(self.ejected.items()):
                if until <= now:
                    del self.ejected[i]
                else:
                    self._eject_ends = min(self._eject_ends, until)
            out = out | self.ejected.keys()
        self.available = tuple(
            e for i, e in sorted(self.endpoints.items()) if e.routable and i not in out
        )
        self.balancer.update(self.available)
        self.version += 1
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()
        for listener in self.listeners:
            listener()

    @property
    def routable(self) -> bool:
        """The registry lists a serving endpoint (ejected or not: the
        caller waits for those, rather than starting another instance)."""
        return any(e.routable for e in self.endpoints.values())

    async def changed(self) -> None:
        """Wait for the next change of the endpoints (or of what they may take)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    # -- ejection -------------------------------------------------------------

    def eject(self, ep: Endpoint, until: float = math.inf) -> bool:
        """The caller could not reach ``ep``: no call goes there until
        :meth:`restore`, ``until`` (on :func:`time.monotonic`'s clock) or the
        registry lists the instance elsewhere. False when it is ejected
        already, or the registry has since removed or replaced it."""
        known = self.endpoints.get(ep.instance_id)
        if known is None or known.address != ep.address or ep.instance_id in self.ejected:
            return False
        self.ejected[ep.instance_id] = (ep.address, until)
        self._refresh()
        return True

    def is_ejected(self, ep: Endpoint) -> bool:
        return self.ejected.get(ep.instance_id, ("",))[0] == ep.address

    def restore(self, ep: Endpoint) -> None:
        """``ep``'s channel connects again: calls may go there."""
        if self.is_ejected(ep):
            del self.ejected[ep.instance_id]
            self._refresh()

    # -- calls --------------------------------------------------------------

    def pick(self, key: str | None = None, exclude: str = "") -> Endpoint | None:
        """The endpoint for a call, or ``None`` when none can take one now.

        ``exclude``: an instance the call just failed on (a retry goes
        elsewhere when there is elsewhere).
        """
        if (self._open and any(self.breakers[i].state != "open" for i in self._open)) or (
            self.ejected and self._eject_ends <= time.monotonic()
        ):
            self._refresh()  # a cooldown passed (half-open instances take trials), or an ejection
        for _ in range(3):
            ep = self.balancer.pick(self.inflight, key)
            if ep is None:
                return None
            if ep.instance_id == exclude and len(self.available) > 1:
                continue
            if self.breaker(ep.instance_id).allow():
                return ep
            self._refresh()  # it opened (or is half-open with its trials taken)
        # every try was refused: any endpoint whose breaker lets a call
        # through, the excluded one last
        for ep in sorted(self.available, key=lambda e: e.instance_id == exclude):
            if self.breaker(ep.instance_id).allow():
                return ep
        return None

    def pick_free(
        self,
        busy: Mapping[str, int],
        free: Callable[[str], bool],
        key: str | None = None,
        exclude: str = "",
    ) -> Endpoint | None:
        """Like :meth:`pick`, among the endpoints ``free(instance_id)``
        accepts (below their unit's ``max_inflight``), with ``busy`` (every
        caller's calls in flight, the kernel's count) as the balancer's load.

        A balancer that turns meets each endpoint within as many picks as
        there are; one that does not (random, a hash) may not, so the least
        busy free one is taken then."""
        if (self._open and any(self.breakers[i].state != "open" for i in self._open)) or (
            self.ejected and self._eject_ends <= time.monotonic()
        ):
            self._refresh()
        available = self.available
        candidates = [e for e in available if free(e.instance_id)]
        if not candidates:
            return None
        if len(candidates) > 1 and exclude:
            candidates = [e for e in candidates if e.instance_id != exclude]
        ok = {e.instance_id for e in candidates}
        for _ in range(len(available) + 1):
            ep = self.balancer.pick(busy, key)
            if ep is None:
                break
            if ep.instance_id in ok and self.breaker(ep.instance_id).allow():
                return ep
        for ep in sorted(candidates, key=lambda e: busy.get(e.instance_id, 0)):
            if self.breaker(ep.instance_id).allow():
                return ep
        return None

    def wake_in(self) -> float:
        """Seconds until an instance refused now may take a call: the end of
        an ejection, or of a breaker's opening when the breaker tells it
        (``retry_in``, as the built-in ones do); at most :data:`RECHECK`."""
        soonest = min(RECHECK, self._eject_ends - time.monotonic())
        for instance_id in self._open:
            left = getattr(self.breakers.get(instance_id), "retry_in", None)
            if isinstance(left, (int, float)):
                soonest = min(soonest, left)
        return max(0.001, soonest)

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

    def begin(self, ep: Endpoint) -> CircuitBreaker | None:
        """A call on ``ep`` begins; returns the breaker that let it through
        (its outcome goes to that one, even if the instance was replaced since)."""
        self.inflight[ep.instance_id] = self.inflight.get(ep.instance_id, 0) + 1
        self.budget.deposit()
        return self.breakers.get(ep.instance_id)

    def end(
        self,
        ep: Endpoint,
        ok: bool,
        breaker: CircuitBreaker | None = None,
        unreachable: float | None = None,
    ) -> bool:
        """A call on ``ep`` ended; ``ok`` is False when the instance failed it
        (UNAVAILABLE), not for errors it returned. ``breaker``: the one
        :meth:`begin` returned (default: the instance's current one).
        ``unreachable``: the caller could not reach the instance; it is
        ejected until then (see :meth:`eject`). True when this ejected it."""
        n = self.inflight.get(ep.instance_id, 1) - 1
        if n > 0:
            self.inflight[ep.instance_id] = n
        else:
            self.inflight.pop(ep.instance_id, None)
        b = breaker if breaker is not None else self.breakers.get(ep.instance_id)
        if b is not None:
            before = b.state
            b.record(ok)
            if b.state != before and self.breakers.get(ep.instance_id) is b:
                self._refresh()
        return unreachable is not None and self.eject(ep, unreachable)


def _make(plugins: Factories, what: str, name: str, options: Mapping[str, Any]) -> Any:
    """A new balancer or breaker from a unit's raw options, structured as
    :func:`~hsu._kernel.config.model.check_units` does (the options came from
    the deployment, or from the Kernel API in ``hsu.connect``)."""
    from hsu._kernel.config.model import structure_options
    from hsu.errors import ConfigError

    if not name:  # unset: the default this process's plugins declare
        default = plugins.default(what)
        if default is None:
            raise HsuError(f"no {what} named, and no installed plugin declares a default {what}")
        name = default
    factory = plugins.balancer(name) if what == "balancer" else plugins.breaker(name)
    path = ("routing", f"{what}_options")
    try:
        structured = structure_options(factory, options, path, f"{what} {name!r}")
    except ConfigError as exc:
        raise HsuError("; ".join(exc.problems)) from None
    return factory.create(structured)


# -- the call loop ----------------------------------------------------------------


@attrs.frozen
class Caller:
    """What one routed caller (a channel, the gateway) brings to every call."""

    #: the error a call raises when no instance can take it
    no_instance: Callable[[Route], BaseException]
    #: the caller's own count of calls per instance (the kernel's, for drain
    #: and autoscaling), told as each attempt begins and ends
    began: Callable[[Endpoint], None] | None = None
    ended: Callable[[Endpoint], None] | None = None
    #: held around the route's bookkeeping, for a caller with many threads
    #: (a caller on one event loop keeps its own: never contended, and
    #: cheaper than a no-op written in Python)
    lock: AbstractContextManager[Any] = attrs.field(factory=threading.Lock)
    #: told of each retry: (method, the instance that failed, its status code)
    on_retry: Callable[[str, Endpoint, grpc.StatusCode], None] | None = None
    #: an UNAVAILABLE error with these details, raised like the caller's
    #: own (in place of a usage error of a channel that was closed);
    #: default: :func:`unavailable`
    unavailable: Callable[[str], BaseException] | None = None
    #: after an UNAVAILABLE try: is the endpoint's channel still connected?
    #: (None: unknown; then only grpc's own errors for a refused or lost
    #: connection, :data:`TRANSPORT_ERRORS`, eject it)
    connected: Callable[[Endpoint], bool | None] | None = None
    #: told of an endpoint just ejected (the caller could not reach it): the
    #: caller watches its channel and calls ``route.restore(endpoint)`` (under
    #: ``lock``) once it connects again (:func:`until_connected` does, for
    #: grpc.aio); without it, an ejection lasts :data:`EJECT_FOR` seconds
    watch: Callable[[Route, Endpoint], None] | None = None
    #: a blocking caller's wait for a change of the route: (route, the
    #: version seen, seconds at most); without it, :meth:`Tries.run` sleeps
    wait: Callable[[Route, int, float], None] | None = None
    #: for a unit with ``max_inflight``: each try takes a slot (the kernel's
    #: count, shared by every caller) before it is sent, and gives it back
    #: with ``release`` when it ends; ``acquire`` for :meth:`Tries.call_async`
    #: and :meth:`Tries.run_async`, ``acquire_sync`` for :meth:`Tries.run`
    acquire: Acquire | None = None
    acquire_sync: AcquireSync | None = None
    release: Callable[[Any], None] | None = None
    #: an error with a status code, raised like the caller's own (default:
    #: :func:`rpc_error`)
    error: Callable[[grpc.StatusCode, str], BaseException] | None = None
    #: told as each call (all its tries) ends: (grpc kind, method, the unit
    #: of the last try's instance or "", what the call raised or None, when
    #: it began on :func:`time.perf_counter`'s clock): ``CallMetrics.observe``
    observe: Callable[[str, str, str, BaseException | None, float], None] | None = None


def priority_of(metadata: Any) -> int:
    """The call's ``hsu-priority`` (0 without one); raises :class:`HsuError`
    for one that is not an integer."""
    for k, v in metadata or ():
        if k == PRIORITY_KEY:
            text = v if isinstance(v, str) else bytes(v).decode("latin-1")
            try:
                n = int(text.strip())
            except ValueError:
                raise HsuError(
                    f"metadata {PRIORITY_KEY}: {text[:40]!r} is not an integer"
                ) from None
            return max(PRIORITY_RANGE[0], min(PRIORITY_RANGE[1], n))
    return 0


def slot_reply(reply: Any) -> Endpoint:
    """The instance a ``Kernel.Slots`` reply grants; raises its error as the
    :class:`HsuError` the kernel raised."""
    if reply.code == 0:
        return endpoint_from_pb(reply.endpoint)
    code = grpc.StatusCode.UNAVAILABLE
    for c in grpc.StatusCode:
        if c.value[0] == reply.code:
            code = c
    cls: type[HsuError] = {
        grpc.StatusCode.RESOURCE_EXHAUSTED: QueueFull,
        grpc.StatusCode.DEADLINE_EXCEEDED: QueueTimeout,
        grpc.StatusCode.UNIMPLEMENTED: NoSuchUnit,
    }.get(code, HsuError)
    raise cls(reply.details)


def slot_error_code(exc: BaseException) -> grpc.StatusCode:
    """The status code of an error from taking a slot."""
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, QueueTimeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, NoSuchUnit):
        return grpc.StatusCode.UNIMPLEMENTED
    return grpc.StatusCode.UNAVAILABLE


def rpc_error(code: grpc.StatusCode, details: str) -> Exception:
    """An error with ``code``, raised like one from the network (grpc.aio's)."""
    error: Exception = grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details
    )
    return error


#: takes a slot for a try: (route, key, instance to avoid, priority, seconds
#: or None) -> (the instance, the grant to give back); raises QueueFull,
#: QueueTimeout, NoSuchUnit or another HsuError
Acquire = Callable[[Route, str | None, str, int, float | None], Awaitable[tuple[Endpoint, Any]]]
AcquireSync = Callable[[Route, str | None, str, int, float | None], tuple[Endpoint, Any]]

#: makes sure an instance is routable: (route, seconds left) -> the route to pick from
Ensure = Callable[[Route, float | None], Route]
AsyncEnsure = Callable[[Route, float | None], Awaitable[Route]]


class Tries:
    """One routed call's attempts: the call loop, written once.

    The steps (pick and begin, end with the outcome, decide a retry) are
    here; :meth:`call_async` (one reply), :meth:`run_async` (a stream of
    replies) and :meth:`run` (blocking) only step through them, awaiting or
    blocking on ``attempt(endpoint)``, one try's reply or replies (an RPC
    error it raises is the instance's outcome), on ``ensure``, which starts
    an instance when none is routable, and on a change of the route when
    every routable instance refuses the call (its breaker is open, or it is
    ejected): the call waits for one, within its deadline (without one, up
    to :data:`WAIT_WITHOUT_DEADLINE`). A try is retried on another instance
    when the instance could not take it (:data:`INSTANCE_FAILED`), no reply
    came, ``retries`` (the caller can send the request again), the deadline
    has not passed, the method is idempotent, ``replayable`` (for
    :meth:`run_async`: the caller kept the request stream) says yes and
    either the caller could not reach the instance (up to
    :data:`UNREACHABLE_TRIES` such tries) or :meth:`Route.may_retry` allows
    it; else the error goes to the caller.

    ``trace``: the call's :class:`~hsu.tracecontext.CallTrace` when it is
    traced and sampled (the kernel's gateway gives one): each pick, attempt
    and cold start is recorded there, and ``attempt(endpoint)`` sends the
    instance ``trace.metadata()``, the attempt's own ``traceparent``.
    """

    __slots__ = (
        "_breaker",
        "_caller",
        "_ep",
        "_give_up",
        "_grant",
        "_replayable",
        "_seen",
        "_t0",
        "_unreachable",
        "attempts",
        "deadline",
        "error",
        "exclude",
        "key",
        "kind",
        "method",
        "priority",
        "replied",
        "retries",
        "route",
        "trace",
        "unreachable",
    )

    def __init__(
        self,
        caller: Caller,
        route: Route,
        method: str,
        key: str | None,
        *,
        deadline: float | None,
        retries: bool,
        replayable: Callable[[], Awaitable[bool]] | None = None,
        priority: int = 0,
        kind: str = "unary_unary",
        trace: CallTrace | None = None,
    ):
        self._caller = caller
        self.trace = trace
        #: in the unit's queue, when it has ``max_inflight`` (higher first)
        self.priority = priority
        self._grant: Any = None
        #: grpc's kind of the method (``unary_unary``, ``stream_stream``...)
        self.kind = kind
        self._t0 = time.perf_counter() if caller.observe is not None else 0.0
        self.route = route
        self.method = method
        self.key = key
        #: on :func:`time.monotonic`'s clock
        self.deadline = deadline
        self.retries = retries
        self._replayable = replayable
        self.exclude = ""
        #: tries the instance failed, and tries that could not reach theirs
        self.attempts = 0
        self.unreachable = 0
        self.replied = False
        #: what the last try raised, as the caller gets it (an RPC error)
        self.error: BaseException | None = None
        self._ep: Endpoint | None = None
        self._breaker: CircuitBreaker | None = None
        self._unreachable = False
        self._seen = -1
        self._give_up: float | None = None

    def left(self) -> float | None:
        """Seconds to the call's deadline (``None``: it has none)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    async def call_async(
        self, attempt: Callable[[Endpoint], Awaitable[T]], ensure: AsyncEnsure
    ) -> T:
        """A call with one reply: the reply of the try that got through.

        The steps as in :meth:`__exit__`, spelled out: this is the path of
        most routed calls, and a context manager costs two calls more."""
        try:
            while True:
                if self.route.policy.max_inflight and self._caller.acquire is not None:
                    ep = await self._slot_async()
                else:
                    ep = self._pick() or await self._next_async(ensure)
                try:
                    reply = await attempt(ep)
                except BaseException as exc:
                    if self._failed(exc) and self._retry(exc):
                        continue
                    self._raise_error(exc)
                    raise
                self._succeeded(ep)
                self._ended(None)
                return reply
        except BaseException as exc:
            self._ended(exc)
            raise

    async def run_async(
        self, attempt: Callable[[Endpoint], AsyncIterable[T]], ensure: AsyncEnsure
    ) -> AsyncGenerator[T, None]:
        """A call's replies, from the try that got through."""
        try:
            while True:
                if self.route.policy.max_inflight and self._caller.acquire is not None:
                    ep = await self._slot_async()
                else:
                    ep = self._pick() or await self._next_async(ensure)
                async with self:
                    async for reply in attempt(ep):
                        self.replied = True
                        yield reply
                    self._ended(None)
                    return
        except BaseException as exc:
            self._ended(exc)
            raise

    def run(self, attempt: Callable[[Endpoint], Iterable[T]], ensure: Ensure) -> Iterator[T]:
        """The same, blocking: a unary call's one reply is a one-item iterable."""
        try:
            while True:
                if self.route.policy.max_inflight and self._caller.acquire_sync is not None:
                    ep = self._slot()
                else:
                    ep = self._pick() or self._next(ensure)
                with self:
                    for reply in attempt(ep):
                        self.replied = True
                        yield reply
                    self._ended(None)
                    return
        except BaseException as exc:
            self._ended(exc)
            raise

    def _ended(self, exc: BaseException | None) -> None:
        """The call ended (``exc``: what it raised): tell the caller's
        ``observe``, once."""
        trace = self.trace
        if trace is not None:
            trace.finish(code_of(exc))
        observe = self._caller.observe
        if observe is not None and self._t0:
            ep = self._ep
            observe(self.kind, self.method, ep.unit if ep is not None else "", exc, self._t0)
            self._t0 = 0.0

    # -- the steps ------------------------------------------------------------------

    def _pick(self) -> Endpoint | None:
        """The next try's endpoint, begun; ``None`` when no instance can take
        it now (the driver then starts one, or waits, and picks again)."""
        route = self.route
        caller = self._caller
        with caller.lock:
            ep = route.pick(self.key, self.exclude)
            if ep is None:
                self._seen = route.version
                return None
            self._breaker = route.begin(ep)
        if caller.began is not None:
            caller.began(ep)
        self._ep = ep
        self.replied = False
        if self.trace is not None:
            self.trace.picked(ep)
        return ep

    async def _slot_async(self) -> Endpoint:
        """A slot from the kernel (waiting in the unit's queue), begun."""
        acquire = self._caller.acquire
        assert acquire is not None
        try:
            ep, grant = await acquire(
                self.route, self.key, self.exclude, self.priority, self.left()
            )
        except HsuError as exc:
            raise self._slot_error(exc) from None
        return self._granted(ep, grant)

    def _slot(self) -> Endpoint:
        """The same, blocking."""
        acquire = self._caller.acquire_sync
        assert acquire is not None
        try:
            ep, grant = acquire(self.route, self.key, self.exclude, self.priority, self.left())
        except HsuError as exc:
            raise self._slot_error(exc) from None
        return self._granted(ep, grant)

    def _slot_error(self, exc: HsuError) -> BaseException:
        return (self._caller.error or rpc_error)(slot_error_code(exc), f"hsu: {exc}")

    def _granted(self, ep: Endpoint, grant: Any) -> Endpoint:
        route = self.route
        caller = self._caller
        with caller.lock:
            known = route.endpoints.get(ep.instance_id)
            if known is not None and known.address == ep.address:
                ep = known  # the caller's own (its channel, its breaker)
            self._breaker = route.begin(ep)
        self._grant = grant
        if caller.began is not None:
            caller.began(ep)
        self._ep = ep
        self.replied = False
        if self.trace is not None:
            self.trace.picked(ep)
        return ep

    def _give_back(self) -> None:
        grant = self._grant
        if grant is not None:
            self._grant = None
            release = self._caller.release
            if release is not None:
                release(grant)

    def _wait_for(self) -> float:
        """How long to wait for the route to change before picking again;
        raises the caller's error once the call's time is up."""
        if self._give_up is None:
            self._give_up = (
                self.deadline
                if self.deadline is not None
                else time.monotonic() + WAIT_WITHOUT_DEADLINE
            )
        left = self._give_up - time.monotonic()
        if left <= 0:
            raise self._caller.no_instance(self.route)
        with self._caller.lock:
            return min(left, self.route.wake_in())

    async def _next_async(self, ensure: AsyncEnsure) -> Endpoint:
        """No instance could take the try: start one when none is routable
        (``ensure``), else wait for one that can take it; then pick again."""
        while True:
            route = self.route
            if route.routable:
                wait = self._wait_for()
                if route.version == self._seen:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(route.changed(), wait)
            else:
                if self._give_up is not None:
                    self._wait_for()  # raises once the time is up
                began = 0 if self.trace is None else time.time_ns()
                self.route = await ensure(route, self.left())
                if began:
                    self._cold_start(began)
            ep = self._pick()
            if ep is not None:
                return ep

    def _next(self, ensure: Ensure) -> Endpoint:
        """The same, blocking."""
        while True:
            route = self.route
            if route.routable:
                wait = self._wait_for()
                if self._caller.wait is not None:
                    self._caller.wait(route, self._seen, wait)
                else:
                    time.sleep(wait)
            else:
                if self._give_up is not None:
                    self._wait_for()
                began = 0 if self.trace is None else time.time_ns()
                self.route = ensure(route, self.left())
                if began:
                    self._cold_start(began)
            ep = self._pick()
            if ep is not None:
                return ep

    def _cold_start(self, began: int) -> None:
        """The call waited since ``began`` for an instance started for it."""
        assert self.trace is not None
        route = self.route
        attributes = {"hsu.unit": route.policy.unit, "hsu.interface": route.interface}
        self.trace.add(COLD_START, began, time.time_ns(), attributes)

    def __enter__(self) -> None:
        pass

    async def __aenter__(self) -> None:
        pass

    def __exit__(self, _t: object, exc: BaseException | None, _tb: object) -> bool:
        if self._failed(exc) and self._retry(exc):
            return True
        self._raise_error(exc)
        return False

    async def __aexit__(self, _t: object, exc: BaseException | None, _tb: object) -> bool:
        if (
            self._failed(exc)
            and (self._replayable is None or await self._replayable())
            and self._retry(exc)
        ):
            return True
        self._raise_error(exc)
        return False

    def _raise_error(self, exc: BaseException | None) -> None:
        """Raise the error the caller gets in place of ``exc``, if not ``exc``."""
        error = self.error
        if error is not None and error is not exc:
            raise error from exc

    def _succeeded(self, ep: Endpoint) -> None:
        if self.trace is not None:
            self.trace.ended("OK")
        caller = self._caller
        with caller.lock:
            self.route.end(ep, True, self._breaker)
        if self._grant is not None:
            self._give_back()
        if caller.ended is not None:
            caller.ended(ep)

    def _failed(self, exc: BaseException | None) -> bool:
        """End the try with its outcome; True when it may be tried again.

        A channel that was closed under the try (a usage error) is an
        UNAVAILABLE the caller could not reach; it gets that, as an RPC error
        (:attr:`error`)."""
        ep = self._ep
        assert ep is not None
        caller = self._caller
        self.error = exc
        rpc = isinstance(exc, grpc.RpcError)
        if rpc:
            code = exc.code()  # type: ignore[union-attr]
        elif _closed_channel(exc):
            code = grpc.StatusCode.UNAVAILABLE
            self.error = (caller.unavailable or unavailable)(
                f"hsu: the channel to {ep.address} was closed"
            )
        else:
            code = None
        failed = code in INSTANCE_FAILED
        unreachable: float | None = None  # until when to eject the instance
        if failed:
            # the instance's own UNAVAILABLE comes over a connected channel
            reached = (
                rpc
                and not _lost_connection(exc)
                and (caller.connected is None or caller.connected(ep) is not False)
            )
            if not reached:
                unreachable = math.inf if caller.watch is not None else time.monotonic() + EJECT_FOR
        if self.trace is not None:
            name = code.name if code is not None else code_of(exc)
            self.trace.ended(name, unreachable is not None)
        with caller.lock:
            ejected = self.route.end(ep, not failed, self._breaker, unreachable)
        if self._grant is not None:
            self._give_back()
        if caller.ended is not None:
            caller.ended(ep)
        if ejected and caller.watch is not None:
            caller.watch(self.route, ep)
        if code is None:
            return False
        self._unreachable = unreachable is not None
        if self._unreachable:
            self.unreachable += 1
        else:
            self.attempts += 1
        return (
            failed
            and not self.replied
            and self.retries
            and (self.deadline is None or time.monotonic() < self.deadline)
            and self.route.policy.is_idempotent(self.method)
        )

    def _retry(self, exc: BaseException | None) -> bool:
        """Take a retry (from the budget, unless the instance could not be
        reached); the next try goes elsewhere."""
        if self._unreachable:
            if self.unreachable > UNREACHABLE_TRIES:
                return False
        else:
            with self._caller.lock:
                if not self.route.may_retry(self.method, self.attempts):
                    return False
        ep = self._ep
        assert ep is not None
        self.exclude = ep.instance_id
        if self.trace is not None:
            self.trace.picking()
        if self._caller.on_retry is not None:
            code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
            self._caller.on_retry(self.method, ep, code)
        return True


def _lost_connection(exc: Any) -> bool:
    """``exc`` (an RPC error) is grpc's for a connection refused or lost."""
    details = getattr(exc, "details", None)
    text = (details() or "").lower() if callable(details) else ""
    return any(t in text for t in TRANSPORT_ERRORS)


def _closed_channel(exc: BaseException | None) -> bool:
    """``exc`` is what grpc raises for a call on a channel that was closed."""
    if isinstance(exc, grpc.aio.UsageError):
        return True
    return isinstance(exc, ValueError) and "closed channel" in str(exc)


def connected(channel: Any) -> bool | None:
    """Is ``channel`` (grpc.aio's, or grpc's blocking one) connected? None
    when it cannot tell; False for no channel (the caller closed the one to a
    gone address). A try that failed with UNAVAILABLE on a connected channel
    was the instance's answer; on one that is not, the instance could not be
    reached (refused, reset, gone)."""
    if channel is None:
        return False
    get_state = getattr(channel, "get_state", None)  # grpc.aio.Channel
    if get_state is not None:
        return bool(get_state(False) is grpc.ChannelConnectivity.READY)
    # a blocking grpc.Channel: its core channel tells (grpc offers no
    # public call that does without a thread of its own)
    check = getattr(getattr(channel, "_channel", None), "check_connectivity_state", None)
    if check is None:
        return None
    return bool(check(False) == grpc.ChannelConnectivity.READY.value[0])


async def until_connected(route: Route, ep: Endpoint, channel: Callable[[], Any]) -> None:
    """Watch an ejected endpoint's channel (``channel()``: the caller's
    current one for its address, None once it has none) and restore the
    endpoint once it connects; stop when the route no longer ejects it."""
    while route.is_ejected(ep):
        ch = channel()
        if ch is None:
            return
        state = ch.get_state(True)
        if state is grpc.ChannelConnectivity.READY:
            route.restore(ep)
            return
        if state is grpc.ChannelConnectivity.SHUTDOWN:
            await asyncio.sleep(RECHECK)  # closed: the caller's next channel, or none
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ch.wait_for_state_change(state), 1.0)


class Channels(Protocol):
    """A routed channel's pool: one grpc channel per instance address."""

    def channel(self, address: str) -> Any:
        """The address's channel, opened if it has none (a closed one is
        never handed out: an address the route forgot gets a new one)."""
        ...

    def channel_of(self, address: str) -> Any:
        """The address's channel if it has one, else None."""
        ...


class RoutedMethod:
    """One method of a routed channel, as a generated stub keeps it (the
    asyncio and the blocking channel's multicallables): a :class:`Tries` per
    call, and a multicallable per instance."""

    def __init__(
        self, caller: Caller, pool: Channels, method: str, ser: Any, de: Any, kind: str
    ) -> None:
        self._caller = caller
        self._pool = pool
        self._method = method
        self._interface = method.lstrip("/").partition("/")[0]
        self._ser = ser
        self._de = de
        self._kind = kind
        #: the per-instance multicallable and the channel it is on, by address
        self._calls: dict[str, tuple[Any, Any]] = {}
        #: signs each try with the cluster key (``hsu-peer``, :mod:`hsu.peer`)
        self._signer: PeerSigner | None = getattr(pool, "signer", None)

    def _signed(self, ep: Endpoint, metadata: Any) -> Any:
        """A try's metadata: the caller's, and the cluster's proof for ``ep``."""
        if self._signer is None:
            return metadata
        return self._signer.add(metadata, ep.address, self._method)

    def _tries(self, route: Route, deadline: float | None, metadata: Any, key: str | None) -> Tries:
        """A call's tries; its key is ``key``, else the policy's hash key's
        value in ``metadata``."""
        if metadata and key is None:
            hk = route.policy.hash_key
            for k, v in metadata:
                if k == hk:
                    key = v if isinstance(v, str) else bytes(v).decode("latin-1")
                    break
        retries = self._kind in RETRIED
        priority = 0
        if metadata and route.policy.max_inflight:
            try:
                priority = priority_of(metadata)
            except HsuError as exc:
                error = self._caller.error or rpc_error
                raise error(grpc.StatusCode.INVALID_ARGUMENT, f"hsu: {exc}") from None
        return Tries(
            self._caller,
            route,
            self._method,
            key,
            deadline=deadline,
            retries=retries,
            priority=priority,
            kind=self._kind,
        )

    def cached(
        self, cache: Any, route: Route, request: Any, metadata: Any
    ) -> tuple[str, Any] | None:
        """The call's key in ``cache`` (a :class:`hsu.cache.MemoryCache`) and
        the cached reply (None: a miss), when the unit caches this method
        (``routing.cache``); None when it does not, or there is no cache."""
        if cache is None or route.policy.cache_ttl_for(self._method) is None:
            return None
        from hsu.cache import reply_key

        try:
            raw = self._ser(request) if self._ser is not None else bytes(request)
        except Exception:  # the call itself reports a request it cannot send
            return None
        ckey = reply_key(self._method, raw, metadata, route.policy.cache_key_metadata)
        hit = cache.get_now(ckey)
        if hit is None:
            return ckey, None
        return ckey, self._de(hit.value) if self._de is not None else hit.value

    def keep(self, cache: Any, ckey: str, reply: Any, route: Route) -> None:
        """Keep an OK reply (as its bytes) for the unit's ``cache_ttl``."""
        ttl = route.policy.cache_ttl_for(self._method)
        try:
            raw = reply if isinstance(reply, bytes) else reply.SerializeToString()
        except Exception:  # a reply that is no protobuf message is not kept
            return
        if ttl is not None and cache is not None:
            cache.set_now(ckey, raw, ttl=ttl)

    def _callable(self, address: str) -> Any:
        channel = self._pool.channel(address)
        made = self._calls.get(address)
        if made is None or made[0] is not channel:  # new, or its channel was closed
            if made is None and len(self._calls) >= 16:
                # addresses come and go: keep only the ones on a live channel
                live = self._pool.channel_of
                self._calls = {a: m for a, m in self._calls.items() if live(a) is m[0]}
            factory = getattr(channel, self._kind)
            made = self._calls[address] = (channel, factory(self._method, self._ser, self._de))
        return made[1]


def cannot_take(route: Route) -> str:
    """Why no instance took a call (for the client's UNAVAILABLE)."""
    listed = [e for e in route.endpoints.values() if e.routable]
    if not listed:
        return f"hsu: no instance serving {route.interface!r} can take the call"
    ejected = sum(route.is_ejected(e) for e in listed)
    return (
        f"hsu: no instance serving {route.interface!r} could take the call in time:"
        f" of {len(listed)} listed, {ejected} could not be reached and the rest's"
        " circuit breakers were open"
    )


def unavailable(details: str) -> Exception:
    """An UNAVAILABLE error, raised like one from the network."""
    error: Exception = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details
    )
    return error
