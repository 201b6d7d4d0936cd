"""The nginx data plane (plugins/hsu_plugins/gateway/nginx.py) with a real nginx.

.ci/run installs nginx and sets HSU_REQUIRE_NGINX=1, so none of these is ever
skipped there; elsewhere, without nginx (apt-get install nginx-light), the
tests that need one are skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import grpc
import psutil
import pytest

import hsu
from conftest import until, wait_until, write_deployment
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.errors import HsuError
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu.testing import build_kernel
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc
from hsu_plugins.gateway import nginx as gateway_nginx

pytestmark = pytest.mark.integration

needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None and not os.environ.get("HSU_REQUIRE_NGINX"),
    reason="nginx is not installed (apt-get install nginx-light)",
)

ECHO = "hsu.echo.v1.Echo"
PLUGIN = "hsu_plugins.gateway.nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_unit(**more):
    unit = {
        "command": ["python", "-m", "hsu_echo"],
        "interfaces": [ECHO],
        "startup_timeout": 20,
        "stop_grace": 5,
    }
    unit.update(more)
    return unit


def ready(kernel):
    return [i for i in kernel.instances.values() if i.state is hsu.InstanceState.READY]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def under_load(address, seconds, delay_ms, meanwhile, options=()):
    """8 tasks calling Echo for ``seconds`` (bounded) while ``meanwhile`` runs:
    (calls that passed, failures, pids that answered)."""
    ok, failed, pids = 0, [], set()
    async with grpc.aio.insecure_channel(address, options=list(options)) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        stop_at = time.monotonic() + seconds

        async def worker():
            nonlocal ok
            while time.monotonic() < stop_at and ok < 20_000:
                try:
                    r = await echo.Echo(echo_pb2.EchoRequest(delay_ms=delay_ms), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    failed.append(f"{exc.code().name}: {exc.details()}")
                else:
                    ok += 1
                    pids.add(r.pid)

        await asyncio.gather(meanwhile, *(worker() for _ in range(8)))
    return ok, failed, pids


async def start(tmp_path, units, **settings):
    kernel = build_kernel(
        {"units": units, "gateway_nginx": settings},
        names=[PLUGIN],
        base_dir=str(tmp_path),
    )
    await kernel.start()
    return kernel, plane_of(kernel)


def plane_of(kernel) -> gateway_nginx.DataPlane:
    plane = kernel.plugin(gateway_nginx.PLANE)
    assert isinstance(plane, gateway_nginx.DataPlane)
    return plane


@needs_nginx
async def test_calls_go_through_nginx_straight_to_instances(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    kernel, plane = await start(
        tmp_path,
        {"echo": echo_unit(max_instances=2, routing={"idempotent": ["Echo"]})},
        address=address,
    )
    try:
        assert plane.address == address and plane.generation == 1
        assert await plane.serving_generation() == 1
        async with grpc.aio.insecure_channel(address) as channel:
            echo = echo_pb2_grpc.EchoStub(channel)
            # no instance yet: nginx hands the call to the kernel, which starts one
            first = await echo.Echo(echo_pb2.EchoRequest(message="first"), timeout=30)
            [inst] = ready(kernel)
            assert first.pid == inst.pid
            # the registry changed: nginx reloaded with the instance as an upstream
            await until(lambda: inst.instance_id in plane.endpoints and plane.generation >= 2)
            await until(lambda: plane.handle is not None)
            assert await plane._until_serving(plane.generation, 5)
            conf = plane.conf.read_text()
            assert f"server {inst.address}" in conf
            assert f"location = /{ECHO}/Echo" in conf and "non_idempotent" in conf
            through = dict(kernel.routing.through)
            for i in range(20):
                reply = await echo.Echo(echo_pb2.EchoRequest(message=str(i)), timeout=10)
                assert reply.pid == inst.pid
            assert kernel.routing.through == through  # not through the kernel any more
            streamed = echo.EchoStream(echo_pb2.EchoStreamRequest(message="s", count=2))
            assert [r.message async for r in streamed] == ["s 0", "s 1"]

            async def parts():
                for p in "xy":
                    yield echo_pb2.EchoRequest(message=p)

            assert (await echo.Collect(parts(), timeout=10)).message == "x y"
            # what no unit serves still reaches the kernel, which says so
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/nope.v1.Nope/Call")(b"", timeout=10)
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
            assert "no unit serves interface 'nope.v1.Nope'" in info.value.details()
    finally:
        await kernel.stop()
    assert plane.handle is not None and plane.handle.returncode is not None  # nginx is gone
    assert not alive(plane.handle.pid)


@needs_nginx
async def test_nginx_takes_the_kernels_own_address(tmp_path):
    kernel, plane = await start(tmp_path, {"echo": echo_unit(start="at-start")})
    try:
        # the kernel moved to a private socket; nginx has the address asked for
        assert kernel.requested_address == "127.0.0.1:0"
        assert kernel.bind_address == f"unix:{Path(tmp_path, '.hsu/hsu/kernel.sock')}"
        assert kernel.address == kernel.bind_address
        assert plane.requested == "127.0.0.1:0" and plane.address.startswith("127.0.0.1:")
        assert not plane.address.endswith(":0")
        [inst] = ready(kernel)  # it registered over the private socket
        await until(lambda: inst.instance_id in plane.endpoints)
        async with grpc.aio.insecure_channel(plane.address) as channel:
            # the kernel's own API, through nginx
            status = await kernel_pb2_grpc.KernelStub(channel).ListInstances(
                kernel_pb2.ListInstancesRequest(), timeout=10
            )
            assert [i.instance_id for i in status.instances] == [inst.instance_id]
            pong = await core_pb2_grpc.CoreStub(channel).Ping(core_pb2.PingRequest(), timeout=10)
            assert pong is not None
            reply = await echo_pb2_grpc.EchoStub(channel).Echo(
                echo_pb2.EchoRequest(message="hi"), timeout=10
            )
            assert reply.pid == inst.pid
    finally:
        await kernel.stop()


@needs_nginx
async def test_a_port_in_use_fails_the_start_and_names_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        kernel = build_kernel(
            {"units": {"echo": echo_unit()}, "gateway_nginx": {"address": address}},
            names=[PLUGIN],
            base_dir=str(tmp_path),
        )
        plane = plane_of(kernel)  # registered when the kernel was built
        with pytest.raises(HsuError, match=f"gateway_nginx: cannot listen on {address}: .*in use"):
            await kernel.start()
    assert kernel.state is hsu.KernelState.FAILED
    # torn down with the kernel: sockets closed, no longer a plugin
    assert plane._public is None and plane._control is None
    assert kernel.plugin(gateway_nginx.PLANE) is None


@needs_nginx
async def test_an_nginx_that_dies_is_started_again_on_the_same_port(tmp_path):
    kernel, plane = await start(tmp_path, {"echo": echo_unit(start="at-start")})
    try:
        first = plane.pid
        os.kill(first, signal.SIGKILL)  # nginx is our own child
        await until(lambda: plane.starts == 2 and plane.pid != first, 10)
        assert await plane._until_serving(plane.generation, 10)
        async with grpc.aio.insecure_channel(plane.address) as channel:
            reply = await echo_pb2_grpc.EchoStub(channel).Echo(
                echo_pb2.EchoRequest(message="again"), timeout=10
            )
        assert reply.message == "again"
        assert not alive(first)
    finally:
        await kernel.stop()


@needs_nginx
async def test_scaling_down_under_load_through_nginx_cuts_no_call(tmp_path):
    """hsu_instance_draining: nginx reloads without the draining instance before
    the kernel counts its calls down and stops it, so even calls that may not be
    retried (no method is idempotent, the client has no retry policy) all pass."""
    kernel, plane = await start(
        tmp_path,
        {"echo": echo_unit(start="at-start", min_instances=1, max_instances=2)},
    )
    try:
        await kernel.scale("echo", 2)
        assert len(ready(kernel)) == 2
        await until(lambda: len(plane.endpoints) == 2)
        assert await plane._until_serving(plane.generation, 10)
        before: set[int] = set()

        async def scale_down():
            await asyncio.sleep(0.8)
            before.update(i.pid for i in ready(kernel))
            await kernel.scale("echo", 1)

        ok, failed, pids = await under_load(plane.address, 2.5, 5, scale_down())
        assert failed == []
        assert len(ready(kernel)) == 1 and before <= pids  # both answered, one is gone
        assert ok > 100
    finally:
        await kernel.stop()


DEPLOYMENT = """\
name: nginxed
plugins: [hsu_plugins.gateway.nginx]
kernel: {reattach: false}
units:
  echo:
    command: [python, -m, hsu_echo]
    interfaces: [hsu.echo.v1.Echo]
    start: at-start
