"""The demo plugin: once the kernel runs, call Echo through its generated stub.

Enabled by name in ``deployment.yaml`` (``plugins: [hsu_echo.demo]``); its
settings are the ``echo-demo`` section.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from loguru import logger

import hsu
from hsu.ports import KernelAPI
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

SECTION = "echo-demo"


@attrs.frozen
class Settings:
    message: str = "hello from the hsu demo"
    #: how many calls to make
    calls: int = 3


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(SECTION, Settings)


@hsu.hookimpl
def hsu_kernel_started(kernel: KernelAPI) -> Any:
    return _call_echo(kernel)


async def _call_echo(kernel: KernelAPI) -> None:
    settings: Settings = kernel.settings(SECTION)
    # a routed channel: the first call starts an echo instance on demand
    async with kernel.connect() as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        for i in range(settings.calls):
            reply = await stub.Echo(
                echo_pb2.EchoRequest(message=f"{settings.message} #{i + 1}"), timeout=30
            )
            print(
                f"echo reply: {reply.message!r} from {reply.instance_id} (pid {reply.pid})",
                flush=True,
            )
    logger.info(
        "demo done; the kernel keeps serving on {} until Ctrl-C (call Echo there: it is"
        " forwarded to the instance)",
        kernel.address,
    )
