"""Routed calls: ``hsu.connect()`` gives a channel for any generated stub.

::

    async with hsu.connect("127.0.0.1:7420") as channel:
        echo = EchoStub(channel)
        reply = await echo.Echo(EchoRequest(message="hi"), timeout=2)

The channel is not bound to one server. Each call names its interface (the
service in its method path); the first call to an interface asks the kernel
where it is served (``Kernel.Resolve``), which starts an instance on demand
and waits until it is ready, then follows its endpoints
(``Kernel.WatchEndpoints``). Every call then picks an instance with the
unit's balancer, over a pooled channel per instance, with the unit's circuit
breaker per instance; an idempotent method (``routing.idempotent``) that
fails with UNAVAILABLE before any reply is tried again on another instance,
within the retry budget and the call's deadline.

Inside the kernel's process, :meth:`hsu.Kernel.connect` gives the same
channel over the kernel's own routes, without a round trip to itself.

Calls return the reply (unary) or an async iterator of replies (streaming),
like grpc.aio's; the call objects' extras (``initial_metadata()``,
``cancel()``) are not offered.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from loguru import logger

from hsu._kernel.routing import CHANNEL_OPTIONS, INSTANCE_FAILED, Policy, Route, endpoint_from_pb
from hsu.errors import HsuError
from hsu.ports import Endpoint

if TYPE_CHECKING:
    from hsu._kernel.kernel import Kernel
    from hsu._kernel.plugins import PluginManager

DEFAULT_KERNEL = "127.0.0.1:7420"
#: how long a call may wait for an instance to be started on demand when it
#: has no deadline of its own
START_TIMEOUT = 30.0


def connect(kernel: str | None = None, *, plugins: PluginManager | None = None) -> RoutedChannel:
    """A routed channel through the kernel at ``kernel`` (default:
    ``$HSU_KERNEL_ADDRESS``, else ``127.0.0.1:7420``).

    ``plugins`` supplies the balancers and breakers (default: every installed
    hsu plugin, loaded once). Use it as ``async with`` or ``await ch.close()``.
    """
    address = kernel or os.environ.get("HSU_KERNEL_ADDRESS") or DEFAULT_KERNEL
    return RoutedChannel(_RemoteResolver(address), plugins)


class _Resolver:
    """Where routes come from: a kernel over gRPC, or the kernel in-process."""

    async def route(self, interface: str, timeout: float | None) -> Route:
        raise NotImplementedError

    async def ensure(self, route: Route, timeout: float | None) -> None:
        raise NotImplementedError

    def began(self, ep: Endpoint) -> None:
        pass

    def ended(self, ep: Endpoint) -> None:
        pass

    async def close(self) -> None:
        pass


class RoutedChannel:
    """Duck-types ``grpc.aio.Channel`` for generated stubs; see the module docstring."""

    def __init__(self, resolver: _Resolver, plugins: PluginManager | None = None):
        self._resolver = resolver
        self._plugins = plugins
        if isinstance(resolver, _RemoteResolver):
            resolver.channel = self
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._routes: dict[str, Route] = {}
        self._resolving: dict[str, asyncio.Future[Route]] = {}
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()

    # -- grpc.aio.Channel's stub-facing half -----------------------------------

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> _UnaryUnary:
        return _UnaryUnary(self, method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> _Streaming:
        return _Streaming(self, method, request_serializer, response_deserializer, "unary_stream")

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> _StreamUnary:
        return _StreamUnary(self, method, request_serializer, response_deserializer)

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> _Streaming:
        return _Streaming(self, method, request_serializer, response_deserializer, "stream_stream")

    async def __aenter__(self) -> RoutedChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        await self._resolver.close()
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()

    # -- routing ------------------------------------------------------------

    def plugins(self) -> PluginManager:
        if self._plugins is None:
            from hsu._kernel.plugins import PluginManager

            self._plugins = PluginManager.load([])
        return self._plugins

    async def route(self, interface: str, timeout: float | None) -> Route:
        route = self._routes.get(interface)
        if route is not None:
            return route
        if self._closed:
            raise HsuError("the routed channel is closed")
        pending = self._resolving.get(interface)
        if pending is None:
            pending = asyncio.ensure_future(self._resolver.route(interface, timeout))
            self._resolving[interface] = pending
            pending.add_done_callback(lambda _: self._resolving.pop(interface, None))
        route = await asyncio.shield(pending)
        self._routes[interface] = route
        return route

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(
                address, options=CHANNEL_OPTIONS
            )
        return ch

    def forget_address(self, address: str) -> None:
        """No route lists ``address`` any more: close its channel."""
        if any(e.address == address for r in self._routes.values() for e in r.endpoints.values()):
            return
        ch = self._channels.pop(address, None)
        if ch is not None:
            task = asyncio.ensure_future(ch.close(grace=1.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def pick(
        self, interface: str, key: str | None, exclude: str, deadline: float | None
    ) -> tuple[Route, Endpoint]:
        """An endpoint for a call; starts an instance on demand if needed."""
        loop = asyncio.get_running_loop()
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        route = await self.route(interface, timeout)
        ep = route.pick(key, exclude)
        if ep is not None:
            return route, ep
        if not route.routable:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            await self._resolver.ensure(route, timeout)
            ep = route.pick(key)
            if ep is not None:
                return route, ep
        raise _unavailable(
            f"hsu: no instance serving {interface!r} can take the call"
            + (" (every one's circuit breaker is open)" if route.routable else "")
        )


class _Call:
    """What the four call kinds share."""

    def __init__(
        self, channel: RoutedChannel, method: str, serializer: Any, deserializer: Any
    ) -> None:
        self._ch = channel
        self._method = method
        self._interface = method.lstrip("/").partition("/")[0]
        self._ser = serializer
        self._de = deserializer
        #: the per-instance multicallable, by address
        self._calls: dict[str, Any] = {}

    def _key(self, route: Route, metadata: Any, key: str | None) -> str | None:
        if key is not None or not metadata:
            return key
        hk = route.policy.hash_key
        for k, v in metadata:
            if k == hk:
                return v if isinstance(v, str) else bytes(v).decode("latin-1")
        return None


class _UnaryUnary(_Call):
    async def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> Any:
        ch = self._ch
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        exclude = ""
        attempt = 0
        resolver = ch._resolver
        if metadata and key is None:
            key = self._key(await ch.route(self._interface, timeout), metadata, None)
        while True:
            route, ep = await ch.pick(self._interface, key, exclude, deadline)
            call = self._calls.get(ep.address)
            if call is None:
                call = self._calls[ep.address] = ch.channel(ep.address).unary_unary(
                    self._method, self._ser, self._de
                )
            route.begin(ep)
            resolver.began(ep)
            left = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                reply = await call(request, timeout=left, metadata=metadata, **kwargs)
            except grpc.aio.AioRpcError as exc:
                ok = exc.code() not in INSTANCE_FAILED
                route.end(ep, ok)
                resolver.ended(ep)
                attempt += 1
                if (
                    ok
                    or (deadline is not None and loop.time() >= deadline)
                    or not route.may_retry(self._method, attempt)
                ):
                    raise
                exclude = ep.instance_id
                continue
            except BaseException:
                route.end(ep, True)
                resolver.ended(ep)
                raise
            route.end(ep, True)
            resolver.ended(ep)
            return reply


class _StreamUnary(_Call):
    async def __call__(
        self,
        request_iterator: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> Any:
        ch = self._ch
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        if metadata and key is None:
            key = self._key(await ch.route(self._interface, timeout), metadata, None)
        route, ep = await ch.pick(self._interface, key, "", deadline)
        call = ch.channel(ep.address).stream_unary(self._method, self._ser, self._de)
        route.begin(ep)
        ch._resolver.began(ep)
        ok = True
        left = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            return await call(request_iterator, timeout=left, metadata=metadata, **kwargs)
        except grpc.aio.AioRpcError as exc:
            ok = exc.code() not in INSTANCE_FAILED
            raise
        finally:
            route.end(ep, ok)
            ch._resolver.ended(ep)


class _Streaming(_Call):
    """unary_stream and stream_stream: an async iterator of replies. A
    unary_stream call of an idempotent method is retried while no reply came."""

    def __init__(self, channel: RoutedChannel, method: str, ser: Any, de: Any, kind: str):
        super().__init__(channel, method, ser, de)
        self._kind = kind

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        return self._run(request, timeout, metadata, key, kwargs)

    async def _run(
        self, request: Any, timeout: float | None, metadata: Any, key: str | None, kwargs: Any
    ) -> AsyncIterator[Any]:
        ch = self._ch
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        exclude = ""
        attempt = 0
        if metadata and key is None:
            key = self._key(await ch.route(self._interface, timeout), metadata, None)
        while True:
            route, ep = await ch.pick(self._interface, key, exclude, deadline)
            factory = getattr(ch.channel(ep.address), self._kind)
            call = factory(self._method, self._ser, self._de)
            left = None if deadline is None else max(0.0, deadline - loop.time())
            route.begin(ep)
            ch._resolver.began(ep)
            replied = False
            ok = True
            try:
                stream = call(request, timeout=left, metadata=metadata, **kwargs)
                async for reply in stream:
                    replied = True
                    yield reply
                return
            except grpc.aio.AioRpcError as exc:
                ok = exc.code() not in INSTANCE_FAILED
                attempt += 1
                if (
                    ok
                    or replied
                    or self._kind != "unary_stream"
                    or not route.may_retry(self._method, attempt)
                ):
                    raise
                exclude = ep.instance_id
            finally:
                route.end(ep, ok)
                ch._resolver.ended(ep)


def _unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details
    )


# -- resolvers ------------------------------------------------------------------


class _RemoteResolver(_Resolver):
    """Routes from a kernel over its API: Resolve, then WatchEndpoints."""

    def __init__(self, address: str):
        self.address = address
        self.channel: RoutedChannel | None = None
        self._kernel_channel: grpc.aio.Channel | None = None
        self._watchers: dict[str, asyncio.Task[None]] = {}

    def _stub(self) -> Any:
        from hsu.kernel.v1 import kernel_pb2_grpc

        if self._kernel_channel is None:
            self._kernel_channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        return kernel_pb2_grpc.KernelStub(self._kernel_channel)

    async def _resolve(self, interface: str, ensure: bool, timeout: float | None) -> Any:
        from hsu.kernel.v1 import kernel_pb2

        try:
            return await self._stub().Resolve(
                kernel_pb2.ResolveRequest(interface=interface, ensure=ensure),
                timeout=START_TIMEOUT if timeout is None else timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details=f"hsu: {exc.details()}",
                ) from None
            if exc.code() is grpc.StatusCode.UNAVAILABLE and "no instance" not in (
                exc.details() or ""
            ):
                raise _unavailable(
                    f"hsu: no kernel answers at {self.address}: {exc.details()}"
                ) from None
            raise

    async def route(self, interface: str, timeout: float | None) -> Route:
        assert self.channel is not None
        reply = await self._resolve(interface, True, timeout)
        policy = Policy.from_pb(reply.policy)
        plugins = self.channel.plugins()
        policy = _installed(policy, plugins)
        route = Route(interface, policy, plugins)
        route.replace(endpoint_from_pb(e) for e in reply.endpoints)
        self._watchers[interface] = asyncio.ensure_future(self._watch(route))
        return route

    async def ensure(self, route: Route, timeout: float | None) -> None:
        reply = await self._resolve(route.interface, True, timeout)
        known = {e.instance_id for e in route.endpoints.values()}
        for msg in reply.endpoints:
            ep = endpoint_from_pb(msg)
            if ep.instance_id not in known or route.endpoints[ep.instance_id] != ep:
                route.put(ep)

    async def _watch(self, route: Route) -> None:
        from hsu.kernel.v1 import kernel_pb2

        backoff = 0.1
        while True:
            try:
                stream = self._stub().WatchEndpoints(
                    kernel_pb2.WatchEndpointsRequest(interface=route.interface)
                )
                async for update in stream:
                    backoff = 0.1
                    self._apply(route, update)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                logger.debug("hsu: endpoint watch of {} ended: {}", route.interface, exc.code())
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _apply(self, route: Route, update: Any) -> None:
        before = {e.address for e in route.endpoints.values()}
        if update.snapshot:
            route.replace(endpoint_from_pb(e) for e in update.endpoints)
        elif update.kind == "put":
            route.put(endpoint_from_pb(update.endpoints[0]))
        else:
            route.delete(update.endpoints[0].instance_id)
        gone = before - {e.address for e in route.endpoints.values()}
        if self.channel is not None:
            for address in gone:
                self.channel.forget_address(address)

    async def close(self) -> None:
        for task in self._watchers.values():
            task.cancel()
        await asyncio.gather(*self._watchers.values(), return_exceptions=True)
        self._watchers.clear()
        if self._kernel_channel is not None:
            await self._kernel_channel.close()
            self._kernel_channel = None


class _LocalResolver(_Resolver):
    """Routes from the kernel in this process (the gateway's own)."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel

    async def route(self, interface: str, timeout: float | None) -> Route:
        return self.kernel.routing.route(interface)

    async def ensure(self, route: Route, timeout: float | None) -> None:
        await self.kernel.routing.ensure(route.interface, timeout)

    def began(self, ep: Endpoint) -> None:
        self.kernel.routing.call_began(ep)

    def ended(self, ep: Endpoint) -> None:
        self.kernel.routing.call_ended(ep)


def local_channel(kernel: Kernel) -> RoutedChannel:
    return RoutedChannel(_LocalResolver(kernel), kernel.plugins)


def _installed(policy: Policy, plugins: PluginManager) -> Policy:
    """The policy, with a balancer or breaker this process lacks replaced by
    the default (and a warning)."""
    import attrs

    changes: dict[str, Any] = {}
    if policy.balancer not in plugins.balancer_names():
        logger.warning(
            "hsu: balancer {!r} of unit {!r} is not installed here; using round_robin",
            policy.balancer,
            policy.unit,
        )
        changes.update(balancer="round_robin", balancer_options={})
    if policy.breaker not in plugins.breaker_names():
        logger.warning(
            "hsu: breaker {!r} of unit {!r} is not installed here; using consecutive",
            policy.breaker,
            policy.unit,
        )
        changes.update(breaker="consecutive", breaker_options={})
    return attrs.evolve(policy, **changes) if changes else policy
