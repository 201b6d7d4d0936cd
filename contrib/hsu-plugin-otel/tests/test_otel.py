"""hsu-plugin-otel: the spans of a routed call, client -> kernel -> HSU, and
the kernel's metrics, received by a real OTLP/gRPC receiver on loopback
(opentelemetry-proto's services, served by the test); a real kernel, a real
HSU process, real gRPC."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

import hsu
from hsu.errors import PluginError
from hsu.tracecontext import SpanContext
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc
from otel_receiver import Receiver

ECHO = "hsu.echo.v1.Echo"
TRACED = str(Path(__file__).with_name("hsu_traced.py"))
#: opentelemetry.proto.trace.v1's Span.SpanKind and Status.StatusCode
SERVER, CLIENT = 2, 3
ERROR = 2


async def _until(what: str, check: Any, seconds: float = 30.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"never received: {what}")
        await asyncio.sleep(0.1)


def _labelled(point: Any, key: str) -> bool:
    return any(kv.key == key for kv in point.attributes)


@pytest.fixture
async def receiver() -> Any:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


def _unit(endpoint: str) -> dict[str, Any]:
    return {
        "command": ["python", TRACED],
        "interfaces": [ECHO],
        "startup_timeout": 30,
        "stop_grace": 5,
        "restart": {"policy": "never"},
        # OpenTelemetry's own variables configure the HSU's OTLP exporter
        "env": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    }


def _kernel_config(
    receiver: Receiver, otel: dict[str, Any] | None = None, **kernel: Any
) -> dict[str, Any]:
    unit = _unit(receiver.endpoint)
    unit["routing"] = {"idempotent": ["Echo"]}
    return {
        "plugins": ["otel"],
        "kernel": {"exporters": ["otel"], **kernel},
        "otel": {
            "endpoint": receiver.endpoint,
            "interval": 0.3,
            "timeout": 2,
            "service_name": "kernel-under-test",
            **(otel or {}),
        },
        "units": {"traced": unit},
    }


def _trace_of(receiver: Receiver, trace_id: str, kernel_spans: int, hsu_spans: int) -> Any:
    """The spans of one trace, once ``kernel_spans`` of the kernel's (the
    call's and its parts') and ``hsu_spans`` of the HSU's have arrived (a
    batch may be sent between the call's span and its parts)."""

    def whole() -> list[dict[str, Any]] | None:
        mine = [s for s in receiver.spans if s["trace_id"] == trace_id]
        at_kernel = [s for s in mine if s["service"] == "kernel-under-test"]
        at_hsu = [s for s in mine if s["service"] == "traced"]
        return mine if len(at_kernel) >= kernel_spans and len(at_hsu) >= hsu_spans else None

    return _until(f"trace {trace_id}", whole)


