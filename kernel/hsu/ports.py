"""Every type a plugin meets: the ports the kernel defines, and what it hands over.

Each port is a typed Protocol; a plugin registers an adapter through the
matching registration hook (see :mod:`hsu.hookspecs`). :class:`KernelAPI` is
all a plugin receives of the kernel: hooks and plugins depend on it, never on
the concrete class, which stays private (``hsu._kernel``).
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import attrs

if TYPE_CHECKING:
    from hsu._kernel.config.model import Deployment, UnitSpec
    from hsu.client.aio import RoutedChannel
    from hsu.client.route import Route
    from hsu.metrics import CallMetrics
    from hsu.metrics import Registry as MetricsRegistry
    from hsu.peer import PeerSigner
    from hsu.tracecontext import SpanContext

__all__ = [
    "DRAINING",
    "LEASED",
    "SERVING",
    "UNHEALTHY",
    "AuthSettings",
    "Authenticator",
    "Authorizer",
    "Balancer",
    "Cache",
    "CacheStats",
    "Cached",
    "CallInfo",
    "CallObserver",
    "CallSpan",
    "Changes",
    "CircuitBreaker",
    "Cluster",
    "ConfigSource",
    "DataPlane",
    "Decision",
    "Deployment",
    "Endpoint",
    "Event",
    "Exporter",
    "Factory",
    "Identity",
    "InstanceView",
    "KernelAPI",
    "KernelRoutes",
    "KeyValue",
    "LaunchSpec",
    "Launcher",
    "Layer",
    "Node",
    "Origin",
    "PathT",
    "PeerCredentials",
    "Placement",
    "Probe",
    "ProbeResult",
    "ProbeTarget",
    "ProcessHandle",
    "Register",
    "Registry",
    "RegistryCompacted",
    "RegistryEvent",
    "RoutedCall",
    "RpcHandler",
    "SourceContext",
    "Storage",
    "StorageCompacted",
    "StorageEvent",
    "StorageSettings",
    "UnitSpec",
    "Usage",
    "Watcher",
]

T_contra = TypeVar("T_contra", contravariant=True)

#: the deployment's data classes, frozen attrs classes built by the kernel's
#: config loader; imported on first use so that ``hsu.ports`` stays light
_LAZY = {"Deployment", "UnitSpec"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from hsu._kernel.config import model

        return getattr(model, name)
    raise AttributeError(f"module 'hsu.ports' has no attribute {name!r}")


# -- configuration ----------------------------------------------------------

#: a path into the configuration: ``("units", "echo", "stop_grace")``
PathT = tuple[str | int, ...]


@attrs.frozen
class Origin:
    """Where a value came from: ``deployment.yaml:14``, ``env HSU_X__Y``, ``--set a.b=1``."""

    source: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source


@attrs.define
class Layer:
    """Data from one source, with an :class:`Origin` for each path it sets
    (a dict, or :class:`hsu.config.DeferredOrigins`, worked out when first
    asked for: what :func:`hsu.config.read_file` and ``read_document`` give)."""

    data: dict[str, Any] = attrs.field(factory=dict)
    origins: MutableMapping[PathT, Origin] = attrs.field(factory=dict)


@attrs.frozen
class SourceContext:
    """What the user gave on the command line and in the environment."""

    files: tuple[Path, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict)
    overrides: tuple[str, ...] = ()


@runtime_checkable
class ConfigSource(Protocol):
    """A source of configuration (files, the environment, ``--set``, a store).

    A source says which parts of the :class:`SourceContext` it reads with a
    class attribute such as ``reads = ("files",)`` (``files``, ``env``,
    ``overrides``): given files or ``--set`` overrides that no enabled source
    reads are an error, not an empty deployment.
    """

    #: higher wins; file 10, environment 20, overrides 30
    priority: int

    # Optional: a ``version`` attribute (str or None), what the source last
    # loaded (hsu-plugin-etcd: ``"etcd revision 42"``); a reload's event
    # names it, so a change can be traced to the store's revision.

    def load(self, ctx: SourceContext) -> list[Layer]:
        """Read the source; raise :class:`ConfigError` naming what and where."""
        ...

    def watch(self, ctx: SourceContext, on_change: Callable[[], None]) -> Awaitable[None] | None:
        """Return an awaitable that calls ``on_change`` whenever the source
        changes, running until cancelled; or None if it cannot change."""
        ...


# -- registration ------------------------------------------------------------


class Register(Protocol[T_contra]):
    """The ``register`` callback a registration hook receives.

    ``register(name, obj)`` adds ``obj`` under ``name``; a name another plugin
    registered is an error naming both. ``default=True`` declares it the
    default of its kind, used by every unit that names none (the kernel itself
    names no plugin); two plugins declaring a default of one kind is an error
    naming both. ``no:PLUGIN`` then removes the default with the plugin, and a
    deployment that needs one is told which unit needs what.
    """

    def __call__(self, name: str, obj: T_contra, /, *, default: bool = False) -> None: ...


# -- what the kernel hands to plugins ---------------------------------------


@attrs.frozen
class Event:
    """One event on the kernel's bus: a transition of the kernel or an
    instance, or what the kernel, a plugin or an HSU published on a topic; as
    delivered to plugins (:meth:`KernelAPI.subscribe`,
    :func:`hsu.hookspecs.hsu_instance_event`) and ``Kernel.WatchEvents``
    (docs/tracing.md, "Events")."""

    seq: int
    #: who published: "instance", "kernel", "unit", "reload" (the kernel's
    #: transitions and checks), "scale" (an autoscaling decision),
    #: "queue" (a unit's queue depth), "worker", "service" (the kernel's
    #: topics), "plugin" or "hsu"
    kind: str
    unit: str = ""
    instance_id: str = ""
    from_state: str = ""
    to_state: str = ""
    reason: str = ""
    pid: int = 0
    at: float = attrs.field(factory=time.time)
    #: dot-separated words: "instance.ready", "worker.started", "config.changed"
    topic: str = ""
    #: what the publisher attached
    data: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Changes:
    """What a reload changed, by unit name."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    #: of ``changed``: the ones whose processes are replaced
    restarted: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.sections)

    def summary(self) -> str:
        parts = [
            f"{what} {', '.join(names)}"
            for what, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
                ("restarted", self.restarted),
                ("sections", self.sections),
            )
            if names
        ]
        return "; ".join(parts) or "nothing changed"


