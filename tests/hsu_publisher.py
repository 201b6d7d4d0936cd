"""A test HSU serving hsu.echo.v1.Echo that publishes on the kernel's bus.

``Echo(message)`` publishes an event on the topic ``message`` (with
``data={"from": "publisher"}``), logging that it does, through :meth:`hsu.worker.Worker.publish` and
answers ``seq N``, or ``refused: ...`` with the kernel's reason.
"""

from __future__ import annotations

import asyncio
from typing import Any

from loguru import logger

from hsu import worker
from hsu.errors import HsuError
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc


class Publisher(echo_pb2_grpc.EchoServicer):
    def __init__(self) -> None:
        self.worker: worker.Worker | None = None

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        assert self.worker is not None
        logger.info("publishing {!r}", request.message)
        try:
            seq = await self.worker.publish(
                request.message, {"from": "publisher"}, reason="asked by a test"
            )
        except HsuError as exc:
            return echo_pb2.EchoResponse(message=f"refused: {exc}")
        return echo_pb2.EchoResponse(message=f"seq {seq}")


async def main() -> None:
    worker.configure_logging()
    servicer = Publisher()
    servicer.worker = worker.Worker(servicer, version="1")
    await servicer.worker.serve()


if __name__ == "__main__":
    asyncio.run(main())
