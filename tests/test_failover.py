"""Failover that holds under sustained kills, end to end: idempotent calls
through ``hsu.connect``, ``hsu.connect_sync`` and the gateway while one of 4
echo instances is SIGKILLed every 300 ms; an instance replaced on the same
fixed address; and the call loop's waiting, ejection and breaker bookkeeping
on a route of its own."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import random
import signal
import socket
import threading
import time

import grpc
import psutil
import pytest

import hsu
from conftest import until
from hsu.client.route import Caller, Policy, Route, Tries, unavailable
from hsu.ports import Endpoint
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

pytestmark = pytest.mark.integration

ECHO = "hsu.echo.v1.Echo"
#: calls per caller (the issue's 5,000), this many at a time, each held this
#: long by the instance: a phase takes 4-15 s on 2 busy cores
CALLS = 5000
IN_FLIGHT = 16
HOLD_MS = 5
KILL_EVERY = 0.3
#: a phase that takes longer than this fails (it would hang, not fail over);
#: under pytest-timeout's 120 s, and far above the 4-15 s of a busy machine
#: (a machine running eight suites at once took over 45 s)
PHASE_TIMEOUT = 100.0


def echo_unit(**more) -> dict:
    unit = {
        "command": ["python", "-m", "hsu_echo"],
        "interfaces": [ECHO],
        "startup_timeout": 20,
        "stop_grace": 5,
        "routing": {"idempotent": ["Echo"]},
        # every kill restarts the instance at once: this is about routing,
        # not the restart policy (whose crash-loop breaker kills would trip)
        "restart": {
            "backoff": {"initial": 0.05, "max": 0.2, "reset_after": 0.5},
            "crash_loop": {"max_failures": 100_000, "window": 1},
        },
    }
    unit.update(more)
    return unit


def ready(kernel, unit: str = "echo") -> list:
    return [
        i
        for i in kernel.instances.values()
        if i.unit == unit and i.state is hsu.InstanceState.READY and i.pid
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Killer:
    """SIGKILLs a random ready instance (a real pid from ``kernel.instances``)
    every ``every`` seconds, on the kernel's loop, until stopped."""

    def __init__(self, kernel, every: float = KILL_EVERY):
        self.kernel = kernel
        self.every = every
        self.killed: list[int] = []
        self.seen: set[int] = set()
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())
        self._rng = random.Random(14)

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.every)
                return
            except TimeoutError:
                pass
            self.seen.update(i.pid for i in self.kernel.instances.values() if i.pid)
            victims = ready(self.kernel)
            if victims:
                victim = self._rng.choice(victims)
                os.kill(victim.pid, signal.SIGKILL)
                self.killed.append(victim.pid)

    async def stop(self) -> None:
        self._stop.set()
        await self._task


class Tally:
    """Outcomes of a phase's calls, from tasks or threads."""

    def __init__(self, calls: int):
        self.left = calls
        self.ok = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self.pids: set[int] = set()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            self.left -= 1
            return self.left >= 0

    def answered(self, reply) -> None:
        with self.lock:
            self.ok += 1
            self.pids.add(reply.pid)

    def error(self, exc: BaseException) -> None:
        code = getattr(exc, "code", None)
        what = f"{code().name}: {exc.details()}" if callable(code) else repr(exc)
        with self.lock:
            self.failed[what] += 1


REQUEST = echo_pb2.EchoRequest(message="failover", delay_ms=HOLD_MS)


async def load_async(channel, tally: Tally) -> None:
    echo = echo_pb2_grpc.EchoStub(channel)

    async def worker() -> None:
        while tally.take():
            try:
                tally.answered(await echo.Echo(REQUEST, timeout=10))
            except (grpc.RpcError, grpc.aio.UsageError) as exc:
                tally.error(exc)

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))


async def load_threads(channel, tally: Tally) -> None:
    echo = echo_pb2_grpc.EchoStub(channel)

    def worker() -> None:
        while tally.take():
            try:
                tally.answered(echo.Echo(REQUEST, timeout=10))
            except (grpc.RpcError, ValueError) as exc:
                tally.error(exc)

    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, worker) for _ in range(IN_FLIGHT)))


