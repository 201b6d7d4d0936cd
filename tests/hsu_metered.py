"""A test HSU serving hsu.echo.v1.Echo that counts its messages with a
metric of its own (``echo_messages_total``, labelled by length), beside what
the SDK counts of its calls; Core.Metrics answers with both."""

from __future__ import annotations

from typing import Any

from hsu import metrics, worker
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

MESSAGES = metrics.REGISTRY.counter("echo_messages_total", "messages echoed", ("size",))


class Metered(echo_pb2_grpc.EchoServicer):
    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        if request.message == "fail":
            await context.abort(__import__("grpc").StatusCode.FAILED_PRECONDITION, "asked to fail")
        MESSAGES.labels("short" if len(request.message) < 5 else "long").inc()
        return echo_pb2.EchoResponse(message=request.message)


if __name__ == "__main__":
    worker.run(Metered())
