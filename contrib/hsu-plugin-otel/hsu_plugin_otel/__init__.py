"""hsu-plugin-otel: the kernel's metrics and the spans of routed calls over
OTLP/gRPC, with the OpenTelemetry SDK (see README.md).

The ``otel`` exporter, once started, does two things on the kernel's loop:

- **spans**: it registers a per-kernel object implementing
  ``hsu_routed_call``; each routed call that carries a sampled trace context
  (the caller's, or one the kernel started, ``kernel.trace_sample``)
  becomes a SERVER span whose ids are the kernel's span of the call and
  whose parent is the caller's span, with its parts as children: an
  INTERNAL ``hsu.cold_start`` span, an INTERNAL ``hsu.pick`` span per try
  and a CLIENT span per attempt (the parent its instance was told of, so
  the HSU's server span is the attempt's child). The records are handed to
  a ``BatchSpanProcessor``, which exports from a thread of its own.
- **metrics**: every ``interval`` seconds it gathers ``kernel.metrics``
  (what a Prometheus scrape would show, the HSUs' own included) and writes
  them as OTLP metrics (counters as cumulative monotonic sums, gauges,
  histograms with their buckets) from a worker thread.

Nothing of OpenTelemetry is imported until the exporter starts: a kernel
with this distribution installed and the exporter not named in
``kernel.exporters`` imports none of it. The HSU side (a server span per
served call) is :mod:`hsu_plugin_otel.server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import math
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from loguru import logger

import hsu
from hsu.errors import PluginError
from hsu.metrics import Family
from hsu.ports import CallSpan, KernelAPI, RoutedCall
from hsu.tracecontext import ATTEMPT, PICK, SpanContext

__all__ = ["SECTION", "OtelExporter", "OtelSettings", "metrics_data", "part_of", "span_of"]

SECTION = "otel"
#: the instrumentation scope of what this plugin exports
SCOPE = "hsu_plugin_otel"


def _endpoint(_inst: Any, _attr: Any, value: str) -> None:
    parts = urllib.parse.urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ValueError(
            f"otel.endpoint: {value!r} is not http(s)://host:port (OTLP/gRPC, often port 4317)"
        )


@attrs.frozen
class OtelSettings:
    """The ``otel`` section."""

    #: the OTLP/gRPC receiver (an OpenTelemetry Collector); ``http://``: no TLS
    endpoint: str = attrs.field(default="http://127.0.0.1:4317", validator=_endpoint)
    #: ``service.name`` of what the kernel exports
    service_name: str = "hsu"
    #: seconds between metric exports, and the longest a span waits in the batch
    interval: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    #: seconds one export may take (retries included)
    timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    #: export the spans of routed calls
    traces: bool = True
    #: export a ``hsu.pick`` span per try of a routed call; ``false`` leaves
    #: them out (a third of a call's spans at the kernel, and of what they
    #: cost to send): the attempt spans still name their instance, and a
    #: pick's wait shows as the gap before its attempt
    picks: bool = True
    #: export the kernel's metrics
    metrics: bool = True
    #: send to a receiver off loopback (over ``http://``, in clear)
    allow_remote: bool = False


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(SECTION, OtelSettings)


@hsu.hookimpl
def hsu_register_exporters(register: Callable[..., None]) -> None:
    register("otel", OtelExporter)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- conversions ----------------------------------------------------------------------


def _unit_of(name: str) -> str:
    if name.endswith(("_seconds", "_seconds_total")):
        return "s"
    if name.endswith("_bytes"):
        return "By"
    return ""


def metrics_data(
    families: Iterable[Family], resource: Any, scope: Any, start_ns: int, now_ns: int
) -> Any:
    """hsu's families as the SDK's ``MetricsData``: counters as cumulative
    monotonic sums, gauges as gauges, histograms as cumulative explicit-bucket
    histograms (per-bucket counts, the last bucket +Inf). Names are kept
    (``grpc_server_handled_total``), labels become attributes."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Histogram,
        HistogramDataPoint,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )

    out = []
    for fam in families:
        data: Any
        if fam.kind == "histogram":
            hpoints = []
            for p in fam.points:
                bounds = [b for b, _ in p.buckets if not math.isinf(b)]
                counts, before = [], 0
                for _, n in p.buckets:
                    counts.append(n - before)
                    before = n
                hpoints.append(
                    HistogramDataPoint(
                        attributes=dict(p.labels),
                        start_time_unix_nano=start_ns,
                        time_unix_nano=now_ns,
                        count=p.count,
                        sum=p.value,
                        bucket_counts=counts,
                        explicit_bounds=bounds,
                        # not kept by hsu's histograms: left unset on the wire
                        min=None,  # type: ignore[arg-type]
                        max=None,  # type: ignore[arg-type]
                    )
                )
            data = Histogram(hpoints, AggregationTemporality.CUMULATIVE)
        else:
            npoints = [
                NumberDataPoint(
                    attributes=dict(p.labels),
                    start_time_unix_nano=start_ns,
                    time_unix_nano=now_ns,
                    value=p.value,
                )
                for p in fam.points
            ]
            if fam.kind == "counter":
                data = Sum(npoints, AggregationTemporality.CUMULATIVE, True)
            else:
                data = Gauge(npoints)
        out.append(Metric(fam.name, fam.help, _unit_of(fam.name), data))
    return MetricsData([ResourceMetrics(resource, [ScopeMetrics(scope, out, "")], "")])


