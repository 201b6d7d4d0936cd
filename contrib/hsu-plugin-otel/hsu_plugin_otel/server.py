"""The HSU side: a server span for each call an HSU serves, over OTLP/gRPC.

.. code-block:: python

    from hsu import worker
    from hsu_plugin_otel.server import ServerSpans

    worker.run(MyServicer(), interceptors=[ServerSpans()])

For a call that carries a sampled ``traceparent`` (the span of the kernel's
attempt that reached the HSU, or a direct caller's) it makes the call's
span, a child of that one, current while the handler runs (the SDK keeps
it, so the HSU's log records carry its ``span_id``), and exports it when
the call ends. A call without one gets no
span: the HSU starts no trace of its own.

The OTLP exporter reads OpenTelemetry's environment variables
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_INSECURE``,
``OTEL_BSP_SCHEDULE_DELAY`` ...); give them to the unit with ``env:``.
``service.name`` is ``OTEL_SERVICE_NAME``, else the unit's name. The batch
is flushed when the process exits.
"""

from __future__ import annotations

import atexit
import inspect
import os
import time
from typing import Any

import grpc

from hsu import tracecontext
from hsu.metrics import code_of
from hsu_plugin_otel import SCOPE, span_of

__all__ = ["ServerSpans"]

#: not traced: the process's plumbing, not its interfaces
NOT_TRACED = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/hsu.core.v1.Core/")


class ServerSpans(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A span per served call of the HSU's interfaces (module docstring).

    ``processor``: the SDK span processor to hand finished spans to (default:
    a ``BatchSpanProcessor`` over an ``OTLPSpanExporter`` configured from
    the environment)."""

    def __init__(self, service_name: str | None = None, processor: Any = None):
        from importlib.metadata import version

        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        name = service_name or os.environ.get("OTEL_SERVICE_NAME") or os.environ.get("HSU_UNIT")
        self._resource = Resource.create({"service.name": name or "hsu"})
        self._scope = InstrumentationScope(SCOPE, version("hsu-plugin-otel"))
        self._unit = os.environ.get("HSU_UNIT", "")
        self._instance = os.environ.get("HSU_INSTANCE_ID", "")
        if processor is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            processor = BatchSpanProcessor(OTLPSpanExporter())
            atexit.register(processor.shutdown)
        self._processor = processor

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(NOT_TRACED):
            return handler
        parent = tracecontext.from_metadata(details.invocation_metadata)
        if parent is None or not parent.sampled:
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method, parent))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(handler.stream_unary, method, parent))
        if handler.unary_stream is not None:
            return handler._replace(
                unary_stream=self._streaming(handler.unary_stream, method, parent)
            )
        if handler.stream_stream is not None:
            return handler._replace(
                stream_stream=self._streaming(handler.stream_stream, method, parent)
            )
        return handler

    def _end(
        self,
        span: tracecontext.SpanContext,
        method: str,
        start_ns: int,
        exc: BaseException | None,
        context: Any,
    ) -> None:
        code = context.code() if callable(getattr(context, "code", None)) else None
        if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
            name = code.name
        else:
            name = code_of(exc)
        attributes = {"hsu.unit": self._unit, "hsu.instance": self._instance}
        self._processor.on_end(
            span_of(
                span,
                method,
                name,
                start_ns,
                time.time_ns(),
                attributes,
                self._resource,
                self._scope,
            )
        )

    def _unary(self, behavior: Any, method: str, parent: tracecontext.SpanContext) -> Any:
        async def traced(request: Any, context: Any) -> Any:
            span = parent.child()
            start = time.time_ns()
            with tracecontext.use(span):
                try:
                    result = behavior(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                except BaseException as exc:
                    self._end(span, method, start, exc, context)
                    raise
            self._end(span, method, start, None, context)
            return result

        return traced

    def _streaming(self, behavior: Any, method: str, parent: tracecontext.SpanContext) -> Any:
        async def traced(request: Any, context: Any) -> Any:
            span = parent.child()
            start = time.time_ns()
            with tracecontext.use(span):
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
                    self._end(span, method, start, exc, context)
                    raise
            self._end(span, method, start, None, context)

        return traced
