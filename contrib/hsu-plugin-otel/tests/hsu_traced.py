"""A test HSU serving hsu.echo.v1.Echo with hsu_plugin_otel's server spans;
each reply ends with the span id its handler ran under, so a test can match
it with the span the receiver got.

Two messages do more: ``fail-once:PATH`` fails the call with UNAVAILABLE
when it is the one to create the file PATH (so exactly one attempt of a
call fails, whichever instance takes it), and ``relay:TEXT`` echoes TEXT
through ``hsu.connect`` (an HSU calling a unit, inside the call it serves)."""

from __future__ import annotations

import os
from typing import Any

import grpc

import hsu
from hsu import tracecontext, worker
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc
from hsu_plugin_otel.server import ServerSpans


class Traced(echo_pb2_grpc.EchoServicer):
    def __init__(self) -> None:
        self._channel: Any = None

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        span = tracecontext.current()
        text = request.message
        if text.startswith("fail-once:"):
            try:
                os.close(os.open(text.partition(":")[2], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "failing once, as asked")
        elif text.startswith("relay:"):
            if self._channel is None:
                self._channel = hsu.connect()
            stub = echo_pb2_grpc.EchoStub(self._channel)
            relayed = await stub.Echo(echo_pb2.EchoRequest(message=text[6:]), timeout=20)
            text = f"{text} [{relayed.message}]"
        return echo_pb2.EchoResponse(message=f"{text} {span.span_id if span else '-'}")


if __name__ == "__main__":
    worker.run(Traced(), interceptors=[ServerSpans()])
