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

from hsu.errors import PluginError
from hsu.tracecontext import SpanContext
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc
from otel_receiver import Receiver

ECHO = "hsu.echo.v1.Echo"
TRACED = str(Path(__file__).with_name("hsu_traced.py"))
SERVER = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER


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


@pytest.mark.integration
async def test_a_routed_calls_spans_chain_client_kernel_hsu(
    receiver: Receiver, hsu_kernel_factory: Any
) -> None:
    # (the receiver first: it stops after the kernel, which exports once more)
    kernel = await hsu_kernel_factory(
        {
            "plugins": ["otel"],
            "kernel": {"exporters": ["otel"]},
            "otel": {
                "endpoint": receiver.endpoint,
                "interval": 0.3,
                "timeout": 2,
                "service_name": "kernel-under-test",
            },
            "units": {"traced": _unit(receiver.endpoint)},
        }
    )
    client = SpanContext.new()
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        # a call without trace context makes no span, at the kernel or the HSU
        plain = await stub.Echo(echo_pb2.EchoRequest(message="plain"), timeout=30)
        assert plain.message == "plain -"
        reply = await stub.Echo(
            echo_pb2.EchoRequest(message="traced"), timeout=30, metadata=client.metadata()
        )

    def chain() -> list[dict[str, Any]] | None:
        mine = [s for s in receiver.spans if s["trace_id"] == client.trace_id]
        return mine if len(mine) >= 2 else None

    spans = await _until("the kernel's and the HSU's spans", chain)
    (at_kernel,) = [s for s in spans if s["parent_span_id"] == client.span_id]
    (at_hsu,) = [s for s in spans if s["parent_span_id"] == at_kernel["span_id"]]
    assert len(spans) == 2
    assert at_kernel["service"] == "kernel-under-test" and at_hsu["service"] == "traced"
    for span in spans:
        assert span["name"] == f"{ECHO}/Echo" and span["kind"] == SERVER
        assert span["attributes"]["rpc.system"] == "grpc"
        assert span["attributes"]["rpc.grpc.status_code"] == 0
        assert span["attributes"]["hsu.unit"] == "traced"
    # the HSU's span lies inside the kernel's
    assert at_kernel["start"] <= at_hsu["start"] <= at_hsu["end"] <= at_kernel["end"]
    # the span the HSU exported is the one its handler ran under (and logged with)
    assert reply.message == f"traced {at_hsu['span_id']}"
    assert {s["trace_id"] for s in receiver.spans} == {client.trace_id}

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
                return metric if echo_calls(metric) == 2.0 else None
        return None

    metric = await _until("grpc_server_handled_total of 2 Echo calls", handled)
    assert metric.sum.is_monotonic
    seen = {m.name: m for s, m in receiver.metrics if s == "kernel-under-test"}
    hist = seen["grpc_server_handling_seconds"].histogram
    for p in hist.data_points:
        assert (
            sum(p.bucket_counts) == p.count and len(p.bucket_counts) == len(p.explicit_bounds) + 1
        )
    assert sum(p.count for p in hist.data_points if not _labelled(p, "hsu_instance")) == 2
    ready = [
        p.as_double
        for p in seen["hsu_instances"].gauge.data_points
        if {kv.key: kv.value.string_value for kv in p.attributes}.get("state") == "ready"
    ]
    assert ready == [1.0]


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
