"""Routed calls end to end: hsu.connect, the gateway, failover, breakers,
drain and autoscaling, against real echo HSUs over loopback."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest

import hsu
from conftest import run_hsu, until
from hsu.client.route import Policy, RetryBudget
from hsu.errors import ConfigError
from hsu.ports import Endpoint
from hsu.testing import build_kernel
from hsu_echo import Echo
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc
from hsu_plugins.gateway import python as gateway_python

pytestmark = pytest.mark.integration

ECHO = "hsu.echo.v1.Echo"
ROOT = Path(__file__).resolve().parent.parent


def echo_unit(**more) -> dict:
    unit = {
        "command": ["python", "-m", "hsu_echo"],
        "interfaces": [ECHO],
        "startup_timeout": 20,
        "stop_grace": 5,
    }
    unit.update(more)
    return unit


def ready(kernel, unit="echo"):
    return [
        i
        for i in kernel.instances.values()
        if i.unit == unit and i.state is hsu.InstanceState.READY
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- logic -----------------------------------------------------------------------


def test_idempotent_methods_match_by_name_path_or_pattern():
    p = Policy(unit="u", idempotent=("Echo", "hsu.echo.v1.Echo/Coll*"))
    assert p.is_idempotent("/hsu.echo.v1.Echo/Echo")
    assert p.is_idempotent("/hsu.echo.v1.Echo/Collect")
    assert not p.is_idempotent("/hsu.echo.v1.Echo/EchoStream")
    assert Policy(unit="u", idempotent=("*",)).is_idempotent("/a.B/C")
    assert not Policy(unit="u").is_idempotent("/hsu.echo.v1.Echo/Echo")


def test_the_retry_budget_allows_a_share_of_calls_plus_a_trickle():
    now = [0.0]
    budget = RetryBudget(0.1, 1.0, clock=lambda: now[0])
    taken = sum(budget.withdraw() for _ in range(100))
    assert taken == 10  # the initial reserve, then nothing
    for _ in range(100):
        budget.deposit()  # 100 calls: 10 more retries
    assert sum(budget.withdraw() for _ in range(100)) == 10
    now[0] += 3.0  # 3 s at 1/s
    assert sum(budget.withdraw() for _ in range(100)) == 3


def test_an_unknown_balancer_or_bad_options_is_a_config_error_naming_the_unit():
    raw = {
        "units": {
            "echo": echo_unit(
                routing={"balancer": "p2", "breaker_options": {"failurs": 3}},
            )
        }
    }
    with pytest.raises(ConfigError) as info:
        build_kernel(raw)
    text = str(info.value)
    assert "units.echo.routing.balancer" in text and "did you mean 'p2c'" in text
    assert "units.echo.routing.breaker_options.failurs" in text


# -- hsu.connect -------------------------------------------------------------------


async def test_the_first_routed_call_starts_an_instance_and_later_ones_reuse_it(
    hsu_kernel_factory,
):
    kernel = await hsu_kernel_factory({"units": {"echo": echo_unit()}})
    assert not kernel.instances
    async with hsu.connect(kernel.control_address) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        first = await echo.Echo(echo_pb2.EchoRequest(message="hi"), timeout=30)
        assert first.message == "hi"
        [inst] = ready(kernel)
        assert first.instance_id == inst.instance_id and first.pid == inst.pid
        again = await echo.Echo(echo_pb2.EchoRequest(message="again"), timeout=5)
        assert again.pid == inst.pid
        streamed = [r.message async for r in echo.EchoStream(
            echo_pb2.EchoStreamRequest(message="s", count=3), timeout=5)]  # fmt: skip
        assert streamed == ["s 0", "s 1", "s 2"]

        async def parts():
            for p in ("a", "b"):
                yield echo_pb2.EchoRequest(message=p)

        assert (await echo.Collect(parts(), timeout=5)).message == "a b"
    assert len(kernel.instances) == 1


async def test_round_robin_spreads_calls_evenly_and_a_hash_key_pins_them(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "echo": echo_unit(start="at-start", min_instances=3, max_instances=3),
                "hashed": echo_unit(
                    command=["python", "-m", "hsu_echo"],
                    interfaces=["hsu.echo.v1.Echo.hashed"],
                ),
            }
        }
    )
    assert len(ready(kernel)) == 3
    async with hsu.connect(kernel.control_address) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        seen = collections.Counter()
        for i in range(30):
            seen[(await echo.Echo(echo_pb2.EchoRequest(message=str(i)), timeout=5)).pid] += 1
        assert sorted(seen.values()) == [10, 10, 10]
    # kernel.connect(): the same, in-process, over the kernel's own routes
    channel = kernel.connect()
    echo = echo_pb2_grpc.EchoStub(channel)
    pids = {(await echo.Echo(echo_pb2.EchoRequest(), timeout=5)).pid for _ in range(6)}
    assert pids == {i.pid for i in ready(kernel)}
    await channel.close()


async def test_ring_hash_sends_a_key_to_one_instance(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "echo": echo_unit(
                    start="at-start",
                    min_instances=3,
                    max_instances=3,
                    routing={"balancer": "ring_hash", "hash_key": "tenant"},
                )
            }
        }
    )
    assert len(ready(kernel)) == 3
    async with hsu.connect(kernel.control_address) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        homes = collections.defaultdict(set)
        for round_ in range(3):
            for k in range(20):
                reply = await echo.Echo(
                    echo_pb2.EchoRequest(message=str(round_)),
                    metadata=(("tenant", f"t{k}"),),
                    timeout=5,
                )
                homes[k].add(reply.pid)
    assert all(len(pids) == 1 for pids in homes.values())  # each key: one instance
    assert len(set().union(*homes.values())) >= 2  # and the keys spread


async def test_an_unknown_interface_is_unimplemented_with_the_reason():
    kernel = build_kernel({"units": {"echo": echo_unit()}})
    await kernel.start()
    try:
        async with hsu.connect(kernel.control_address) as channel:
            stub = channel.unary_unary("/nope.v1.Nope/Call")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub(b"", timeout=5)
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
            assert "no unit serves interface 'nope.v1.Nope'" in info.value.details()
        async with grpc.aio.insecure_channel(kernel.address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await plain.unary_unary("/nope.v1.Nope/Call")(b"", timeout=5)
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
            assert "served: hsu.echo.v1.Echo" in info.value.details()
    finally:
        await kernel.stop()


# -- failover ------------------------------------------------------------------------


async def _load(call, seconds: float, workers: int, max_calls: int, until=None, grace=30.0):
    """Run calls from ``workers`` tasks for ``seconds`` (at most ``max_calls``),
    and on until ``until(pids)`` holds (at most ``grace`` seconds more: a
    loaded machine starts a replacement late)."""
    ok, failed, pids = 0, [], collections.Counter()
    stop_at = time.monotonic() + seconds

    def going() -> bool:
        now = time.monotonic()
        if now < stop_at:
            return True
        return until is not None and not until(pids) and now < stop_at + grace

    async def worker():
        nonlocal ok
        while going() and ok + len(failed) < max_calls:
            try:
                reply = await call()
            except grpc.aio.AioRpcError as exc:
                failed.append(f"{exc.code().name}: {exc.details()}")
            else:
                ok += 1
                pids[reply.pid] += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return ok, failed, pids


@pytest.mark.parametrize("via", ["connect", "gateway"])
async def test_killing_instances_under_load_fails_no_idempotent_call(hsu_kernel_factory, via):
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "echo": echo_unit(
                    start="at-start",
                    min_instances=3,
                    max_instances=3,
                    routing={"idempotent": ["Echo"], "balancer": "least_inflight"},
                    restart={"backoff": {"reset_after": 0.5}},
                )
            }
        }
    )
    assert len(ready(kernel)) == 3
    if via == "connect":
        channel = hsu.connect(kernel.control_address)
    else:
        channel = grpc.aio.insecure_channel(kernel.address)
    echo = echo_pb2_grpc.EchoStub(channel)
    killed = []

    async def killer():
        for _ in range(2):  # bounded: two kills, 1 s apart
            await asyncio.sleep(1.0)
            victim = ready(kernel)[0]
            killed.append(victim.pid)
            os.kill(victim.pid, signal.SIGKILL)

    try:
        load = asyncio.ensure_future(
            _load(
                lambda: echo.Echo(echo_pb2.EchoRequest(message="x", delay_ms=20), timeout=10),
                seconds=3.5,
                workers=8,
                max_calls=20_000,
                # the second victim's replacement answered
                until=lambda pids: len(killed) == 2 and len(pids) >= 5,
            )
        )
        await killer()
        ok, failed, pids = await load
    finally:
        await channel.close()
    assert failed == []
    assert ok > 50
    # the first victim had been answering (the second may be a replacement a
    # loaded machine made ready too late for any call to reach before its kill)
    assert killed[0] in pids
    assert len(pids) >= 4  # and replacements took over
    await until(lambda: len(ready(kernel)) == 3)


async def test_every_caller_fails_over_an_idempotent_call_the_same_way(hsu_kernel_factory):
    """hsu.connect, hsu.connect_sync, kernel.connect() and the gateway run one
    call loop (hsu.client.route.Tries): with a dead instance listed next to a
    live one, each tries every idempotent call again on the live one, and a
    call of a method that is not idempotent that went to the dead one fails
    with UNAVAILABLE. Either way the dead one is ejected at its first
    failure: round robin sends it no more calls, so of 6 such calls exactly
    one fails."""
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "echo": echo_unit(
                    start="at-start", routing={"idempotent": ["Echo"], "breaker": "none"}
                )
            }
        }
    )
    [real] = ready(kernel)
    registry = kernel.routing.registry
    echo_request = echo_pb2.EchoRequest(message="x")
    stream_request = echo_pb2.EchoStreamRequest(message="s", count=1)
    ghosts = iter(range(100))

    async def new_ghost(route) -> str:
        """A dead instance listed in place of the last one: not ejected yet."""
        name = f"ghost-{next(ghosts)}"
        for old in [i for i in route.endpoints if i.startswith("ghost")]:
            await registry.delete(old)
        await registry.put(Endpoint(name, "echo", f"127.0.0.1:{free_port()}", (ECHO,)))
        await until(lambda: set(route.endpoints) == {real.instance_id, name}, 10)
        return name

    async def calls_async(channel, route):
        echo = echo_pb2_grpc.EchoStub(channel)
        ghost = await new_ghost(route)
        pids = {(await echo.Echo(echo_request, timeout=5)).pid for _ in range(6)}
        assert route.ejected.keys() == {ghost}
        await new_ghost(route)
        outcomes = []
        for _ in range(6):
            try:
                outcomes.append(len([r async for r in echo.EchoStream(stream_request, timeout=5)]))
            except grpc.aio.AioRpcError as exc:
                outcomes.append(exc.code().name)
        return pids, collections.Counter(outcomes)

    def calls_sync(channel, route, loop):
        echo = echo_pb2_grpc.EchoStub(channel)
        ghost = asyncio.run_coroutine_threadsafe(new_ghost(route), loop).result()
        pids = {echo.Echo(echo_request, timeout=5).pid for _ in range(6)}
        assert route.ejected.keys() == {ghost}
        asyncio.run_coroutine_threadsafe(new_ghost(route), loop).result()
        outcomes = []
        for _ in range(6):
            try:
                outcomes.append(len(list(echo.EchoStream(stream_request, timeout=5))))
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
        return pids, collections.Counter(outcomes)

    seen = {}
    loop = asyncio.get_running_loop()
    async with hsu.connect(kernel.control_address) as channel:
        route = await channel.route(ECHO, 10)
        seen["connect"] = await calls_async(channel, route)
    sync_channel = hsu.connect_sync(kernel.control_address)
    try:
        route = await asyncio.to_thread(sync_channel.route, ECHO, 10)
        seen["connect_sync"] = await asyncio.to_thread(calls_sync, sync_channel, route, loop)
    finally:
        await asyncio.to_thread(sync_channel.close)
    local = kernel.connect()
    try:
        seen["kernel.connect"] = await calls_async(local, kernel.routing.route(ECHO))
    finally:
        await local.close()
    async with grpc.aio.insecure_channel(kernel.address) as plain:
        seen["gateway"] = await calls_async(plain, kernel.routing.route(ECHO))
    expected = ({real.pid}, collections.Counter({1: 5, "UNAVAILABLE": 1}))
    assert seen == dict.fromkeys(("connect", "connect_sync", "kernel.connect", "gateway"), expected)


# -- the circuit breaker and ejection -----------------------------------------------------


class _Flaky(Echo):
    """An Echo servicer that answers UNAVAILABLE itself while ``failing``."""

    failing = True

    async def Echo(self, request, context):
        if self.failing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "busy")
        return await super().Echo(request, context)


async def test_the_breaker_opens_on_an_instance_answering_unavailable_and_recovers(
    hsu_kernel_factory,
):
    """An instance that answers UNAVAILABLE (reachable: it is not ejected)
    opens its breaker after ``failures`` of them, every call going to the
    other instance meanwhile; once it answers again, a trial after the
    cooldown closes the breaker."""
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "echo": echo_unit(
                    start="at-start",
                    routing={
                        "idempotent": ["Echo"],
                        "breaker_options": {"failures": 2, "cooldown": 0.5},
                    },
                )
            }
        }
    )
    [real] = ready(kernel)
    flaky = _Flaky()
    server = grpc.aio.server()
    echo_pb2_grpc.add_EchoServicer_to_server(flaky, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await kernel.routing.registry.put(Endpoint("flaky", "echo", f"127.0.0.1:{port}", (ECHO,)))
        async with hsu.connect(kernel.control_address) as channel:
            echo = echo_pb2_grpc.EchoStub(channel)
            route = await channel.route(ECHO, 10)
            await until(lambda: "flaky" in route.endpoints, 10)
            for _ in range(10):
                # retried on the real instance: no call fails
                assert (await echo.Echo(echo_pb2.EchoRequest(), timeout=5)).pid == real.pid
            assert route.breakers["flaky"].state == "open"
            assert route.ejected == {}
            assert [e.instance_id for e in route.available] == [real.instance_id]
            flaky.failing = False
            pids = set()
            deadline = time.monotonic() + 10
            while os.getpid() not in pids and time.monotonic() < deadline:
                pids.add((await echo.Echo(echo_pb2.EchoRequest(), timeout=5)).pid)
                await asyncio.sleep(0.05)
            assert os.getpid() in pids  # the flaky server (in this process) answered
            assert route.breakers["flaky"].state == "closed"
    finally:
        await kernel.routing.registry.delete("flaky")
        await server.stop(None)


async def test_an_unreachable_instance_is_ejected_until_its_channel_connects(hsu_kernel_factory):
    """A listed instance nothing serves: its first call (retried on the real
    instance) ejects it, and no call goes there while nothing listens. Once
    something serves its address, the channel connects and calls reach it,
    with no call failing in between."""
    kernel = await hsu_kernel_factory(
        {"units": {"echo": echo_unit(start="at-start", routing={"idempotent": ["Echo"]})}}
    )
    [real] = ready(kernel)
    port = free_port()
    await kernel.routing.registry.put(Endpoint("ghost", "echo", f"127.0.0.1:{port}", (ECHO,)))
    async with hsu.connect(kernel.control_address) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        route = await channel.route(ECHO, 10)
        await until(lambda: "ghost" in route.endpoints, 10)
        for _ in range(10):
            assert (await echo.Echo(echo_pb2.EchoRequest(), timeout=5)).pid == real.pid
        assert route.is_ejected(route.endpoints["ghost"])
        assert route.breakers["ghost"].state == "closed"  # one failure, then no call
        assert [e.instance_id for e in route.available] == [real.instance_id]
        env = {**os.environ, "HSU_LISTEN": f"127.0.0.1:{port}"}
        for key in ("HSU_KERNEL_ADDRESS", "HSU_CONTROL", "HSU_INSTANCE_ID", "HSU_UNIT"):
            env.pop(key, None)
        ghost = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hsu_echo", env=env, stderr=subprocess.DEVNULL
        )
        try:
            pids = set()
            deadline = time.monotonic() + 20
            while ghost.pid not in pids and time.monotonic() < deadline:
                pids.add((await echo.Echo(echo_pb2.EchoRequest(), timeout=5)).pid)
                await asyncio.sleep(0.05)
            assert ghost.pid in pids
            assert route.ejected == {}
        finally:
            ghost.terminate()
            await asyncio.wait_for(ghost.wait(), 10)
    await kernel.routing.registry.delete("ghost")


# -- the gateway ------------------------------------------------------------------------


def test_a_client_with_only_the_proto_calls_through_the_gateway(tmp_path, kernel_process):
    from conftest import write_deployment

    deployment = write_deployment(
        tmp_path / "d.yaml",
        f"""
        units:
          echo:
            command: [python, -m, hsu_echo]
            interfaces: [{ECHO}]
            startup_timeout: 20
        """,
    )
    kernel = kernel_process(deployment)
    kernel.wait_ready()
    gen = tmp_path / "gen"
    gen.mkdir()
    # only the .proto, compiled here: the client below cannot import hsu
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'contrib/hsu-echo/proto'}",
         f"--python_out={gen}", f"--grpc_python_out={gen}", "hsu_echo/v1/echo.proto"],
        check=True,
    )  # fmt: skip
    client = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if "kernel" not in p and "plugins" not in p
                    and "hsu-echo" not in p]
        sys.path.insert(0, {str(gen)!r})
        try:
            import hsu.client.aio
        except ImportError:
            pass
        else:
            sys.exit("the hsu library is importable: the test proves nothing")
        import grpc
        from hsu_echo.v1 import echo_pb2, echo_pb2_grpc
        with grpc.insecure_channel({kernel.data!r}) as ch:
            stub = echo_pb2_grpc.EchoStub(ch)
            r = stub.Echo(echo_pb2.EchoRequest(message="plain"), timeout=30)
            print("unary", r.message, r.instance_id)
            s = [x.message for x in stub.EchoStream(
                echo_pb2.EchoStreamRequest(message="s", count=2), timeout=10)]
            print("stream", *s)
            c = stub.Collect(iter([echo_pb2.EchoRequest(message=m) for m in "xyz"]), timeout=10)
            print("collect", c.message)
        """
    )
    # a bare environment: only grpcio and protobuf are needed
    env = {"PATH": os.environ["PATH"], "PYTHONNOUSERSITE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", client], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("unary plain echo-")
    assert lines[1:] == ["stream s 0 s 1", "collect x y z"]
    instance = lines[0].split()[-1]
    # the CLI shows where it went
    shown = run_hsu("endpoints", ECHO, "--address", kernel.address)
    assert shown.returncode == 0, shown.stderr
    assert f"{ECHO}: unit echo, balancer round_robin" in shown.stdout
    assert instance in shown.stdout and "serving" in shown.stdout
    missing = run_hsu("endpoints", "nope.v1.Nope", "--address", kernel.address)
    assert missing.returncode == 1
    assert "no unit serves interface 'nope.v1.Nope'" in missing.stderr
    code, _, err = kernel.stop()
    assert code == 0, err