@runtime_checkable
class InstanceView(Protocol):
    """One instance, as plugins see it: read it, never change it."""

    @property
    def instance_id(self) -> str: ...

    @property
    def unit(self) -> str: ...

    @property
    def managed(self) -> bool:
        """Started and supervised by this kernel (else it only registered)."""
        ...

    @property
    def state(self) -> str:
        """``stopped``, ``starting``, ``ready``, ``stopping``, ``backoff`` or ``fatal``."""
        ...

    @property
    def pid(self) -> int:
        """0 while not known."""
        ...

    @property
    def address(self) -> str:
        """Where its gRPC server listens ("" before it registered)."""
        ...

    @property
    def interfaces(self) -> tuple[str, ...]: ...

    @property
    def version(self) -> str: ...

    @property
    def metadata(self) -> Mapping[str, str]: ...

    @property
    def restarts(self) -> int: ...

    @property
    def last_exit(self) -> str: ...

    @property
    def last_used(self) -> float:
        """When a call or a slot last went to it (``time.monotonic()``)."""
        ...

    @property
    def leased(self) -> bool:
        """Held by a lease (``hsu.lease``): busy however long no call comes."""
        ...


@attrs.frozen
class Usage:
    """One sample of an instance's process tree (:meth:`KernelAPI.usage`)."""

    pid: int
    #: resident bytes of the process and its descendants (shared pages counted per process)
    rss: int
    #: percent of one core since the previous sample, process and descendants
    cpu_percent: float
    #: file descriptors of the main process
    open_files: int
    #: threads of the process and its descendants
    threads: int
    #: live (non-zombie) descendant processes
    children: int


class Watcher(Protocol):
    """Watches one unit's instances while the unit runs and acts on them
    through the kernel (the built-in ``idle`` and ``limits`` plugins:
    ``idle_timeout`` and a unit's ``limits``), registered with
    :func:`hsu.hookspecs.hsu_register_watchers`."""

    #: the unit settings it acts on (``("idle_timeout",)``): a unit that sets
    #: one that no enabled watcher claims is a config error naming the field
    settings: tuple[str, ...]

    def wants(self, unit: str, spec: UnitSpec) -> bool:
        """Whether the unit named ``unit``, as ``spec`` says, needs this
        watcher (a task runs only for those)."""
        ...

    def watch(self, kernel: KernelAPI, unit: str) -> Awaitable[None]:
        """Run until cancelled: the kernel starts it when the unit starts,
        cancels it when the unit stops, and starts it again after a reload
        that changed the unit (read the spec of the moment from
        ``kernel.deployment.units[unit]``). An exception ends it with an error
        in the kernel's log; the unit runs on unwatched."""
        ...


#: a ``grpc.GenericRpcHandler`` (grpc ships no types), as
#: :func:`hsu.hookspecs.hsu_kernel_handlers` returns them
RpcHandler = Any


class KernelRoutes(Protocol):
    """The kernel's own routes, one :class:`hsu.client.route.Route` per
    interface, shared by every caller in the kernel's process (its gateway,
    ``kernel.connect()``), so drain and autoscaling see their calls."""

    def route(self, interface: str) -> Route:
        """The route of ``interface`` (it may have no instance yet); raises
        :class:`hsu.errors.NoSuchUnit` when no unit serves it."""
        ...

    def ensure(self, interface: str, timeout: float | None = None) -> Awaitable[Route]:
        """The route, once an instance is routable (started on demand)."""
        ...

    def call_began(self, ep: Endpoint) -> None:
        """A call went to ``ep``: count it (drain waits for it, autoscaling sees it)."""
        ...

    def call_ended(self, ep: Endpoint) -> None: ...

    def acquire(
        self,
        interface: str,
        key: str | None = None,
        exclude: str = "",
        priority: int = 0,
        timeout: float | None = None,
    ) -> Awaitable[Any]:
        """A slot on an instance of ``interface``, whose unit has
        ``routing.max_inflight``: at once when one is free, else after waiting
        in the unit's queue (by ``priority``, within ``timeout`` seconds).
        The slot (an opaque grant; ``.endpoint`` is the instance) goes back
        with :meth:`release`. Raises :class:`hsu.errors.QueueFull` or
        :class:`hsu.errors.QueueTimeout` (the call is then never sent)."""
        ...

    def release(self, grant: Any) -> None:
        """Give back a slot :meth:`acquire` granted (again is a no-op)."""
        ...


