"""The parts of a traced routed call (``hsu.tracecontext.CallTrace``) as the
call loop (``hsu.client.route.Tries``) records them: a pick and an attempt
per try, the retry marked, an unreachable instance, a cold start, a call no
instance could take; and the ``traceparent`` each instance is sent. Real
gRPC on loopback (a fake HSU, and a port nothing listens on) through the
call loop of a route of its own; the end-to-end spans through a kernel are
in contrib/hsu-plugin-otel/tests."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import grpc
import pytest

from hsu.client.route import Caller, Policy, Route, Tries, unavailable
from hsu.ports import Endpoint
from hsu.tracecontext import CallTrace, SpanContext, from_metadata
from hsu_echo.v1 import echo_pb2

ECHO = "hsu.echo.v1.Echo"
METHOD = f"/{ECHO}/Echo"


def _closed_address() -> str:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _route(plugins: Any, *endpoints: Endpoint, **policy: Any) -> Route:
    route = Route(ECHO, Policy(unit="echo", idempotent=("Echo",), **policy), plugins)
    route.replace(endpoints)
    return route


async def _nothing_to_start(route: Route, left: float | None) -> Route:
    raise AssertionError("nothing is started here")


@pytest.mark.integration
async def test_each_try_is_a_pick_and_an_attempt_whose_span_its_instance_is_sent(
    hsu_plugin_manager: Any, hsu_fake_hsu: Any
) -> None:
    """The first instance cannot be reached (ejected; the call waits for
    the registry to list another), the second answers UNAVAILABLE once,
    then OK: three picks, three attempts, the later two retries."""
    fake = await hsu_fake_hsu(ECHO)
    fake.fail("Echo", grpc.StatusCode.UNAVAILABLE, "busy").reply(
        "Echo", echo_pb2.EchoResponse(message="ok")
    )
    dead = Endpoint("echo-dead", "echo", _closed_address(), (ECHO,))
    live = Endpoint("echo-live", "echo", fake.address, (ECHO,))
    route = _route(hsu_plugin_manager, dead)
    span = SpanContext.new().child()
    trace = CallTrace(span)
    tries = Tries(
        Caller(lambda r: unavailable("no instance")),
        route,
        METHOD,
        None,
        deadline=time.monotonic() + 20,
        retries=True,
        trace=trace,
    )
    channels: dict[str, grpc.aio.Channel] = {}
    sent: dict[str, list[SpanContext]] = {}

    async def attempt(ep: Endpoint) -> Any:
        channel = channels.get(ep.address)
        if channel is None:
            channel = channels[ep.address] = grpc.aio.insecure_channel(ep.address)
        metadata = trace.metadata()
        parent = from_metadata(metadata)
        assert parent is not None
        sent.setdefault(ep.instance_id, []).append(parent)
        call = channel.unary_unary(
            METHOD,
            request_serializer=echo_pb2.EchoRequest.SerializeToString,
            response_deserializer=echo_pb2.EchoResponse.FromString,
        )
        return await call(echo_pb2.EchoRequest(message="hi"), timeout=10, metadata=metadata)

    asyncio.get_running_loop().call_later(0.2, route.put, live)
    try:
        reply = await tries.call_async(attempt, _nothing_to_start)
    finally:
        for channel in channels.values():
            await channel.close()
    assert reply.message == "ok"

    parts = trace.spans()
    assert trace.spans() == parts  # the ids drawn once
    assert [p.name for p in parts] == ["hsu.pick", "hsu.attempt"] * 3
    picks, attempts = parts[0::2], parts[1::2]
    assert all(p.parent_id == span.span_id for p in parts)
    assert len({p.span_id for p in parts} | {span.span_id}) == 7
    # one after the other, each pick before its attempt
    ends = [(p.start_ns, p.end_ns) for p in parts]
    assert all(a <= b for a, b in ends)
    assert all(ends[i][1] <= ends[i + 1][0] for i in range(len(ends) - 1))
    assert [p.attributes["hsu.instance"] for p in picks] == ["echo-dead", "echo-live", "echo-live"]
    assert [p.attributes["hsu.attempt"] for p in picks] == [0, 1, 2]
    # the second pick waited for the registry to list the live instance
    assert picks[1].end_ns - picks[1].start_ns >= 100_000_000
    unreached, refused, ok = (p.attributes for p in attempts)
    assert unreached["hsu.instance"] == "echo-dead" and unreached["hsu.unreachable"] is True
    assert unreached["rpc.response.status_code"] == unreached["error.type"] == "UNAVAILABLE"
    assert unreached["hsu.retry"] is False and "hsu.resend_count" not in unreached
    host, _, port = fake.address.rpartition(":")
    assert refused == {
        "hsu.unit": "echo",
        "hsu.instance": "echo-live",
        "server.address": host,
        "server.port": int(port),
        "rpc.response.status_code": "UNAVAILABLE",
        "error.type": "UNAVAILABLE",
        "hsu.retry": True,
        "hsu.resend_count": 1,
    }
    assert ok["rpc.response.status_code"] == "OK" and "error.type" not in ok
    assert ok["hsu.retry"] is True and ok["hsu.resend_count"] == 2
    # each instance was sent its attempt's span (trace and flags the call's)
    assert [s.span_id for s in sent["echo-dead"]] == [attempts[0].span_id]
    assert [s.span_id for s in sent["echo-live"]] == [a.span_id for a in attempts[1:]]
    received = [from_metadata(c.metadata) for c in fake.calls_to("Echo")]
    assert [s.span_id for s in received if s is not None] == [a.span_id for a in attempts[1:]]
    assert {(s.trace_id, s.flags) for s in received if s is not None} == {(span.trace_id, 1)}
    assert trace.attempt is None and trace.metadata() == span.metadata()


async def test_a_cold_start_and_a_streamed_call_are_recorded_once(hsu_plugin_manager: Any) -> None:
    """A retry-free streamed call on a route with no instance: the cold start
    (``ensure`` lists one) inside the first pick, then one attempt, ended
    once although the loop ends it twice (with the call, and with the try)."""
    route = _route(hsu_plugin_manager)
    ep = Endpoint("echo-1", "echo", "127.0.0.1:9", (ECHO,))
    trace = CallTrace(SpanContext.new())
    caller = Caller(lambda r: unavailable("no instance"))
    tries = Tries(caller, route, METHOD, None, deadline=None, retries=False, trace=trace)

    async def ensure(r: Route, left: float | None) -> Route:
        await asyncio.sleep(0.05)
        r.put(ep)
        return r

    async def attempt(_: Endpoint) -> Any:
        yield 1
        yield 2

    assert [r async for r in tries.run_async(attempt, ensure)] == [1, 2]
    cold, pick, tried = trace.spans()
    assert (cold.name, pick.name, tried.name) == ("hsu.cold_start", "hsu.pick", "hsu.attempt")
    assert cold.attributes == {"hsu.unit": "echo", "hsu.interface": ECHO}
    assert pick.start_ns <= cold.start_ns < cold.end_ns <= pick.end_ns <= tried.start_ns
    assert cold.end_ns - cold.start_ns >= 40_000_000
    assert tried.attributes["rpc.response.status_code"] == "OK"
    # a unix socket's path is the server address, with no port
    route = _route(hsu_plugin_manager, Endpoint("echo-2", "echo", "unix:/run/e.sock", (ECHO,)))
    trace = CallTrace(SpanContext.new())
    tries = Tries(caller, route, METHOD, None, deadline=None, retries=False, trace=trace)
    assert [r async for r in tries.run_async(attempt, _nothing_to_start)] == [1, 2]
    tried = trace.spans()[1]
    assert tried.attributes["server.address"] == "unix:/run/e.sock"
    assert "server.port" not in tried.attributes


def test_a_call_no_instance_could_take_ends_its_pick_with_the_error(
    hsu_plugin_manager: Any,
) -> None:
    """Blocking (``Tries.run``): every listed instance's breaker is open
    until past the deadline: the call fails, and its pick says so."""
    ep = Endpoint("echo-1", "echo", "127.0.0.1:9", (ECHO,))
    route = _route(
        hsu_plugin_manager, ep, breaker="consecutive",
        breaker_options={"failures": 1, "cooldown": 60},
    )  # fmt: skip
    route.breaker(ep.instance_id).allow()
    route.end(ep, False)
    trace = CallTrace(SpanContext.new())
    tries = Tries(
        Caller(lambda r: unavailable("no instance")),
        route,
        METHOD,
        None,
        deadline=time.monotonic() + 0.2,
        retries=True,
        trace=trace,
    )
    with pytest.raises(grpc.aio.AioRpcError):
        list(tries.run(lambda e: (1,), lambda r, left: r))
    (pick,) = trace.spans()
    assert pick.name == "hsu.pick"
    assert pick.attributes == {"hsu.attempt": 0, "error.type": "UNAVAILABLE"}
    assert pick.end_ns - pick.start_ns >= 150_000_000


def test_an_untraced_call_loop_records_nothing(hsu_plugin_manager: Any) -> None:
    route = _route(hsu_plugin_manager, Endpoint("echo-1", "echo", "127.0.0.1:9", (ECHO,)))
    tries = Tries(
        Caller(lambda r: unavailable("no instance")), route, METHOD, None,
        deadline=None, retries=True,
    )  # fmt: skip
    assert list(tries.run(lambda e: (e.instance_id,), lambda r, left: r)) == ["echo-1"]
    assert tries.trace is None
