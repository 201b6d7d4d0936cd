"""The transparent gateway: any gRPC call to the kernel's address for a
method the kernel does not serve itself goes to an instance of the unit that
serves its interface.

The gateway never decodes a message: it forwards the raw bytes (and the
metadata, and the deadline) both ways, so it needs no ``.proto`` and works
for every interface, unary and streaming alike. A client in any language
calls ``/hsu.echo.v1.Echo/Echo`` on the kernel's port and needs no hsu
library at all.

A method is forwarded as a bidirectional stream (which is how gRPC carries
all four kinds on the wire) until the gateway knows its kind: the first call
to an interface makes it ask the instance's reflection service (which the
Python SDK serves) for the service's methods, and from then on unary and
server-streaming methods take their own, cheaper paths; an HSU without
reflection keeps the stream path. An instance is started on demand when the
interface has none; the unit's balancer picks one per call; a call that
fails with UNAVAILABLE before it got any reply is tried again on another
instance when the method is idempotent (``routing.idempotent``), its
requests were all kept (at most ``REPLAY_MESSAGES`` messages and
``REPLAY_BYTES`` bytes) and the retry budget allows. An instance the gateway
could not reach is ejected until its channel connects again (or the
registry drops it), and a call no listed instance can take waits for one
within its deadline: the same call loop as ``hsu.connect``
(:class:`hsu.client.route.Tries`).

A default plugin (``gateway``): per kernel, unless ``kernel.gateway: false``,
it registers a :class:`Gateway` whose hooks hand the kernel's server its
handler (``hsu_kernel_handlers``), close the pooled channel of an address
that left the registry (``hsu_endpoint_removed``) and close the rest when
the kernel has stopped. ``-p no:gateway`` leaves the kernel serving only its
own API; routed clients (``hsu.connect``) never go through the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from loguru import logger

import hsu
from hsu import tracecontext
from hsu.cache import reply_key
from hsu.client.route import CHANNEL_OPTIONS as LOCAL_CHANNEL_OPTIONS
from hsu.client.route import (
    Caller,
    Route,
    Tries,
    cannot_take,
    connected,
    priority_of,
    unavailable,
    until_connected,
)
from hsu.errors import HsuError, NoSuchUnit
from hsu.identity import METADATA as IDENTITY_METADATA
from hsu.metrics import method_kind, served_status
from hsu.ports import Cache, Endpoint, KernelAPI, RpcHandler

#: the name a kernel's gateway is registered under (``kernel.plugin(PLANE)``)
PLANE = "gateway.python"


@hsu.hookimpl
def hsu_kernel_configure(kernel: KernelAPI) -> None:
    if kernel.settings("kernel").gateway:
        kernel.register_plugin(Gateway(kernel), PLANE)


#: seconds before its deadline a queued call gives up (see ``Gateway._acquire``)
QUEUE_MARGIN = 0.05
#: requests kept for a retry; a longer request stream is not retried
REPLAY_MESSAGES = 64
REPLAY_BYTES = 4 * 2**20
#: metadata a proxy must not copy: HTTP/2 and gRPC's own
HOP_KEYS = frozenset(
    {
        "user-agent",
        "te",
        "content-type",
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        "grpc-message-type",
        "hsu-peer",
    }
)  # fmt: skip (hsu-peer: the kernel adds its own)
#: the caller's trace context: replaced by the kernel's span (an invalid
#: one is dropped, as W3C trace context says)
TRACE_KEYS = frozenset({tracecontext.TRACEPARENT, tracecontext.TRACESTATE})
#: what the gateway does not forward as the caller sent it (auth off, on)
DROP_KEYS = HOP_KEYS | TRACE_KEYS
DROP_KEYS_AUTH = DROP_KEYS | {"authorization"}
#: metadata only the kernel sets: a caller's is dropped (``hsu.identity``)
IDENTITY_PREFIX = IDENTITY_METADATA
#: a proxy does not limit message sizes: the two ends do
CHANNEL_OPTIONS = (
    *LOCAL_CHANNEL_OPTIONS,
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
)


class Gateway(grpc.GenericRpcHandler):  # type: ignore[misc]
    """The kernel's catch-all handler; see the module docstring."""

    def __init__(self, kernel: KernelAPI):
        self._kernel = kernel
        self._routes = kernel.routes
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._handlers: dict[str, Any] = {}
        #: (request streaming, response streaming) by method path, from reflection
        self.kinds: dict[str, tuple[bool, bool]] = {}
        #: unary multicallables by (address, method): made once, not per call
        self._unary_calls: dict[tuple[str, str], Any] = {}
        #: interfaces asked about (or being asked) over reflection
        self._learning: dict[str, asyncio.Task[None]] = {}
        #: channels closing (left to finish), watches of ejected instances'
        #: channels (cancelled on close)
        self._closing: set[asyncio.Task[None]] = set()
        self._watches: set[asyncio.Task[None]] = set()
        #: the share of calls without trace context the kernel traces
        #: (``kernel.trace_sample``)
        self.trace_sample: float = kernel.settings("kernel").trace_sample
        routes = self._routes
        observe = kernel.call_observer
        #: counts (and reports) a call refused before its first try
        self._observe = None if observe is None else self._observer(observe)
        self._caller = Caller(
            _failing,
            began=routes.call_began,
            ended=routes.call_ended,
            on_retry=_retrying,
            connected=lambda ep: connected(self._channels.get(ep.address)),
            watch=self._watch_ejected,
            acquire=self._acquire,
            release=routes.release,
            observe=self._observe,
        )

    def _observer(self, observe: Callable[..., None]) -> Callable[..., None]:
        """Count a call under its method's kind as reflection told it (the
        first calls of a method go as a stream before the gateway knows)."""
        kinds = self.kinds

        def observed(
            kind: str, method: str, unit: str, exc: BaseException | None, t0: float
        ) -> None:
            known = kinds.get(method)
            observe(kind if known is None else method_kind(*known), method, unit, exc, t0)

        return observed

    # -- as a plugin of its kernel ------------------------------------------------

    @hsu.hookimpl
    def hsu_kernel_handlers(self) -> list[RpcHandler]:
        return [self]

    @hsu.hookimpl
    def hsu_endpoint_removed(self, endpoint: Endpoint) -> None:
        self._forget(endpoint)

    @hsu.hookimpl
    def hsu_kernel_stopped(self) -> Awaitable[None]:
        return self.close()

    @hsu.hookimpl
    def hsu_config_reloaded(self) -> None:
        self.trace_sample = self._kernel.settings("kernel").trace_sample

    def service(self, handler_call_details: Any) -> Any:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            interface = method[1:].partition("/")[0]
            if not interface or "/" not in method[1:]:
                return None
            handler = self._handler(method, interface)
            if handler is None:
                return None
            if method in self.kinds and len(self._handlers) < 10_000:
                self._handlers[method] = handler
        return handler

    def _handler(self, method: str, interface: str) -> Any:
        kind = self.kinds.get(method)
        if kind == (False, False):

            async def unary(request: bytes, context: Any) -> bytes:
                return await self._unary(method, interface, request, context)

            return grpc.unary_unary_rpc_method_handler(unary)
        if kind == (False, True):

            async def server_streaming(request: bytes, context: Any) -> AsyncIterator[bytes]:
                async for reply in self._streaming(method, interface, request, context):
                    yield reply

            return grpc.unary_stream_rpc_method_handler(server_streaming)

        async def forward(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            async for reply in self._streaming(method, interface, _Requests(requests), context):
                yield reply

        return grpc.stream_stream_rpc_method_handler(forward)

    def _learn(self, interface: str, address: str) -> None:
        """Ask an instance's reflection service what kinds its methods are."""
        if interface in self._learning:
            return
        self._learning[interface] = asyncio.ensure_future(self._ask_reflection(interface, address))

    async def _ask_reflection(self, interface: str, address: str) -> None:
        from google.protobuf import descriptor_pb2
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        try:
            stub = reflection_pb2_grpc.ServerReflectionStub(self.channel(address))
            request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=interface)
            signer = self._kernel.peer_signer
            method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
            metadata = None if signer is None else (signer.header(address, method),)
            async for reply in stub.ServerReflectionInfo(
                iter([request]), timeout=5, metadata=metadata
            ):
                for raw in reply.file_descriptor_response.file_descriptor_proto:
                    fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                    for svc in fd.service:
                        name = f"{fd.package}.{svc.name}" if fd.package else svc.name
                        if name != interface:
                            continue
                        for m in svc.method:
                            kind = (m.client_streaming, m.server_streaming)
                            self.kinds[f"/{interface}/{m.name}"] = kind
                break
        except (grpc.aio.AioRpcError, ValueError) as exc:
            logger.debug("gateway: no reflection for {} at {}: {!r}", interface, address, exc)

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(
                address, options=CHANNEL_OPTIONS
            )
        return ch

    def _forget(self, ep: Endpoint) -> None:
        """No endpoint listens at ``ep.address`` any more: close its channel
        (calls on it get a second to end); the next call there opens a new one."""
        ch = self._channels.pop(ep.address, None)
        for k in [k for k in self._unary_calls if k[0] == ep.address]:
            del self._unary_calls[k]
        if ch is not None:
            self._spawn(ch.close(grace=1.0), self._closing)

    def _watch_ejected(self, route: Route, ep: Endpoint) -> None:
        self._spawn(
            until_connected(route, ep, lambda: self._channels.get(ep.address)), self._watches
        )

    @staticmethod
    def _spawn(work: Any, tasks: set[asyncio.Task[None]]) -> None:
        task = asyncio.ensure_future(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def close(self) -> None:
        tasks = [*self._learning.values(), *self._watches]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        channels, self._channels = self._channels, {}
        self._unary_calls.clear()
        for ch in channels.values():
            await ch.close()

    async def _route(self, interface: str, context: Any) -> Route:
        routes = self._routes
        try:
            route = routes.route(interface)
            if not route.routable:
                remaining = context.time_remaining()
                route = await routes.ensure(interface, remaining)
            return route
        except NoSuchUnit as exc:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"hsu gateway: {exc}")
        except (HsuError, TimeoutError) as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"hsu gateway: no instance serving {interface!r} is ready: {exc or 'timed out'}",
            )
        raise AssertionError("unreachable")

    async def _acquire(
        self, route: Route, key: str | None, exclude: str, priority: int, timeout: float | None
    ) -> tuple[Endpoint, Any]:
        """A slot for a unit with ``max_inflight``, from the kernel's queue.

        A call that waits gives up a little before its deadline, so that its
        client gets the queue's answer (unit, limit, depth), not its own
        timer's bare DEADLINE_EXCEEDED."""
        if timeout is not None:
            timeout = max(0.0, timeout - min(QUEUE_MARGIN, timeout / 10))
        grant = await self._routes.acquire(route.interface, key, exclude, priority, timeout)
        return grant.endpoint, grant

    def _trace(self, sent: Any) -> tracecontext.CallTrace | None:
        """The kernel's span of the call: a child of the caller's
        ``traceparent``, else the root of a new trace for a share
        ``kernel.trace_sample`` of the calls, else none. Current while the
        call is served (its log records carry it); the parts of a sampled
        one are recorded (returned), and each attempt's span is the parent
        its instance is told of."""
        parent = tracecontext.from_metadata(sent)
        if parent is not None:
            span = parent.child()
        elif self.trace_sample and random.random() < self.trace_sample:
            span = tracecontext.SpanContext.new()
        else:
            return None
        tracecontext.CURRENT.set(span)
        if not span.sampled:
            return None
        trace = tracecontext.CallTrace(span)
        tracecontext.CALL.set(trace)
        return trace

    def _call_key(self, route: Route, sent: Any) -> tuple[tuple[tuple[str, Any], ...], Any]:
        # what a caller says of its identity is dropped: the kernel's own
        # (signed) is added per instance; the credential is the kernel's alone
        drop = DROP_KEYS if self._kernel.caller_identity() is None else DROP_KEYS_AUTH
        metadata = tuple(
            (k, v) for k, v in sent if k not in drop and not k.startswith((":", IDENTITY_PREFIX))
        )
        # a call traced but not sampled: its instance is told of the
        # kernel's span (a sampled one's attempts send their own, ``_for``)
        span = tracecontext.CURRENT.get()
        if span is not None and not span.sampled:
            metadata = (*metadata, *span.metadata())
        hk = route.policy.hash_key
        key = next((v for k, v in metadata if k == hk), None)
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        return metadata, key

    async def _tries(
        self,
        method: str,
        interface: str,
        context: Any,
        replayable: Callable[[], Awaitable[bool]] | None = None,
    ) -> tuple[Tries, tuple[tuple[str, Any], ...]]:
        """The call's tries, and the metadata it forwards. A call refused
        before its first try (no unit serves the interface, no instance could
        be started for it, a bad priority) is counted and reported here, as
        the tries count every other."""
        t0 = time.perf_counter()
        sent = context.invocation_metadata() or ()
        trace = self._trace(sent)
        try:
            route: Route | None = self._routes.route(interface)
        except HsuError:
            route = None
        unit = "" if route is None else route.policy.unit
        try:
            if route is None or not route.routable:
                began = 0 if trace is None else time.time_ns()
                try:
                    route = await self._route(interface, context)
                finally:
                    if trace is not None:
                        attributes = {"hsu.unit": unit, "hsu.interface": interface}
                        if route is not None and route.routable:
                            attributes["hsu.unit"] = route.policy.unit
                        else:
                            attributes["error.type"] = _code_name(context)
                        trace.add(tracecontext.COLD_START, began, time.time_ns(), attributes)
                        trace.picking()
            unit = route.policy.unit
            metadata, key = self._call_key(route, sent)
            priority = 0
            if route.policy.max_inflight:
                try:
                    priority = priority_of(metadata)
                except HsuError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"hsu gateway: {exc}")
        except BaseException as exc:
            if self._observe is not None:
                refused = served_status(context, exc)
                self._observe("stream_stream", method, unit, refused, t0)
            raise
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        tries = Tries(
            self._caller,
            route,
            method,
            key,
            deadline=deadline,
            retries=True,
            replayable=replayable,
            priority=priority,
            kind="stream_stream",
            trace=trace,
        )
        return tries, metadata

    def _ensure(self, context: Any) -> Callable[[Route, float | None], Awaitable[Route]]:
        return lambda route, _left: self._route(route.interface, context)

    def _for(
        self, ep: Endpoint, method: str, metadata: tuple[tuple[str, Any], ...], tries: Tries
    ) -> tuple[tuple[str, Any], ...]:
        """The metadata for a try at ``ep``: its attempt's ``traceparent``
        (a sampled call's), the caller's identity, signed for it, and the
        cluster's proof (``hsu-peer``, :mod:`hsu.peer`)."""
        trace = tries.trace
        if trace is not None:
            metadata = (*metadata, *trace.metadata())
        signer = self._kernel.peer_signer
        if signer is not None:
            metadata = (*metadata, signer.header(ep.address, method))
        caller = self._kernel.caller_identity()
        if caller is None:
            return metadata
        signed = self._kernel.forward_identity(caller, ep.instance_id)
        return metadata if signed is None else (*metadata, (IDENTITY_METADATA, signed))

    def _reply_key(
        self, method: str, interface: str, request: bytes, context: Any
    ) -> tuple[Cache, str, float] | None:
        """Where a reply to this call is cached, under which key and for how
        long, when its unit caches the method (``routing.cache``)."""
        cache = self._kernel.cache
        if cache is None:
            return None
        try:
            policy = self._routes.route(interface).policy
        except HsuError:
            return None
        ttl = policy.cache_ttl_for(method)
        if ttl is None:
            return None
        sent = context.invocation_metadata() or ()
        return cache, reply_key(method, request, sent, policy.cache_key_metadata), ttl

    async def _keep(self, cache: Cache, key: str, reply: bytes, ttl: float) -> None:
        """Cache an OK reply; a failure is the cache's (logged and counted by
        its layers), never the call's."""
        try:
            if len(reply) <= self._kernel.settings("cache").max_value_bytes:
                await cache.set(key, reply, ttl=ttl)
        except Exception as exc:
            logger.debug("gateway: caching a reply failed: {!r}", exc)

    async def _unary(self, method: str, interface: str, request: bytes, context: Any) -> bytes:
        """A unary call: the request is one message, so any try can replay it.
        A method its unit caches is answered from the cache when it can be."""
        cached = self._reply_key(method, interface, request, context)
        if cached is not None:
            try:
                hit = await cached[0].get(cached[1])
            except Exception as exc:
                logger.debug("gateway: reading the reply cache failed: {!r}", exc)
                hit = None
            if hit is not None:
                return hit.value
        tries, metadata = await self._tries(method, interface, context)

        async def attempt(ep: Endpoint) -> bytes:
            mc = self._unary_calls.get((ep.address, method))
            if mc is None:
                mc = self._unary_calls[ep.address, method] = self.channel(ep.address).unary_unary(
                    method
                )
            call = mc(
                request,
                timeout=context.time_remaining(),
                metadata=self._for(ep, method, metadata, tries),
            )
            reply: bytes = await call
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(tuple(initial))
            await _relay_trailing(call, context)
            return reply

        try:
            reply = await tries.call_async(attempt, self._ensure(context))
        except grpc.aio.AioRpcError as exc:
            await _fail(exc, context)
        if cached is not None:
            await self._keep(cached[0], cached[1], reply, cached[2])
        return reply

    async def _streaming(
        self, method: str, interface: str, request: bytes | _Requests, context: Any
    ) -> AsyncIterator[bytes]:
        """A server-streaming call (one request), or any kind as a stream
        (``_Requests``, until reflection told the method's kind): retried only
        when every request was kept."""
        reqs = request if isinstance(request, _Requests) else None
        replayable = None if reqs is None else reqs.read_all
        tries, metadata = await self._tries(method, interface, context, replayable)

        def attempt(ep: Endpoint) -> AsyncIterator[bytes]:
            channel = self.channel(ep.address)
            timeout = context.time_remaining()
            metadata_ep = self._for(ep, method, metadata, tries)
            if reqs is None:
                call = channel.unary_stream(method)(request, timeout=timeout, metadata=metadata_ep)
            else:
                if interface not in self._learning:
                    self._learn(interface, ep.address)
                call = channel.stream_stream(method)(
                    reqs.stream(), timeout=timeout, metadata=metadata_ep
                )
            return _relay(call, context)

        try:
            async for reply in tries.run_async(attempt, self._ensure(context)):
                yield reply
        except grpc.aio.AioRpcError as exc:
            await _fail(exc, context)


