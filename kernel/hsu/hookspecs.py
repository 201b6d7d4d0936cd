"""Every hook hsu calls, in one place, grouped by the phase that calls it.

Plugins implement these with ``@hsu.hookimpl``; pluggy checks each
implementation's signature against the spec here, and an implementation whose
name matches no spec is rejected when the plugin is registered.

A hook may return an awaitable where it must do I/O: the kernel awaits it (see
the kernel's ``await_me_maybe``). Hooks grow by gaining arguments; an
implementation takes only the arguments it needs.

``docs/hooks.md`` documents each hook; a test keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    # every type a hook takes or returns is a public one, from hsu.ports
    from hsu.ports import (
        Authenticator,
        Authorizer,
        Cache,
        Changes,
        ConfigSource,
        DataPlane,
        Deployment,
        Endpoint,
        Event,
        Exporter,
        Factory,
        InstanceView,
        KernelAPI,
        Launcher,
        Placement,
        Probe,
        Register,
        Registry,
        RoutedCall,
        RpcHandler,
        Storage,
        Watcher,
    )

PROJECT = "hsu"

_hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# -------------------------------------------------------------------------
# Registration: plugins add capabilities by name. Called for each plugin
# once, as it is registered (so a clash can name both plugins).
# -------------------------------------------------------------------------


@_hookspec
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    """Register the attrs class that holds a plugin's settings.

    The deployment section with that name is structured into the class (unknown
    keys are errors) and handed out by :meth:`hsu.Kernel.settings`. By
    convention the section is named after the plugin.

    :param register: ``register(section, cls)``; ``cls`` is an attrs class
        whose every field has a default, so a deployment may leave the section
        out. Registering a section another plugin has is an error naming both.

    Called once for each plugin, when it is registered; settings sections are
    read when the kernel is built, so register plugins before that.
    """


@_hookspec
def hsu_register_launchers(register: Register[Launcher]) -> None:
    """Register a way to start instances, under a name units refer to.

    :param register: ``register(name, launcher)``; ``launcher`` satisfies
        :class:`hsu.ports.Launcher`. A unit picks one with ``launcher: NAME``
        (default: the launcher a plugin registered with ``default=True``;
        the built-in one is ``subprocess``). A clashing name is an error naming both
        plugins.

    Called once for each plugin, when it is registered.
    """


@_hookspec
def hsu_register_config_sources(register: Callable[[str, ConfigSource], None]) -> None:
    """Register a source of configuration, under a name.

    :param register: ``register(name, source)``; ``source`` satisfies
        :class:`hsu.ports.ConfigSource`: a ``priority`` (file 10,
        environment 20, ``--set`` 30; higher wins), ``load(ctx)`` returning
        layers with the origin of every value, and ``watch(ctx, on_change)``
        for sources that can change while the kernel runs. A clashing name is
        an error naming both plugins.

    Called once for each plugin, when it is registered. Sources come from the
    plugins enabled by ``-p``, ``HSU_PLUGINS`` and autoload; one named only in
    the deployment's ``plugins:`` is used from the second read on.
    """


@_hookspec
def hsu_register_probes(register: Register[Probe]) -> None:
    """Register a health probe, under a name units refer to.

    :param register: ``register(name, probe)``; ``probe`` satisfies
        :class:`hsu.ports.Probe`: ``options`` is the attrs class a unit's
        ``health.options`` are structured into (when the deployment is
        loaded) and ``check(target, timeout)`` runs one probe. A unit picks
        one with ``health: {probe: NAME}``. The default probe
        (``default=True``, built in ``grpc``) checks an instance the kernel
        re-attached to, and an ``unmanaged`` unit found by address. A
        clashing name is an error naming both plugins.

    Called once for each plugin, when it is registered.
    """


@_hookspec
def hsu_register_balancers(register: Register[Factory]) -> None:
    """Register a balancing strategy, under a name units refer to.

    :param register: ``register(name, factory)``; ``factory`` satisfies
        :class:`hsu.ports.Factory` and its ``create(options)`` returns a
        :class:`hsu.ports.Balancer`. A unit picks one with
        ``routing: {balancer: NAME, balancer_options: {...}}`` (default: the one
        registered with ``default=True``, built in ``round_robin``). A
        clashing name is an error naming both plugins.

    Called once for each plugin, when it is registered, in the kernel and in
    every process that routes calls (``hsu.connect``).
    """


@_hookspec
def hsu_register_breakers(register: Register[Factory]) -> None:
    """Register a circuit breaker, under a name units refer to.

    :param register: ``register(name, factory)``; ``factory`` satisfies
        :class:`hsu.ports.Factory` and its ``create(options)`` returns a
        :class:`hsu.ports.CircuitBreaker`. A unit picks one with
        ``routing: {breaker: NAME, breaker_options: {...}}`` (default: the one
        registered with ``default=True``, built in ``consecutive``). A
        clashing name is an error naming both plugins.

    Called once for each plugin, when it is registered.
    """


@_hookspec
def hsu_register_registries(
    register: Register[Callable[[KernelAPI], Registry]],
) -> None:
    """Register a service registry, under a name the deployment refers to.

    :param register: ``register(name, factory)``; ``factory(kernel)`` returns
        a :class:`hsu.ports.Registry` (it may read its own settings section
        with ``kernel.settings(NAME)``). The deployment picks one with
        ``kernel.registry: NAME`` (default: the one registered with
        ``default=True``, built in ``memory``). A clashing name is an
        error naming both plugins.

    Called once for each plugin, when it is registered; the factory is called
    once, when the kernel starts.
    """


@_hookspec
def hsu_register_placements(register: Register[Placement]) -> None:
    """Register a placement: how a kernel picks the kernel (node) that
    starts an instance on demand, when no instance of the unit is listed on
    any host.

    :param register: ``register(name, placement)``; ``placement`` satisfies
        :class:`hsu.ports.Placement` (``pick(unit, nodes) -> node name``). The
        deployment picks one with ``kernel.placement: NAME`` (default: the one
        registered with ``default=True``, built in ``local-first``). A
        clashing name is an error naming both plugins.

    Called once for each plugin, when it is registered. The placement is asked
    only when the kernel's registry is shared (it offers
    :class:`hsu.ports.Cluster`) and another kernel can start the unit too.
    """


@_hookspec
def hsu_register_authenticators(
    register: Register[Callable[[KernelAPI], Authenticator]],
) -> None:
    """Register a way to tell who is calling, under a name the deployment refers to.

    :param register: ``register(name, factory)``; ``factory(kernel)`` returns
        a :class:`hsu.ports.Authenticator` (reading its own settings section
        with ``kernel.settings(NAME)``): ``authenticate(call)`` returns an
        :class:`hsu.ports.Identity`, ``None`` ("not mine") or raises
        :class:`hsu.errors.Unauthenticated`. The deployment turns auth on by
        naming authenticators in order, ``auth: {authenticators: [NAME,
        ...]}``; the first identity wins. There is no default. A clashing
        name is an error naming both plugins.

    Called once for each plugin, when it is registered. The factory is called
    when the kernel starts and again on each reload (a factory that raises
    :class:`hsu.errors.HsuError` fails the start, or rejects the reload).
    Registered factories rather than a call hook: the deployment picks and
    orders them by name, and each kernel gets its own objects with its own
    settings (docs/hooks.md).
    """


@_hookspec
def hsu_register_authorizers(
    register: Register[Callable[[KernelAPI], Authorizer]],
) -> None:
    """Register a policy on what an identity may call, under a name.

    :param register: ``register(name, factory)``; ``factory(kernel)``
        returns a :class:`hsu.ports.Authorizer`: ``authorize(identity,
        method, unit)`` returns a :class:`hsu.ports.Decision`. The deployment
        names them in ``auth: {authorizers: [NAME, ...]}``; every one is
        asked, a ``DENY`` wins, and no ``ALLOW`` at all refuses the call.
        There is no default. A clashing name is an error naming both plugins.

    Called once for each plugin, when it is registered; the factory as for
    :func:`hsu_register_authenticators`.
    """


@_hookspec
def hsu_register_storages(
    register: Register[Callable[[KernelAPI], Storage]],
) -> None:
    """Register a key-value storage, under a name the deployment refers to.

    :param register: ``register(name, factory)``; ``factory(kernel)`` returns
        a :class:`hsu.ports.Storage` (reading its own settings section with
        ``kernel.settings(NAME)``, and ``kernel.settings("storage")`` for the
        value size cap). The deployment picks one with ``kernel.storage:
        NAME`` (default: the one registered with ``default=True``, built in
        ``sqlite``). The kernel keeps its instance records there and serves it
        to HSUs as ``hsu.storage.v1.Storage`` (docs/storage.md). A clashing
        name is an error naming both plugins.

    Called once for each plugin, when it is registered; the factory is called
    once, when the kernel starts (a factory that raises
    :class:`hsu.errors.HsuError` is logged and the kernel runs without
    storage: no re-attach, and the Storage service answers UNAVAILABLE).
    """


@_hookspec
def hsu_register_watchers(register: Register[Watcher]) -> None:
    """Register a watcher of units' instances (idle instances, resource use),
    under a name.

    :param register: ``register(name, watcher)`` with a
        :class:`hsu.ports.Watcher`. For each unit whose spec it ``wants``,
        the kernel runs ``watcher.watch(kernel, unit)`` while the unit runs,
        and again after a reload that changed the unit. ``watcher.settings``
        names the unit settings it acts on: a unit that sets one no enabled
        watcher claims is a config error naming the field and the blocked
        plugins (built in: ``idle`` claims ``idle_timeout``, ``limits`` the
        thresholds of ``limits``). A clashing name is an error naming both
        plugins.

    Called once for each plugin, when it is registered.
    """


@_hookspec
def hsu_register_exporters(
    register: Register[Callable[[KernelAPI], Exporter]],
) -> None:
    """Register a metrics exporter, under a name the deployment refers to.

    :param register: ``register(name, factory)``; ``factory(kernel)`` returns
        a :class:`hsu.metrics.Exporter` (``start()`` and ``stop()``, both
        awaitables); it may read its own settings section with
        ``kernel.settings(NAME)``. Between the two, the exporter reads
        ``kernel.metrics.collect()`` when it wants values (a scrape, its own
        timer). The deployment starts exporters with ``kernel.exporters:
        [NAME, ...]`` (built in: ``prometheus``). A clashing name is an error
        naming both plugins.

    Called once for each plugin, when it is registered; the factory is called
    once per kernel start, after its servers listen and before its units start.
    """


@_hookspec
def hsu_register_caches(
    register: Register[Callable[[KernelAPI], Cache]],
) -> None:
    """Register a cache layer, under a name the deployment refers to.

    :param register: ``register(name, factory)``; ``factory(kernel)`` returns
        a :class:`hsu.ports.Cache` (reading its own settings section with
        ``kernel.settings(NAME)``). The deployment stacks layers in order with
        ``kernel.caches: [memory, redis]`` (default: the one registered with
        ``default=True``, built in ``memory``); the kernel caches routed
        replies there (``routing.cache``) and serves the layers to HSUs as
        ``hsu.cache.v1.Cache`` (docs/cache.md). A clashing name is an error
        naming both plugins.

    Called once for each plugin, when it is registered; the factory is called
    once, when the kernel starts (a factory that raises is logged and the
    kernel runs without that layer).
    """


# -------------------------------------------------------------------------
# Kernel lifecycle: created -> starting -> running -> stopping -> stopped.
# Each hook is called for every plugin in turn; an awaitable result is
# awaited before the next plugin's. An exception in starting or started
# fails the start; in stopping or stopped it is logged and the stop goes on.
# -------------------------------------------------------------------------


@_hookspec(historic=True)
def hsu_kernel_configure(kernel: KernelAPI) -> None:
    """The deployment is loaded and every plugin registered; nothing runs yet.

    The place to read settings (``kernel.settings(NAME)``) and prepare state.
    Must not do I/O. Historic: a plugin registered later is configured too.

    :param kernel: the kernel being built (:class:`hsu.ports.KernelAPI`).
    """


@_hookspec(firstresult=True)
def hsu_kernel_address(kernel: KernelAPI, requested: str) -> str | DataPlane | None:
    """Move the kernel's data plane off the address a plugin serves itself.

    For a data plane in front of the kernel's (``hsu_plugins.gateway.nginx``):
    it takes the requested address, so clients keep one address, and forwards
    the unit interfaces it does not route itself to the kernel's data plane at
    the address it returns here. The control plane (``kernel.control``) never
    moves; HSUs register there. Must not do I/O.

    :param kernel: the kernel being built, configured but not listening;
        ``kernel.requested_address`` stays what was asked for.
    :param requested: the address the deployment's ``kernel.address`` or
        ``--address`` asked for.
    :returns: where the kernel's gRPC server should listen instead
        (``host:port`` or ``unix:PATH``), or a :class:`hsu.ports.DataPlane`
        that also says whether the plugin enforces auth on what it forwards
        (a deployment with auth on starts only then), or ``None`` to leave it
        at ``requested``.

    Called once, from the kernel's constructor, right after
    :func:`hsu_kernel_configure` (so plugin state registered there answers
    too); the first non-None result wins.
    """


@_hookspec
def hsu_kernel_handlers(kernel: KernelAPI) -> Sequence[RpcHandler] | None:
    """gRPC handlers the kernel's own server serves besides its API.

    For a gateway: a ``grpc.GenericRpcHandler`` that takes the calls of
    methods the kernel does not serve (the built-in ``gateway`` plugin
    forwards each to an instance of the unit serving its interface). The
    kernel's own services (its API, Core, health, reflection) are asked
    first, then every plugin's handlers in hook order.

    :param kernel: the kernel, ``starting``; its server is being built and
        does not listen yet.
    :returns: the handlers, or ``None`` for none. Every plugin's are served.

    Called once per start, before the server listens. A handler that holds
    resources releases them in :func:`hsu_kernel_stopped` (the server has
    stopped by then).
    """


@_hookspec
def hsu_kernel_starting(kernel: KernelAPI) -> Awaitable[None] | None:
    """The kernel entered ``starting``; its gRPC server is not listening yet.

    :param kernel: the kernel.
    :returns: ``None`` or an awaitable, awaited before the next plugin's.
    """


@_hookspec
def hsu_kernel_started(kernel: KernelAPI) -> Awaitable[None] | None:
    """The kernel is ``running``: serving, healthy, ``at-start`` units up.

    A plugin that works for the kernel's whole life starts its task here and
    stops it in :func:`hsu_kernel_stopping`.

    :param kernel: the kernel; ``kernel.address`` is where it listens.
    :returns: ``None`` or an awaitable, awaited before the next plugin's.
    """


@_hookspec
def hsu_kernel_stopping(kernel: KernelAPI) -> Awaitable[None] | None:
    """The kernel is draining: health says NOT_SERVING, instances stop next.

    :param kernel: the kernel.
    :returns: ``None`` or an awaitable, awaited before instances are stopped.
    """


@_hookspec
def hsu_kernel_stopped(kernel: KernelAPI) -> Awaitable[None] | None:
    """The kernel has stopped: every instance it started is gone.

    :param kernel: the kernel.
    :returns: ``None`` or an awaitable.
    """


# -------------------------------------------------------------------------
# Instances
# -------------------------------------------------------------------------


@_hookspec
def hsu_instance_registered(kernel: KernelAPI, instance: InstanceView) -> Awaitable[None] | None:
    """An HSU completed the handshake: it listens and said what it serves.

    :param kernel: the kernel.
    :param instance: the instance (:class:`hsu.ports.InstanceView`), now ``ready``, with its
        ``address`` and ``interfaces`` set.
    :returns: ``None`` or an awaitable.
    """


@_hookspec
def hsu_instance_env(kernel: KernelAPI, unit: str, instance_id: str) -> Mapping[str, str] | None:
    """Extra environment for a process the kernel is about to launch.

    For what only a plugin knows at launch: a leadership plugin passes the
    fencing token of the term the instance runs in (hsu-plugin-etcd's
    ``HSU_FENCING_TOKEN``).

    :param kernel: the kernel.
    :param unit: the unit's name.
    :param instance_id: the instance being launched.
    :returns: variables to add, or ``None``. Every plugin's are added, after
        the unit's ``env`` and before the kernel's own ``HSU_*`` variables,
        which a plugin cannot replace. Called synchronously, for every launch
        (restarts included); an exception fails that launch.
    """


@_hookspec
def hsu_instance_draining(kernel: KernelAPI, instance: InstanceView) -> Awaitable[None] | None:
    """An instance is draining: return once you send it no new call.

    For a data plane outside the kernel, whose calls the kernel does not
    count: the instance's calls in flight are counted down (and it is then
    stopped) only after every implementation returned, so a call that plane
    picked the instance for just before is not cut.

    :param kernel: the kernel.
    :param instance: the instance (:class:`hsu.ports.InstanceView`), in state
        ``stopping``; its endpoint is ``draining`` in the registry already.
    :returns: ``None`` or an awaitable that completes once no new call goes
        to the instance.

    Called once per draining instance that was routable, one plugin at a
    time, each result awaited before the next plugin's. All share the unit's
    ``routing.drain_timeout`` with the countdown that follows: an awaitable
    still pending when it runs out is cancelled, as are the hooks after it;
    that and an exception are logged, and the drain goes on either way.
    """


@_hookspec
def hsu_instance_event(kernel: KernelAPI, instance: InstanceView, event: Event) -> None:
    """An instance moved from one state to another (every transition).

    Called synchronously, in the kernel's event loop, as the move happens: keep
    it quick and do not raise. For I/O, queue the event and handle it in a
    task of your own. The same events stream to ``Kernel.WatchEvents``.

    :param kernel: the kernel.
    :param instance: the instance (:class:`hsu.ports.InstanceView`) (its ``state`` is the new one).
    :param event: the :class:`hsu.ports.Event`: ``from_state``, ``to_state``,
        ``reason``, ``pid``, ``seq`` and ``at``.
    """


@_hookspec
def hsu_endpoint_removed(kernel: KernelAPI, endpoint: Endpoint) -> None:
    """No endpoint in the registry listens at ``endpoint.address`` any more.

    For plugins that keep something per address (a gateway's pooled
    channel): drop it. Called synchronously in the kernel's event loop, as
    the registry's change arrives: keep it quick and do not raise.

    :param kernel: the kernel.
    :param endpoint: the :class:`hsu.ports.Endpoint` that left the registry,
        the last one at its address.
    """


@_hookspec
def hsu_routed_call(kernel: KernelAPI, call: RoutedCall) -> None:
    """A call the kernel routed ended: through its gateway (all its tries,
    or refused before the first: no unit serves the interface, no instance
    could be started), or through a data plane outside the kernel's process
    (nginx), which reports it afterwards (``KernelAPI.report_routed_call``).

    For tracing and access logs: ``call.span`` is the kernel's span of the
    call when it is traced (its ``parent_id`` the caller's span, "" for a
    trace the kernel started, ``kernel.trace_sample``), and ``call.spans``
    its parts when sampled (cold start, picks, attempts: each attempt's
    span is its instance's parent; docs/tracing.md). Called
    synchronously in the kernel's event loop, on the call's path, only when
    a plugin implements it: keep it to microseconds (queue the record and
    export it elsewhere) and do not raise; one that raises is logged.

    :param kernel: the kernel.
    :param call: the :class:`hsu.ports.RoutedCall`: ``kind``, ``method``,
        ``unit``, ``code``, ``start_ns``, ``end_ns``, ``span`` and ``spans``.
    """


# -------------------------------------------------------------------------
# Configuration
# -------------------------------------------------------------------------


@_hookspec
def hsu_config_reloaded(
    kernel: KernelAPI, old: Deployment, changes: Changes
) -> Awaitable[None] | None:
    """A new deployment was applied (SIGHUP, ``hsu reload``, a watched file).

    Called after the units changed; ``kernel.deployment`` is the new one and
    ``kernel.settings(NAME)`` returns the new settings. A reload that was
    rejected (an invalid config) calls nothing: the old one stays.

    :param kernel: the kernel.
    :param old: the :class:`hsu.Deployment` that was replaced.
    :param changes: a :class:`hsu.ports.Changes`: unit names ``added``,
        ``removed``, ``changed`` (of which ``restarted`` got new processes) and
        the plugin ``sections`` that differ.
    :returns: ``None`` or an awaitable.
    """
