"""The nginx data plane (plugins/hsu_plugins/gateway/nginx.py) with a real nginx.

.ci/run installs nginx and sets HSU_REQUIRE_NGINX=1, so none of these is ever
skipped there; elsewhere, without nginx (apt-get install nginx-light), the
tests that need one are skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loguru import logger

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


async def under_load(address, seconds, delay_ms, meanwhile, options=(), until=None):
    """8 tasks calling Echo for ``seconds`` (bounded) while ``meanwhile`` runs,
    and on until ``until(pids)`` holds (30 s more at most: a loaded machine
    starts a replacement late): (calls that passed, failures, pids that answered)."""
    ok, failed, pids = 0, [], set()
    async with grpc.aio.insecure_channel(address, options=list(options)) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        stop_at = time.monotonic() + seconds

        def going() -> bool:
            now = time.monotonic()
            if now < stop_at:
                return True
            return until is not None and not until(pids) and now < stop_at + 30

        async def worker():
            nonlocal ok
            while going() and ok < 20_000:
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


@pytest.fixture
def warnings_logged():
    """The messages of the warnings logged during the test."""
    logged: list[str] = []
    sink = logger.add(lambda m: logged.append(str(m)), level="WARNING", format="{message}")
    yield logged
    logger.remove(sink)


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
            assert f'server "{inst.address}"' in conf
            assert f'location = "/{ECHO}/Echo"' in conf and "non_idempotent" in conf
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
            # bodies larger than nginx's in-memory buffer pass (its workers,
            # not root, have no temp file to write in the private state dir)
            big = "b" * 600_000
            reply = await echo.Echo(echo_pb2.EchoRequest(message=big), timeout=10)
            assert reply.message == big and reply.pid == inst.pid
            # what no unit serves is answered by nginx itself
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/nope.v1.Nope/Call")(b"", timeout=10)
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
            assert "not served on this address" in info.value.details()
    finally:
        await kernel.stop()
    assert plane.handle is not None and plane.handle.returncode is not None  # nginx is gone
    assert not alive(plane.handle.pid)


@needs_nginx
async def test_nginx_takes_the_kernels_own_address(tmp_path):
    kernel, plane = await start(tmp_path, {"echo": echo_unit(start="at-start")})
    try:
        # the kernel's data plane moved to a private address; nginx has the
        # address asked for. As root, nginx's workers are not, and cannot
        # enter the 0700 state dir: the kernel takes a loopback port instead
        assert kernel.requested_address == "127.0.0.1:0"
        if os.geteuid() == 0:
            assert kernel.bind_address == "127.0.0.1:0"
        else:
            assert kernel.bind_address == f"unix:{Path(tmp_path, '.hsu/hsu/kernel.sock')}"
        assert kernel.address != plane.address
        assert plane.requested == "127.0.0.1:0" and plane.address.startswith("127.0.0.1:")
        assert not plane.address.endswith(":0")
        [inst] = ready(kernel)  # it registered on the control socket
        await until(lambda: inst.instance_id in plane.endpoints)
        async with grpc.aio.insecure_channel(plane.address) as channel:
            reply = await echo_pb2_grpc.EchoStub(channel).Echo(
                echo_pb2.EchoRequest(message="hi"), timeout=10
            )
            assert reply.pid == inst.pid
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await kernel.stop()


@needs_nginx
async def test_the_kernels_control_api_is_never_proxied(tmp_path):
    """Through nginx, the Kernel API and the kernel's Core are UNIMPLEMENTED
    (answered by nginx itself), however the path is spelled; the kernel keeps
    running, and serves them on its control socket."""
    kernel, plane = await start(tmp_path, {"echo": echo_unit(start="at-start")})
    try:
        [inst] = ready(kernel)
        await until(lambda: inst.instance_id in plane.endpoints)
        async with grpc.aio.insecure_channel(plane.address) as channel:
            api = kernel_pb2_grpc.KernelStub(channel)
            core = core_pb2_grpc.CoreStub(channel)
            calls = [
                api.Status(kernel_pb2.StatusRequest(), timeout=10),
                api.ListInstances(kernel_pb2.ListInstancesRequest(), timeout=10),
                api.Scale(kernel_pb2.ScaleRequest(unit="echo", count=0), timeout=10),
                core.Shutdown(core_pb2.ShutdownRequest(), timeout=10),
                core.Ping(core_pb2.PingRequest(), timeout=10),
                # dot segments and doubled slashes: nginx matches the normalized path
                channel.unary_unary("/grpc.health.v1.Health/../hsu.core.v1.Core/Shutdown")(
                    b"", timeout=10
                ),
                channel.unary_unary(f"/{ECHO}/%2e%2e/hsu.kernel.v1.Kernel/Status")(b"", timeout=10),
                channel.unary_unary("//hsu.kernel.v1.Kernel/Status")(b"", timeout=10),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED, info.value
                # nginx's own answer: the call never reached the kernel
                assert info.value.details() == "hsu gateway_nginx: not served on this address"
            # units' calls still pass
            reply = await echo_pb2_grpc.EchoStub(channel).Echo(
                echo_pb2.EchoRequest(message="still"), timeout=10
            )
            assert reply.message == "still" and reply.pid == inst.pid
        assert kernel.state is hsu.KernelState.RUNNING
        assert ready(kernel) == [inst]  # neither scaled down nor shut down
        conf = plane.conf.read_text()
        assert "hsu.kernel.v1.Kernel" not in conf and "hsu.core.v1.Core" not in conf
        # the control socket serves them
        async with grpc.aio.insecure_channel(kernel.control_address) as channel:
            status = await kernel_pb2_grpc.KernelStub(channel).Status(
                kernel_pb2.StatusRequest(), timeout=10
            )
        assert status.state == "running"
    finally:
        await kernel.stop()


@needs_nginx
@pytest.mark.skipif(os.geteuid() != 0, reason="needs a kernel running as root")
async def test_nginx_workers_never_run_as_root(tmp_path):
    nobody = pwd.getpwnam("nobody")
    kernel, plane = await start(tmp_path, {"echo": echo_unit(start="at-start")}, workers=2)
    try:
        await until(lambda: workers_set_up(plane.pid, 2), 10)
        for w in psutil.Process(plane.pid).children():
            uids, gids = proc_ids(w.pid)
            assert uids == [nobody.pw_uid] * 4 and gids == [nobody.pw_gid] * 4
        assert 'user "nobody" "' in plane.conf.read_text()
        async with grpc.aio.insecure_channel(plane.address) as channel:
            echo = echo_pb2_grpc.EchoStub(channel)
            reply = await echo.Echo(echo_pb2.EchoRequest(message="w"), timeout=10)
            assert reply.message == "w"

            async def parts():
                for _ in range(3):
                    yield echo_pb2.EchoRequest(message="p" * 200_000)

            # a streamed body larger than nginx's buffers: no temp file needed
            collected = await echo.Collect(parts(), timeout=10)
            assert len(collected.message) == 3 * 200_000 + 2
    finally:
        await kernel.stop()


def workers_set_up(master: int, count: int) -> bool:
    """The master has ``count`` workers, each set up: a worker names itself
    once its user is switched, before it takes a connection; until then it
    is the master's fork."""
    titles = [w.cmdline()[:1] for w in psutil.Process(master).children()]
    return titles == [["nginx: worker process"]] * count