async def _relay(call: Any, context: Any) -> AsyncIterator[bytes]:
    """One try's replies, and its metadata, to the caller."""
    replied = False
    try:
        async for reply in call:
            if not replied:
                replied = True
                with contextlib.suppress(Exception):
                    await context.send_initial_metadata(await call.initial_metadata())
            yield reply
        await _relay_trailing(call, context)
    except asyncio.CancelledError:
        call.cancel()
        raise


async def _relay_trailing(call: Any, context: Any) -> None:
    trailing = await call.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(tuple(trailing))


def _code_name(context: Any) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


async def _fail(exc: Any, context: Any) -> NoReturn:
    """End the call with the error of its last try (its code, details and
    trailing metadata)."""
    trailing = exc.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(tuple(trailing))
    await context.abort(exc.code(), exc.details() or "")
    raise AssertionError("unreachable")


def _failing(route: Route) -> BaseException:
    return unavailable(f"hsu gateway: {cannot_take(route).removeprefix('hsu: ')}")


def _retrying(method: str, ep: Endpoint, code: grpc.StatusCode) -> None:
    logger.bind(unit=ep.unit, instance=ep.instance_id).debug(
        "gateway: {} on {}: {}; trying another instance", method, ep.instance_id, code.name
    )


class _Requests:
    """A call's request stream, kept (within bounds) so a retry can replay it.

    Every attempt reads through :meth:`stream`, from the start: what was read
    already comes from memory, the rest from the caller.
    """

    def __init__(self, source: AsyncIterator[bytes]):
        self._from = source
        self._source: AsyncIterator[bytes] | None = None  # opened on the first read
        self._lock = asyncio.Lock()
        self.kept: list[bytes] = []
        self.size = 0
        self.done = False
        self.replayable = True

    async def _next(self) -> bytes | None:
        """Read one more message from the caller (None at its end)."""
        if self._source is None:
            self._source = self._from.__aiter__()
        try:
            msg = await self._source.__anext__()
        except StopAsyncIteration:
            self.done = True
            return None
        self.size += len(msg)
        if self.replayable and len(self.kept) < REPLAY_MESSAGES and self.size <= REPLAY_BYTES:
            self.kept.append(msg)
        else:
            self.replayable = False
            self.kept.clear()
        return msg

    async def stream(self) -> AsyncIterator[bytes]:
        i = 0
        while True:
            if self.replayable and i < len(self.kept):
                i += 1
                yield self.kept[i - 1]
                continue
            if self.done:
                return
            async with self._lock:
                if self.replayable and i < len(self.kept):
                    continue
                if self.done:
                    return
                msg = await self._next()
            if msg is None:
                return
            i += 1
            yield msg

    async def read_all(self) -> bool:
        """Read the rest of the caller's stream; True when all of it is kept."""
        async with self._lock:
            while self.replayable and not self.done:
                await self._next()
        return self.replayable