# -- drain and autoscaling --------------------------------------------------------------------


async def test_stopping_an_instance_lets_its_calls_in_flight_finish(hsu_kernel_factory):
    kernel = await hsu_kernel_factory({"units": {"echo": echo_unit(start="at-start")}})
    [inst] = ready(kernel)
    async with hsu.connect(kernel.control_address) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        slow = asyncio.ensure_future(
            echo.Echo(echo_pb2.EchoRequest(message="slow", delay_ms=1500), timeout=20)
        )
        await until(lambda: kernel.routing.load(inst.instance_id) == 1, 10)
        began = time.monotonic()
        await kernel.stop_unit("echo")
        reply = await slow
        assert reply.message == "slow" and reply.pid == inst.pid
        assert time.monotonic() - began >= 1.0  # the stop waited for it
    assert inst.state is hsu.InstanceState.STOPPED


async def test_load_scales_a_unit_up_and_quiet_scales_it_back_down(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "echo": echo_unit(
                    start="at-start",
                    min_instances=1,
                    max_instances=3,
                    routing={
                        "balancer": "least_inflight",
                        "autoscale": {"above": 3, "below": 0.5, "cooldown": 0.5, "interval": 0.2},
                    },
                )
            }
        }
    )
    assert len(ready(kernel)) == 1
    sizes = []
    async with hsu.connect(kernel.control_address) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)

        async def busy():
            # bounded: at most 12 s of 8 concurrent slow calls
            stop_at = time.monotonic() + 12
            while time.monotonic() < stop_at and len(ready(kernel)) < 3:
                await asyncio.gather(
                    *(echo.Echo(echo_pb2.EchoRequest(delay_ms=300), timeout=10) for _ in range(8))
                )
                sizes.append(len(ready(kernel)))

        await busy()
    assert max(sizes) == 3
    await until(lambda: len(kernel.units["echo"].wanted) == 1, 20)
    assert len(ready(kernel)) == 1


