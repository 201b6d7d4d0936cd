"""A real OTLP/gRPC receiver: opentelemetry-proto's TraceService and
MetricsService served with grpc.aio on a loopback port, keeping what it is
sent."""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _service_name(resource: Any) -> str:
    for kv in resource.attributes:
        if kv.key == "service.name":
            return str(kv.value.string_value)
    return ""


def _attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


class Receiver(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    def __init__(self) -> None:
        self.server: grpc.aio.Server | None = None
        self.endpoint = ""
        #: every span received: service, trace_id, span_id, parent_span_id
        #: (hex), name, kind, status, attributes, start, end
        self.spans: list[dict[str, Any]] = []
        #: every metric received: (service, the opentelemetry.proto Metric)
        self.metrics: list[tuple[str, Any]] = []

    async def start(self) -> str:
        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        return self.endpoint

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)

    async def Export(self, request: Any, context: Any) -> Any:
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            for rs in request.resource_spans:
                service = _service_name(rs.resource)
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.spans.append(
                            {
                                "service": service,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "name": span.name,
                                "kind": span.kind,
                                "status": span.status.code,
                                "attributes": _attributes(span.attributes),
                                "start": span.start_time_unix_nano,
                                "end": span.end_time_unix_nano,
                            }
                        )
            return trace_service_pb2.ExportTraceServiceResponse()
        for rm in request.resource_metrics:
            service = _service_name(rm.resource)
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    self.metrics.append((service, metric))
        return metrics_service_pb2.ExportMetricsServiceResponse()
