"""An HSU in another language: contrib/hsu-echo-node (Node.js, @grpc/grpc-js)
started by a real kernel on demand, called, SIGKILLed and replaced, stopped
cleanly; its Core, health and reflection answer a Python client.

Needs node and npm; HSU_REQUIRE_NODE=1 (CI) turns a skip into a failure.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import hsu
from conftest import ROOT, until
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.testing import require_node
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

NODE_HSU = ROOT / "contrib" / "hsu-echo-node"
ECHO = "hsu.echo.v1.Echo"
S = hsu.InstanceState

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def node_echo() -> Path:
    """contrib/hsu-echo-node/index.js, its packages installed (``npm ci``)."""
    node = require_node(NODE_HSU)
    return Path(node.package) / "index.js"


def _unit(script: Path, **more: object) -> dict[str, object]:
    return {
        "command": ["node", str(script)],
        "interfaces": [ECHO],
        "start": "on-demand",
        "startup_timeout": 30,
        "stop_grace": 5,
        **more,
    }


async def test_the_node_hsu_starts_on_demand_is_replaced_after_sigkill_and_stops_cleanly(
    hsu_kernel_factory, node_echo
):
    kernel = await hsu_kernel_factory({"name": "node", "units": {"echo-node": _unit(node_echo)}})
    assert not kernel.instances  # on demand: nothing runs before the first call

    async with hsu.connect(kernel.control_address) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Echo(
            echo_pb2.EchoRequest(message="hi node"), timeout=30
        )
    [inst] = kernel.instances.values()
    assert reply.message == "hi node"
    # the Node process answered, under the id the kernel gave it
    assert reply.pid == inst.pid and reply.instance_id == inst.instance_id
    assert psutil.Process(inst.pid).name() == "node"
    assert inst.state is S.READY

    # its Core: Info says who it is; Shutdown without the kernel's token is refused
    async with grpc.aio.insecure_channel(inst.address) as direct:
        info = await core_pb2_grpc.CoreStub(direct).Info(core_pb2.InfoRequest(), timeout=5)
        assert info.runtime.startswith("hsu-node/")
        assert (info.unit, info.instance_id, info.pid) == ("echo-node", inst.instance_id, inst.pid)
        assert list(info.interfaces) == [ECHO] and info.address == inst.address
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await core_pb2_grpc.CoreStub(direct).Shutdown(core_pb2.ShutdownRequest(), timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        health = await health_pb2_grpc.HealthStub(direct).Check(
            health_pb2.HealthCheckRequest(service=ECHO), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    # SIGKILL: the kernel sees the exit and starts a new Node process in the slot
    first = inst.pid
    os.kill(first, signal.SIGKILL)
    await until(lambda: inst.restarts == 1 and inst.state is S.READY, 60)
    assert inst.pid != first and inst.last_exit == "killed by SIGKILL"
    async with hsu.connect(kernel.control_address) as channel:
        again = await echo_pb2_grpc.EchoStub(channel).Echo(
            echo_pb2.EchoRequest(message="again"), timeout=30
        )
    assert again.message == "again" and again.pid == inst.pid
    # any gRPC client, through the kernel's data plane (the gateway forwards it)
    async with grpc.aio.insecure_channel(kernel.address) as data:
        via_gateway = await echo_pb2_grpc.EchoStub(data).Echo(
            echo_pb2.EchoRequest(message="gateway"), timeout=30
        )
    assert via_gateway.message == "gateway" and via_gateway.pid == inst.pid

    # a clean stop: the kernel asks over Core.Shutdown with the token, and the
    # process exits 0 on its own (no SIGTERM, no SIGKILL)
    await kernel.remove_instance(inst)
    assert inst.state is S.STOPPED
    assert inst.returncode == 0, inst.last_exit


async def test_the_node_hsu_stops_on_sigterm_with_health_not_serving_first(
    hsu_kernel_factory, node_echo
):
    kernel = await hsu_kernel_factory(
        {"name": "node-term", "units": {"echo-node": _unit(node_echo, start="at-start")}}
    )
    await until(lambda: any(i.state is S.READY for i in kernel.instances.values()), 60)
    [inst] = kernel.instances.values()
    async with grpc.aio.insecure_channel(inst.address) as direct:
        watch = health_pb2_grpc.HealthStub(direct).Watch(
            health_pb2.HealthCheckRequest(service=ECHO), timeout=30
        )
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        os.kill(inst.pid, signal.SIGTERM)
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    # it exited 0 on its own: restart on-failure leaves it stopped
    await until(lambda: inst.last_exit != "", 30)
    assert inst.last_exit == "exited with status 0"
    await until(lambda: inst.state is S.STOPPED, 10)
    assert inst.restarts == 0


def test_the_node_hsu_serves_reflection_and_logs_standalone(node_echo, tmp_path):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    sock = tmp_path / "echo.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSU_")}
    env["HSU_LISTEN"] = f"unix:{sock}"
    proc = subprocess.Popen(
        ["node", str(node_echo)], env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            db = ProtoReflectionDescriptorDatabase(channel)
            services = set(db.get_services())
            assert {ECHO, "hsu.core.v1.Core", "grpc.health.v1.Health"} <= services
            pool = DescriptorPool(db)
            methods = pool.FindServiceByName(ECHO).methods_by_name
            assert set(methods) == {"Echo", "EchoStream", "Collect"}
            stub = echo_pb2_grpc.EchoStub(channel)
            parts = [echo_pb2.EchoRequest(message=m) for m in ("a", "b", "c")]
            assert stub.Collect(iter(parts), timeout=10).message == "a b c"
            stream = stub.EchoStream(echo_pb2.EchoStreamRequest(message="n", count=3), timeout=10)
            assert [r.message for r in stream] == ["n 0", "n 1", "n 2"]
            logs = core_pb2_grpc.CoreStub(channel).StreamLogs(
                core_pb2.StreamLogsRequest(tail=10), timeout=10
            )
            assert any("standalone: serving hsu.echo.v1.Echo" in r.message for r in logs)
            # standalone (no token): Core.Shutdown is accepted and it exits 0
            core = core_pb2_grpc.CoreStub(channel)
            assert core.Shutdown(core_pb2.ShutdownRequest(reason="test"), timeout=10).accepted
        assert proc.wait(timeout=15) == 0
        assert "stopping: test" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_node_hsu_protos_are_the_repositorys():
    """gen_protos.py copies them; a stale copy would serve an older contract."""
    pairs = [
        ("proto/hsu/core/v1/core.proto", "hsu/core/v1/core.proto"),
        ("proto/hsu/kernel/v1/kernel.proto", "hsu/kernel/v1/kernel.proto"),
        ("contrib/hsu-echo/proto/hsu_echo/v1/echo.proto", "hsu_echo/v1/echo.proto"),
    ]
    for source, copy in pairs:
        assert (NODE_HSU / "proto" / copy).read_text() == (ROOT / source).read_text(), copy


def test_the_lockfile_is_committed_and_node_modules_is_not():
    assert (NODE_HSU / "package-lock.json").is_file()
    listed = subprocess.run(
        ["git", "ls-files", str(NODE_HSU)], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    if not listed:  # not a git checkout (an sdist): nothing to check
        return
    assert "package-lock.json" in listed and "node_modules" not in listed


async def test_the_node_hsu_proves_itself_with_its_token_and_a_wrong_one_is_refused(
    hsu_kernel, node_echo, tmp_path
):
    # a unit whose instances the kernel starts: a process it did not start,
    # claiming an instance with a made-up token, is refused and exits 1
    k = await hsu_kernel({"name": "node-token", "units": {"echo-node": _unit(node_echo)}})
    [inst] = await k.wait_ready("echo-node")
    env = {k_: v for k_, v in os.environ.items() if not k_.startswith("HSU_")}
    env.update(
        HSU_KERNEL_ADDRESS=k.control_address,
        HSU_UNIT="echo-node",
        HSU_INSTANCE_ID=inst.instance_id,
        HSU_INSTANCE_TOKEN="not-the-instance-token",
    )
    done = await asyncio.to_thread(
        subprocess.run,
        ["node", str(node_echo)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert "ERROR: kernel refused: PERMISSION_DENIED" in done.stderr, done.stderr
    # the real instance is untouched, and no second one was listed
    assert [i.instance_id for i in k.kernel.instances.values()] == [inst.instance_id]
    assert inst.state is S.READY


async def test_the_node_hsu_reports_its_calls_in_flight_to_the_kernel(hsu_kernel, node_echo):
    k = await hsu_kernel({"name": "node-load", "units": {"echo-node": _unit(node_echo)}})
    [inst] = await k.wait_ready("echo-node")
    reported = k.kernel.routing.reported
    async with grpc.aio.insecure_channel(inst.address) as direct:
        # straight to the instance: only its own report tells the kernel
        slow = echo_pb2_grpc.EchoStub(direct).Echo(
            echo_pb2.EchoRequest(message="slow", delay_ms=60_000), timeout=90
        )
        stream = echo_pb2_grpc.EchoStub(direct).EchoStream(
            echo_pb2.EchoStreamRequest(message="s", count=2, interval_ms=60_000), timeout=90
        )
        await stream.read()  # the stream has begun
        await until(lambda: reported.get(inst.instance_id) == 2, 30)
        slow.cancel()
        stream.cancel()
        await until(lambda: reported.get(inst.instance_id) == 0, 30)
    assert k.kernel.routing.load(inst.instance_id) == 0
