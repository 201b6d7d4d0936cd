"""The Python gateway is a default plugin like any other: it adds its handler
through ``hsu_kernel_handlers`` and drops a gone address's channel through
``hsu_endpoint_removed``; ``no:gateway`` leaves the kernel serving its own API.
Real kernels, a real echo HSU, real gRPC on loopback."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import hsu
from conftest import until
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc
from hsu_plugins.gateway import python as gateway_python

pytestmark = pytest.mark.integration

ECHO = "hsu.echo.v1.Echo"
UNIT = {
    "command": ["python", "-m", "hsu_echo"],
    "interfaces": [ECHO],
    "startup_timeout": 20,
    "stop_grace": 5,
}


async def test_without_the_gateway_plugin_the_kernel_serves_only_its_own_api(
    hsu_kernel_factory: Any,
) -> None:
    kernel = await hsu_kernel_factory({"units": {"echo": UNIT}}, names=["no:gateway"])
    assert kernel.plugin(gateway_python.PLANE) is None
    # no data plane at all: nothing listens on the address asked for
    assert kernel.address == ""
    async with grpc.aio.insecure_channel(kernel.control_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(message="x"), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        pong = await core_pb2_grpc.CoreStub(channel).Ping(core_pb2.PingRequest(), timeout=5)
        assert pong is not None
    # routed callers never needed the gateway
    reply = await echo_pb2_grpc.EchoStub(kernel.connect()).Echo(
        echo_pb2.EchoRequest(message="routed"), timeout=20
    )
    assert reply.message == "routed"


async def test_with_it_a_plain_client_calls_through_the_kernels_address(
    hsu_kernel_factory: Any,
) -> None:
    kernel = await hsu_kernel_factory({"units": {"echo": UNIT}})
    gateway = kernel.plugin(gateway_python.PLANE)
    assert isinstance(gateway, gateway_python.Gateway)
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Echo(
            echo_pb2.EchoRequest(message="through"), timeout=20
        )
    assert reply.message == "through"


async def test_kernel_gateway_false_turns_it_off_as_before(hsu_kernel_factory: Any) -> None:
    kernel = await hsu_kernel_factory({"kernel": {"gateway": False}, "units": {"echo": UNIT}})
    assert kernel.plugin(gateway_python.PLANE) is None


class Hello(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Answers ``/test.v1.Hello/Say`` with the request bytes reversed."""

    def service(self, details: Any) -> Any:
        if details.method != "/test.v1.Hello/Say":
            return None

        async def say(request: bytes, context: Any) -> bytes:
            return request[::-1]

        return grpc.unary_unary_rpc_method_handler(say)


async def test_hsu_kernel_handlers_serve_the_data_plane_after_health(
    hsu_kernel_factory: Any,
) -> None:
    class Extra:
        @staticmethod
        @hsu.hookimpl
        def hsu_kernel_handlers(kernel: Any) -> list[Any]:
            return [Hello()]

    kernel = await hsu_kernel_factory({"units": {}}, plugins=[Extra])
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        say = channel.unary_unary("/test.v1.Hello/Say")
        assert await say(b"abc", timeout=5) == b"cba"
        # health is asked first, the gateway still takes the rest
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # the kernel's Core is the control plane's, not the data plane's
        with pytest.raises(grpc.aio.AioRpcError) as core:
            await core_pb2_grpc.CoreStub(channel).Ping(core_pb2.PingRequest(), timeout=5)
        assert core.value.code() is grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/no.such.v1.Svc/M")(b"", timeout=5)
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert "hsu gateway" in (info.value.details() or "")


async def test_hsu_endpoint_removed_tells_of_an_address_gone_and_the_gateway_drops_it(
    hsu_kernel_factory: Any,
) -> None:
    removed: list[str] = []

    class Watcher:
        @staticmethod
        @hsu.hookimpl
        def hsu_endpoint_removed(endpoint: Any) -> None:
            removed.append(endpoint.address)

    kernel = await hsu_kernel_factory({"units": {"echo": UNIT}}, plugins=[Watcher])
    gateway = kernel.plugin(gateway_python.PLANE)
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        await echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(message="a"), timeout=20)
    [inst] = [i for i in kernel.instances.values() if i.state == "ready"]
    address = inst.address
    assert address in gateway._channels
    await kernel.stop_unit("echo")
    await until(lambda: removed == [address], 10)
    assert address not in gateway._channels