def _parts(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """A trace's spans by role: the kernel's call span, its parts, the HSU's."""
    (call,) = [s for s in spans if s["service"] == "kernel-under-test" and s["kind"] == SERVER]
    children = [s for s in spans if s["parent_span_id"] == call["span_id"]]
    for s in children:
        assert s["service"] == "kernel-under-test"
        assert call["start"] <= s["start"] <= s["end"] <= call["end"], s
    out: dict[str, list[dict[str, Any]]] = {
        "call": [call],
        "cold_start": [s for s in children if s["name"] == "hsu.cold_start"],
        "pick": sorted((s for s in children if s["name"] == "hsu.pick"), key=_start),
        "attempt": sorted((s for s in children if s["kind"] == CLIENT), key=_start),
        "hsu": [s for s in spans if s["service"] == "traced"],
    }
    assert sum(map(len, out.values())) == len(spans), spans
    return out


def _start(span: dict[str, Any]) -> int:
    return int(span["start"])


@pytest.mark.integration
async def test_a_routed_calls_spans_chain_client_kernel_attempt_hsu(
    receiver: Receiver, hsu_kernel_factory: Any, tmp_path: Path
) -> None:
    # (the receiver first: it stops after the kernel, which exports once more)
    kernel = await hsu_kernel_factory(_kernel_config(receiver))
    first, retried = SpanContext.new(), SpanContext.new()
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        # the first call starts the (on-demand) unit's instance
        reply = await stub.Echo(
            echo_pb2.EchoRequest(message="traced"), timeout=30, metadata=first.metadata()
        )
        # a call without trace context makes no span, at the kernel or the HSU
        plain = await stub.Echo(echo_pb2.EchoRequest(message="plain"), timeout=30)
        assert plain.message == "plain -"
        # its first attempt fails with UNAVAILABLE, the gateway tries again
        again = await stub.Echo(
            echo_pb2.EchoRequest(message=f"fail-once:{tmp_path / 'failed'}"),
            timeout=30,
            metadata=retried.metadata(),
        )

    spans = _parts(await _trace_of(receiver, first.trace_id, 4, 1))
    (call,), (cold,), (pick,), (attempt,), (at_hsu,) = (
        spans[k] for k in ("call", "cold_start", "pick", "attempt", "hsu")
    )
    # client -> kernel's call span -> its attempt -> the HSU's server span
    assert call["parent_span_id"] == first.span_id
    assert at_hsu["parent_span_id"] == attempt["span_id"]
    for span in (call, attempt, at_hsu):
        assert span["name"] == f"{ECHO}/Echo"
        assert span["attributes"]["rpc.system"] == "grpc"
        assert span["attributes"]["rpc.grpc.status_code"] == 0
        assert span["attributes"]["hsu.unit"] == "traced"
    assert call["kind"] == SERVER and at_hsu["kind"] == SERVER and attempt["kind"] == CLIENT
    # the call waited for the instance started for it, then picked it
    assert cold["attributes"]["hsu.unit"] == "traced"
    assert cold["attributes"]["hsu.interface"] == ECHO
    assert cold["end"] <= pick["start"] <= pick["end"] <= attempt["start"] <= at_hsu["start"]
    (instance,) = kernel.instances.values()
    for span in (pick, attempt, at_hsu):
        assert span["attributes"]["hsu.instance"] == instance.instance_id
    assert attempt["attributes"]["rpc.response.status_code"] == "OK"
    assert attempt["attributes"]["hsu.retry"] is False
    assert "hsu.resend_count" not in attempt["attributes"]
    host, _, port = instance.address.rpartition(":")
    assert attempt["attributes"]["server.address"] == host
    assert attempt["attributes"]["server.port"] == int(port)
    assert at_hsu["end"] <= attempt["end"]
    # the span the HSU exported is the one its handler ran under (and logged with)
    assert reply.message == f"traced {at_hsu['span_id']}"

    # the retried call: two picks, two attempts, the second marked as a retry,
    # and each of the HSU's server spans the child of the attempt that reached it
    spans = _parts(await _trace_of(receiver, retried.trace_id, 5, 2))
    assert spans["cold_start"] == [] and len(spans["pick"]) == 2
    failed, retry = spans["attempt"]
    assert failed["attributes"]["rpc.response.status_code"] == "UNAVAILABLE"
    assert failed["attributes"]["error.type"] == "UNAVAILABLE"
    assert failed["attributes"]["rpc.grpc.status_code"] == 14 and failed["status"] == ERROR
    assert failed["attributes"]["hsu.retry"] is False
    assert retry["attributes"]["rpc.response.status_code"] == "OK"
    assert retry["attributes"]["hsu.retry"] is True
    assert retry["attributes"]["hsu.resend_count"] == 1
    assert failed["end"] <= spans["pick"][1]["start"] <= spans["pick"][1]["end"] <= retry["start"]
    by_parent = {s["parent_span_id"]: s for s in spans["hsu"]}
    assert by_parent.keys() == {failed["span_id"], retry["span_id"]}
    assert by_parent[failed["span_id"]]["status"] == ERROR
    assert again.message.endswith(by_parent[retry["span_id"]]["span_id"])
    assert spans["call"][0]["attributes"]["rpc.grpc.status_code"] == 0
    assert {s["trace_id"] for s in receiver.spans} == {first.trace_id, retried.trace_id}

    # metrics: the gateway's count of the calls, its histogram, the instance gauge
    def echo_calls(metric: Any) -> float:
        """The gateway's count of Echo calls (the first may be counted as a
        stream, before the gateway learned the method's kind: two series)."""
        total = 0.0
        for p in metric.sum.data_points:
            attrs = {kv.key: kv.value.string_value for kv in p.attributes}
            if attrs.get("grpc_method") == "Echo" and "hsu_instance" not in attrs:
                total += p.as_double
        return total

    def handled() -> Any:
        for service, metric in reversed(receiver.metrics):
            if service == "kernel-under-test" and metric.name == "grpc_server_handled_total":
                return metric if echo_calls(metric) == 3.0 else None
        return None

    metric = await _until("grpc_server_handled_total of 3 Echo calls", handled)
    assert metric.sum.is_monotonic
    seen = {m.name: m for s, m in receiver.metrics if s == "kernel-under-test"}
    hist = seen["grpc_server_handling_seconds"].histogram
    for p in hist.data_points:
        assert (
            sum(p.bucket_counts) == p.count and len(p.bucket_counts) == len(p.explicit_bounds) + 1
        )
    assert sum(p.count for p in hist.data_points if not _labelled(p, "hsu_instance")) == 3
    ready = [
        p.as_double
        for p in seen["hsu_instances"].gauge.data_points
        if {kv.key: kv.value.string_value for kv in p.attributes}.get("state") == "ready"
    ]
    assert ready == [1.0]


@pytest.mark.integration
async def test_with_trace_sample_the_kernel_starts_the_trace(
    receiver: Receiver, hsu_kernel_factory: Any
) -> None:
    # (and the picks left out: otel.picks false)
    config = _kernel_config(receiver, {"picks": False}, trace_sample=1.0)
    kernel = await hsu_kernel_factory(config)
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        reply = await stub.Echo(echo_pb2.EchoRequest(message="untraced"), timeout=30)
    # the HSU served the call under a span of a trace the kernel started
    assert reply.message != "untraced -"
    hsu_span_id = reply.message.rpartition(" ")[2]
    (at_hsu,) = await _until(
        "the HSU's span", lambda: [s for s in receiver.spans if s["span_id"] == hsu_span_id]
    )
    spans = _parts(await _trace_of(receiver, at_hsu["trace_id"], 3, 1))
    (call,), (attempt,) = spans["call"], spans["attempt"]
    assert call["parent_span_id"] == ""  # a root: the caller sent no traceparent
    assert at_hsu["parent_span_id"] == attempt["span_id"]
    assert spans["pick"] == [] and len(spans["cold_start"]) == 1


@pytest.mark.integration
async def test_hsu_connect_calls_are_children_of_the_callers_span(
    receiver: Receiver, hsu_kernel_factory: Any, tmp_path: Path
) -> None:
    """``hsu.connect`` goes straight to an instance: every attempt carries the
    caller's ``traceparent`` (a client's, or the span an HSU is serving)."""
    kernel = await hsu_kernel_factory(_kernel_config(receiver))
    client, retried, relayed = SpanContext.new(), SpanContext.new(), SpanContext.new()
    async with hsu.connect(kernel.control_address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        reply = await stub.Echo(
            echo_pb2.EchoRequest(message="direct"), timeout=30, metadata=client.metadata()
        )
        again = await stub.Echo(
            echo_pb2.EchoRequest(message=f"fail-once:{tmp_path / 'failed'}"),
            timeout=30,
            metadata=retried.metadata(),
        )
    (direct,) = await _until(
        "the HSU's span", lambda: [s for s in receiver.spans if s["trace_id"] == client.trace_id]
    )
    assert direct["parent_span_id"] == client.span_id and direct["service"] == "traced"
    assert reply.message == f"direct {direct['span_id']}"
    # hsu.connect_sync, the same
    blocking = SpanContext.new()

    def sync_call() -> str:
        with hsu.connect_sync(kernel.control_address) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            md = blocking.metadata()
            return str(
                stub.Echo(echo_pb2.EchoRequest(message="sync"), timeout=30, metadata=md).message
            )

    sync_reply = await asyncio.to_thread(sync_call)
    (synced,) = await _until(
        "the HSU's span", lambda: [s for s in receiver.spans if s["trace_id"] == blocking.trace_id]
    )
    assert synced["parent_span_id"] == blocking.span_id
    assert sync_reply == f"sync {synced['span_id']}"
    # a retry through hsu.connect: both attempts' server spans are the caller's children
    tried = await _until(
        "two server spans",
        lambda: (lambda m: m if len(m) == 2 else None)(
            [s for s in receiver.spans if s["trace_id"] == retried.trace_id]
        ),
    )
    assert {s["parent_span_id"] for s in tried} == {retried.span_id}
    assert sorted(s["status"] for s in tried) == [0, ERROR]
    assert again.message.endswith(next(s["span_id"] for s in tried if s["status"] == 0))

    # an HSU calling its unit again with hsu.connect, inside the call it
    # serves: the inner call's server span is the child of the outer one's
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        outer = await echo_pb2_grpc.EchoStub(channel).Echo(
            echo_pb2.EchoRequest(message="relay:inner"), timeout=30, metadata=relayed.metadata()
        )
    spans = _parts(await _trace_of(receiver, relayed.trace_id, 3, 2))
    (attempt,) = spans["attempt"]
    (first,) = [s for s in spans["hsu"] if s["parent_span_id"] == attempt["span_id"]]
    (inner,) = [s for s in spans["hsu"] if s is not first]
    assert inner["parent_span_id"] == first["span_id"]
    assert outer.message == f"relay:inner [inner {inner['span_id']}] {first['span_id']}"


async def test_an_endpoint_off_loopback_is_refused(hsu_kernel_factory: Any) -> None:
    with pytest.raises(PluginError, match="off this machine"):
        await hsu_kernel_factory(
            {
                "plugins": ["otel"],
                "kernel": {"exporters": ["otel"]},
                "otel": {"endpoint": "http://192.0.2.1:4317"},
                "units": {},
            }
        )


PROBE = """
import asyncio, json, sys
from hsu.testing import build_kernel

async def main():
    kernel = build_kernel(json.loads(sys.argv[1]), base_dir=sys.argv[2])
    await kernel.start()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
    await kernel.stop()
    print(json.dumps(loaded))

asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("raw", "imports"),
    [
        ({"units": {}}, False),
        # the plugin loaded, its exporter not started: still nothing
        ({"plugins": ["otel"], "units": {}}, False),
        (
            {
                "plugins": ["otel"],
                "kernel": {"exporters": ["otel"]},
                "otel": {"interval": 60, "timeout": 0.5, "metrics": False},
                "units": {},
            },
            True,
        ),
    ],
)
def test_the_kernel_imports_opentelemetry_only_for_the_exporter(
    tmp_path: Path, raw: dict[str, Any], imports: bool
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(raw), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert bool(loaded) is imports, loaded
