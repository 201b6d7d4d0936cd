"""Routed calls for code without an event loop: ``hsu.connect_sync()``.

::

    with hsu.connect_sync("127.0.0.1:7420") as channel:
        echo = EchoStub(channel)                  # a plain (not aio) generated stub
        reply = echo.Echo(EchoRequest(message="hi"), timeout=2)

The same routing as :func:`hsu.connect` (see :mod:`hsu.client.aio`): the first
call to an interface resolves it (starting an instance on demand), a daemon
thread per interface follows its endpoints, and each call picks an instance
with the unit's balancer, skips instances whose breaker is open, and retries
an idempotent method that got UNAVAILABLE on another instance within the
retry budget and the deadline. Safe to use from many threads: the pick and
the bookkeeping take a lock; the calls themselves run in parallel.

Unary calls return the reply, streaming calls an iterator of replies; the
call objects' extras (``with_call``, ``future``) are not offered.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
from loguru import logger

from hsu._kernel.routing import CHANNEL_OPTIONS, INSTANCE_FAILED, Policy, Route, endpoint_from_pb
from hsu.client.aio import DEFAULT_KERNEL, START_TIMEOUT, _installed
from hsu.errors import HsuError
from hsu.ports import Endpoint

if TYPE_CHECKING:
    from hsu._kernel.plugins import PluginManager


def connect_sync(
    kernel: str | None = None, *, plugins: PluginManager | None = None
) -> SyncRoutedChannel:
    """A blocking routed channel through the kernel at ``kernel`` (default:
    ``$HSU_KERNEL_ADDRESS``, else ``127.0.0.1:7420``). Use it as ``with`` or
    call :meth:`SyncRoutedChannel.close`."""
    address = kernel or os.environ.get("HSU_KERNEL_ADDRESS") or DEFAULT_KERNEL
    return SyncRoutedChannel(address, plugins)


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

    def __init__(self, kernel: str, plugins: PluginManager | None = None):
        self.kernel = kernel
        self._plugins = plugins
        self._lock = threading.Lock()
        self._kernel_channel = grpc.insecure_channel(kernel, options=CHANNEL_OPTIONS)
        self._channels: dict[str, grpc.Channel] = {}
        self._routes: dict[str, Route] = {}
        self._watches: list[Any] = []
        self._closed = False

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

    def close(self) -> None:
        self._closed = True
        for stream in self._watches:
            stream.cancel()
        with self._lock:
            channels, self._channels = self._channels, {}
        for ch in channels.values():
            ch.close()
        self._kernel_channel.close()

    # -- routing ----------------------------------------------------------------

    def plugins(self) -> PluginManager:
        if self._plugins is None:
            from hsu._kernel.plugins import PluginManager

            self._plugins = PluginManager.load([])
        return self._plugins

    def _resolve(self, interface: str, timeout: float | None) -> Any:
        from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc

        stub = kernel_pb2_grpc.KernelStub(self._kernel_channel)
        try:
            return stub.Resolve(
                kernel_pb2.ResolveRequest(interface=interface, ensure=True),
                timeout=START_TIMEOUT if timeout is None else timeout,
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
        policy = _installed(Policy.from_pb(reply.policy), plugins)
        with self._lock:
            route = self._routes.get(interface)
            if route is not None:  # another thread was first
                return route
            route = Route(interface, policy, plugins)
            route.replace(endpoint_from_pb(e) for e in reply.endpoints)
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
                kernel_pb2.WatchEndpointsRequest(interface=route.interface)
            )
            self._watches.append(stream)
            try:
                for update in stream:
                    backoff = 0.1
                    with self._lock:
                        if update.snapshot:
                            route.replace(endpoint_from_pb(e) for e in update.endpoints)
                        elif update.kind == "put":
                            route.put(endpoint_from_pb(update.endpoints[0]))
                        else:
                            route.delete(update.endpoints[0].instance_id)
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

    def pick(
        self, interface: str, key: str | None, exclude: str, deadline: float | None
    ) -> tuple[Route, Endpoint]:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        route = self.route(interface, timeout)
        with self._lock:
            ep = route.pick(key, exclude)
            if ep is not None:
                route.begin(ep)
                return route, ep
            routable = route.routable
        if not routable:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            reply = self._resolve(interface, timeout)
            with self._lock:
                for msg in reply.endpoints:
                    route.put(endpoint_from_pb(msg))
                ep = route.pick(key)
                if ep is not None:
                    route.begin(ep)
                    return route, ep
        raise NoInstance(
            grpc.StatusCode.UNAVAILABLE,
            f"hsu: no instance serving {interface!r} can take the call"
            + (" (every one's circuit breaker is open)" if routable else ""),
        )

    def end(self, route: Route, ep: Endpoint, ok: bool) -> None:
        with self._lock:
            route.end(ep, ok)

    def may_retry(self, route: Route, method: str, attempts: int) -> bool:
        with self._lock:
            return route.may_retry(method, attempts)


class _Call:
    def __init__(self, ch: SyncRoutedChannel, method: str, ser: Any, de: Any, kind: str):
        self._ch = ch
        self._method = method
        self._interface = method.lstrip("/").partition("/")[0]
        self._ser = ser
        self._de = de
        self._kind = kind
        self._calls: dict[str, Any] = {}

    def _callable(self, address: str) -> Any:
        call = self._calls.get(address)
        if call is None:
            factory = getattr(self._ch.channel(address), self._kind)
            call = self._calls[address] = factory(self._method, self._ser, self._de)
        return call

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
        if metadata and key is None:
            hk = self._ch.route(self._interface, timeout).policy.hash_key
            key = next((v for k, v in metadata if k == hk), None)
        if self._kind in ("unary_stream", "stream_stream"):
            return self._stream(request, deadline, metadata, key, kwargs)
        exclude = ""
        attempt = 0
        while True:
            route, ep = self._ch.pick(self._interface, key, exclude, deadline)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                reply = self._callable(ep.address)(
                    request, timeout=left, metadata=metadata, **kwargs
                )
            except grpc.RpcError as exc:
                ok = exc.code() not in INSTANCE_FAILED
                self._ch.end(route, ep, ok)
                attempt += 1
                if (
                    ok
                    or self._kind != "unary_unary"
                    or (deadline is not None and time.monotonic() >= deadline)
                    or not self._ch.may_retry(route, self._method, attempt)
                ):
                    raise
                exclude = ep.instance_id
                continue
            except BaseException:
                self._ch.end(route, ep, True)
                raise
            self._ch.end(route, ep, True)
            return reply

    def _stream(
        self, request: Any, deadline: float | None, metadata: Any, key: str | None, kwargs: Any
    ) -> Iterator[Any]:
        exclude = ""
        attempt = 0
        while True:
            route, ep = self._ch.pick(self._interface, key, exclude, deadline)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            replied = False
            ok = True
            try:
                for reply in self._callable(ep.address)(
                    request, timeout=left, metadata=metadata, **kwargs
                ):
                    replied = True
                    yield reply
                return
            except grpc.RpcError as exc:
                ok = exc.code() not in INSTANCE_FAILED
                attempt += 1
                if (
                    ok
                    or replied
                    or self._kind != "unary_stream"
                    or not self._ch.may_retry(route, self._method, attempt)
                ):
                    raise
                exclude = ep.instance_id
            finally:
                self._ch.end(route, ep, ok)
