"""A caller's routing: per interface a :class:`Route`, per call :class:`Tries`.

- :class:`Route` is what any caller keeps per interface: the routable
  endpoints, a balancer (a plugin), one circuit breaker (a plugin) per
  instance, the calls in flight per instance and a retry budget.
- :class:`Tries` is the one call loop every routed caller runs: pick an
  instance (starting one on demand when none is routable), count the call,
  run the attempt, end it with its outcome and, when the instance failed an
  idempotent call before any reply, try another one within the call's
  deadline and the retry budget. ``hsu.connect`` (:mod:`hsu.client.aio`),
  ``hsu.connect_sync`` (:mod:`hsu.client.sync`) and the kernel's gateway all
  step through it: the decisions are made here, once; the waiting (awaiting
  or blocking) is each caller's.

The kernel's side (its registry writer, drain, autoscaling) is private to it.
See ``docs/routing.md``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import threading
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
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

from hsu.errors import HsuError
from hsu.ports import SERVING, Balancer, CircuitBreaker, Endpoint, Factory

T = TypeVar("T")

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
#: the kinds of call whose request a retry can send again (a request stream
#: is gone once sent, unless the caller kept it: see ``Tries``'s ``replayable``)
RETRIED = frozenset({"unary_unary", "unary_stream"})


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
            balancer=msg.balancer,
            balancer_options=json.loads(msg.balancer_options_json or "{}"),
            breaker=msg.breaker,
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
    """One caller's view of one interface: pick, count, break, budget.

    Single-threaded: use it from one event loop (or under one lock).
    """

    def __init__(self, interface: str, policy: Policy, plugins: Factories):
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


#: makes sure an instance is routable: (route, seconds left) -> the route to pick from
Ensure = Callable[[Route, float | None], Route]
AsyncEnsure = Callable[[Route, float | None], Awaitable[Route]]


class Tries:
    """One routed call's attempts: the call loop, written once.

    The steps (pick and begin, end with the outcome, decide a retry) are
    here; :meth:`call_async` (one reply), :meth:`run_async` (a stream of
    replies) and :meth:`run` (blocking) only step through them, awaiting or
    blocking on ``attempt(endpoint)``, one try's reply or replies (an RPC
    error it raises is the instance's outcome), and on ``ensure``, which
    starts an instance when none is routable. A try is retried on another
    instance when the instance could not take it (:data:`INSTANCE_FAILED`),
    no reply came, ``retries`` (the caller can send the request again), the
    deadline has not passed, the method is idempotent, ``replayable`` (for
    :meth:`run_async`: the caller kept the request stream) says yes and
    :meth:`Route.may_retry` allows it; else the error goes to the caller.
    """

    __slots__ = (
        "_caller",
        "_ep",
        "_replayable",
        "attempts",
        "deadline",
        "exclude",
        "key",
        "method",
        "replied",
        "retries",
        "route",
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
    ):
        self._caller = caller
        self.route = route
        self.method = method
        self.key = key
        #: on :func:`time.monotonic`'s clock
        self.deadline = deadline
        self.retries = retries
        self._replayable = replayable
        self.exclude = ""
        self.attempts = 0
        self.replied = False
        self._ep: Endpoint | None = None

    def left(self) -> float | None:
        """Seconds to the call's deadline (``None``: it has none)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    async def call_async(
        self, attempt: Callable[[Endpoint], Awaitable[T]], ensure: AsyncEnsure
    ) -> T:
        """A call with one reply: the reply of the try that got through.

        The steps as in :meth:`__exit__`, spelled out: this is the path of
        most routed calls, and a context manager costs two calls more."""
        while True:
            ep = self._pick() or self._pick_after(await ensure(self.route, self.left()))
            try:
                reply = await attempt(ep)
            except BaseException as exc:
                if self._failed(exc) and self._retry(exc):
                    continue
                raise
            self._succeeded(ep)
            return reply

    async def run_async(
        self, attempt: Callable[[Endpoint], AsyncIterable[T]], ensure: AsyncEnsure
    ) -> AsyncIterator[T]:
        """A call's replies, from the try that got through."""
        while True:
            ep = self._pick() or self._pick_after(await ensure(self.route, self.left()))
            async with self:
                async for reply in attempt(ep):
                    self.replied = True
                    yield reply
                return

    def run(self, attempt: Callable[[Endpoint], Iterable[T]], ensure: Ensure) -> Iterator[T]:
        """The same, blocking: a unary call's one reply is a one-item iterable."""
        while True:
            ep = self._pick() or self._pick_after(ensure(self.route, self.left()))
            with self:
                for reply in attempt(ep):
                    self.replied = True
                    yield reply
                return

    # -- the steps ------------------------------------------------------------------

    def _pick(self, ensured: bool = False) -> Endpoint | None:
        """The next try's endpoint, begun; ``None`` when none is routable
        (the driver then starts one and calls :meth:`_pick_after`)."""
        route = self.route
        caller = self._caller
        with caller.lock:
            ep = route.pick(self.key, "" if ensured else self.exclude)
            if ep is None:
                if ensured or route.routable:  # else every breaker refuses
                    raise caller.no_instance(route)
                return None
            route.begin(ep)
        if caller.began is not None:
            caller.began(ep)
        self._ep = ep
        self.replied = False
        return ep

    def _pick_after(self, route: Route) -> Endpoint:
        """The same, from the route ``ensure`` gave (any instance will do)."""
        self.route = route
        ep = self._pick(ensured=True)
        assert ep is not None
        return ep

    def __enter__(self) -> None:
        pass

    async def __aenter__(self) -> None:
        pass

    def __exit__(self, _t: object, exc: BaseException | None, _tb: object) -> bool:
        return self._failed(exc) and self._retry(exc)

    async def __aexit__(self, _t: object, exc: BaseException | None, _tb: object) -> bool:
        return (
            self._failed(exc)
            and (self._replayable is None or await self._replayable())
            and self._retry(exc)
        )

    def _succeeded(self, ep: Endpoint) -> None:
        caller = self._caller
        with caller.lock:
            self.route.end(ep, True)
        if caller.ended is not None:
            caller.ended(ep)

    def _failed(self, exc: BaseException | None) -> bool:
        """End the try with its outcome; True when it may be tried again."""
        ep = self._ep
        assert ep is not None
        caller = self._caller
        rpc = exc is not None and isinstance(exc, grpc.RpcError)
        failed = rpc and exc.code() in INSTANCE_FAILED  # type: ignore[union-attr]
        with caller.lock:
            self.route.end(ep, not failed)
        if caller.ended is not None:
            caller.ended(ep)
        if not rpc:
            return False
        self.attempts += 1
        return (
            failed
            and not self.replied
            and self.retries
            and (self.deadline is None or time.monotonic() < self.deadline)
            and self.route.policy.is_idempotent(self.method)
        )

    def _retry(self, exc: BaseException | None) -> bool:
        """Take a retry from the budget; the next try goes elsewhere."""
        with self._caller.lock:
            if not self.route.may_retry(self.method, self.attempts):
                return False
        ep = self._ep
        assert ep is not None and isinstance(exc, grpc.RpcError)
        self.exclude = ep.instance_id
        if self._caller.on_retry is not None:
            self._caller.on_retry(self.method, ep, exc.code())
        return True


class Channels(Protocol):
    """A routed channel's pool: one grpc channel per instance address."""

    def channel(self, address: str) -> Any: ...


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
        return Tries(self._caller, route, self._method, key, deadline=deadline, retries=retries)

    def _callable(self, address: str) -> Any:
        channel = self._pool.channel(address)
        made = self._calls.get(address)
        if made is None or made[0] is not channel:  # new, or its channel was closed
            factory = getattr(channel, self._kind)
            made = self._calls[address] = (channel, factory(self._method, self._ser, self._de))
        return made[1]


def cannot_take(route: Route) -> str:
    """Why no instance took a call (for the client's UNAVAILABLE)."""
    return f"hsu: no instance serving {route.interface!r} can take the call" + (
        " (every one's circuit breaker is open)" if route.routable else ""
    )


def unavailable(details: str) -> Exception:
    """An UNAVAILABLE error, raised like one from the network."""
    error: Exception = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details
    )
    return error
