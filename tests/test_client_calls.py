"""Routed stubs' call objects behave like grpcio's: hsu.connect's return
grpc.aio call objects, hsu.connect_sync's offer with_call and future; all
of them against a real kernel and a real HSU (tests/hsu_calls.py), and
failover through them the same as through plain calls."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path

import grpc
import pytest

import hsu
from conftest import until
from hsu.ports import Endpoint
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

pytestmark = pytest.mark.integration

ECHO = "hsu.echo.v1.Echo"
CALLS = str(Path(__file__).with_name("hsu_calls.py"))


def calls_unit(**more) -> dict:
    unit = {
        "command": [sys.executable, CALLS],
        "interfaces": [ECHO],
        "start": "at-start",
        "startup_timeout": 20,
        "stop_grace": 5,
    }
    unit.update(more)
    return unit


async def _count(echo, question: str) -> int:
    """The HSU's own count (``busy?``, ``cancelled?``), asked through the route."""
    return int((await echo.Echo(echo_pb2.EchoRequest(message=question), timeout=10)).message)


def _count_sync(echo, question: str) -> int:
    return int(echo.Echo(echo_pb2.EchoRequest(message=question), timeout=10).message)


async def _until_count(echo, question: str, n: int) -> None:
    for _ in range(200):  # bounded: 200 round trips, 10 s of pauses at most
        if await _count(echo, question) == n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{question} never answered {n}")


# -- hsu.connect: grpc.aio call objects ----------------------------------------------