def proc_ids(pid: int) -> tuple[list[int], list[int]]:
    """The real, effective, saved and filesystem uids and gids of ``pid``."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    found = {k: [int(x) for x in v.split()] for k, _, v in (ln.partition(":") for ln in lines)
             if k in ("Uid", "Gid")}  # fmt: skip
    return found["Uid"], found["Gid"]


@needs_nginx
@pytest.mark.skipif(os.geteuid() != 0, reason="needs a kernel running as root")
async def test_the_worker_user_can_be_set_but_never_to_root(tmp_path):
    other = next(p for p in pwd.getpwall() if p.pw_uid not in (0, 65534) and p.pw_uid < 1000)
    kernel, plane = await start(tmp_path / "a", {"echo": echo_unit()}, user=other.pw_name)
    try:
        await until(lambda: workers_set_up(plane.pid, 1), 10)
        [worker] = psutil.Process(plane.pid).children()
        assert proc_ids(worker.pid)[0] == [other.pw_uid] * 4
    finally:
        await kernel.stop()
    for user, message in (
        ("root", "gateway_nginx.user: 'root' is uid 0; nginx's workers never run as root"),
        ("no-such-user-x", "gateway_nginx.user: no user 'no-such-user-x' on this machine"),
    ):
        kernel = build_kernel(
            {"units": {"echo": echo_unit()}, "gateway_nginx": {"user": user}},
            names=[PLUGIN],
            base_dir=str(tmp_path / user),
        )
        with pytest.raises(HsuError, match=re.escape(message)):
            await kernel.start()
        assert kernel.state is hsu.KernelState.FAILED


@needs_nginx
async def test_a_registered_address_cannot_inject_configuration(
    tmp_path, warnings_logged, monkeypatch
):
    """An endpoint whose address or interface would close nginx's block and
    add a server of its own (serving / over HTTP) and an access log (appending
    to a file of root's) is left out, with a warning naming it; nginx reloads
    and serves on, and nothing it was told to do happens.

    The memory registry refuses such an endpoint itself; the renderer must
    hold without it (a registry plugin of a third party may not check), so
    the registry's check is switched off after that refusal is seen."""
    from hsu_plugins.routing import registry_memory

    secret = tmp_path / "secret"
    secret.write_text("top secret")
    secret.chmod(0o600)
    pwned = tmp_path / "pwned.log"
    port = free_port()
    injected = (
        f"server {{ listen 127.0.0.1:{port}; root /; access_log {pwned}; }}"
        " upstream evil { server 127.0.0.1:1"
    )
    kernel, plane = await start(tmp_path, {"echo": echo_unit(start="at-start")})
    try:
        [inst] = ready(kernel)
        await until(lambda: inst.instance_id in plane.endpoints)
        registry = kernel.registry
        assert registry is not None
        hostile = hsu.ports.Endpoint("evil-addr", "echo", f"127.0.0.1:1; }} {injected}", (ECHO,))
        with pytest.raises(hsu.errors.InvalidValue, match="address"):
            await registry.put(hostile)
        monkeypatch.setattr(registry_memory, "_check", lambda endpoint: None)
        await registry.put(
            hsu.ports.Endpoint("evil-addr", "echo", f"127.0.0.1:1; }} {injected}", (ECHO,))
        )
        await registry.put(
            hsu.ports.Endpoint(
                "evil-iface", "echo", "127.0.0.1:2", (f"x.v1.X/ {{ }} }} {injected} #",)
            )
        )
        await until(lambda: {"evil-addr", "evil-iface"} <= set(plane.endpoints))
        await until(lambda: plane._pending is None)
        assert await plane._until_serving(plane.generation, 10)  # the reload took
        conf = plane.conf.read_text()
        assert "root" not in conf.replace('"', " ").split()
        assert "access_log off;" in conf and str(pwned) not in conf and "evil" not in conf
        assert f"127.0.0.1:{port}" not in conf and "127.0.0.1:1" not in conf
        assert "x.v1.X" not in conf
        assert 'server "127.0.0.1:2"' not in conf  # no interface left: no upstream
        # nothing listens where the injected server would have, nothing was logged
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        async with grpc.aio.insecure_channel(plane.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(str(secret))(b"", timeout=10)
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
            assert b"top secret" not in (info.value.details() or "").encode()
            reply = await echo_pb2_grpc.EchoStub(channel).Echo(
                echo_pb2.EchoRequest(message="ok"), timeout=10
            )
            assert reply.pid == inst.pid
        assert not pwned.exists()
        warnings = [m for m in warnings_logged if "left out of nginx.conf" in m]
        assert any("instance 'evil-addr': address: " in m for m in warnings), warnings
        assert any("instance 'evil-iface': interface: " in m for m in warnings), warnings
        assert all("\n" not in m.rstrip("\n") for m in warnings)
    finally:
        await kernel.stop()


@needs_nginx
async def test_paths_are_quoted_for_nginx(tmp_path):
    """A state dir whose path holds a space, a quote and nginx's own syntax:
    nginx.conf quotes it, and nginx starts and serves."""
    base = tmp_path / 'odd "dir; {x}'
    base.mkdir()
    kernel, plane = await start(base, {"echo": echo_unit()})
    try:
        assert (plane.dir / "nginx.pid").read_text().strip() == str(plane.pid)
        async with grpc.aio.insecure_channel(plane.address) as channel:
            reply = await echo_pb2_grpc.EchoStub(channel).Echo(
                echo_pb2.EchoRequest(message="q"), timeout=30
            )
        assert reply.message == "q"
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
    k.wait_ready()  # its health, on the control socket
    pid = int((tmp_path / ".hsu/nginxed/nginx/nginx.pid").read_text())
    family = [pid, *(c.pid for c in psutil.Process(pid).children())]
    assert len(family) >= 2  # the master and its worker
    with grpc.insecure_channel(k.data) as channel:
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
    assert 'server "127.0.0.1:5001" max_fails=3 fail_timeout=2s;' in conf
    assert 'server "unix:/run/e2.sock" max_fails=3 fail_timeout=2s;' in conf
    assert f'location "/{ECHO}/" {{ grpc_pass grpc://hsu_unit_0;' in conf
    assert "grpc_next_upstream_tries 2;" in conf
    # only the idempotent method may be sent again; the rest never twice
    assert 'location = "/x.v1.X/Get" { grpc_pass grpc://hsu_unit_1; grpc_next_upstream' in conf
    assert 'location "/x.v1.X/" { grpc_pass grpc://hsu_unit_1; }' in conf
    assert 'server "unix:/run/k.sock";' in conf
    assert 'listen "127.0.0.1:7999" http2;' in conf
    assert 'location = /generation { return 200 "7"; }' in conf
    # only the units' interfaces, health and reflection reach the kernel
    kernel_bound = re.findall(r'location "(/[^"]*)" \{ grpc_pass grpc://hsu_kernel;', conf)
    assert kernel_bound == [
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1alpha.ServerReflection/",
        "/grpc.reflection.v1.ServerReflection/",
    ]
    assert (
        "location / {\n      default_type application/grpc;\n      add_header grpc-status 12"
        in conf
    )
    # without instances, the units' interfaces go to the kernel (which starts one)
    plane.endpoints = {}
    conf = plane.render()
    kernel_bound = re.findall(r'location "(/[^"]*)" \{ grpc_pass grpc://hsu_kernel;', conf)
    assert kernel_bound[3:] == [f"/{ECHO}/", "/x.v1.X/"]


def test_the_configuration_leaves_out_what_is_not_well_formed(tmp_path):
    """Straight to render(): addresses and interface names that are not well
    formed never reach nginx.conf, nor the kernel's control API, whoever
    declares them; and nginx accepts what is rendered (nginx -t)."""
    kernel = build_kernel(
        {
            "units": {
                "echo": echo_unit(interfaces=[ECHO, "hsu.core.v1.Core"]),
                "bad": echo_unit(interfaces=["hsu.kernel.v1.Kernel"]),
            },
            "gateway_nginx": {"address": "127.0.0.1:7999"},
        },
        names=[PLUGIN],
        base_dir=str(tmp_path),
    )
    kernel.address = "127.0.0.1:7998"
    plane = plane_of(kernel)
    evil = "; } server { listen 127.0.0.1:7997; root /; } upstream x { server 127.0.0.1:1"
    plane.endpoints = {
        e.instance_id: e
        for e in (
            hsu.ports.Endpoint("ok", "echo", "127.0.0.1:5001", (ECHO, "hsu.kernel.v1.Kernel")),
            hsu.ports.Endpoint("addr", "echo", f"127.0.0.1:5002{evil}", (ECHO,)),
            hsu.ports.Endpoint("unix", "echo", f"unix:/run/e.sock{evil}", (ECHO,)),
            hsu.ports.Endpoint("quote", "echo", 'unix:/run/e".sock', (ECHO,)),
            hsu.ports.Endpoint("iface", "echo", "127.0.0.1:5003", (f"x.v1.X/{evil}",)),
            hsu.ports.Endpoint("core", "bad", "127.0.0.1:5004", ("hsu.core.v1.Core",)),
        )
    }
    conf = plane.render()
    servers = re.findall(r'server "([^"]*)"', conf)
    assert servers == ["127.0.0.1:7998", "127.0.0.1:5001"]
    assert "root /" not in conf
    for absent in ("7997", "5002", "5003", "5004", "e.sock", "Kernel", "Core", "x.v1.X"):
        assert absent not in conf, absent
    assert plane._refused == {
        "instance 'ok'\x00hsu.kernel.v1.Kernel",
        f"instance 'addr'\x00127.0.0.1:5002{evil}",
        f"instance 'unix'\x00unix:/run/e.sock{evil}",
        "instance 'quote'\x00unix:/run/e\".sock",
        f"instance 'iface'\x00x.v1.X/{evil}",
        "instance 'core'\x00hsu.core.v1.Core",
        "unit echo\x00hsu.core.v1.Core",
        "unit bad\x00hsu.kernel.v1.Kernel",
    }
    nginx = shutil.which("nginx")
    if nginx is None:
        return
    plane.dir.mkdir(parents=True)
    # the control listener's port, which the plane binds when it starts
    (tmp_path / "nginx.conf").write_text(conf.replace("127.0.0.1:0", f"127.0.0.1:{free_port()}"))
    check = subprocess.run(
        [nginx, "-t", "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr


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

        ok, failed, pids = await under_load(
            plane.address, 3.0, 10, kill(), options, until=lambda pids: len(pids) >= 4
        )
        assert failed == []
        assert ok > 50 and victim in pids and len(pids) >= 4
    finally:
        await kernel.stop()


BIG = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


@needs_nginx
async def test_nginx_takes_what_the_python_gateway_takes(tmp_path):
    """A 3 MiB message and an 8 MiB client stream pass through nginx, both to
    the kernel (no instance yet) and straight to an instance (nginx's default
    body limit was 1 MiB: HTTP 413, which clients saw as UNKNOWN)."""
    kernel, plane = await start(tmp_path, {"echo": echo_unit()})
    three = "m" * (3 * 2**20)
    chunk = "c" * (2**20 - 16)
    try:
        async with grpc.aio.insecure_channel(plane.address, options=BIG) as channel:
            echo = echo_pb2_grpc.EchoStub(channel)

            async def parts():
                for _ in range(8):
                    yield echo_pb2.EchoRequest(message=chunk)

            # no instance: nginx hands both to the kernel's data plane
            reply = await echo.Echo(echo_pb2.EchoRequest(message=three), timeout=30)
            assert reply.message == three
            [inst] = ready(kernel)
            await until(lambda: inst.instance_id in plane.endpoints, 10)
            assert await plane._until_serving(plane.generation, 10)
            through = dict(kernel.routing.through)
            # now straight to the instance
            reply = await echo.Echo(echo_pb2.EchoRequest(message=three), timeout=30)
            assert reply.message == three and reply.pid == inst.pid
            joined = await echo.Collect(parts(), timeout=30)
            assert joined.message == " ".join([chunk] * 8) and joined.pid == inst.pid
            assert kernel.routing.through == through  # nginx, not the kernel
            # over the HSU's own 4 MiB per message: its status, not nginx's
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await echo.Echo(echo_pb2.EchoRequest(message="x" * (5 * 2**20)), timeout=30)
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await kernel.stop()


@needs_nginx
async def test_nginx_errors_are_grpc_statuses(tmp_path):
    """A body over gateway_nginx.max_request_bytes is RESOURCE_EXHAUSTED with
    a message naming the setting, not an HTTP 413 (UNKNOWN to a client); a
    request that is not gRPC gets a gRPC status too."""
    kernel, plane = await start(
        tmp_path, {"echo": echo_unit(start="at-start")}, max_request_bytes=2**20
    )
    try:
        conf = plane.conf.read_text()
        assert "client_max_body_size 1048576;" in conf
        for codes, _, _ in gateway_nginx.NGINX_ERRORS:
            assert f"error_page {' '.join(map(str, codes))} " in conf
        async with grpc.aio.insecure_channel(plane.address, options=BIG) as channel:
            echo = echo_pb2_grpc.EchoStub(channel)
            assert (await echo.Echo(echo_pb2.EchoRequest(message="s"), timeout=30)).message == "s"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await echo.Echo(echo_pb2.EchoRequest(message="x" * (2 * 2**20)), timeout=30)
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
            assert "max_request_bytes" in (info.value.details() or "")
    finally:
        await kernel.stop()


@needs_nginx
@pytest.mark.parametrize("own", [{}, {"address": "127.0.0.1:0"}], ids=["kernels", "own"])
async def test_a_cluster_key_refuses_the_nginx_gateway_which_cannot_sign(tmp_path, own):
    """With kernel.cluster_key every instance refuses a call without the
    cluster's proof (hsu-peer, docs/multihost.md), and nginx cannot make one:
    on the kernel's address, or on its own beside the kernel's gateway."""
    kernel = build_kernel(
        {
            "kernel": {"cluster_key": "a-cluster-key-for-the-tests-0123"},
            "units": {"echo": echo_unit()},
            "gateway_nginx": own,
        },
        names=[PLUGIN],
        base_dir=str(tmp_path),
    )
    with pytest.raises(HsuError, match=r"gateway_nginx: kernel\.cluster_key is set, and nginx"):
        await kernel.start()
    assert kernel.state is hsu.KernelState.FAILED
