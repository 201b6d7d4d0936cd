"""The Python HSU SDK: an HSU run standalone, without a kernel."""

import os
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.errors import HsuError
from hsu.worker import Service, Worker
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

pytestmark = pytest.mark.integration


def start_standalone(tmp_path, **env):
    address = f"unix:{tmp_path / 'echo.sock'}"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HSU_")}
    child_env.update(HSU_LISTEN=address, **env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsu_echo"], env=child_env, stderr=subprocess.PIPE, text=True
    )
    with grpc.insecure_channel(address) as ch:
        grpc.channel_ready_future(ch).result(timeout=20)
    return proc, address


def test_standalone_hsu_serves_echo_core_and_health_then_stops_on_shutdown(tmp_path):
    proc, address = start_standalone(tmp_path)
    try:
        with grpc.insecure_channel(address) as ch:
            reply = echo_pb2_grpc.EchoStub(ch).Echo(echo_pb2.EchoRequest(message="x"))
            streamed = list(
                echo_pb2_grpc.EchoStub(ch).EchoStream(
                    echo_pb2.EchoStreamRequest(message="m", count=3)
                )
            )
            joined = echo_pb2_grpc.EchoStub(ch).Collect(
                iter([echo_pb2.EchoRequest(message=w) for w in ("a", "b")])
            )
            info = core_pb2_grpc.CoreStub(ch).Info(core_pb2.InfoRequest())
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="hsu.echo.v1.Echo")
            )
            logs = list(core_pb2_grpc.CoreStub(ch).StreamLogs(core_pb2.StreamLogsRequest(tail=10)))
            core_pb2_grpc.CoreStub(ch).Shutdown(core_pb2.ShutdownRequest(reason="test"))
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert (reply.message, reply.pid) == ("x", proc.pid)
    assert [r.message for r in streamed] == ["m 0", "m 1", "m 2"]
    assert joined.message == "a b"
    assert (info.pid, info.address, list(info.interfaces)) == (
        proc.pid,
        address,
        ["hsu.echo.v1.Echo"],
    )
    assert info.version == "0.1.0" and info.runtime.startswith("hsu-python/")
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert any("standalone: serving hsu.echo.v1.Echo" in r.message for r in logs)


def test_standalone_hsu_exits_cleanly_on_sigterm(tmp_path):
    proc, _ = start_standalone(tmp_path)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=20) == 0
    finally:
        _, err = proc.communicate()
    assert "stopping: SIGTERM" in err


async def test_a_refused_registration_exits_1_saying_why(hsu_kernel_factory):
    import asyncio

    kernel = await hsu_kernel_factory({})
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSU_")}
    env.update(HSU_KERNEL_ADDRESS=kernel.control_address, HSU_LISTEN="127.0.0.1:0")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hsu_echo", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "kernel refused: INVALID_ARGUMENT: Register: unit is required" in err.decode()


def test_service_of_finds_the_generated_adder_and_full_name():
    from hsu_echo import Echo

    service = Service.of(Echo())
    assert service.name == "hsu.echo.v1.Echo"
    assert service.add_to_server is echo_pb2_grpc.add_EchoServicer_to_server


def test_a_servicer_not_from_generated_code_is_a_clear_error():
    class Plain:
        pass

    with pytest.raises(HsuError, match="does not derive from a grpcio-generated"):
        Service.of(Plain())
    with pytest.raises(HsuError, match="at least one interface"):
        Worker()


def test_worker_reads_its_identity_from_the_environment(monkeypatch):
    from hsu_echo import Echo

    monkeypatch.setenv("HSU_UNIT", "echo")
    monkeypatch.setenv("HSU_INSTANCE_ID", "echo-1")
    monkeypatch.setenv("HSU_KERNEL_ADDRESS", "unix:/nowhere")
    monkeypatch.setenv("HSU_LISTEN", "127.0.0.1:0")
    w = Worker(Echo())
    assert (w.unit, w.instance_id, w.kernel_address, w.listen) == (
        "echo",
        "echo-1",
        "unix:/nowhere",
        "127.0.0.1:0",
    )