async def test_a_unary_call_object_carries_metadata_code_and_callbacks(hsu_kernel_factory):
    kernel = await hsu_kernel_factory({"units": {"calls": calls_unit()}})
    async with hsu.connect(kernel.control_address) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        call = echo.Echo(
            echo_pb2.EchoRequest(message="hi"), metadata=(("x-echo", "round trip"),), timeout=30
        )
        assert isinstance(call, grpc.aio.UnaryUnaryCall)
        ended = []
        call.add_done_callback(ended.append)
        reply = await call
        assert reply.message == "hi"
        assert call.done() and not call.cancelled()
        assert ("x-seen", "round trip") in tuple(await call.initial_metadata())
        assert ("x-trailer", "done") in tuple(await call.trailing_metadata())
        assert await call.code() is grpc.StatusCode.OK
        await asyncio.sleep(0)  # done callbacks run soon after the end
        assert ended == [call]

        failing = echo.Echo(echo_pb2.EchoRequest(message="fail"), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await failing
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert await failing.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert await failing.details() == "told to fail"
        assert ("x-trailer", "failed") in tuple(await failing.trailing_metadata())

        # a call no unit serves: its code, and empty metadata
        missing = channel.unary_unary("/nope.v1.Nope/Call")(b"", timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await missing
        assert await missing.code() is grpc.StatusCode.UNIMPLEMENTED
        assert tuple(await missing.initial_metadata()) == ()

        # a client stream written with write() and done_writing()
        collect = echo.Collect(timeout=10)
        assert isinstance(collect, grpc.aio.StreamUnaryCall)
        for part in ("a", "b"):
            await collect.write(echo_pb2.EchoRequest(message=part))
        await collect.done_writing()
        assert (await collect).message == "a b"


async def test_a_streaming_call_object_reads_metadata_before_its_replies(hsu_kernel_factory):
    kernel = await hsu_kernel_factory({"units": {"calls": calls_unit()}})
    async with hsu.connect(kernel.control_address) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        call = echo.EchoStream(
            echo_pb2.EchoStreamRequest(message="s", count=3),
            metadata=(("x-echo", "streamed"),),
            timeout=30,
        )
        assert isinstance(call, grpc.aio.UnaryStreamCall)
        # read ahead for the metadata: the first reply is still read below
        assert ("x-seen", "streamed") in tuple(await call.initial_metadata())
        first = await call.read()
        assert first.message == "s 0"
        assert [r.message async for r in call] == ["s 1", "s 2"]
        assert await call.read() is grpc.aio.EOF
        assert call.done()
        assert await call.code() is grpc.StatusCode.OK
        assert ("x-trailer", "done") in tuple(await call.trailing_metadata())


async def test_cancelling_an_in_flight_call_reaches_the_hsu(hsu_kernel_factory):
    kernel = await hsu_kernel_factory({"units": {"calls": calls_unit()}})
    async with hsu.connect(kernel.control_address) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        call = echo.Echo(echo_pb2.EchoRequest(message="slow", delay_ms=60_000), timeout=90)
        await _until_count(echo, "busy?", 1)  # the HSU holds it
        assert call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert call.cancelled() and call.done() and not call.cancel()
        assert await call.code() is grpc.StatusCode.CANCELLED
        await _until_count(echo, "cancelled?", 1)
        assert await _count(echo, "busy?") == 0

        stream = echo.EchoStream(
            echo_pb2.EchoStreamRequest(message="s", count=100, interval_ms=60_000), timeout=90
        )
        assert (await stream.read()).message == "s 0"  # the HSU now waits for the next
        assert stream.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stream.read()
        assert stream.cancelled()
        assert await stream.code() is grpc.StatusCode.CANCELLED
        await _until_count(echo, "cancelled?", 2)


# -- hsu.connect_sync: with_call and future -----------------------------------------


async def test_blocking_stubs_offer_with_call_and_future(hsu_kernel_factory):
    kernel = await hsu_kernel_factory({"units": {"calls": calls_unit()}})

    def calls(channel):
        echo = echo_pb2_grpc.EchoStub(channel)
        out = {}
        reply, call = echo.Echo.with_call(
            echo_pb2.EchoRequest(message="with"), metadata=(("x-echo", "sync"),), timeout=30
        )
        out["with_call"] = (
            reply.message,
            isinstance(call, grpc.Call),
            ("x-seen", "sync") in tuple(call.initial_metadata()),
            ("x-trailer", "done") in tuple(call.trailing_metadata()),
            call.code(),
        )
        future = echo.Echo.future(echo_pb2.EchoRequest(message="later"), timeout=30)
        ended = []
        future.add_done_callback(ended.append)
        out["future"] = (
            isinstance(future, grpc.Future) and isinstance(future, grpc.Call),
            future.result(timeout=30).message,
            future.code(),
            future.exception() is None,
            ended == [future],
        )
        try:
            echo.Echo.with_call(echo_pb2.EchoRequest(message="fail"), timeout=10)
        except grpc.RpcError as exc:
            out["with_call error"] = (exc.code(), exc.details())
        failed = echo.Echo.future(echo_pb2.EchoRequest(message="fail"), timeout=10)
        out["future error"] = (failed.exception(timeout=10).code(), failed.code())

        slow = echo.Echo.future(echo_pb2.EchoRequest(message="slow", delay_ms=60_000), timeout=90)
        for _ in range(200):  # bounded (10 s): until the HSU holds it
            if _count_sync(echo, "busy?") == 1:
                break
            time.sleep(0.05)
        assert not slow.done()
        out["cancel"] = (slow.cancel(), slow.cancelled(), slow.code())
        try:
            slow.result()
        except grpc.FutureCancelledError:
            out["cancelled result"] = "FutureCancelledError"
        for _ in range(200):  # bounded (10 s): until the HSU saw the cancel
            if _count_sync(echo, "cancelled?") == 1:
                break
            time.sleep(0.05)
        out["seen by the HSU"] = _count_sync(echo, "cancelled?")
        return out

    channel = hsu.connect_sync(kernel.control_address)
    try:
        out = await asyncio.to_thread(calls, channel)
    finally:
        await asyncio.to_thread(channel.close)
    ok = grpc.StatusCode.OK
    failed = grpc.StatusCode.FAILED_PRECONDITION
    assert out == {
        "with_call": ("with", True, True, True, ok),
        "future": (True, "later", ok, True, True),
        "with_call error": (failed, "told to fail"),
        "future error": (failed, failed),
        "cancel": (True, True, grpc.StatusCode.CANCELLED),
        "cancelled result": "FutureCancelledError",
        "seen by the HSU": 1,
    }


async def test_a_blocking_stream_is_an_iterator_and_a_grpc_call(hsu_kernel_factory):
    kernel = await hsu_kernel_factory({"units": {"calls": calls_unit()}})

    def calls(channel):
        echo = echo_pb2_grpc.EchoStub(channel)
        out = {}
        stream = echo.EchoStream(
            echo_pb2.EchoStreamRequest(message="s", count=3),
            metadata=(("x-echo", "sync stream"),),
            timeout=30,
        )
        ended = []
        stream.add_callback(lambda: ended.append(True))
        seen = ("x-seen", "sync stream") in tuple(stream.initial_metadata())  # reads ahead
        replies = [r.message for r in stream]
        out["stream"] = (
            isinstance(stream, grpc.Call),
            seen,
            replies,
            stream.code(),
            ("x-trailer", "done") in tuple(stream.trailing_metadata()),
            stream.is_active(),
            ended,
        )
        slow = echo.EchoStream(
            echo_pb2.EchoStreamRequest(message="s", count=100, interval_ms=60_000), timeout=90
        )
        first = next(slow).message  # the HSU now waits to send the next
        try:
            assert slow.cancel()
            next(slow)
        except grpc.RpcError as exc:
            out["cancelled"] = (first, exc.code(), slow.code())
        for _ in range(200):  # bounded (10 s): until the HSU saw the cancel
            if _count_sync(echo, "cancelled?") == 1:
                break
            time.sleep(0.05)
        out["seen by the HSU"] = _count_sync(echo, "cancelled?")
        return out

    channel = hsu.connect_sync(kernel.control_address)
    try:
        out = await asyncio.to_thread(calls, channel)
    finally:
        await asyncio.to_thread(channel.close)
    cancelled = grpc.StatusCode.CANCELLED
    assert out == {
        "stream": (True, True, ["s 0", "s 1", "s 2"], grpc.StatusCode.OK, True, False, [True]),
        "cancelled": ("s 0", cancelled, cancelled),
        "seen by the HSU": 1,
    }


# -- failover through the call objects ------------------------------------------------


async def test_call_objects_fail_over_like_plain_calls(hsu_kernel_factory):
    """With a dead instance listed next to the live one, every form of an
    idempotent call (a grpc.aio call object, with_call, future) is tried
    again on the live one: all answer from it, with its metadata, and the
    dead one is ejected."""
    kernel = await hsu_kernel_factory(
        {"units": {"calls": calls_unit(routing={"idempotent": ["Echo"], "breaker": "none"})}}
    )
    [real] = [i for i in kernel.instances.values() if i.state is hsu.InstanceState.READY]
    registry = kernel.routing.registry
    ghosts = iter(range(100))
    request = echo_pb2.EchoRequest(message="x")
    md = (("x-echo", "failover"),)

    async def new_ghost(route) -> str:
        name = f"ghost-{next(ghosts)}"
        for old in [i for i in route.endpoints if i.startswith("ghost")]:
            await registry.delete(old)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        await registry.put(Endpoint(name, "calls", f"127.0.0.1:{port}", (ECHO,)))
        await until(lambda: set(route.endpoints) == {real.instance_id, name}, 10)
        return name

    seen = {}
    async with hsu.connect(kernel.control_address) as channel:
        route = await channel.route(ECHO, 10)
        ghost = await new_ghost(route)
        echo = echo_pb2_grpc.EchoStub(channel)
        outcomes = set()
        for _ in range(4):
            call = echo.Echo(request, metadata=md, timeout=10)
            reply = await call
            outcomes.add(
                (
                    reply.pid,
                    await call.code(),
                    ("x-seen", "failover") in tuple(await call.initial_metadata()),
                )
            )
        seen["connect"] = (outcomes, set(route.ejected) == {ghost})

    loop = asyncio.get_running_loop()

    def sync_calls(channel, route):
        echo = echo_pb2_grpc.EchoStub(channel)
        out = {}
        for form in ("with_call", "future"):
            ghost = asyncio.run_coroutine_threadsafe(new_ghost(route), loop).result()
            outcomes = set()
            for _ in range(4):
                if form == "with_call":
                    reply, call = echo.Echo.with_call(request, metadata=md, timeout=10)
                else:
                    call = echo.Echo.future(request, metadata=md, timeout=10)
                    reply = call.result()
                outcomes.add(
                    (
                        reply.pid,
                        call.code(),
                        ("x-seen", "failover") in tuple(call.initial_metadata()),
                    )
                )
            out[form] = (outcomes, set(route.ejected) == {ghost})
        return out

    sync_channel = hsu.connect_sync(kernel.control_address)
    try:
        route = await asyncio.to_thread(sync_channel.route, ECHO, 10)
        seen.update(await asyncio.to_thread(sync_calls, sync_channel, route))
    finally:
        await asyncio.to_thread(sync_channel.close)
    expected = ({(real.pid, grpc.StatusCode.OK, True)}, True)
    assert seen == dict.fromkeys(("connect", "with_call", "future"), expected)
