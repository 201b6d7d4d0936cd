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
within the retry budget and the call's deadline. An instance the channel
could not reach is ejected until its channel connects again (or the
registry replaces it); a call that no listed instance can take waits for one
within its deadline. The channel of an address the registry dropped is
closed, and never used again: an instance listening there later gets a new one.

Inside the kernel's process, :meth:`hsu.Kernel.connect` gives the same
channel over the kernel's own routes, without a round trip to itself.

Calls return grpc.aio's call objects (:mod:`hsu.client.calls`): await a
unary one for its reply, iterate a streaming one (or ``read()`` it); each
has ``initial_metadata()``, ``trailing_metadata()``, ``code()``,
``details()``, ``cancel()``, ``done()`` and ``add_done_callback()``, which
speak for the try that got through.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from loguru import logger

from hsu import peer, tracecontext
from hsu.client.calls import Requests, StreamCall, UnaryCall
from hsu.client.credentials import Metadata, bearer
from hsu.client.route import (
    CHANNEL_OPTIONS,
    Caller,
    Factories,
    Policy,
    Route,
    RoutedMethod,
    apply_update,
    cannot_take,
    connected,
    endpoint_from_pb,
    installed,
    load_plugins,
    unavailable,
    until_connected,
)
from hsu.errors import HsuError
from hsu.metrics import client_observer
from hsu.peer import PeerSigner
from hsu.ports import SERVING, Endpoint
from hsu.tls import TLSConfig, aio_channel

if TYPE_CHECKING:
    from hsu.cache import MemoryCache


def control_address(kernel: str | None = None) -> str:
    """``kernel``, else ``$HSU_CONTROL`` or ``$HSU_KERNEL_ADDRESS`` (what a
    kernel gives the HSUs it starts), else the control address of the one
    kernel running as this user (``hsu._kernel.control``)."""
    from hsu._kernel.control import resolve

    return resolve(kernel)


#: how long a call may wait for an instance to be started on demand when it
#: has no deadline of its own
START_TIMEOUT = 30.0


#: bytes of replies a routed channel keeps for units with ``routing.cache``
CACHE_BYTES = 16 * 2**20

#: seconds a caller keeps a slot (``routing.max_inflight``) its call gave
#: back, for its next call of the interface: with slots free, steady calls
#: cost no round trip to the kernel; the kernel asks for them back as soon as
#: another caller waits (``SlotReplies.reclaim``)
SLOT_LINGER = 0.05


def connect(
    kernel: str | None = None,
    *,
    plugins: Factories | None = None,
    tls: TLSConfig | None = None,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    cache_bytes: int = CACHE_BYTES,
    cluster_key: str | None = None,
) -> RoutedChannel:
    """A routed channel through the kernel at ``kernel`` (default:
    its control address: ``$HSU_CONTROL``,
    ``$HSU_KERNEL_ADDRESS``, else the one kernel running as this user).

    ``plugins`` supplies the balancers and breakers (default: every installed
    hsu plugin, loaded once). ``tls``: how to reach a kernel that serves TLS
    on a TCP control address (default: ``HSU_TLS_CA``/``_CERT``/``_KEY``
    when set, see :mod:`hsu.tls`). ``token``: a bearer token for a kernel
    with auth on, sent with each call to it (default: the first line of
    ``token_file``, else of ``$HSU_TOKEN_FILE`` when set; docs/auth.md).
    ``cache_bytes``: the channel's own reply cache for units that declare
    ``routing.cache`` (an LRU in this process, bounded in bytes; 0: none;
    docs/cache.md).
    ``cluster_key``: the kernels' ``kernel.cluster_key``, which every call to
    an instance is signed with (:mod:`hsu.peer`; default
    ``$HSU_CLUSTER_KEY``, which the kernel gives the HSUs it starts): needed
    for instances that require it (``kernel.advertise``, docs/multihost.md).
    Use it as ``async with`` or ``await ch.close()``.
    """
    address = control_address(kernel)
    tls = TLSConfig.from_env() if tls is None else tls
    metadata = bearer(token, token_file)
    return RoutedChannel(
        _RemoteResolver(address, tls, metadata),
        plugins,
        cache_bytes,
        signer=peer.signer(cluster_key),
    )


