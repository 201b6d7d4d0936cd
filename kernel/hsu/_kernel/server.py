"""The kernel's gRPC servers: the control plane (Kernel API, Core, health,
reflection) and the data plane plugins serve (the gateway)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc

from hsu import validate
from hsu._kernel import auth, peercred
from hsu._kernel.cache_service import SERVICE as CACHE_SERVICE
from hsu._kernel.cache_service import CacheServicer
from hsu._kernel.config.model import TLSSettings
from hsu._kernel.control import lock_socket, prepare_socket
from hsu._kernel.core_service import CORE_SERVICE, CoreServicer, StreamLimit, timestamp
from hsu._kernel.interface_health import InterfaceHealth
from hsu._kernel.reflection import (
    V1,
    V1ALPHA,
    ControlReflection,
    Descriptors,
    ReflectionServicer,
)
from hsu._kernel.storage_service import SERVICE as STORAGE_SERVICE
from hsu._kernel.storage_service import StorageServicer
from hsu._kernel.supervision.instances import TOKEN_METADATA, Instance
from hsu._kernel.tls import ServerTLS
from hsu.cache.v1 import cache_pb2_grpc
from hsu.core.v1 import core_pb2_grpc
from hsu.errors import ConfigError, HsuError, InvalidValue, NoSuchUnit, NotAllowed, OverLimit
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu.storage.v1 import storage_pb2_grpc
from hsu.validate import RateLimit

if TYPE_CHECKING:
    from hsu._kernel.kernel import Kernel

KERNEL_SERVICE = "hsu.kernel.v1.Kernel"
HEALTH_SERVICE = "grpc.health.v1.Health"


def _timestamp_fields(seconds: float) -> Any:
    """:func:`timestamp`'s fields: a message built with them is some 14%
    faster than with a Timestamp to copy (ListInstances at 1,000 instances)."""
    ns = int(seconds * 1e9)
    return {"seconds": ns // 1_000_000_000, "nanos": ns % 1_000_000_000}


def instance_pb(inst: Instance) -> kernel_pb2.Instance:
    # the fields most instances leave at proto3's default (empty, zero,
    # false) are not passed: the same message, built in half the time
    # (ListInstances at 1,000 instances, docs/benchmarks.md)
    fields: dict[str, Any] = {
        "instance_id": inst.instance_id,
        "unit": inst.unit,
        "state": inst.state.value,
        "started_at": _timestamp_fields(inst.started_at),
        "health": inst.health,
    }
    if inst.pid:
        fields["pid"] = inst.pid
    if inst.address:
        fields["address"] = inst.address
    if inst.interfaces:
        fields["interfaces"] = inst.interfaces
    if inst.version:
        fields["version"] = inst.version
    if inst.metadata:
        fields["metadata"] = inst.metadata
    if inst.managed:
        fields["managed"] = True
    if inst.restarts:
        fields["restarts"] = inst.restarts
    if inst.last_exit:
        fields["last_exit"] = inst.last_exit
    if inst.reattached:
        fields["reattached"] = True
    msg = kernel_pb2.Instance(**fields)
    if inst.registered_at is not None:
        msg.registered_at.CopyFrom(timestamp(inst.registered_at))
    return msg


class KernelServicer(kernel_pb2_grpc.KernelServicer):
    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.event_streams = StreamLimit("WatchEvents")
        self.endpoint_streams = StreamLimit("WatchEndpoints")
        self.slot_streams = StreamLimit("Slots")
        #: a reload reads files and may restart processes: 1 a second, 5 at once
        self._reloads = RateLimit(1.0, 5)

    async def Register(
        self, request: kernel_pb2.RegisterRequest, context: Any
    ) -> kernel_pb2.RegisterResponse:
        try:
            inst = await self.kernel.register(
                instance_id=request.instance_id,
                unit=request.unit,
                address=request.address,
                interfaces=tuple(request.interfaces),
                pid=request.pid,
                version=request.version,
                metadata=dict(request.metadata),
                token=_token(context),
            )
        except HsuError as exc:
            await context.abort(_refusal(exc, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
        return kernel_pb2.RegisterResponse(instance_id=inst.instance_id)

    async def Deregister(
        self, request: kernel_pb2.DeregisterRequest, context: Any
    ) -> kernel_pb2.DeregisterResponse:
        try:
            self.kernel.deregister(request.instance_id, _token(context))
        except HsuError as exc:
            await context.abort(_refusal(exc, grpc.StatusCode.NOT_FOUND), str(exc))
        return kernel_pb2.DeregisterResponse()

    async def ListInstances(
        self, request: kernel_pb2.ListInstancesRequest, context: Any
    ) -> kernel_pb2.ListInstancesResponse:
        found = [
            instance_pb(i)
            for i in self.kernel.instances.values()
            if not request.unit or i.unit == request.unit
        ]
        return kernel_pb2.ListInstancesResponse(instances=found)

    async def ListPlugins(
        self, request: kernel_pb2.ListPluginsRequest, context: Any
    ) -> kernel_pb2.ListPluginsResponse:
        plugins = []
        for info in self.kernel.plugins.infos():
            fields = info.to_dict()
            provides = {
                kind: kernel_pb2.PluginProvides(names=names)
                for kind, names in fields.pop("provides").items()
            }
            plugins.append(kernel_pb2.Plugin(**fields, provides=provides))
        return kernel_pb2.ListPluginsResponse(plugins=plugins)

    async def Status(
        self, request: kernel_pb2.StatusRequest, context: Any
    ) -> kernel_pb2.StatusResponse:
        k = self.kernel
        return kernel_pb2.StatusResponse(
            state=k.state.value,
            version=k.version,
            pid=k.pid,
            address=k.address,
            started_at=timestamp(k.created_at),
            history=[
                kernel_pb2.Transition(
                    from_state=t.source.value,
                    to_state=t.target.value,
                    at=timestamp(t.at),
                    reason=t.reason,
                )
                for t in k.machine.history
            ],
            deployment=k.deployment.name,
            units=sorted(k.deployment.units),
            instances=sum(1 for i in k.instances.values() if i.alive),
        )

    async def WatchEvents(
        self, request: kernel_pb2.WatchEventsRequest, context: Any
    ) -> AsyncIterator[kernel_pb2.Event]:
        try:
            topics = validate.topic_patterns(request.topics)
        except InvalidValue as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"WatchEvents: {exc}")
        events = self.kernel.events.subscribe(
            replay=request.replay, unit=request.unit, topics=topics
        )
        async with self.event_streams.hold(context):
            async for item in events:
                if isinstance(item, int):
                    yield kernel_pb2.Event(lost=item)
                    continue
                yield kernel_pb2.Event(
                    seq=item.seq,
                    kind=item.kind,
                    unit=item.unit,
                    instance_id=item.instance_id,
                    from_state=item.from_state,
                    to_state=item.to_state,
                    reason=item.reason,
                    pid=item.pid,
                    at=timestamp(item.at),
                    topic=item.topic,
                    data=item.data,
                )

    async def _target(
        self, request: kernel_pb2.TargetRequest, context: Any, action: str
    ) -> kernel_pb2.TargetResponse:
        k = self.kernel
        grace = request.grace or None
        try:
            if bool(request.unit) == bool(request.instance_id):
                raise HsuError(f"{action}: give a unit or an instance_id (one of them)")
            if request.instance_id:
                one = {
                    "Start": k.start_one,
                    "Restart": k.restart_instance,
                }
                if action == "Stop":
                    await k.stop_one(request.instance_id, grace)
                else:
                    await one[action](request.instance_id)
                unit = k.instances[request.instance_id].unit
            else:
                unit = request.unit
                if action == "Start":
                    await k.start_unit(unit)
                elif action == "Stop":
                    await k.stop_unit(unit, grace)
                else:
                    await k.restart_unit(unit)
        except NoSuchUnit as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except HsuError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return self._instances(unit, request.instance_id)

    def _instances(self, unit: str, instance_id: str = "") -> kernel_pb2.TargetResponse:
        return kernel_pb2.TargetResponse(
            instances=[
                instance_pb(i)
                for i in self.kernel.instances.values()
                if i.unit == unit and (not instance_id or i.instance_id == instance_id)
            ]
        )

    async def Start(self, request: kernel_pb2.TargetRequest, context: Any) -> Any:
        return await self._target(request, context, "Start")

    async def Stop(self, request: kernel_pb2.TargetRequest, context: Any) -> Any:
        return await self._target(request, context, "Stop")

    async def Restart(self, request: kernel_pb2.TargetRequest, context: Any) -> Any:
        return await self._target(request, context, "Restart")

    async def Scale(
        self, request: kernel_pb2.ScaleRequest, context: Any
    ) -> kernel_pb2.TargetResponse:
        try:
            await self.kernel.scale(request.unit, request.count)
        except NoSuchUnit as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except HsuError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return self._instances(request.unit)

    async def Reload(
        self, request: kernel_pb2.ReloadRequest, context: Any
    ) -> kernel_pb2.ReloadResponse:
        if not self._reloads.allow():
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "Reload: more than 5 reloads in a few seconds; try again in a second",
            )
        try:
            changes = await self.kernel.reload()
        except ConfigError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except HsuError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return kernel_pb2.ReloadResponse(
            added=changes.added,
            removed=changes.removed,
            changed=changes.changed,
            restarted=changes.restarted,
            sections=changes.sections,
            summary=changes.summary(),
        )

    # -- routing ----------------------------------------------------------------

    async def Resolve(
        self, request: kernel_pb2.ResolveRequest, context: Any
    ) -> kernel_pb2.ResolveResponse:
        from hsu.client.route import endpoint_pb

        try:
            policy, endpoints = await self.kernel.routing.lookup(request.interface, request.ensure)
        except NoSuchUnit as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (HsuError, TimeoutError) as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"no instance of {request.interface!r} is ready: {exc or 'timed out'}",
            )
        return kernel_pb2.ResolveResponse(
            policy=policy.to_pb(kernel_pb2.RoutingPolicy),
            endpoints=[endpoint_pb(e, kernel_pb2.Endpoint) for e in endpoints],
        )

    async def WatchEndpoints(
        self, request: kernel_pb2.WatchEndpointsRequest, context: Any
    ) -> AsyncIterator[kernel_pb2.EndpointUpdate]:
        from hsu.client.route import endpoint_pb
        from hsu.ports import RegistryCompacted

        registry = self.kernel.routing.registry
        if registry is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the kernel is not running")
            return
        interface = request.interface
        async with self.endpoint_streams.hold(context):
            while True:
                endpoints, revision = await registry.snapshot()
                sent = {e.instance_id for e in endpoints if interface in e.interfaces}
                yield kernel_pb2.EndpointUpdate(
                    snapshot=True,
                    revision=revision,
                    endpoints=[
                        endpoint_pb(e, kernel_pb2.Endpoint)
                        for e in endpoints
                        if e.instance_id in sent
                    ],
                )
                try:
                    async for ev in registry.watch(revision):
                        ep = ev.endpoint
                        kind = ev.kind
                        if interface in ep.interfaces and kind == "put":
                            sent.add(ep.instance_id)
                        elif ep.instance_id in sent:
                            sent.discard(ep.instance_id)
                            kind = "delete"
                        else:
                            continue
                        yield kernel_pb2.EndpointUpdate(
                            kind=kind,
                            revision=ev.revision,
                            endpoints=[endpoint_pb(ep, kernel_pb2.Endpoint)],
                        )
                except RegistryCompacted:
                    continue
                return

    async def ReportLoad(
        self, request_iterator: AsyncIterator[kernel_pb2.LoadReport], context: Any
    ) -> kernel_pb2.LoadReportAck:
        token = _token(context)
        # one bucket per stream: a proven HSU cannot flood the kernel either
        rate = validate.RateLimit(*self.kernel.LOAD_REPORT_RATE)
        last = ""
        try:
            async for report in request_iterator:
                try:
                    rate.check("ReportLoad")
                    self.kernel.report_load(report.instance_id, token, report.inflight)
                except HsuError as exc:
                    await context.abort(_refusal(exc, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
                last = report.instance_id
        finally:
            if last:
                self.kernel.routing.reported.pop(last, None)
        return kernel_pb2.LoadReportAck()

    async def PublishEvent(
        self, request: kernel_pb2.PublishEventRequest, context: Any
    ) -> kernel_pb2.PublishEventResponse:
        try:
            event = self.kernel.publish_from(
                request.instance_id,
                _token(context),
                request.topic,
                dict(request.data),
                request.reason,
            )
        except HsuError as exc:
            await context.abort(_refusal(exc, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
        return kernel_pb2.PublishEventResponse(seq=event.seq)

    # -- slots and leases (hsu._kernel.pool) -------------------------------------

    async def Slots(
        self, request_iterator: AsyncIterator[kernel_pb2.SlotRequests], context: Any
    ) -> AsyncIterator[kernel_pb2.SlotReplies]:
        """One caller's slots: a grant per request, in any order; every slot
        still held when the stream ends goes back."""
        import asyncio

        from hsu.client.route import endpoint_pb, slot_error_code

        pool = self.kernel.routing.pool
        grants: dict[int, Any] = {}
        pending: dict[int, asyncio.Task[None]] = {}
        replies: asyncio.Queue[Any] = asyncio.Queue()
        #: the interface each held grant was asked for (what a reclaim names)
        interfaces: dict[int, str] = {}

        def reclaim(unit: str, depth: int) -> None:
            """Calls wait for ``unit``: ask this caller for the slots of it it
            keeps between its calls (``SlotReplies.reclaim``)."""
            if depth > 0:
                wanted = {interfaces[i] for i, g in grants.items() if g.unit == unit}
                if wanted:
                    replies.put_nowait(sorted(wanted))

        async def take(req: kernel_pb2.SlotRequest) -> None:
            try:
                grant = await pool.acquire(
                    req.interface,
                    req.key or None,
                    req.exclude[0] if req.exclude else "",
                    max(-1000, min(1000, req.priority)),
                    min(req.timeout, MAX_WAIT) if req.timeout > 0 else None,
                )
            except HsuError as exc:
                code = slot_error_code(exc)
                replies.put_nowait(
                    kernel_pb2.SlotReply(id=req.id, code=code.value[0], details=str(exc))
                )
            else:
                grants[req.id] = grant
                interfaces[req.id] = req.interface
                replies.put_nowait(
                    kernel_pb2.SlotReply(
                        id=req.id, endpoint=endpoint_pb(grant.endpoint, kernel_pb2.Endpoint)
                    )
                )
            finally:
                pending.pop(req.id, None)

        async def read() -> None:
            try:
                async for batch in request_iterator:
                    for req in batch.requests:
                        handle(req)
            finally:
                replies.put_nowait(None)

        def handle(req: kernel_pb2.SlotRequest) -> None:
            if req.release:
                task = pending.pop(req.id, None)
                if task is not None:
                    task.cancel()
                grant = grants.pop(req.id, None)
                interfaces.pop(req.id, None)
                if grant is not None:
                    pool.release(grant)
                return
            if req.id in pending or req.id in grants:
                return
            if len(pending) + len(grants) >= MAX_SLOTS_PER_STREAM:
                replies.put_nowait(
                    kernel_pb2.SlotReply(
                        id=req.id,
                        code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                        details=f"at most {MAX_SLOTS_PER_STREAM} slots per stream",
                    )
                )
                return
            try:  # a free slot, at once (no task: the common case)
                now = pool.try_acquire(
                    req.interface, req.key or None, req.exclude[0] if req.exclude else ""
                )
            except HsuError:
                now = None  # the task below answers with the error
            if now is not None:
                grants[req.id] = now
                interfaces[req.id] = req.interface
                replies.put_nowait(
                    kernel_pb2.SlotReply(
                        id=req.id, endpoint=endpoint_pb(now.endpoint, kernel_pb2.Endpoint)
                    )
                )
                return
            pending[req.id] = asyncio.ensure_future(take(req))

        def message(items: list[Any]) -> kernel_pb2.SlotReplies:
            asked: set[str] = set()
            for item in items:
                if isinstance(item, list):
                    asked.update(item)
            return kernel_pb2.SlotReplies(
                replies=[r for r in items if not isinstance(r, list)], reclaim=sorted(asked)
            )

        def give_back(_: Any = None) -> None:
            """Every slot still held goes back: from the generator's end, or
            from the call's end when grpc never resumes the generator (a
            cancel that lands while it is parked at a ``yield`` leaves it to
            the garbage collector, whose ``aclose()`` can come seconds
            later: a ``max_inflight`` unit was a slot short until then)."""
            with contextlib.suppress(ValueError):
                pool.depth_changed.remove(reclaim)
            reader.cancel()
            for task in pending.values():
                task.cancel()
            held = list(grants.values())
            grants.clear()
            interfaces.clear()
            for grant in held:
                pool.release(grant)

        async with self.slot_streams.hold(context):
            reader = asyncio.ensure_future(read())
            pool.depth_changed.append(reclaim)
            context.add_done_callback(give_back)
            try:
                while (reply := await replies.get()) is not None:
                    # every reply ready now goes in one message
                    batch = [reply]
                    end = False
                    while not replies.empty():
                        more = replies.get_nowait()
                        if more is None:
                            end = True
                            break
                        batch.append(more)
                    yield message(batch)
                    if end:
                        break
            finally:
                tasks = list(pending.values())
                give_back()
                await asyncio.gather(reader, *tasks, return_exceptions=True)
                give_back()  # a grant a cancelled take() made meanwhile

    async def Lease(self, request: kernel_pb2.LeaseRequest, context: Any) -> kernel_pb2.LeaseReply:
        from hsu.client.route import endpoint_pb, slot_error_code

        if not 0 < request.ttl <= MAX_LEASE_TTL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Lease: ttl must be > 0 and <= {MAX_LEASE_TTL:g} s, got {request.ttl:g}",
            )
        try:
            lease = await self.kernel.routing.pool.lease(
                request.interface,
                request.ttl,
                min(request.timeout, MAX_WAIT) if request.timeout > 0 else None,
                max(-1000, min(1000, request.priority)),
            )
        except HsuError as exc:
            await context.abort(slot_error_code(exc), str(exc))
        return kernel_pb2.LeaseReply(
            lease_id=lease.lease_id,
            endpoint=endpoint_pb(lease.grant.endpoint, kernel_pb2.Endpoint),
            ttl=lease.ttl,
        )

    async def Renew(self, request: kernel_pb2.RenewRequest, context: Any) -> kernel_pb2.LeaseReply:
        from hsu.client.route import endpoint_pb
        from hsu.errors import LeaseEnded

        try:
            lease = self.kernel.routing.pool.renew(request.lease_id)
        except LeaseEnded as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return kernel_pb2.LeaseReply(
            lease_id=lease.lease_id,
            endpoint=endpoint_pb(lease.grant.endpoint, kernel_pb2.Endpoint),
            ttl=lease.ttl,
        )

    async def Release(
        self, request: kernel_pb2.ReleaseRequest, context: Any
    ) -> kernel_pb2.ReleaseReply:
        self.kernel.routing.pool.release_lease(request.lease_id)
        return kernel_pb2.ReleaseReply()


#: seconds a slot or lease request may wait at most
MAX_WAIT = 3600.0
#: seconds a lease may last between renewals at most
MAX_LEASE_TTL = 86400.0
#: slots one Slots stream may hold or wait for at once
MAX_SLOTS_PER_STREAM = 10000


def _token(context: Any) -> str:
    """The caller's ``hsu-instance-token`` metadata ("" without one)."""
    for key, value in context.invocation_metadata() or ():
        if key == TOKEN_METADATA and isinstance(value, str):
            return value
    return ""


