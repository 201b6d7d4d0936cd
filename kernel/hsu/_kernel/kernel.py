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
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from hsu._kernel.config.defaults import with_defaults
from hsu._kernel.config.model import (
    Deployment,
    KernelSettings,
    UnitKind,
    UnitSpec,
    check_units,
    start_order,
    structure_sections,
)
from hsu._kernel.events import EventBus
from hsu._kernel.lifecycle import KERNEL_TRANSITIONS, KernelState, StateMachine, Transition
from hsu._kernel.logbuffer import LogBuffer
from hsu._kernel.plugins import PluginManager
from hsu._kernel.routing import KernelRouting
from hsu._kernel.server import KernelServer
from hsu._kernel.supervision import statefile
from hsu._kernel.supervision.instances import Instance, InstanceState, new_instance_id
from hsu._kernel.supervision.logfiles import LogFiles
from hsu._kernel.supervision.resources import Sampler
from hsu._kernel.supervision.supervisor import (
    ENV_INSTANCE_ID,
    ENV_KERNEL_ADDRESS,
    ENV_UNIT,
    SHUTDOWN_SHARE,
    UnitSupervisor,
    needs_new_processes,
    settled,
)
from hsu._version import __version__
from hsu.errors import ConfigError, HsuError, NoSuchUnit
from hsu.ports import Changes, Registry, SourceContext
from hsu.process import PidfdHandle