class _Resolver:
    """Where routes come from: a kernel over gRPC, or the kernel in-process."""

    #: the in-process kernel's count of the calls through it
    began: Callable[[Endpoint], None] | None = None
    ended: Callable[[Endpoint], None] | None = None

    async def acquire(
        self, route: Route, key: str | None, exclude: str, priority: int, timeout: float | None
    ) -> tuple[Endpoint, Any]:
        """A slot on an instance of a unit with ``max_inflight`` (the kernel's)."""
        raise NotImplementedError

    def release(self, grant: Any) -> None:
        raise NotImplementedError

    async def route(self, interface: str, timeout: float | None) -> Route:
        raise NotImplementedError

    async def ensure(self, route: Route, timeout: float | None) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


def _no_instance(route: Route) -> BaseException:
    return unavailable(cannot_take(route))


class RoutedChannel:
    """Duck-types ``grpc.aio.Channel`` for generated stubs; see the module docstring."""

    def __init__(
        self,
        resolver: _Resolver,
        plugins: Factories | None = None,
        cache_bytes: int = CACHE_BYTES,
        *,
        signer: PeerSigner | None = None,
    ):
        self._resolver = resolver
        self._plugins = plugins
        self._cache_bytes = cache_bytes
        self._reply_cache: Any = None
        #: signs every call to an instance with the cluster key (:mod:`hsu.peer`)
        self.signer = signer
        if isinstance(resolver, _RemoteResolver):
            resolver.channel = self
        self._caller = Caller(
            _no_instance,
            began=resolver.began,
            ended=resolver.ended,
            connected=lambda ep: connected(self._channels.get(ep.address)),
            watch=self._watch_ejected,
            acquire=resolver.acquire,
            release=resolver.release,
            observe=client_observer(),
        )
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._routes: dict[str, Route] = {}
        self._resolving: dict[str, asyncio.Future[Route]] = {}
        self._closed = False
        #: channels closing (left to finish), watches of ejected instances'
        #: channels (cancelled on close)
        self._closing: set[asyncio.Task[None]] = set()
        self._watches: set[asyncio.Task[None]] = set()

    # -- grpc.aio.Channel's stub-facing half -----------------------------------

    def unary_unary(self, method: str, request_serializer: Any = None,
                    response_deserializer: Any = None, **_: Any) -> _Unary:  # fmt: skip
        return _Unary(self, method, request_serializer, response_deserializer, "unary_unary")

    def unary_stream(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, **_: Any) -> _Streaming:  # fmt: skip
        return _Streaming(self, method, request_serializer, response_deserializer, "unary_stream")

    def stream_unary(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, **_: Any) -> _Unary:  # fmt: skip
        return _Unary(self, method, request_serializer, response_deserializer, "stream_unary")

    def stream_stream(self, method: str, request_serializer: Any = None,
                      response_deserializer: Any = None, **_: Any) -> _Streaming:  # fmt: skip
        return _Streaming(self, method, request_serializer, response_deserializer, "stream_stream")

    async def __aenter__(self) -> RoutedChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        await self._resolver.close()
        for task in self._watches:
            task.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()

    def kernel_stub(self) -> tuple[Any, Any]:
        """The Kernel API's stub this channel uses, and its credential
        metadata (for :func:`hsu.lease`)."""
        resolver = self._resolver
        if not isinstance(resolver, _RemoteResolver):
            raise HsuError(
                "this channel routes inside the kernel's process and has no Kernel API"
                " stub: lease through the kernel's control address instead"
            )
        return resolver._stub(), resolver.metadata

    def reply_cache(self) -> MemoryCache | None:
        """This channel's own cache of replies (``routing.cache``), made on
        first use: in the caller's process, shared with no one (the kernel's
        layers serve the gateway); None with ``cache_bytes=0``."""
        if self._reply_cache is None and self._cache_bytes > 0:
            from hsu.cache import MemoryCache

            self._reply_cache = MemoryCache(self._cache_bytes)
        cache: MemoryCache | None = self._reply_cache
        return cache

    # -- routing ------------------------------------------------------------

    def plugins(self) -> Factories:
        if self._plugins is None:
            self._plugins = load_plugins()
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

    async def ensure(self, route: Route, timeout: float | None) -> Route:
        """The route, once an instance was started on demand."""
        await self._resolver.ensure(route, timeout)
        return route

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(
                address, options=CHANNEL_OPTIONS
            )
        return ch

    def channel_of(self, address: str) -> grpc.aio.Channel | None:
        return self._channels.get(address)

    def forget_address(self, address: str) -> None:
        """No route lists ``address`` any more: close its channel (calls on
        it get a second to end); the next call there opens a new one."""
        if any(e.address == address for r in self._routes.values() for e in r.endpoints.values()):
            return
        ch = self._channels.pop(address, None)
        if ch is not None:
            self._spawn(ch.close(grace=1.0), self._closing)

    def _watch_ejected(self, route: Route, ep: Endpoint) -> None:
        if not self._closed:
            self._spawn(
                until_connected(route, ep, lambda: self._channels.get(ep.address)), self._watches
            )

    @staticmethod
    def _spawn(work: Any, tasks: set[asyncio.Task[None]]) -> None:
        task = asyncio.ensure_future(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)


