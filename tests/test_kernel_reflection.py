"""The kernel speaks for its HSUs: reflection at the kernel's data-plane
address lists and describes every unit's interfaces, and health answers for
interface names (hsu._kernel.reflection, hsu._kernel.interface_health).

The HSU here is generated from a .proto in the test's tmp dir and run as a
unit; neither the kernel nor the test process ever imports its code. The
client holds no .proto either: grpcio-reflection's
ProtoReflectionDescriptorDatabase, as grpcurl would.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import hsu
from conftest import until
from hsu.testing import build_kernel

pytestmark = pytest.mark.integration

CALC = "calc.v1.Calculator"
PROTO = """\
syntax = "proto3";

package calc.v1;

import "google/protobuf/timestamp.proto";

service Calculator {
  rpc Add(AddRequest) returns (AddReply);
}

message AddRequest {
  int64 a = 1;
  int64 b = 2;
}

message AddReply {
  int64 sum = 1;
  google.protobuf.Timestamp at = 2;
}
"""
SERVER = """\
from hsu import worker
from calc.v1 import calc_pb2, calc_pb2_grpc


class Calculator(calc_pb2_grpc.CalculatorServicer):
    async def Add(self, request, context):
        reply = calc_pb2.AddReply(sum=request.a + request.b)
        reply.at.GetCurrentTime()
        return reply


if __name__ == "__main__":
    worker.run(Calculator(), version="1.0")
"""


@pytest.fixture(scope="module")
def calc_hsu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calc HSU, generated as docs/tutorial.md says: proto/calc/v1/calc.proto
    compiled with -I proto into gen/, so the code imports ``calc.v1``."""
    root = tmp_path_factory.mktemp("calc")
    (root / "proto" / "calc" / "v1").mkdir(parents=True)
    (root / "proto" / "calc" / "v1" / "calc.proto").write_text(PROTO)
    (root / "gen").mkdir()
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-I", "proto",
            "--python_out=gen", "--grpc_python_out=gen", "calc/v1/calc.proto",
        ],
        cwd=root,
        check=True,
    )  # fmt: skip
    (root / "calc_hsu.py").write_text(SERVER)
    return root


def calc_unit(root: Path, **more: object) -> dict[str, object]:
    unit: dict[str, object] = {
        "command": ["python", "calc_hsu.py"],
        "cwd": str(root),
        "env": {"PYTHONPATH": str(root / "gen")},
        "interfaces": [CALC],
        "startup_timeout": 20,
        "stop_grace": 5,
    }
    unit.update(more)
    return unit


def never_imported() -> None:
    assert not [m for m in sys.modules if m.startswith("calc")]
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindFileByName("calc/v1/calc.proto")


