"""Leases: one instance for the caller alone, for several calls (a job).

::

    async with hsu.lease(channel, "hsu.echo.v1.Echo", ttl=30) as leased:
        echo = EchoStub(leased)           # any generated grpc.aio stub
        await echo.Echo(EchoRequest(message="step 1"))
        await echo.Echo(EchoRequest(message="step 2"))   # the same instance

    with hsu.lease_sync(sync_channel, "hsu.echo.v1.Echo", ttl=30) as leased:
        EchoStub(leased).Echo(EchoRequest(message="hi"))  # blocking stubs

The kernel (``Kernel.Lease``) reserves one instance: it waits in the unit's
queue like a call until an instance has no call in flight, then lists it as
``leased`` so that no other caller's call goes there. The lease is renewed
(``Kernel.Renew``) every third of its ``ttl`` while the block runs and
released (``Kernel.Release``) when it ends; one that is not renewed in time
expires. When the leased instance dies or stops, the lease ends: the next
call through it (or the one that was cut) raises UNAVAILABLE saying so, and
:attr:`AsyncLease.error` tells why; the kernel replaces the instance per its
restart policy, and a new lease gets a new one.

``channel_or_address``: a channel from :func:`hsu.connect` (or
:func:`hsu.connect_sync` for the blocking form), whose kernel and
credentials it uses, or a kernel address (default: the control address
:func:`hsu.connect` would use).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from loguru import logger

from hsu.client.credentials import bearer
from hsu.client.route import CHANNEL_OPTIONS, connected, endpoint_from_pb, rpc_error
from hsu.ports import Endpoint
from hsu.tls import TLSConfig, aio_channel
from hsu.tls import channel as tls_channel

#: seconds to wait for an instance when no ``timeout`` is given
DEFAULT_TIMEOUT = 30.0
#: seconds a call that could not reach the leased instance asks the kernel
#: whether the lease ended (the kernel sees a death a moment after the call)
DEATH_NEWS = 2.0


def lease(
    channel_or_address: Any = None,
    interface: str = "",
    *,
    ttl: float = 30.0,
    timeout: float | None = None,
    priority: int = 0,
    tls: TLSConfig | None = None,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
) -> AsyncLease:
    """An ``async with`` lease of one instance of ``interface`` (see the module
    docstring); ``timeout``: seconds to wait for one (default 30);
    ``priority``: in the unit's queue."""
    return AsyncLease(channel_or_address, interface, ttl, timeout, priority, tls, token, token_file)


def lease_sync(
    channel_or_address: Any = None,
    interface: str = "",
    *,
    ttl: float = 30.0,
    timeout: float | None = None,
    priority: int = 0,
    tls: TLSConfig | None = None,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
) -> SyncLease:
    """The same for blocking stubs: ``with hsu.lease_sync(...) as leased:``."""
    return SyncLease(channel_or_address, interface, ttl, timeout, priority, tls, token, token_file)


class _LeaseBase:
    def __init__(
        self,
        target: Any,
        interface: str,
        ttl: float,
        timeout: float | None,
        priority: int,
        tls: TLSConfig | None,
        token: str | None,
        token_file: str | os.PathLike[str] | None,
    ):
        if not interface:
            raise ValueError("hsu.lease: name the interface to lease, e.g. 'pkg.v1.Service'")
        if not ttl > 0:
            raise ValueError(f"hsu.lease: ttl must be > 0 seconds, got {ttl!r}")
        self.interface = interface
        self.ttl = float(ttl)
        self.timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        self.priority = priority
        self._target = target
        self._tls = tls
        self._token = token
        self._token_file = token_file
        self.lease_id = ""
        #: the leased instance
        self.endpoint: Endpoint | None = None
        #: why the lease ended before its holder released it (None: it has not)
        self.error: BaseException | None = None

    def _request(self) -> Any:
        from hsu.kernel.v1 import kernel_pb2

        return kernel_pb2.LeaseRequest(
            interface=self.interface, ttl=self.ttl, timeout=self.timeout, priority=self.priority
        )

    def _granted(self, reply: Any) -> None:
        self.lease_id = reply.lease_id
        self.endpoint = endpoint_from_pb(reply.endpoint)

    def _ended(self, details: str, error: Any) -> None:
        self.error = error(grpc.StatusCode.UNAVAILABLE, f"hsu: {details}")
        assert self.endpoint is not None
        logger.bind(instance=self.endpoint.instance_id).warning("hsu: {}", details)

    @property
    def instance_id(self) -> str:
        return "" if self.endpoint is None else self.endpoint.instance_id