def _refusal(exc: HsuError, otherwise: grpc.StatusCode) -> grpc.StatusCode:
    """The status a refused call gets for what refused it."""
    if isinstance(exc, NotAllowed):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, OverLimit):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, InvalidValue):
        return grpc.StatusCode.INVALID_ARGUMENT
    return otherwise


class KernelServer:
    """Owns the kernel's two grpc.aio servers and their health servicers.

    The *control plane* serves the Kernel API, the kernel's Core, health and
    reflection, on a 0600 unix socket by default (``kernel.control``). The
    *data plane* serves what plugins add through ``hsu_kernel_handlers`` (the
    gateway: every unit's interfaces) with health, on ``kernel.address``; it
    exists only when a plugin adds handlers, and never serves the Kernel API.
    """

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        #: who may call what (docs/auth.md); None when auth is off
        self.auth = auth.gate_for(kernel)
        self.server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0)], interceptors=self._interceptors("control")
        )
        self.health = health.aio.HealthServicer()
        kernel_pb2_grpc.add_KernelServicer_to_server(KernelServicer(kernel), self.server)
        core_pb2_grpc.add_CoreServicer_to_server(
            CoreServicer(
                kernel.core_info,
                kernel.shutdown_from_rpc,
                kernel.logs,
                metrics=kernel.metrics_hub.gather,
            ),
            self.server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        storage_pb2_grpc.add_StorageServicer_to_server(StorageServicer(kernel), self.server)
        cache_pb2_grpc.add_CacheServicer_to_server(CacheServicer(kernel), self.server)
        self.services = (
            KERNEL_SERVICE, CORE_SERVICE, HEALTH_SERVICE, STORAGE_SERVICE, CACHE_SERVICE,
        )  # fmt: skip
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ControlReflection((*self.services, V1ALPHA)), self.server
        )
        #: the control socket's front when the kernel reads who connects
        #: (auth on, a unix control socket): hsu._kernel.peercred
        self.proxy: peercred.PeerProxy | None = None
        #: the control server's internal socket behind the proxy ("" without)
        self.internal = ""
        self._internal_dir: Path | None = None
        self.data: grpc.aio.Server | None = None
        self.data_health: health.aio.HealthServicer | None = None
        #: the data plane's reflection (the units' interfaces included) and
        #: health of interface names; None without a data plane
        self.descriptors: Descriptors | None = None
        self.interface_health: InterfaceHealth | None = None
        handlers = kernel.plugins.kernel_handlers(kernel)
        if handlers:
            self.data = grpc.aio.server(
                options=[("grpc.so_reuseport", 0)], interceptors=self._interceptors("data")
            )
            self.data_health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.data_health, self.data)
            self.interface_health = InterfaceHealth(kernel, self.data_health)
            self.descriptors = Descriptors(kernel, (HEALTH_SERVICE, V1, V1ALPHA))
            kernel.events.listeners += [self.interface_health.on_event, self.descriptors.on_event]
            self.data.add_generic_rpc_handlers(
                tuple(ReflectionServicer(self.descriptors).handlers())
            )
            # after health and reflection: a gateway (a plugin) takes the rest
            self.data.add_generic_rpc_handlers(tuple(handlers))

    def _interceptors(self, plane: str) -> list[Any]:
        return [] if self.auth is None else [auth.AuthInterceptor(self.auth, plane)]

    async def start(self, control: str, data: str) -> tuple[str, str]:
        """Listen on both addresses; return them as bound (port 0 resolved).

        The data address is "" when no plugin serves a data plane.
        """
        tls = self.kernel.kernel_settings.tls
        if tls is not None and self.data is not None and data != self.kernel.requested_address:
            raise HsuError(
                f"kernel.tls: a plugin serves the data plane at {self.kernel.requested_address}"
                " (the nginx gateway?) and the kernel's TLS does not reach it; use the python"
                " gateway with kernel.tls"
            )
        base = self.kernel.deployment.base_dir
        if self.auth is not None and control.startswith("unix:"):
            bound_control = await self._listen_proxied(control)
        else:
            prepare_socket(control)
            bound_control = await _listen(self.server, control, "control", tls, base)
            lock_socket(control)
        bound_data = ""
        if self.data is not None:
            prepare_socket(data)
            bound_data = await _listen(self.data, data, "address", tls, base)
        await self.set_serving(False)
        return bound_control, bound_data

    async def _listen_proxied(self, control: str) -> str:
        """The gRPC server on an internal socket in the state dir, and the
        proxy that reads each caller's credentials on ``control``."""
        assert self.auth is not None
        mode, group = self.auth.socket_access()
        state_dir = self.kernel.state_dir
        peercred.prepare(control, state_dir, widened=mode != 0o600)
        internal, self._internal_dir = peercred.internal_socket(state_dir)
        self.internal = internal
        prepare_socket(internal)
        await _listen(self.server, internal, "control")
        lock_socket(internal)
        self.proxy = peercred.PeerProxy(control, internal)
        self.auth.peers = self.proxy.peers
        await self.proxy.start(mode, group)
        return control

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.services):
            await self.health.set(name, status)
        if self.data_health is not None:
            await self.data_health.set("", status)
        if self.interface_health is not None:
            await self.interface_health.refresh()

    async def drain(self) -> None:
        await self.health.enter_graceful_shutdown()
        if self.data_health is not None:
            await self.data_health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        for listener in (self.interface_health, self.descriptors):
            if listener is not None:
                with contextlib.suppress(ValueError):
                    self.kernel.events.listeners.remove(listener.on_event)
                await listener.close()
        if self.proxy is not None:
            self.proxy.stop_listening()  # calls in flight finish through it
        if self.data is not None:
            await self.data.stop(grace)
        await self.server.stop(grace)
        if self.proxy is not None:
            await self.proxy.close()
        if self.internal:
            peercred.cleanup(self.internal, self._internal_dir)
            self._internal_dir = None