def _status_number(code: str) -> int:
    import grpc

    try:
        return int(grpc.StatusCode[code].value[0])
    except (KeyError, IndexError, TypeError, ValueError):
        return 2  # UNKNOWN


@functools.cache
def _span_types() -> tuple[Any, Any, Any, Any]:
    """The SDK's span classes, imported on first use (not at the plugin's
    import; once, not per span: on the call's path, an import statement
    costs more than the span)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace.status import Status, StatusCode

    return trace, ReadableSpan, Status, StatusCode


def span_of(
    span: SpanContext,
    name: str,
    code: str,
    start_ns: int,
    end_ns: int,
    attributes: dict[str, Any],
    resource: Any,
    scope: Any,
) -> Any:
    """One finished SERVER span with hsu's ids (``span.parent_id`` its parent,
    when set), as the SDK's ``ReadableSpan``; gRPC's semantic attributes
    (``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``)
    beside ``attributes``; status ERROR for a code other than OK."""
    trace = _span_types()[0]
    service, _, method = name.lstrip("/").partition("/")
    attrs_ = {
        "rpc.system": "grpc",
        "rpc.service": service,
        "rpc.method": method,
        "rpc.grpc.status_code": _status_number(code),
        **attributes,
    }
    return _readable(
        span.trace_id,
        span.span_id,
        span.parent_id,
        span.flags,
        name.lstrip("/"),
        trace.SpanKind.SERVER,
        code,
        start_ns,
        end_ns,
        attrs_,
        resource,
        scope,
    )


def part_of(call: RoutedCall, part: CallSpan, resource: Any, scope: Any) -> Any:
    """One part of a routed call (``call.spans``) as the SDK's
    ``ReadableSpan``, a child of the call's span: an attempt is a CLIENT span
    named as the method (OpenTelemetry's RPC conventions: a span per attempt,
    with ``rpc.*``, ``server.address`` and ``server.port``; its status ERROR
    for a code other than OK); a pick or a cold start an INTERNAL span named
    ``hsu.pick`` / ``hsu.cold_start`` (ERROR when ``error.type`` is set)."""
    trace = _span_types()[0]
    span = call.span
    assert span is not None
    if part.name == ATTEMPT:
        code = str(part.attributes.get("rpc.response.status_code", "UNKNOWN"))
        service, _, method = call.method.lstrip("/").partition("/")
        attributes = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            "rpc.grpc.status_code": _status_number(code),
            **part.attributes,
        }
        name, kind = call.method.lstrip("/"), trace.SpanKind.CLIENT
    else:
        code = str(part.attributes.get("error.type", "OK"))
        attributes, name, kind = dict(part.attributes), part.name, trace.SpanKind.INTERNAL
    return _readable(
        span.trace_id,
        part.span_id,
        part.parent_id,
        span.flags,
        name,
        kind,
        code,
        part.start_ns,
        part.end_ns,
        attributes,
        resource,
        scope,
    )


def _readable(
    trace_id_hex: str,
    span_id: str,
    parent_id: str,
    flags: int,
    name: str,
    kind: Any,
    code: str,
    start_ns: int,
    end_ns: int,
    attributes: dict[str, Any],
    resource: Any,
    scope: Any,
) -> Any:
    trace, ReadableSpan, Status, StatusCode = _span_types()
    trace_id = int(trace_id_hex, 16)
    trace_flags = trace.TraceFlags(flags & 0xFF)
    context = trace.SpanContext(trace_id, int(span_id, 16), False, trace_flags)
    parent = None
    if parent_id:
        parent = trace.SpanContext(trace_id, int(parent_id, 16), True, trace_flags)
    status = Status(StatusCode.UNSET) if code == "OK" else Status(StatusCode.ERROR, code)
    return ReadableSpan(
        name=name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=attributes,
        kind=kind,
        status=status,
        start_time=start_ns,
        end_time=end_ns,
        instrumentation_scope=scope,
    )


# -- the exporter ---------------------------------------------------------------------


class _Spans:
    """The per-kernel object told of each routed call (``hsu_routed_call``)."""

    def __init__(self, exporter: OtelExporter):
        self._exporter = exporter

    @hsu.hookimpl
    def hsu_routed_call(self, kernel: KernelAPI, call: RoutedCall) -> None:
        self._exporter.routed(call)


class OtelExporter:
    """See the module docstring."""

    def __init__(self, kernel: KernelAPI):
        self.settings: OtelSettings = kernel.settings(SECTION)
        self._kernel = kernel
        self._processor: Any = None
        self._metrics: Any = None
        self._task: asyncio.Task[None] | None = None
        self._resource: Any = None
        self._scope: Any = None
        self._start_ns = time.time_ns()
        self._failures = kernel.metrics.counter(
            "hsu_otel_export_failures_total", "OTLP metric exports that failed"
        )
        #: spans handed to the batch (the SDK drops past its queue of 2048)
        self.spans = 0

    async def start(self) -> None:
        s = self.settings
        parts = urllib.parse.urlsplit(s.endpoint)
        host = parts.hostname or ""
        if not _loopback(host) and not s.allow_remote:
            raise PluginError(
                f"otel.endpoint: {s.endpoint} is off this machine; set otel.allow_remote: true"
                " to send the metrics and spans there"
            )
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        except ImportError as exc:
            raise PluginError(
                "kernel.exporters: otel needs opentelemetry-sdk and"
                " opentelemetry-exporter-otlp-proto-grpc: pip install hsu-plugin-otel"
            ) from exc
        from importlib.metadata import version

        self._resource = Resource.create({"service.name": s.service_name})
        self._scope = InstrumentationScope(SCOPE, version("hsu-plugin-otel"))
        insecure = parts.scheme == "http"
        target = f"{parts.hostname}:{parts.port}"
        if ":" in (parts.hostname or ""):
            target = f"[{parts.hostname}]:{parts.port}"
        if s.traces:
            self._processor = BatchSpanProcessor(
                OTLPSpanExporter(endpoint=target, insecure=insecure, timeout=s.timeout),
                schedule_delay_millis=s.interval * 1000,
                export_timeout_millis=s.timeout * 1000,
            )
            self._kernel.register_plugin(_Spans(self), "otel-spans")
        if s.metrics:
            self._metrics = OTLPMetricExporter(
                endpoint=target, insecure=insecure, timeout=s.timeout
            )
            self._task = asyncio.create_task(self._run(), name="otel metrics")
        logger.info(
            "otel exporter: {} to {}",
            " and ".join(w for w, on in (("spans", s.traces), ("metrics", s.metrics)) if on),
            s.endpoint,
        )

    def routed(self, call: RoutedCall) -> None:
        """A routed call ended: its span and its parts' to the batch, if it
        has a sampled one."""
        span = call.span
        processor = self._processor
        if span is None or not span.sampled or processor is None:
            return
        attributes = {"hsu.unit": call.unit, "hsu.rpc.kind": call.kind}
        resource, scope = self._resource, self._scope
        on_end = processor.on_end
        on_end(
            span_of(
                span,
                call.method,
                call.code,
                call.start_ns,
                call.end_ns,
                attributes,
                resource,
                scope,
            )
        )
        picks = self.settings.picks
        for part in call.spans:
            if picks or part.name != PICK:
                on_end(part_of(call, part, resource, scope))
                self.spans += 1
        self.spans += 1

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval)
            await self.export_metrics()

    async def export_metrics(self) -> bool:
        """Gather the kernel's metrics and write them now; False if it failed."""
        exporter = self._metrics
        if exporter is None:
            return False
        families = await self._kernel.metrics.gather()
        data = metrics_data(families, self._resource, self._scope, self._start_ns, time.time_ns())
        try:
            result = await asyncio.to_thread(
                exporter.export, data, timeout_millis=self.settings.timeout * 1000
            )
        except Exception as exc:  # the exporter logs; the kernel goes on
            logger.warning("otel: metrics export failed: {!r}", exc)
            result = None
        ok = getattr(result, "name", "") == "SUCCESS"
        if not ok:
            self._failures.inc()
        return ok

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.export_metrics(), self.settings.timeout + 1)
        processor, self._processor = self._processor, None
        metrics, self._metrics = self._metrics, None
        if processor is not None:
            await asyncio.to_thread(processor.shutdown)
        if metrics is not None:
            await asyncio.to_thread(metrics.shutdown)
