"""Registrations are proven, and every field is checked where it enters.

A real kernel in-process, real HSU processes and real gRPC on loopback. The
attacker is a client of the Kernel API without the instance's secret, and in
one test another local user (uid 65534 through ``setpriv``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import hsu
from conftest import until
from hsu import validate
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.errors import InvalidValue
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu.worker import Worker
from hsu_echo import Echo
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

pytestmark = pytest.mark.integration

ECHO = "hsu.echo.v1.Echo"
TOKEN_KEY = "hsu-instance-token"
#: the unmanaged unit's credential (what ${env:FAR_TOKEN} would resolve to)
FAR_TOKEN = "far-unit-credential-0123456789abcdef"
OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def echo_unit(**extra: Any) -> dict[str, Any]:
    return {"command": ["python", "-m", "hsu_echo"], "interfaces": [ECHO], **extra}


def far_unit(**extra: Any) -> dict[str, Any]:
    """An unmanaged unit whose instances register themselves, with its token;
    probed fast so that the tests need not wait."""
    return {
        "kind": "unmanaged",
        # declared (the config asks for an address or a pidfile); never called here
        "address": "127.0.0.1:9",
        "interfaces": [ECHO],
        "token": FAR_TOKEN,
        "startup_timeout": 1.5,
        "health": {"probe": "grpc", "interval": 0.2, "timeout": 0.5, "failure_threshold": 2},
        **extra,
    }


def deployment(**units: Any) -> dict[str, Any]:
    return {"kernel": {"drain_grace": 1}, "units": units}


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def call(method: Any, request: Any, token: str | None = None) -> tuple[Any, str]:
    """(status code, details) of one unary call; the reply in place of the
    details when it succeeds."""
    metadata = ((TOKEN_KEY, token),) if token is not None else None
    try:
        reply = await method(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, reply


def register(**fields: Any) -> kernel_pb2.RegisterRequest:
    fields.setdefault("interfaces", [ECHO])
    return kernel_pb2.RegisterRequest(**fields)


@pytest.fixture
async def backend(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Worker]:
    """A live Echo server in this process (standalone): an address that answers."""
    for name in ("HSU_KERNEL_ADDRESS", "HSU_INSTANCE_TOKEN", "HSU_UNIT", "HSU_INSTANCE_ID"):
        monkeypatch.delenv(name, raising=False)
    worker = Worker(Echo(), listen="127.0.0.1:0")
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


def ready(kernel: Any, unit: str) -> list[Any]:
    return [
        i
        for i in kernel.instances.values()
        if i.unit == unit and i.state is hsu.InstanceState.READY
    ]


# -- instances the kernel started ----------------------------------------------------


async def test_a_starting_slot_cannot_be_stolen_and_the_real_hsu_registers(
    hsu_kernel_factory, tmp_path
):
    # waits a moment, then execs the echo HSU (same pid, as a wrapper must)
    slow = tmp_path / "slow.py"
    slow.write_text(
        "import os, sys, time\ntime.sleep(1.5)\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'hsu_echo'])\n"
    )
    kernel = await hsu_kernel_factory(
        deployment(
            echo=echo_unit(start="at-start"),
            slow={"command": ["python", str(slow)], "interfaces": ["hsu.slow.v1.Slow"]},
        )
    )
    [other] = ready(kernel, "echo")
    starting = asyncio.ensure_future(kernel.start_instance("slow"))
    await until(
        lambda: any(
            i.unit == "slow" and i.pid and i.state is hsu.InstanceState.STARTING
            for i in kernel.instances.values()
        )
    )
    [victim] = [i for i in kernel.instances.values() if i.unit == "slow"]
    thief = {"instance_id": victim.instance_id, "unit": "slow", "address": "127.0.0.1:1"}
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        stub = kernel_pb2_grpc.KernelStub(ch)
        attempts = {
            "pid 0, no token": (register(**thief, pid=0), None),
            "its pid, no token": (register(**thief, pid=victim.pid), None),
            "its pid, another instance's token": (
                register(**thief, pid=victim.pid),
                other.token,
            ),
            "its pid, a made-up token": (register(**thief, pid=victim.pid), "x" * 43),
            # even the right secret does not make pid 0 (or another pid) acceptable
            "pid 0, its own token": (register(**thief, pid=0), victim.token),
            "another pid, its own token": (register(**thief, pid=1), victim.token),
        }
        for what, (request, token) in attempts.items():
            code, details = await call(stub.Register, request, token)
            assert code is DENIED, what
            assert "\n" not in details
        # the other instance cannot be deregistered or made to report load by anyone else
        code, _ = await call(
            stub.Deregister, kernel_pb2.DeregisterRequest(instance_id=other.instance_id)
        )
        assert code is DENIED
        code, _ = await call(
            stub.Deregister,
            kernel_pb2.DeregisterRequest(instance_id=other.instance_id),
            victim.token,
        )
        assert code is DENIED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ReportLoad(
                iter([kernel_pb2.LoadReport(instance_id=other.instance_id, inflight=999)])
            )
        assert info.value.code() is DENIED
    assert kernel.routing.load(other.instance_id) == 0
    assert other.health != "draining" and other.state is hsu.InstanceState.READY
    # the real HSU registers, and serves at its own address
    inst = await asyncio.wait_for(starting, 30)
    assert inst is victim and inst.state is hsu.InstanceState.READY
    assert inst.address != "127.0.0.1:1"
    async with grpc.aio.insecure_channel(inst.address) as ch:
        reply = await echo_pb2_grpc.EchoStub(ch).Echo(echo_pb2.EchoRequest(message="hi"))
    assert (reply.instance_id, reply.pid) == (inst.instance_id, inst.pid)


async def test_core_shutdown_of_an_hsu_needs_its_kernels_token(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(deployment(echo=echo_unit(start="at-start")))
    [inst] = ready(kernel, "echo")
    async with grpc.aio.insecure_channel(inst.address) as ch:
        core = core_pb2_grpc.CoreStub(ch)
        for token in (None, "", "x" * 43, inst.token[:-1]):
            code, details = await call(core.Shutdown, core_pb2.ShutdownRequest(), token)
            assert code is DENIED and "only the kernel" in details
        # the rest of Core answers anyone (the kernel's probes use it)
        code, pong = await call(core.Ping, core_pb2.PingRequest(payload=b"p"))
        assert code is OK and pong.payload == b"p"
    await asyncio.sleep(0.3)
    assert inst.state is hsu.InstanceState.READY
    # the kernel's own Shutdown (with the token) is accepted: no signal needed
    await kernel.stop_one(inst.instance_id)
    tail = "\n".join(kernel.output_tail(inst))
    assert "stopping: stopped by request" in tail and "SIGTERM" not in tail
    assert inst.returncode == 0


# -- instances the kernel did not start ---------------------------------------------


async def test_only_a_declared_unmanaged_unit_with_its_token_may_register(
    hsu_kernel_factory, backend
):
    kernel = await hsu_kernel_factory(
        deployment(
            echo=echo_unit(),
            far=far_unit(),
            open=far_unit(token=None, interfaces=["hsu.open.v1.Open"]),
        )
    )
    before = set(kernel.instances)
    good = {"unit": "far", "address": backend.address, "pid": 4242}
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        stub = kernel_pb2_grpc.KernelStub(ch)
        refused = {
            "a unit the deployment does not have": (register(**{**good, "unit": "ghost"}), None),
            "a unit the kernel starts itself": (register(**{**good, "unit": "echo"}), FAR_TOKEN),
            "an instance id the kernel never gave": (
                register(**good, instance_id="far-12345678"),
                FAR_TOKEN,
            ),
            "no token": (register(**good), None),
            "a wrong token": (register(**good), FAR_TOKEN[:-1] + "X"),
            "an unmanaged unit without a token": (
                register(unit="open", address=backend.address, interfaces=["hsu.open.v1.Open"]),
                FAR_TOKEN,
            ),
            "an interface the unit does not declare": (
                register(**good, interfaces=["hsu.other.v1.Other"]),
                FAR_TOKEN,
            ),
        }
        for what, (request, token) in refused.items():
            code, details = await call(stub.Register, request, token)
            assert code is DENIED, (what, details)
        assert set(kernel.instances) == before
        code, reply = await call(stub.Register, register(**good), FAR_TOKEN)
        assert code is OK
        inst = kernel.instances[reply.instance_id]
        assert (inst.unit, inst.managed, inst.address) == ("far", False, backend.address)
        await until(lambda: inst.state is hsu.InstanceState.READY, 10)
        # routed: a call through the data plane reaches it
        async with grpc.aio.insecure_channel(kernel.address) as data:
            echoed = await echo_pb2_grpc.EchoStub(data).Echo(echo_pb2.EchoRequest(message="x"))
        assert (echoed.instance_id, echoed.pid) == ("standalone", os.getpid())
        # deregistered with the unit's token only, then forgotten
        gone = kernel_pb2.DeregisterRequest(instance_id=inst.instance_id)
        assert (await call(stub.Deregister, gone))[0] is DENIED
        assert (await call(stub.Deregister, gone, "y" * 40))[0] is DENIED
        assert (await call(stub.Deregister, gone, FAR_TOKEN))[0] is OK
    assert inst.instance_id not in kernel.instances
    assert inst.state is hsu.InstanceState.STOPPED
    await kernel.routing.flush()
    assert kernel.registry is not None
    assert not await kernel.registry.lookup(ECHO)


async def test_every_field_is_checked_and_named(hsu_kernel_factory, backend):
    kernel = await hsu_kernel_factory(deployment(far=far_unit()))
    good = {"unit": "far", "address": backend.address}
    big = "a." + "B" * (int(3.9 * 2**20))
    bad: list[tuple[dict[str, Any], str]] = [
        ({"address": "127.0.0.1:1}"}, "address"),
        ({"address": "127.0.0.1:1;"}, "address"),
        ({"address": "127.0.0.1:1\nERROR forged"}, "address"),
        ({"address": "unix:/tmp/a\x00b.sock"}, "address"),
        ({"address": "unix:/etc/passwd"}, "address: a unix socket outside"),
        ({"address": "169.254.169.254:80"}, "address: a link-local address"),
        ({"address": "10.1.2.3:80"}, "address: not on this host"),
        ({"address": "0.0.0.0:80"}, "address: the unspecified address"),
        ({"address": "127.0.0.1:" + "1" * 300}, "address: longer than 256"),
        ({"address": kernel.control_address}, "address: an address of the kernel itself"),
        ({"interfaces": [big]}, "interfaces[0]: longer than 256 characters"),
        ({"interfaces": ["Echo"]}, "interfaces[0]: not a service's full name"),
        ({"interfaces": ["hsu.echo.v1.Echo;x"]}, "interfaces[0]"),
        ({"interfaces": [f"a.B{i}" for i in range(65)]}, "interfaces: 65 listed"),
        ({"version": "1\n2"}, "version"),
        ({"version": "v" * 65}, "version: longer than 64"),
        ({"metadata": {"k\n": "v"}}, "metadata key"),
        ({"metadata": {"k": "\u202eevil"}}, "metadata[k]"),
        ({"metadata": {f"k{i}": "v" for i in range(33)}}, "metadata: 33 entries"),
        ({"metadata": {"weight": "1000000000"}}, "metadata[weight]: not an integer 1 to 100"),
        ({"pid": -5}, "pid"),
    ]
    async with grpc.aio.insecure_channel(
        kernel.control_address, options=[("grpc.max_send_message_length", 8 * 2**20)]
    ) as ch:
        stub = kernel_pb2_grpc.KernelStub(ch)
        for fields, named in bad:
            code, details = await call(stub.Register, register(**{**good, **fields}), FAR_TOKEN)
            assert code is INVALID, (fields if len(str(fields)) < 200 else named, details)
            assert details.startswith("Register: ") and named in details, details
            assert "\n" not in details and "\x00" not in details and len(details) < 300
    assert not [i for i in kernel.instances.values() if i.unit == "far"]
    assert kernel.state is hsu.KernelState.RUNNING


def test_validate_is_public_and_says_which_field():
    assert validate.address("unix:/run/x.sock") == "unix:/run/x.sock"
    assert validate.interface_name("hsu.echo.v1.Echo") == "hsu.echo.v1.Echo"
    for value in ("a}b:1", "127.1:80", "2852039166:80", "[fe80::1]:80", "metadata:80"):
        with pytest.raises(InvalidValue, match=r"^upstream: "):
            validate.address(value, field="upstream")
    with pytest.raises(InvalidValue, match="not on this host"):
        validate.local_address("192.0.2.1:80")
    assert validate.local_address("unix:/srv/a/b.sock", dirs=["/srv/a"]) == "unix:/srv/a/b.sock"
    with pytest.raises(InvalidValue, match="outside /srv/a"):
        validate.local_address("unix:/srv/ab.sock", dirs=["/srv/a"])
    with pytest.raises(InvalidValue, match=r"^unit: "):
        validate.unit_name("Echo Unit")


# -- bounds -------------------------------------------------------------------------


async def test_caps_on_registered_instances_refuse_with_resource_exhausted(
    hsu_kernel_factory, backend
):
    kernel = await hsu_kernel_factory(deployment(far=far_unit()))
    kernel.MAX_REGISTERED_PER_UNIT = 3
    request = register(unit="far", address=backend.address)
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        stub = kernel_pb2_grpc.KernelStub(ch)
        codes = [(await call(stub.Register, request, FAR_TOKEN))[0] for _ in range(4)]
        assert codes == [OK, OK, OK, EXHAUSTED]
        code, details = await call(stub.Register, request, FAR_TOKEN)
        assert "unit 'far' has 3 registered instances; at most 3" in details
        # the whole kernel's cap
        kernel.MAX_REGISTERED_PER_UNIT = 64
        kernel.MAX_INSTANCES = len(kernel.instances)
        code, details = await call(stub.Register, request, FAR_TOKEN)
        assert code is EXHAUSTED and "instances; at most" in details
    assert len([i for i in kernel.instances.values() if i.unit == "far"]) == 3


async def test_unproven_calls_are_rate_limited_and_proven_ones_are_not(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(deployment(echo=echo_unit()))
    # a slow refill, so a loaded machine's slow calls cannot keep up with it
    kernel.UNPROVEN_RATE = (2.0, 30.0)
    kernel.__dict__.pop("_unproven", None)
    rate, burst = kernel.UNPROVEN_RATE
    request = register(unit="echo", address="127.0.0.1:1")
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        stub = kernel_pb2_grpc.KernelStub(ch)
        began = time.monotonic()
        codes = [(await call(stub.Register, request))[0] for _ in range(int(burst) + 60)]
        took = time.monotonic() - began
        assert set(codes) == {DENIED, EXHAUSTED}
        # at most the burst and what refilled meanwhile got through to be refused
        assert codes.count(DENIED) <= burst + rate * took + 1
        assert codes[: int(burst)] == [DENIED] * int(burst)
        # an HSU the kernel starts proves itself with its token: not charged
        inst = await asyncio.wait_for(kernel.start_instance("echo"), 30)
        assert inst.state is hsu.InstanceState.READY
        # load reports: one stream carries at most LOAD_REPORT_RATE
        report_burst = kernel.LOAD_REPORT_RATE[1]
        reports = [
            kernel_pb2.LoadReport(instance_id=inst.instance_id, inflight=1)
            for _ in range(int(report_burst) + 20)
        ]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ReportLoad(iter(reports), metadata=((TOKEN_KEY, inst.token),))
        assert info.value.code() is EXHAUSTED
        # and a value beyond bounds is refused
        too_many = kernel_pb2.LoadReport(instance_id=inst.instance_id, inflight=2**31)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ReportLoad(iter([too_many]), metadata=((TOKEN_KEY, inst.token),))
        assert info.value.code() is INVALID and "inflight" in info.value.details()


# -- self-registered endpoints are probed --------------------------------------------


async def test_a_dead_address_is_never_ready_and_routes_nothing(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(deployment(far=far_unit()))
    seen: list[str] = []
    dead = f"127.0.0.1:{free_port()}"
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        stub = kernel_pb2_grpc.KernelStub(ch)
        code, reply = await call(stub.Register, register(unit="far", address=dead), FAR_TOKEN)
    assert code is OK
    inst = kernel.instances[reply.instance_id]
    assert inst.state is hsu.InstanceState.STARTING
    assert kernel.registry is not None
    deadline = time.monotonic() + 10
    while inst.instance_id in kernel.instances and time.monotonic() < deadline:
        seen.append(inst.state.value)
        await kernel.routing.flush()
        assert not await kernel.registry.lookup(ECHO)
        await asyncio.sleep(0.05)
    assert inst.instance_id not in kernel.instances, "a dead registration is dropped"
    assert "ready" not in seen and inst.state is hsu.InstanceState.STOPPED
    assert "startup_timeout=1.5s" in inst.machine.history[-1].reason
    assert not await kernel.registry.lookup(ECHO)


async def test_a_registered_instance_that_stops_answering_is_probed_out(
    hsu_kernel_factory, backend
):
    kernel = await hsu_kernel_factory(deployment(far=far_unit()))
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        stub = kernel_pb2_grpc.KernelStub(ch)
        code, reply = await call(
            stub.Register, register(unit="far", address=backend.address), FAR_TOKEN
        )
    assert code is OK
    inst = kernel.instances[reply.instance_id]
    await until(lambda: inst.state is hsu.InstanceState.READY, 10)
    await kernel.routing.flush()
    assert kernel.registry is not None
    assert [e.instance_id for e in await kernel.registry.lookup(ECHO)] == [inst.instance_id]
    await backend.stop()
    await until(lambda: inst.instance_id not in kernel.instances, 10)
    assert "probed out" in inst.machine.history[-1].reason
    await kernel.routing.flush()
    assert not await kernel.registry.lookup(ECHO)


# -- another local user --------------------------------------------------------------

ATTACK = """
import json, sys, grpc
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
target, slot, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {}
def attempt(name, call):
    try:
        call()
        out[name] = "OK"
    except grpc.RpcError as exc:
        out[name] = exc.code().name