class _Call(RoutedMethod):
    def __init__(self, ch: RoutedChannel, method: str, ser: Any, de: Any, kind: str) -> None:
        super().__init__(ch._caller, ch, method, ser, de, kind)
        self._ch = ch


class _Unary(_Call):
    """unary_unary and stream_unary: a :class:`~hsu.client.calls.UnaryCall`."""

    def __call__(
        self,
        request: Any = None,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> UnaryCall:
        writer = Requests() if request is None and self._kind == "stream_unary" else None
        call = UnaryCall(timeout, writer)
        return call.start(
            self._invoke(
                call, request if writer is None else writer, timeout, metadata, key, kwargs
            )
        )

    async def _invoke(
        self,
        call: UnaryCall,
        request: Any,
        timeout: float | None,
        metadata: Any,
        key: str | None,
        kwargs: Any,
    ) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        ch = self._ch  # the route's lookup without a coroutine, once it is known:
        route = ch._routes.get(self._interface) or await ch.route(self._interface, timeout)
        kept = None
        if self._kind == "unary_unary" and route.policy.cache_methods:
            kept = self.cached(ch.reply_cache(), route, request, metadata)
            if kept is not None and kept[1] is not None:
                return kept[1]
        metadata = tracecontext.outgoing(metadata)
        tries = self._tries(route, deadline, metadata, key)

        def attempt(ep: Endpoint) -> Any:
            if call.is_cancelled:  # cancelled before this try began
                raise asyncio.CancelledError()
            made = self._callable(ep.address)(
                request, timeout=tries.left(), metadata=self._signed(ep, metadata), **kwargs
            )
            call.set_attempt(made)
            return made

        reply = await tries.call_async(attempt, ch.ensure)
        if kept is not None:
            self.keep(ch.reply_cache(), kept[0], reply, route)
        return reply


class _Streaming(_Call):
    """unary_stream and stream_stream: a :class:`~hsu.client.calls.StreamCall`."""

    def __call__(
        self,
        request: Any = None,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> StreamCall:
        writer = Requests() if request is None and self._kind == "stream_stream" else None
        call = StreamCall(timeout, writer)
        return call.start(
            self._run(call, request if writer is None else writer, timeout, metadata, key, kwargs)
        )

    async def _run(
        self,
        call: StreamCall,
        request: Any,
        timeout: float | None,
        metadata: Any,
        key: str | None,
        kwargs: Any,
    ) -> AsyncIterator[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        metadata = tracecontext.outgoing(metadata)
        tries = self._tries(await self._ch.route(self._interface, timeout), deadline, metadata, key)

        def attempt(ep: Endpoint) -> Any:
            if call.is_cancelled:
                raise asyncio.CancelledError()
            made = self._callable(ep.address)(
                request, timeout=tries.left(), metadata=self._signed(ep, metadata), **kwargs
            )
            call.set_attempt(made)
            return made

        async with contextlib.aclosing(tries.run_async(attempt, self._ch.ensure)) as replies:
            async for reply in replies:
                yield reply


# -- resolvers ------------------------------------------------------------------


class _RemoteResolver(_Resolver):
    """Routes from a kernel over its API: Resolve, then WatchEndpoints."""

    def __init__(self, address: str, tls: TLSConfig | None = None, metadata: Metadata = ()):
        self.address = address
        self.tls = tls
        #: the caller's credential, sent with each call to the kernel
        self.metadata = metadata or None
        self.channel: RoutedChannel | None = None
        self._kernel_channel: grpc.aio.Channel | None = None
        self._watchers: dict[str, asyncio.Task[None]] = {}
        #: the Slots stream: requests to send, replies awaited by request id
        self._slot_requests: asyncio.Queue[Any] | None = None
        self._slot_reader: asyncio.Task[None] | None = None
        self._slot_waits: dict[int, asyncio.Future[Any]] = {}
        self._slot_ids = 0
        #: slots given back by a call and kept for the next call of the same
        #: interface (no round trip), per interface: (instance, grant, since)
        self._idle_slots: dict[str, list[tuple[Endpoint, Any, float]]] = {}
        #: slot requests sent and not answered yet, per interface
        self._slot_pending: dict[str, int] = {}
        #: per interface, until when no slot is kept (the kernel asked)
        self._reclaimed: dict[str, float] = {}
        self._linger: asyncio.TimerHandle | None = None

    def _stub(self) -> Any:
        from hsu.kernel.v1 import kernel_pb2_grpc

        if self._kernel_channel is None:
            self._kernel_channel = aio_channel(self.address, self.tls, CHANNEL_OPTIONS)
        return kernel_pb2_grpc.KernelStub(self._kernel_channel)

    async def _resolve(self, interface: str, ensure: bool, timeout: float | None) -> Any:
        from hsu.kernel.v1 import kernel_pb2

        try:
            return await self._stub().Resolve(
                kernel_pb2.ResolveRequest(interface=interface, ensure=ensure),
                timeout=START_TIMEOUT if timeout is None else timeout,
                metadata=self.metadata,
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
                raise unavailable(
                    f"hsu: no kernel answers at {self.address}: {exc.details()}"
                ) from None
            raise

    async def route(self, interface: str, timeout: float | None) -> Route:
        assert self.channel is not None
        reply = await self._resolve(interface, True, timeout)
        policy = Policy.from_pb(reply.policy)
        plugins = self.channel.plugins()
        policy = installed(policy, plugins)
        route = Route(interface, policy, plugins)
        route.replace(endpoint_from_pb(e) for e in reply.endpoints)
        self._watchers[interface] = asyncio.ensure_future(self._watch(route))
        return route

    async def ensure(self, route: Route, timeout: float | None) -> None:
        reply = await self._resolve(route.interface, True, timeout)
        if route.routable:
            return  # the watch listed one meanwhile: it is the newer word
        for msg in reply.endpoints:
            route.put(endpoint_from_pb(msg))  # one already listed as it is stays as it is

    async def _watch(self, route: Route) -> None:
        from hsu.kernel.v1 import kernel_pb2

        backoff = 0.1
        while True:
            try:
                stream = self._stub().WatchEndpoints(
                    kernel_pb2.WatchEndpointsRequest(interface=route.interface),
                    metadata=self.metadata,
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
        apply_update(route, update)
        gone = before - {e.address for e in route.endpoints.values()}
        if self.channel is not None:
            for address in gone:
                self.channel.forget_address(address)

    # -- slots (units with max_inflight) ----------------------------------------

    def _slots(self) -> asyncio.Queue[Any]:
        """The Slots stream's request queue (the stream opened on first use,
        again after it broke: the kernel gave back what the old one held)."""
        if self._slot_requests is None or self._slot_reader is None or self._slot_reader.done():
            requests: asyncio.Queue[Any] = asyncio.Queue()
            self._slot_requests = requests

            async def send() -> AsyncIterator[Any]:
                from hsu.kernel.v1 import kernel_pb2

                # every request ready now goes in one message
                while (req := await requests.get()) is not None:
                    batch = [req]
                    while not requests.empty():
                        more = requests.get_nowait()
                        if more is None:
                            yield kernel_pb2.SlotRequests(requests=batch)
                            return
                        batch.append(more)
                    yield kernel_pb2.SlotRequests(requests=batch)

            call = self._stub().Slots(send(), metadata=self.metadata)
            self._slot_reader = asyncio.ensure_future(self._read_slots(call))
        return self._slot_requests

    async def _read_slots(self, call: Any) -> None:
        error = "the kernel's Slots stream ended"
        try:
            async for batch in call:
                if batch.reclaim:
                    until = asyncio.get_running_loop().time() + SLOT_LINGER
                    for interface in batch.reclaim:
                        self._reclaimed[interface] = until
                        self._give_back_idle(interface)
                for reply in batch.replies:
                    fut = self._slot_waits.pop(reply.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(reply)
                    elif reply.code == 0 and self._slot_requests is not None:
                        # granted after the caller gave up: give it back
                        self._slot_requests.put_nowait(self._release_pb(reply.id))
        except grpc.aio.AioRpcError as exc:
            error = f"the kernel's Slots stream broke: {exc.code().name} {exc.details()}"
        finally:
            waits, self._slot_waits = self._slot_waits, {}
            for fut in waits.values():
                if not fut.done():
                    fut.set_exception(HsuError(error))

    @staticmethod
    def _release_pb(request_id: int) -> Any:
        from hsu.kernel.v1 import kernel_pb2

        return kernel_pb2.SlotRequest(id=request_id, release=True)

    async def acquire(
        self, route: Route, key: str | None, exclude: str, priority: int, timeout: float | None
    ) -> tuple[Endpoint, Any]:
        from hsu.client.route import slot_reply
        from hsu.kernel.v1 import kernel_pb2

        requests = self._slots()
        if not key:  # a slot kept from this caller's last call, if any fits
            idle = self._idle_slots.get(route.interface)
            while idle:
                ep, grant, _ = idle.pop()
                listed = route.endpoints.get(ep.instance_id)
                if grant[0] is not requests:
                    continue  # its stream broke: the kernel took it back
                if ep.instance_id == exclude or listed is None or listed.state != SERVING:
                    requests.put_nowait(self._release_pb(grant[1]))
                    continue
                return ep, grant
        self._slot_ids += 1
        request_id = self._slot_ids
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._slot_waits[request_id] = fut
        requests.put_nowait(
            kernel_pb2.SlotRequest(
                id=request_id,
                interface=route.interface,
                priority=priority,
                timeout=timeout or 0.0,
                exclude=[exclude] if exclude else [],
                key=key or "",
            )
        )
        pending = self._slot_pending
        pending[route.interface] = pending.get(route.interface, 0) + 1
        try:
            reply = await fut
        except asyncio.CancelledError:
            self._slot_waits.pop(request_id, None)
            requests.put_nowait(self._release_pb(request_id))
            raise
        finally:
            pending[route.interface] -= 1
        ep = slot_reply(reply)
        return ep, (requests, request_id, route.interface, ep)

    def release(self, grant: Any) -> None:
        """Give a slot back. Kept for this caller's next call of the
        interface instead (for :data:`SLOT_LINGER` seconds at most) unless
        this caller waits for slots of it or the kernel asked for them: with
        free slots a call then costs no round trip to the kernel."""
        requests: asyncio.Queue[Any]
        requests, request_id, interface, ep = grant
        if requests is not self._slot_requests:
            return  # its stream broke: the kernel took it back
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._slot_pending.get(interface) or self._reclaimed.get(interface, 0.0) > now:
            requests.put_nowait(self._release_pb(request_id))
            return
        self._idle_slots.setdefault(interface, []).append((ep, grant, now))
        if self._linger is None:
            self._linger = loop.call_later(SLOT_LINGER, self._expire_idle)

    def _give_back_idle(self, interface: str) -> None:
        requests = self._slot_requests
        for _, grant, _ in self._idle_slots.pop(interface, []):
            if requests is not None and grant[0] is requests:
                requests.put_nowait(self._release_pb(grant[1]))

    def _expire_idle(self) -> None:
        """Give back the slots kept longer than :data:`SLOT_LINGER`."""
        self._linger = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        requests = self._slot_requests
        for interface, idle in list(self._idle_slots.items()):
            keep = []
            for item in idle:
                if now - item[2] >= SLOT_LINGER:
                    if requests is not None and item[1][0] is requests:
                        requests.put_nowait(self._release_pb(item[1][1]))
                else:
                    keep.append(item)
            if keep:
                self._idle_slots[interface] = keep
            else:
                del self._idle_slots[interface]
        if self._idle_slots:
            self._linger = loop.call_later(SLOT_LINGER, self._expire_idle)

    async def close(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._idle_slots.clear()  # the stream's end gives them back
        if self._slot_requests is not None:
            self._slot_requests.put_nowait(None)
        if self._slot_reader is not None:
            self._slot_reader.cancel()
            await asyncio.gather(self._slot_reader, return_exceptions=True)
        for task in self._watchers.values():
            task.cancel()
        await asyncio.gather(*self._watchers.values(), return_exceptions=True)
        self._watchers.clear()
        if self._kernel_channel is not None:
            await self._kernel_channel.close()
            self._kernel_channel = None


class LocalRoutes(Protocol):
    """What the in-process path needs of the kernel: its routing
    (``hsu._kernel.routing.KernelRouting``), passed in so that the client
    never imports the kernel."""

    def route(self, interface: str) -> Route: ...

    async def ensure(self, interface: str, timeout: float | None = None) -> Route: ...

    def call_began(self, ep: Endpoint) -> None: ...

    def call_ended(self, ep: Endpoint) -> None: ...

    def acquire(
        self,
        interface: str,
        key: str | None = None,
        exclude: str = "",
        priority: int = 0,
        timeout: float | None = None,
    ) -> Awaitable[Any]: ...

    def release(self, grant: Any) -> None: ...


class _LocalResolver(_Resolver):
    """Routes from the kernel in this process (the gateway's own)."""

    def __init__(self, routes: LocalRoutes):
        self.routes = routes
        self.began = routes.call_began
        self.ended = routes.call_ended

    async def route(self, interface: str, timeout: float | None) -> Route:
        return self.routes.route(interface)

    async def ensure(self, route: Route, timeout: float | None) -> None:
        await self.routes.ensure(route.interface, timeout)

    async def acquire(
        self, route: Route, key: str | None, exclude: str, priority: int, timeout: float | None
    ) -> tuple[Endpoint, Any]:
        grant = await self.routes.acquire(route.interface, key, exclude, priority, timeout)
        return grant.endpoint, grant

    def release(self, grant: Any) -> None:
        self.routes.release(grant)


def local_channel(
    routes: LocalRoutes, plugins: Factories, signer: PeerSigner | None = None
) -> RoutedChannel:
    """A routed channel over the kernel's own routes, in its process."""
    return RoutedChannel(_LocalResolver(routes), plugins, signer=signer)