@attrs.frozen
class DataPlane:
    """Where ``hsu_kernel_address`` moves the kernel's data plane, and what the
    plugin that serves the requested address in its place promises."""

    #: where the kernel's gRPC data plane listens instead (``host:port`` or
    #: ``unix:PATH``)
    address: str
    #: the plugin authenticates and authorizes every call it forwards to an
    #: instance itself (:meth:`KernelAPI.check_call`) while auth is on; without
    #: it, a deployment with auth on does not start (nothing would check the
    #: calls the plugin forwards)
    enforces_auth: bool = False


@runtime_checkable
class Exporter(Protocol):
    """A metrics exporter, as ``hsu_register_exporters``'s ``factory(kernel)``
    returns it. ``start`` is awaited once the kernel listens, ``stop`` as it
    stops; between them the exporter reads ``kernel.metrics.collect()``
    (:mod:`hsu.metrics`) whenever it wants values (on a scrape, on its own
    timer). Neither may block the event loop."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@attrs.frozen
class CallSpan:
    """One part of a routed call, a child span of the kernel's span of the
    call (:attr:`RoutedCall.span`): the pick of an instance, an attempt, a
    cold start. Ids are hex, as in :class:`hsu.tracecontext.SpanContext`;
    the trace is the call's."""

    #: ``hsu.pick`` (choosing an instance for a try: the balancer, and any
    #: wait for a slot or for an instance that can take the call),
    #: ``hsu.attempt`` (one try on one instance; its span is the
    #: ``traceparent`` the instance is sent, so the HSU's server span is its
    #: child) or ``hsu.cold_start`` (waiting for an instance started for the
    #: call); see :mod:`hsu.tracecontext`
    name: str
    span_id: str
    #: the call's span (``RoutedCall.span.span_id``)
    parent_id: str
    #: nanoseconds since the epoch
    start_ns: int
    end_ns: int
    #: OpenTelemetry-style attributes: ``hsu.unit``, ``hsu.instance``,
    #: ``server.address``, ``server.port``, ``rpc.response.status_code``,
    #: ``hsu.retry``, ``hsu.resend_count``, ``error.type``... (docs/hooks.md)
    attributes: Mapping[str, str | int | float | bool] = attrs.field(factory=dict)


@attrs.frozen
class RoutedCall:
    """A call the kernel routed, as ``hsu_routed_call`` is told of it once it
    ended (all its tries)."""

    #: ``unary``, ``client_stream``, ``server_stream`` or ``bidi_stream``
    kind: str
    #: ``/package.Service/Method``
    method: str
    #: the unit of the last try's instance ("" when no instance took it)
    unit: str
    #: the status code's name the call ended with (``OK``, ``UNAVAILABLE``...)
    code: str
    #: when it began and ended, nanoseconds since the epoch
    start_ns: int
    end_ns: int
    #: the kernel's span of the call, a child of the caller's ``traceparent``
    #: (``span.parent_id``; "" for a trace the kernel started itself,
    #: ``kernel.trace_sample``); None when the call is not traced. When it
    #: is sampled, each instance was sent its attempt's span (in ``spans``)
    #: as its parent; when not, this one
    span: SpanContext | None = None
    #: the call's parts as child spans of ``span`` (its cold start, picks
    #: and attempts), in the order they ended; empty when ``span`` is None
    #: or not sampled
    spans: tuple[CallSpan, ...] = ()


#: what a gateway calls as each routed call ends: (grpc kind as grpc names it,
#: ``unary_unary``..., method, unit, what the call raised or None, when it
#: began on :func:`time.perf_counter`'s clock)
CallObserver = Callable[[str, str, str, BaseException | None, float], None]


