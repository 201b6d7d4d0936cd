"""The kernel in-process, with real HSU processes and real gRPC on loopback."""

import asyncio
import os
import signal
import sys
import time

import grpc
import psutil
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import hsu
from conftest import until
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.errors import LaunchError
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

pytestmark = pytest.mark.integration

ECHO = {"command": ["python", "-m", "hsu_echo"], "interfaces": ["hsu.echo.v1.Echo"]}


def deployment(**units):
    return {"kernel": {"drain_grace": 1}, "units": units or {"echo": ECHO}}


class Recorder:
    """Implements every lifecycle and instance hook and records the calls."""

    def __init__(self):
        self.calls = []

    @hsu.hookimpl
    def hsu_kernel_configure(self, kernel):
        self.calls.append(("configure", kernel.state.value))

    @hsu.hookimpl
    def hsu_kernel_starting(self, kernel):
        self.calls.append(("starting", kernel.state.value))

    @hsu.hookimpl
    def hsu_kernel_started(self, kernel):
        async def later():
            await asyncio.sleep(0)
            self.calls.append(("started", kernel.state.value))

        return later()

    @hsu.hookimpl
    def hsu_kernel_stopping(self, kernel):
        self.calls.append(("stopping", kernel.state.value))

    @hsu.hookimpl
    def hsu_kernel_stopped(self, kernel):
        self.calls.append(("stopped", kernel.state.value))

    @hsu.hookimpl
    def hsu_instance_registered(self, kernel, instance):
        self.calls.append(("registered", instance.state.value, instance.unit))


async def test_lifecycle_hooks_fire_in_order_around_each_phase(hsu_kernel_factory):
    rec = Recorder()
    kernel = await hsu_kernel_factory(deployment(), plugins=[rec])
    await kernel.instance_for("hsu.echo.v1.Echo")
    await kernel.stop()
    assert rec.calls == [
        ("configure", "created"),
        ("starting", "starting"),
        ("started", "running"),
        ("registered", "starting", "echo"),
        ("stopping", "stopping"),
        ("stopped", "stopped"),
    ]
    assert [(t.source.value, t.target.value) for t in kernel.machine.history] == [
        ("created", "starting"),
        ("starting", "running"),
        ("running", "stopping"),
        ("stopping", "stopped"),
    ]


async def test_a_failing_start_hook_fails_the_kernel_and_stops_what_started(hsu_kernel_factory):
    class Bad:
        @hsu.hookimpl
        def hsu_kernel_started(self, kernel):
            raise RuntimeError("plugin refuses")

    with pytest.raises(RuntimeError, match="plugin refuses"):
        await hsu_kernel_factory(deployment(echo={**ECHO, "start": "at-start"}), plugins=[Bad()])


