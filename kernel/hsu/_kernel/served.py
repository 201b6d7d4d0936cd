"""An HSU's own count of the calls it serves (the Python SDK): the same
names as the kernel's gateway (``grpc_server_handled_total``,
``grpc_server_handling_seconds``), in the process's ``hsu.metrics.REGISTRY``,
which Core.Metrics answers with."""

from __future__ import annotations

import inspect
import time
from typing import Any

import grpc

from hsu.metrics import CallMetrics, served_status

#: not counted: the process's plumbing, not its interfaces
NOT_COUNTED = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/hsu.core.v1.Core/")


class CallCounter(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts each served call of the HSU's interfaces with its code and time."""

    def __init__(self, calls: CallMetrics, unit: str):
        self._calls = calls
        self._unit = unit

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(NOT_COUNTED):
            return handler
        if handler.unary_unary is not None:
            return handler._replace(
                unary_unary=self._unary(handler.unary_unary, method, "unary_unary")
            )
        if handler.stream_unary is not None:
            return handler._replace(
                stream_unary=self._unary(handler.stream_unary, method, "stream_unary")
            )
        if handler.unary_stream is not None:
            return handler._replace(
                unary_stream=self._streaming(handler.unary_stream, method, "unary_stream")
            )
        if handler.stream_stream is not None:
            return handler._replace(
                stream_stream=self._streaming(handler.stream_stream, method, "stream_stream")
            )
        return handler

    def _end(self, kind: str, method: str, exc: BaseException | None, t0: float, ctx: Any) -> None:
        if exc is None:
            exc = served_status(ctx)
        self._calls.observe(kind, method, self._unit, exc, t0)

    def _unary(self, behavior: Any, method: str, kind: str) -> Any:
        async def counted(request: Any, context: Any) -> Any:
            t0 = time.perf_counter()
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
            except BaseException as exc:
                self._end(kind, method, served_status(context, exc), t0, context)
                raise
            self._end(kind, method, None, t0, context)
            return result

        return counted

    def _streaming(self, behavior: Any, method: str, kind: str) -> Any:
        async def counted(request: Any, context: Any) -> Any:
            t0 = time.perf_counter()
            try:
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for reply in result:
                        yield reply
                elif inspect.isawaitable(result):
                    await result
                elif result is not None:
                    for reply in result:
                        yield reply
            except BaseException as exc:
                self._end(kind, method, served_status(context, exc), t0, context)
                raise
            self._end(kind, method, None, t0, context)

        return counted
