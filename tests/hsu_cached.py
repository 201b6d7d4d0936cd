"""A test HSU serving hsu.echo.v1.Echo that counts the calls reaching it.

``Echo`` appends its message to ``$HSU_CACHED_LOG`` (one line a call, as it
arrives, so a test counts what reached the HSU) and answers with the
message, the call's number on this instance as ``pid`` and the metadata
``tenant`` as ``instance_id``; a message starting with ``fail`` is
NOT_FOUND. ``Collect`` (a client stream) answers like ``Echo``.
"""

from __future__ import annotations

import os
from typing import Any

import grpc

from hsu import worker
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc


class Cached(echo_pb2_grpc.EchoServicer):
    def __init__(self) -> None:
        self.calls = 0
        path = os.environ["HSU_CACHED_LOG"]
        self.log = open(path, "a", buffering=1)  # noqa: SIM115 (for the process's life)

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        self.calls += 1
        self.log.write(request.message + "\n")
        if request.message.startswith("fail"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no {request.message!r}")
        tenant = dict(context.invocation_metadata() or ()).get("tenant", "")
        return echo_pb2.EchoResponse(message=request.message, instance_id=tenant, pid=self.calls)


if __name__ == "__main__":
    worker.run(Cached(), version="1")
