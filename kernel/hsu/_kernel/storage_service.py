"""``hsu.storage.v1.Storage`` on the control plane: the kernel's storage,
per namespace, for HSUs (docs/storage.md).

Who may touch which namespace is decided here, whatever the auth settings:

- a call with an ``hsu-instance-token`` is an HSU's: the token must be a live
  instance's (or an unmanaged unit's), and the call reaches only its unit's
  namespace (``storage.namespaces``, else the unit's name); another one is
  PERMISSION_DENIED, a bad token UNAUTHENTICATED;
- a call without one is an operator's client on the control plane (owner-only
  by default; with auth on, the interceptor has authenticated it and asked
  the authorizers about the namespace's unit): it names the namespace;
- ``hsu.*`` namespaces hold the kernel's own records (instance tokens among
  them) and are refused to everyone.

Streams are bounded (:data:`MAX_WATCHES` at once).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from hsu._kernel import auth
from hsu._kernel.core_service import StreamLimit
from hsu.errors import (
    InvalidValue,
    NotAllowed,
    OverLimit,
    StorageError,
    StorageUnavailable,
    Unauthenticated,
)
from hsu.identity import TOKEN_METADATA
from hsu.ports import (
    RESERVED_NAMESPACE_PREFIX,
    CallInfo,
    KeyValue,
    Storage,
    StorageCompacted,
    StorageSettings,
)
from hsu.storage import check_namespace
from hsu.storage.v1 import storage_pb2, storage_pb2_grpc

if TYPE_CHECKING:
    from hsu._kernel.kernel import Kernel

SERVICE = "hsu.storage.v1.Storage"
#: Watch streams open at once
MAX_WATCHES = 256


def kv_pb(kv: KeyValue | None) -> storage_pb2.KeyValue | None:
    return None if kv is None else _kv_pb(kv)


def _kv_pb(kv: KeyValue) -> storage_pb2.KeyValue:
    return storage_pb2.KeyValue(
        key=kv.key,
        value=kv.value,
        create_revision=kv.create_revision,
        mod_revision=kv.mod_revision,
        version=kv.version,
        expires_at=kv.expires_at,
    )


def namespace_unit(kernel: Kernel, namespace: str) -> str | None:
    """The unit a namespace belongs to, for authorizers: the unit whose
    namespace it is (the first by name when units share it)."""
    settings: StorageSettings = kernel.settings("storage")
    owners = sorted(u for u in kernel.deployment.units if settings.namespace_of(u) == namespace)
    return owners[0] if owners else None


class StorageServicer(storage_pb2_grpc.StorageServicer):
    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.instance = auth.InstanceAuthenticator(kernel)
        self.watches = StreamLimit("Watch", MAX_WATCHES)

    # -- who, and where ------------------------------------------------------------

    async def _where(self, request: Any, context: Any, method: str) -> tuple[Storage, str]:
        """The storage and the namespace this call may use, or abort."""
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

    def _resolve(self, request: Any, context: Any, method: str) -> tuple[Storage, str]:
        asked: str = request.namespace
        md = tuple(context.invocation_metadata() or ())
        own: str | None = None
        if any(k == TOKEN_METADATA for k, _ in md):
            ident = self.instance.authenticate(
                CallInfo(f"/{SERVICE}/{method}", md, context.peer(), "control")
            )
            assert ident is not None
            unit = ident.attributes["unit"]
            settings: StorageSettings = self.kernel.settings("storage")
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
        storage = self.kernel.storage
        if storage is None:
            raise StorageUnavailable(
                "the kernel runs without storage (kernel.storage; see its log)"
            )
        return storage, namespace

    @staticmethod
    async def _failed(context: Any, method: str, exc: Exception) -> None:
        if isinstance(exc, InvalidValue):
            code = grpc.StatusCode.INVALID_ARGUMENT
        elif isinstance(exc, StorageUnavailable):
            code = grpc.StatusCode.UNAVAILABLE
        elif isinstance(exc, OverLimit):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
        elif isinstance(exc, StorageError):
            code = grpc.StatusCode.FAILED_PRECONDITION
        elif isinstance(exc, StorageCompacted):
            code = grpc.StatusCode.OUT_OF_RANGE
        else:
            raise exc
        await context.abort(code, f"{method}: {exc}")

    # -- the calls -------------------------------------------------------------------

    async def Get(self, request: storage_pb2.GetRequest, context: Any) -> storage_pb2.GetResponse:
        storage, ns = await self._where(request, context, "Get")
        try:
            kv = await storage.get(ns, request.key)
        except Exception as exc:
            await self._failed(context, "Get", exc)
            raise
        return storage_pb2.GetResponse(found=kv is not None, kv=kv_pb(kv))

    async def Put(self, request: storage_pb2.PutRequest, context: Any) -> storage_pb2.PutResponse:
        storage, ns = await self._where(request, context, "Put")
        try:
            kv = await storage.put(ns, request.key, request.value, ttl=request.ttl or None)
        except Exception as exc:
            await self._failed(context, "Put", exc)
            raise
        return storage_pb2.PutResponse(kv=kv_pb(kv))

    async def Delete(
        self, request: storage_pb2.DeleteRequest, context: Any
    ) -> storage_pb2.DeleteResponse:
        storage, ns = await self._where(request, context, "Delete")
        try:
            rev = await storage.delete(ns, request.key)
        except Exception as exc:
            await self._failed(context, "Delete", exc)
            raise
        return storage_pb2.DeleteResponse(deleted=rev > 0, revision=rev)

    async def List(
        self, request: storage_pb2.ListRequest, context: Any
    ) -> storage_pb2.ListResponse:
        storage, ns = await self._where(request, context, "List")
        try:
            if request.limit < 0:
                raise InvalidValue(f"limit: must be >= 0, got {request.limit}")
            items, rev = await storage.list(ns, request.prefix, limit=request.limit)
        except Exception as exc:
            await self._failed(context, "List", exc)
            raise
        return storage_pb2.ListResponse(items=[_kv_pb(kv) for kv in items], revision=rev)

    async def CompareAndSet(
        self, request: storage_pb2.CompareAndSetRequest, context: Any
    ) -> storage_pb2.CompareAndSetResponse:
        storage, ns = await self._where(request, context, "CompareAndSet")
        try:
            if request.revision < 0:
                raise InvalidValue(f"revision: must be >= 0, got {request.revision}")
            ok, kv = await storage.compare_and_set(
                ns,
                request.key,
                None if request.delete else request.value,
                request.revision,
                ttl=request.ttl or None,
            )
        except Exception as exc:
            await self._failed(context, "CompareAndSet", exc)
            raise
        return storage_pb2.CompareAndSetResponse(succeeded=ok, found=kv is not None, kv=kv_pb(kv))

    async def Watch(
        self, request: storage_pb2.WatchRequest, context: Any
    ) -> AsyncIterator[storage_pb2.WatchEvent]:
        storage, ns = await self._where(request, context, "Watch")
        if request.after < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"Watch: after: must be >= 0, got {request.after}"
            )
        async with self.watches.hold(context):
            events = storage.watch(ns, request.prefix, after=request.after)
            try:
                async for ev in events:
                    yield storage_pb2.WatchEvent(
                        kind=ev.kind, kv=kv_pb(ev.kv), revision=ev.revision
                    )
            except Exception as exc:
                await self._failed(context, "Watch", exc)
            finally:
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    await aclose()
