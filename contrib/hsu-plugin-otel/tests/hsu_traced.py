"""A test HSU serving hsu.echo.v1.Echo with hsu_plugin_otel's server spans;
each reply ends with the span id its handler ran under, so a test can match
it with the span the receiver got."""

from __future__ import annotations

from typing import Any

from hsu import tracecontext, worker
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc
from hsu_plugin_otel.server import ServerSpans


class Traced(echo_pb2_grpc.EchoServicer):
    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        span = tracecontext.current()
        return echo_pb2.EchoResponse(message=f"{request.message} {span.span_id if span else '-'}")


if __name__ == "__main__":
    worker.run(Traced(), interceptors=[ServerSpans()])
