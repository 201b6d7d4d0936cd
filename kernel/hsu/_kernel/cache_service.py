"""``hsu.cache.v1.Cache`` on the control plane: the kernel's cache layers,
per namespace, for HSUs (docs/cache.md).

Who may touch which namespace is decided as for the Storage service
(:mod:`hsu._kernel.storage_service`): a call with an ``hsu-instance-token``
reaches only its unit's namespace (``cache.namespaces``, else the unit's
name), one without names the namespace (an operator on the control plane,
the authorizers asked when auth is on), and ``hsu.*`` (the kernel's replies
among them) is refused to all. A key lives in the layers as
``NAMESPACE/KEY``; namespaces hold no ``/``, so none reaches another's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from hsu._kernel import auth
from hsu.cache import CacheSettings, check_cache_key
from hsu.cache.v1 import cache_pb2, cache_pb2_grpc
from hsu.errors import InvalidValue, NotAllowed, StorageUnavailable, Unauthenticated
from hsu.identity import TOKEN_METADATA
from hsu.ports import RESERVED_NAMESPACE_PREFIX, Cache, CallInfo
from hsu.storage import check_namespace

if TYPE_CHECKING:
    from hsu._kernel.kernel import Kernel

SERVICE = "hsu.cache.v1.Cache"
#: the longest TTL a Set may ask for (a week)
MAX_TTL = 7 * 86400.0


def namespace_unit(kernel: Kernel, namespace: str) -> str | None:
    """The unit a cache namespace belongs to, for authorizers."""
    settings: CacheSettings = kernel.settings("cache")
    owners = sorted(u for u in kernel.deployment.units if settings.namespace_of(u) == namespace)
    return owners[0] if owners else None


class CacheServicer(cache_pb2_grpc.CacheServicer):
    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.instance = auth.InstanceAuthenticator(kernel)

    async def _where(self, request: Any, context: Any, method: str) -> tuple[Cache, str]:
        """The layers and the key (``NAMESPACE/KEY``) this call may use, or abort."""
        try:
            return self._resolve(request, context, method)
        except Unauthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method}: {exc}")
        except NotAllowed as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method}: {exc}")
        except InvalidValue as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: {exc}")
        except StorageUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{method}: {exc}")
        raise AssertionError("unreachable")

    def _resolve(self, request: Any, context: Any, method: str) -> tuple[Cache, str]:
        asked: str = request.namespace
        md = tuple(context.invocation_metadata() or ())
        settings: CacheSettings = self.kernel.settings("cache")
        own: str | None = None
        if any(k == TOKEN_METADATA for k, _ in md):
            ident = self.instance.authenticate(
                CallInfo(f"/{SERVICE}/{method}", md, context.peer(), "control")
            )
            assert ident is not None
            unit = ident.attributes["unit"]
            own = settings.namespace_of(unit)
            if asked and asked != own:
                raise NotAllowed(
                    f"unit {unit!r} may use its own namespace {own!r} only, not {asked!r}"
                )
        namespace = own or asked
        if not namespace:
            raise InvalidValue(
                "namespace: required without an hsu-instance-token (an HSU's calls use"
                " their unit's)"
            )
        check_namespace(namespace)
        if namespace.startswith(RESERVED_NAMESPACE_PREFIX):
            raise NotAllowed(f"namespace {namespace!r} is the kernel's own")
        check_cache_key(request.key)
        cache = self.kernel.cache
        if cache is None:
            raise StorageUnavailable("the kernel runs without a cache (kernel.caches: [])")
        return cache, f"{namespace}/{request.key}"

    async def Get(self, request: cache_pb2.GetRequest, context: Any) -> cache_pb2.GetResponse:
        cache, key = await self._where(request, context, "Get")
        hit = await cache.get(key)
        if hit is None:
            return cache_pb2.GetResponse(found=False)
        return cache_pb2.GetResponse(found=True, value=hit.value, ttl=hit.ttl or 0.0)

    async def Set(self, request: cache_pb2.SetRequest, context: Any) -> cache_pb2.SetResponse:
        cache, key = await self._where(request, context, "Set")
        cap = self.kernel.settings("cache").max_value_bytes
        if len(request.value) > cap:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Set: value: {len(request.value)} bytes, over cache.max_value_bytes ({cap})",
            )
        if not 0 <= request.ttl <= MAX_TTL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Set: ttl: 0 (none) to {MAX_TTL:g} seconds, got {request.ttl:g}",
            )
        await cache.set(key, request.value, ttl=request.ttl or None)
        return cache_pb2.SetResponse()

    async def Delete(
        self, request: cache_pb2.DeleteRequest, context: Any
    ) -> cache_pb2.DeleteResponse:
        cache, key = await self._where(request, context, "Delete")
        return cache_pb2.DeleteResponse(deleted=await cache.delete(key))