def listed(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        return list(ProtoReflectionDescriptorDatabase(channel).get_services())


def described(address: str) -> tuple[list[str], str]:
    """grpcurl describe: the service's methods, and a reply field's type."""
    with grpc.insecure_channel(address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName(CALC)
        at = service.methods_by_name["Add"].output_type.fields_by_name["at"]
        return [m.name for m in service.methods], at.message_type.full_name


def called(address: str) -> int:
    """grpcurl call: messages built from what reflection described."""
    with grpc.insecure_channel(address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        add = pool.FindMethodByName(f"{CALC}.Add")
        request_class = message_factory.GetMessageClass(add.input_type)
        reply_class = message_factory.GetMessageClass(add.output_type)
        call = channel.unary_unary(
            f"/{CALC}/Add",
            request_serializer=request_class.SerializeToString,
            response_deserializer=reply_class.FromString,
        )
        return int(call(request_class(a=2, b=40), timeout=30).sum)


async def check(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    return int(reply.status)


async def test_reflection_at_the_kernel_describes_a_unit_it_never_imported(tmp_path, calc_hsu):
    kernel = build_kernel({"units": {"calc": calc_unit(calc_hsu)}}, base_dir=str(tmp_path))
    await kernel.start()
    try:
        # listing needs no instance: the deployment says what the unit serves
        services = await asyncio.to_thread(listed, kernel.address)
        assert CALC in services and "grpc.health.v1.Health" in services
        assert "grpc.reflection.v1.ServerReflection" in services
        assert "hsu.kernel.v1.Kernel" not in services  # never on the data plane
        assert not kernel.instances
        # describing starts one on demand and asks it
        methods, at = await asyncio.to_thread(described, kernel.address)
        assert methods == ["Add"]
        assert at == "google.protobuf.Timestamp"  # what the file imports came along
        assert len(kernel.instances) == 1
        assert kernel._server.descriptors.learned[CALC] == ("calc", "1.0")
        assert await asyncio.to_thread(called, kernel.address) == 42
        never_imported()
    finally:
        await kernel.stop()


def v1_ask(address: str, request: reflection_pb2.ServerReflectionRequest):
    """One request over grpc.reflection.v1 (grpcurl's first choice): its
    messages are v1alpha's on the wire."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return next(iter(call(iter([request]), timeout=30)))


async def test_reflection_v1_and_a_ready_instance_is_described_without_asking(tmp_path, calc_hsu):
    kernel = build_kernel(
        {"units": {"calc": calc_unit(calc_hsu, start="at-start")}}, base_dir=str(tmp_path)
    )
    await kernel.start()
    try:
        # the instance was asked as it became ready
        descriptors = kernel._server.descriptors
        await until(lambda: CALC in descriptors.learned, 10)
        Request = reflection_pb2.ServerReflectionRequest
        reply = await asyncio.to_thread(
            v1_ask, kernel.address, Request(file_containing_symbol="calc.v1.AddRequest")
        )
        from google.protobuf import descriptor_pb2

        names = [
            descriptor_pb2.FileDescriptorProto.FromString(raw).name
            for raw in reply.file_descriptor_response.file_descriptor_proto
        ]
        assert names[0] == "calc/v1/calc.proto" and "google/protobuf/timestamp.proto" in names
        # a symbol nobody serves: NOT_FOUND, saying so
        reply = await asyncio.to_thread(
            v1_ask, kernel.address, Request(file_containing_symbol="nope.v1.Nope")
        )
        assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        assert "not a service, method or type of any unit's interface" in (
            reply.error_response.error_message
        )
        # reflection about reflection v1 itself
        reply = await asyncio.to_thread(
            v1_ask,
            kernel.address,
            Request(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
        )
        fd = descriptor_pb2.FileDescriptorProto.FromString(
            reply.file_descriptor_response.file_descriptor_proto[0]
        )
        assert fd.package == "grpc.reflection.v1"
        never_imported()
    finally:
        await kernel.stop()


async def watch(address: str, service: str, seen: list[int], until_status: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=60
        )
        async for reply in stream:
            seen.append(int(reply.status))
            if reply.status == until_status:
                stream.cancel()
                return


async def test_health_of_an_interface_name_at_the_kernel(tmp_path, calc_hsu):
    H = health_pb2.HealthCheckResponse
    crash = {
        "command": ["python", "-c", "import sys; sys.exit(2)"],
        "interfaces": ["crash.v1.Crash"],
        "start": "on-demand",
        "restart": {
            "backoff": {"initial": 0.05, "max": 0.1, "jitter": 0},
            "crash_loop": {"max_failures": 2, "window": 60},
        },
    }
    kernel = build_kernel(
        {"units": {"calc": calc_unit(calc_hsu), "crash": crash}}, base_dir=str(tmp_path)
    )
    await kernel.start()
    try:
        address = kernel.address
        # on demand, no instance yet: a call would start one
        assert await check(address, CALC) == H.SERVING
        assert await check(address, "crash.v1.Crash") == H.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await check(address, "nope.v1.Nope")
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        unknown: list[int] = []
        await asyncio.wait_for(watch(address, "nope.v1.Nope", unknown, H.SERVICE_UNKNOWN), 10)
        assert unknown == [H.SERVICE_UNKNOWN]
        # the crash unit's breaker opens: NOT_SERVING, seen by a watcher
        seen: list[int] = []
        watcher = asyncio.ensure_future(watch(address, "crash.v1.Crash", seen, H.NOT_SERVING))
        await until(lambda: seen == [H.SERVING])
        with pytest.raises(hsu.HsuError):
            await kernel.instance_for("crash.v1.Crash")
        await until(
            lambda: any(i.state is hsu.InstanceState.FATAL for i in kernel.instances.values())
        )
        await asyncio.wait_for(watcher, 10)
        assert seen == [H.SERVING, H.NOT_SERVING]
        assert await check(address, "crash.v1.Crash") == H.NOT_SERVING
        assert await check(address, CALC) == H.SERVING
        # a drain: every interface NOT_SERVING, seen by a watcher
        seen = []
        watcher = asyncio.ensure_future(watch(address, CALC, seen, H.NOT_SERVING))
        await until(lambda: seen == [H.SERVING])
        stopping = asyncio.ensure_future(kernel.stop())
        await asyncio.wait_for(watcher, 10)
        assert seen == [H.SERVING, H.NOT_SERVING]
        await stopping
    finally:
        await kernel.stop()


@pytest.mark.skipif(
    shutil.which("nginx") is None and not os.environ.get("HSU_REQUIRE_NGINX"),
    reason="nginx is not installed (apt-get install nginx-light)",
)
async def test_reflection_and_interface_health_through_nginx(tmp_path, calc_hsu):
    from hsu_plugins.gateway import nginx

    kernel = build_kernel(
        {"units": {"calc": calc_unit(calc_hsu)}},
        names=["hsu_plugins.gateway.nginx"],
        base_dir=str(tmp_path),
    )
    await kernel.start()
    try:
        plane = kernel.plugin(nginx.PLANE)
        assert isinstance(plane, nginx.DataPlane)
        address = plane.address
        assert address != kernel.address  # nginx in front of the kernel
        H = health_pb2.HealthCheckResponse
        assert await check(address, CALC) == H.SERVING
        assert CALC in await asyncio.to_thread(listed, address)
        methods, _ = await asyncio.to_thread(described, address)
        assert methods == ["Add"]
        assert await asyncio.to_thread(called, address) == 42
        never_imported()
    finally:
        await kernel.stop()
