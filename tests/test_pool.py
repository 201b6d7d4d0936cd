"""Worker-pool semantics end to end: ``routing.max_inflight`` per instance,
the unit's queue (priority, FIFO, deadlines, bounds), through every caller
(``hsu.connect``, ``hsu.connect_sync``, the gateway, ``kernel.connect()``),
against real HSUs that count their concurrent calls."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path

import grpc
import pytest

import hsu
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

pytestmark = pytest.mark.integration

ECHO = "hsu.echo.v1.Echo"
COUNTING = str(Path(__file__).with_name("hsu_counting.py"))


def unit(log: Path | None = None, **more: object) -> dict:
    spec: dict = {
        "command": [sys.executable, COUNTING],
        "interfaces": [ECHO],
        "startup_timeout": 20,
        "stop_grace": 5,
    }
    if log is not None:
        spec["env"] = {"HSU_COUNTING_LOG": str(log)}
    spec.update(more)
    return spec


def ready(kernel) -> list:
    return [i for i in kernel.instances.values() if i.state is hsu.InstanceState.READY]


async def call(stub, message: str, delay_ms: int = 0, timeout: float = 30, **kw):
    return await stub.Echo(
        echo_pb2.EchoRequest(message=message, delay_ms=delay_ms), timeout=timeout, **kw
    )


async def test_max_inflight_1_on_2_instances_never_puts_two_calls_on_one(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "pool": unit(
                    min_instances=2, max_instances=2, start="at-start", routing={"max_inflight": 1}
                )
            }
        }
    )
    assert len(ready(kernel)) == 2
    async with hsu.connect(kernel.control_address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        # the HSU fails a call that finds another in flight: every call must pass
        replies = await asyncio.gather(*(call(stub, f"c{i}", 100) for i in range(10)))
    assert sorted(r.message for r in replies) == [f"c{i}" for i in range(10)]
    assert len({r.instance_id for r in replies}) == 2  # both instances worked


async def test_the_limit_is_shared_by_connect_connect_sync_and_the_kernel(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(
        {"units": {"pool": unit(min_instances=1, start="at-start", routing={"max_inflight": 1})}}
    )
    errors: list[BaseException] = []
    done: list[str] = []

    def blocking() -> None:
        try:
            with hsu.connect_sync(kernel.control_address) as ch:
                stub = echo_pb2_grpc.EchoStub(ch)
                for i in range(4):
                    r = stub.Echo(echo_pb2.EchoRequest(message=f"s{i}", delay_ms=50), timeout=30)
                    done.append(r.message)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=blocking)
    thread.start()
    async with hsu.connect(kernel.control_address) as remote, kernel.connect() as local:
        stubs = [echo_pb2_grpc.EchoStub(remote), echo_pb2_grpc.EchoStub(local)]
        replies = await asyncio.gather(*(call(stubs[i % 2], f"a{i}", 50) for i in range(8)))
    await asyncio.to_thread(thread.join, 60)
    assert not errors, errors
    assert done == [f"s{i}" for i in range(4)]
    assert sorted(r.message for r in replies) == sorted(f"a{i}" for i in range(8))


async def test_queued_calls_go_by_priority_then_fifo(hsu_kernel_factory, tmp_path):
    log = tmp_path / "order.log"
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "pool": unit(log, min_instances=1, start="at-start", routing={"max_inflight": 1})
            }
        }
    )
    pool = kernel.routing.pool
    async with hsu.connect(kernel.control_address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        first = asyncio.ensure_future(call(stub, "first", 500))
        for _ in range(200):  # the first holds the only slot
            if pool.held("pool") == 1:
                break
            await asyncio.sleep(0.01)
        assert pool.held("pool") == 1
        queued = []
        for name, prio in [("low1", 0), ("low2", 0), ("high1", 5), ("low3", 0), ("high2", 5)]:
            queued.append(
                asyncio.ensure_future(call(stub, name, 0, metadata=(("hsu-priority", str(prio)),)))
            )
            for _ in range(200):  # each is queued before the next is sent
                if pool.depth("pool") == len(queued):
                    break
                await asyncio.sleep(0.01)
            assert pool.depth("pool") == len(queued)
        await asyncio.gather(first, *queued)
    order = log.read_text().split()
    assert order == ["first", "high1", "high2", "low1", "low2", "low3"]


async def test_a_call_whose_deadline_passes_in_the_queue_is_never_sent(
    hsu_kernel_factory, tmp_path
):
    log = tmp_path / "order.log"
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "pool": unit(log, min_instances=1, start="at-start", routing={"max_inflight": 1})
            }
        }
    )
    async with hsu.connect(kernel.control_address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        busy = asyncio.ensure_future(call(stub, "busy", 1500))
        for _ in range(200):
            if kernel.routing.pool.held("pool") == 1:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(stub, "late", 0, timeout=0.3)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        details = info.value.details() or ""
        assert "'pool'" in details and "max_inflight 1" in details and "queue depth" in details
        await busy
        after = await call(stub, "after", 0)
        assert after.message == "after"
    assert log.read_text().split() == ["busy", "after"]  # "late" never reached it
    assert kernel.routing.pool.depth("pool") == 0


async def test_a_full_queue_is_resource_exhausted_naming_unit_limit_and_depth(
    hsu_kernel_factory,
):
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "pool": unit(
                    min_instances=1,
                    start="at-start",
                    routing={"max_inflight": 1, "queue": {"max": 2}},
                )
            }
        }
    )
    pool = kernel.routing.pool
    async with hsu.connect(kernel.control_address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        held = [asyncio.ensure_future(call(stub, "busy", 800))]
        for name in ("q1", "q2"):
            for _ in range(200):
                if pool.held("pool") == 1 and pool.depth("pool") == len(held) - 1:
                    break
                await asyncio.sleep(0.01)
            held.append(asyncio.ensure_future(call(stub, name, 0)))
        for _ in range(200):
            if pool.depth("pool") == 2:
                break
            await asyncio.sleep(0.01)
        assert pool.depth("pool") == 2
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(stub, "over", 0)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        details = info.value.details() or ""
        assert "'pool'" in details and "max_inflight 1" in details
        assert "queue is full (2 waiting)" in details
        assert [r.message for r in await asyncio.gather(*held)] == ["busy", "q1", "q2"]


async def test_the_gateway_holds_the_same_limit_for_a_plain_grpc_client(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "pool": unit(
                    min_instances=2, max_instances=2, start="at-start", routing={"max_inflight": 1}
                )
            }
        }
    )
    async with grpc.aio.insecure_channel(kernel.address) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        replies = await asyncio.gather(*(call(stub, f"g{i}", 100) for i in range(10)))
        assert sorted(r.message for r in replies) == sorted(f"g{i}" for i in range(10))
        # a queue deadline through the gateway: DEADLINE_EXCEEDED, naming the unit
        busy = [asyncio.ensure_future(call(stub, f"b{i}", 1000)) for i in range(2)]
        for _ in range(200):
            if kernel.routing.pool.held("pool") == 2:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(stub, "late", 0, timeout=0.3)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "'pool'" in (info.value.details() or "")
        await asyncio.gather(*busy)


async def test_a_bad_priority_is_invalid_argument(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(
        {"units": {"pool": unit(min_instances=1, start="at-start", routing={"max_inflight": 1})}}
    )
    async with grpc.aio.insecure_channel(kernel.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(echo_pb2_grpc.EchoStub(ch), "x", metadata=(("hsu-priority", "high"),))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "hsu-priority" in (info.value.details() or "")


needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None and not os.environ.get("HSU_REQUIRE_NGINX"),
    reason="nginx is not installed (apt-get install nginx-light)",
)


@needs_nginx
async def test_through_nginx_a_limited_unit_goes_through_the_kernels_queue(tmp_path):
    from hsu.testing import build_kernel
    from hsu_plugins.gateway import nginx as gateway_nginx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    kernel = build_kernel(
        {
            "units": {
                "pool": unit(
                    min_instances=2, max_instances=2, start="at-start", routing={"max_inflight": 1}
                )
            },
            "gateway_nginx": {"address": address},
        },
        names=["hsu_plugins.gateway.nginx"],
        base_dir=str(tmp_path),
    )
    await kernel.start()
    try:
        plane = kernel.plugin(gateway_nginx.PLANE)
        assert isinstance(plane, gateway_nginx.DataPlane)
        for _ in range(100):  # nginx serves a configuration with both instances seen
            if len(plane.endpoints) == 2 and await plane.serving_generation() == plane.generation:
                break
            await asyncio.sleep(0.05)
        conf = plane.conf.read_text()
        assert "hsu_unit_" not in conf  # no upstream of the unit's own: the kernel's queue
        async with grpc.aio.insecure_channel(address) as ch:
            stub = echo_pb2_grpc.EchoStub(ch)
            replies = await asyncio.gather(*(call(stub, f"n{i}", 100) for i in range(10)))
        assert sorted(r.message for r in replies) == sorted(f"n{i}" for i in range(10))
        assert len({r.pid for r in replies}) == 2
    finally:
        await kernel.stop()


# -- leases ----------------------------------------------------------------------


async def test_a_lease_holds_one_instance_for_its_holder_alone(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(
        {"units": {"pool": unit(min_instances=2, max_instances=2, start="at-start")}}
    )
    async with (
        hsu.connect(kernel.control_address) as channel,
        hsu.lease(channel, ECHO, ttl=10) as leased,
    ):
        mine = leased.instance_id
        assert mine in kernel.instances
        await kernel.routing.flush()
        for _ in range(100):  # the other callers' routes see it leased
            if mine not in {e.instance_id for e in kernel.routing.route(ECHO).available}:
                break
            await asyncio.sleep(0.02)
        stub = echo_pb2_grpc.EchoStub(leased)
        for i in range(3):  # every call through the lease: its one instance
            assert (await call(stub, f"l{i}")).instance_id == mine
        others = echo_pb2_grpc.EchoStub(channel)
        # one at a time: the counting HSU refuses a second call in flight
        routed = [await call(others, f"r{i}") for i in range(10)]
        assert mine not in {r.instance_id for r in routed}  # nobody else's calls go there
        # a second lease gets the other instance; a third waits and times out
        async with hsu.lease(channel, ECHO, ttl=10) as second:
            assert second.instance_id not in (mine, "")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async with hsu.lease(channel, ECHO, ttl=10, timeout=0.3):
                    pass
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "'pool'" in (info.value.details() or "")
    # released: both instances take routed calls again
    assert not kernel.routing.leased
    assert not kernel.routing.pool.leases


async def test_a_lease_not_renewed_expires(hsu_kernel_factory):
    from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc

    kernel = await hsu_kernel_factory({"units": {"pool": unit(min_instances=1, start="at-start")}})
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        api = kernel_pb2_grpc.KernelStub(ch)
        reply = await api.Lease(kernel_pb2.LeaseRequest(interface=ECHO, ttl=0.3), timeout=10)
        assert reply.endpoint.instance_id in kernel.routing.leased
        await api.Renew(kernel_pb2.RenewRequest(lease_id=reply.lease_id), timeout=5)
        for _ in range(100):  # no more renewals: it expires
            if reply.lease_id not in kernel.routing.pool.leases:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await api.Renew(kernel_pb2.RenewRequest(lease_id=reply.lease_id), timeout=5)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert "expired" in (info.value.details() or "")
        assert not kernel.routing.leased  # the instance is routable again
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await api.Lease(kernel_pb2.LeaseRequest(interface=ECHO, ttl=0), timeout=5)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_lease_whose_instance_is_killed_ends_with_an_error(hsu_kernel_factory):
    kernel = await hsu_kernel_factory({"units": {"pool": unit(min_instances=1, start="at-start")}})
    async with hsu.lease(kernel.control_address, ECHO, ttl=10) as leased:
        stub = echo_pb2_grpc.EchoStub(leased)
        first = await call(stub, "before")
        os.kill(first.pid, signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            for _ in range(50):  # until the call meets the dead process
                await call(stub, "after", timeout=5)
                await asyncio.sleep(0.05)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        details = info.value.details() or ""
        assert "lease" in details and first.instance_id in details and "died" in details
        assert leased.error is not None
    # the kernel replaces the instance per its policy; a new lease gets it
    async with hsu.lease(kernel.control_address, ECHO, ttl=10) as again:
        assert (await call(echo_pb2_grpc.EchoStub(again), "new")).pid != first.pid


def test_the_blocking_lease(tmp_path):
    async def main() -> None:
        from hsu.testing import build_kernel

        kernel = build_kernel(
            {"units": {"pool": unit(min_instances=1, start="at-start")}}, base_dir=str(tmp_path)
        )
        await kernel.start()
        try:

            def blocking() -> list[str]:
                with (
                    hsu.connect_sync(kernel.control_address) as ch,
                    hsu.lease_sync(ch, ECHO, ttl=5) as leased,
                ):
                    stub = echo_pb2_grpc.EchoStub(leased)
                    ids = [stub.Echo(echo_pb2.EchoRequest(message="x")).instance_id]
                    ids.append(leased.instance_id)
                    return ids

            ids = await asyncio.to_thread(blocking)
            assert ids[0] == ids[1] != ""
            assert not kernel.routing.pool.leases
        finally:
            await kernel.stop()

    asyncio.run(main())


# -- autoscaling on the queue ------------------------------------------------------


async def test_the_queue_scales_from_zero_up_to_max_instances_and_back_down(hsu_kernel_factory):
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "pool": unit(
                    min_instances=0,
                    max_instances=3,
                    routing={
                        "max_inflight": 1,
                        "autoscale": {"cooldown": 0.5, "interval": 0.1},
                    },
                )
            }
        }
    )
    events: list = []
    kernel.events.listeners.append(events.append)
    assert not kernel.instances  # nothing runs before the first call
    seen_max = 0

    async def watch() -> None:
        nonlocal seen_max
        while True:
            seen_max = max(seen_max, len(kernel.units["pool"].wanted))
            await asyncio.sleep(0.01)

    watcher = asyncio.ensure_future(watch())
    try:
        async with hsu.connect(kernel.control_address) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            first = await call(stub, "first", 0)  # scale from zero on the first queued call
            assert first.message == "first"
            replies = await asyncio.gather(*(call(stub, f"j{i}", 300) for i in range(12)))
            assert len(replies) == 12
            assert len({r.pid for r in replies}) == 3  # it grew to max_instances
        for _ in range(200):  # quiet for the cooldown: back down to one
            if len(kernel.units["pool"].wanted) == 1:
                break
            await asyncio.sleep(0.05)
    finally:
        watcher.cancel()
    assert seen_max == 3  # never beyond max_instances
    assert len(kernel.units["pool"].wanted) == 1
    scale = [e.reason for e in events if e.kind == "scale"]
    assert scale[0].startswith("up: from zero")
    assert any(r.startswith("up: ") and "queued" in r and "-> 3" in r for r in scale), scale
    assert any(r.startswith("down: ") for r in scale), scale
    queue = [e.reason for e in events if e.kind == "queue"]
    assert any(not r.startswith("depth 0") for r in queue) and queue[-1].startswith("depth 0")


async def test_slots_of_a_caller_that_dies_go_back(hsu_kernel_factory, tmp_path):
    kernel = await hsu_kernel_factory(
        {"units": {"pool": unit(min_instances=1, start="at-start", routing={"max_inflight": 1})}}
    )
    script = tmp_path / "holder.py"
    script.write_text(
        "import asyncio, sys\n"
        "import hsu\n"
        "from hsu_echo.v1 import echo_pb2, echo_pb2_grpc\n"
        "async def main():\n"
        "    async with hsu.connect(sys.argv[1]) as ch:\n"
        "        await echo_pb2_grpc.EchoStub(ch).Echo(\n"
        "            echo_pb2.EchoRequest(message='hold', delay_ms=60000), timeout=120)\n"
        "asyncio.run(main())\n"
    )
    holder = await asyncio.create_subprocess_exec(
        sys.executable, str(script), kernel.control_address
    )
    try:
        for _ in range(300):  # the holder's call took the only slot
            if kernel.routing.pool.held("pool") == 1:
                break
            await asyncio.sleep(0.05)
        assert kernel.routing.pool.held("pool") == 1
    finally:
        holder.kill()
        await holder.wait()
    # its Slots stream ended with it: the slot went back, and the next call runs
    async with hsu.connect(kernel.control_address) as channel:
        reply = await call(echo_pb2_grpc.EchoStub(channel), "next", 0, timeout=30)
    assert reply.message == "next"
    # the caller gives its slot back over its Slots stream, just after the reply
    for _ in range(100):
        if kernel.routing.pool.held("pool") == 0:
            break
        await asyncio.sleep(0.05)
    assert kernel.routing.pool.held("pool") == 0


async def test_a_caller_keeps_a_free_slot_for_its_next_call_and_gives_it_back_when_asked(
    hsu_kernel_factory, monkeypatch
):
    """With slots free, a caller's steady calls take no slot from the kernel
    each (its last call's slot is kept for the next); another caller that
    has to wait gets it back at once (Slots' reclaim), not after the linger."""
    import hsu.client.aio as aio

    kernel = await hsu_kernel_factory(
        {"units": {"pool": unit(min_instances=1, start="at-start", routing={"max_inflight": 1})}}
    )
    pool = kernel.routing.pool
    taken = 0
    real = pool.try_acquire

    def counting(*args, **kwargs):
        nonlocal taken
        taken += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pool, "try_acquire", counting)
    # a linger far past the test's deadlines: only a reclaim can free the slot
    monkeypatch.setattr(aio, "SLOT_LINGER", 60.0)
    async with hsu.connect(kernel.control_address) as a, hsu.connect(kernel.control_address) as b:
        stub_a = echo_pb2_grpc.EchoStub(a)
        for i in range(20):
            assert (await call(stub_a, f"a{i}", timeout=10)).message == f"a{i}"
        assert taken <= 2  # the first call's slot served the other 19
        assert pool.held("pool") == 1  # kept by a, between its calls
        # b waits in the queue; the kernel asks a for its slot, a gives it
        reply = await call(echo_pb2_grpc.EchoStub(b), "b", timeout=10)
        assert reply.message == "b"
        # and a, asked, takes a slot from the kernel again for its next call
        before = taken
        assert (await call(stub_a, "a-again", timeout=10)).message == "a-again"
        assert taken > before