"""


@needs_nginx
def test_nginx_dies_with_a_sigkilled_kernel(kernel_process, tmp_path):
    k = kernel_process(write_deployment(tmp_path / "d.yaml", DEPLOYMENT))
    k.wait_ready()  # its health, asked through nginx on the kernel's address
    pid = int((tmp_path / ".hsu/nginxed/nginx/nginx.pid").read_text())
    family = [pid, *(c.pid for c in psutil.Process(pid).children())]
    assert len(family) >= 2  # the master and its worker
    with grpc.insecure_channel(k.address) as channel:
        reply = echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(message="x"), timeout=10)
    assert reply.message == "x"
    k.proc.kill()
    k.proc.wait()
    wait_until(lambda: not any(alive(p) for p in family), 10)


def test_a_missing_nginx_is_a_clear_error(tmp_path):
    kernel = build_kernel(
        {"units": {"echo": echo_unit()}, "gateway_nginx": {"binary": "no-such-nginx"}},
        names=[PLUGIN],
        base_dir=str(tmp_path),
    )
    with pytest.raises(HsuError, match="nginx executable 'no-such-nginx' not found"):
        asyncio.run(kernel.start())
    assert kernel.state is hsu.KernelState.FAILED


def test_the_configuration_maps_routing_onto_nginx(tmp_path):
    kernel = build_kernel(
        {
            "units": {
                "echo": echo_unit(
                    routing={
                        "balancer": "ring_hash",
                        "hash_key": "tenant-id",
                        "breaker_options": {"failures": 3, "cooldown": 2},
                        "idempotent": ["*"],
                        "max_attempts": 2,
                    }
                ),
                "other": echo_unit(interfaces=["x.v1.X"], routing={"idempotent": ["Get"]}),
            },
            "gateway_nginx": {"address": "127.0.0.1:7999"},
        },
        names=[PLUGIN],
        base_dir=str(tmp_path),
    )
    # nginx has an address of its own: the kernel stays on the one asked for
    assert kernel.bind_address == kernel.requested_address == "127.0.0.1:0"
    kernel.address = "unix:/run/k.sock"
    plane = plane_of(kernel)
    plane.endpoints = {
        "echo-1": hsu.ports.Endpoint("echo-1", "echo", "127.0.0.1:5001", (ECHO,)),
        "echo-2": hsu.ports.Endpoint("echo-2", "echo", "unix:/run/e2.sock", (ECHO,)),
        "other-1": hsu.ports.Endpoint("other-1", "other", "127.0.0.1:5003", ("x.v1.X",)),
    }
    plane.generation = 7
    conf = plane.render()
    assert "hash $http_tenant_id consistent;" in conf
    assert "server 127.0.0.1:5001 max_fails=3 fail_timeout=2s;" in conf
    assert "server unix:/run/e2.sock max_fails=3 fail_timeout=2s;" in conf
    assert f"location /{ECHO}/ {{ grpc_pass grpc://hsu_unit_0;" in conf
    assert "grpc_next_upstream_tries 2;" in conf
    # only the idempotent method may be sent again; the rest never twice
    assert "location = /x.v1.X/Get { grpc_pass grpc://hsu_unit_1; grpc_next_upstream" in conf
    assert "location /x.v1.X/ { grpc_pass grpc://hsu_unit_1; }" in conf
    assert "server unix:/run/k.sock;" in conf
    assert "listen 127.0.0.1:7999 http2;" in conf
    assert 'location = /generation { return 200 "7"; }' in conf


RETRY = json.dumps({"methodConfig": [{
    "name": [{"service": ECHO, "method": "Echo"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}]})  # fmt: skip


@needs_nginx
async def test_an_instance_killed_under_load_through_nginx_fails_no_idempotent_call(tmp_path):
    kernel, plane = await start(
        tmp_path,
        {
            "echo": echo_unit(
                start="at-start",
                min_instances=3,
                max_instances=3,
                routing={"idempotent": ["Echo"], "balancer": "least_inflight"},
                restart={"backoff": {"reset_after": 0.5}},
            )
        },
    )
    try:
        assert len(ready(kernel)) == 3
        await until(lambda: len(plane.endpoints) == 3)
        assert "least_conn;" in plane.conf.read_text()
        # nginx passes a call on that it could not send (grpc_next_upstream);
        # one already sent to the instance that died comes back UNAVAILABLE,
        # which a gRPC client's own retry policy retries, as any client can
        options = [("grpc.service_config", RETRY), ("grpc.enable_retries", 1)]
        victim = ready(kernel)[0].pid

        async def kill():
            await asyncio.sleep(1.0)
            os.kill(victim, signal.SIGKILL)

        ok, failed, pids = await under_load(plane.address, 3.0, 10, kill(), options)
        assert failed == []
        assert ok > 100 and victim in pids and len(pids) >= 4
    finally:
        await kernel.stop()
