"""``hsu_routed_call``: a plugin is told of each call the kernel's gateway
routed, with the kernel's span of it (docs/hooks.md). A real kernel, a real
echo HSU, real gRPC on loopback."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

import hsu
from conftest import until
from hsu.ports import RoutedCall
from hsu.tracecontext import SpanContext
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

ECHO = "hsu.echo.v1.Echo"
UNIT = {
    "command": ["python", "-m", "hsu_echo"],
    "interfaces": [ECHO],
    "startup_timeout": 20,
    "stop_grace": 5,
    "restart": {"policy": "never"},
}


@pytest.mark.integration
@pytest.mark.parametrize("metrics", [True, False])
async def test_a_plugin_is_told_of_each_routed_call_with_the_kernels_span(
    hsu_kernel_factory: Any, metrics: bool
) -> None:
    told: list[RoutedCall] = []

    class Tracer:
        @staticmethod
        @hsu.hookimpl
        def hsu_routed_call(kernel: Any, call: RoutedCall) -> None:
            told.append(call)

    kernel = await hsu_kernel_factory(
        {"kernel": {"metrics": metrics}, "units": {"echo": UNIT}}, plugins=[Tracer]
    )
    # with kernel.metrics: false the observer is still there, for the plugin
    assert kernel.call_observer is not None
    caller = SpanContext.new()
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        await stub.Echo(echo_pb2.EchoRequest(message="plain"), timeout=20)
        await stub.Echo(
            echo_pb2.EchoRequest(message="traced"), timeout=20, metadata=caller.metadata()
        )
        # (a failed call, traced as well)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(f"/{ECHO}/Nope")(
                b"", timeout=20, metadata=SpanContext.new().metadata()
            )
    # the instance's UNIMPLEMENTED (grpc may turn a stream's early end into
    # INTERNAL on the way, as test_metrics notes)
    assert info.value.code().name in ("UNIMPLEMENTED", "INTERNAL")

    plain, traced, failed = told
    assert plain.span is None and plain.spans == ()
    assert plain.method == f"/{ECHO}/Echo" and plain.unit == "echo" and plain.code == "OK"
    # the kernel's span: a child of the caller's
    span = traced.span
    assert span is not None
    assert span.trace_id == caller.trace_id and span.parent_id == caller.span_id
    assert span.span_id not in (caller.span_id, "0" * 16) and span.sampled
    # its parts: the pick of the (running) instance, then the attempt on it,
    # whose span is the parent the HSU was told of
    pick, attempt = traced.spans
    (instance,) = kernel.instances.values()
    assert (pick.name, attempt.name) == ("hsu.pick", "hsu.attempt")
    assert {pick.parent_id, attempt.parent_id} == {span.span_id}
    assert len({pick.span_id, attempt.span_id, span.span_id}) == 3
    assert traced.start_ns <= pick.start_ns <= pick.end_ns <= attempt.start_ns
    assert attempt.start_ns <= attempt.end_ns <= traced.end_ns
    assert pick.attributes == {
        "hsu.unit": "echo",
        "hsu.instance": instance.instance_id,
        "hsu.attempt": 0,
    }
    host, _, port = instance.address.rpartition(":")
    assert attempt.attributes == {
        "hsu.unit": "echo",
        "hsu.instance": instance.instance_id,
        "server.address": host,
        "server.port": int(port),
        "rpc.response.status_code": "OK",
        "hsu.retry": False,
    }
    (fail_attempt,) = [p for p in failed.spans if p.name == "hsu.attempt"]
    assert fail_attempt.attributes["error.type"] == failed.code
    assert traced.kind in ("unary", "bidi_stream") and traced.code == "OK"
    assert 0 < traced.end_ns - traced.start_ns < 20 * 10**9
    assert traced.start_ns >= plain.end_ns - 10**6
    assert failed.code == info.value.code().name and failed.method == f"/{ECHO}/Nope"
    # counted, or not, beside
    counted = {
        dict(p.labels)["grpc_method"]
        for f in kernel.metrics.collect()
        if f.name == "grpc_server_handled_total"
        for p in f.points
    }
    assert counted == ({"Echo", "Nope"} if metrics else set())


async def test_without_metrics_and_without_the_hook_there_is_no_observer(
    hsu_kernel_factory: Any,
) -> None:
    kernel = await hsu_kernel_factory({"kernel": {"metrics": False}, "units": {}})
    assert kernel.call_observer is None
    await kernel.stop()
    kernel = await hsu_kernel_factory({"units": {}})
    assert kernel.call_observer is not None


def test_a_child_span_names_its_parent() -> None:
    root = SpanContext.new()
    child = root.child()
    assert child.parent_id == root.span_id and child.trace_id == root.trace_id
    # the parent is not carried on the wire: traceparent has trace, span, flags
    assert child.traceparent == f"00-{root.trace_id}-{child.span_id}-01"


@pytest.mark.integration
async def test_trace_sample_starts_traces_for_calls_without_trace_context(
    hsu_kernel_factory: Any, tmp_path: Any
) -> None:
    from hsu._kernel.config.model import deployment_from_dict

    told: list[RoutedCall] = []

    class Tracer:
        @staticmethod
        @hsu.hookimpl
        def hsu_routed_call(kernel: Any, call: RoutedCall) -> None:
            told.append(call)

    raw = {"kernel": {"trace_sample": 1.0}, "units": {"echo": UNIT}}
    kernel = await hsu_kernel_factory(raw, plugins=[Tracer])
    unsampled = SpanContext.new(sampled=False)
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        await stub.Echo(echo_pb2.EchoRequest(message="a"), timeout=20)
        # the caller decided not to sample: the kernel follows it
        await stub.Echo(
            echo_pb2.EchoRequest(message="b"), timeout=20, metadata=unsampled.metadata()
        )
        # a reload turns it off
        raw["kernel"] = {"trace_sample": 0.0}
        await kernel.reload(deployment_from_dict(raw, source="<test>", base_dir=str(tmp_path)))
        await stub.Echo(echo_pb2.EchoRequest(message="c"), timeout=20)
    started, followed, off = told
    # a root the kernel started: no parent, sampled, with its parts (it
    # waited for the on-demand instance)
    assert started.span is not None and started.span.parent_id == "" and started.span.sampled
    names = [p.name for p in started.spans]
    assert names == ["hsu.cold_start", "hsu.pick", "hsu.attempt"]
    cold = started.spans[0]
    assert cold.attributes == {"hsu.unit": "echo", "hsu.interface": ECHO}
    assert started.start_ns <= cold.start_ns < cold.end_ns <= started.spans[1].start_ns
    assert followed.span is not None and followed.span.trace_id == unsampled.trace_id
    assert not followed.span.sampled and followed.spans == ()
    assert off.span is None and off.spans == ()


@pytest.mark.parametrize("value", [1.5, -0.1, "often", True])
def test_a_trace_sample_that_is_no_share_is_refused(value: Any, tmp_path: Any) -> None:
    from hsu.errors import ConfigError
    from hsu.testing import build_kernel

    with pytest.raises(ConfigError, match=r"kernel\.trace_sample: ") as info:
        build_kernel({"kernel": {"trace_sample": value}, "units": {}}, base_dir=str(tmp_path))
    if isinstance(value, float):
        assert "from 0.0 (trace none) to 1.0 (trace every call)" in str(info.value)


@pytest.mark.integration
async def test_a_call_refused_before_any_try_is_counted_and_reported(
    hsu_kernel_factory: Any, tmp_path: Any
) -> None:
    # No unit serves the interface (UNIMPLEMENTED), and a unit whose command
    # exits at once cannot give the call an instance (UNAVAILABLE): the
    # gateway refuses both before any try, and counts and reports them as
    # go-grpc-prometheus counts every handled call, with its code.
    told: list[RoutedCall] = []

    class Tracer:
        @staticmethod
        @hsu.hookimpl
        def hsu_routed_call(kernel: Any, call: RoutedCall) -> None:
            told.append(call)

    broken = {
        **UNIT,
        "command": ["false"],
        "interfaces": ["hsu.test.v1.Broken"],
        "startup_timeout": 2,
        "restart": {"policy": "never"},
    }
    kernel = await hsu_kernel_factory({"units": {"broken": broken}}, plugins=[Tracer])
    caller = SpanContext.new()
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as nowhere:
            await channel.unary_unary("/hsu.test.v1.Nowhere/Call")(b"", timeout=20)
        with pytest.raises(grpc.aio.AioRpcError) as cold:
            await channel.unary_unary("/hsu.test.v1.Broken/Call")(
                b"", timeout=20, metadata=caller.metadata()
            )
    assert nowhere.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert cold.value.code() == grpc.StatusCode.UNAVAILABLE
    # context.abort() sends the status before the gateway's handler goes on
    # to count the call: the client can be told before the kernel has counted
    await until(lambda: len(told) == 2, 10)
    unknown, failed = told
    assert (unknown.method, unknown.unit, unknown.code) == (
        "/hsu.test.v1.Nowhere/Call",
        "",
        "UNIMPLEMENTED",
    )
    assert (failed.method, failed.unit, failed.code) == (
        "/hsu.test.v1.Broken/Call",
        "broken",
        "UNAVAILABLE",
    )
    # the traced one: its cold start, ended with the refusal
    assert failed.span is not None and failed.span.trace_id == caller.trace_id
    (start,) = failed.spans
    assert start.name == "hsu.cold_start"
    assert start.attributes["hsu.unit"] == "broken"
    assert start.attributes["error.type"] == "UNAVAILABLE"
    counted = {
        (labels["grpc_service"], labels["grpc_code"], labels["hsu_unit"])
        for f in kernel.metrics.collect()
        if f.name == "grpc_server_handled_total"
        for labels in (dict(p.labels) for p in f.points)
    }
    assert counted == {
        ("hsu.test.v1.Nowhere", "UNIMPLEMENTED", ""),
        ("hsu.test.v1.Broken", "UNAVAILABLE", "broken"),
    }
