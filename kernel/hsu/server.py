"""The kernel's gRPC server: Kernel API, Core, grpc.health.v1, reflection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hsu.core.v1 import core_pb2_grpc
from hsu.core_service import CORE_SERVICE, CoreServicer, timestamp
from hsu.errors import HsuError
from hsu.instances import Instance
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc

if TYPE_CHECKING:
    from hsu.microkernel import Kernel

KERNEL_SERVICE = "hsu.kernel.v1.Kernel"
HEALTH_SERVICE = "grpc.health.v1.Health"


def instance_pb(inst: Instance) -> kernel_pb2.Instance:
    msg = kernel_pb2.Instance(
        instance_id=inst.instance_id,
        unit=inst.unit,
        state=inst.state.value,
        pid=inst.pid,
        address=inst.address,
        interfaces=inst.interfaces,
        version=inst.version,
        started_at=timestamp(inst.started_at),
        metadata=inst.metadata,
        managed=inst.managed,
    )
    if inst.registered_at is not None:
        msg.registered_at.CopyFrom(timestamp(inst.registered_at))
    return msg


class KernelServicer(kernel_pb2_grpc.KernelServicer):
    def __init__(self, kernel: Kernel):
        self.kernel = kernel

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
            )
        except HsuError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return kernel_pb2.RegisterResponse(instance_id=inst.instance_id)

    async def Deregister(
        self, request: kernel_pb2.DeregisterRequest, context: Any
    ) -> kernel_pb2.DeregisterResponse:
        try:
            self.kernel.deregister(request.instance_id)
        except HsuError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
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
        return kernel_pb2.ListPluginsResponse(
            plugins=[kernel_pb2.Plugin(**i.to_dict()) for i in self.kernel.plugins.infos()]
        )

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


class KernelServer:
    """Owns the grpc.aio server and the health servicer."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0)],
        )
        self.health = health.aio.HealthServicer()
        kernel_pb2_grpc.add_KernelServicer_to_server(KernelServicer(kernel), self.server)
        core_pb2_grpc.add_CoreServicer_to_server(
            CoreServicer(kernel.core_info, kernel.shutdown_from_rpc, kernel.logs), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.services = (KERNEL_SERVICE, CORE_SERVICE, HEALTH_SERVICE)
        reflection.enable_server_reflection((*self.services, reflection.SERVICE_NAME), self.server)

    async def start(self, address: str) -> str:
        """Listen on ``address`` and return the address actually bound."""
        try:
            port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise HsuError(f"kernel cannot listen on {address}: {exc}; is it in use?") from None
        await self.set_serving(False)
        await self.server.start()
        if address.startswith("unix:"):
            return address
        host = address.rsplit(":", 1)[0]
        return f"{host}:{port}"

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.services):
            await self.health.set(name, status)

    async def drain(self) -> None:
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)
