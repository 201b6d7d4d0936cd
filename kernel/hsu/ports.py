"""The ports the kernel defines; plugins provide the adapters.

Each port is a typed Protocol. A plugin registers an adapter through the
matching registration hook (see :mod:`hsu.hookspecs`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs


@attrs.frozen
class LaunchSpec:
    """Everything a launcher needs to start one instance."""

    unit: str
    instance_id: str
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str | None = None
    #: file descriptors for the child's stdout and stderr (None: the launcher's
    #: choice); the kernel passes its per-instance log files
    stdout: int | None = None
    stderr: int | None = None
    #: POSIX rlimits the process starts with (set by util-linux's prlimit, which then
    #: execs the command), e.g. ``{"nofile": 1024}``
    rlimits: Mapping[str, int] = attrs.field(factory=dict)
    #: SIGKILL the child when the kernel dies (else it may be re-attached)
    die_with_kernel: bool = False


@runtime_checkable
class ProcessHandle(Protocol):
    """A started instance's process, as its launcher sees it.

    A handle may also offer ``exited() -> asyncio.Future[int]`` (as
    :class:`hsu.process.PidfdHandle` does): the supervisor then waits on that
    future instead of a task running :meth:`wait`, one task less per instance.
    """

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None:
        """The exit status once it exited (negative: killed by that signal)."""
        ...

    async def wait(self) -> int:
        """Wait for the process to exit and return its status. No zombie is left."""
        ...

    def signal(self, signum: int) -> None:
        """Send a signal to the process and everything it started.

        Does nothing once the process has exited.
        """
        ...


@runtime_checkable
class Launcher(Protocol):
    """Starts instances. Output handling is the launcher's: the subprocess
    launcher sends each line to the kernel's log, bound to unit and instance."""

    async def launch(self, spec: LaunchSpec) -> ProcessHandle:
        """Start the process, or raise :class:`hsu.errors.LaunchError` saying why."""
        ...

    def attach(self, pid: int) -> ProcessHandle:
        """A handle on a process that is already running (started by a kernel
        that ran before this one, or by someone else), or raise
        :class:`hsu.errors.LaunchError` if it is gone."""
        ...


@attrs.frozen
class ProbeTarget:
    """The instance one probe checks."""

    unit: str
    instance_id: str
    #: 0 when the process is not known (an HSU that only registered)
    pid: int
    #: the HSU's gRPC address ("" before it registered, or for a plain process)
    address: str
    #: the unit's ``health.options``, already accepted by ``check_options``
    options: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ProbeResult:
    ok: bool
    #: why it failed (or what it saw), for logs and events
    detail: str = ""