@pytest.mark.parametrize("caller", ["connect", "connect_sync", "gateway"])
async def test_no_idempotent_call_fails_while_an_instance_is_killed_every_300_ms(
    hsu_kernel_factory, caller
):
    """5,000 calls, 16 in flight, one of 4 instances SIGKILLed every 300 ms
    (about one kill per 15 calls): hsu.connect, hsu.connect_sync and a plain
    grpcio client through the gateway (no retry policy of its own) each get
    every reply. Killed instances' calls go to live ones; calls arriving
    while no instance is up wait for the next one within their deadline."""
    kernel = await hsu_kernel_factory(
        {"units": {"echo": echo_unit(start="at-start", min_instances=1, max_instances=4)}}
    )
    await kernel.scale("echo", 4)
    await until(lambda: len(ready(kernel)) == 4, 30)
    tally = Tally(CALLS)
    if caller == "connect":
        channel = hsu.connect(kernel.control_address)
        load = load_async(channel, tally)
    elif caller == "connect_sync":
        channel = hsu.connect_sync(kernel.control_address)
        load = load_threads(channel, tally)
    else:
        channel = grpc.aio.insecure_channel(kernel.address)
        load = load_async(channel, tally)
    killer = Killer(kernel)
    started = time.monotonic()
    try:
        await asyncio.wait_for(load, PHASE_TIMEOUT)
    finally:
        await killer.stop()
        closed = channel.close()
        if asyncio.iscoroutine(closed):
            await closed
    took = time.monotonic() - started
    assert (tally.ok, dict(tally.failed)) == (CALLS, {})
    # the kills happened during the calls, and replacements answered
    assert len(killer.killed) >= min(5, took / KILL_EVERY / 2), killer.killed
    assert len(tally.pids) > 4, tally.pids
    await kernel.stop("test finished")
    assert not [p for p in killer.seen if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_an_instance_replaced_on_its_fixed_address_gets_a_new_channel(hsu_kernel_factory):
    """The instance listens on a fixed address. Each time it is killed the
    registry drops it (its channel is closed) and the kernel starts another
    on the same address: calls through hsu.connect and hsu.connect_sync go on
    to it over a new channel, never the closed one (no "Channel is closed"
    usage error, no failed call)."""
    address = f"127.0.0.1:{free_port()}"
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "echo": echo_unit(start="at-start", env={"HSU_LISTEN": address}, min_instances=1)
            }
        }
    )
    [first] = ready(kernel)
    assert first.address == address
    aio_channel = hsu.connect(kernel.control_address)
    sync_channel = hsu.connect_sync(kernel.control_address)
    aio_echo = echo_pb2_grpc.EchoStub(aio_channel)
    sync_echo = echo_pb2_grpc.EchoStub(sync_channel)
    request = echo_pb2.EchoRequest(message="same address")
    stop = threading.Event()
    sync_tally, aio_tally = Tally(10**9), Tally(10**9)

    def sync_calls() -> None:
        while not stop.is_set():
            try:
                sync_tally.answered(sync_echo.Echo(request, timeout=10))
            except (grpc.RpcError, ValueError) as exc:
                sync_tally.error(exc)
            time.sleep(0.005)

    async def aio_calls() -> None:
        while not stop.is_set():
            try:
                aio_tally.answered(await aio_echo.Echo(request, timeout=10))
            except (grpc.RpcError, grpc.aio.UsageError) as exc:
                aio_tally.error(exc)
            await asyncio.sleep(0.005)

    thread = threading.Thread(target=sync_calls)
    thread.start()
    calls = asyncio.ensure_future(aio_calls())
    #: the channel each instance was reached over (kept, so no id is reused)
    channels: dict[str, list] = {"aio": [], "sync": []}
    pids = [first.pid]
    try:
        for _ in range(3):
            await until(lambda: {pids[-1]} <= aio_tally.pids & sync_tally.pids, 20)
            channels["aio"].append(aio_channel.channel_of(address))
            channels["sync"].append(sync_channel.channel_of(address))
            os.kill(pids[-1], signal.SIGKILL)
            await until(lambda: ready(kernel) and ready(kernel)[0].pid != pids[-1], 20)
            [inst] = ready(kernel)
            assert inst.address == address
            pids.append(inst.pid)
        await until(lambda: {pids[-1]} <= aio_tally.pids & sync_tally.pids, 20)
        channels["aio"].append(aio_channel.channel_of(address))
        channels["sync"].append(sync_channel.channel_of(address))
    finally:
        stop.set()
        await calls
        await asyncio.to_thread(thread.join)
        await aio_channel.close()
        await asyncio.to_thread(sync_channel.close)
    assert aio_tally.failed == {} and sync_tally.failed == {}
    assert set(pids) <= aio_tally.pids and set(pids) <= sync_tally.pids
    # each replacement was reached over a channel of its own
    assert len({id(c) for c in channels["aio"]}) == len({id(c) for c in channels["sync"]}) == 4


# -- the call loop on a route of its own --------------------------------------------------


def _route(plugins, breaker_options=None, **policy) -> Route:
    route = Route(
        ECHO,
        Policy(
            unit="echo",
            breaker="consecutive",
            breaker_options=breaker_options or {"failures": 1, "cooldown": 0.3},
            idempotent=("Echo",),
            **policy,
        ),
        plugins,
    )
    route.replace(Endpoint(f"echo-{i}", "echo", f"127.0.0.1:{9000 + i}", (ECHO,)) for i in (1, 2))
    return route


def _unavailable_from(ep: Endpoint) -> grpc.aio.AioRpcError:
    return unavailable(f"{ep.instance_id} is busy")


async def _nothing_to_start(route: Route, left: float | None) -> Route:
    raise AssertionError("the route lists serving instances: nothing is started")