async def _listen(
    server: grpc.aio.Server,
    address: str,
    what: str,
    tls: TLSSettings | None = None,
    base_dir: str = ".",
) -> str:
    """Bind and start ``server``: TLS with ``tls`` on a TCP address (a unix
    socket stays plaintext: its file mode guards it)."""
    in_use = _in_use(address)
    if in_use:
        # before grpc tries: its C core would print its own line first
        raise HsuError(f"kernel.{what}: cannot listen on {address}: {in_use}; is it in use?")
    try:
        if tls is not None and not address.startswith("unix:"):
            port = server.add_secure_port(address, ServerTLS(tls, base_dir).credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise HsuError(f"kernel.{what}: cannot listen on {address}: {exc}; is it in use?") from None
    await server.start()
    if address.startswith("unix:"):
        return address
    host = address.rsplit(":", 1)[0]
    return f"{host}:{port}"


def _in_use(address: str) -> str:
    """Why a TCP ``host:port`` cannot be bound ("" if it can, or it is not a
    fixed TCP port): each address the host resolves to is tried as grpc binds
    it, with SO_REUSEADDR, so only a listening socket makes it fail."""
    import socket

    if address.startswith("unix:") or ":" not in address:
        return ""
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
        # an ASCII name as bytes: a str goes through the idna codec, whose
        # modules (encodings.idna, stringprep) a kernel does not need otherwise
        name = (host.encode() if host.isascii() else host) if host else None
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (ValueError, OSError):
        return ""  # grpc says what is wrong with it
    if port == 0:
        return ""
    errors = []
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
            return ""  # grpc can bind at least this one
        except OSError as exc:
            errors.append(exc.strerror or str(exc))
    return errors[0] if errors else ""
