"""Routed calls for code without an event loop: ``hsu.connect_sync()``.

::

    with hsu.connect_sync("127.0.0.1:7420") as channel:
        echo = EchoStub(channel)                  # a plain (not aio) generated stub
        reply = echo.Echo(EchoRequest(message="hi"), timeout=2)

The same routing as :func:`hsu.connect` (see :mod:`hsu.client.aio`): the first
call to an interface resolves it (starting an instance on demand), a daemon
thread per interface follows its endpoints, and each call picks an instance
with the unit's balancer, skips instances whose breaker is open or that it
could not reach (until their channel connects again), waits within the
deadline when no listed instance can take the call, and retries an
idempotent method that got UNAVAILABLE on another instance within the retry
budget and the deadline. Safe to use from many threads: the pick and the
bookkeeping take a lock; the calls themselves run in parallel.

Unary calls return the reply, streaming calls an iterator of replies that
is a ``grpc.Call`` too (:class:`hsu.client.calls.SyncStreamCall`), as
grpc's; a unary method's ``with_call`` returns the reply and the call (a
``grpc.Call``), its ``future`` a ``grpc.Future`` that is a ``grpc.Call`` too
(:class:`hsu.client.calls.SyncCall`), all speaking for the try that got
through.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
from loguru import logger

from hsu import peer, tracecontext
from hsu.client.aio import CACHE_BYTES, START_TIMEOUT, control_address
from hsu.client.calls import SyncCall, SyncStreamCall
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
)
from hsu.errors import HsuError
from hsu.metrics import client_observer
from hsu.peer import PeerSigner
from hsu.ports import Endpoint
from hsu.tls import TLSConfig
from hsu.tls import channel as tls_channel

#: threads per channel that run ``future()`` calls (more wait their turn)
FUTURE_THREADS = 32


def connect_sync(
    kernel: str | None = None,
    *,
    plugins: Factories | None = None,
    tls: TLSConfig | None = None,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    cache_bytes: int = CACHE_BYTES,
    cluster_key: str | None = None,
) -> SyncRoutedChannel:
    """A blocking routed channel through the kernel at ``kernel`` (default:
    its control address: ``$HSU_CONTROL``,
    ``$HSU_KERNEL_ADDRESS``, else the one kernel running as this user). ``tls``,
    ``token``, ``token_file``, ``cache_bytes`` and ``cluster_key`` as for
    :func:`hsu.connect`. Use it as ``with`` or call :meth:`SyncRoutedChannel.close`."""
    address = control_address(kernel)
    return SyncRoutedChannel(
        address,
        plugins,
        tls=TLSConfig.from_env() if tls is None else tls,
        metadata=bearer(token, token_file),
        cache_bytes=cache_bytes,
        signer=peer.signer(cluster_key),
    )


class NoInstance(grpc.RpcError):  # type: ignore[misc]
    """No instance can take the call (UNAVAILABLE), or no unit serves it
    (UNIMPLEMENTED); raised like any grpc.RpcError."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class SyncRoutedChannel:
    """Duck-types ``grpc.Channel`` for generated (blocking) stubs."""

    def __init__(
        self,
        kernel: str,
        plugins: Factories | None = None,
        *,
        tls: TLSConfig | None = None,
        metadata: Metadata = (),
        cache_bytes: int = CACHE_BYTES,
        signer: PeerSigner | None = None,
    ):
        self.kernel = kernel
        self._cache_bytes = cache_bytes
        self._reply_cache: Any = None
        #: signs every call to an instance with the cluster key (:mod:`hsu.peer`)
        self.signer = signer
        #: the caller's credential, sent with each call to the kernel
        self._metadata = metadata or None
        self._plugins = plugins
        self._lock = threading.Lock()
        #: notified (under its own lock) of every change of a route
        self._changed = threading.Condition()
        self._caller = Caller(
            _no_instance,
            lock=self._lock,
            unavailable=lambda details: NoInstance(grpc.StatusCode.UNAVAILABLE, details),
            connected=lambda ep: connected(self._channels.get(ep.address)),
            watch=self._watch_ejected,
            wait=self._wait,
            acquire_sync=self._acquire,
            release=self._release,
            error=NoInstance,
            observe=client_observer(),
        )
        #: the Slots stream (units with max_inflight): requests to send, and
        #: the replies awaited, by request id
        self._slot_lock = threading.Lock()
        self._slot_requests: queue.SimpleQueue[Any] | None = None
        self._slot_waits: dict[int, list[Any]] = {}
        self._slot_ids = 0
        self._kernel_channel = tls_channel(kernel, tls, CHANNEL_OPTIONS)
        self._channels: dict[str, grpc.Channel] = {}
        self._routes: dict[str, Route] = {}
        self._watches: list[Any] = []
        self._closed = False
        self._futures: concurrent.futures.ThreadPoolExecutor | None = None

    def reply_cache(self) -> Any:
        """This channel's own cache of replies (``routing.cache``), made on
        first use; shared by its threads, with no one else (docs/cache.md).
        None with ``cache_bytes=0``."""
        if self._reply_cache is None and self._cache_bytes > 0:
            from hsu.cache import MemoryCache

            with self._lock:
                if self._reply_cache is None:
                    self._reply_cache = MemoryCache(self._cache_bytes)
        return self._reply_cache

    # -- grpc.Channel's stub-facing half -------------------------------------

    def unary_unary(self, method: str, request_serializer: Any = None,
                    response_deserializer: Any = None, **_: Any) -> _Call:  # fmt: skip
        return _Call(self, method, request_serializer, response_deserializer, "unary_unary")

    def unary_stream(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, **_: Any) -> _Call:  # fmt: skip
        return _Call(self, method, request_serializer, response_deserializer, "unary_stream")

    def stream_unary(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, **_: Any) -> _Call:  # fmt: skip
        return _Call(self, method, request_serializer, response_deserializer, "stream_unary")

    def stream_stream(self, method: str, request_serializer: Any = None,
                      response_deserializer: Any = None, **_: Any) -> _Call:  # fmt: skip
        return _Call(self, method, request_serializer, response_deserializer, "stream_stream")

    def __enter__(self) -> SyncRoutedChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        """The threads that run ``future()`` calls (started on first use)."""
        with self._lock:
            if self._futures is None:
                self._futures = concurrent.futures.ThreadPoolExecutor(
                    FUTURE_THREADS, thread_name_prefix="hsu-future"
                )
            return self._futures

    def close(self) -> None:
        self._closed = True
        if self._futures is not None:
            self._futures.shutdown(wait=False)  # queued calls still run, and fail
        with self._slot_lock:
            if self._slot_requests is not None:
                self._slot_requests.put(None)  # ends the Slots stream
                self._slot_requests = None
        for stream in self._watches:
            stream.cancel()
        with self._lock:
            channels, self._channels = self._channels, {}
        for ch in channels.values():
            ch.close()
        self._kernel_channel.close()

    # -- routing ----------------------------------------------------------------

    def plugins(self) -> Factories:
        if self._plugins is None:
            self._plugins = load_plugins()
        return self._plugins

    def _resolve(self, interface: str, timeout: float | None) -> Any:
        from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc

        stub = kernel_pb2_grpc.KernelStub(self._kernel_channel)
        try:
            return stub.Resolve(
                kernel_pb2.ResolveRequest(interface=interface, ensure=True),
                timeout=START_TIMEOUT if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                raise NoInstance(grpc.StatusCode.UNIMPLEMENTED, f"hsu: {exc.details()}") from None
            raise

    def route(self, interface: str, timeout: float | None) -> Route:
        with self._lock:
            route = self._routes.get(interface)
        if route is not None:
            return route
        if self._closed:
            raise HsuError("the routed channel is closed")
        reply = self._resolve(interface, timeout)
        plugins = self.plugins()
        policy = installed(Policy.from_pb(reply.policy), plugins)
        with self._lock:
            route = self._routes.get(interface)
            if route is not None:  # another thread was first
                return route
            route = Route(interface, policy, plugins)
            route.replace(endpoint_from_pb(e) for e in reply.endpoints)
            route.listeners.append(self._notify)
            self._routes[interface] = route
        threading.Thread(
            target=self._watch, args=(route,), name=f"hsu-watch-{interface}", daemon=True
        ).start()
        return route

    def _watch(self, route: Route) -> None:
        from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc

        stub = kernel_pb2_grpc.KernelStub(self._kernel_channel)
        backoff = 0.1
        while not self._closed:
            stream = stub.WatchEndpoints(
                kernel_pb2.WatchEndpointsRequest(interface=route.interface),
                metadata=self._metadata,
            )
            self._watches.append(stream)
            try:
                for update in stream:
                    backoff = 0.1
                    with self._lock:
                        before = {e.address for e in route.endpoints.values()}
                        apply_update(route, update)
                        gone = before - {e.address for e in route.endpoints.values()}
                        for address in gone:
                            self._forget_address(address)
            except grpc.RpcError as exc:
                if self._closed or exc.code() is grpc.StatusCode.CANCELLED:
                    return
                logger.debug("hsu: endpoint watch of {} ended: {}", route.interface, exc.code())
            finally:
                self._watches.remove(stream)
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def channel(self, address: str) -> grpc.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        return ch

    def channel_of(self, address: str) -> grpc.Channel | None:
        return self._channels.get(address)

    def _forget_address(self, address: str) -> None:
        """No route lists ``address`` any more (called under the lock): drop
        its channel, closed a second later (calls on it get that long to
        end); the next call there opens a new one."""
        if any(e.address == address for r in self._routes.values() for e in r.endpoints.values()):
            return
        ch = self._channels.pop(address, None)
        if ch is not None:
            closer = threading.Timer(1.0, ch.close)
            closer.daemon = True
            closer.start()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _wait(self, route: Route, seen: int, timeout: float) -> None:
        """Block until ``route`` changes from version ``seen``, up to ``timeout`` s."""
        with self._changed:
            if route.version == seen:
                self._changed.wait(timeout)

    def _watch_ejected(self, route: Route, ep: Endpoint) -> None:
        """Restore ``ep`` once its channel connects again; stop watching once
        the route no longer ejects it (or the channel is closed)."""
        ch = self._channels.get(ep.address)
        if ch is None or self._closed:
            return

        def changed(state: grpc.ChannelConnectivity) -> None:
            with self._lock:
                ejected = route.is_ejected(ep) and self._channels.get(ep.address) is ch
                if ejected and state is grpc.ChannelConnectivity.READY:
                    route.restore(ep)
                    ejected = False
            if not ejected or state is grpc.ChannelConnectivity.SHUTDOWN:
                ch.unsubscribe(changed)

        ch.subscribe(changed, try_to_connect=True)

    def kernel_stub(self) -> tuple[Any, Any]:
        """The Kernel API's stub this channel uses, and its credential
        metadata (for :func:`hsu.lease_sync`)."""
        from hsu.kernel.v1 import kernel_pb2_grpc

        return kernel_pb2_grpc.KernelStub(self._kernel_channel), self._metadata

    # -- slots (units with max_inflight) ----------------------------------------

    def _slots(self) -> queue.SimpleQueue[Any]:
        """The Slots stream's request queue (called under ``_slot_lock``):
        opened on first use, and again after it broke (the kernel gave back
        what the old one held)."""
        if self._slot_requests is not None:
            return self._slot_requests
        from hsu.kernel.v1 import kernel_pb2_grpc

        requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._slot_requests = requests

        def send() -> Iterator[Any]:
            from hsu.kernel.v1 import kernel_pb2

            # every request ready now goes in one message
            while (req := requests.get()) is not None:
                batch = [req]
                while True:
                    try:
                        more = requests.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        yield kernel_pb2.SlotRequests(requests=batch)
                        return
                    batch.append(more)
                yield kernel_pb2.SlotRequests(requests=batch)

        stub = kernel_pb2_grpc.KernelStub(self._kernel_channel)
        replies = stub.Slots(send(), metadata=self._metadata)
        threading.Thread(
            target=self._read_slots, args=(requests, replies), name="hsu-slots", daemon=True
        ).start()
        return requests

    def _read_slots(self, requests: queue.SimpleQueue[Any], replies: Any) -> None:
        error = "the kernel's Slots stream ended"
        try:
            for batch in replies:
                for reply in batch.replies:
                    with self._slot_lock:
                        wait = self._slot_waits.pop(reply.id, None)
                    if wait is not None:
                        wait[1] = reply
                        wait[0].set()
                    elif reply.code == 0:
                        requests.put(_release_pb(reply.id))  # the caller gave up: give it back
        except grpc.RpcError as exc:
            error = f"the kernel's Slots stream broke: {exc.code().name} {exc.details()}"
        finally:
            with self._slot_lock:
                if self._slot_requests is requests:
                    self._slot_requests = None
                waits, self._slot_waits = self._slot_waits, {}
            requests.put(None)
            for wait in waits.values():
                wait[1] = HsuError(error)
                wait[0].set()

    def _acquire(
        self, route: Route, key: str | None, exclude: str, priority: int, timeout: float | None
    ) -> tuple[Endpoint, Any]:
        from hsu.client.route import slot_reply
        from hsu.kernel.v1 import kernel_pb2

        done = threading.Event()
        wait: list[Any] = [done, None]
        with self._slot_lock:
            requests = self._slots()
            self._slot_ids += 1
            request_id = self._slot_ids
            self._slot_waits[request_id] = wait
        requests.put(
            kernel_pb2.SlotRequest(
                id=request_id,
                interface=route.interface,
                priority=priority,
                timeout=timeout or 0.0,
                exclude=[exclude] if exclude else [],
                key=key or "",
            )
        )
        done.wait()  # the kernel answers within the timeout it was given
        reply = wait[1]
        if isinstance(reply, BaseException):
            raise reply
        return slot_reply(reply), (requests, request_id)

    def _release(self, grant: Any) -> None:
        requests: queue.SimpleQueue[Any]
        requests, request_id = grant
        with self._slot_lock:
            if requests is self._slot_requests:
                requests.put(_release_pb(request_id))

    def ensure(self, route: Route, timeout: float | None) -> Route:
        """The route, once an instance was started on demand."""
        reply = self._resolve(route.interface, timeout)
        with self._lock:
            if not route.routable:  # else the watch listed one meanwhile: the newer word
                for msg in reply.endpoints:
                    route.put(endpoint_from_pb(msg))
        return route


def _release_pb(request_id: int) -> Any:
    from hsu.kernel.v1 import kernel_pb2

    return kernel_pb2.SlotRequest(id=request_id, release=True)


def _no_instance(route: Route) -> BaseException:
    return NoInstance(grpc.StatusCode.UNAVAILABLE, cannot_take(route))


class _Call(RoutedMethod):
    def __init__(self, ch: SyncRoutedChannel, method: str, ser: Any, de: Any, kind: str):
        super().__init__(ch._caller, ch, method, ser, de, kind)
        self._ch = ch

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        kept: tuple[str, Any] | None = None
        route: Route | None = None
        if self._kind == "unary_unary":
            route = self._ch._routes.get(self._interface)
            if route is None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                route = self._ch.route(self._interface, left)
            if route.policy.cache_methods:
                kept = self.cached(self._ch.reply_cache(), route, request, metadata)
                if kept is not None and kept[1] is not None:
                    return kept[1]
        metadata = tracecontext.outgoing(metadata)
        if self._kind.endswith("_stream"):
            call = SyncStreamCall(deadline)
            return call.start(self._replies(request, deadline, metadata, key, kwargs, call))
        [reply] = self._replies(request, deadline, metadata, key, kwargs)
        if kept is not None and route is not None:
            self.keep(self._ch.reply_cache(), kept[0], reply, route)
        return reply

    def with_call(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> tuple[Any, SyncCall]:
        """The reply and the call (a ``grpc.Call``), as grpc's ``with_call``;
        raises the call's error."""
        call = self._start(request, timeout, metadata, key, kwargs)
        call.run(call.replies)
        return call.result(), call

    def future(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> SyncCall:
        """The call as a ``grpc.Future`` (and ``grpc.Call``), run on the
        channel's threads (:data:`FUTURE_THREADS`)."""
        call = self._start(request, timeout, metadata, key, kwargs)
        self._ch._pool().submit(call.run, call.replies)
        return call

    def _start(
        self, request: Any, timeout: float | None, metadata: Any, key: str | None, kwargs: Any
    ) -> SyncCall:
        if self._kind.endswith("_stream"):
            raise TypeError(f"{self._method} streams its replies: with_call and future are"
                            " for calls with one reply, as in grpc")  # fmt: skip
        deadline = None if timeout is None else time.monotonic() + timeout
        call = SyncCall(deadline)
        metadata = tracecontext.outgoing(metadata)
        call.replies = self._replies(request, deadline, metadata, key, kwargs, call)
        return call

    def _replies(
        self,
        request: Any,
        deadline: float | None,
        metadata: Any,
        key: str | None,
        kwargs: Any,
        routed: SyncCall | SyncStreamCall | None = None,
    ) -> Iterator[Any]:
        streaming = self._kind.endswith("_stream")
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if isinstance(routed, SyncCall):
            routed.check()
        tries = self._tries(self._ch.route(self._interface, left), deadline, metadata, key)

        def attempt(ep: Endpoint) -> Any:
            call = self._callable(ep.address)
            if isinstance(routed, SyncCall):  # a grpc future per try: the call may cancel it
                routed.check()
                made = call.future(
                    request, timeout=tries.left(), metadata=self._signed(ep, metadata), **kwargs
                )
                routed.set_attempt(made)
                return (made.result(),)
            replies = call(
                request, timeout=tries.left(), metadata=self._signed(ep, metadata), **kwargs
            )
            if routed is not None:  # a stream's call: it may cancel the try
                routed.set_attempt(replies)
            return replies if streaming else (replies,)

        yield from tries.run(attempt, self._ch.ensure)
