"""The Python HSU SDK: write the servicer, hsu does the rest.

::

    from hsu import worker
    from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

    class Echo(echo_pb2_grpc.EchoServicer):
        async def Echo(self, request, context):
            return echo_pb2.EchoResponse(message=request.message)

    if __name__ == "__main__":
        worker.run(Echo(), version="1.0")

:func:`run` serves the servicers plus Core, grpc.health.v1 and reflection on
``HSU_LISTEN`` (default: an ephemeral loopback port), registers with the kernel
at ``HSU_KERNEL_ADDRESS`` when a kernel started it, streams its logs over
Core.StreamLogs, and exits cleanly on Core.Shutdown, SIGTERM or SIGINT. Without
a kernel it runs standalone and logs where it listens.

A kernel that starts an HSU hands it a secret, ``HSU_INSTANCE_TOKEN``: the HSU
sends it (gRPC metadata ``hsu-instance-token``) with Register, Deregister and
ReportLoad, and accepts Core.Shutdown only from a caller that sends it back.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import importlib
import inspect
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from loguru import logger

from hsu import identity as forwarded
from hsu import metrics, peer, tracecontext
from hsu._kernel import logsetup
from hsu._kernel.core_service import CORE_SERVICE, CoreServicer
from hsu._kernel.logbuffer import LogBuffer
from hsu._kernel.served import CallCounter
from hsu.core.v1 import core_pb2_grpc
from hsu.errors import HsuError
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu.ports import Identity
from hsu.storage import StorageClient

if TYPE_CHECKING:
    from hsu.cache import CacheClient
from hsu.tls import TLSConfig, aio_channel

ENV_KERNEL_ADDRESS = "HSU_KERNEL_ADDRESS"
ENV_UNIT = "HSU_UNIT"
ENV_INSTANCE_ID = "HSU_INSTANCE_ID"
ENV_LISTEN = "HSU_LISTEN"
#: the instance's token, and the gRPC metadata key that carries it both ways
ENV_INSTANCE_TOKEN = forwarded.ENV_TOKEN
TOKEN_METADATA = forwarded.TOKEN_METADATA
#: the one call of Core only the kernel may make
SHUTDOWN_METHOD = "/hsu.core.v1.Core/Shutdown"
DEFAULT_LISTEN = "127.0.0.1:0"
#: the shortest time between two load reports to the kernel
LOAD_REPORT_INTERVAL = 0.1
#: calls to these are not load: the kernel's own probes and controls
NOT_LOAD = ("/hsu.core.v1.", "/grpc.health.v1.", "/grpc.reflection.")


@attrs.frozen
class Service:
    """A servicer and how to add it to a server, with its full service name."""

    servicer: Any
    add_to_server: Callable[[Any, Any], None]
    name: str

    @classmethod
    def of(cls, servicer: Any) -> Service:
        """Find the generated ``add_XServicer_to_server`` and the full name of
        the service a grpcio-generated servicer implements."""
        if isinstance(servicer, Service):
            return servicer
        for base in type(servicer).__mro__:
            module_name = base.__module__
            if not (module_name.endswith("_pb2_grpc") and base.__name__.endswith("Servicer")):
                continue
            short = base.__name__[: -len("Servicer")]
            grpc_module = sys.modules[module_name]
            add = getattr(grpc_module, f"add_{base.__name__}_to_server", None)
            pb2 = importlib.import_module(module_name[: -len("_grpc")])
            service = pb2.DESCRIPTOR.services_by_name.get(short)
            if add is not None and service is not None:
                return cls(servicer, add, service.full_name)
        raise HsuError(
            f"{type(servicer).__name__} does not derive from a grpcio-generated *Servicer"
            " class; pass hsu.worker.Service(servicer, add_to_server, 'pkg.Service')"
        )


class LoadCounter(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts the calls in flight on the HSU's own interfaces.

    Calls ``on_change()`` whenever the count moves; the worker turns that into
    at most one ``Kernel.ReportLoad`` message per ``LOAD_REPORT_INTERVAL``.
    """

    def __init__(self, on_change: Callable[[], None]):
        self.inflight = 0
        self._on_change = on_change

    def _enter(self) -> None:
        self.inflight += 1
        self._on_change()

    def _exit(self) -> None:
        self.inflight -= 1
        self._on_change()

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(NOT_LOAD):
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(handler.stream_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._streaming(handler.unary_stream))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._streaming(handler.stream_stream))
        return handler

    def _unary(self, behavior: Any) -> Any:
        async def counted(request: Any, context: Any) -> Any:
            self._enter()
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result
            finally:
                self._exit()

        return counted

    def _streaming(self, behavior: Any) -> Any:
        async def counted(request: Any, context: Any) -> Any:
            self._enter()
            try:
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for reply in result:
                        yield reply
                elif inspect.isawaitable(result):
                    await result  # a handler that writes with context.write()
                elif result is not None:
                    for reply in result:
                        yield reply
            finally:
                self._exit()

        return counted