@runtime_checkable
class Probe(Protocol):
    """A health probe: grpc.health.v1, Core.Ping, tcp, http, exec, process, ...

    One probe object serves every unit that names it; it may cache per
    address (a channel, say) and drops the cache in :meth:`forget`.
    """

    def check_options(self, options: Mapping[str, Any]) -> list[str]:
        """Problems with a unit's ``health.options``, each ``"key: what is wrong"``.

        Called when the deployment is loaded; an empty list accepts them.
        """
        ...

    async def check(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        """Probe once. Must return within ``timeout`` seconds and never raise
        for an unhealthy instance: that is ``ProbeResult(False, why)``."""
        ...

    def forget(self, target: ProbeTarget) -> None:
        """The instance is gone: drop anything cached for it."""
        ...


# -- routing ------------------------------------------------------------------
#
# A caller never names an instance: it names an interface. The registry (a
# plugin) knows which instances serve it; a balancer (a plugin) picks one per
# call; a circuit breaker (a plugin) per instance keeps calls away from one
# that keeps failing. See docs/routing.md.

#: Endpoint states. Only ``SERVING`` endpoints are picked.
SERVING = "serving"
#: about to stop: finishes the calls it has, takes no new ones
DRAINING = "draining"
#: a health probe failed; kept listed so it can come back
UNHEALTHY = "unhealthy"


@attrs.frozen
class Endpoint:
    """One instance, as the registry lists it."""

    instance_id: str
    unit: str
    #: where its gRPC server listens: ``host:port`` or ``unix:PATH``
    address: str
    #: fully qualified gRPC service names it serves, e.g. ``hsu.echo.v1.Echo``
    interfaces: tuple[str, ...]
    state: str = SERVING
    #: relative share of calls for weighted strategies (>= 1)
    weight: int = 1
    metadata: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def routable(self) -> bool:
        return self.state == SERVING


@attrs.frozen
class RegistryEvent:
    """One change in the registry."""

    #: ``"put"`` (added or changed) or ``"delete"`` (removed or expired)
    kind: str
    endpoint: Endpoint
    #: the registry's revision after the change; revisions only grow
    revision: int


class RegistryCompacted(Exception):
    """A watcher asked for changes older than the registry still keeps.

    The watcher takes a fresh :meth:`Registry.snapshot` and watches from there.
    """


@runtime_checkable
class Registry(Protocol):
    """Where instances are registered and looked up by interface.

    The shape is etcd's, so an etcd plugin is a thin adapter: a TTL is a lease,
    :meth:`keepalive` refreshes it, :meth:`snapshot` plus :meth:`watch` is
    list-then-watch from a revision. The default plugin (``memory``) keeps it
    all in the kernel's process.
    """

    async def put(self, endpoint: Endpoint, ttl: float | None = None) -> None:
        """Add the endpoint, or replace the one with its ``instance_id``.

        With ``ttl`` (seconds) it is deleted unless :meth:`keepalive` or
        another ``put`` comes within ``ttl`` seconds; without, it stays until
        :meth:`delete`.
        """
        ...

    async def keepalive(self, instance_id: str) -> bool:
        """Restart the endpoint's TTL; ``False`` when it is no longer there."""
        ...

    async def delete(self, instance_id: str) -> bool:
        """Remove the endpoint; ``False`` when it was not there."""
        ...

    async def lookup(self, interface: str) -> list[Endpoint]:
        """Every endpoint serving ``interface``, in any state, in a stable order."""
        ...

    async def snapshot(self) -> tuple[list[Endpoint], int]:
        """Every endpoint, and the revision they are as of."""
        ...

    def watch(self, after: int) -> AsyncIterator[RegistryEvent]:
        """The changes after revision ``after``, in order, as they happen,
        until the caller stops iterating. Raises :class:`RegistryCompacted`
        when ``after`` is older than the registry keeps."""
        ...

    async def close(self) -> None:
        """Release what the registry holds (connections, tasks). Idempotent."""
        ...


@runtime_checkable
class Balancer(Protocol):
    """Picks the instance for each call, among the routable ones.

    One balancer serves one interface in one caller, from one event loop or
    thread at a time: it needs no lock. :meth:`pick` is on every call's path
    and must be cheap (no I/O, no allocation it can avoid).
    """

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        """The endpoints to pick from changed; all are routable, none repeated."""
        ...

    def pick(self, inflight: Mapping[str, int], key: str | None = None) -> Endpoint | None:
        """The endpoint for the next call, or ``None`` when there is none.

        :param inflight: calls this caller has in flight, by ``instance_id``
            (absent means 0), for strategies that weigh load.
        :param key: the call's routing key, for strategies that hash it;
            ``None`` when the call has none.
        """
        ...


@runtime_checkable
class CircuitBreaker(Protocol):
    """Keeps calls away from one instance while it keeps failing.

    One breaker per instance per caller. ``closed``: calls go through.
    ``open``: none do, until a cooldown passes. ``half_open``: a few trial
    calls go through; their outcome closes or reopens it.
    """

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (as of now)."""
        ...

    def allow(self) -> bool:
        """May a call go to this instance now? A ``True`` in ``half_open``
        takes one of the trial slots, and must be followed by :meth:`record`."""
        ...

    def record(self, ok: bool) -> None:
        """The outcome of a call :meth:`allow` let through."""
        ...


@runtime_checkable
class Factory(Protocol):
    """Makes a balancer or a breaker from a unit's options.

    Registered by name (``hsu_register_balancers``, ``hsu_register_breakers``);
    a unit names one and passes it ``options``.
    """

    def check_options(self, options: Mapping[str, Any]) -> list[str]:
        """Problems with the options, each ``"key: what is wrong"``; checked
        when the deployment is loaded. An empty list accepts them."""
        ...

    def create(self, options: Mapping[str, Any]) -> Any:
        """A new balancer (or breaker) configured by accepted ``options``."""
        ...
