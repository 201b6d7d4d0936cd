"""The kernel: the lifecycle, the instances it started, and its gRPC server.

Everything else reaches it through plugins (:mod:`hsu.hookspecs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from loguru import logger

from hsu._version import __version__
from hsu.config import Deployment, KernelSettings, UnitSpec, structure_sections
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.errors import ConfigError, HsuError, LaunchError, NoSuchUnit
from hsu.instances import Instance, InstanceState, new_instance_id
from hsu.lifecycle import KERNEL_TRANSITIONS, KernelState, StateMachine
from hsu.logbuffer import LogBuffer
from hsu.plugin_manager import PluginManager
from hsu.ports import LaunchSpec
from hsu.server import KernelServer

#: what the kernel tells every instance it starts, in its environment
ENV_KERNEL_ADDRESS = "HSU_KERNEL_ADDRESS"
ENV_UNIT = "HSU_UNIT"
ENV_INSTANCE_ID = "HSU_INSTANCE_ID"
#: of a unit's stop_grace, the share an HSU is told it has to drain; the rest is
#: headroom for it to exit before SIGKILL
SHUTDOWN_SHARE = 0.8


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
    ):
        self.deployment = deployment
        self.plugins = plugins
        self._settings = structure_sections(deployment, plugins.settings_classes())
        self._check_units()
        ks: KernelSettings = self._settings["kernel"]
        self.kernel_settings = ks
        self.requested_address = address or ks.address
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
        self.logs = LogBuffer(ks.log_tail)
        self._server: KernelServer | None = None
        self._starting: dict[str, asyncio.Task[Instance]] = {}
        self._exit_watchers: dict[str, asyncio.Task[None]] = {}
        self._stop_requested: asyncio.Event | None = None
        self._stop_reason = ""
        self._drain_grace: float | None = None
        self._serving = False
        self._stopped: asyncio.Event | None = None
        self._log_sink: int | None = None
        plugins.configure(self)

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

    def _check_units(self) -> None:
        known = set(self.plugins.launcher_names())
        problems = [
            f"{self.deployment.source}: units.{name}.launcher: no launcher named {spec.launcher!r}"
            f" (registered: {', '.join(sorted(known)) or 'none'})"
            for name, spec in self.deployment.units.items()
            if spec.launcher not in known
        ]
        if problems:
            raise ConfigError(problems, self.deployment.source)

    # -- lifecycle ---------------------------------------------------------

    @property
    def state(self) -> KernelState:
        return self.machine.state

    async def start(self) -> None:
        """created -> starting -> running: listen, start ``at-start`` units, serve."""
        self.machine.move(KernelState.STARTING)
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._log_sink = logger.add(self.logs.sink, level="DEBUG", enqueue=False)
        try:
            await self.plugins.call_each("hsu_kernel_starting", kernel=self)
            self._server = KernelServer(self)
            self.address = await self._server.start(self.requested_address)
            logger.info("kernel {} listening on {}", self.deployment.name, self.address)
            at_start = [n for n, s in self.deployment.units.items() if s.start == "at-start"]
            results = await asyncio.gather(
                *(self.start_instance(n) for n in at_start), return_exceptions=True
            )
            for name, result in zip(at_start, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, HsuError):
                        raise result
                    logger.error("unit {} did not start: {}", name, result)
            self.machine.move(KernelState.RUNNING)
            await self._server.set_serving(True)
            await self.plugins.call_each("hsu_kernel_started", kernel=self)
        except BaseException as exc:
            await self._teardown(KernelState.FAILED, f"start failed: {exc!r}")
            raise

    async def stop(self, reason: str = "requested") -> None:
        """Drain: NOT_SERVING, stop instances, finish calls in flight, stopped."""
        if self.state is KernelState.CREATED:
            self.machine.move(KernelState.STOPPED, reason)
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
            if self._server is not None:
                grace = self._drain_grace
                await self._server.stop(
                    self.kernel_settings.drain_grace if grace is None else grace
                )
        finally:
            self.machine.move(final, reason if final is KernelState.FAILED else "")
            await self.plugins.call_each("hsu_kernel_stopped", stop_on_error=False, kernel=self)
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
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        self._serving = True
        try:
            await self.start()
            assert self._stop_requested is not None
            await self._stop_requested.wait()
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

    # -- instances ---------------------------------------------------------

    def unit(self, name: str) -> UnitSpec:
        try:
            return self.deployment.units[name]
        except KeyError:
            known = ", ".join(sorted(self.deployment.units)) or "none"
            raise NoSuchUnit(f"no unit named {name!r} (units: {known})") from None

    def units_serving(self, interface: str) -> list[str]:
        return [n for n, s in self.deployment.units.items() if interface in s.interfaces]

    async def instance_for(self, interface: str) -> Instance:
        """A ready instance serving ``interface``, started on demand if none is.

        Callers asking at the same time share one start.
        """
        for inst in self.instances.values():
            if inst.state is InstanceState.READY and interface in inst.interfaces:
                return inst
        units = self.units_serving(interface)
        if not units:
            raise NoSuchUnit(f"no unit serves interface {interface!r}")
        unit = units[0]
        task = self._starting.get(unit)
        if task is None:
            task = asyncio.ensure_future(self.start_instance(unit))
            self._starting[unit] = task
            task.add_done_callback(lambda _: self._starting.pop(unit, None))
        return await asyncio.shield(task)

    def _argv(self, spec: UnitSpec) -> list[str]:
        argv = list(spec.command)
        if argv[0] == "python":
            argv[0] = sys.executable
        return argv

    async def start_instance(self, unit: str) -> Instance:
        """Launch one instance of ``unit`` and wait for its handshake."""
        if self.state not in (KernelState.STARTING, KernelState.RUNNING):
            raise HsuError(f"kernel is {self.state.value}; not starting unit {unit!r}")
        spec = self.unit(unit)
        launcher = self.plugins.launcher(spec.launcher)
        inst = Instance(new_instance_id(unit), unit, managed=True)
        inst.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.instances[inst.instance_id] = inst
        log = logger.bind(unit=unit, instance=inst.instance_id)
        env = {
            **os.environ,
            **spec.env,
            ENV_KERNEL_ADDRESS: self.address,
            ENV_UNIT: unit,
            ENV_INSTANCE_ID: inst.instance_id,
        }
        cwd = (
            str(Path(self.deployment.base_dir, spec.cwd)) if spec.cwd else self.deployment.base_dir
        )
        launch = LaunchSpec(unit, inst.instance_id, self._argv(spec), env, cwd)
        try:
            handle = await launcher.launch(launch)
        except LaunchError as exc:
            inst.machine.move(InstanceState.FAILED, str(exc))
            log.error("{}", exc)
            raise
        inst.handle, inst.pid = handle, handle.pid
        argv = self.deployment.secrets.redact(" ".join(launch.argv))
        log.info("started pid {}: {}", handle.pid, argv)
        self._exit_watchers[inst.instance_id] = asyncio.ensure_future(self._watch_exit(inst))
        try:
            await asyncio.wait_for(asyncio.shield(inst.ready), spec.startup_timeout)
        except TimeoutError:
            msg = (
                f"unit {unit!r}: instance {inst.instance_id} (pid {inst.pid}) did not register"
                f" within startup_timeout={spec.startup_timeout:g}s"
            )
            log.error("{}; stopping it", msg)
            await self.stop_instance(inst, reason="startup timeout")
            raise LaunchError(msg) from None
        return inst

    async def _watch_exit(self, inst: Instance) -> None:
        assert inst.handle is not None
        code = await inst.handle.wait()
        inst.returncode = code
        log = logger.bind(unit=inst.unit, instance=inst.instance_id)
        if inst.state is InstanceState.STOPPING:
            inst.machine.move(InstanceState.STOPPED, f"exited with status {code}")
            log.info("pid {} exited with status {}", inst.pid, code)
            return
        if not inst.alive:
            return
        reason = f"exited with status {code}"
        inst.machine.move(InstanceState.FAILED, reason)
        if not inst.ready.done():
            tail: list[str] = getattr(inst.handle, "output_tail", list)()
            last = ("; last output:\n    " + "\n    ".join(tail)) if tail else ""
            inst.ready.set_exception(
                LaunchError(
                    f"unit {inst.unit!r}: instance {inst.instance_id} (pid {inst.pid}) {reason}"
                    f" before it registered{last}"
                )
            )
        log.warning("pid {} {} unexpectedly", inst.pid, reason)

    async def stop_instance(
        self, inst: Instance, *, grace: float | None = None, reason: str = "requested"
    ) -> None:
        """Ask the instance to stop; SIGKILL its process group after the grace."""
        if not inst.managed:
            raise HsuError(f"instance {inst.instance_id} was not started by this kernel")
        if not inst.alive and inst.state is not InstanceState.STOPPING:
            return
        if inst.state is not InstanceState.STOPPING:
            inst.machine.move(InstanceState.STOPPING, reason)
        if not inst.ready.done():
            inst.ready.set_exception(HsuError(f"instance {inst.instance_id} stopped: {reason}"))
        spec = self.deployment.units.get(inst.unit)
        grace = grace if grace is not None else (spec.stop_grace if spec else 10.0)
        watcher = self._exit_watchers.get(inst.instance_id)
        handle = inst.handle
        if handle is None or watcher is None:
            return
        log = logger.bind(unit=inst.unit, instance=inst.instance_id)
        asked = handle.returncode is not None or (
            bool(inst.address) and await self._ask_shutdown(inst, grace * SHUTDOWN_SHARE, reason)
        )
        if not asked:
            handle.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(watcher), grace)
        except TimeoutError:
            log.warning("pid {} still running {:g}s after stop; sending SIGKILL", inst.pid, grace)
            handle.signal(signal.SIGKILL)
            await watcher

    async def _ask_shutdown(self, inst: Instance, grace: float, reason: str) -> bool:
        try:
            async with grpc.aio.insecure_channel(inst.address) as channel:
                stub = core_pb2_grpc.CoreStub(channel)
                d = Duration()
                d.FromNanoseconds(int(grace * 1e9))
                reply = await stub.Shutdown(
                    core_pb2.ShutdownRequest(grace=d, reason=reason), timeout=1.0
                )
                return bool(reply.accepted)
        except grpc.aio.AioRpcError as exc:
            logger.bind(unit=inst.unit, instance=inst.instance_id).debug(
                "Core.Shutdown failed ({}); sending SIGTERM", exc.code().name
            )
            return False

    async def stop_all_instances(self) -> None:
        managed = [
            i
            for i in self.instances.values()
            if i.managed and (i.alive or i.state is InstanceState.STOPPING)
        ]
        await asyncio.gather(*(self.stop_instance(i, reason="kernel stopping") for i in managed))
        # Every exit watcher has finished: no child is left unreaped.
        await asyncio.gather(*self._exit_watchers.values(), return_exceptions=True)

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
        if inst is None:
            if not unit:
                raise HsuError("Register: unit is required for an HSU this kernel did not start")
            inst = Instance(instance_id or new_instance_id(unit), unit, managed=False, pid=pid)
            self.instances[inst.instance_id] = inst
        elif not inst.alive:
            raise HsuError(f"Register: instance {instance_id} is {inst.state.value}")
        elif inst.state is InstanceState.READY:
            raise HsuError(f"Register: instance {instance_id} is already registered")
        elif pid and inst.pid and pid != inst.pid:
            raise HsuError(
                f"Register: instance {instance_id} was started as pid {inst.pid}, not {pid}"
            )
        inst.address = address
        inst.interfaces = interfaces
        inst.version = version
        inst.metadata = dict(metadata or {})
        inst.registered_at = time.time()
        inst.machine.move(InstanceState.READY, "registered")
        if not inst.ready.done():
            inst.ready.set_result(None)
        logger.bind(unit=inst.unit, instance=inst.instance_id).info(
            "registered at {} serving {}", address, ", ".join(interfaces)
        )
        await self.plugins.call_each(
            "hsu_instance_registered", stop_on_error=False, kernel=self, instance=inst
        )
        return inst

    def deregister(self, instance_id: str) -> None:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise HsuError(f"Deregister: no instance {instance_id!r}")
        if inst.alive:
            inst.machine.move(InstanceState.STOPPING, "deregistered")
            if not inst.managed:
                inst.machine.move(InstanceState.STOPPED, "deregistered")