@runtime_checkable
class KernelAPI(Protocol):
    """What a plugin may ask of the kernel: every hook receives this.

    The kernel implements it; a plugin that needs more than this shows that a
    piece of the public API is missing (docs/plugins.md).
    """

    @property
    def address(self) -> str:
        """Where the data plane listens: the units' interfaces, served by the
        plugins' ``hsu_kernel_handlers`` ("" until it started, or when no
        plugin serves a data plane)."""
        ...

    @property
    def control_address(self) -> str:
        """Where the control plane listens: the Kernel API and the kernel's
        Core; what HSUs register with ("" until it started)."""
        ...

    @property
    def requested_address(self) -> str:
        """The address the deployment (or ``--address``) asked for."""
        ...

    @property
    def state(self) -> str:
        """``created``, ``starting``, ``running``, ``stopping``, ``stopped`` or ``failed``."""
        ...

    @property
    def state_dir(self) -> Path:
        """The kernel's own directory (0700): state, logs, a plugin's files."""
        ...

    @property
    def deployment(self) -> Deployment:
        """The deployment in force (replaced by a reload)."""
        ...

    @property
    def instances(self) -> Mapping[str, InstanceView]:
        """Every instance the kernel knows, by id."""
        ...

    @property
    def registry(self) -> Registry | None:
        """The service registry in use (``None`` before the kernel started)."""
        ...

    @property
    def routes(self) -> KernelRoutes:
        """The kernel's own routes, for a gateway in its process."""
        ...

    @property
    def metrics(self) -> MetricsRegistry:
        """The kernel's metrics (``hsu.metrics``): what exporters collect, and
        where a plugin adds its own metrics or collectors."""
        ...

    @property
    def calls(self) -> CallMetrics | None:
        """Where a routed caller in the kernel's process (a gateway) counts
        its calls (``Caller(observe=kernel.calls.observe)``); ``None`` with
        ``kernel.metrics: false``."""
        ...

    @property
    def call_observer(self) -> CallObserver | None:
        """What a gateway in the kernel's process tells as each call it
        routed ends (``Caller(observe=kernel.call_observer)``): it counts the
        call (``kernel.calls``) and tells plugins implementing
        ``hsu_routed_call``, reading the call's span from
        :mod:`hsu.tracecontext` (the gateway makes it current). ``None`` when
        there is nothing to do: ``kernel.metrics: false`` and no such plugin."""
        ...

    def report_routed_call(self, call: RoutedCall) -> None:
        """A call a data plane outside the kernel's process routed ended
        (nginx, which tells the kernel after the fact): counted like the
        gateway's calls (``kernel.calls``, its time ``end_ns - start_ns``)
        and told to the plugins implementing ``hsu_routed_call``."""
        ...

    def settings(self, section: str) -> Any:
        """The typed settings of a section (the attrs class its plugin registered)."""
        ...

    @property
    def cache(self) -> Cache | None:
        """The deployment's cache layers (``kernel.caches``) stacked into one
        :class:`Cache` (``hsu.cache.Layers``): what the gateway caches routed
        replies in and HSUs reach over ``hsu.cache.v1.Cache``. ``None`` before
        the kernel started, or with ``kernel.caches: []``."""
        ...

    def connect(self) -> RoutedChannel:
        """A routed channel for generated stubs over the kernel's own routes."""
        ...

    def instance_for(self, interface: str) -> Awaitable[InstanceView]:
        """A ready instance serving ``interface``, started on demand if none is."""
        ...

    def scale(self, unit: str, count: int) -> Awaitable[None]:
        """Run exactly ``count`` instances of ``unit``."""
        ...

    def usage(self, instance_id: str) -> Usage | None:
        """A sample of the instance's process and its descendants (its
        cgroup's processes where the kernel contains instances in cgroups);
        None when it has no process or it cannot be read. CPU is measured
        since the previous sample of the same instance."""
        ...

    def restart_instance(self, instance_id: str, reason: str) -> Awaitable[None]:
        """Replace the instance's process (not counted as a crash); awaits
        the new one's start. :class:`hsu.errors.NoSuchUnit` for an unknown id."""
        ...

    def stop_instance(self, instance_id: str, reason: str) -> Awaitable[None]:
        """Stop the instance's process; its slot stays, ``stopped``, until
        started or scaled again (``hsu stop INSTANCE``)."""
        ...

    def retire(self, instance_id: str, reason: str) -> Awaitable[bool]:
        """Stop the instance and drop its slot, so the unit runs one fewer,
        unless that would take the unit below its ``min_instances``: then
        nothing happens and the result is False."""
        ...

    def register_plugin(self, plugin: object, name: str) -> str:
        """Register per-kernel plugin state (an object with ``@hsu.hookimpl``
        methods) for this kernel's life; see docs/plugins.md."""
        ...

    def plugin(self, name: str) -> object | None:
        """The plugin registered as ``name``, or ``None``."""
        ...

    def request_stop(self, reason: str) -> None:
        """Ask the kernel to drain and stop."""
        ...

    def publish(
        self,
        topic: str,
        *,
        data: Mapping[str, str] | None = None,
        reason: str = "",
        unit: str = "",
        instance_id: str = "",
    ) -> Event:
        """Publish an event (kind ``plugin``) on ``topic`` to every subscriber
        of it (docs/tracing.md, "Events"). Call it on the kernel's event loop.

        :param topic: dot-separated words of ``a-z0-9_-``, at most 128
            characters; ``kernel``, ``instance``, ``worker``, ``service``,
            ``config`` and ``reload`` are the kernel's own
        :param data: at most 32 string pairs (keys of letters, digits and
            ``_./-``, values of at most 256 printable characters)
        :raises hsu.errors.InvalidValue: a bad topic, data or reason
        """
        ...

    def subscribe(
        self, *topics: str, replay: bool = False, unit: str = ""
    ) -> AsyncIterator[Event | int]:
        """The events on ``topics`` (names or ``fnmatch`` globs such as
        ``worker.*``; none for all), of ``unit`` if given, as they happen
        (after the recent ones if ``replay``). Iterate it on the kernel's
        event loop. A subscriber that falls more than 4096 events behind
        loses the oldest and receives an ``int`` instead: how many it lost."""
        ...

    def caller_identity(self) -> Identity | None:
        """Who made the call being served, as the kernel's auth verified it;
        for a handler of the kernel's servers (``hsu_kernel_handlers``). None
        when auth is off (docs/auth.md)."""
        ...

    def check_call(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]], peer: str
    ) -> Identity | None:
        """Authenticate and authorize a call to a unit's interface that a
        plugin forwards by other means than the kernel's servers (the nginx
        gateway asks for each call), as the kernel's own gateway would.

        :param method: the full method, ``"/hsu.echo.v1.Echo/Echo"``
        :param metadata: the call's metadata, keys lower case
        :param peer: the caller, as gRPC names peers (``"ipv4:127.0.0.1:50312"``);
            authentications are reused per peer and credential (``auth.cache_ttl``)
        :returns: the caller's identity; ``None`` when auth is off
        :raises hsu.errors.Unauthenticated: no or a bad credential
        :raises hsu.errors.PermissionDenied: known, but not allowed
        :raises hsu.errors.HsuError: an auth plugin failed (the call is refused)

        Every message is fit for the caller: it names the method and a missing
        role, never a secret. Call it on the kernel's event loop; it does no I/O.
        """
        ...

    def forward_identity(self, identity: Identity, instance_id: str) -> str | None:
        """The ``hsu-identity`` metadata value that tells instance
        ``instance_id`` who calls (:mod:`hsu.identity`): signed with that
        instance's secret, so a caller cannot forge it. None when auth is off
        or the instance has no secret. A gateway adds it to each call it
        forwards, and drops every ``hsu-identity`` the caller sent."""
        ...

    @property
    def peer_signer(self) -> PeerSigner | None:
        """What proves a call to an instance comes from the cluster
        (``kernel.cluster_key``, :mod:`hsu.peer`): a gateway adds
        ``peer_signer.header(endpoint.address, method)`` to each call it
        forwards. None without a cluster key."""
        ...


