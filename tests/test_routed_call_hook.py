"""``hsu_routed_call``: a plugin is told of each call the kernel's gateway
routed, with the kernel's span of it (docs/hooks.md). A real kernel, a real
echo HSU, real gRPC on loopback."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

import hsu
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
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(f"/{ECHO}/Nope")(b"", timeout=20)
    # the instance's UNIMPLEMENTED (grpc may turn a stream's early end into
    # INTERNAL on the way, as test_metrics notes)
    assert info.value.code().name in ("UNIMPLEMENTED", "INTERNAL")

    plain, traced, failed = told
    assert plain.span is None
    assert plain.method == f"/{ECHO}/Echo" and plain.unit == "echo" and plain.code == "OK"
    # the kernel's span: a child of the caller's, the parent the HSU is told of
    span = traced.span
    assert span is not None
    assert span.trace_id == caller.trace_id and span.parent_id == caller.span_id
    assert span.span_id not in (caller.span_id, "0" * 16) and span.sampled
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
