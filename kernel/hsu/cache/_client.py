"""The Cache service's client: :class:`CacheClient`."""

from __future__ import annotations

from typing import Any

import grpc

from hsu.cache.v1 import cache_pb2, cache_pb2_grpc
from hsu.errors import CacheError, HsuError, InvalidValue, NotAllowed, Unauthenticated
from hsu.identity import TOKEN_METADATA
from hsu.ports import Cached, CacheStats
from hsu.tls import TLSConfig, aio_channel

_ERRORS: dict[grpc.StatusCode, type[HsuError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidValue,
    grpc.StatusCode.PERMISSION_DENIED: NotAllowed,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


class CacheClient:
    """:class:`hsu.ports.Cache` over the kernel's ``hsu.cache.v1.Cache``: the
    kernel's layers (``kernel.caches``), in one namespace.

    An HSU gets one as ``worker.cache``: its calls carry the instance's
    token, and ``namespace`` "" (the default) is its unit's, the only one it
    may use. An operator's client (no token) names the namespace. Errors
    come back as :mod:`hsu.errors` (``InvalidValue``, ``NotAllowed``,
    ``Unauthenticated``, else ``CacheError``) with the kernel's message.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str = "",
        namespace: str = "",
        tls: TLSConfig | None = None,
        timeout: float | None = 5.0,
    ) -> None:
        self.address = address
        self.namespace = namespace
        self._metadata = ((TOKEN_METADATA, token),) if token else None
        self._tls = tls
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self.timeout = timeout
        self._hits = self._misses = 0

    @property
    def describe(self) -> str:
        return f"hsu.cache.v1.Cache at {self.address}"

    def _stub_(self) -> Any:
        if self._stub is None:
            limit = 64 * 2**20 + 64 * 1024
            self._channel = aio_channel(
                self.address,
                self._tls,
                [
                    ("grpc.max_send_message_length", limit),
                    ("grpc.max_receive_message_length", limit),
                ],
            )
            self._stub = cache_pb2_grpc.CacheStub(self._channel)
        return self._stub

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub_(), method)(
                request, metadata=self._metadata, timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or exc.code().name
            error = _ERRORS.get(exc.code())
            if error is None:
                raise CacheError(
                    f"the kernel's Cache service at {self.address}: {details}"
                ) from None
            raise error(details) from None

    async def get(self, key: str) -> Cached | None:
        reply = await self._call("Get", cache_pb2.GetRequest(namespace=self.namespace, key=key))
        if not reply.found:
            self._misses += 1
            return None
        self._hits += 1
        return Cached(reply.value, reply.ttl or None)

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        request = cache_pb2.SetRequest(namespace=self.namespace, key=key, value=value, ttl=ttl or 0)
        await self._call("Set", request)

    async def delete(self, key: str) -> bool:
        request = cache_pb2.DeleteRequest(namespace=self.namespace, key=key)
        deleted: bool = (await self._call("Delete", request)).deleted
        return deleted

    def stats(self) -> CacheStats:
        """This client's hits and misses (the kernel counts its layers')."""
        return CacheStats(hits=self._hits, misses=self._misses)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None