# -- auth ---------------------------------------------------------------------
#
# Who is calling (an authenticator, a plugin) and what they may call (an
# authorizer, a plugin), on the kernel's control plane and data plane. Off
# until the deployment's ``auth.authenticators`` names one; see docs/auth.md.


@attrs.frozen
class Identity:
    """Who a call comes from, as an :class:`Authenticator` proved it."""

    #: ``"uid:0"``, ``"alice"``, ``"spiffe://example.org/hsu/echo"``, ``"instance:echo-1a2b"``
    name: str
    #: what proved it: ``"uid"``, ``"token"``, ``"x509"``, ``"jwt"``, ``"instance"``, ...
    kind: str
    #: roles the authenticator vouches for (an authorizer may add grants of its own)
    roles: tuple[str, ...] = ()
    #: what else the authenticator knows: a JWT's claims, a certificate's subject
    attributes: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class PeerCredentials:
    """Who opened a connection to the kernel's unix control socket, as the
    operating system told the kernel when it accepted it (``SO_PEERCRED``):
    the connecting process's pid and effective uid and gid then, and its
    supplementary groups (``SO_PEERGROUPS``; empty where the system does not
    say)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@attrs.frozen
class CallInfo:
    """One call, as an :class:`Authenticator` sees it."""

    #: the full method: ``"/hsu.kernel.v1.Kernel/Scale"``
    method: str
    #: the call's metadata (keys lower case; ``-bin`` keys carry bytes)
    metadata: tuple[tuple[str, str | bytes], ...]
    #: the transport's peer: ``"ipv4:127.0.0.1:50312"``, ``"unix:"``
    peer: str
    #: ``"control"`` (the Kernel API, the kernel's Core) or ``"data"`` (the gateway)
    plane: str
    #: what the transport proved (``context.auth_context()``): under TLS the
    #: client certificate's ``x509_subject_alternative_name``, ``x509_common_name``, ...
    auth_context: Mapping[str, tuple[bytes, ...]] = attrs.field(factory=dict)
    #: who is at the other end, for a call on the unix control socket
    #: (docs/auth.md, ``peercred``); None on TCP, or when the kernel does not
    #: read them (auth off)
    peer_credentials: PeerCredentials | None = None

    def header(self, key: str) -> str | bytes | None:
        """The first value of metadata ``key`` (lower case), or None."""
        for k, v in self.metadata:
            if k == key:
                return v
        return None


@runtime_checkable
class Authenticator(Protocol):
    """Says who a call comes from. Several are stacked in the deployment's
    order (``auth.authenticators``); the first :class:`Identity` wins."""

    def authenticate(self, call: CallInfo) -> Identity | None:
        """The caller's identity; ``None`` when the call carries no credential
        of this kind ("not mine": the next authenticator is asked); or raise
        :class:`hsu.errors.Unauthenticated` (one line, never the secret) for a
        credential of this kind that is not good: the call is refused.

        Called on the kernel's event loop: no blocking I/O. The kernel caches
        the answer per connection and credential for a few seconds, so it is
        not asked on every call. Anything else it raises refuses the call
        (fail closed) and is logged once per cause.

        Two optional attributes tell the kernel more: ``metadata_keys``
        (the metadata keys it reads; the cache keys on their values only)
        and ``socket_mode`` (an int, with ``socket_group``, a gid or None):
        an authenticator that tells the callers of the unix control socket
        apart by their :class:`PeerCredentials` may let other users open
        the socket (``0o660``, ``0o666``); the kernel applies the mode when
        it starts (docs/auth.md).
        """
        ...


class Decision(enum.Enum):
    """An :class:`Authorizer`'s answer: deny wins; no ``ALLOW`` at all is deny."""

    ALLOW = "allow"
    DENY = "deny"
    ABSTAIN = "abstain"


