"""An example HSU: the Echo interface, written with the hsu Python SDK."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

__version__ = "0.1.0"


class Echo(echo_pb2_grpc.EchoServicer):
    """Replies with what it was sent, tagged with who answered."""

    def __init__(self) -> None:
        self.instance_id = os.environ.get("HSU_INSTANCE_ID", "standalone")
        self.pid = os.getpid()

    def _reply(self, message: str) -> echo_pb2.EchoResponse:
        return echo_pb2.EchoResponse(message=message, instance_id=self.instance_id, pid=self.pid)

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        if request.delay_ms:
            await asyncio.sleep(request.delay_ms / 1000)
        return self._reply(request.message)

    async def EchoStream(
        self, request: echo_pb2.EchoStreamRequest, context: Any
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        for i in range(request.count):
            if i and request.interval_ms:
                await asyncio.sleep(request.interval_ms / 1000)
            yield self._reply(f"{request.message} {i}")

    async def Collect(
        self, request_iterator: AsyncIterator[echo_pb2.EchoRequest], context: Any
    ) -> echo_pb2.EchoResponse:
        parts = [r.message async for r in request_iterator]
        return self._reply(" ".join(parts))
