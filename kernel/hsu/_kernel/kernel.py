"""The kernel: the lifecycle, the instances it started, and its gRPC server.

Everything else reaches it through plugins (:mod:`hsu.hookspecs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
from loguru import logger

from hsu import validate
from hsu._kernel import auth, control
from hsu._kernel import events as events_mod
from hsu._kernel.caches import layer_names, open_caches
from hsu._kernel.config.defaults import with_defaults
from hsu._kernel.config.model import (
    Deployment,
    KernelSettings,
    Placement,
    UnitKind,
    UnitSpec,
    check_units,
    start_order,
    structure_sections,
)
from hsu._kernel.events import EventBus
from hsu._kernel.lifecycle import KERNEL_TRANSITIONS, KernelState, StateMachine, Transition
from hsu._kernel.logbuffer import LogBuffer
from hsu._kernel.metrics import KernelMetrics, check_exporters
from hsu._kernel.plugins import PluginManager, plugin_names
from hsu._kernel.routing import KernelRouting
from hsu._kernel.server import KernelServer
from hsu._kernel.supervision import resources, statefile
from hsu._kernel.supervision.containment import Containment
from hsu._kernel.supervision.instances import Instance, InstanceState, new_instance_id
from hsu._kernel.supervision.logfiles import LogFiles
from hsu._kernel.supervision.records import InstanceRecords
from hsu._kernel.supervision.resources import Sampler
from hsu._kernel.supervision.supervisor import (
    ENV_INSTANCE_ID,
    ENV_KERNEL_ADDRESS,
    ENV_UNIT,
    SHUTDOWN_SHARE,
    UnitSupervisor,
    all_settled,
    needs_new_processes,
)
from hsu._version import __version__
from hsu.cache import Layers
from hsu.errors import (
    ConfigError,
    HsuError,
    InvalidValue,
    NoSuchUnit,
    NotAllowed,
    OverLimit,
    PermissionDenied,
    Unauthenticated,
)
from hsu.metrics import CallMetrics
from hsu.metrics import Registry as MetricsRegistry
from hsu.metrics import enabled as metrics_enabled
from hsu.peer import ENV_KEY as ENV_CLUSTER_KEY
from hsu.peer import PeerSigner
from hsu.ports import (
    Changes,
    DataPlane,
    Event,
    Identity,
    ProbeTarget,
    Registry,
    SourceContext,
    Storage,
    Usage,
)
from hsu.process import PidfdHandle

if TYPE_CHECKING:
    from hsu.client.aio import RoutedChannel
    from hsu.ports import CallObserver, InstanceView, KernelAPI, RoutedCall

__all__ = ["ENV_INSTANCE_ID", "ENV_KERNEL_ADDRESS", "ENV_UNIT", "SHUTDOWN_SHARE", "Kernel"]


class Kernel:
    """A deployment brought to life.

    Build one with :meth:`from_deployment`; run it with :meth:`serve` (until a
    signal or Core.Shutdown) or drive :meth:`start` and :meth:`stop` yourself.
    """

    def __init__(
        self,
        deployment: Deployment,
        plugins: PluginManager,
        *,
        address: str | None = None,
        control_address: str | None = None,
        source_context: SourceContext | None = None,
    ):
        # the launchers, balancers, ... that units leave unnamed: the defaults
        # plugins declared (the kernel names none)
        self.plugins = plugins
        # every problem at once: those found reading the core keys, the
        # defaults, the plugin sections and the checks across units
        problems = list(deployment.problems)
        try:
            deployment = with_defaults(deployment, plugins)
        except ConfigError as exc:
            problems.extend(exc.problems)
        self.deployment = deployment
        #: how the deployment was read, to read it again on reload
        self.source_context = source_context
        try:
            self._settings = structure_sections(
                deployment, plugins.settings_classes(), plugin_names
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
        try:
            check_units(
                deployment, plugins.launcher_names(), self._probes(), **self._routing_plugins()
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
        for flag, given in (("--address", address), ("--control", control_address)):
            if given:
                try:
                    validate.listen_address(given, field=flag)
                except InvalidValue as exc:
                    problems.append(str(exc))
        if problems:
            raise ConfigError(problems, deployment.source)
        ks: KernelSettings = self._settings["kernel"]
        self.kernel_settings = ks
        #: the address the deployment (or ``--address``) asked for
        self.requested_address = address or ks.address
        #: where the kernel's gRPC server binds: the requested address, unless
        #: a plugin serving that one itself moves the kernel (hsu_kernel_address)
        self.bind_address = self.requested_address
        #: where the data plane listens, once it does (a port 0 resolved); ""
        #: when no plugin serves one (``hsu_kernel_handlers``)
        self.address = ""
        #: where the control plane listens (the Kernel API and the kernel's
        #: Core), once it does; HSUs are given this
        self.control_address = ""
        self.version = __version__
        #: ``text`` or ``json``: the kernel's log records and its HSUs'
        #: (``HSU_LOG_FORMAT``); ``hsu run --log-format`` sets it
        self.log_format = ks.log_format.value
        self.pid = os.getpid()
        self.created_at = time.time()
        self.machine: StateMachine[KernelState] = StateMachine(
            "kernel", KernelState.CREATED, KERNEL_TRANSITIONS
        )
        self.machine.listeners.append(
            lambda t: logger.info(
                "kernel {} -> {}{}",
                t.source.value,
                t.target.value,
                f" ({t.reason})" if t.reason else "",
            )
        )
        self.instances: dict[str, Instance] = {}
        self.units: dict[str, UnitSupervisor] = {}
        self.events = EventBus()
        #: each instance's PublishEvent budget
        self._publish_rates: dict[str, validate.RateLimit] = {}

        def publish(t: Transition[KernelState]) -> None:
            self.events.publish(
                "kernel", from_state=t.source.value, to_state=t.target.value, reason=t.reason
            )

        self.machine.listeners.append(publish)
        self.logs = LogBuffer(ks.log_tail)
        state_dir = Path(deployment.base_dir, ks.state_dir or f".hsu/{deployment.name}")
        self.state_dir = state_dir
        #: where the control plane binds: ``kernel.control``, else a unix
        #: socket in the state dir
        self.control_bind = (
            control_address or ks.control or control.default_socket(state_dir, deployment.name)
        )
        self._control_entry: Path | None = None
        self.state_path: Path | None = state_dir / "state.json"
        self.logfiles = LogFiles(
            state_dir / "logs", max_bytes=ks.log_max_bytes, backups=ks.log_backups
        )
        # what an HSU prints of a resolved secret is hidden from the kernel's
        # log, StreamLogs and error messages (the deployment of the moment)
        self.logfiles.redact = lambda line: self.deployment.secrets.redact(line)
        self.sampler = Sampler()
        #: cgroups or the child subreaper: what an instance starts ends with it
        #: the soft RLIMIT_NOFILE the HSUs start with (None: the kernel's own)
        self.child_nofile: int | None = None
        self.containment = Containment(lambda: [i.pid for i in self.instances.values() if i.pid])
        self.routing = KernelRouting(self)
        check_exporters(ks.exporters, plugins.names("exporter"))
        layer_names(ks.caches, plugins)
        #: its metrics (``kernel.metrics``), before plugins configure
        self.metrics_hub = KernelMetrics(self, ks.metrics and metrics_enabled())
        self._background: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()
        self._save_pending = False
        #: the storage plugin's store (``kernel.storage``), opened as the kernel starts
        self.storage: Storage | None = None
        #: the cache layers (``kernel.caches``), opened as the kernel starts
        self.cache_layers: Layers | None = None
        self.records = InstanceRecords(None, state_dir, self.state_path)
        self._create_time = statefile.create_time(os.getpid()) or 0.0
        self._server: KernelServer | None = None
        self._stop_requested: asyncio.Event | None = None
        self._stop_reason = ""
        self._drain_grace: float | None = None
        self._serving = False
        self._stopped: asyncio.Event | None = None
        self._log_sink: int | None = None
        #: plugins registered through register_plugin, unregistered at the end
        self._own_plugins: list[str] = []
        #: the cluster key and its signer (``peer_signer``)
        self._peer_signer: tuple[str, PeerSigner] | None = None
        plugins.configure(self)
        # after configure: the per-kernel plugin state registered there answers
        moved = plugins.kernel_address(self, self.requested_address)
        #: the plugin that moved the data plane checks what it forwards (auth)
        self.moved_plane_enforces_auth = isinstance(moved, DataPlane) and moved.enforces_auth
        if isinstance(moved, DataPlane):
            moved = moved.address
        self.bind_address = moved or self.requested_address

    @classmethod
    def from_deployment(
        cls,
        deployment: Deployment,
        *,
        plugins: list[str] | tuple[str, ...] = (),
        address: str | None = None,
        env: Mapping[str, str] | None = None,
        autoload: bool | None = None,
    ) -> Kernel:
        """Load plugins (deployment's list, then ``plugins``) and build the kernel."""
        pm = PluginManager.load([*deployment.plugins, *plugins], env=env, autoload=autoload)
        return cls(deployment, pm, address=address)

    # -- what plugins ask for (hsu.ports.KernelAPI) ---------------------------

    @property
    def registry(self) -> Registry | None:
        return self.routing.registry

    @property
    def routes(self) -> KernelRouting:
        return self.routing

    @property
    def metrics(self) -> MetricsRegistry:
        return self.metrics_hub.registry

    @property
    def calls(self) -> CallMetrics | None:
        return self.metrics_hub.calls

    @property
    def cache(self) -> Layers | None:
        return self.cache_layers

    @property
    def call_observer(self) -> CallObserver | None:
        return self.metrics_hub.observer()

    def report_routed_call(self, call: RoutedCall) -> None:
        self.metrics_hub.report(call)

    def register_plugin(self, plugin: object, name: str) -> str:
        """Per-kernel plugin state: registered now, unregistered when the kernel
        has stopped (after ``hsu_kernel_stopped``)."""
        registered = self.plugins.register(plugin, name)
        self._own_plugins.append(registered)
        return registered

    def _unregister_own_plugins(self) -> None:
        for name in self._own_plugins:
            self.plugins.unregister(name)
        self._own_plugins.clear()

    def plugin(self, name: str) -> object | None:
        return self.plugins.pm.get_plugin(name)

    def publish(
        self,
        topic: str,
        *,
        data: Mapping[str, str] | None = None,
        reason: str = "",
        unit: str = "",
        instance_id: str = "",
    ) -> Event:
        """A plugin's event on ``topic`` (:meth:`hsu.ports.KernelAPI.publish`)."""
        validate.topic(topic)
        if events_mod.reserved(topic):
            raise InvalidValue(f"topic {topic!r}: {topic.split('.', 1)[0]}.* is the kernel's own")
        return self.events.publish(
            "plugin",
            topic=topic,
            data=validate.labels(data or {}, field="data"),
            reason=validate.text(reason, field="reason"),
            unit=unit,
            instance_id=instance_id,
        )

    def subscribe(
        self, *topics: str, replay: bool = False, unit: str = ""
    ) -> AsyncIterator[Event | int]:
        """Events on ``topics`` (:meth:`hsu.ports.KernelAPI.subscribe`)."""
        validate.topic_patterns(topics)
        return self.events.subscribe(replay=replay, unit=unit, topics=topics)

    def caller_identity(self) -> Identity | None:
        """The verified identity of the call being served (docs/auth.md)."""
        return auth.CALLER.get()

    def check_call(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]], peer: str
    ) -> Identity | None:
        """Authenticate and authorize a data-plane call a plugin forwards itself
        (:meth:`hsu.ports.KernelAPI.check_call`)."""
        gate = self._server.auth if self._server is not None else None
        if gate is None:
            return None
        try:
            ident = gate.authenticate_call(method, tuple(metadata), peer, "data", {})
            gate.authorize(ident, method, gate.unit_of_interface(method[1:].partition("/")[0]))
        except auth.Refused as refused:
            if refused.code is grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(refused.message) from None
            if refused.code is grpc.StatusCode.PERMISSION_DENIED:
                raise PermissionDenied(refused.message) from None
            raise HsuError(refused.message) from None
        return ident

    def forward_identity(self, identity: Identity, instance_id: str) -> str | None:
        """``identity`` as the ``hsu-identity`` value for ``instance_id``, signed
        with that instance's secret (None without auth, or when it has none)."""
        gate = self._server.auth if self._server is not None else None
        return gate.sign_for(identity, instance_id) if gate is not None else None

    # -- calls across hosts (kernel.advertise, kernel.cluster_key) ----------

    @property
    def peer_signer(self) -> PeerSigner | None:
        """What signs calls to instances with the cluster key (:mod:`hsu.peer`),
        or None without ``kernel.cluster_key``."""
        key = self.kernel_settings.cluster_key
        if not key:
            return None
        if self._peer_signer is None or self._peer_signer[0] != key:
            self._peer_signer = (key, PeerSigner(key))
        return self._peer_signer[1]

    def peer_env(self, unit_env: Mapping[str, str]) -> dict[str, str]:
        """What an instance is given for calls across hosts: where to listen
        (the advertised host, unless its unit sets ``HSU_LISTEN``) and the
        cluster key its server checks calls with."""
        ks = self.kernel_settings
        env = {}
        if ks.advertise and "HSU_LISTEN" not in unit_env:
            host = ks.advertise
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            env["HSU_LISTEN"] = f"{host}:0"
        if ks.cluster_key:
            env[ENV_CLUSTER_KEY] = ks.cluster_key
        return env

    # -- settings ----------------------------------------------------------

    def settings(self, section: str) -> Any:
        """The typed settings of a plugin's section (its registered attrs class)."""
        try:
            return self._settings[section]
        except KeyError:
            known = ", ".join(sorted(self._settings))
            raise HsuError(
                f"no settings section {section!r} is registered (registered: {known})"
            ) from None

    # -- lifecycle ---------------------------------------------------------

    @property
    def state(self) -> KernelState:
        return self.machine.state

    async def start(self) -> None:
        """created -> starting -> running: listen, start ``at-start`` units, serve."""
        self.machine.move(KernelState.STARTING)
        if self._stop_requested is None:  # serve() makes it first
            self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._log_sink = logger.add(self.logs.sink, level="DEBUG", enqueue=False)
        # the cgroup check (a process of its own) and the storage's first read
        # (its thread) run while the servers start; both are done before an
        # instance is re-attached or started
        containing: asyncio.Future[None] | None = None
        loading: asyncio.Future[statefile.SavedState | None] | None = None
        try:
            await self.plugins.call_each("hsu_kernel_starting", kernel=self)
            self._check_exposure()
            control.secure_dir(self.state_dir)
            containing = asyncio.ensure_future(self.containment.start_async())
            self._open_storage()
            loading = asyncio.ensure_future(self.records.load())
            # the soft open-files limit up to the hard one; HSUs get the original
            self.child_nofile = resources.raise_open_files()
            self._server = KernelServer(self)
            self.control_address, self.address = await self._server.start(
                self.control_bind, self.bind_address
            )
            self._control_entry = control.publish(self.deployment.name, self.control_address)
            logger.info(
                "kernel {}: control on {}, data plane on {}",
                self.deployment.name,
                self.control_address,
                self.address or "(none: no plugin serves one)",
            )
            await self.routing.start()
            self.cache_layers = open_caches(self)
            await self.metrics_hub.start_exporters(self.kernel_settings.exporters)
            await containing
            assert loading is not None
            found = await self._reattach(await loading)
            self._background.append(asyncio.ensure_future(self.logfiles.run()))
            for name, spec in self.deployment.units.items():
                self.units[name] = UnitSupervisor(self, name, spec)
                for saved in found.get(name, [])[: spec.max_instances]:
                    self.units[name].add_slot(saved)
            for wave in start_order(self.deployment.units):
                await asyncio.gather(*(self._bring_up(n) for n in wave))
            self.save_state()
            # recorded (durably) before the kernel says SERVING: a kernel
            # SIGKILLed once it served re-attaches to what it started
            await asyncio.sleep(0)
            await self.records.flush()
            if self.kernel_settings.watch_config:
                self._background.append(asyncio.ensure_future(self._watch_config()))
            self.machine.move(KernelState.RUNNING)
            # SERVING once the plugins' started hooks are done: a data plane a
            # plugin serves (nginx) answers from then, not before
            await self.plugins.call_each("hsu_kernel_started", kernel=self)
            await self._server.set_serving(True)
        except BaseException as exc:
            # nothing of the start is left running under the teardown
            for pending in (containing, loading):
                if pending is not None:
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(pending)
            if isinstance(exc, asyncio.CancelledError) and self._stop_reason:
                # serve() gave up the start for a stop signal: a stop, not a failure
                await self._teardown(KernelState.STOPPED, f"{self._stop_reason} while starting")
            else:
                await self._teardown(KernelState.FAILED, f"start failed: {exc!r}")
            raise

    def _check_exposure(self) -> None:
        """Nothing listens off loopback unauthenticated unless the deployment
        says ``insecure: true`` (and then every start says so); with auth on
        (``auth.authenticators``) it may."""
        insecure = self.kernel_settings.insecure
        authenticated = auth.enabled(self)
        for what, address in (("control", self.control_bind), ("address", self.bind_address)):
            if authenticated and not control.is_loopback(address) and not self.kernel_settings.tls:
                logger.warning(
                    "kernel.{}: {} is reachable from other machines without TLS: credentials"
                    " cross the network in clear (kernel.tls)",
                    what,
                    address,
                )
            if control.check_exposure(what, address, insecure, authenticated):
                logger.warning(
                    "kernel.{}: {} is reachable from other machines and nothing"
                    " authenticates callers (kernel.insecure: true)",
                    what,
                    address,
                )

    async def _bring_up(self, name: str) -> None:
        sup = self.units[name]
        sup.start_aux()
        await all_settled([i.ready for i in sup.wanted])
        want = max(sup.spec.initial_instances, len(sup.wanted))
        await sup.scale(min(want, sup.spec.max_instances))
        failed = [i for i in sup.wanted if i.state is not InstanceState.READY]
        for inst in failed:
            logger.bind(unit=name, instance=inst.instance_id).error(
                "unit {} did not start: {}", name, inst.last_exit or inst.state.value
            )

    async def stop(self, reason: str = "requested") -> None:
        """Drain: NOT_SERVING, stop instances, finish calls in flight, stopped."""
        if self.state is KernelState.CREATED:
            self.machine.move(KernelState.STOPPED, reason)
            self._unregister_own_plugins()
            return
        if self.state in (KernelState.STOPPING, KernelState.STOPPED, KernelState.FAILED):
            if self._stopped is not None:
                await self._stopped.wait()
            return
        await self._teardown(KernelState.STOPPED, reason)

    async def _teardown(self, final: KernelState, reason: str) -> None:
        if self.machine.can(KernelState.STOPPING):
            self.machine.move(KernelState.STOPPING, reason)
        try:
            if self._server is not None:
                await self._server.drain()
            await self.plugins.call_each("hsu_kernel_stopping", stop_on_error=False, kernel=self)
            await self.stop_all_instances()
            await self.routing.close()
            await self.metrics_hub.stop_exporters()
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            for inst in list(self.instances.values()):
                self.logfiles.unfollow(inst.instance_id)
            await self.records.forget()
            control.unpublish(self._control_entry, self.control_address)
            self._control_entry = None
            # watchers and log followers get the end of their streams: a
            # stream left open would hold the server's stop for the whole grace
            self.events.close()
            self.logs.end_followers()
            if self._server is not None:
                grace = self._drain_grace
                await self._server.stop(
                    self.kernel_settings.drain_grace if grace is None else grace
                )
        finally:
            self.containment.close()
            await self._close_storage()
            await self._close_caches()
            self.machine.move(final, reason if final is KernelState.FAILED else "")
            await self.plugins.call_each("hsu_kernel_stopped", stop_on_error=False, kernel=self)
            self._unregister_own_plugins()
            if self._log_sink is not None:
                with contextlib.suppress(ValueError):
                    logger.remove(self._log_sink)
                self._log_sink = None
            if self._stopped is not None:
                self._stopped.set()

    def request_stop(self, reason: str) -> None:
        """Ask :meth:`serve` to drain; safe from signal handlers and RPCs."""
        self._stop_reason = self._stop_reason or reason
        if self._stop_requested is not None:
            self._stop_requested.set()

    def shutdown_from_rpc(self, grace: float, reason: str) -> None:
        """Core.Shutdown on the kernel: drain with the caller's grace."""
        self._drain_grace = grace
        self.request_stop(f"{reason} over gRPC")
        if self._stop_requested is not None and not self._serving:
            # driven by start()/stop() rather than serve(): stop here
            asyncio.get_running_loop().create_task(self.stop(self._stop_reason))

    async def serve(self) -> None:
        """Start, run until SIGTERM, SIGINT or Core.Shutdown, then drain."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for sig in signals[:2]:
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: self._background.append(asyncio.ensure_future(self.reload_logged("SIGHUP"))),
        )
        self._serving = True
        self._stop_requested = stop = asyncio.Event()
        try:
            # a stop signal during a long start (an HSU that never gets ready
            # within its startup_timeout) ends the start, not after it
            starting = asyncio.ensure_future(self.start())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                starting.cancel()
                raise
            finally:
                stopping.cancel()
            if not starting.done():
                logger.warning(
                    "kernel: {} while starting; stopping what started", self._stop_reason
                )
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                return
            starting.result()
            await stop.wait()
            await self.stop(self._stop_reason)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    def core_info(self) -> dict[str, Any]:
        return {
            "unit": "kernel",
            "instance_id": f"kernel-{self.pid}",
            "version": self.version,
            "interfaces": list(self._server.services if self._server else ()),
            "address": self.control_address,
        }

    # -- units and instances -----------------------------------------------

    def unit(self, name: str) -> UnitSpec:
        try:
            return self.deployment.units[name]
        except KeyError:
            known = ", ".join(sorted(self.deployment.units)) or "none"
            raise NoSuchUnit(f"no unit named {name!r} (units: {known})") from None

    def supervisor(self, name: str) -> UnitSupervisor:
        self.unit(name)
        return self.units[name]

    def connect(self) -> RoutedChannel:
        """A routed channel for generated stubs, over this kernel's own routes
        (no round trip to itself); see :func:`hsu.connect`."""
        from hsu.client.aio import local_channel

        return local_channel(self.routing, self.plugins, self.peer_signer)

    def units_serving(self, interface: str) -> list[str]:
        return [n for n, s in self.deployment.units.items() if interface in s.interfaces]

    async def instance_for(self, interface: str) -> Instance:
        """A ready instance serving ``interface``, started on demand if none is.

        Callers asking at the same time share one start.
        """
        ready = [
            i
            for i in self.instances.values()
            if i.state is InstanceState.READY and interface in i.interfaces
        ]
        if ready:
            inst = min(ready, key=lambda i: i.last_used)
        else:
            units = self.units_serving(interface)
            if not units:
                raise NoSuchUnit(f"no unit serves interface {interface!r}")
            if self.deployment.units[units[0]].placement is Placement.SINGLETON:
                raise HsuError(
                    f"unit {units[0]!r} is a singleton (placement: singleton): it runs only"
                    " where a leadership plugin scales it up, and this kernel runs none now"
                )
            inst = await self.units[units[0]].acquire()
        inst.last_used = time.monotonic()
        return inst

    async def start_instance(self, unit: str) -> Instance:
        """One more instance of ``unit`` (up to its max), once it is ready."""
        self._check_accepting(unit)
        sup = self.supervisor(unit)
        if len(sup.wanted) >= sup.spec.max_instances:
            raise HsuError(f"unit {unit!r} already runs max_instances={sup.spec.max_instances}")
        inst = sup.add_slot()
        await asyncio.shield(inst.ready)
        return inst

    def _check_accepting(self, unit: str) -> None:
        if self.state not in (KernelState.STARTING, KernelState.RUNNING):
            raise HsuError(f"kernel is {self.state.value}; not starting unit {unit!r}")

    async def remove_instance(
        self, inst: Instance, *, grace: float | None = None, reason: str = "requested"
    ) -> None:
        """Stop one instance and drop it; SIGKILL its process group after the grace."""
        sup = self.units.get(inst.unit)
        if not inst.managed or sup is None or inst.instance_id not in sup.slots:
            raise HsuError(f"instance {inst.instance_id} was not started by this kernel")
        await sup.remove(inst, reason=reason, grace=grace)

    async def scale(self, unit: str, count: int) -> None:
        """Run exactly ``count`` instances of ``unit``."""
        self._check_accepting(unit)
        sup = self.supervisor(unit)
        spec = sup.spec
        if not spec.min_instances <= count <= spec.max_instances:
            raise HsuError(
                f"unit {unit!r}: cannot scale to {count}: allowed"
                f" {spec.min_instances}..{spec.max_instances} (min_instances..max_instances)"
            )
        await sup.scale(count, reason=f"scaled to {count}")

    async def start_unit(self, unit: str) -> None:
        """Start the unit's stopped or fatal instances, or its first ones."""
        self._check_accepting(unit)
        sup = self.supervisor(unit)
        idle = [
            i
            for i in sup.slots.values()
            if i.state in (InstanceState.STOPPED, InstanceState.FATAL, InstanceState.BACKOFF)
        ]
        if idle:
            await asyncio.gather(*(sup.start(i) for i in idle))
        elif not sup.wanted:
            await sup.scale(max(1, sup.spec.initial_instances))

    async def stop_unit(self, unit: str, grace: float | None = None) -> None:
        """Stop every instance of the unit (they stay listed, stopped)."""
        await self.supervisor(unit).stop_all(f"unit {unit} stopped by request", grace)

    async def restart_unit(self, unit: str) -> None:
        """Replace the unit's processes one at a time, each once the last is ready."""
        self._check_accepting(unit)
        sup = self.supervisor(unit)
        for inst in list(sup.slots.values()):
            await sup.restart(inst, "restarted by request")

    async def restart_instance(
        self, instance_id: str, reason: str = "restarted by request"
    ) -> None:
        """Replace the instance's process (:meth:`hsu.ports.KernelAPI.restart_instance`)."""
        inst = self._instance(instance_id)
        await self.units[inst.unit].restart(inst, reason)

    async def stop_instance(self, instance_id: str, reason: str = "stopped by request") -> None:
        """Stop the instance's process; its slot stays
        (:meth:`hsu.ports.KernelAPI.stop_instance`)."""
        inst = self._instance(instance_id)
        await self.units[inst.unit].stop(inst, reason=reason)

    async def retire(self, instance_id: str, reason: str) -> bool:
        """Stop the instance and drop its slot unless the unit would go below
        its floor (:meth:`hsu.ports.KernelAPI.retire`)."""
        inst = self._instance(instance_id)
        sup = self.units[inst.unit]
        wanted = sup.wanted
        if inst not in wanted or len(wanted) <= sup.spec.min_instances:
            return False
        await sup.remove(inst, reason=reason)
        return True

    def usage(self, instance_id: str) -> Usage | None:
        """A sample of the instance's processes (:meth:`hsu.ports.KernelAPI.usage`)."""
        inst = self.instances.get(instance_id)
        if inst is None or not inst.pid:
            return None
        return self.sampler.sample(inst.pid, self.containment.members(instance_id))

    async def start_one(self, instance_id: str) -> None:
        inst = self._instance(instance_id)
        await self.units[inst.unit].start(inst)

    async def stop_one(self, instance_id: str, grace: float | None = None) -> None:
        inst = self._instance(instance_id)
        await self.units[inst.unit].stop(inst, reason="stopped by request", grace=grace)

    def _instance(self, instance_id: str) -> Instance:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise NoSuchUnit(f"no instance {instance_id!r}")
        if inst.unit not in self.units or instance_id not in self.units[inst.unit].slots:
            raise HsuError(f"instance {instance_id} was not started by this kernel")
        return inst

    async def stop_all_instances(self, reason: str = "kernel stopping") -> None:
        """Stop every unit, dependents before what they depend on."""
        for wave in reversed(start_order(self.deployment.units)):
            await asyncio.gather(*(self.units[n].stop_all(reason) for n in wave if n in self.units))
        for name in list(self.units):
            if name not in self.deployment.units:
                await self.units[name].stop_all(reason)

    # -- bookkeeping the supervisors ask for --------------------------------

    def adopt(self, inst: Instance) -> None:
        """An instance joins the kernel's table; its transitions become events."""
        self.instances[inst.instance_id] = inst
        # a partial, not a closure: ~150 bytes less per instance
        inst.machine.listeners.append(functools.partial(self._publish_transition, inst))

    def _publish_transition(self, inst: Instance, t: Transition[InstanceState]) -> None:
        # _value_, not .value: the enum property costs ~1 us a read
        source, target = t.source._value_, t.target._value_
        event = self.events.publish(
            "instance",
            unit=inst.unit,
            instance_id=inst.instance_id,
            from_state=source,
            to_state=target,
            reason=t.reason,
            pid=inst.pid,
        )
        self.routing.update(inst)
        hook = self.plugins.pm.hook.hsu_instance_event
        if hook.get_hookimpls():  # pluggy's call costs ~10 us even with none
            hook(kernel=self, instance=inst, event=event)
        worker = events_mod.worker_topic(source, target)
        if worker:
            self.events.publish(
                "worker",
                topic=worker,
                unit=inst.unit,
                instance_id=inst.instance_id,
                from_state=source,
                to_state=target,
                reason=t.reason,
                pid=inst.pid,
            )

    def forget(self, inst: Instance) -> None:
        self.instances.pop(inst.instance_id, None)
        self._publish_rates.pop(inst.instance_id, None)
        self.logfiles.unfollow(inst.instance_id)
        self.save_state()

    def logs_drain(self, inst: Instance) -> None:
        self.logfiles.drain(inst.instance_id)

    def output_tail(self, inst: Instance, n: int = 20) -> list[str]:
        return [line for _, line in self.logfiles.tail(inst.instance_id, n)]

    def save_state(self) -> None:
        """Write the state file soon (once per loop turn, however many changes)."""
        if self._save_pending or self.state_path is None:
            return
        self._save_pending = True
        asyncio.get_running_loop().call_soon(self._save_now)

    def _save_now(self) -> None:
        self._save_pending = False
        if self.state_path is None or self.state in (KernelState.STOPPED, KernelState.FAILED):
            return
        saved = []
        for inst in self.instances.values():
            if not inst.managed or not inst.pid or inst.unit not in self.units:
                continue
            if inst.state not in (InstanceState.STARTING, InstanceState.READY):
                continue
            if self.units[inst.unit].spec.kind is UnitKind.UNMANAGED:
                continue
            known = inst.pid_created
            if known is None or known[0] != inst.pid:
                created = statefile.create_time(inst.pid)
                if created is None:
                    continue
                known = inst.pid_created = (inst.pid, created)
            saved.append(
                statefile.SavedInstance(
                    inst.instance_id,
                    inst.unit,
                    inst.pid,
                    known[1],
                    inst.address,
                    inst.interfaces,
                    inst.started_at,
                    inst.restarts,
                    inst.token,
                )
            )
        self.records.save(
            statefile.SavedState(os.getpid(), self._create_time, self.deployment.name, tuple(saved))
        )

    def _open_storage(self) -> None:
        """The deployment's storage (``kernel.storage``, else the default one);
        none when no plugin provides one or it cannot be made: the kernel runs,
        keeping no records (logged)."""
        name = self.kernel_settings.storage or self.plugins.default("storage")
        if name is None:
            logger.warning(
                "no storage: {}; the kernel keeps no instance records (no re-attach after"
                " a restart) and HSUs get no Storage service",
                self.plugins.missing("storage"),
            )
            return
        try:
            self.storage = self.plugins.storage(name)(self)
        except HsuError as exc:
            logger.error("kernel.storage: {}: {}; running without storage", name, exc)
            return
        self.records = InstanceRecords(self.storage, self.state_dir, self.state_path)

    async def _close_caches(self) -> None:
        caches, self.cache_layers = self.cache_layers, None
        if caches is not None:
            self.metrics.remove_collector("cache")
            await caches.close()

    async def _close_storage(self) -> None:
        storage, self.storage = self.storage, None
        if storage is not None:
            try:
                await storage.close()
            except Exception as exc:
                logger.error("closing the storage {}: {!r}", storage.describe, exc)

    async def _reattach(
        self, saved: statefile.SavedState | None
    ) -> dict[str, list[statefile.SavedInstance]]:
        """Instances a kernel that died left running (``saved``: what
        :meth:`InstanceRecords.load` read), by unit; end the orphans."""
        if saved is None:
            return {}
        if saved.kernel_pid != os.getpid() and statefile.is_running(
            saved.kernel_pid, saved.kernel_create_time
        ):
            raise HsuError(
                f"another kernel (pid {saved.kernel_pid}) runs deployment {saved.deployment!r}"
                f" with state in {self.records.where}; stop it first"
            )
        found: dict[str, list[statefile.SavedInstance]] = {}
        for si in saved.instances:
            if not statefile.is_running(si.pid, si.create_time):
                logger.info(
                    "instance {} (pid {}) is gone since the last kernel", si.instance_id, si.pid
                )
                continue
            spec = self.deployment.units.get(si.unit)
            if spec is None or not self.kernel_settings.reattach:
                why = "its unit is gone" if spec is None else "reattach is off"
                logger.warning("stopping pid {} left by the last kernel ({})", si.pid, why)
                self.containment.adopt(si.instance_id, si.pid)
                await _end_orphan(si.pid, spec.stop_grace if spec else 10.0)
                await self.containment.end(si.instance_id, si.pid)
                continue
            found.setdefault(si.unit, []).append(si)
        return found

    # -- the handshake -------------------------------------------------------
    #
    # Who may register: a process this kernel spawned, proven by the token it
    # was given (HSU_INSTANCE_TOKEN, sent as hsu-instance-token metadata) and
    # its pid; or an instance of a unit declared ``kind: unmanaged`` that
    # carries the unit's ``token``. Every field is checked (hsu.validate).
    # Calls that prove nothing share one token bucket; what they may create is
    # capped. See docs/security.md, "Registration".

    #: instances of one unmanaged unit registered at once
    MAX_REGISTERED_PER_UNIT: ClassVar[int] = 64
    #: instances the kernel lists at once; a registration beyond is refused
    MAX_INSTANCES: ClassVar[int] = 4096
    #: interfaces one Register may list
    MAX_INTERFACES: ClassVar[int] = 64
    #: the largest ``inflight`` a load report may carry
    MAX_INFLIGHT: ClassVar[int] = 1_000_000
    #: calls that prove nothing (Register, Deregister, ReportLoad streams
    #: without a valid token, and every unmanaged Register): per second, burst
    UNPROVEN_RATE: ClassVar[tuple[float, float]] = (50.0, 100.0)
    #: load reports on one ReportLoad stream: per second, burst (the SDK sends
    #: at most 10 a second)
    LOAD_REPORT_RATE: ClassVar[tuple[float, float]] = (20.0, 40.0)
    #: a self-registered instance with no ``health`` is probed by the default
    #: probe this often (seconds), with this timeout, and dropped after this
    #: many failures in a row
    REGISTERED_PROBE: ClassVar[tuple[float, float, int]] = (2.0, 1.0, 3)

    @functools.cached_property
    def _unproven(self) -> validate.RateLimit:
        return validate.RateLimit(*self.UNPROVEN_RATE)

    def _slot(self, inst: Instance | None) -> Instance | None:
        """``inst`` if it is a slot of one of this kernel's supervisors."""
        if inst is None or not inst.managed:
            return None
        sup = self.units.get(inst.unit)
        return inst if sup is not None and sup.slots.get(inst.instance_id) is inst else None

    def _proves(self, inst: Instance, token: str) -> bool:
        """Whether ``token`` is ``inst``'s secret: the one its process was
        spawned with, or (self-registered) its unit's ``token``."""
        import hmac  # not at start (docs/benchmarks.md, Footprint)

        if inst.managed:
            expected = inst.token
        else:
            expected = getattr(self.deployment.units.get(inst.unit), "token", None) or ""
        return bool(expected and token) and hmac.compare_digest(token.encode(), expected.encode())

    async def register(
        self,
        *,
        instance_id: str,
        unit: str,
        address: str,
        interfaces: tuple[str, ...],
        pid: int,
        version: str = "",
        metadata: dict[str, str] | None = None,
        token: str = "",
    ) -> Instance:
        """The handshake: an HSU says where it listens and what it serves.

        ``token`` is the caller's ``hsu-instance-token``. Raises
        :class:`~hsu.errors.NotAllowed` (not proven), :class:`~hsu.errors.OverLimit`
        (rate or caps), :class:`~hsu.errors.InvalidValue` (a field) or
        :class:`HsuError` (the instance's state); each one line.
        """
        slot = self._slot(self.instances.get(instance_id) if instance_id else None)
        proven = slot is not None and self._proves(slot, token)
        if not proven:
            self._unproven.check("Register")
        try:
            interfaces, version, metadata = self._register_fields(
                address, interfaces, pid, version, metadata
            )
            if slot is not None:
                inst = self._register_slot(slot, proven, address, pid)
            else:
                inst = self._register_new(instance_id, unit, address, interfaces, pid, token)
        except (NotAllowed, InvalidValue) as exc:
            if not proven:
                logger.warning("refused: {}", exc)
            raise
        inst.address = address
        inst.interfaces = interfaces
        inst.version = version
        inst.metadata = metadata
        inst.registered_at = time.time()
        logger.bind(unit=inst.unit, instance=inst.instance_id).info(
            "registered at {} serving {}", address, ", ".join(interfaces)
        )
        if slot is not None:
            inst.registered.set_result(None)
        else:
            task = asyncio.ensure_future(self._watch_registered(inst))
            self._background.append(task)
            task.add_done_callback(self._task_done)
        self.events.publish(
            "service",
            topic="service.registered",
            unit=inst.unit,
            instance_id=inst.instance_id,
            pid=inst.pid,
            data={"address": address, "interfaces": ",".join(interfaces), "version": version},
        )
        await self.plugins.call_each(
            "hsu_instance_registered", stop_on_error=False, kernel=self, instance=inst
        )
        return inst

    def _task_done(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._background.remove(task)

    def _register_fields(
        self,
        address: str,
        interfaces: tuple[str, ...],
        pid: int,
        version: str,
        metadata: dict[str, str] | None,
    ) -> tuple[tuple[str, ...], str, dict[str, str]]:
        """The fields every Register must get right (the address is checked
        once it is known whose it is)."""
        try:
            validate.address(address)
            if not interfaces:
                raise InvalidValue("interfaces: at least one interface is required")
            if len(interfaces) > self.MAX_INTERFACES:
                raise InvalidValue(
                    f"interfaces: {len(interfaces)} listed; at most {self.MAX_INTERFACES}"
                )
            for i, name in enumerate(interfaces):
                validate.interface_name(name, field=f"interfaces[{i}]")
            if pid < 0:
                raise InvalidValue(f"pid: {pid} is not a process id")
            version = validate.version(version)
            labels = validate.labels(metadata or {})
            if "weight" in labels:
                validate.weight(labels["weight"], field="metadata[weight]")
        except InvalidValue as exc:
            raise InvalidValue(f"Register: {exc}") from None
        return tuple(dict.fromkeys(interfaces)), version, labels

    def _register_slot(self, inst: Instance, proven: bool, address: str, pid: int) -> Instance:
        """A Register for an instance this kernel spawned: its process's token
        and pid, while it starts, once; an address on this host."""
        name = inst.instance_id
        if not proven:
            raise NotAllowed(
                f"Register: instance {validate.shown(name)} was started by this kernel;"
                " the caller's hsu-instance-token is missing or wrong"
            )
        if pid != inst.pid or not pid:
            raise NotAllowed(
                f"Register: instance {name} was started as pid {inst.pid or '(none yet)'},"
                f" not {pid}; a wrapper must exec the HSU"
            )
        if inst.state is not InstanceState.STARTING:
            raise HsuError(f"Register: instance {name} is {inst.state.value}")
        if inst.registered.done():
            raise HsuError(f"Register: instance {name} is already registered")
        spec = self.units[inst.unit].spec
        base = self.deployment.base_dir
        cwd = Path(base, spec.cwd) if spec.cwd else Path(base)
        listen = spec.env.get("HSU_LISTEN")
        self._check_address(
            address, dirs=(self.state_dir, cwd), also=(listen,) if listen else (), advertised=True
        )
        return inst

    def _register_new(
        self,
        instance_id: str,
        unit: str,
        address: str,
        interfaces: tuple[str, ...],
        pid: int,
        token: str,
    ) -> Instance:
        """A Register from an instance this kernel did not start: only for a
        declared ``unmanaged`` unit, with its token, within the caps."""
        import hmac  # not at start (docs/benchmarks.md, Footprint)

        if instance_id:
            raise NotAllowed(
                f"Register: instance {validate.shown(instance_id)} was not started by this"
                " kernel; an instance of an unmanaged unit registers with an empty instance_id"
            )
        if not unit:
            raise InvalidValue("Register: unit is required for an HSU this kernel did not start")
        if self.state not in (KernelState.STARTING, KernelState.RUNNING):
            raise HsuError(f"Register: the kernel is {self.state.value}; not taking new instances")
        try:
            validate.unit_name(unit)
        except InvalidValue as exc:
            raise InvalidValue(f"Register: {exc}") from None
        spec = self.deployment.units.get(unit)
        if spec is None:
            raise NotAllowed(
                f"Register: deployment {self.deployment.name!r} has no unit {unit!r}; only"
                " instances this kernel started and those of an unmanaged unit may register"
            )
        if spec.kind is not UnitKind.UNMANAGED:
            raise NotAllowed(
                f"Register: unit {unit!r} is {spec.kind.value}: the kernel starts its"
                " instances itself; only an unmanaged unit's instances register on their own"
            )
        expected = getattr(spec, "token", None)
        if not expected:
            raise NotAllowed(
                f"Register: unit {unit!r} has no token; set units.{unit}.token to let"
                " its instances register"
            )
        if not (token and hmac.compare_digest(token.encode(), str(expected).encode())):
            raise NotAllowed(
                f"Register: the hsu-instance-token for unit {unit!r} is missing or wrong"
            )
        undeclared = [i for i in interfaces if i not in spec.interfaces]
        if undeclared:
            raise NotAllowed(
                f"Register: unit {unit!r} does not serve {undeclared[0]!r} (its interfaces:"
                f" {', '.join(spec.interfaces) or 'none'})"
            )
        if self.units.get(unit) is None or self._registered_probe(spec) is None:
            raise HsuError(f"Register: unit {unit!r} has no health probe to check its instances")
        self._check_address(
            address,
            dirs=(self.state_dir, self.deployment.base_dir),
            also=(spec.address,) if spec.address else (),
        )
        mine = sum(1 for i in self.instances.values() if i.unit == unit and not i.managed)
        if mine >= self.MAX_REGISTERED_PER_UNIT:
            raise OverLimit(
                f"Register: unit {unit!r} has {mine} registered instances;"
                f" at most {self.MAX_REGISTERED_PER_UNIT}"
            )
        if len(self.instances) >= self.MAX_INSTANCES:
            raise OverLimit(
                f"Register: the kernel lists {len(self.instances)} instances;"
                f" at most {self.MAX_INSTANCES}"
            )
        inst = Instance(new_instance_id(unit), unit, managed=False, pid=pid)
        self.adopt(inst)
        inst.machine.move(InstanceState.STARTING, "registered; probing its address")
        return inst

    def _check_address(
        self,
        address: str,
        *,
        dirs: tuple[str | Path, ...],
        also: tuple[str, ...],
        advertised: bool = False,
    ) -> None:
        """A registered address is on this host and is not the kernel's own:
        loopback, a unix socket in ``dirs``, or one of ``also`` (declared);
        with ``advertised`` (an instance the kernel started, its server
        checked for the cluster's proof) also on ``kernel.advertise``."""
        # the control server's own socket behind the peercred proxy, too
        internal = self._server.internal if self._server is not None else ""
        advertise = self.kernel_settings.advertise
        if advertised and advertise and not address.startswith("unix:"):
            host = address.rsplit(":", 1)[0]
            if host.strip("[]").lower() == advertise.strip("[]").lower():
                # on the advertised host (kernel.advertise): also ours
                also = (*also, address)
        try:
            validate.local_address(
                address,
                dirs=dirs,
                also=also,
                never=tuple(a for a in (self.address, self.control_address, internal) if a),
            )
        except InvalidValue as exc:
            raise InvalidValue(f"Register: {exc}") from None

    def _registered_probe(self, spec: UnitSpec) -> tuple[str, float, float, int, int] | None:
        """How a self-registered instance is probed: the unit's ``health``, else
        the default probe; (probe, interval, timeout, successes, failures)."""
        if spec.health is not None:
            h = spec.health
            return h.probe, h.interval, h.timeout, h.success_threshold, h.failure_threshold
        probe = self.plugins.default("probe")
        if probe is None:
            return None
        interval, timeout, failures = self.REGISTERED_PROBE
        return probe, interval, timeout, 1, failures

    async def _watch_registered(self, inst: Instance) -> None:
        """A self-registered instance is ready once its probe passes (within its
        unit's ``startup_timeout``), and dropped once it fails in a row
        ``failures`` times, or never passes."""
        loop = asyncio.get_running_loop()
        spec = self.deployment.units.get(inst.unit)
        sup = self.units.get(inst.unit)
        how = self._registered_probe(spec) if spec is not None else None
        if spec is None or sup is None or how is None:
            self._drop_registered(inst, "its unit is gone")
            return
        probe, interval, timeout, successes, failures = how
        options = spec.health.options if spec.health is not None else None
        if spec.health is not None and spec.health.initial_delay:
            await asyncio.sleep(spec.health.initial_delay)
        deadline = loop.time() + spec.startup_timeout
        ok = 0
        while inst.state is InstanceState.STARTING:
            result = await sup._probe(inst, probe, timeout, options)
            ok = ok + 1 if result.ok else 0
            if inst.state is not InstanceState.STARTING:
                return
            if ok >= successes:
                inst.health = "healthy"
                inst.ready_at = time.time()
                inst.machine.move(InstanceState.READY, f"{probe} probe passed")
                inst.ready.set_result(None)
                break
            if loop.time() >= deadline:
                self._drop_registered(
                    inst,
                    f"not answering within startup_timeout={spec.startup_timeout:g}s:"
                    f" {result.detail}",
                )
                return
            await asyncio.sleep(min(interval, 0.2))
        failed = 0
        while inst.state is InstanceState.READY:
            await asyncio.sleep(interval)
            if inst.state is not InstanceState.READY:
                return
            result = await sup._probe(inst, probe, timeout, options)
            if result.ok:
                failed = 0
                continue
            failed += 1
            logger.bind(unit=inst.unit, instance=inst.instance_id).warning(
                "{} probe failed ({}/{}): {}", probe, failed, failures, result.detail
            )
            if failed >= failures:
                self._drop_registered(inst, f"probed out: {failed} {probe} probes failed")

    def _drop_registered(self, inst: Instance, reason: str) -> None:
        """Forget a self-registered instance: out of routing, the list and the probe's cache."""
        if inst.state is not InstanceState.STOPPED:
            inst.machine.move(InstanceState.STOPPED, reason)
        inst.end_attempts(HsuError(f"instance {inst.instance_id}: {reason}"))
        if self.instances.get(inst.instance_id) is inst:
            self.forget(inst)
        spec = self.deployment.units.get(inst.unit)
        how = self._registered_probe(spec) if spec is not None else None
        if how is not None:
            with contextlib.suppress(Exception):
                self.plugins.probe(how[0]).forget(
                    ProbeTarget(inst.unit, inst.instance_id, inst.pid, inst.address, None)
                )
        logger.bind(unit=inst.unit, instance=inst.instance_id).info(
            "registered instance dropped: {}", reason
        )

    def deregister(self, instance_id: str, token: str = "") -> None:
        """An HSU stops serving: a self-registered one is forgotten, a spawned
        one routes nothing more (its supervisor handles its exit).

        ``token`` is the caller's ``hsu-instance-token``; raises
        :class:`~hsu.errors.NotAllowed` without the instance's.
        """
        inst = self.instances.get(instance_id)
        if inst is None or not self._proves(inst, token):
            self._unproven.check("Deregister")
            if inst is None:
                raise HsuError(f"Deregister: no instance {validate.shown(instance_id)}")
            raise NotAllowed(
                f"Deregister: instance {instance_id}: the caller's hsu-instance-token"
                " is missing or wrong"
            )
        if not inst.managed:
            self._drop_registered(inst, "deregistered")
        elif inst.state is InstanceState.READY:
            # a supervised HSU that stops serving on its own: route nothing to
            # it; its exit is handled by its supervisor when it comes
            inst.health = "draining"
            self.routing.update(inst)

    #: events one HSU may publish: per second, burst
    PUBLISH_RATE = (100.0, 200)

    def publish_from(
        self,
        instance_id: str,
        token: str,
        topic: str,
        data: Mapping[str, str],
        reason: str,
    ) -> Event:
        """One ``PublishEvent``: an event from the instance itself (its
        ``hsu-instance-token``), on a topic of its own, within its rate."""
        inst = self.instances.get(instance_id)
        if inst is None or not self._proves(inst, token):
            self._unproven.check("PublishEvent")
            raise NotAllowed(
                f"PublishEvent: instance {validate.shown(instance_id)}: the caller's"
                " hsu-instance-token is missing or wrong"
            )
        validate.topic(topic)
        if events_mod.reserved(topic, by_hsu=True):
            raise NotAllowed(
                f"PublishEvent: topic {topic!r}: {topic.split('.', 1)[0]}.* is the kernel's own"
            )
        fields = validate.labels(data, field="data")
        reason = validate.text(reason, field="reason")
        rate = self._publish_rates.get(instance_id)
        if rate is None:
            rate = self._publish_rates[instance_id] = validate.RateLimit(*self.PUBLISH_RATE)
        rate.check(f"PublishEvent from {instance_id}")
        return self.events.publish(
            "hsu",
            topic=topic,
            unit=inst.unit,
            instance_id=instance_id,
            pid=inst.pid,
            reason=reason,
            data=fields,
        )

    def report_load(self, instance_id: str, token: str, inflight: int) -> None:
        """One ``ReportLoad`` message: the instance's calls in flight, from the
        instance itself (its ``hsu-instance-token``)."""
        inst = self.instances.get(instance_id)
        if inst is None or not self._proves(inst, token):
            self._unproven.check("ReportLoad")
            raise NotAllowed(
                f"ReportLoad: instance {validate.shown(instance_id)}: the caller's"
                " hsu-instance-token is missing or wrong"
            )
        if not 0 <= inflight <= self.MAX_INFLIGHT:
            raise InvalidValue(f"ReportLoad: inflight: {inflight}; at most {self.MAX_INFLIGHT}")
        self.routing.report(instance_id, inflight)

    # -- reload --------------------------------------------------------------

    def read_config(self) -> Deployment:
        """Read the deployment again from the sources it came from."""
        from hsu._kernel.config import loader as config_loader

        ctx = self.source_context
        if ctx is None:
            if not Path(self.deployment.source).is_file():
                raise HsuError(
                    "this kernel's deployment was not read from a file; nothing to reload"
                )
            ctx = config_loader.context([self.deployment.source])
        return config_loader.read_config(self.plugins, ctx, previous=self.deployment)

    async def reload(self, deployment: Deployment | None = None) -> Changes:
        """Apply a new deployment: only the difference, or nothing if it is invalid.

        Raises :class:`ConfigError` (every problem, with where) and leaves the
        running deployment as it was.
        """
        async with self._reload_lock:
            if self.state is not KernelState.RUNNING:
                raise HsuError(f"kernel is {self.state.value}; not reloading")
            if deployment is None:
                # parsing and merging off the event loop: a pathological file
                # never stalls the Kernel API (the readers keep no shared state)
                deployment = await asyncio.to_thread(self.read_config)
            try:
                new = with_defaults(deployment, self.plugins)
                found: list[str] = []
            except ConfigError as exc:
                new, found = deployment, list(exc.problems)
            settings = self._validate(new, found)
            old = self.deployment
            changes = diff(old, new)
            versions = self._source_versions()
            if changes.empty and settings == self._settings:
                logger.info("reload: nothing changed{}", versions)
                self.events.publish(
                    "reload", topic="config.unchanged", reason=f"nothing changed{versions}"
                )
                return changes
            logger.info("reload: {}{}", changes.summary(), versions)
            self.deployment = new
            self._settings = settings
            self.kernel_settings = settings["kernel"]
            for name in changes.removed:
                await self.units[name].stop_all(f"unit {name} removed by reload")
                for inst in list(self.units[name].slots.values()):
                    self.forget(inst)
                del self.units[name]
            for name in changes.changed:
                await self._apply_change(
                    name, old.units[name], new.units[name], name in changes.restarted
                )
            for wave in start_order(new.units) if changes.added else ():
                added = [n for n in wave if n in changes.added]
                for name in added:
                    self.units[name] = UnitSupervisor(self, name, new.units[name])
                    self.units[name].start_aux()
                await asyncio.gather(
                    *(self.units[n].scale(new.units[n].initial_instances) for n in added)
                )
            self.routing.reconfigure()
            self.events.publish(
                "reload",
                topic="config.changed",
                reason=f"{changes.summary()}{versions}",
                data={
                    what: ",".join(names)
                    for what, names in (
                        ("added", changes.added),
                        ("removed", changes.removed),
                        ("changed", changes.changed),
                        ("restarted", changes.restarted),
                        ("sections", changes.sections),
                    )
                    if names
                },
            )
            await self.plugins.call_each(
                "hsu_config_reloaded", stop_on_error=False, kernel=self, old=old, changes=changes
            )
            return changes

    def _source_versions(self) -> str:
        """``" (etcd revision 42)"``: what each config source that says so loaded."""
        found = []
        for name, source in self.plugins.config_sources().items():
            version = getattr(source, "version", None)
            if version:
                found.append(f"{name}: {version}")
        return f" ({'; '.join(found)})" if found else ""

    def _validate(self, new: Deployment, found: list[str] | None = None) -> dict[str, Any]:
        problems: list[str] = [*new.problems, *(found or ())]
        if tuple(new.plugins) != tuple(self.deployment.plugins):
            problems.append(
                f"{new.source}: plugins: changed from {list(self.deployment.plugins)} to"
                f" {list(new.plugins)}; plugins load when the kernel starts: restart it"
            )
        try:
            settings = structure_sections(new, self.plugins.settings_classes(), plugin_names)
        except ConfigError as exc:
            problems.extend(exc.problems)
            settings = {}
        try:
            check_units(
                new, self.plugins.launcher_names(), self._probes(), **self._routing_plugins()
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
        if settings:
            ks: KernelSettings = settings["kernel"]
            for key in (
                "address", "control", "insecure", "state_dir", "reattach", "registry", "gateway",
                "storage", "caches", "tls", "log_format", "advertise", "cluster_key",
            ):  # fmt: skip
                if getattr(ks, key) != getattr(self.kernel_settings, key):
                    problems.append(
                        f"{new.source}: kernel.{key}: changed; it applies when the kernel"
                        " starts: restart it"
                    )
            problems.extend(auth.reload_problems(self, settings, new.source))
        if problems:
            raise ConfigError(problems, new.source)
        return settings

    async def _apply_change(
        self, name: str, old: UnitSpec, new: UnitSpec, new_processes: bool
    ) -> None:
        sup = self.units[name]
        sup.spec = new
        for breaker in sup.breakers.values():
            breaker.spec = new.restart.crash_loop
        sup.start_aux()
        if new_processes:
            logger.bind(unit=name).info("reload: new processes for unit {}", name)
            for inst in list(sup.wanted):
                await sup.restart(inst, "its unit changed")
        # the floor moves with the config; instances started above it on demand stay
        above = max(0, len(sup.wanted) - old.initial_instances)
        target = min(new.initial_instances + above, new.max_instances)
        if target != len(sup.wanted):
            await sup.scale(target, reason=f"rescaled by reload to {target}")

    async def _watch_config(self) -> None:
        ctx = self.source_context
        if ctx is None:
            return
        changed = asyncio.Event()
        watchers = []
        for name, source in self.plugins.config_sources().items():
            watch = getattr(source, "watch", None)
            awaitable = watch(ctx, changed.set) if watch else None
            if awaitable is not None:
                watchers.append(asyncio.ensure_future(awaitable))
                logger.debug("watching config source {}", name)
        try:
            while True:
                await changed.wait()
                await asyncio.sleep(0.2)  # let an editor finish writing
                changed.clear()
                await self.reload_logged("a config source changed")
        finally:
            for task in watchers:
                task.cancel()

    async def reload_logged(self, why: str) -> None:
        """Reload and log the outcome (SIGHUP, file watching)."""
        logger.info("reloading: {}", why)
        try:
            await self.reload()
        except ConfigError as exc:
            logger.error("reload rejected; the running deployment is unchanged:\n{}", exc)
            self.events.publish("reload", topic="config.rejected", reason=f"rejected: {exc}")
        except HsuError as exc:
            logger.error("reload failed: {}", exc)

    def _probes(self) -> dict[str, Any]:
        return {n: self.plugins.probe(n) for n in self.plugins.probe_names()}

    def _routing_plugins(self) -> dict[str, dict[str, Any]]:
        pm = self.plugins
        return {
            "balancers": {n: pm.balancer(n) for n in pm.balancer_names()},
            "breakers": {n: pm.breaker(n) for n in pm.breaker_names()},
        }


def diff(old: Deployment, new: Deployment) -> Changes:
    added = tuple(sorted(set(new.units) - set(old.units)))
    removed = tuple(sorted(set(old.units) - set(new.units)))
    kept = set(old.units) & set(new.units)
    # a unit whose env_file now holds other variables needs new processes too
    env_changed = {n for n in kept if old.env_files.get(n) != new.env_files.get(n)}
    # a unit a reload did not read again is the same object: no field compared
    changed = tuple(
        sorted(
            n
            for n in kept
            if n in env_changed
            or (old.units[n] is not new.units[n] and old.units[n] != new.units[n])
        )
    )
    restarted = tuple(
        n for n in changed if n in env_changed or needs_new_processes(old.units[n], new.units[n])
    )
    sections = tuple(
        sorted(
            k
            for k in set(old.sections) | set(new.sections)
            if old.sections.get(k) != new.sections.get(k)
        )
    )
    return Changes(added, removed, changed, restarted, sections)


async def _end_orphan(pid: int, grace: float) -> None:
    """SIGTERM a left-over process group, SIGKILL after the grace."""
    try:
        handle = PidfdHandle.attach(pid, owned=True)
    except HsuError:
        return
    handle.signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(handle.wait(), grace)
    except TimeoutError:
        handle.signal(signal.SIGKILL)
        await handle.wait()


if TYPE_CHECKING:

    def _is_a_kernel_api(kernel: Kernel) -> KernelAPI:
        return kernel  # mypy checks that Kernel implements what plugins are promised

    def _is_an_instance_view(instance: Instance) -> InstanceView:
        return instance