@runtime_checkable
class Authorizer(Protocol):
    """Says whether an identity may make a call. Every one in
    ``auth.authorizers`` is asked: one ``DENY`` refuses, else one ``ALLOW``
    lets the call through, else it is refused.

    An authorizer with roles may also offer ``missing_role(identity, method,
    unit) -> str | None``: a role that would have allowed the call, which
    the refusal names (``rbac`` does).
    """

    def authorize(self, identity: Identity, method: str, unit: str | None) -> Decision:
        """``method`` is the full method (``"/hsu.kernel.v1.Kernel/Scale"``,
        ``"/hsu.echo.v1.Echo/Echo"``); ``unit`` the unit the call is about (a
        Kernel API request's unit, or its instance's; for a routed call the
        unit serving the interface), ``None`` when it is about no one unit.

        Called on the kernel's event loop for every call: cheap, no I/O.
        """
        ...


@attrs.frozen
class AuthSettings:
    """The deployment's ``auth`` section (docs/auth.md)."""

    #: authenticator plugins by name, asked in this order (after the kernel's
    #: own ``instance``); empty: auth is off
    authenticators: tuple[str, ...] = ()
    #: authorizer plugins by name; every one is asked, deny wins, no allow is deny
    authorizers: tuple[str, ...] = ()
    #: seconds an authentication is reused for the same connection and credential
    cache_ttl: float = attrs.field(default=10.0, validator=attrs.validators.ge(0))

    @property
    def enabled(self) -> bool:
        return bool(self.authenticators)


