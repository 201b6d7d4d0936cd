"""A test HSU serving hsu.echo.v1.Echo that exercises call objects.

Every reply carries initial metadata ``x-seen`` (the caller's ``x-echo``)
and trailing metadata ``x-trailer``. ``Echo`` with message ``fail`` aborts
with FAILED_PRECONDITION; with ``delay_ms`` it waits that long first; with
message ``cancelled?`` it answers how many calls were cancelled while in
flight (seen by this process), so a test sees a client's cancel reach the
server, and with ``busy?`` how many are waiting now. ``EchoStream``
streams like the plain Echo HSU, with the same metadata.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc

from hsu import worker
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc


def _echoed(context: Any) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == "x-echo":
            return v if isinstance(v, str) else v.decode("latin-1")
    return ""


class Calls(echo_pb2_grpc.EchoServicer):
    def __init__(self) -> None:
        self.cancelled = 0
        self.busy = 0
        self.pid = os.getpid()

    def _reply(self, message: str) -> echo_pb2.EchoResponse:
        return echo_pb2.EchoResponse(message=message, pid=self.pid)

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        if request.message == "cancelled?":
            return self._reply(str(self.cancelled))
        if request.message == "busy?":
            return self._reply(str(self.busy))
        await context.send_initial_metadata((("x-seen", _echoed(context)),))
        if request.message == "fail":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "told to fail",
                trailing_metadata=(("x-trailer", "failed"),),
            )
        self.busy += 1
        try:
            await asyncio.sleep(request.delay_ms / 1000)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.busy -= 1
        context.set_trailing_metadata((("x-trailer", "done"),))
        return self._reply(request.message)

    async def EchoStream(
        self, request: echo_pb2.EchoStreamRequest, context: Any
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        await context.send_initial_metadata((("x-seen", _echoed(context)),))
        try:
            for i in range(request.count):
                if i and request.interval_ms:
                    await asyncio.sleep(request.interval_ms / 1000)
                yield self._reply(f"{request.message} {i}")
        except (asyncio.CancelledError, GeneratorExit):
            # a cancel that lands while grpc still writes the last reply (the
            # generator is parked at its yield) closes the generator instead
            self.cancelled += 1
            raise
        context.set_trailing_metadata((("x-trailer", "done"),))

    async def Collect(
        self, request_iterator: AsyncIterator[echo_pb2.EchoRequest], context: Any
    ) -> echo_pb2.EchoResponse:
        return self._reply(" ".join([r.message async for r in request_iterator]))


if __name__ == "__main__":
    worker.run(Calls(), version="1")