async def test_the_gateway_learns_method_kinds_from_reflection(hsu_kernel_factory):
    kernel = await hsu_kernel_factory({"units": {"echo": echo_unit(start="at-start")}})
    gateway = kernel.plugin(gateway_python.PLANE)
    assert gateway is not None and not gateway.kinds
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        assert (await echo.Echo(echo_pb2.EchoRequest(message="1"), timeout=10)).message == "1"
        await until(lambda: len(gateway.kinds) == 3, 10)
        assert gateway.kinds == {
            f"/{ECHO}/Echo": (False, False),
            f"/{ECHO}/EchoStream": (False, True),
            f"/{ECHO}/Collect": (True, False),
        }
        # now on the unary and server-streaming paths
        assert (await echo.Echo(echo_pb2.EchoRequest(message="2"), timeout=10)).message == "2"
        stream = echo.EchoStream(echo_pb2.EchoStreamRequest(message="s", count=2), timeout=10)
        assert [r.message async for r in stream] == ["s 0", "s 1"]
        assert set(gateway._handlers) == {f"/{ECHO}/Echo", f"/{ECHO}/EchoStream"}
    # the instance goes: so does the gateway's channel to it
    [inst] = ready(kernel)
    assert inst.address in gateway._channels
    await kernel.stop_unit("echo")
    await until(lambda: inst.address not in gateway._channels, 10)


