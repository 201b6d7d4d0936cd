"""A test HSU serving hsu.echo.v1.Echo that counts its concurrent calls.

Each call sleeps ``delay_ms`` and answers with its own ``message``, its
instance and pid. A call that finds another in flight on this instance
fails with FAILED_PRECONDITION ("saw 2 concurrent calls"), so a test whose
``max_inflight: 1`` leaks a second call fails. Every call's message is
appended, as it arrives, to the file ``$HSU_COUNTING_LOG`` (when set), so a
test sees the order calls reached the instance.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc

from hsu import worker
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc


class Counting(echo_pb2_grpc.EchoServicer):
    def __init__(self) -> None:
        self.inflight = 0
        path = os.environ.get("HSU_COUNTING_LOG", "")
        self.log = open(path, "a", buffering=1) if path else None  # noqa: SIM115 (for the process's life)

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        self.inflight += 1
        try:
            if self.log is not None:
                self.log.write(request.message + "\n")
            if self.inflight > 1:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"saw {self.inflight} concurrent calls",
                )
            await asyncio.sleep(request.delay_ms / 1000)
            return echo_pb2.EchoResponse(
                message=request.message,
                instance_id=os.environ.get("HSU_INSTANCE_ID", ""),
                pid=os.getpid(),
            )
        finally:
            self.inflight -= 1


if __name__ == "__main__":
    worker.run(Counting(), version="1")