with grpc.insecure_channel(target) as ch:
    stub = kernel_pb2_grpc.KernelStub(ch)
    steal = kernel_pb2.RegisterRequest(
        instance_id=slot, unit="echo", address="127.0.0.1:1",
        interfaces=["hsu.echo.v1.Echo"], pid=pid)
    attempt("steal, pid", lambda: stub.Register(steal, timeout=5))
    steal.pid = 0
    attempt("steal, pid 0", lambda: stub.Register(steal, timeout=5))
    join = kernel_pb2.RegisterRequest(
        unit="far", address="127.0.0.1:1", interfaces=["hsu.echo.v1.Echo"])
    attempt("join, guessed token", lambda: stub.Register(
        join, timeout=5, metadata=(("hsu-instance-token", "guess-guess-guess-guess"),)))
    attempt("deregister", lambda: stub.Deregister(
        kernel_pb2.DeregisterRequest(instance_id=slot), timeout=5))
print(json.dumps(out))
"""


@pytest.fixture
def attack_script() -> Iterator[Path]:
    """The attacker's script, in a folder uid 65534 may read (pytest's are 0700)."""
    where = Path(tempfile.mkdtemp(prefix="hsu-attack-"))
    where.chmod(0o755)
    script = where / "attack.py"
    script.write_text(ATTACK)
    script.chmod(0o644)
    yield script
    shutil.rmtree(where, ignore_errors=True)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
async def test_another_local_user_cannot_register_or_deregister(hsu_kernel_factory, attack_script):
    # the control plane on TCP loopback (opt-in) so that another user reaches
    # the Kernel API at all: the instance's token is what refuses it
    kernel = await hsu_kernel_factory(
        deployment(echo=echo_unit(start="at-start"), far=far_unit()), control="127.0.0.1:0"
    )
    [inst] = ready(kernel, "echo")
    before = set(kernel.instances)
    results = {}
    for plane, target in (("control", kernel.control_address), ("data", kernel.address)):
        proc = await asyncio.create_subprocess_exec(
            "setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
            sys.executable, str(attack_script), target, inst.instance_id, str(inst.pid),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=attack_script.parent,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        results[plane] = json.loads(out)
    # the Kernel API refuses every call without the instance's or the unit's token
    assert results["control"] == {
        "steal, pid": "PERMISSION_DENIED",
        "steal, pid 0": "PERMISSION_DENIED",
        "join, guessed token": "PERMISSION_DENIED",
        "deregister": "PERMISSION_DENIED",
    }
    # the data plane does not serve the Kernel API at all
    assert "OK" not in results["data"].values()
    assert set(kernel.instances) == before
    assert inst.state is hsu.InstanceState.READY and inst.health != "draining"
    async with grpc.aio.insecure_channel(inst.address) as ch:
        reply = await echo_pb2_grpc.EchoStub(ch).Echo(echo_pb2.EchoRequest(message="still"))
    assert reply.pid == inst.pid


async def test_the_memory_registry_checks_what_is_put_and_holds_a_bounded_number():
    from hsu.errors import OverLimit
    from hsu.ports import Endpoint
    from hsu_plugins.routing.registry_memory import MemoryRegistry

    registry = MemoryRegistry(max_endpoints=2)
    try:
        good = Endpoint("echo-1", "echo", "127.0.0.1:5000", (ECHO,))
        await registry.put(good)
        for bad, named in [
            (Endpoint("echo-2", "echo", "127.0.0.1:1; }", (ECHO,)), "address"),
            (Endpoint("echo-2", "echo", "unix:/run/x\nsock", (ECHO,)), "address"),
            (Endpoint("echo\n2", "echo", "127.0.0.1:1", (ECHO,)), "instance_id"),
            (Endpoint("echo-2", "echo", "127.0.0.1:1", ("bad name",)), r"interfaces\[0\]"),
            (Endpoint("echo-2", "echo", "127.0.0.1:1", (ECHO,), weight=10**9), "weight"),
            (Endpoint("echo-2", "echo", "127.0.0.1:1", (ECHO,), state="x"), "state"),
        ]:
            with pytest.raises(InvalidValue, match=named) as info:
                await registry.put(bad)
            assert "\n" not in str(info.value)
        await registry.put(Endpoint("echo-2", "echo", "127.0.0.1:5001", (ECHO,)))
        with pytest.raises(OverLimit, match="at most 2"):
            await registry.put(Endpoint("echo-3", "echo", "127.0.0.1:5002", (ECHO,)))
        # replacing one that is there is no new endpoint
        await registry.put(Endpoint("echo-2", "echo", "127.0.0.1:5003", (ECHO,)))
        assert [e.address for e in await registry.lookup(ECHO)] == [
            "127.0.0.1:5000",
            "127.0.0.1:5003",
        ]
    finally:
        await registry.close()