async def test_an_hsu_registers_and_is_listed_over_grpc(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(deployment())
    inst = await kernel.instance_for("hsu.echo.v1.Echo")
    assert inst.state is hsu.InstanceState.READY and inst.managed
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        listing = await kernel_pb2_grpc.KernelStub(ch).ListInstances(
            kernel_pb2.ListInstancesRequest(unit="echo")
        )
        status = await kernel_pb2_grpc.KernelStub(ch).Status(kernel_pb2.StatusRequest())
    [listed] = listing.instances
    assert listed.instance_id == inst.instance_id
    assert (listed.state, listed.pid, listed.address) == ("ready", inst.pid, inst.address)
    assert list(listed.interfaces) == ["hsu.echo.v1.Echo"]
    assert psutil.Process(inst.pid).ppid() == os.getpid()
    assert status.state == "running" and status.instances == 1 and list(status.units) == ["echo"]
    # the generated stub reaches the instance at the address it registered
    async with grpc.aio.insecure_channel(inst.address) as ch:
        reply = await echo_pb2_grpc.EchoStub(ch).Echo(echo_pb2.EchoRequest(message="hi"))
    assert (reply.message, reply.instance_id, reply.pid) == ("hi", inst.instance_id, inst.pid)


async def test_concurrent_callers_share_one_on_demand_start(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(deployment())
    got = await asyncio.gather(*(kernel.instance_for("hsu.echo.v1.Echo") for _ in range(5)))
    assert len({i.instance_id for i in got}) == 1
    assert len(kernel.instances) == 1


async def test_at_start_units_are_ready_when_running(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(deployment(echo={**ECHO, "start": "at-start"}))
    [inst] = kernel.instances.values()
    assert inst.state is hsu.InstanceState.READY


async def test_stop_leaves_no_process_and_reaps_every_child(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(deployment())
    inst = await kernel.instance_for("hsu.echo.v1.Echo")
    pid = inst.pid
    await kernel.stop()
    assert inst.state is hsu.InstanceState.STOPPED and inst.returncode == 0
    assert not psutil.pid_exists(pid)


async def test_health_reflection_and_core_on_the_control_socket(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(deployment())
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="hsu.kernel.v1.Kernel")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = set()
        async for reply in stream:
            services = {s.name for s in reply.list_services_response.service}
            break
        # grpcio's servicer, made at this first call (hsu._kernel.reflection.ControlReflection)
        stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter(
                [reflection_pb2.ServerReflectionRequest(file_containing_symbol="hsu.core.v1.Core")]
            )
        )
        files = []
        async for reply in stream:
            files = list(reply.file_descriptor_response.file_descriptor_proto)
            break
        pong = await core_pb2_grpc.CoreStub(ch).Ping(core_pb2.PingRequest(payload=b"x"))
        info = await core_pb2_grpc.CoreStub(ch).Info(core_pb2.InfoRequest())
    assert {
        "hsu.kernel.v1.Kernel",
        "hsu.core.v1.Core",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    assert files and descriptor_pb2.FileDescriptorProto.FromString(files[0]).name.endswith(
        "core.proto"
    )
    assert pong.payload == b"x"
    assert (info.unit, info.pid, info.address) == ("kernel", os.getpid(), kernel.control_address)


async def test_kernel_streams_its_own_logs(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(deployment())
    await kernel.instance_for("hsu.echo.v1.Echo")
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        stub = core_pb2_grpc.CoreStub(ch)
        records = [r async for r in stub.StreamLogs(core_pb2.StreamLogsRequest(tail=50))]
        follow = stub.StreamLogs(core_pb2.StreamLogsRequest(tail=0, follow=True))
        hsu_logger = __import__("loguru").logger
        await asyncio.sleep(0.1)
        hsu_logger.bind(unit="t").warning("a record made while following")

        async def first_from_t():
            while True:  # late lines from the HSU's output may come first
                r = await follow.read()
                if r.extra.get("unit") == "t":
                    return r

        record = await asyncio.wait_for(first_from_t(), 5)
        follow.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.StreamLogs(core_pb2.StreamLogsRequest(min_level="LOUD")).read()
    assert any("registered at" in r.message and r.extra["unit"] == "echo" for r in records)
    assert (record.message, record.level, record.extra["unit"]) == (
        "a record made while following",
        "WARNING",
        "t",
    )
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_malformed_register_is_rejected_and_the_kernel_keeps_running(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(deployment())
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        stub = kernel_pb2_grpc.KernelStub(ch)
        for request, message in [
            (kernel_pb2.RegisterRequest(unit="x", interfaces=["a.B"]), "address: is required"),
            (kernel_pb2.RegisterRequest(unit="x", address="127.0.0.1:1"), "at least one interface"),
            (
                kernel_pb2.RegisterRequest(address="127.0.0.1:1", interfaces=["a.B"]),
                "unit is required",
            ),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Register(request)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert message in info.value.details()
        # garbage bytes where a RegisterRequest belongs
        raw = ch.unary_unary("/hsu.kernel.v1.Kernel/Register")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\xff\xff\xff")
        # grpcio answers before our code runs; the details still say what was wrong
        assert info.value.code() is grpc.StatusCode.UNKNOWN
        assert "hsu.kernel.v1.RegisterRequest" in info.value.details()
        # an HSU the kernel did not start, of a unit the deployment does not declare
        # unmanaged (with a token), may not register (tests/test_registration_security.py)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Register(
                kernel_pb2.RegisterRequest(
                    unit="ext", address="127.0.0.1:1", interfaces=["a.B"], pid=1
                )
            )
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Deregister(kernel_pb2.DeregisterRequest(instance_id="nope"))
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert not [i for i in kernel.instances.values() if i.unit == "ext"]
    assert kernel.state is hsu.KernelState.RUNNING


async def test_missing_executable_names_the_unit_and_the_rest_keeps_running(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(
        deployment(
            echo={**ECHO, "start": "at-start"},
            ghost={"command": ["/nonexistent/hsu-ghost"], "interfaces": ["g.v1.G"]},
        )
    )
    [echo] = (
        kernel.instances.values()
        if len(kernel.instances) == 1
        else [i for i in kernel.instances.values() if i.unit == "echo"]
    )
    with pytest.raises(LaunchError) as info:
        await kernel.instance_for("g.v1.G")
    assert str(info.value) == (
        "unit 'ghost': executable '/nonexistent/hsu-ghost' not found"
        " (command: /nonexistent/hsu-ghost)"
    )
    assert echo.state is hsu.InstanceState.READY and kernel.state is hsu.KernelState.RUNNING


async def test_an_hsu_that_exits_before_registering_shows_its_last_output(
    hsu_kernel_factory, tmp_path
):
    script = tmp_path / "crash.py"
    script.write_text(
        "import sys\nprint('config file missing: /etc/x', file=sys.stderr)\nsys.exit(3)\n"
    )
    kernel = await hsu_kernel_factory(
        deployment(
            crash={
                "command": ["python", str(script)],
                "interfaces": ["c.v1.C"],
                "restart": {"policy": "never"},
            }
        )
    )
    with pytest.raises(LaunchError) as info:
        await kernel.instance_for("c.v1.C")
    message = str(info.value)
    assert "unit 'crash'" in message and "exited with status 3 before it was ready" in message
    assert "config file missing: /etc/x" in message
    [inst] = kernel.instances.values()
    await until(lambda: inst.state is hsu.InstanceState.STOPPED)
    assert inst.last_exit == "exited with status 3 before it was ready"


async def test_startup_timeout_stops_the_instance(hsu_kernel_factory, tmp_path):
    script = tmp_path / "silent.py"
    script.write_text("import time\ntime.sleep(60)\n")
    kernel = await hsu_kernel_factory(
        deployment(
            silent={
                "command": ["python", str(script)],
                "interfaces": ["s.v1.S"],
                "startup_timeout": 0.5,
                "stop_grace": 0.5,
                "restart": {"policy": "never"},
            }
        )
    )
    with pytest.raises(LaunchError, match=r"not ready within startup_timeout=0.5s"):
        await kernel.instance_for("s.v1.S")
    [inst] = kernel.instances.values()
    await until(lambda: inst.state is hsu.InstanceState.STOPPED)
    assert inst.returncode == -signal.SIGTERM


async def test_graceful_stop_escalates_to_sigkill_of_the_whole_group(hsu_kernel_factory, tmp_path):
    # Registers, then ignores SIGTERM and Core.Shutdown, and has a child of its own.
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import signal, subprocess, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time;"
        " signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "from hsu import worker\nfrom hsu_echo import Echo\n"
        "w = worker.Worker(Echo())\nw.request_stop = lambda *a, **k: None\n"
        "import asyncio\nasyncio.run(w.serve())\n"
    )
    kernel = await hsu_kernel_factory(
        deployment(
            stubborn={
                "command": ["python", str(script)],
                "interfaces": ["hsu.echo.v1.Echo"],
                "stop_grace": 0.5,
            }
        )
    )
    inst = await kernel.instance_for("hsu.echo.v1.Echo")
    [grandchild] = psutil.Process(inst.pid).children()
    t0 = time.monotonic()
    await kernel.remove_instance(inst)
    assert time.monotonic() - t0 >= 0.5
    assert inst.returncode == -signal.SIGKILL and inst.state is hsu.InstanceState.STOPPED
    # its child, which also ignored SIGTERM, died with it: same process group
    assert _dead(grandchild)


def _dead(proc: psutil.Process) -> bool:
    """Ended within 5 s (re-parented to pytest, the subreaper, which reaps it)."""
    try:
        proc.wait(timeout=5)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


async def test_an_instance_that_dies_is_restarted_in_its_slot(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(deployment())
    inst = await kernel.instance_for("hsu.echo.v1.Echo")
    first_pid = inst.pid
    os.kill(first_pid, signal.SIGKILL)
    await until(lambda: inst.restarts == 1 and inst.state is hsu.InstanceState.READY)
    # restart: on-failure is the default; the first restart is immediate
    assert inst.state is hsu.InstanceState.READY and inst.restarts == 1
    assert inst.pid != first_pid and inst.last_exit == "killed by SIGKILL"
    assert not psutil.pid_exists(first_pid)
    states = [t.target.value for t in inst.machine.history]
    assert states[-3:] == ["backoff", "starting", "ready"]
    again = await kernel.instance_for("hsu.echo.v1.Echo")
    assert again is inst


async def test_unknown_interface_and_unit_are_clear_errors(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(deployment())
    with pytest.raises(hsu.NoSuchUnit, match=r"no unit serves interface 'x\.v1\.X'"):
        await kernel.instance_for("x.v1.X")
    with pytest.raises(hsu.NoSuchUnit, match=r"no unit named 'ech' \(units: echo\)"):
        await kernel.start_instance("ech")


async def test_kernel_serves_its_data_plane_on_a_unix_socket(hsu_kernel_factory, hsu_free_address):
    kernel = await hsu_kernel_factory(deployment(), address=hsu_free_address)
    assert kernel.address == hsu_free_address
    inst = await kernel.instance_for("hsu.echo.v1.Echo")  # the HSU registers over the socket
    assert inst.state is hsu.InstanceState.READY


async def test_address_in_use_is_a_clear_error(hsu_kernel_factory, tmp_path):
    first = await hsu_kernel_factory(deployment())
    with pytest.raises(hsu.HsuError, match=f"kernel.address: cannot listen on {first.address}"):
        await hsu_kernel_factory(deployment(), address=first.address, base_dir=str(tmp_path / "2"))
    assert first.state is hsu.KernelState.RUNNING


def test_sys_executable_is_what_python_means():
    from hsu._kernel.supervision.supervisor import UnitSupervisor
    from hsu.testing import build_kernel

    k = build_kernel(deployment())
    sup = UnitSupervisor(k, "echo", k.unit("echo"))
    assert sup._argv() == [sys.executable, "-m", "hsu_echo"]