# -- launching --------------------------------------------------------------


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
    #: a cgroup v2 directory the process must join before its command runs
    #: (:func:`hsu.process.cgroup_argv`), so everything it starts stays in it;
    #: None when the kernel contains instances without cgroups. A launcher
    #: given one must honour it: the kernel ends the instance's processes by
    #: killing that cgroup
    cgroup: str | None = None
    #: the soft limit of open files (RLIMIT_NOFILE) the process must start
    #: with, the one the kernel was started with, when the kernel raised its
    #: own at start (``None``: inherit the kernel's); a program that uses
    #: ``select()`` breaks above 1024. The built-in launcher sets it with the
    #: cgroup's shell (``ulimit -S -n N``) when there is one and no other
    #: rlimit, else with ``prlimit --nofile=N:``; not if ``rlimits`` sets ``nofile``
    nofile_soft: int | None = None


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
    #: the unit's ``health.options`` as an instance of the probe's
    #: :attr:`Probe.options` class (structured and validated by the kernel)
    options: Any


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

    @property
    def options(self) -> type[Any]:
        """The frozen attrs class a unit's ``health.options`` become.

        The kernel structures them with the deployment's strict converter when
        the deployment is loaded, so a mistake is a config error with its path
        and file: an unknown key, a wrong type (no coercion: ``"2"`` is not an
        int), a failed validator (``attrs.validators.ge(1)``, say). Give every
        field a default where leaving it out makes sense. ``hsu config schema``
        describes the class: types, defaults, and bounds from
        ``attrs.validators`` ``ge``/``gt``/``le``/``lt``/``in_`` (a field's
        ``metadata["json_schema"]`` replaces what is derived). A validator of
        your own reports its field like attrs' do: ``ValueError("'port' must
        be ...")``.
        """
        ...

    async def check(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        """Probe once; ``target.options`` is an instance of :attr:`options`.

        Must return within ``timeout`` seconds and never raise for an
        unhealthy instance: that is ``ProbeResult(False, why)``.
        """
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
#: reserved by a lease (``hsu.lease``): only its holder calls it
LEASED = "leased"


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


@attrs.frozen
class Node:
    """One kernel of a cluster, as a registry shared by several kernels
    lists it (:class:`Cluster`), for a :class:`Placement` to choose from."""

    #: the kernel's name in the registry (hsu-plugin-etcd: ``etcd.node``)
    name: str
    #: the units it can start on demand (declared there, not singletons)
    units: tuple[str, ...] = ()
    #: the instances the registry lists for it, of every unit
    instances: int = 0
    #: it is the kernel asking
    local: bool = False


@runtime_checkable
class Cluster(Protocol):
    """What a registry shared by several kernels may offer besides
    :class:`Registry`: the kernels, and a start on one of them. The kernel
    uses it for on-demand starts (``kernel.placement``) when its registry
    has both methods."""

    async def nodes(self) -> list[Node]:
        """Every live kernel, this one (``local=True``) included."""
        ...

    async def request_start(self, node: str, unit: str, interface: str) -> None:
        """Ask kernel ``node`` to start an instance of ``unit`` (for a call
        to ``interface``); it returns once asked, not once started (the
        instance is listed in the registry when it is ready)."""
        ...


@runtime_checkable
class Placement(Protocol):
    """Picks the kernel that starts an instance on demand, when no instance
    of the unit is listed anywhere (``kernel.placement``; built in:
    ``local-first``, the default, and ``least-loaded``)."""

    def pick(self, unit: str, nodes: Sequence[Node]) -> str:
        """The name of the node to start ``unit`` on.

        :param nodes: the kernels that can start ``unit`` (never empty; the
            local one among them), in name order.
        """
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
    a unit names one and passes it options (``routing.balancer_options``,
    ``routing.breaker_options``).
    """

    @property
    def options(self) -> type[Any]:
        """The frozen attrs class a unit's options become.

        Structured as for :attr:`Probe.options`: by the kernel when the
        deployment is loaded, and by every process that routes calls
        (``hsu.connect``), which gets the unit's options from the kernel as a
        mapping.
        """
        ...

    def create(self, options: Any) -> Any:
        """A new balancer (or breaker) configured by ``options``, an instance
        of :attr:`options`."""
        ...


# -- storage --------------------------------------------------------------------
#
# A key-value store with namespaces, shaped like etcd's KV API so an etcd
# plugin is a thin adapter: one revision counter for the whole store, a
# key's create and mod revisions and version, compare-and-set on a key's mod
# revision (etcd's ``Txn`` with a ``mod_revision`` compare), TTLs (a lease
# per key), and watch of a prefix from a revision. The kernel keeps its own
# records there and serves it to HSUs (``hsu.storage.v1.Storage``). See
# docs/storage.md.

#: the largest key a storage must accept, in UTF-8 bytes
MAX_KEY_BYTES = 1024
#: the longest namespace, in characters (``[A-Za-z0-9_.-]``)
MAX_NAMESPACE = 128


@attrs.frozen
class KeyValue:
    """One key as a storage holds it (etcd's ``mvccpb.KeyValue``)."""

    key: str
    value: bytes = attrs.field(repr=False)
    #: the store's revision when the key was created (since its last delete)
    create_revision: int
    #: the store's revision of the key's last change: what compare-and-set compares
    mod_revision: int
    #: puts since the key was created (1 after the first)
    version: int
    #: when it expires (``time.time()`` seconds), or 0 when it does not
    expires_at: float = 0.0


@attrs.frozen
class StorageEvent:
    """One change under a watched prefix."""

    #: ``"put"`` or ``"delete"`` (a delete, or a TTL that ran out)
    kind: str
    #: the key after a put; for a delete, the key with an empty value and the
    #: delete's revision as its ``mod_revision``
    kv: KeyValue
    #: the store's revision of this change; revisions only grow
    revision: int


class StorageCompacted(Exception):
    """A watcher asked for changes older than the storage still keeps.

    The watcher lists the prefix again (:meth:`Storage.list` gives the
    revision to watch from) and watches from there, as etcd's clients do.
    """

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        #: the oldest revision the storage can still watch from
        self.compact_revision = compact_revision


def _namespaces(instance: Any, attribute: Any, value: Mapping[str, str]) -> None:
    for unit, ns in value.items():
        if not NAMESPACE.fullmatch(ns) or len(ns) > MAX_NAMESPACE:
            raise ValueError(
                f"unit {unit!r}: namespace {ns!r} is not [A-Za-z0-9_.-]{{1,{MAX_NAMESPACE}}}"
            )
        if ns.startswith(RESERVED_NAMESPACE_PREFIX):
            raise ValueError(f"unit {unit!r}: namespace {ns!r}: 'hsu.' is the kernel's own")


#: what a namespace may be
NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: namespaces the kernel keeps for itself (``hsu.kernel``: its instance records)
RESERVED_NAMESPACE_PREFIX = "hsu."


@attrs.frozen
class StorageSettings:
    """The deployment's ``storage`` section (docs/storage.md); the plugin
    is chosen by ``kernel.storage``."""

    #: the largest value a put accepts, in bytes (a larger one is INVALID_ARGUMENT)
    max_value_bytes: int = attrs.field(
        default=1024 * 1024,
        validator=[attrs.validators.ge(1), attrs.validators.le(64 * 1024 * 1024)],
    )
    #: a unit's namespace when it is not the unit's name: two units given the
    #: same one share it (``{orders: shop, billing: shop}``)
    namespaces: Mapping[str, str] = attrs.field(factory=dict, validator=_namespaces)

    def namespace_of(self, unit: str) -> str:
        return self.namespaces.get(unit, unit)


@runtime_checkable
class Storage(Protocol):
    """A durable key-value store, per namespace (docs/storage.md).

    ``namespace`` isolates keys: one per unit, ``hsu.kernel`` for the
    kernel's own records. Keys are strings of at most :data:`MAX_KEY_BYTES`;
    values are bytes of at most :attr:`max_value_bytes`, and a larger one
    raises :class:`hsu.errors.InvalidValue` before anything is written. A
    method that returns has made its change durable (on disk, or acknowledged
    by the server); one that raises :class:`hsu.errors.StorageError` (or
    :class:`hsu.errors.StorageUnavailable`) made none. Revisions are the
    store's: one counter that every change moves on.
    """

    @property
    def max_value_bytes(self) -> int:
        """The largest value a put accepts."""
        ...

    @property
    def describe(self) -> str:
        """Where it keeps its data, for messages: a file, ``redis://host:port``."""
        ...

    async def get(self, namespace: str, key: str) -> KeyValue | None:
        """The key, or None when it is not there (or its TTL ran out)."""
        ...

    async def put(
        self, namespace: str, key: str, value: bytes, *, ttl: float | None = None
    ) -> KeyValue:
        """Create or replace the key; with ``ttl`` (seconds) it is deleted
        that long after this put (another put sets a new TTL, or none).
        Returns the key as stored (its new ``mod_revision``)."""
        ...

    async def delete(self, namespace: str, key: str) -> int:
        """Remove the key; the delete's revision, or 0 when it was not there."""
        ...

    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 0
    ) -> tuple[list[KeyValue], int]:
        """The keys that start with ``prefix``, in key order (at most
        ``limit`` of them, 0: all), and the store's revision they are as of."""
        ...

    async def compare_and_set(
        self,
        namespace: str,
        key: str,
        value: bytes | None,
        revision: int,
        *,
        ttl: float | None = None,
    ) -> tuple[bool, KeyValue | None]:
        """Put ``value`` (or, when it is None, delete) only if the key's
        ``mod_revision`` is ``revision`` now; ``revision`` 0 means "only if the
        key does not exist". Returns whether it was done, and the key as it is
        afterwards (None when it does not exist): on a refusal, the current
        one, so the caller can retry against it."""
        ...

    def watch(
        self, namespace: str, prefix: str = "", *, after: int = 0
    ) -> AsyncIterator[StorageEvent]:
        """Every change to keys under ``prefix`` with a revision above
        ``after``, in revision order, as they happen, until the caller stops
        iterating (``after`` 0: from now on). Raises :class:`StorageCompacted`
        when ``after`` is older than the storage keeps."""
        ...

    async def close(self) -> None:
        """Release what the storage holds (connections, threads). Idempotent."""
        ...


# -- cache ----------------------------------------------------------------------
#
# A cache: values that may vanish at any time (evicted, expired, a server
# down), in layers the deployment stacks (``kernel.caches: [memory, redis]``).
# The kernel caches routed replies there (``routing.cache``) and serves it to
# HSUs (``hsu.cache.v1.Cache``). See docs/cache.md.

#: the longest cache key, in UTF-8 bytes
MAX_CACHE_KEY_BYTES = 1024


@attrs.frozen
class Cached:
    """A value found in a cache."""

    value: bytes = attrs.field(repr=False)
    #: seconds it has left, or None when it has no TTL: a layer filled from
    #: a lower one gives it no longer than this
    ttl: float | None = None


@attrs.frozen
class CacheStats:
    """A cache's counts since it was made (and what it holds now, where it knows)."""

    hits: int = 0
    misses: int = 0
    #: values dropped to make room (a TTL that ran out is no eviction)
    evictions: int = 0
    #: calls that failed (a layer skipped by ``hsu.cache.Layers``)
    errors: int = 0
    #: values and their bytes held now (-1: not known, a shared server's)
    entries: int = -1
    bytes: int = -1


@runtime_checkable
class Cache(Protocol):
    """A cache of bytes by key, with TTLs (docs/cache.md).

    A value may be gone at any time; a caller falls back to the source of
    truth. A method raises :class:`hsu.errors.CacheError` (or any exception:
    a server gone) when it could not do its work; ``hsu.cache.Layers`` skips
    such a layer for the call and counts it, so a cache failure never fails
    the call it serves.
    """

    @property
    def describe(self) -> str:
        """What it is, for messages: ``memory (64 MiB)``, ``redis://host:port``."""
        ...

    async def get(self, key: str) -> Cached | None:
        """The value, or None when it is not there (or its TTL ran out)."""
        ...

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        """Keep ``value`` under ``key`` for ``ttl`` seconds (None: until it is
        evicted). A cache may decline a value larger than it holds."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove the key; whether it was there."""
        ...

    def stats(self) -> CacheStats:
        """Hits, misses, evictions and errors counted by this process."""
        ...

    async def close(self) -> None:
        """Release what it holds (connections). Idempotent."""
        ...