class AsyncLease(_LeaseBase):
    """A leased instance; duck-types ``grpc.aio.Channel`` for generated stubs."""

    _kernel: Any = None
    _own_kernel: Any = None
    _channel: Any = None
    _renewer: asyncio.Task[None] | None = None

    def _stub(self) -> Any:
        from hsu.client.aio import RoutedChannel, control_address
        from hsu.kernel.v1 import kernel_pb2_grpc

        if self._kernel is None:
            target = self._target
            if isinstance(target, RoutedChannel):
                stub, metadata = target.kernel_stub()
                self._kernel = (stub, metadata)
            else:
                tls = TLSConfig.from_env() if self._tls is None else self._tls
                address = control_address(target)
                self._own_kernel = aio_channel(address, tls, CHANNEL_OPTIONS)
                metadata = bearer(self._token, self._token_file) or None
                self._kernel = (kernel_pb2_grpc.KernelStub(self._own_kernel), metadata)
        return self._kernel

    async def __aenter__(self) -> AsyncLease:
        stub, metadata = self._stub()
        try:
            reply = await stub.Lease(self._request(), timeout=self.timeout + 5, metadata=metadata)
        except BaseException:
            await self._close_kernel()
            raise
        self._granted(reply)
        assert self.endpoint is not None
        self._channel = grpc.aio.insecure_channel(self.endpoint.address, options=CHANNEL_OPTIONS)
        self._renewer = asyncio.ensure_future(self._renew_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        if self.error is None and self.lease_id:
            from hsu.kernel.v1 import kernel_pb2

            stub, metadata = self._stub()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Release(
                    kernel_pb2.ReleaseRequest(lease_id=self.lease_id), timeout=5, metadata=metadata
                )
        if self._channel is not None:
            await self._channel.close()
        await self._close_kernel()

    async def _close_kernel(self) -> None:
        if self._own_kernel is not None:
            await self._own_kernel.close()
            self._own_kernel = None

    async def _renew_loop(self) -> None:
        while self.error is None:
            await asyncio.sleep(self.ttl / 3)
            await self.renew()

    async def renew(self) -> bool:
        """Renew now; False (and :attr:`error` set) when the lease has ended."""
        from hsu.kernel.v1 import kernel_pb2

        if self.error is not None:
            return False
        stub, metadata = self._stub()
        try:
            await stub.Renew(
                kernel_pb2.RenewRequest(lease_id=self.lease_id),
                timeout=max(1.0, self.ttl / 3),
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                self._ended(exc.details() or "the lease ended", rpc_error)
                return False
            logger.warning("hsu: renewing lease of {}: {}", self.instance_id, exc.code().name)
        return True

    async def _failed(self, exc: grpc.aio.AioRpcError) -> BaseException:
        """The error a call that failed with ``exc`` raises: the lease's end
        when that was why."""
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            # the call may beat the kernel to the news: ask again for a moment
            for _ in range(round(DEATH_NEWS / 0.1)):
                if not await self.renew():
                    break
                if connected(self._channel):
                    break  # the instance itself answered UNAVAILABLE
                await asyncio.sleep(0.1)
        return self.error or exc

    # -- grpc.aio.Channel's stub-facing half -------------------------------------

    def _multi(self, kind: str, method: str, ser: Any, de: Any) -> Any:
        if self._channel is None:
            raise ValueError("hsu.lease: use the lease inside its `async with` block")
        return getattr(self._channel, kind)(method, ser, de)

    def unary_unary(self, method: str, request_serializer: Any = None,
                    response_deserializer: Any = None, **_: Any) -> Any:  # fmt: skip
        return _Unary(self, self._multi("unary_unary", method, request_serializer,
                                        response_deserializer))  # fmt: skip

    def stream_unary(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, **_: Any) -> Any:  # fmt: skip
        return _Unary(self, self._multi("stream_unary", method, request_serializer,
                                        response_deserializer))  # fmt: skip

    def unary_stream(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, **_: Any) -> Any:  # fmt: skip
        return _Streaming(self, self._multi("unary_stream", method, request_serializer,
                                            response_deserializer))  # fmt: skip

    def stream_stream(self, method: str, request_serializer: Any = None,
                      response_deserializer: Any = None, **_: Any) -> Any:  # fmt: skip
        return _Streaming(self, self._multi("stream_stream", method, request_serializer,
                                            response_deserializer))  # fmt: skip


class _Unary:
    def __init__(self, lease: AsyncLease, multi: Any):
        self._lease = lease
        self._multi = multi

    async def __call__(self, request: Any, **kwargs: Any) -> Any:
        if self._lease.error is not None:
            raise self._lease.error
        try:
            return await self._multi(request, **kwargs)
        except grpc.aio.AioRpcError as exc:
            raise await self._lease._failed(exc) from exc


class _Streaming(_Unary):
    def __call__(self, request: Any, **kwargs: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        return self._run(request, kwargs)

    async def _run(self, request: Any, kwargs: Any) -> AsyncIterator[Any]:
        if self._lease.error is not None:
            raise self._lease.error
        try:
            async for reply in self._multi(request, **kwargs):
                yield reply
        except grpc.aio.AioRpcError as exc:
            raise await self._lease._failed(exc) from exc


class SyncLease(_LeaseBase):
    """A leased instance; duck-types ``grpc.Channel`` for blocking stubs."""

    _kernel: Any = None
    _own_kernel: Any = None
    _channel: Any = None

    def _stub(self) -> Any:
        from hsu.client.aio import control_address
        from hsu.client.sync import SyncRoutedChannel
        from hsu.kernel.v1 import kernel_pb2_grpc

        if self._kernel is None:
            target = self._target
            if isinstance(target, SyncRoutedChannel):
                self._kernel = target.kernel_stub()
            else:
                tls = TLSConfig.from_env() if self._tls is None else self._tls
                self._own_kernel = tls_channel(control_address(target), tls, CHANNEL_OPTIONS)
                metadata = bearer(self._token, self._token_file) or None
                self._kernel = (kernel_pb2_grpc.KernelStub(self._own_kernel), metadata)
        return self._kernel

    def __enter__(self) -> SyncLease:
        from hsu.client.sync import NoInstance

        stub, metadata = self._stub()
        try:
            reply = stub.Lease(self._request(), timeout=self.timeout + 5, metadata=metadata)
        except BaseException:
            self._close_kernel()
            raise
        self._granted(reply)
        assert self.endpoint is not None
        self._error_type = NoInstance
        self._channel = grpc.insecure_channel(self.endpoint.address, options=CHANNEL_OPTIONS)
        self._stop = threading.Event()
        self._renewer = threading.Thread(
            target=self._renew_loop, name=f"hsu-lease-{self.lease_id[:8]}", daemon=True
        )
        self._renewer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._renewer.join(timeout=5)
        if self.error is None and self.lease_id:
            from hsu.kernel.v1 import kernel_pb2

            stub, metadata = self._stub()
            with contextlib.suppress(grpc.RpcError):
                stub.Release(
                    kernel_pb2.ReleaseRequest(lease_id=self.lease_id), timeout=5, metadata=metadata
                )
        if self._channel is not None:
            self._channel.close()
        self._close_kernel()

    def _close_kernel(self) -> None:
        if self._own_kernel is not None:
            self._own_kernel.close()
            self._own_kernel = None

    def _renew_loop(self) -> None:
        while self.error is None and not self._stop.wait(self.ttl / 3):
            self.renew()

    def renew(self) -> bool:
        """Renew now; False (and :attr:`error` set) when the lease has ended."""
        from hsu.kernel.v1 import kernel_pb2

        if self.error is not None:
            return False
        stub, metadata = self._stub()
        try:
            stub.Renew(
                kernel_pb2.RenewRequest(lease_id=self.lease_id),
                timeout=max(1.0, self.ttl / 3),
                metadata=metadata,
            )
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                self._ended(exc.details() or "the lease ended", self._error_type)
                return False
            logger.warning("hsu: renewing lease of {}: {}", self.instance_id, exc.code().name)
        return True

    def _failed(self, exc: grpc.RpcError) -> BaseException:
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            for _ in range(round(DEATH_NEWS / 0.1)):
                if not self.renew() or connected(self._channel):
                    break
                time.sleep(0.1)
        return self.error or exc

    def _multi(self, kind: str, method: str, ser: Any, de: Any) -> Any:
        if self._channel is None:
            raise ValueError("hsu.lease_sync: use the lease inside its `with` block")
        multi = getattr(self._channel, kind)(method, ser, de)
        streaming = kind.endswith("_stream")
        lease = self

        def call(request: Any, **kwargs: Any) -> Any:
            if lease.error is not None:
                raise lease.error
            if streaming:
                return lease._stream(multi(request, **kwargs))
            try:
                return multi(request, **kwargs)
            except grpc.RpcError as exc:
                raise lease._failed(exc) from exc

        return call

    def _stream(self, replies: Any) -> Iterator[Any]:
        try:
            yield from replies
        except grpc.RpcError as exc:
            raise self._failed(exc) from exc

    def unary_unary(self, method: str, request_serializer: Any = None,
                    response_deserializer: Any = None, **_: Any) -> Any:  # fmt: skip
        return self._multi("unary_unary", method, request_serializer, response_deserializer)

    def stream_unary(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, **_: Any) -> Any:  # fmt: skip
        return self._multi("stream_unary", method, request_serializer, response_deserializer)

    def unary_stream(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, **_: Any) -> Any:  # fmt: skip
        return self._multi("unary_stream", method, request_serializer, response_deserializer)

    def stream_stream(self, method: str, request_serializer: Any = None,
                      response_deserializer: Any = None, **_: Any) -> Any:  # fmt: skip
        return self._multi("stream_stream", method, request_serializer, response_deserializer)