async def test_a_reload_changes_routing_live_and_rejects_a_bad_balancer(
    hsu_kernel_factory, tmp_path
):
    from hsu._kernel.config.model import deployment_from_dict

    def raw(routing):
        return {"units": {"echo": echo_unit(start="at-start", routing=routing)}}

    kernel = await hsu_kernel_factory(raw({"balancer": "round_robin"}))
    [inst] = ready(kernel)
    route = kernel.routing.route(ECHO)
    assert route.policy.balancer == "round_robin"
    changes = await kernel.reload(
        deployment_from_dict(
            raw({"balancer": "p2c", "idempotent": ["Echo"]}), base_dir=str(tmp_path)
        )
    )
    assert changes.changed == ("echo",) and changes.restarted == ()
    assert route.policy.balancer == "p2c" and route.policy.is_idempotent(f"/{ECHO}/Echo")
    assert type(route.balancer).__name__ == "PowerOfTwoChoices"
    assert ready(kernel) == [inst]  # a routing change restarts nothing
    with pytest.raises(ConfigError, match="no balancer named 'nope'"):
        await kernel.reload(deployment_from_dict(raw({"balancer": "nope"}), base_dir=str(tmp_path)))
    assert route.policy.balancer == "p2c"


async def test_the_kernel_uses_the_registry_its_deployment_names_and_empties_it_on_stop():
    from hsu_plugins.routing.registry_memory import MemoryRegistry

    class Recording(MemoryRegistry):
        def __init__(self):
            super().__init__()
            self.ops = []

        async def put(self, endpoint, ttl=None):
            self.ops.append(("put", endpoint.instance_id, endpoint.state))
            await super().put(endpoint, ttl)

        async def delete(self, instance_id):
            self.ops.append(("delete", instance_id))
            return await super().delete(instance_id)

    made = []

    class Plugin:
        @hsu.hookimpl
        def hsu_register_registries(self, register):
            register("recording", lambda kernel: made.append(Recording()) or made[-1])

    kernel = build_kernel(
        {"kernel": {"registry": "recording"}, "units": {"echo": echo_unit(start="at-start")}},
        plugins=[Plugin()],
    )
    await kernel.start()
    try:
        [registry] = made
        [inst] = ready(kernel)
        await kernel.routing.flush()
        assert registry.ops == [("put", inst.instance_id, "serving")]
        assert [e.instance_id for e in await registry.lookup(ECHO)] == [inst.instance_id]
    finally:
        await kernel.stop()
    # draining, then gone: nothing is left listed by a kernel that stopped
    assert registry.ops[1:] == [("put", inst.instance_id, "draining"), ("delete", inst.instance_id)]
    assert (await registry.snapshot())[0] == []