if TYPE_CHECKING:
    from hsu.client.aio import RoutedChannel
    from hsu.ports import InstanceView, KernelAPI

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
        source_context: SourceContext | None = None,
    ):
        # the launchers, balancers, ... that units leave unnamed: the defaults
        # plugins declared (the kernel names none)
        deployment = with_defaults(deployment, plugins)
        self.deployment = deployment
        self.plugins = plugins
        #: how the deployment was read, to read it again on reload
        self.source_context = source_context
        self._settings = structure_sections(deployment, plugins.settings_classes())
        check_units(deployment, plugins.launcher_names(), self._probes(), **self._routing_plugins())
        ks: KernelSettings = self._settings["kernel"]
        self.kernel_settings = ks
        #: the address the deployment (or ``--address``) asked for
        self.requested_address = address or ks.address
        #: where the kernel's gRPC server binds: the requested address, unless
        #: a plugin serving that one itself moves the kernel (hsu_kernel_address)
        self.bind_address = self.requested_address
        #: where it listens, once it does (a port 0 resolved); HSUs are given this
        self.address = ""
        self.version = __version__
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

        def publish(t: Transition[KernelState]) -> None:
            self.events.publish(
                "kernel", from_state=t.source.value, to_state=t.target.value, reason=t.reason
            )

        self.machine.listeners.append(publish)
        self.logs = LogBuffer(ks.log_tail)
        state_dir = Path(deployment.base_dir, ks.state_dir or f".hsu/{deployment.name}")
        self.state_dir = state_dir
        self.state_path: Path | None = state_dir / "state.json"
        self.logfiles = LogFiles(
            state_dir / "logs", max_bytes=ks.log_max_bytes, backups=ks.log_backups
        )
        self.sampler = Sampler()
        self.routing = KernelRouting(self)
        self._background: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()
        self._save_pending = False
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
        plugins.configure(self)
        # after configure: the per-kernel plugin state registered there answers
        self.bind_address = (
            plugins.kernel_address(self, self.requested_address) or self.requested_address
        )

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
        try:
            await self.plugins.call_each("hsu_kernel_starting", kernel=self)
            self._server = KernelServer(self)
            self.address = await self._server.start(self.bind_address)
            logger.info("kernel {} listening on {}", self.deployment.name, self.address)
            await self.routing.start()
            found = await self._reattach()
            self._background.append(asyncio.ensure_future(self.logfiles.run()))
            for name, spec in self.deployment.units.items():
                self.units[name] = UnitSupervisor(self, name, spec)
                for saved in found.get(name, [])[: spec.max_instances]:
                    self.units[name].add_slot(saved)
            for wave in start_order(self.deployment.units):
                await asyncio.gather(*(self._bring_up(n) for n in wave))
            self.save_state()
            if self.kernel_settings.watch_config:
                self._background.append(asyncio.ensure_future(self._watch_config()))
            self.machine.move(KernelState.RUNNING)
            await self._server.set_serving(True)
            await self.plugins.call_each("hsu_kernel_started", kernel=self)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and self._stop_reason:
                # serve() gave up the start for a stop signal: a stop, not a failure
                await self._teardown(KernelState.STOPPED, f"{self._stop_reason} while starting")
            else:
                await self._teardown(KernelState.FAILED, f"start failed: {exc!r}")
            raise

    async def _bring_up(self, name: str) -> None:
        sup = self.units[name]
        sup.start_aux()
        await asyncio.gather(*(settled(i.ready) for i in sup.wanted))
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
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            for inst in list(self.instances.values()):
                self.logfiles.unfollow(inst.instance_id)
            if self.state_path is not None:
                statefile.remove(self.state_path)
            if self._server is not None:
                grace = self._drain_grace
                await self._server.stop(
                    self.kernel_settings.drain_grace if grace is None else grace
                )
        finally:
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
            "address": self.address,
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

        return local_channel(self.routing, self.plugins)

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

    async def stop_instance(
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

    async def restart_instance(self, instance_id: str) -> None:
        inst = self._instance(instance_id)
        await self.units[inst.unit].restart(inst, "restarted by request")

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
        event = self.events.publish(
            "instance",
            unit=inst.unit,
            instance_id=inst.instance_id,
            from_state=t.source.value,
            to_state=t.target.value,
            reason=t.reason,
            pid=inst.pid,
        )
        self.routing.update(inst)
        self.plugins.pm.hook.hsu_instance_event(kernel=self, instance=inst, event=event)

    def forget(self, inst: Instance) -> None:
        self.instances.pop(inst.instance_id, None)
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
            created = statefile.create_time(inst.pid)
            if created is None:
                continue
            saved.append(
                statefile.SavedInstance(
                    inst.instance_id,
                    inst.unit,
                    inst.pid,
                    created,
                    inst.address,
                    inst.interfaces,
                    inst.started_at,
                    inst.restarts,
                )
            )
        try:
            statefile.save(
                self.state_path,
                statefile.SavedState(
                    os.getpid(), self._create_time, self.deployment.name, tuple(saved)
                ),
            )
        except OSError as exc:
            logger.error("cannot write the state file {}: {}", self.state_path, exc)

    async def _reattach(self) -> dict[str, list[statefile.SavedInstance]]:
        """Instances a kernel that died left running, by unit; end the orphans."""
        assert self.state_path is not None
        saved = statefile.load(self.state_path)
        if saved is None:
            return {}
        if saved.kernel_pid != os.getpid() and statefile.is_running(
            saved.kernel_pid, saved.kernel_create_time
        ):
            raise HsuError(
                f"another kernel (pid {saved.kernel_pid}) runs deployment {saved.deployment!r}"
                f" with state in {self.state_path.parent}; stop it first"
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
                await _end_orphan(si.pid, spec.stop_grace if spec else 10.0)
                continue
            found.setdefault(si.unit, []).append(si)
        return found

    # -- the handshake -------------------------------------------------------

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
    ) -> Instance:
        """The handshake: an HSU says where it listens and what it serves."""
        if not address:
            raise HsuError("Register: address is required")
        if not interfaces:
            raise HsuError("Register: at least one interface is required")
        inst = self.instances.get(instance_id) if instance_id else None
        supervised = (
            inst is not None
            and inst.unit in self.units
            and (inst.instance_id in self.units[inst.unit].slots)
        )
        if inst is None:
            if not unit:
                raise HsuError("Register: unit is required for an HSU this kernel did not start")
            inst = Instance(instance_id or new_instance_id(unit), unit, managed=False, pid=pid)
            self.adopt(inst)
            inst.machine.move(InstanceState.STARTING, "registering")
        elif supervised and inst.state is not InstanceState.STARTING:
            raise HsuError(f"Register: instance {instance_id} is {inst.state.value}")
        elif supervised and inst.registered.done():
            raise HsuError(f"Register: instance {instance_id} is already registered")
        elif not supervised and inst.state is not InstanceState.STARTING:
            raise HsuError(f"Register: instance {instance_id} is {inst.state.value}")
        if pid and inst.pid and pid != inst.pid:
            raise HsuError(
                f"Register: instance {instance_id} was started as pid {inst.pid}, not {pid}"
            )
        inst.address = address
        inst.interfaces = interfaces
        inst.version = version
        inst.metadata = dict(metadata or {})
        inst.registered_at = time.time()
        logger.bind(unit=inst.unit, instance=inst.instance_id).info(
            "registered at {} serving {}", address, ", ".join(interfaces)
        )
        if supervised:
            inst.registered.set_result(None)
        else:
            inst.machine.move(InstanceState.READY, "registered")
            inst.ready.set_result(None)
        await self.plugins.call_each(
            "hsu_instance_registered", stop_on_error=False, kernel=self, instance=inst
        )
        return inst

    def deregister(self, instance_id: str) -> None:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise HsuError(f"Deregister: no instance {instance_id!r}")
        if inst.alive and not inst.managed:
            inst.machine.move(InstanceState.STOPPED, "deregistered")
        elif inst.state is InstanceState.READY:
            # a supervised HSU that stops serving on its own: route nothing to
            # it; its exit is handled by its supervisor when it comes
            inst.health = "draining"
            self.routing.update(inst)

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
        return config_loader.read_config(self.plugins, ctx)

    async def reload(self, deployment: Deployment | None = None) -> Changes:
        """Apply a new deployment: only the difference, or nothing if it is invalid.

        Raises :class:`ConfigError` (every problem, with where) and leaves the
        running deployment as it was.
        """
        async with self._reload_lock:
            if self.state is not KernelState.RUNNING:
                raise HsuError(f"kernel is {self.state.value}; not reloading")
            new = with_defaults(
                deployment if deployment is not None else self.read_config(), self.plugins
            )
            settings = self._validate(new)
            old = self.deployment
            changes = diff(old, new)
            if changes.empty and settings == self._settings:
                logger.info("reload: nothing changed")
                self.events.publish("reload", reason="nothing changed")
                return changes
            logger.info("reload: {}", changes.summary())
            self.deployment = new
            self._settings = settings
            self.kernel_settings = settings["kernel"]
            for name in changes.removed:
                await self.units[name].stop_all(f"unit {name} removed by reload")
                for inst in list(self.units[name].slots.values()):
                    self.forget(inst)
                del self.units[name]
            for name in changes.changed:
                await self._apply_change(name, old.units[name], new.units[name])
            for wave in start_order(new.units):
                added = [n for n in wave if n in changes.added]
                for name in added:
                    self.units[name] = UnitSupervisor(self, name, new.units[name])
                    self.units[name].start_aux()
                await asyncio.gather(
                    *(self.units[n].scale(new.units[n].initial_instances) for n in added)
                )
            self.routing.reconfigure()
            self.events.publish("reload", reason=changes.summary())
            await self.plugins.call_each(
                "hsu_config_reloaded", stop_on_error=False, kernel=self, old=old, changes=changes
            )
            return changes

    def _validate(self, new: Deployment) -> dict[str, Any]:
        problems: list[str] = []
        if tuple(new.plugins) != tuple(self.deployment.plugins):
            problems.append(
                f"{new.source}: plugins: changed from {list(self.deployment.plugins)} to"
                f" {list(new.plugins)}; plugins load when the kernel starts: restart it"
            )
        try:
            settings = structure_sections(new, self.plugins.settings_classes())
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
            for key in ("address", "state_dir", "reattach", "registry", "gateway"):
                if getattr(ks, key) != getattr(self.kernel_settings, key):
                    problems.append(
                        f"{new.source}: kernel.{key}: changed; it applies when the kernel"
                        " starts: restart it"
                    )
        if problems:
            raise ConfigError(problems, new.source)
        return settings

    async def _apply_change(self, name: str, old: UnitSpec, new: UnitSpec) -> None:
        sup = self.units[name]
        sup.spec = new
        for breaker in sup.breakers.values():
            breaker.spec = new.restart.crash_loop
        sup.start_aux()
        if needs_new_processes(old, new):
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
            self.events.publish("reload", reason=f"rejected: {exc}")
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
    changed = tuple(
        sorted(n for n in set(old.units) & set(new.units) if old.units[n] != new.units[n])
    )
    restarted = tuple(n for n in changed if needs_new_processes(old.units[n], new.units[n]))
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
