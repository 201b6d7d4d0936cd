"""The pytest plugin's fixtures for HSU and plugin authors (hsu.testing,
docs/testing.md): a served HSU, a fake HSU with canned answers, a kernel with
its events. They come from the installed ``pytest11`` entry point."""

from __future__ import annotations

import asyncio
import os
import signal
from importlib.metadata import entry_points

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.testing import Fail, FakeHsu
from hsu_echo import Echo
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

ECHO = "hsu.echo.v1.Echo"


def test_the_fixtures_come_from_the_installed_pytest11_entry_point(request):
    [ep] = [e for e in entry_points(group="pytest11") if e.name == "hsu"]
    assert ep.value == "hsu.testing"
    for name in ("hsu_server", "hsu_fake_hsu", "hsu_kernel", "hsu_kernel_factory"):
        assert request.config.pluginmanager.hasplugin("hsu")
        assert request._fixturemanager.getfixturedefs(name, request.node), name


async def test_hsu_server_serves_the_servicer_core_health_and_reflection(hsu_server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    server = await hsu_server(Echo(), unit="echo", version="9.9")
    assert server.address.startswith("127.0.0.1:")
    channel = server.channel()
    reply = await echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(message="x"))
    assert reply.message == "x"
    info = await core_pb2_grpc.CoreStub(channel).Info(core_pb2.InfoRequest())
    assert (info.unit, info.version, list(info.interfaces)) == ("echo", "9.9", [ECHO])
    status = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=ECHO)
    )
    assert status.status == health_pb2.HealthCheckResponse.SERVING

    def listed() -> set[str]:  # a blocking client: off the loop that serves
        with grpc.insecure_channel(server.address) as sync:
            return set(ProtoReflectionDescriptorDatabase(sync).get_services())

    assert ECHO in await asyncio.to_thread(listed)


async def test_hsu_server_is_standalone_even_under_a_kernels_environment(hsu_server, monkeypatch):
    # a test run from an HSU's environment must not try to register anywhere
    monkeypatch.setenv("HSU_KERNEL_ADDRESS", "unix:/nonexistent/k.sock")
    monkeypatch.setenv("HSU_INSTANCE_TOKEN", "secret")
    server = await hsu_server(Echo())
    stub = echo_pb2_grpc.EchoStub(server.channel())
    assert (await stub.Echo(echo_pb2.EchoRequest(message="alone"))).message == "alone"


async def test_fake_hsu_answers_in_order_then_repeats_the_last(hsu_fake_hsu):
    fake = await hsu_fake_hsu(ECHO)
    fake.fail("Echo", grpc.StatusCode.UNAVAILABLE, "warming up").reply(
        "hsu.echo.v1.Echo/Echo",
        echo_pb2.EchoResponse(message="first"),
        lambda request: echo_pb2.EchoResponse(message=request.message.upper()),
    )
    async with grpc.aio.insecure_channel(fake.address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Echo(echo_pb2.EchoRequest(message="a"))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert failed.value.details() == "warming up"
        assert (await stub.Echo(echo_pb2.EchoRequest(message="b"))).message == "first"
        assert (await stub.Echo(echo_pb2.EchoRequest(message="c"))).message == "C"
        assert (await stub.Echo(echo_pb2.EchoRequest(message="d"))).message == "D"
        # a method with nothing canned is UNIMPLEMENTED, naming it
        with pytest.raises(grpc.aio.AioRpcError) as nothing:
            await stub.EchoStream(echo_pb2.EchoStreamRequest(message="x", count=1)).read()
        assert nothing.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "/hsu.echo.v1.Echo/EchoStream" in nothing.value.details()
        # it serves Core and health like any HSU
        assert (
            await core_pb2_grpc.CoreStub(channel).Ping(core_pb2.PingRequest(payload=b"p"))
        ).payload == b"p"
    assert [c.request.message for c in fake.calls_to("Echo")] == ["a", "b", "c", "d"]
    assert len(fake.calls) == 5


async def test_fake_hsu_streams_both_ways_and_records_metadata(hsu_fake_hsu):
    fake = await hsu_fake_hsu(ECHO)
    fake.reply("EchoStream", [echo_pb2.EchoResponse(message=f"s{i}") for i in range(3)])
    fake.reply("Collect", lambda requests: echo_pb2.EchoResponse(
        message="+".join(r.message for r in requests)
    ))  # fmt: skip
    async with grpc.aio.insecure_channel(fake.address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        call = stub.EchoStream(echo_pb2.EchoStreamRequest(), metadata=(("x-who", "me"),))
        assert [r.message async for r in call] == ["s0", "s1", "s2"]
        parts = iter([echo_pb2.EchoRequest(message=m) for m in "xyz"])
        assert (await stub.Collect(parts)).message == "x+y+z"
    [streamed] = fake.calls_to("EchoStream")
    assert ("x-who", "me") in streamed.metadata


def test_fake_hsu_names_what_is_wrong():
    with pytest.raises(ValueError, match=r"service 'no\.such\.v1\.X' is unknown: import its"):
        FakeHsu("no.such.v1.X")
    fake = FakeHsu(ECHO)
    with pytest.raises(ValueError, match=r"no method 'hsu\.echo\.v1\.Echo/Nope'"):
        fake.reply("hsu.echo.v1.Echo/Nope", echo_pb2.EchoResponse())
    assert Fail(grpc.StatusCode.INTERNAL).details == ""


def _unit(**more):
    return {
        "command": ["python", "-m", "hsu_echo"],
        "interfaces": [ECHO],
        "stop_grace": 2,
        **more,
    }


async def test_hsu_kernel_records_events_and_waits_for_them(hsu_kernel):
    k = await hsu_kernel({"name": "harness", "units": {"echo": _unit()}})
    await k.wait_for(kind="kernel", to_state="running")
    [inst] = await k.wait_ready("echo")  # on demand: started by the wait
    ready = await k.wait_for(unit="echo", topic="instance.ready")
    assert ready.instance_id == inst.instance_id
    async with k.connect() as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Echo(
            echo_pb2.EchoRequest(message="via harness"), timeout=20
        )
    assert reply.pid == inst.pid
    os.kill(inst.pid, signal.SIGKILL)
    # the second "ready" of that instance: its replacement
    # (by topic: the bus also says worker.started for each, docs/tracing.md)
    again = await k.wait_for(instance_id=inst.instance_id, topic="instance.ready", count=2)
    assert again.seq > ready.seq and again.pid != reply.pid
    with pytest.raises(AssertionError, match=r"no event matching \{'unit': 'nope'\} within 0.2 s"):
        await k.wait_for(unit="nope", timeout=0.2)


def test_require_node_skips_without_node_and_fails_when_required(monkeypatch, tmp_path):
    from hsu.testing import require_node

    (tmp_path / "package-lock.json").write_text("{}")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("HSU_REQUIRE_NODE", raising=False)
    with pytest.raises(pytest.skip.Exception, match="node and npm are needed"):
        require_node(tmp_path)
    monkeypatch.setenv("HSU_REQUIRE_NODE", "1")
    with pytest.raises(pytest.fail.Exception, match="HSU_REQUIRE_NODE is set"):
        require_node(tmp_path)


def test_require_node_names_a_package_without_a_lockfile(tmp_path):
    from hsu.testing import require_node

    with pytest.raises(FileNotFoundError, match=r"no package-lock\.json to install from"):
        require_node(tmp_path)