# -- the blocking client --------------------------------------------------------------


async def test_the_blocking_client_routes_streams_and_fails_over_from_threads(hsu_kernel_factory):
    import concurrent.futures

    kernel = await hsu_kernel_factory(
        {
            "units": {
                "echo": echo_unit(
                    min_instances=0,
                    max_instances=3,
                    routing={"idempotent": ["Echo"]},
                    restart={"backoff": {"reset_after": 0.5}},
                )
            }
        }
    )
    from hsu_echo.v1 import echo_pb2_grpc as sync_stubs  # the same module: plain stubs too

    def first_calls(channel):
        echo = sync_stubs.EchoStub(channel)
        first = echo.Echo(echo_pb2.EchoRequest(message="sync"), timeout=30)
        streamed = [
            r.message
            for r in echo.EchoStream(echo_pb2.EchoStreamRequest(message="s", count=2), timeout=5)
        ]
        collected = echo.Collect(iter([echo_pb2.EchoRequest(message=m) for m in "ab"]), timeout=5)
        try:
            channel.unary_unary("/nope.v1.Nope/Call")(b"", timeout=5)
        except grpc.RpcError as exc:
            missing = (exc.code(), exc.details())
        return first, streamed, collected.message, missing

    channel = hsu.connect_sync(kernel.control_address)
    try:
        first, streamed, collected, missing = await asyncio.to_thread(first_calls, channel)
        assert first.message == "sync" and first.pid == ready(kernel)[0].pid  # started on demand
        assert streamed == ["s 0", "s 1"] and collected == "a b"
        assert missing[0] is grpc.StatusCode.UNIMPLEMENTED
        assert "no unit serves interface 'nope.v1.Nope'" in missing[1]

        await kernel.scale("echo", 3)
        echo = sync_stubs.EchoStub(channel)
        await until(lambda: len(channel._routes[ECHO].available) == 3, 10)

        stop = threading.Event()

        def worker(give_up_at):
            ok, failed, pids = 0, [], set()
            while not stop.is_set() and time.monotonic() < give_up_at and ok < 5000:  # bounded
                try:
                    pids.add(echo.Echo(echo_pb2.EchoRequest(delay_ms=10), timeout=10).pid)
                    ok += 1
                except grpc.RpcError as exc:
                    failed.append(f"{exc.code().name}: {exc.details()}")
            return ok, failed, pids

        give_up_at = time.monotonic() + 30.0
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [loop.run_in_executor(pool, worker, give_up_at) for _ in range(6)]
            try:
                await asyncio.sleep(1.0)
                before = {i.pid for i in ready(kernel)}
                victim = ready(kernel)[0].pid
                os.kill(victim, signal.SIGKILL)
                # calls go on until the replacement has been ready a moment
                # (however slow a loaded machine makes its start)
                await until(lambda: bool({i.pid for i in ready(kernel)} - before), 20)
                await asyncio.sleep(1.0)
            finally:
                stop.set()
            results = await asyncio.gather(*futures)
    finally:
        await asyncio.to_thread(channel.close)
    failed = [f for _, fs, _ in results for f in fs]
    pids = set().union(*(p for _, _, p in results))
    assert failed == []
    assert sum(ok for ok, _, _ in results) > 100
    assert victim in pids and len(pids) >= 4  # the killed one answered, then its replacement