class TraceContext(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Each call's span (:mod:`hsu.tracecontext`): a child of the caller's
    ``traceparent`` (the kernel's attempt), current while the handler runs,
    so its log records carry ``trace_id`` and ``span_id``. A call without a
    valid ``traceparent`` has none (the SDK starts no trace of its own). An
    interceptor in front (``Worker(interceptors=)``) that made the call's
    span already (a child of the same parent, current when the call reaches
    this one) keeps it: the span it exports is the one the logs name."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        parent = tracecontext.from_metadata(details.invocation_metadata)
        if parent is None:
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_unary_in(parent, handler.unary_unary))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_unary_in(parent, handler.stream_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_streaming_in(parent, handler.unary_stream))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=_streaming_in(parent, handler.stream_stream))
        return handler


def _served_span(parent: tracecontext.SpanContext) -> tracecontext.SpanContext:
    """The call's span: the current one when an interceptor in front made it
    as a child of ``parent``, else a new child."""
    made = tracecontext.CURRENT.get()
    if made is not None and made.parent_id == parent.span_id and made.trace_id == parent.trace_id:
        return made
    return parent.child()


def _unary_in(parent: tracecontext.SpanContext, behavior: Any) -> Any:
    async def traced(request: Any, context: Any) -> Any:
        with tracecontext.use(_served_span(parent)):
            result = behavior(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result

    return traced


def _streaming_in(parent: tracecontext.SpanContext, behavior: Any) -> Any:
    async def traced(request: Any, context: Any) -> Any:
        with tracecontext.use(_served_span(parent)):
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):
                async for reply in result:
                    yield reply
            elif inspect.isawaitable(result):
                await result
            elif result is not None:
                for reply in result:
                    yield reply

    return traced


class ShutdownGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Core.Shutdown only from a caller sending ``hsu-instance-token`` equal to
    ``token`` (the kernel); any other caller gets PERMISSION_DENIED."""

    def __init__(self, token: str):
        self._token = token.encode()

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method != SHUTDOWN_METHOD:
            return await continuation(details)
        sent = next((v for k, v in details.invocation_metadata or () if k == TOKEN_METADATA), "")
        if isinstance(sent, str) and hmac.compare_digest(sent.encode(), self._token):
            return await continuation(details)
        return grpc.unary_unary_rpc_method_handler(_deny_shutdown)


#: what a caller without the cluster key may still call on an instance that
#: requires it: health (probes, load balancers) and Core's read-only facts
#: the kernel reads (Shutdown has its own guard)
PEER_OPEN = (
    "/grpc.health.v1.Health/",
    "/hsu.core.v1.Core/Ping",
    "/hsu.core.v1.Core/Info",
    "/hsu.core.v1.Core/Metrics",
)


class PeerGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """With a cluster key (``HSU_CLUSTER_KEY``, :mod:`hsu.peer`): every call
    but :data:`PEER_OPEN` carries a valid ``hsu-peer`` proof for this
    instance's address and the method, or the instance's own token (its
    kernel); any other gets UNAUTHENTICATED."""

    def __init__(self, verifier: peer.PeerVerifier, token: str):
        self.verifier = verifier
        self._token = token.encode()

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        method = details.method
        if method.startswith(PEER_OPEN):
            return await continuation(details)
        for k, v in details.invocation_metadata or ():
            if k == peer.METADATA and self.verifier.verify(v, method):
                return await continuation(details)
            if (
                k == TOKEN_METADATA
                and self._token
                and isinstance(v, str)
                and hmac.compare_digest(v.encode(), self._token)
            ):
                return await continuation(details)
        handler = await continuation(details)
        return _denied(handler, method)


def _denied(handler: Any, method: str) -> Any:
    why = (
        f"{method}: this instance takes calls only with a valid {peer.METADATA} proof"
        " (the cluster key: kernel.cluster_key, hsu.connect(cluster_key=...))"
    )

    async def deny(request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    async def deny_stream(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # pragma: no cover - abort raises

    if handler is None:  # no such method: still no answer but the refusal
        return grpc.unary_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        return make(
            deny_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    make = (
        grpc.stream_unary_rpc_method_handler
        if handler.request_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(
        deny,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def _deny_shutdown(request: Any, context: Any) -> None:
    await context.abort(
        grpc.StatusCode.PERMISSION_DENIED,
        f"Core.Shutdown: only the kernel that started this HSU may stop it ({TOKEN_METADATA})",
    )


class Worker:
    """One HSU process: its server, its registration, its shutdown."""

    def __init__(
        self,
        *servicers: Any,
        unit: str | None = None,
        version: str = "0",
        listen: str | None = None,
        kernel_address: str | None = None,
        instance_id: str | None = None,
        grace: float = 5.0,
        token: str | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
    ):
        if not servicers:
            raise HsuError("an HSU serves at least one interface: pass a servicer")
        self.services = [Service.of(s) for s in servicers]
        env = os.environ
        self.unit = unit or env.get(ENV_UNIT, "")
        self.version = version
        self.listen = listen or env.get(ENV_LISTEN) or DEFAULT_LISTEN
        self.kernel_address = kernel_address or env.get(ENV_KERNEL_ADDRESS, "")
        self.instance_id = instance_id or env.get(ENV_INSTANCE_ID, "")
        #: the secret the kernel gave (or, joining as an unmanaged instance,
        #: the unit's token): sent with every call to the kernel
        self.token = token if token is not None else env.get(ENV_INSTANCE_TOKEN, "")
        #: how to reach a kernel serving TLS on a TCP control address
        #: (``HSU_TLS_CA``/``_CERT``/``_KEY``, see :mod:`hsu.tls`)
        self.tls = TLSConfig.from_env()
        #: with the cluster key (the kernel's ``kernel.cluster_key``), calls need
        #: an ``hsu-peer`` proof (:mod:`hsu.peer`, docs/multihost.md)
        key = env.get(peer.ENV_KEY, "")
        self.peer = peer.PeerVerifier(key) if key else None
        self.grace = grace
        #: the caller's server interceptors, outside the SDK's own (so an
        #: OpenTelemetry server interceptor's span encloses the handler), and
        #: grpc server options (``grpc.max_receive_message_length``, ...)
        self.interceptors = list(interceptors)
        self.options = list(options)
        self.address = ""
        self.logs = LogBuffer()
        self._stop = asyncio.Event()
        self._stop_grace = grace
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self.load = LoadCounter(self._load_changed)
        #: the process's metrics (``hsu.metrics.REGISTRY``), which Core.Metrics
        #: answers with: its served calls, counted here, and the author's own
        #: (``worker.metrics.counter(...)``; docs/observability.md)
        self.metrics = metrics.REGISTRY
        self.calls = metrics.CallMetrics(self.metrics, "server") if metrics.enabled() else None
        self._reports: asyncio.Queue[int] | None = None
        self._report_pending = False
        self._reported = 0
        self._last_report = 0.0
        self._reporter: asyncio.Task[None] | None = None
        self._events: grpc.aio.Channel | None = None

    @property
    def interfaces(self) -> list[str]:
        return [s.name for s in self.services]

    def info(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "instance_id": self.instance_id,
            "version": self.version,
            "interfaces": self.interfaces,
            "address": self.address,
        }

    def request_stop(self, grace: float | None = None, reason: str = "") -> None:
        if grace is not None:
            self._stop_grace = grace
        if not self._stop.is_set():
            logger.info("stopping: {}", reason or "requested")
        self._stop.set()

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return ((TOKEN_METADATA, self.token),) if self.token else None

    async def start(self) -> str:
        interceptors: list[Any] = [*self.interceptors, TraceContext()]
        if self.peer is not None:
            interceptors.insert(0, PeerGuard(self.peer, self.token))
        if self.token:
            interceptors.append(ShutdownGuard(self.token))
        if self.kernel_address:
            interceptors.append(self.load)
        if self.calls is not None:
            interceptors.append(CallCounter(self.calls, self.unit))
        server = grpc.aio.server(interceptors=interceptors, options=self.options)
        for service in self.services:
            service.add_to_server(service.servicer, server)
        core = CoreServicer(self.info, self.request_stop, self.logs, self.grace)
        core_pb2_grpc.add_CoreServicer_to_server(core, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [*self.interfaces, CORE_SERVICE, "grpc.health.v1.Health"]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
        try:
            port = server.add_insecure_port(self.listen)
        except RuntimeError as exc:
            raise HsuError(f"cannot listen on {self.listen}: {exc}") from None
        await server.start()
        self._server = server
        if self.listen.startswith("unix:"):
            self.address = self.listen
        else:
            host = self.listen.rsplit(":", 1)[0]
            # listening on every interface: the kernel calls it on loopback
            host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
            self.address = f"{host}:{port}"
        if self.peer is not None:
            self.peer.address = self.address
        for name in ("", *names):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.kernel_address:
            await self._register()
            self._reports = asyncio.Queue()
            self._reporter = asyncio.ensure_future(self._report_load())
        else:
            logger.info("standalone: serving {} on {}", ", ".join(self.interfaces), self.address)
        return self.address

    @functools.cached_property
    def storage(self) -> StorageClient:
        """The kernel's storage, this unit's namespace (docs/storage.md):
        ``await worker.storage.get("", "key")``; ``""`` is the unit's own
        namespace, the only one an HSU may use."""
        if not self.kernel_address:
            raise HsuError("worker.storage: no kernel address (HSU_KERNEL_ADDRESS is not set)")
        return StorageClient(self.kernel_address, token=self.token, tls=self.tls)

    @functools.cached_property
    def cache(self) -> CacheClient:
        """The kernel's cache layers, this unit's namespace (docs/cache.md):
        ``await worker.cache.set("key", b"v", ttl=30)``; a value may be gone
        at any time (evicted, expired, a layer down)."""
        if not self.kernel_address:
            raise HsuError("worker.cache: no kernel address (HSU_KERNEL_ADDRESS is not set)")
        from hsu.cache import CacheClient

        return CacheClient(self.kernel_address, token=self.token, tls=self.tls)

    async def _register(self) -> None:
        request = kernel_pb2.RegisterRequest(
            instance_id=self.instance_id,
            unit=self.unit,
            address=self.address,
            interfaces=self.interfaces,
            pid=os.getpid(),
            version=self.version,
        )
        async with aio_channel(self.kernel_address, self.tls) as channel:
            stub = kernel_pb2_grpc.KernelStub(channel)
            reply = await stub.Register(
                request, timeout=10.0, wait_for_ready=True, metadata=self._metadata
            )
        self.instance_id = reply.instance_id
        logger.info(
            "registered with kernel at {} as {}, serving {} on {}",
            self.kernel_address,
            self.instance_id,
            ", ".join(self.interfaces),
            self.address,
        )

    async def publish(
        self,
        topic: str,
        data: dict[str, str] | None = None,
        *,
        reason: str = "",
        timeout: float = 5.0,
    ) -> int:
        """Publish an event on the kernel's bus (``Kernel.PublishEvent``,
        docs/tracing.md, "Events"); returns its sequence number.

        ``topic`` is this HSU's own (``orders.shipped``; the kernel refuses
        ``kernel.``, ``instance.``, ``worker.``, ``service.``, ``config.``);
        ``data`` at most 32 string pairs. At most 100 a second (a burst of
        200): more are refused with RESOURCE_EXHAUSTED.

        :raises hsu.errors.HsuError: not registered with a kernel, or the
            kernel refused the event (its reason in the message)
        """
        if not (self.kernel_address and self.instance_id):
            raise HsuError(f"publish {topic!r}: this HSU is not registered with a kernel")
        if self._events is None:
            self._events = aio_channel(self.kernel_address, self.tls)
        stub = kernel_pb2_grpc.KernelStub(self._events)
        request = kernel_pb2.PublishEventRequest(
            instance_id=self.instance_id, topic=topic, data=data or {}, reason=reason
        )
        try:
            reply = await stub.PublishEvent(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise HsuError(
                f"publish {topic!r}: the kernel at {self.kernel_address} refused:"
                f" {exc.code().name}: {exc.details()}"
            ) from None
        return int(reply.seq)

    async def stop(self) -> None:
        await self._health.enter_graceful_shutdown()
        if self.kernel_address and self.instance_id and self.address:
            await self._deregister()
        if self._server is not None:
            await self._server.stop(self._stop_grace)
        if self._reporter is not None:
            self._reporter.cancel()
            await asyncio.gather(self._reporter, return_exceptions=True)
        if "storage" in self.__dict__:
            await self.storage.close()
        if "cache" in self.__dict__:
            await self.cache.close()
        if self._events is not None:
            await self._events.close()
            self._events = None

    # -- load reports ------------------------------------------------------------

    def _load_changed(self) -> None:
        """At most one report per LOAD_REPORT_INTERVAL, and the last value always."""
        if self._reports is None or self._report_pending:
            return
        self._report_pending = True
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last_report + LOAD_REPORT_INTERVAL - loop.time())
        loop.call_later(delay, self._send_load)

    def _send_load(self) -> None:
        self._report_pending = False
        n = self.load.inflight
        if self._reports is None or n == self._reported:
            return
        self._reported = n
        self._last_report = asyncio.get_running_loop().time()
        self._reports.put_nowait(n)

    async def _report_load(self) -> None:
        """Stream load reports to the kernel; reconnect if the stream breaks."""
        assert self._reports is not None
        reports = self._reports

        async def messages() -> Any:
            yield kernel_pb2.LoadReport(instance_id=self.instance_id, inflight=self._reported)
            while True:
                n = await reports.get()
                yield kernel_pb2.LoadReport(instance_id=self.instance_id, inflight=n)

        backoff = 0.1
        while True:
            try:
                async with aio_channel(self.kernel_address, self.tls) as channel:
                    stub = kernel_pb2_grpc.KernelStub(channel)
                    await stub.ReportLoad(messages(), metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    logger.warning("load reports refused: {}", exc.details())
                    return
                logger.debug("load reports: {}", exc.code().name)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _deregister(self) -> None:
        """Best effort: the kernel may be the one stopping us, or gone."""
        try:
            async with aio_channel(self.kernel_address, self.tls) as channel:
                stub = kernel_pb2_grpc.KernelStub(channel)
                await stub.Deregister(
                    kernel_pb2.DeregisterRequest(instance_id=self.instance_id),
                    timeout=1.0,
                    metadata=self._metadata,
                )
        except grpc.aio.AioRpcError as exc:
            logger.debug("deregister: {}", exc.code().name)

    async def serve(self) -> None:
        """Start, wait for Core.Shutdown, SIGTERM or SIGINT, then stop."""
        loop = asyncio.get_running_loop()
        sink = logger.add(self.logs.sink, level="DEBUG")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, None, sig.name)
        try:
            try:
                await self.start()
                await self._stop.wait()
            finally:
                await self.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            logger.remove(sink)


def identity(context: Any, *, token: str | None = None) -> Identity | None:
    """Who made the call being served, as the kernel verified it (docs/auth.md).

    With auth on, the kernel's gateway forwards each routed call with the
    caller's identity in metadata ``hsu-identity``, signed with this
    instance's secret (``HSU_INSTANCE_TOKEN``, or ``token``); a caller cannot
    forge it. ``None`` when the call carries none that this instance can
    verify: auth is off, the call did not come through the kernel's gateway,
    or the header is forged, stale or made for another instance.
    """
    key = token if token is not None else os.environ.get(ENV_INSTANCE_TOKEN, "")
    sent = next(
        (v for k, v in context.invocation_metadata() or () if k == forwarded.METADATA), None
    )
    if sent is None or not key:
        return None
    return forwarded.verify(sent, key, os.environ.get(ENV_INSTANCE_ID) or None)


def configure_logging(level: str = "INFO") -> None:
    """Log as the kernel expects of an HSU it started (:func:`run` calls it;
    call it yourself when you drive :class:`Worker` from your own ``main``).

    Under a kernel, records go to stderr as ``LEVEL: message`` (the kernel
    timestamps and tags each line it captures) or, with ``HSU_LOG_FORMAT=json``
    (the kernel's ``--log-format json``), one JSON object a line carrying
    ``unit``, ``instance``, ``pid`` and, inside a call, ``trace_id`` and
    ``span_id`` (docs/tracing.md). Standalone without ``HSU_LOG_FORMAT``,
    loguru's default stays.
    """
    fmt = os.environ.get(logsetup.ENV_LOG_FORMAT, "")
    if not (os.environ.get(ENV_KERNEL_ADDRESS) or fmt == "json"):
        return
    logger.remove()
    logger.configure(
        patcher=logsetup.fields,
        extra={
            "unit": os.environ.get(ENV_UNIT, ""),
            "instance": os.environ.get(ENV_INSTANCE_ID, ""),
        },
    )
    logger.add(sys.stderr, level=level, **logsetup.sink_options(fmt, "{level}: {message}"))


def run(*servicers: Any, **kwargs: Any) -> None:
    """Serve until told to stop; see :class:`Worker` for the arguments.

    Exits with status 1 and one clear line when it cannot start (for example
    the kernel refused the registration).
    """
    configure_logging()
    bound = {"unit": os.environ.get(ENV_UNIT, ""), "instance": os.environ.get(ENV_INSTANCE_ID, "")}
    with logger.contextualize(**{k: v for k, v in bound.items() if v}):
        try:
            asyncio.run(Worker(*servicers, **kwargs).serve())
        except HsuError as exc:
            logger.error("{}", exc)
            raise SystemExit(1) from None
        except grpc.aio.AioRpcError as exc:
            logger.error("kernel refused: {}: {}", exc.code().name, exc.details())
            raise SystemExit(1) from None
