"""The Storage service's client: :class:`StorageClient`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from hsu.errors import (
    HsuError,
    InvalidValue,
    NotAllowed,
    StorageError,
    StorageUnavailable,
    Unauthenticated,
)
from hsu.identity import TOKEN_METADATA
from hsu.ports import KeyValue, StorageCompacted, StorageEvent
from hsu.storage.v1 import storage_pb2, storage_pb2_grpc
from hsu.tls import TLSConfig, aio_channel

_ERRORS: dict[grpc.StatusCode, type[HsuError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidValue,
    grpc.StatusCode.UNAVAILABLE: StorageUnavailable,
    grpc.StatusCode.PERMISSION_DENIED: NotAllowed,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def _kv(msg: storage_pb2.KeyValue) -> KeyValue:
    return KeyValue(
        msg.key, msg.value, msg.create_revision, msg.mod_revision, msg.version, msg.expires_at
    )


def _error(exc: grpc.aio.AioRpcError, address: str) -> Exception:
    details = exc.details() or exc.code().name
    if exc.code() is grpc.StatusCode.OUT_OF_RANGE:
        return StorageCompacted(details, 0)
    if exc.code() is grpc.StatusCode.UNAVAILABLE and "Storage" not in details:
        details = f"the kernel's Storage service at {address}: {details}"
    return _ERRORS.get(exc.code(), StorageError)(details)


class StorageClient:
    """:class:`hsu.ports.Storage` over the kernel's ``hsu.storage.v1.Storage``.

    An HSU gets one as ``worker.storage``: its calls carry the instance's
    token, and ``namespace`` "" (the default) is its unit's namespace, the
    only one it may use. An operator's client (no token) names the namespace.
    Errors come back as :mod:`hsu.errors` (``InvalidValue``,
    ``StorageUnavailable``, ``NotAllowed``, ``StorageError``) with the
    kernel's message.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str = "",
        tls: TLSConfig | None = None,
        max_value_bytes: int = 64 * 1024 * 1024,
        timeout: float | None = 10.0,
    ) -> None:
        self.address = address
        self._metadata = ((TOKEN_METADATA, token),) if token else None
        self._tls = tls
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._max_value = max_value_bytes
        self.timeout = timeout

    @property
    def max_value_bytes(self) -> int:
        """The kernel checks the deployment's cap; this one is the gRPC message's."""
        return self._max_value

    @property
    def describe(self) -> str:
        return f"hsu.storage.v1.Storage at {self.address}"

    def _stub_(self) -> Any:
        if self._stub is None:
            limit = self._max_value + 64 * 1024
            self._channel = aio_channel(
                self.address,
                self._tls,
                [
                    ("grpc.max_send_message_length", limit),
                    ("grpc.max_receive_message_length", limit),
                ],
            )
            self._stub = storage_pb2_grpc.StorageStub(self._channel)
        return self._stub

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub_(), method)(
                request, metadata=self._metadata, timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, self.address) from None

    async def get(self, namespace: str, key: str) -> KeyValue | None:
        reply = await self._call("Get", storage_pb2.GetRequest(namespace=namespace, key=key))
        return _kv(reply.kv) if reply.found else None

    async def put(
        self, namespace: str, key: str, value: bytes, *, ttl: float | None = None
    ) -> KeyValue:
        request = storage_pb2.PutRequest(namespace=namespace, key=key, value=value, ttl=ttl or 0)
        return _kv((await self._call("Put", request)).kv)

    async def delete(self, namespace: str, key: str) -> int:
        reply = await self._call("Delete", storage_pb2.DeleteRequest(namespace=namespace, key=key))
        revision: int = reply.revision
        return revision

    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 0
    ) -> tuple[list[KeyValue], int]:
        request = storage_pb2.ListRequest(namespace=namespace, prefix=prefix, limit=limit)
        reply = await self._call("List", request)
        return [_kv(kv) for kv in reply.items], reply.revision

    async def compare_and_set(
        self,
        namespace: str,
        key: str,
        value: bytes | None,
        revision: int,
        *,
        ttl: float | None = None,
    ) -> tuple[bool, KeyValue | None]:
        request = storage_pb2.CompareAndSetRequest(
            namespace=namespace,
            key=key,
            value=value or b"",
            delete=value is None,
            revision=revision,
            ttl=ttl or 0,
        )
        reply = await self._call("CompareAndSet", request)
        return reply.succeeded, _kv(reply.kv) if reply.found else None

    async def watch(
        self, namespace: str, prefix: str = "", *, after: int = 0
    ) -> AsyncIterator[StorageEvent]:
        request = storage_pb2.WatchRequest(namespace=namespace, prefix=prefix, after=after)
        call = self._stub_().Watch(request, metadata=self._metadata)
        try:
            async for ev in call:
                yield StorageEvent(ev.kind, _kv(ev.kv), ev.revision)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, self.address) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None