async def test_a_call_waits_for_a_breaker_to_half_open_rather_than_failing(
    hsu_plugin_manager,
):
    """Every instance's breaker is open: the call does not fail at once
    ("every one's circuit breaker is open"); it waits, within its deadline,
    until the first cooldown ends and the half-open instance takes it."""
    route = _route(hsu_plugin_manager)
    caller = Caller(lambda r: unavailable("no instance"))
    for ep in route.available:
        route.breaker(ep.instance_id).allow()
        route.end(ep, False)
    assert route.available == ()
    tries = Tries(caller, route, f"/{ECHO}/Echo", None, deadline=time.monotonic() + 5, retries=True)

    async def attempt(ep: Endpoint) -> str:
        return ep.instance_id

    started = time.monotonic()
    answered = await tries.call_async(attempt, _nothing_to_start)
    waited = time.monotonic() - started
    assert answered in ("echo-1", "echo-2")
    assert 0.2 < waited < 2.0  # the cooldown (0.3 s), not the deadline (5 s)
    # with no time for that, it fails with UNAVAILABLE
    for ep in route.available:
        route.breaker(ep.instance_id).allow()
        route.end(ep, False)
    late = Tries(
        caller, route, f"/{ECHO}/Echo", None, deadline=time.monotonic() + 0.05, retries=True
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await late.call_async(attempt, _nothing_to_start)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_a_call_waits_for_the_registry_to_list_a_new_instance(hsu_plugin_manager):
    """Both listed instances are ejected (unreachable): the call waits for
    the route to change and takes the instance the registry lists next."""
    route = _route(hsu_plugin_manager)
    for ep in list(route.available):
        assert route.eject(ep)
    assert route.available == ()
    caller = Caller(lambda r: unavailable("no instance"))
    tries = Tries(caller, route, f"/{ECHO}/Echo", None, deadline=time.monotonic() + 5, retries=True)
    fresh = Endpoint("echo-3", "echo", "127.0.0.1:9003", (ECHO,))
    asyncio.get_running_loop().call_later(0.1, route.put, fresh)

    async def attempt(ep: Endpoint) -> str:
        return ep.instance_id

    assert await tries.call_async(attempt, _nothing_to_start) == "echo-3"


async def test_an_unreachable_instance_is_ejected_and_costs_no_attempt(hsu_plugin_manager):
    """A try on an instance the caller could not reach ejects it at once and
    goes elsewhere without counting against max_attempts or the budget; one
    the instance answered UNAVAILABLE counts, and opens no breaker below its
    threshold."""
    route = _route(hsu_plugin_manager, {"failures": 5}, max_attempts=1, retry_budget=0.0,
                   retry_min_per_second=0.0)  # fmt: skip
    route.budget.tokens = 0.0
    down = "echo-1"
    caller = Caller(
        lambda r: unavailable("no instance"),
        connected=lambda ep: ep.instance_id != down,
    )
    tried = []

    async def attempt(ep: Endpoint) -> str:
        tried.append(ep.instance_id)
        if ep.instance_id == down:
            raise unavailable("failed to connect")
        return ep.instance_id

    for _ in range(4):
        tries = Tries(caller, route, f"/{ECHO}/Echo", None, deadline=None, retries=True)
        assert await tries.call_async(attempt, _nothing_to_start) == "echo-2"
    assert tried.count(down) == 1  # ejected after its first failure
    assert route.is_ejected(route.endpoints[down])
    assert [e.instance_id for e in route.available] == ["echo-2"]
    # the registry lists the instance at another address: a fresh start
    route.put(Endpoint(down, "echo", "127.0.0.1:9011", (ECHO,)))
    assert down not in route.ejected and down not in route.breakers
    # an UNAVAILABLE the (connected) instance answered costs the attempt:
    # with max_attempts 1 and no budget it is not retried
    down = ""

    async def busy(ep: Endpoint) -> str:
        raise _unavailable_from(ep)

    tries = Tries(caller, route, f"/{ECHO}/Echo", None, deadline=None, retries=True)
    with pytest.raises(grpc.aio.AioRpcError):
        await tries.call_async(busy, _nothing_to_start)
    assert tries.attempts == 1 and tries.unreachable == 0
    assert route.ejected == {}


def test_outcomes_of_a_replaced_instance_do_not_reach_its_successors_breaker(
    hsu_plugin_manager,
):
    """The registry drops an instance while calls on it are in flight and
    lists a new one in its slot (same id): the old calls' failures go to the
    old breaker, and the successor starts closed."""
    route = _route(hsu_plugin_manager, {"failures": 1, "cooldown": 30})
    old = route.endpoints["echo-1"]
    route.breaker("echo-1").allow()
    breakers = [route.begin(old) for _ in range(3)]
    route.delete("echo-1")
    successor = Endpoint("echo-1", "echo", old.address, (ECHO,))
    route.put(successor)
    assert route.pick(exclude="echo-2") is successor
    fresh = route.breakers["echo-1"]
    for b in breakers:
        route.end(old, False, b)
    assert fresh.state == "closed"
    assert successor in route.available
    # nor does an unreachable outcome of the old one eject the successor... at
    # another address
    moved = Endpoint("echo-1", "echo", "127.0.0.1:9999", (ECHO,))
    route.put(moved)
    assert not route.end(successor, False, fresh, unreachable=float("inf"))
    assert moved in route.available
